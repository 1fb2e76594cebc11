"""Converts PyTorch checkpoints (timm / mmseg ViT, SegViT / DToP heads) into our Flax params.

Everything here works on plain `{name: array}` state dicts (torch tensors or numpy arrays)
and never imports torch, so checkpoints can be converted once, offline, and stored as numpy.

ViT (`timm_vit_to_params`): the result is the `params` subtree of `vit.ViT`. Naming:

  timm                         mmseg (vit2mmseg / vitjax2mmseg)     ours
  patch_embed.proj             patch_embed.projection               embedding (conv → Dense)
  pos_embed [1, (P+)N, D]      pos_embed [1, 1+N, D]                pos_embedding [gh, gw, D]
  blocks.i.norm1 / norm2       layers.i.ln1 / ln2                   blocks_i.norm1 / norm2
  blocks.i.attn.qkv            layers.i.attn.attn.in_proj_*         blocks_i.attn.qkv
  blocks.i.attn.proj           layers.i.attn.attn.out_proj          blocks_i.attn.proj
  blocks.i.mlp.fc1 / fc2       layers.i.ffn.layers.0.0 / layers.1   blocks_i.mlp.fc1 / fc2
  norm                         ln1                                  norm (if present)

Prefix tokens (cls, DeiT dist, registers) and their position embeddings are dropped, as
mmseg does with `with_cls_token=False` (the token is removed before the first block), and
so are classifier parts (`head*`, `fc_norm`, the post-pool norm of avg-pool models).

Heads (`segvit_head_to_params`): SegViT `ATMHead` numbers its stages from 1 and applies
stage 1 to the deepest feature (it reverses the input list); our `ATMHead` counts from 0,
also deepest first, so torch stage s ↦ our stage s - 1. DToP's `PruneHead` has a single
unnumbered stage and a 2-way class head; it maps to `ATMHead(num_stages=1, binary_cls=True)`.

Whole checkpoints (`segmentor_to_params`): an mmseg SegViT or DToP segmentor (backbone,
decode_head, DToP's auxiliary_head.<i> exit heads) → the `params` of `segmenter.Segmenter`.
"""
import math
import re
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from step_jax.models import resize

Params = Dict[str, Any]

# mmseg ViT names → timm names; anchored, first match wins, other keys pass unchanged.
_MMSEG_TO_TIMM = [
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.ln1\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.ln2\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^layers\.(\d+)\.attn\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
    (r"^(ln1|final_norm)\.", "norm."),
]
# Keys dropped on purpose (prefix tokens, classifier); anything else unknown is an error,
# e.g. layer scale (`ls1.gamma`), qk-norm or `norm_pre`, which our ViT does not have.
_VIT_IGNORED = re.compile(r"^(cls_token|dist_token|reg_token|head\.|head_dist\.|fc_norm\.|"
                          r"pre_logits\.)")
_HEAD_IGNORED = re.compile(r"^conv_seg\.")  # mmseg BaseDecodeHead classifier (unused by ATM)


# ----------------------------------------------------------------------------- helpers

def _to_numpy(x) -> np.ndarray:
  """torch tensor (any device/dtype) or array-like → numpy; floats become float32."""
  if hasattr(x, "detach"):  # torch.Tensor, without importing torch
    x = x.detach().cpu()
    x = (x.float() if x.is_floating_point() else x).numpy()
  x = np.asarray(x)
  return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x


def _unwrap(state_dict: Mapping[str, Any], prefix: str) -> Dict[str, np.ndarray]:
  """Unnests {'state_dict'|'model': ...}, keeps the keys under `prefix` (stripped; all keys
  if none carries it) and converts values to numpy."""
  for wrapper in ("state_dict", "model"):
    if isinstance(state_dict.get(wrapper), Mapping):
      state_dict = state_dict[wrapper]
  if prefix and any(k.startswith(prefix) for k in state_dict):
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  return {k: _to_numpy(v) for k, v in state_dict.items()}


