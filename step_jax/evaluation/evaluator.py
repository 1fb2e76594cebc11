"""Evaluation: whole-image and sliding-window inference, mIoU from a confusion matrix.

    python -m step_jax.cli.evaluate --config=configs/camvid.py:method=segvit,size=cpu \
        --workdir=DIR [--config.data.split=test] [--config.data.data_dir=...]

(`evaluate_checkpoint`) evaluates the latest checkpoint in DIR and writes
`DIR/eval_<split>.json` with `miou`
(fraction), `per_class_iou`, `pixel_acc`, `mean_acc`, `gflops`, `images`, `step` and
`compiled_shapes`. Without `--config`, DIR/config.json is used.

Protocol (mmseg `EncoderDecoder.inference`, single scale):
  1. optional test-time resize (`config.eval.resize_short`, keep ratio, long side capped at
     `config.eval.max_long`; mmcv `rescale_size` rounding, bilinear, on the host);
  2. `mode='whole'`: the image is padded (bottom/right, with the pixel mean, i.e. zero after
     normalisation) to a multiple of the patch size, run once, and the scores cropped back;
     `mode='slide'`: windows of `config.data.image_size` every `config.eval.stride` pixels,
     the last row/column of windows shifted back to end at the image border (mmseg
     `slide_inference`), class scores summed and divided by the per-pixel window count;
     images smaller than a window are padded as in whole mode;
  3. scores are resized (bilinear, align_corners=False) to the label's size, then argmax;
  4. a confusion matrix is accumulated; padded pixels and padded batch rows never count.

Static shapes: images are grouped by a *bucket* shape (whole: the padded size; slide: the
size rounded up to whole strides; labels: a multiple of `config.eval.label_multiple`, and
of 1/8 of the side's power of two for big labels) and the
per-image sizes travel as data, so a dataset of varying image sizes compiles only a few
programs (their number is reported). Window positions, crops and resizes that depend on the
true size are computed inside the program from those sizes.

Bucket dispatch (`config.eval.dispatch`: 'auto', the default, picks one per model with
`dispatch.resolve`, or dispatch.DISPATCHES): 'device' runs each batch in
one jitted program (padding, model with its capacity buckets chosen by `lax.switch`, scores,
confusion matrix; sliding windows as a `lax.scan`); 'host' / 'host_split' run the model
through `dispatch.HostBuckets` (the merge first, its token count read back, each program
compiled per capacity on first use; host_scoring.py) between small jitted programs for the
padding and the scores. On the host the images of one bucket shape are sorted by token
count in pools of `config.eval.group_batches` batches (0: POOL_IMAGES images; the confusion
matrix does not depend on the order), so that a batch's capacity, set by its largest count,
is close to each image's own, and a pool runs together: `config.eval.bucket_ratio` (1.05
under 'auto') bounds the padding of each program over the pool, with capacities planned on
the pool's counts (`dispatch.plan_capacities`; 0: the model's own ladder). The sorting
pass's level maps are kept (a grid of int32 per image and window) and handed to the batch
that runs the image, so the policy net and the merge run once per image. Sliding
windows: every image of a bucket shape has the same windows (n, at the same places up to
the border clip), so a batch runs window by window, window k of each of its images as one
model batch, added to the image's scores on the device that holds the image; windows of
different images are not mixed across batches, which would group counts more tightly but
move every window's scores to its image's device (and process). The default and the
measurements behind it: evaluation/dispatch.py (analysis/benchmark.py `measure_evaluation`).

Multi-host: every process reads the whole split (so all agree on the batch plan) and feeds
its rows of each global batch; the confusion matrix is a global sum. With the host dispatch
the token counts are gathered from every process (dispatch.host_value): all order a pool the
same way and agree on each batch's capacity, so all run the same programs.
"""
import collections
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from step_jax.data import get_source
from step_jax.evaluation import dispatch as dispatch_lib
from step_jax.evaluation import host_scoring
from step_jax.evaluation import metrics as metrics_lib
from step_jax.evaluation import tokens
from step_jax.evaluation import windows
from step_jax.models import resize as resize_lib
from step_jax.models import segmenter
from step_jax.models import variables as variables_lib
from step_jax.models import vit as vit_lib
from step_jax.runtime import checkpoint as ckpt_lib
from step_jax.runtime import sharding as sharding_lib


