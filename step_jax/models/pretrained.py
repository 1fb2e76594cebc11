"""Weights from elsewhere (`config.init_from`): another step_jax workdir (e.g. the BASE model
for DToP-style pruning fine-tuning), a `.npz` of our parameter names, or a timm/mmseg ViT or
SegViT checkpoint (`.pth` needs torch; `.safetensors` does not), converted by
`step_jax.models.convert`; `merge_params` places them into a model's parameters.
"""
import os

from absl import logging
import jax
import numpy as np

from step_jax.models import convert
from step_jax.runtime import checkpoint


def flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(flatten(v, key))
    else:
      out[key] = np.asarray(v)
  return out


def unflatten(flat):
  tree = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def _torch_state_dict(path: str):
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  import torch  # pylint: disable=g-import-not-at-top  (optional: only for .pth inputs)
  sd = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model", "module"):
    if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
      sd = sd[key]
  return {k: v.float().numpy() if hasattr(v, "float") else np.asarray(v) for k, v in sd.items()}


def _params_from_state_dict(sd, model_cfg):
  """timm/mmseg ViT (+ optional SegViT head under decode_head.) → our params subtree."""
  if any("/" in k for k in sd):  # an npz of our own flattened names
    return unflatten(sd)
  grid = tuple(model_cfg.posemb_grid) if model_cfg.get("posemb_grid") else None
  if any(k.startswith("backbone.") for k in sd):  # a whole mmseg SegViT/DToP segmentor
    return convert.segmentor_to_params(sd, posemb_grid=grid)
  return {"backbone": convert.timm_vit_to_params(sd, posemb_grid=grid)}


def load_pretrained(path: str, model_cfg) -> dict:
  """Numpy params (possibly a subtree of the model's) from `path`; see module docstring."""
  if os.path.isdir(path):
    return checkpoint.read_params(path)
  if path.endswith(".npz"):
    with np.load(path) as z:
      return _params_from_state_dict(dict(z), model_cfg)
  return _params_from_state_dict(_torch_state_dict(path), model_cfg)


def merge_params(target, loaded, *, source="init_from"):
  """`target` (sharded jax arrays) with every leaf of `loaded` that exists in it replaced.

  Shapes must agree (a mismatch raises, naming the parameter); parameters that only one
  side has are listed in the log. Each replaced leaf keeps the target's sharding.
  """
  paths_t = {jax.tree_util.keystr(p, simple=True, separator="/"): x
             for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  flat_l = flatten(loaded)
  bad = [f"{k}: checkpoint {flat_l[k].shape} vs model {paths_t[k].shape}"
         for k in flat_l if k in paths_t and tuple(flat_l[k].shape) != tuple(paths_t[k].shape)]
  if bad:
    raise ValueError(f"{source}: shape mismatch for " + "; ".join(bad[:10]))
  used = [k for k in flat_l if k in paths_t]
  unused = sorted(set(flat_l) - set(paths_t))
  missing = sorted(set(paths_t) - set(flat_l))
  logging.info("%s: loaded %d arrays; %d not in the model %s; %d model arrays kept from init "
               "%s", source, len(used), len(unused), unused[:5], len(missing), missing[:5])
  if not used:
    raise ValueError(f"{source}: no parameter names in common with the model "
                     f"(checkpoint has e.g. {sorted(flat_l)[:5]})")

  def pick(path, x):
    key = jax.tree_util.keystr(path, simple=True, separator="/")
    if key not in flat_l:
      return x
    value = flat_l[key].astype(x.dtype)
    return jax.make_array_from_callback(x.shape, x.sharding, lambda idx: value[idx])
  return jax.tree_util.tree_map_with_path(pick, target), dict(loaded=len(used),
                                                              unused=unused, missing=missing)
