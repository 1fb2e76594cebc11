"""The segmentation model: ViT encoder + ATM head (SegViT), with the hooks STEP builds on.

Data flow (see DESIGN.md §1): pixels → normalise → tokens [B, N, D] (+ key mask) → ViT blocks
→ ATM head on the outputs of `out_layers` → per-token class/mask logits → token grid
[B, Q, gh, gw] → bilinear upsampling of mask logits to pixels → class scores.

Models return `(outputs, aux)`: `outputs` is what the losses consume; `aux` carries maps for
analysis (token grid, later supertoken leaf maps and exit masks).
"""
import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from step_jax.models import atm
from step_jax.models import resize
from step_jax.models import supertokens
from step_jax.models import vit as vit_lib


class Segmenter(nn.Module):
  """SegViT (plain ViT + ATM head), optionally on supertokens (CTS / dCTS).

  Attributes:
    backbone: the ViT encoder.
    head: ATM head with `num_stages == len(out_layers)`.
    out_layers: 1-based block indices feeding the head, shallowest first (ViT-B: 6, 8, 12).
    pixel_mean, pixel_std: input normalisation; the model takes raw pixels in [0, 255].
    merge: token sharing: 'none' (plain ViT), 'dcts' (policy scores vs per-size
      thresholds), 'cts' (top-K 2x2 windows), 'oracle' (windows pure in the labels).
    thresholds: τ for window sizes (2, 4, 8, 16) patches (dCTS, e.g. τ-6899 = .6 .8 .9 .9).
    cts_shared: K, the number of shared 2x2 windows in CTS mode (103 at 512²).
    superpatch_resize: 'area' or 'bilinear' (PyTorch, no antialias), see supertokens.py.
    buckets: token capacities as fractions of the full grid; the smallest that holds the
      batch's largest token count is selected on device (`lax.switch`), so only these shapes
      are ever compiled and fewer tokens really cost less.
    policy: module mapping pixels to {k: logits [B, H/(16k), W/(16k)]} (dcts/cts).
  """
  backbone: vit_lib.ViT
  head: atm.ATMHead
  out_layers: Sequence[int]
  pixel_mean: Sequence[float] = (127.5, 127.5, 127.5)
  pixel_std: Sequence[float] = (127.5, 127.5, 127.5)
  merge: str = "none"
  thresholds: Sequence[float] = (0.6, 0.8, 0.9, 0.9)
  cts_shared: int = 0
  superpatch_resize: str = "area"
  buckets: Sequence[float] = (1.0,)
  ignore_index: int = 255
  policy: Optional[nn.Module] = None

  def normalize(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images [B, H, W, 3], got shape {images.shape}")
    x = (images.astype(jnp.float32) - jnp.asarray(self.pixel_mean)) / jnp.asarray(self.pixel_std)
    return x.astype(self.backbone.dtype)

  def grid(self, images):
    p = self.backbone.patch_size
    h, w = images.shape[1:3]
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}; "
                       "resize or pad the input first")
    return h // p, w // p

  def merge_scores(self, images, labels=None):
    """{k: [B, gh//k, gw//k]} window scores in [0, 1] that drive the merge."""
    if self.merge == "oracle":
      if labels is None:
        raise ValueError("merge='oracle' needs the labels: call model(images, labels=...)")
      return {k: (supertokens.window_purity(labels, k, self.backbone.patch_size,
                                            self.ignore_index) == 1).astype(jnp.float32)
              for k in supertokens.SIZES}
    if self.policy is None:
      raise ValueError(f"merge={self.merge!r} needs a policy network")
    logits = self.policy(images)
    # The policy is trained separately and frozen here (hard selection has no gradient).
    return {k: jax.nn.sigmoid(jax.lax.stop_gradient(v.astype(jnp.float32)))
            for k, v in logits.items()}

  def merge_levels(self, images, labels=None):
    """Level map [B, gh, gw]: side (in patches) of the superpatch covering each cell."""
    grid = self.grid(images)
    scores = self.merge_scores(images, labels)
    if self.merge == "cts":
      return supertokens.cts_levels(scores[2], self.cts_shared, grid)
    if len(self.thresholds) != len(supertokens.SIZES):
      raise ValueError(f"thresholds={tuple(self.thresholds)} needs one τ per window size "
                       f"{supertokens.SIZES}")
    tau = dict(zip(supertokens.SIZES, self.thresholds))
    return supertokens.merge_levels({k: scores[k] for k in supertokens.SIZES}, tau, grid)

  def capacities(self, grid):
    n = grid[0] * grid[1]
    if self.merge == "cts":  # fixed token count: one exact bucket
      return (n - 3 * self.cts_shared,)
    return supertokens.bucket_capacities(n, self.buckets)

  def encode_decode(self, x, key_mask, grid, *, train):
    """Tokens [B, C, D] (+ key mask) → ViT → ATM head; outputs per token."""
    outs = self.backbone.run_blocks(x, key_mask, train=train)
    return self.head([outs[i - 1] for i in self.out_layers], key_mask, train=train)

  def run_supertokens(self, x, layout, grid, capacity, train):
    """Gathers `capacity` supertokens, runs the network, un-shares masks to the grid."""
    p = self.backbone.patch_size
    patches, valid = supertokens.gather_tokens(
        supertokens.pyramid_table(x, p, self.superpatch_resize), layout, capacity)
    pos_table = supertokens.pyramid_table(self.backbone.posemb(grid)[None], 1, "area")
    pos, _ = supertokens.gather_tokens(
        jnp.broadcast_to(pos_table, (x.shape[0],) + pos_table.shape[1:]), layout, capacity)
    tokens = self.backbone.embed_patches(patches) + pos
    head_out = self.encode_decode(tokens, valid, grid, train=train)
    unshare = lambda o: dict(pred_logits=o["pred_logits"],
                             pred_masks=supertokens.unshare(o["pred_masks"], layout["leaf"]))
    return dict(unshare(head_out), aux=[unshare(o) for o in head_out["aux"]])

  @nn.compact
  def __call__(self, images, *, train=False, labels=None, capacity=None):
    """images [B, H, W, 3] in [0, 255] → (outputs, aux).

    outputs: pred_logits [B, Q, K]; pred_masks [B, Q, gh, gw] mask logits on the patch grid;
      aux: list of the same for earlier head stages (deep supervision).
    aux: grid; with token sharing also the level map, tokens per image and the capacity used.
    capacity: force one token capacity instead of the on-device bucket choice.
    """
    grid = self.grid(images)
    b = images.shape[0]
    x = self.normalize(images)
    info = dict(grid=grid)
    if self.merge == "none":
      tokens = self.backbone.embed(x).reshape(b, grid[0] * grid[1], -1)
      out = self.encode_decode(tokens, None, grid, train=train)
    else:
      level = self.merge_levels(images, labels)
      layout = supertokens.token_layout(level)
      caps = (capacity,) if capacity else self.capacities(grid)
      if len(caps) == 1:
        out = self.run_supertokens(x, layout, grid, caps[0], train)
        idx = jnp.zeros((), jnp.int32)
      else:
        idx = supertokens.bucket_index(layout["count"], caps)
        branches = [functools.partial(Segmenter.run_supertokens, grid=grid, capacity=c,
                                      train=train) for c in caps]
        out = nn.switch(idx, branches, self, x, layout)
      info.update(level=level, num_tokens=layout["count"],
                  capacity=jnp.asarray(caps, jnp.int32)[idx])
    to_grid = lambda o: dict(pred_logits=o["pred_logits"],
                             pred_masks=o["pred_masks"].reshape(b, -1, *grid))
    outputs = to_grid(out)
    outputs["aux"] = [to_grid(o) for o in out["aux"]]
    return outputs, info


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