################################################################################
# Settings and host-side preparation.                                          #
################################################################################
def settings(config) -> dict:
  """Evaluation protocol from `config.eval` (all keys optional) and the training crop."""
  ev = config.get("eval", None)
  ev = {} if ev is None else ev
  crop = tuple(int(s) for s in config.data.image_size)
  stride = ev.get("stride", None) or (0, 0)
  stride = (int(stride), int(stride)) if np.ndim(stride) == 0 else tuple(int(s) for s in stride)
  # mmseg's ViT-B recipe: 512 crop, 341 stride (two thirds).
  stride = tuple(s if s > 0 else max(c * 2 // 3, 1) for s, c in zip(stride, crop))
  mode = ev.get("mode", "whole")
  if mode not in ("whole", "slide"):
    raise ValueError(f"config.eval.mode={mode!r}: use 'whole' or 'slide'")
  if any(s > c for s, c in zip(stride, crop)):
    raise ValueError(f"config.eval.stride={stride} larger than the window {crop} leaves gaps")
  patch = vit_lib.decode_variant(config.model.variant)["patch_size"]
  dispatch = ev.get("dispatch", "auto") or "auto"
  if dispatch not in dispatch_lib.CHOICES:
    raise ValueError(f"config.eval.dispatch={dispatch!r}: use one of "
                     f"{', '.join(dispatch_lib.CHOICES)}")
  bucket_ratio = float(ev.get("bucket_ratio", 0) or 0)
  if bucket_ratio and bucket_ratio <= 1:
    raise ValueError(f"config.eval.bucket_ratio={bucket_ratio}: use 0 (the model's buckets) "
                     "or a ratio > 1, e.g. 1.05")
  group_batches = int(ev.get("group_batches", 0) or 0)
  if group_batches < 0:
    raise ValueError(f"config.eval.group_batches={group_batches}: use 0 (pools of "
                     f"{POOL_IMAGES} images), 1 (batches in reading order) or more")
  return dict(mode=mode, crop=crop, stride=stride, patch=patch, dispatch=dispatch,
              bucket_ratio=bucket_ratio, group_batches=group_batches,
              resize_short=int(ev.get("resize_short", 0) or 0),
              max_long=int(ev.get("max_long", 0) or 0),
              label_multiple=int(ev.get("label_multiple", 32) or 1),
              batch_size=int(ev.get("batch_size", 0) or config.get("eval_batch_size", 8)),
              pad_value=tuple(float(v) for v in config.model.get("pixel_mean", (127.5,) * 3)))


# The host dispatch's pools (config.eval.group_batches=0): images sorted by token count and
# run together, so that a pool's capacities are planned over its images
# (dispatch.HostBuckets.run). Replayed on ViT-B/16 STEP's counts over the 101 CamVid val frames
# at 1024² (experiments/ladder_sim.py), pools of 16 images compile 105 s and the whole split
# 66 s; a pool holds its images' states between programs (~13 MB each at B/16, 1024²).
POOL_IMAGES = 128


def pool_batches(s, batch):
  """Batches per pool of the host dispatch: config.eval.group_batches, or 0: POOL_IMAGES."""
  return s["group_batches"] or max(1, -(-POOL_IMAGES // batch))


def target_size(h, w, resize_short=0, max_long=0):
  """mmcv `rescale_size(keep_ratio)`: scale = min(short/min(h,w), long/max(h,w))."""
  if not resize_short and not max_long:
    return h, w
  scales = []
  if resize_short:
    scales.append(resize_short / min(h, w))
  if max_long:
    scales.append(max_long / max(h, w))
  s = min(scales)
  return int(h * s + 0.5), int(w * s + 0.5)


def resize_image(image, out_hw):
  """uint8 [H, W, 3] → uint8 [h, w, 3], bilinear, half-pixel centres, no antialias (cv2
  INTER_LINEAR / PyTorch bilinear conventions)."""
  h, w = image.shape[:2]
  if (h, w) == tuple(out_hw):
    return image
  my = resize_lib.interp_matrix(h, out_hw[0], "bilinear")
  mx = resize_lib.interp_matrix(w, out_hw[1], "bilinear")
  x = np.einsum("ih,hwc->iwc", my, image.astype(np.float32))
  x = np.einsum("jw,iwc->ijc", mx, x)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _round_up(n, m):
  return -(-n // m) * m


def label_bucket(n: int, multiple: int) -> int:
  """Padded label side: a multiple of `multiple`, coarser for big sides (at most ~1/8 of
  padding), so datasets of many label sizes (ADE20K) compile few programs."""
  step = max(multiple, (1 << max(int(n).bit_length() - 1, 0)) // 8)
  return _round_up(n, step)


def bucket_shape(hw, s) -> tuple:
  """Padded (H, W) an image of size `hw` is computed at."""
  if s["mode"] == "whole":
    return tuple(_round_up(n, s["patch"]) for n in hw)
  # slide: smallest crop + k·stride ≥ size; windows never reach past the true image except
  # when it is smaller than a window.
  return tuple(c + _round_up(max(n - c, 0), st) for n, c, st in zip(hw, s["crop"], s["stride"]))


def eval_groups(source, s, size):
  """Yields (bucket key, up to `size` examples (image, label, sizes) of that key): each as
  soon as it is full, in reading order, then the rest, key by key."""
  pending = collections.OrderedDict()
  for i in range(len(source)):
    ex = source[i]
    img, lab = np.asarray(ex["image"]), np.asarray(ex["label"])
    hr, wr = target_size(img.shape[0], img.shape[1], s["resize_short"], s["max_long"])
    img = resize_image(img, (hr, wr))
    key = (bucket_shape((hr, wr), s),
           tuple(label_bucket(n, s["label_multiple"]) for n in lab.shape[:2]))
    pending.setdefault(key, []).append((img, lab, (hr, wr) + tuple(lab.shape[:2])))
    if len(pending[key]) == size:
      yield key, pending.pop(key)
  yield from pending.items()


def make_batch(key, exs, s, batch_size, *, process_index=0, process_count=1, repeat=False):
  """This process's rows of the global batch of examples `exs` of bucket `key` (see
  eval_batches), padded with valid=False rows to `batch_size`: blank, or with `repeat` the
  first image again (its token count, not a blank image's, for the host dispatch)."""
  (hb, wb), (hl, wl) = key
  b = len(exs)
  image = np.zeros((batch_size, hb, wb, 3), np.uint8)
  label = np.full((batch_size, hl, wl), s["ignore_index"], np.int32)
  sizes = np.tile(np.array(exs[0][2], np.int32), (batch_size, 1))
  for k in range(batch_size if repeat else b):
    img, lab, sz = exs[k] if k < b else exs[0]
    image[k, :img.shape[0], :img.shape[1]] = img
    if k < b:
      label[k, :lab.shape[0], :lab.shape[1]] = lab
    sizes[k] = sz
  valid = np.arange(batch_size) < b
  per_host = batch_size // process_count
  rows = slice(process_index * per_host, (process_index + 1) * per_host)
  return dict(image=image[rows], label=label[rows], sizes=sizes[rows], valid=valid[rows])


def eval_batches(source, s, batch_size, *, process_index=0, process_count=1):
  """Yields (bucket key, host batch) with image uint8 [b, Hb, Wb, 3], label int32
  [b, Hl, Wl] (ignore-padded), sizes int32 [b, 4] = (h, w, h_label, w_label), valid [b].

  Every process walks the whole split in order; a global batch holds images of one bucket,
  is padded with valid=False rows to `batch_size`, and each process keeps its slice of rows.
  """
  for key, exs in eval_groups(source, s, batch_size):
    yield key, make_batch(key, exs, s, batch_size, process_index=process_index,
                          process_count=process_count)


################################################################################
# On-device inference.                                                         #
################################################################################
def infer(params, images, hw, *, apply_fn, mode, crop, stride, pad_value):
  """Class scores [B, Hb, Wb, C] of padded images uint8 [B, Hb, Wb, 3] with true sizes
  hw [B, 2]; only [:h, :w] of each image is meaningful.

  apply_fn(params, x float32 [B, h, w, 3] in pixel units) → scores [B, h, w, C].
  """
  x = windows.fill_outside(images, hw, pad_value)
  if mode == "whole":
    return apply_fn(params, x)
  b, hb, wb, _ = x.shape
  ch, cw = crop
  ys, xs, valid = windows.slide_windows(hw, (hb, wb), crop, stride)     # [B, n]

  def body(carry, win):
    y, x0, ok = win                                            # [B] each
    scores = apply_fn(params, windows.crop_windows(x, y, x0, crop))    # [B, ch, cw, C]
    return windows.add_windows(*carry, scores, y, x0, ok), None

  num_classes = jax.eval_shape(apply_fn, params, x[:, :ch, :cw]).shape[-1]
  init = (jnp.zeros((b, hb, wb, num_classes), jnp.float32), jnp.zeros((b, hb, wb, 1), jnp.float32))
  (canvas, count), _ = jax.lax.scan(body, init, (ys.T, xs.T, valid.T))
  return canvas / jnp.maximum(count, 1.0)


def _bilinear_taps(n_in, n_out, n_out_static):
  """PyTorch bilinear (align_corners=False) 2-tap indices/weights with traced sizes."""
  dst = jnp.arange(n_out_static, dtype=jnp.float32)[None, :]
  scale = n_in[:, None].astype(jnp.float32) / n_out[:, None].astype(jnp.float32)
  src = jnp.maximum((dst + 0.5) * scale - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), n_in[:, None] - 1)
  i1 = jnp.minimum(i0 + 1, n_in[:, None] - 1)
  w1 = src - i0.astype(jnp.float32)
  return i0, i1, 1.0 - w1, w1                                  # [B, n_out_static]


def resize_scores(scores, in_hw, out_hw, out_static):
  """Bilinear resize of scores [B, H, W, C] from true sizes in_hw to out_hw [B, 2], into
  arrays of static size `out_static`. Equal sizes are reproduced exactly (weights 1, 0)."""
  i0, i1, w0, w1 = _bilinear_taps(in_hw[:, 0], out_hw[:, 0], out_static[0])
  take = jax.vmap(lambda s, i: jnp.take(s, i, axis=0))
  s = take(scores, i0) * w0[..., None, None] + take(scores, i1) * w1[..., None, None]
  i0, i1, w0, w1 = _bilinear_taps(in_hw[:, 1], out_hw[:, 1], out_static[1])
  take = jax.vmap(lambda s, i: jnp.take(s, i, axis=1))
  return take(s, i0) * w0[:, None, :, None] + take(s, i1) * w1[:, None, :, None]


def eval_step(params, batch, *, apply_fn, s, num_classes, ignore_index):
  """Confusion matrix [C, C] of one padded batch (see module docstring)."""
  sizes = batch["sizes"]
  if s.get("oracle"):  # the oracle merge reads labels at the image's resolution
    hb, wb = batch["image"].shape[1:3]
    lab = batch["label"][:, :hb, :wb]
    lab = jnp.pad(lab, ((0, 0), (0, hb - lab.shape[1]), (0, wb - lab.shape[2])),
                  constant_values=ignore_index)
    apply_fn = functools.partial(apply_fn, labels=lab)
  scores = infer(params, batch["image"], sizes[:, :2], apply_fn=apply_fn, mode=s["mode"],
                 crop=s["crop"], stride=s["stride"], pad_value=s["pad_value"])
  return confusion(scores, batch, num_classes=num_classes, ignore_index=ignore_index)


def confusion(scores, batch, *, num_classes, ignore_index):
  """Confusion matrix [C, C] of a batch's class scores [B, Hb, Wb, C] at the model input's
  size: resized to each label's size, argmax, padded pixels and rows left out."""
  sizes = batch["sizes"]
  label = batch["label"]
  scores = resize_scores(scores, sizes[:, :2], sizes[:, 2:], label.shape[1:3])
  pred = jnp.argmax(scores, axis=-1)
  hl, wl = label.shape[1:3]
  inside = ((jnp.arange(hl)[None, :, None] < sizes[:, 2, None, None])
            & (jnp.arange(wl)[None, None, :] < sizes[:, 3, None, None]))
  label = jnp.where(inside, label, ignore_index)
  return metrics_lib.confusion_matrix(pred, label, num_classes, ignore_index, batch["valid"])


################################################################################
# The evaluator.                                                               #
################################################################################
def as_variables(tree):
  """Flax variables from either variables ({'params': ..., 'batch_stats': ...}) or params."""
  return tree if "params" in tree else {"params": tree}


def make_apply_fn(model):
  """(variables or params, pixels [B, h, w, 3]) → class scores [B, h, w, C] at the input
  resolution (`labels` only for the oracle merge)."""
  def apply_fn(params, x, labels=None):
    kw = dict(labels=labels) if labels is not None else {}
    outputs, _ = model.apply(as_variables(params), x, train=False, **kw)
    return segmenter.predict_scores(outputs, x.shape[1:3])
  return apply_fn


class Evaluator:
  """Evaluates params on one split; holds the jitted step so programs compile once.

  Usage: `ev = Evaluator(config, model, mesh); metrics = ev(variables)` (variables: flax
  variables, or just the params for models without a policy net). The bucket dispatch and
  ladder are config.eval's (module doc); `host` is the HostBuckets on the host dispatch
  (its compile_s, calls), else None.
  """

  def __init__(self, config, model, mesh, split=None, source=None):
    self.config = config
    self.mesh = mesh
    self.split = split or config.data.get("split", "") or config.data.eval_split
    self.source = source if source is not None else get_source(
        config.data, self.split, config.num_classes, config.ignore_index)
    self.s = settings(config)
    self.s["ignore_index"] = int(config.ignore_index)
    self.s["oracle"] = model.merge == "oracle"
    if self.s["oracle"] and (self.s["mode"] != "whole" or self.s.get("resize_short")):
      raise ValueError("the oracle merge is evaluated in whole mode without test-time resize "
                       "(it reads labels at the image's resolution); set config.eval.mode="
                       "'whole' and config.eval.resize_short=0")
    self.s["dispatch"], self.s["bucket_ratio"] = dispatch_lib.resolve(
        model, self.s["dispatch"], self.s["bucket_ratio"])
    self.model = model = dispatch_lib.with_ladder(model, self.s["bucket_ratio"])
    self.host = dispatch_lib.host_buckets(model, self.s["dispatch"], self.s["bucket_ratio"])
    if self.host is not None and self.s["oracle"]:
      raise ValueError("the oracle merge reads labels inside the one program: evaluate it with "
                       "config.eval.dispatch='device'")
    self.batch_size = _round_up(max(self.s["batch_size"], 1),
                                math.lcm(mesh.size, jax.process_count()))
    self._step = jax.jit(functools.partial(
        eval_step, apply_fn=make_apply_fn(model), s=self.s,
        num_classes=int(config.num_classes), ignore_index=int(config.ignore_index)))
    self._confusion = jax.jit(functools.partial(
        confusion, num_classes=int(config.num_classes), ignore_index=int(config.ignore_index)))
    self.shapes = set()  # bucket shapes seen = programs compiled
    self.confusion = None   # the last call's confusion matrix

  def __call__(self, params):
    conf = np.zeros((self.config.num_classes,) * 2, np.int64)
    t0 = time.time()
    if self.host is None:
      for key, host_batch in eval_batches(self.source, self.s, self.batch_size,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count()):
        self.shapes.add(key)
        c = self._step(params, sharding_lib.put_batch(host_batch, self.mesh))
        conf += np.asarray(jax.device_get(c), np.int64)
    else:
      variables = as_variables(params)
      for pool in self._pools(variables):
        self.shapes.update(key for key, _, _ in pool)
        batches = [sharding_lib.put_batch(b, self.mesh) for _, b, _ in pool]
        scores = host_scoring.pool_scores(
            self.host, variables,
            [(b["image"], b["sizes"], m) for b, (_, _, m) in zip(batches, pool)], self.s)
        for batch, (x, _) in zip(batches, scores):
          conf += np.asarray(jax.device_get(self._confusion(x, batch)), np.int64)
    self.confusion = conf
    names = getattr(self.source, "class_names", None)
    out = metrics_lib.summarize(conf, list(names) if names is not None else None)
    out.update(split=self.split, images=len(self.source), mode=self.s["mode"],
               dispatch=self.s["dispatch"], compiled_shapes=len(self.shapes),
               shapes=[dict(image=list(k[0]), label=list(k[1])) for k in sorted(self.shapes)],
               eval_time_s=time.time() - t0)
    if self.host is not None:
      out.update(bucket_ratio=self.s["bucket_ratio"], model_programs=len(self.host.compile_s),
                 model_compile_s=sum(self.host.compile_s.values()),
                 model_compile=self.host.compile_summary())
    return out

  def _pools(self, variables):
    """Pools of (key, host batch, merges) for the host dispatch: the images of one bucket
    shape in pools of `group_batches` batches, each pool sorted by token count (counts
    gathered from every process, so all sort alike) and cut into batches; merges: the sorting
    pass's level maps of the batch's images (host_scoring reuses them), None where no pass
    ran. Models without a merge before the encoder (SegViT, DToP, ALGM) have no count to sort
    by: reading order. A pool's batches run together (host_scoring.pool_scores)."""
    b, pi, pc = self.batch_size, jax.process_index(), jax.process_count()
    batch = lambda key, exs: make_batch(key, exs, self.s, b, process_index=pi,
                                        process_count=pc, repeat=True)
    # This process's rows of a global [b, ...] array, placed as put_batch places a batch.
    place = lambda a: sharding_lib.put_batch(a[pi * (b // pc):(pi + 1) * (b // pc)], self.mesh)
    for key, exs in eval_groups(self.source, self.s, b * pool_batches(self.s, b)):
      merges = None
      if len(exs) > b and self.model.shares_tokens:
        merges = []
        for i in range(0, len(exs), b):
          x = batch(key, exs[i:i + b])
          x = sharding_lib.put_batch(dict(image=x["image"], sizes=x["sizes"]), self.mesh)
          calls = host_scoring.host_merges(self.host, variables, x["image"], x["sizes"], self.s)
          merges += host_scoring.per_image(calls, len(exs[i:i + b]))
        order = np.argsort([sum(int(c) for _, c in m) for m in merges], kind="stable")
        exs, merges = [exs[i] for i in order], [merges[i] for i in order]
      pool = []
      for i in range(0, len(exs), b):
        rows = list(range(i, min(i + b, len(exs))))
        rows += rows[:1] * (b - len(rows))   # make_batch's repeat of the first image
        pool.append((key, batch(key, exs[i:i + b]),
                     merges and host_scoring.merges_of(rows, merges, place)))
      yield pool


def evaluate(config, params, *, model=None, mesh=None, split=None, source=None):
  """Metrics dict of `params` on `split` (default config.data.split or eval_split)."""
  model = model or variables_lib.create_model(config)
  mesh = mesh or sharding_lib.make_mesh(config)
  return Evaluator(config, model, mesh, split=split, source=source)(params)


################################################################################
# A training workdir's checkpoint.                                             #
################################################################################
def evaluate_checkpoint(config, workdir, *, step=None):
  """Restores the latest (or `step`) checkpoint of `workdir`, evaluates, writes
  `<workdir>/eval_<split>.json`; returns the dict written."""
  sharding_lib.initialize_distributed(config)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist (expected a training "
                            "workdir with checkpoints/)")
  ckpt_lib.prepare_workdir(workdir, min_free_bytes=2**20)  # the json must be writable after
  split = config.data.get("split", "") or config.data.eval_split
  source = get_source(config.data, split, config.num_classes, config.ignore_index)  # data first
  mesh = sharding_lib.make_mesh(config)
  model = variables_lib.create_model(config)
  variables, step = variables_lib.restore(config, workdir, step, model=model, mesh=mesh)
  ev = Evaluator(config, model, mesh, split=split, source=source)
  out = ev(variables)
  # Executed GFLOPs in the capacities the evaluation's dispatch and ladder choose.
  out.update(step=int(step), gflops_image_size=list(config.data.image_size),
             **tokens.eval_gflops(config, ev.model, variables, split=out["split"],
                                  forward=ev.host))
  if jax.process_index() == 0:
    ckpt_lib.write_json(os.path.join(workdir, f"eval_{out['split']}.json"), out)
  print(f"step {step}: {out['split']} mIoU {100 * out['miou']:.2f} pixel acc "
        f"{100 * out['pixel_acc']:.2f} ({out['images']} images, {out['mode']} mode, "
        f"{out['compiled_shapes']} compiled shapes, buckets chosen on the "
        f"{'device' if out['dispatch'] == 'device' else 'host'})", flush=True)
  return out
