"""Python API: build or load a model, segment images, in a few lines.

  import step_jax
  model, variables = step_jax.load("workdirs/step")        # training workdir or export dir
  pred, info = step_jax.segment(model, variables, image)   # uint8 [H, W, 3] → int32 [H, W]
  step_jax.analysis.visualize.figure(image, pred, info).save("step.png")

`load` accepts
  - a training workdir (config.json + checkpoints/): the Flax model and the variables of its
    latest (or `step`) checkpoint;
  - a `python -m step_jax.cli.export` folder: the Flax model rebuilt from its config.json and the
    variables from params.msgpack (or params.safetensors); with `exported=True` the
    serialized `jax.export` artifact instead, which runs without the model code.
`build(config)` gives a model with random ViT/heads (and the trained policy of
`config.model.policy.init_from` when set), for trying things out.

`segment` returns the predicted classes and `info`, numpy arrays: `scores` [H, W, C],
`grid`, `patch_size`, `exit_layers`, and the token maps the model produced: with supertokens
`level` [gh, gw] (superpatch side per cell), `num_tokens`, `capacity`; with early exits
`halt_stage` [gh, gw] (exit index where each cell halted; len(exit_layers) = never),
`active_tokens` (per stage) and `stage_capacity`. Batched input ([B, H, W, 3]) gives
batched outputs.
"""
import importlib
import importlib.util
import json
import os

from flax import serialization
import jax
from jax import export
import jax.numpy as jnp
import ml_collections
import numpy as np

from step_jax.evaluation import dispatch as dispatch_lib
from step_jax.evaluation import tokens
from step_jax.models import attention
from step_jax.models import inputs
from step_jax.models import pretrained
from step_jax.models import segmenter
from step_jax.models import variables as variables_lib
from step_jax.runtime import checkpoint

CONFIG_JSON = "config.json"
EXPORT_JSON = "export.json"
MSGPACK = "params.msgpack"
SAFETENSORS = "params.safetensors"
ARTIFACT = "model.jaxexport"