def _check(sd: Mapping[str, np.ndarray], spec: Mapping[str, tuple], extra: Sequence[str],
           ignored: re.Pattern, what: str) -> None:
  """Raises one ValueError listing missing, unexpected and mis-shaped keys."""
  missing = [k for k in spec if k not in sd]
  unexpected = [k for k in sd if k not in spec and k not in extra and not ignored.match(k)]
  shapes = [f"{k}: {sd[k].shape} (expected {spec[k]})" for k in spec
            if k in sd and sd[k].shape != tuple(spec[k])]
  problems = []
  for title, items in (("missing", missing), ("unexpected", unexpected), ("bad shape", shapes)):
    if items:
      shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
      problems.append(f"{title} keys: {shown}")
  if problems:
    raise ValueError(f"state dict does not fit {what}:\n  " + "\n  ".join(problems))


def _dense(sd, name: str, weight: str = "weight", bias: str = "bias") -> Params:
  """torch Linear (weight [out, in], bias [out]) → Flax Dense (kernel [in, out], bias)."""
  return {"kernel": np.ascontiguousarray(sd[f"{name}.{weight}"].T), "bias": sd[f"{name}.{bias}"]}


def _layer_norm(sd, name: str) -> Params:
  return {"scale": sd[name + ".weight"], "bias": sd[name + ".bias"]}


def _indices(keys, pattern: str) -> list:
  """Sorted distinct integers captured by `pattern` (one group) over `keys`."""
  return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


# ----------------------------------------------------------------------------- ViT

