"""The segmentation model: ViT encoder + ATM head (SegViT), with the hooks STEP builds on.

Data flow (see DESIGN.md §1): pixels → normalise → tokens [B, N, D] (+ key mask) → ViT blocks
→ ATM head on the outputs of `out_layers` → per-token class/mask logits → token grid
[B, Q, gh, gw] → bilinear upsampling of mask logits to pixels → class scores.

Models return `(outputs, aux)`: `outputs` is what the losses consume; `aux` carries maps for
analysis (token grid, later supertoken leaf maps and exit masks).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from step_jax.models import atm
from step_jax.models import resize
from step_jax.models import vit as vit_lib


class Segmenter(nn.Module):
  """SegViT: plain ViT + ATM head.

  Attributes:
    backbone: the ViT encoder.
    head: ATM head with `num_stages == len(out_layers)`.
    out_layers: 1-based block indices feeding the head, shallowest first (ViT-B: 6, 8, 12).
    pixel_mean, pixel_std: input normalisation; the model takes raw pixels in [0, 255].
  """
  backbone: vit_lib.ViT
  head: atm.ATMHead
  out_layers: Sequence[int]
  pixel_mean: Sequence[float] = (127.5, 127.5, 127.5)
  pixel_std: Sequence[float] = (127.5, 127.5, 127.5)

  def normalize(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images [B, H, W, 3], got shape {images.shape}")
    x = (images.astype(jnp.float32) - jnp.asarray(self.pixel_mean)) / jnp.asarray(self.pixel_std)
    return x.astype(self.backbone.dtype)

  @nn.compact
  def __call__(self, images, *, train=False):
    """images [B, H, W, 3] in [0, 255] → (outputs, aux).

    outputs: pred_logits [B, Q, K]; pred_masks [B, Q, gh, gw] mask logits on the patch grid;
      aux: list of the same for earlier head stages (deep supervision).
    """
    tokens = self.backbone.embed(self.normalize(images))
    b, gh, gw, d = tokens.shape
    outs = self.backbone.run_blocks(tokens.reshape(b, gh * gw, d), train=train)
    feats = [outs[i - 1] for i in self.out_layers]
    head_out = self.head(feats, None, train=train)
    to_grid = lambda o: dict(pred_logits=o["pred_logits"],
                             pred_masks=o["pred_masks"].reshape(b, -1, gh, gw))
    outputs = to_grid(head_out)
    outputs["aux"] = [to_grid(o) for o in head_out["aux"]]
    return outputs, dict(grid=(gh, gw))


def upsample_masks(mask_logits, out_hw):
  """Bilinear (PyTorch align_corners=False) upsampling of [B, Q, h, w] logits to out_hw."""
  return resize.resize_2d(mask_logits, out_hw, "bilinear", axes=(-2, -1))


def predict_scores(outputs, out_hw):
  """Per-pixel class scores [B, H, W, C] (SegViT: upsample mask logits, then combine)."""
  masks = upsample_masks(outputs["pred_masks"], out_hw)
  return jnp.moveaxis(atm.semantic_scores(outputs["pred_logits"], masks), 1, -1)


def build(model_cfg, num_classes: int, image_size: Sequence[int]):
  """Builds the model from a `config.model` ConfigDict (see configs/common.py)."""
  v = vit_lib.decode_variant(model_cfg.variant)
  dtype = jnp.dtype(model_cfg.get("dtype", "float32"))
  p = v.pop("patch_size")
  posemb_grid = tuple(model_cfg.get("posemb_grid", None) or (image_size[0] // p, image_size[1] // p))
  backbone = vit_lib.ViT(**v, patch_size=p, posemb_grid=posemb_grid,
                         drop_path=model_cfg.get("drop_path", 0.0),
                         remat=model_cfg.get("remat", False), dtype=dtype)
  out_layers = tuple(model_cfg.out_layers)
  if not out_layers or max(out_layers) > v["depth"] or min(out_layers) < 1:
    raise ValueError(f"model.out_layers={out_layers} must be 1-based layers within depth "
                     f"{v['depth']} of {model_cfg.variant}")
  head = atm.ATMHead(num_classes, dim=model_cfg.head_dim, num_heads=model_cfg.head_heads,
                     num_layers=model_cfg.get("head_layers", 3), num_stages=len(out_layers),
                     dropout=model_cfg.get("head_dropout", 0.1), dtype=dtype)
  return Segmenter(backbone, head, out_layers,
                   pixel_mean=tuple(model_cfg.get("pixel_mean", (127.5,) * 3)),
                   pixel_std=tuple(model_cfg.get("pixel_std", (127.5,) * 3)))