################################################################################
# Configs and models.                                                          #
################################################################################
def get_config(spec):
  """A ConfigDict from a ConfigDict, a dict, a JSON file or 'configs/step.py:arg,...'."""
  if isinstance(spec, ml_collections.ConfigDict):
    return spec
  if isinstance(spec, dict):
    return ml_collections.ConfigDict(spec)
  if not isinstance(spec, str):
    raise TypeError(f"config must be a ConfigDict, dict or string, got {type(spec).__name__}")
  if spec.endswith(".json"):
    return checkpoint.read_config(spec)
  path, _, arg = spec.partition(":")
  if os.path.isfile(path):
    mod_spec = importlib.util.spec_from_file_location("_step_jax_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
  else:  # an installed package: 'configs/step.py' → configs.step
    name = os.path.splitext(path)[0].replace(os.sep, ".").replace("/", ".")
    try:
      module = importlib.import_module(name)
    except ImportError as e:
      raise FileNotFoundError(f"config {spec!r}: no file {path} and no module {name}") from e
  return module.get_config(arg or None)


def create_model(config):
  """The Flax Segmenter of a config (ConfigDict, dict, JSON file or 'configs/x.py:args')."""
  return variables_lib.create_model(get_config(config))


def build(config, *, seed=0):
  """(model, variables) for a config, with random ViT and heads.

  A CTS/dCTS policy comes from `config.model.policy.init_from` when set (a train_policy
  workdir); otherwise it is random too, and so are its merges.
  """
  config = get_config(config)
  model = create_model(config)
  variables = variables_lib.random_variables(model, tuple(config.data.image_size), seed)
  init_from = config.model.get("policy", {}).get("init_from", "")
  if init_from and model.policy is not None:
    variables = variables_lib.with_trained_policy(variables, init_from)
  return model, variables


def calibrate_exits(model, variables, images, share=0.4, *, labels=None):
  """The model with exit thresholds under which `share` of the still-active tokens are
  halting candidates at each exit, on `images` [B, H, W, 3].

  For untrained exit heads (demos, benchmarks; the paper halts ~40 %); see
  `evaluation.tokens.calibrate_exits` (`labels`: the oracle merge's).
  """
  return model.clone(exit_threshold=tokens.calibrate_exits(model, variables, images, share,
                                                           labels=labels))


def inference_fn(model):
  """(variables, images float [B, H, W, 3] in 0..255[, labels]) → dict of arrays.

  The function that is exported and that `segment` runs: `scores` [B, H, W, C] (SegViT's
  class × mask product, upsampled), `pred` int32 [B, H, W], and the model's token maps and
  counts (everything in its info but the static `grid`).
  """
  def fn(variables, images, labels=None):
    kw = {} if labels is None else dict(labels=labels)
    outputs, info = model.apply(variables, images, train=False, **kw)
    return _outputs(outputs, info, images.shape[1:3])
  return fn


def _outputs(outputs, info, hw):
  scores = segmenter.predict_scores(outputs, hw)
  out = dict(scores=scores, pred=jnp.argmax(scores, axis=-1).astype(jnp.int32))
  out.update({k: v for k, v in info.items() if k != "grid"})
  return out


def _read_config(folder):
  return checkpoint.read_config(folder)


################################################################################
# Exported artifacts.                                                          #
################################################################################
class ExportedModel:
  """A deserialized `jax.export` artifact with its metadata; call it like the Flax model's
  `inference_fn`: `model(variables, images)` → dict of arrays."""

  def __init__(self, folder):
    with open(os.path.join(folder, ARTIFACT), "rb") as f:
      self.exported = export.deserialize(bytearray(f.read()))
    with open(os.path.join(folder, EXPORT_JSON)) as f:
      self.meta = json.load(f)
    self.config = _read_config(folder)
    self.image_size = tuple(self.meta["image_size"])
    self.patch_size = int(self.meta["patch_size"])
    self.exit_layers = tuple(self.meta["exit_layers"])
    self.pixel_mean = tuple(self.meta["pixel_mean"])
    self._call = jax.jit(self.exported.call)

  def __call__(self, variables, images):
    images = np.asarray(images)
    check_pixels(images)
    if tuple(images.shape[1:3]) != self.image_size:
      raise ValueError(f"the exported model takes images of {self.image_size[0]}x"
                       f"{self.image_size[1]}, got {images.shape[1]}x{images.shape[2]} "
                       "(step_jax.segment pads smaller images)")
    return self._call(variables, jnp.asarray(images, jnp.float32))


def read_params(folder):
  """Variables from params.msgpack (else params.safetensors) of an export folder."""
  msgpack, st = os.path.join(folder, MSGPACK), os.path.join(folder, SAFETENSORS)
  if os.path.isfile(msgpack):
    with open(msgpack, "rb") as f:
      return serialization.msgpack_restore(f.read())
  if os.path.isfile(st):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return pretrained.unflatten(load_file(st))
  raise FileNotFoundError(f"no {MSGPACK} or {SAFETENSORS} in {folder}")


def load(path, *, step=None, exported=False):
  """(model, variables) from a training workdir or an export folder (module docstring)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory (expected a step_jax workdir or "
                            "a step_jax export folder)")
  is_export = os.path.isfile(os.path.join(path, EXPORT_JSON))
  if exported:
    if not (is_export and os.path.isfile(os.path.join(path, ARTIFACT))):
      raise FileNotFoundError(f"exported=True needs {ARTIFACT} and {EXPORT_JSON} in {path}; "
                              "make them with python -m step_jax.cli.export")
    return ExportedModel(path), read_params(path)
  config = _read_config(path)
  if is_export:
    return create_model(config), read_params(path)
  variables = variables_lib.load(config, path, step)
  return create_model(config), jax.tree.map(np.asarray, jax.device_get(variables))


################################################################################
# Segmenting images.                                                           #
################################################################################
# Info entries that describe the whole batch (the bucket it ran in), not one image.
_PER_BATCH = ("capacity", "stage_capacity", "algm_capacity")
_RUNNERS = {}  # (id(model), dispatch) → (model, runner): programs compile once per model


def _runner(model, dispatch):
  """inference_fn as one jitted program ('device'), or with the capacity buckets chosen on
  the host ('host', 'host_split'; evaluation/dispatch.py): the same outputs, less padding."""
  hit = _RUNNERS.get((id(model), dispatch))
  if hit is None or hit[0] is not model:   # an unknown dispatch is never cached: checked here
    host = dispatch_lib.host_buckets(model, dispatch)
    if host is None:
      run = jax.jit(inference_fn(model))
    else:
      finish = jax.jit(_outputs, static_argnums=2)
      run = lambda variables, images: finish(*host(variables, images), images.shape[1:3])
    hit = _RUNNERS[(id(model), dispatch)] = (model, run)
  return hit[1]


def check_pixels(images):
  """Raises ValueError unless `images` [B, H, W, 3] are finite RGB pixels in [0, 255].

  Accepted: uint8; other integer types (not uint16) whose values lie in 0..255; floats in
  [0, 255] (floats mean pixel values, never [0, 1] intensities: an image whose largest value
  lies in (0, 1] is refused rather than guessed at). Refused: bool, uint16 (16-bit images),
  values outside 0..255, NaN/Inf, empty images, other shapes.
  """
  inputs.check_image_shape(images.shape,
                           "expected an image [H, W, 3] or a batch [B, H, W, 3]")
  kind = images.dtype
  if kind == bool or not (np.issubdtype(kind, np.integer) or np.issubdtype(kind, np.floating)):
    raise ValueError(f"images have dtype {kind}; expected uint8 (or float) pixels in [0, 255]")
  if kind == np.uint16:  # a 16-bit image, whatever its values: never read as 8-bit
    raise ValueError("images have dtype uint16 (a 16-bit image?); scale to 8 bits first "
                     "(e.g. (x >> 8).astype(np.uint8))")
  if kind == np.uint8:
    return
  if np.issubdtype(kind, np.floating):
    inputs.check_finite(images)
  lo, hi = float(images.min()), float(images.max())
  if lo < 0 or hi > 255:
    hint = "; 16-bit? scale to 8 bits first (e.g. x >> 8)" if hi > 255 and hi <= 65535 else ""
    raise ValueError(f"images of dtype {kind} have values in [{lo:g}, {hi:g}]; expected "
                     f"pixels in [0, 255]{hint}")
  if np.issubdtype(kind, np.floating) and 0 < hi <= 1:
    raise ValueError(f"float images with values in [{lo:g}, {hi:g}] look like intensities in "
                     "[0, 1]; the model takes pixels in [0, 255]: multiply by 255 first")


def memory_estimate(model, batch, height, width):
  """Bytes one forward of `model` needs on this device, following the program that runs (used
  to refuse impossible calls before compiling). On the full (padded) grid of N tokens:
  - where the attention path materialises it (einsum, xla: not cuDNN's fused kernel nor the
    chunked path, which hold small blocks), the fp32 attention logits and probabilities
    [B, heads, N, N] of one layer;
  - ~4 live token activations of a block ([B, N, D + mlp] in the model's dtype);
  - the fp32 per-pixel tensors of the output: mask logits upsampled to [B, C, H, W] and the
    class scores [B, H, W, C];
  - the parameters (fp32).
  0.8-1.2x XLA's compiled memory analysis (temp + arguments + output) on a CPU for ViT-Ti/16
  at 256-768² and ViT-B/16 at 512-1024², einsum and xla paths (chunked: 0.91-1.06x, Ti/16
  256-768², B/16 1024²; tests/test_api_input.py checks 2x)."""
  b = model.backbone
  n = (height // b.patch_size) * (width // b.patch_size)
  impl = attention.resolve_impl(b.attention_impl, b.dtype, b.width // b.num_heads, n)
  attn = 0 if impl in ("cudnn", "chunked", "cpu_fused") else 2 * b.num_heads * n * n * 4
  act = 4 * n * (b.width + b.mlp_dim) * jnp.dtype(b.dtype).itemsize
  pixels = 2 * model.head.num_classes * height * width * 4
  h = model.head
  head_params = h.num_stages * (b.width * h.dim + h.num_layers * 16 * h.dim ** 2)
  params = (b.depth * (4 * b.width ** 2 + 2 * b.width * b.mlp_dim)
            + 3 * b.patch_size ** 2 * b.width + int(np.prod(b.posemb_grid)) * b.width
            + head_params) * 4
  return batch * (attn + act + pixels) + params


def available_memory():
  """Bytes the default device can hold: the accelerator's limit, or the host's memory."""
  try:
    limit = jax.devices()[0].memory_stats().get("bytes_limit")
    if limit:
      return int(limit)
  except Exception:  # pylint: disable=broad-except
    pass  # the CPU backend has no memory statistics
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(model, batch, height, width):
  """Raises MemoryError (before compiling anything) when a call cannot fit this device."""
  need, have = memory_estimate(model, batch, height, width), available_memory()
  if need <= have:
    return
  p = model.backbone.patch_size  # attention grows with tokens²: guess, then step down
  side = max(int(np.sqrt(height * width * np.sqrt(have / need))) // p * p, p)
  while side > p and memory_estimate(model, batch, side, side) > have:
    side -= p
  raise MemoryError(
      f"a {batch}x{height}x{width} input needs about {need / 2**30:.1f} GiB ("
      f"{(height // model.backbone.patch_size) * (width // model.backbone.patch_size)} "
      f"tokens, {model.backbone.attention_impl} attention) but this device has "
      f"{have / 2**30:.1f} GiB; resize to about {side}x{side} pixels or less, or segment "
      "fewer images per call")


def segment(model, variables, images, *, labels=None, dispatch="device"):
  """(pred, info) for one image [H, W, 3] or a batch [B, H, W, 3] (uint8 or float 0..255).

  Inputs are checked on the host first (check_pixels; for the Flax model also check_memory):
  bad values raise ValueError naming the problem instead of returning a prediction.

  Images are padded bottom/right with the pixel mean to the patch grid (the exported model:
  to its fixed input size) and the outputs cropped back, as `evaluate`'s whole mode does;
  token maps cover the padded grid. `labels` ([H, W] / [B, H, W]) feed the 'oracle' merge.
  `dispatch` ('device', 'host', 'host_split'; the Flax model only): where the token buckets
  are chosen, see configs/common.py `bucket_dispatch`; the host designs pad less with a fine
  ladder (`model.clone(buckets=capacity.geometric_buckets(1.05))`) and compile on first use.
  """
  images = np.asarray(images)
  single = images.ndim == 3
  if single:
    images = images[None]
  check_pixels(images)
  h, w = images.shape[1:3]
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (images.shape[:3] if not single else images.shape[1:3]):
      raise ValueError(f"labels have shape {labels.shape}; expected "
                       f"{images.shape[1:3] if single else images.shape[:3]}, the images' "
                       "[B,] H, W")
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels have dtype {labels.dtype}; expected integer class ids")
  if isinstance(model, ExportedModel):
    if labels is not None:
      raise ValueError("an exported model takes no labels (the oracle merge is not exported)")
    if dispatch != "device":
      raise ValueError(f"an exported model is one program: dispatch={dispatch!r} needs the "
                       "Flax model (step_jax.load without exported=True)")
    hp, wp = model.image_size
    if h > hp or w > wp:
      raise ValueError(f"image {h}x{w} is larger than the exported input {hp}x{wp}; "
                       "resize it first (or export at that size with --image_size)")
    patch, exit_layers, mean, run = model.patch_size, model.exit_layers, model.pixel_mean, model
  else:
    patch, exit_layers = model.backbone.patch_size, tuple(model.exit_layers)
    hp, wp = -(-h // patch) * patch, -(-w // patch) * patch
    check_memory(model, images.shape[0], hp, wp)
    if labels is not None and dispatch != "device":
      raise ValueError(f"labels (the oracle merge) need dispatch='device', not {dispatch!r}")
    mean, run = model.pixel_mean, _runner(model, dispatch)
  x = np.empty((images.shape[0], hp, wp, 3), np.float32)
  x[...] = np.asarray(mean, np.float32)
  x[:, :h, :w] = images
  args = (variables, x)
  if labels is not None:
    labels = labels[None] if single else labels
    lab = np.full((labels.shape[0], hp, wp), getattr(model, "ignore_index", 255), np.int32)
    lab[:, :h, :w] = labels
    out = jax.device_get(run(*args, lab))
  else:
    out = jax.device_get(run(*args))
  out = {k: np.asarray(v) for k, v in out.items()}
  pred = out.pop("pred")[:, :h, :w]
  info = dict(out, scores=out["scores"][:, :h, :w], grid=(hp // patch, wp // patch),
              patch_size=patch, exit_layers=exit_layers)
  if single:
    pred = pred[0]
    info = {k: (v[0] if isinstance(v, np.ndarray) and k not in _PER_BATCH else v)
            for k, v in info.items()}
  return pred, info
