"""Lets torchvision (and so timm) import beside the CPU build of torch.

PyPI's torchvision 0.28.0 is linked against CUDA torch; next to torch 2.13.0+cpu its
`import` fails with "operator torchvision::nms does not exist". Declaring the two op
schemas first lets the pure-Python parts import (timm's ViT needs nothing compiled from
torchvision); calling the ops themselves would still fail. Import this before torchvision
or timm (`import step_jax.testing.tv_shim`, or pytest.importorskip of it).
"""
import torch

_TV_LIBRARY = None  # module-level reference keeps the op registrations alive

try:
  torch.ops.torchvision.nms
except (AttributeError, RuntimeError):
  _TV_LIBRARY = torch.library.Library("torchvision", "DEF")
  _TV_LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _TV_LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