def _mmseg_to_timm_names(sd: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  out = {}
  for k, v in sd.items():
    for pattern, repl in _MMSEG_TO_TIMM:
      new, n = re.subn(pattern, repl, k)
      if n:
        k = new
        break
    out[k] = v
  return out


def _posemb_grid(sd, n_patches_plus_prefix: int, src_grid):
  """(number of leading prefix entries, (gh, gw)) of the stored position embedding."""
  n_prefix = ("cls_token" in sd) + ("dist_token" in sd)
  if "reg_token" in sd:
    n_prefix += sd["reg_token"].shape[1]

  def grid_of(n):
    if src_grid is not None:
      return tuple(src_grid) if src_grid[0] * src_grid[1] == n else None
    r = math.isqrt(n)
    return (r, r) if r * r == n else None

  # timm default / mmseg: prefix tokens have entries; `no_embed_class` models: they don't.
  for drop in dict.fromkeys((n_prefix, 0)):
    if n_patches_plus_prefix > drop and (grid := grid_of(n_patches_plus_prefix - drop)):
      return drop, grid
  raise ValueError(f"pos_embed has {n_patches_plus_prefix} entries and the checkpoint has "
                   f"{n_prefix} prefix token(s); cannot find a {src_grid or 'square'} patch "
                   "grid in it (pass src_grid=(gh, gw) for a non-square checkpoint)")


def timm_vit_to_params(state_dict: Mapping[str, Any], *,
                       posemb_grid: Optional[Sequence[int]] = None,
                       src_grid: Optional[Sequence[int]] = None,
                       prefix: str = "backbone.") -> Params:
  """timm `VisionTransformer` (or mmseg ViT) state dict → `params` of `vit.ViT`.

  Args:
    state_dict: name → tensor/array; a full mmseg segmentor checkpoint works too (the
      `prefix` part is taken when present). The naming (timm or mmseg) is detected.
    posemb_grid: resample the position embedding to this (gh, gw) grid (bicubic, PyTorch
      `F.interpolate(align_corners=False)` without antialias, as mmseg's `resize_pos_embed`;
      note timm's own `resample_abs_pos_embed` antialiases). None keeps the stored grid,
      which must then be given as `ViT(posemb_grid=...)`.
    src_grid: (gh, gw) of the stored embedding; only needed when it is not square.
    prefix: key prefix to strip if present (mmseg: 'backbone.').

  Missing qkv biases (timm `qkv_bias=False`) become zeros; every other missing, unknown or
  mis-shaped key raises a ValueError that lists them.
  """
  sd = _unwrap(state_dict, prefix)
  if any(k.startswith(("layers.", "patch_embed.projection.")) for k in sd):
    sd = _mmseg_to_timm_names(sd)
  if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
    raise ValueError("not a ViT state dict: need patch_embed.proj.weight (timm) or "
                     "patch_embed.projection.weight (mmseg) and pos_embed; got keys "
                     f"{sorted(sd)[:10]}...")
  d, c, p, p2 = sd["patch_embed.proj.weight"].shape
  if p != p2:
    raise ValueError(f"non-square patches {p}x{p2} are not supported")
  depth = len(_indices(sd, r"blocks\.(\d+)\."))
  if not depth:
    raise ValueError("ViT state dict has no transformer blocks (blocks.i / layers.i)")
  mlp = sd.get("blocks.0.mlp.fc1.weight", np.zeros((0,))).shape[0]

  spec = {"patch_embed.proj.weight": (d, c, p, p), "patch_embed.proj.bias": (d,)}
  for i in range(depth):
    b = f"blocks.{i}."
    sd.setdefault(b + "attn.qkv.bias", np.zeros(3 * d, np.float32))  # qkv_bias=False
    spec.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,),
                 b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                 b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                 b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                 b + "mlp.fc1.weight": (mlp, d), b + "mlp.fc1.bias": (mlp,),
                 b + "mlp.fc2.weight": (d, mlp), b + "mlp.fc2.bias": (d,)})
  has_norm = "norm.weight" in sd or "norm.bias" in sd
  if has_norm:
    spec.update({"norm.weight": (d,), "norm.bias": (d,)})
  _check(sd, spec, ["pos_embed"], _VIT_IGNORED, f"a timm ViT (width {d}, depth {depth})")

  pe = sd["pos_embed"]
  if pe.ndim == 4:  # [1, gh, gw, D]: a grid without prefix entries
    src_grid = src_grid or pe.shape[1:3]
    pe = pe.reshape(1, -1, pe.shape[-1])
  if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != d:
    raise ValueError(f"pos_embed shape {sd['pos_embed'].shape} does not fit width {d}")
  n_drop, grid = _posemb_grid(sd, pe.shape[1], src_grid)
  pos = pe[0, n_drop:].reshape(*grid, d)
  if posemb_grid is not None and tuple(posemb_grid) != grid:
    pos = np.asarray(resize.resize_2d(pos, tuple(posemb_grid), "bicubic", axes=(0, 1)))

  # Conv weight [D, C, p, p] → Dense kernel [(row, col, channel), D], as ViT.patchify.
  kernel = sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0).reshape(p * p * c, d)
  params = {"embedding": {"kernel": np.ascontiguousarray(kernel),
                          "bias": sd["patch_embed.proj.bias"]},
            "pos_embedding": np.ascontiguousarray(pos, dtype=np.float32)}
  for i in range(depth):
    b = f"blocks.{i}."
    params[f"blocks_{i}"] = {
        "norm1": _layer_norm(sd, b + "norm1"),
        "attn": {"qkv": _dense(sd, b + "attn.qkv"), "proj": _dense(sd, b + "attn.proj")},
        "norm2": _layer_norm(sd, b + "norm2"),
        "mlp": {"fc1": _dense(sd, b + "mlp.fc1"), "fc2": _dense(sd, b + "mlp.fc2")}}
  if has_norm:
    params["norm"] = _layer_norm(sd, "norm")
  return params


def params_to_timm_vit(params: Params, *, in_chans: int = 3) -> Dict[str, np.ndarray]:
  """`vit.ViT` params → timm state dict (`class_token=False` layout: pos_embed [1, N, D]).

  Load it with `timm_model.load_state_dict(..., strict=False)` (timm's model may also have
  `fc_norm`/`head`, which we don't export) after wrapping arrays with `torch.from_numpy`.
  """
  params = params.get("params", params)
  np_ = lambda x: np.asarray(x, dtype=np.float32)
  kernel = np_(params["embedding"]["kernel"])
  d = kernel.shape[1]
  p = math.isqrt(kernel.shape[0] // in_chans)
  if p * p * in_chans != kernel.shape[0]:
    raise ValueError(f"embedding kernel {kernel.shape} is not [p*p*{in_chans}, D]")
  sd = {"pos_embed": np_(params["pos_embedding"]).reshape(1, -1, d),
        "patch_embed.proj.weight": kernel.reshape(p, p, in_chans, d).transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": np_(params["embedding"]["bias"])}

  def linear(name, tree):
    sd[name + ".weight"], sd[name + ".bias"] = np_(tree["kernel"]).T, np_(tree["bias"])

  def norm(name, tree):
    sd[name + ".weight"], sd[name + ".bias"] = np_(tree["scale"]), np_(tree["bias"])

  depth = len(_indices(params, r"blocks_(\d+)$"))
  for i in range(depth):
    blk, b = params[f"blocks_{i}"], f"blocks.{i}."
    norm(b + "norm1", blk["norm1"])
    linear(b + "attn.qkv", blk["attn"]["qkv"])
    linear(b + "attn.proj", blk["attn"]["proj"])
    norm(b + "norm2", blk["norm2"])
    linear(b + "mlp.fc1", blk["mlp"]["fc1"])
    linear(b + "mlp.fc2", blk["mlp"]["fc2"])
  if "norm" in params:
    norm("norm", params["norm"])
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


# ----------------------------------------------------------------------------- ATM heads

def segvit_head_to_params(state_dict: Mapping[str, Any], *,
                          prefix: str = "decode_head.") -> Params:
  """SegViT `ATMHead` / DToP `PruneHead` state dict → `params` of `atm.ATMHead`.

  The head's configuration follows from the weights: num_stages (input_proj_1..S, or one
  unnumbered stage for PruneHead), num_layers, dim, num_classes and the class head width
  (C+1, or 2 → build `ATMHead(binary_cls=True)`). num_heads is not stored; use the
  checkpoint's config. `prefix` is stripped when present (e.g. 'auxiliary_head.0.').
  """
  sd = _unwrap(state_dict, prefix)
  numbered = _indices(sd, r"input_proj_(\d+)\.")
  if numbered:
    if numbered != list(range(1, len(numbered) + 1)):
      raise ValueError(f"ATM stages must be numbered 1..S, got {numbered}")
    suffixes = [f"_{s}" for s in numbered]  # torch stage s (deepest = 1) ↦ our s - 1
  elif "input_proj.weight" in sd:
    suffixes = [""]  # DToP PruneHead
  else:
    raise ValueError("not an ATM head state dict: no input_proj(_1).weight; keys start "
                     f"{sorted(sd)[:10]} (wrong prefix={prefix!r}?)")
  if "q.weight" not in sd or "class_embed.weight" not in sd:
    raise ValueError("ATM head state dict needs q.weight and class_embed.weight")
  num_classes, d = sd["q.weight"].shape
  k_cls = sd["class_embed.weight"].shape[0]
  d_in = sd[f"input_proj{suffixes[0]}.weight"].shape[1]
  layers = _indices(sd, rf"decoder{suffixes[0]}\.layers\.(\d+)\.")

  spec = {"q.weight": (num_classes, d), "class_embed.weight": (k_cls, d),
          "class_embed.bias": (k_cls,)}
  for s in suffixes:
    spec.update({f"input_proj{s}.weight": (d, d_in), f"input_proj{s}.bias": (d,),
                 f"proj_norm{s}.weight": (d,), f"proj_norm{s}.bias": (d,)})
    for j in layers:
      l = f"decoder{s}.layers.{j}."
      spec.update({l + "self_attn.in_proj_weight": (3 * d, d),
                   l + "self_attn.in_proj_bias": (3 * d,),
                   l + "self_attn.out_proj.weight": (d, d), l + "self_attn.out_proj.bias": (d,),
                   l + "linear1.weight": (4 * d, d), l + "linear1.bias": (4 * d,),
                   l + "linear2.weight": (d, 4 * d), l + "linear2.bias": (d,)})
      for n in ("multihead_attn.q", "multihead_attn.k", "multihead_attn.v",
                "multihead_attn.proj"):
        spec.update({l + n + ".weight": (d, d), l + n + ".bias": (d,)})
      for n in ("norm1", "norm2", "norm3"):
        spec.update({l + n + ".weight": (d,), l + n + ".bias": (d,)})
  _check(sd, spec, [], _HEAD_IGNORED,
         f"an ATM head ({len(suffixes)} stage(s) x {len(layers)} layers, dim {d})")
  if k_cls not in (2, num_classes + 1):
    raise ValueError(f"class_embed has {k_cls} outputs; expected {num_classes + 1} (SegViT) "
                     "or 2 (DToP binary head)")
  if layers != list(range(len(layers))):
    raise ValueError(f"decoder layers must be numbered 0..L-1, got {layers}")

  params = {"queries": sd["q.weight"], "class_embed": _dense(sd, "class_embed")}
  for i, s in enumerate(suffixes):
    params[f"input_proj_{i}"] = _dense(sd, f"input_proj{s}")
    params[f"proj_norm_{i}"] = _layer_norm(sd, f"proj_norm{s}")
    for j in layers:
      l = f"decoder{s}.layers.{j}."
      # torch MultiheadAttention in_proj_weight [3d, d] = [Wq; Wk; Wv] → kernel [d, 3d] with
      # columns [q | k | v], which SelfAttention reshapes to (3, heads, head_dim).
      params[f"decoder_{i}_{j}"] = {
          "self_attn": {"qkv": _dense(sd, l + "self_attn", "in_proj_weight", "in_proj_bias"),
                        "proj": _dense(sd, l + "self_attn.out_proj")},
          "cross_attn": {n: _dense(sd, l + "multihead_attn." + n) for n in ("q", "k", "v", "proj")},
          "linear1": _dense(sd, l + "linear1"), "linear2": _dense(sd, l + "linear2"),
          **{n: _layer_norm(sd, l + n) for n in ("norm1", "norm2", "norm3")}}
  return params


# ----------------------------------------------------------------------------- segmentors

def segmentor_to_params(state_dict: Mapping[str, Any], *,
                        posemb_grid: Optional[Sequence[int]] = None,
                        src_grid: Optional[Sequence[int]] = None) -> Params:
  """A whole mmseg segmentor checkpoint → `params` of `segmenter.Segmenter`.

  SegViT: `backbone.*` (ViT) + `decode_head.*` (multi-stage ATMHead) → {'backbone', 'head'}.
  DToP: the final `PruneHead` is `decode_head.*` and the exit heads are
  `auxiliary_head.<i>.*` (a ModuleList; `auxiliary_head.*` when there is only one), which
  become 'exit_heads_<i>' in exit order. posemb_grid / src_grid as in `timm_vit_to_params`.
  """
  sd = _unwrap(state_dict, "")
  if not any(k.startswith("backbone.") for k in sd):
    raise ValueError("not an mmseg segmentor checkpoint: no backbone.* keys; keys start "
                     f"{sorted(sd)[:10]} (a bare ViT: use timm_vit_to_params)")
  params = {"backbone": timm_vit_to_params(sd, posemb_grid=posemb_grid, src_grid=src_grid,
                                           prefix="backbone.")}
  if any(k.startswith("decode_head.") for k in sd):
    params["head"] = segvit_head_to_params(sd, prefix="decode_head.")
  exits = _indices(sd, r"auxiliary_head\.(\d+)\.")
  if exits:
    if exits != list(range(len(exits))):
      raise ValueError(f"auxiliary heads must be numbered 0..E-1, got {exits}")
    for i in exits:
      params[f"exit_heads_{i}"] = segvit_head_to_params(sd, prefix=f"auxiliary_head.{i}.")
  elif any(k.startswith("auxiliary_head.") for k in sd):  # a single auxiliary head
    params["exit_heads_0"] = segvit_head_to_params(sd, prefix="auxiliary_head.")
  return params
