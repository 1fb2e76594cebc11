"""Segmenting files (the package doc): the model on this process's devices, batches of images
by padded shape (host-chosen buckets where dispatched so), each batch's outputs written while
the next one runs."""
import collections
import dataclasses
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from step_jax import api
from step_jax.analysis import visualize
from step_jax.data import datasets
from step_jax.data import decode
from step_jax.evaluation import dispatch as dispatch_lib
from step_jax.evaluation import evaluator
from step_jax.evaluation import host_scoring
from step_jax.evaluation import tokens as tokens_lib
from step_jax.inference import files as files_lib
from step_jax.inference import progress as progress_lib
from step_jax.runtime import checkpoint as ckpt_lib
from step_jax.runtime import sharding as sharding_lib

OUTPUTS = ("labels", "overlay", "tokens")
ON_ERROR = ("skip", "fatal")
# The model's token maps and counts (api.inference_fn's info entries) kept per batch, and
# those of them that are per image (the capacities are the batch's).
TOKEN_KEYS = ("level", "num_tokens", "capacity", "halt_stage", "active_tokens",
              "stage_capacity", "algm_source_local", "algm_source", "algm_tokens",
              "algm_capacity")
PER_IMAGE = ("level", "num_tokens", "halt_stage", "active_tokens", "algm_source_local",
             "algm_source")


################################################################################
# The model and its batched program.                                           #
################################################################################
def _load(model_dir):
  """(config, Flax model (its attributes), variables, call, fixed input size or None, fixed
  batch or None); call(variables, images) → api.inference_fn's dict."""
  config = ckpt_lib.read_config(model_dir)
  sharding_lib.initialize_distributed(config)   # before anything touches a device
  exported = all(os.path.isfile(os.path.join(model_dir, f))
                 for f in (api.ARTIFACT, api.EXPORT_JSON))
  model, variables = api.load(model_dir, exported=exported)
  if exported:
    batch = model.meta.get("batch")
    return (config, api.create_model(config), variables, model.exported.call,
            model.image_size, batch if isinstance(batch, int) else None)
  return config, model, variables, api.inference_fn(model), None, None


def _scores(variables, images, sizes, *, call, s):
  """Class scores [B, Hb, Wb, C] of padded images uint8 [B, Hb, Wb, 3] (true sizes
  sizes[:, :2]) by the protocol's mode; in whole mode also the model's token maps and
  counts. One program per padded input shape."""
  calls = []

  def apply_fn(params, x):
    out = call(params, x)
    calls.append(out)
    return out["scores"]
  scores = evaluator.infer(variables, images, sizes[:, :2], apply_fn=apply_fn, mode=s["mode"],
                           crop=s["crop"], stride=s["stride"], pad_value=s["pad_value"])
  result = dict(scores=scores)
  if s["mode"] == "whole":   # one model call on these very images: its info is theirs
    result.update({k: v for k, v in calls[0].items() if k in TOKEN_KEYS})
  return result


def _labels(scores, sizes, *, out_hw):
  """uint8 classes [B, H, W]: argmax of the scores resized from the model input's size
  (sizes[:, :2]) to the image's (sizes[:, 2:]) in arrays of size out_hw; None: no resize.
  A program of its own: images of one model shape and several sizes share the model's."""
  if out_hw is not None:
    scores = evaluator.resize_scores(scores, sizes[:, :2], sizes[:, 2:], out_hw)
  return jnp.argmax(scores, axis=-1).astype(jnp.uint8)


@dataclasses.dataclass
class _Entry:
  """One readable image on its way through a batch."""
  name: str
  image: np.ndarray            # as read, uint8 [H, W, 3]
  model_image: np.ndarray      # after the protocol's resize
  key: tuple                   # (padded model input (Hb, Wb), padded output size or None)
  merge: list = None           # the sorting pass's [(level, count)] per model call, reused


def _mean(values):
  return float(np.mean(values)) if values else None


################################################################################
# Segmenting files.                                                            #
################################################################################
def segment_files(model_dir, source, output, *, save=("labels",), batch_size=0,
                  on_error="skip", dispatch=None, bucket_ratio=None, stream=None):
  """Segments `source` (a folder, a glob, an image or a video) with the model in `model_dir`
  into `output` (module docstring); returns the summary written to output/summary.json:
  images segmented by this run, already_done (skipped: finished by an earlier run), failed [{file,
  error}], mean_tokens_full / kept (entering the encoder) / merged (away by ALGM's merges inside
  the encoder) / halted (by the exits) per image, gflops_useful / executed (flops.token_macs of
  the valid tokens and of the compiled slots; tokens and GFLOPs are None with sliding windows,
  whose windows' maps overlap), images_per_s (compile time left out), seconds, compile_s,
  compiled_shapes, dispatch and bucket_ratio; model_compile: the host dispatch's programs and
  their compile seconds by name (dispatch.HostBuckets.compile_summary).

  batch_size: images per program call (0: the config's evaluation batch), rounded up to a
  multiple of this process's devices. dispatch ('auto', 'device', 'host', 'host_split';
  dispatch.resolve) and bucket_ratio (0: the model's buckets, or under 'auto' the host's
  1.05; r > 1: capacity.geometric_buckets(r)): where the capacity buckets are chosen and
  their ladder (None: the config's eval.dispatch and eval.bucket_ratio; module doc).
  stream: where progress and failures go (stderr).
  """
  save = tuple(dict.fromkeys(save))
  if not save or set(save) - set(OUTPUTS):
    raise ValueError(f"save={','.join(save)}: choose one or more of {','.join(OUTPUTS)}")
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r}: use 'skip' or 'fatal'")
  if batch_size < 0:
    raise ValueError(f"batch_size={batch_size} must be 0 (the config's) or positive")
  if dispatch is not None and dispatch not in dispatch_lib.CHOICES:
    raise ValueError(f"dispatch={dispatch!r}: use one of {', '.join(dispatch_lib.CHOICES)}")
  if bucket_ratio is not None and bucket_ratio and bucket_ratio <= 1:
    raise ValueError(f"bucket_ratio={bucket_ratio}: use 0 (the model's buckets) or a ratio "
                     "> 1, e.g. 1.05")
  model_dir, output = os.fspath(model_dir), os.fspath(output)
  # A bad input fails before the model loads.
  files, video = files_lib.find_inputs(source, exclude=output)
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"{model_dir} is not a directory (expected a step_jax training "
                            "workdir or export folder)")
  run = _Run(model_dir, output, save, batch_size, on_error, stream or sys.stderr, dispatch,
             bucket_ratio)
  start = time.time()
  run.segment(run.entries(files, video))
  seconds = time.time() - start
  st = run.stats
  summary = dict(
      input=os.fspath(source), output=output, model=model_dir, dataset=run.config.data.name,
      num_classes=int(run.config.num_classes), mode=run.s["mode"], save=list(save),
      images=run.done, already_done=run.skipped, failed_count=len(run.failed),
      failed=run.failed, mean_tokens_full=_mean(st["full"]), mean_tokens_kept=_mean(st["kept"]),
      mean_tokens_merged=_mean(st["merged"]), mean_tokens_halted=_mean(st["halted"]),
      gflops_useful=_mean(st["useful"]),
      gflops_executed=_mean(st["executed"]),
      images_per_s=run.done / max(seconds - run.compile_s, 1e-9), seconds=seconds,
      compile_s=run.compile_s, compiled_shapes=len(run.shapes), batch_size=run.batch,
      dispatch=run.dispatch, bucket_ratio=run.bucket_ratio,
      model_compile=run.host.compile_summary() if run.host is not None else None,
      devices=len(run.devices), processes=files_lib.process_share()[1])
  return progress_lib.write_summary(summary, output)


class _Run:
  """One segment_files call: the model on this process's devices, its compiled programs and
  what has been done so far."""

  def __init__(self, model_dir, output, save, batch_size, on_error, stream, dispatch=None,
               bucket_ratio=None):
    self.config, self.model, variables, self.call, self.fixed_hw, fixed_batch = _load(model_dir)
    self.s = evaluator.settings(self.config)
    _check_protocol(self.model, self.s, save, self.fixed_hw, int(self.config.num_classes))
    self.dispatch = dispatch or self.s["dispatch"]
    self.bucket_ratio = self.s["bucket_ratio"] if bucket_ratio is None else float(bucket_ratio)
    if self.fixed_hw is not None and self.dispatch == "auto":
      self.dispatch, self.bucket_ratio = "device", 0.0   # an artifact is its one program
    elif self.fixed_hw is None:
      self.dispatch, self.bucket_ratio = dispatch_lib.resolve(self.model, self.dispatch,
                                                              self.bucket_ratio)
    if self.fixed_hw is not None and (self.dispatch != "device" or self.bucket_ratio):
      raise ValueError(f"{model_dir} holds an exported model, one program with its own "
                       f"buckets: dispatch={self.dispatch!r}, bucket_ratio={self.bucket_ratio} "
                       "need the Flax model (a training workdir or an export folder of "
                       "parameters); use dispatch='device', bucket_ratio=0")
    if self.fixed_hw is None:   # the model with its evaluation ladder, run as dispatched
      self.model = dispatch_lib.with_ladder(self.model, self.bucket_ratio)
      self.call = api.inference_fn(self.model)
    self.host = dispatch_lib.host_buckets(self.model, self.dispatch, self.bucket_ratio)
    self.colours = datasets.palette(self.config.data.name, int(self.config.num_classes))
    self.output, self.save, self.on_error, self.stream = output, save, on_error, stream
    self.devices = jax.local_devices()
    if fixed_batch:   # an artifact exported for one fixed batch runs as it was lowered
      self.devices, self.batch = self.devices[:1], fixed_batch
    else:
      batch = batch_size or self.s["batch_size"]
      self.batch = -(-batch // len(self.devices)) * len(self.devices)
    mesh = sharding_lib.make_mesh(devices=self.devices)
    self.rows = sharding_lib.batch_sharding(mesh)
    self.variables = jax.device_put(variables, sharding_lib.replicated(mesh))
    self.failed, self.stats, self.done, self.skipped = [], collections.defaultdict(list), 0, 0
    self.models, self.labels, self.compile_s, self.shapes = {}, {}, 0.0, set()
    self.progress = None

  def unfinished(self, name):
    """False (and counted) when an earlier run finished image `name`."""
    if files_lib.finished(self.output, name, self.save):
      self.skipped += 1
      return False
    return True

  def fail(self, where, error):
    if self.on_error == "fatal":
      raise error
    self.failed.append(dict(file=where, error=str(error)))
    self.progress.note(f"segment: skipped {where}: {error}")

  def entries(self, files, video):
    """_Entry of each of this process's unfinished images, in input order."""
    pi, pc = files_lib.process_share()
    # Images to go, for the ETA (None: a video that does not state its length).
    total = (len(files[pi::pc]) if not video else
             len(range(pi, files_lib.video_length(video), pc)))
    self.progress = progress_lib.Progress(total or None, self.stream)
    os.makedirs(self.output, exist_ok=True)
    if video:
      stem = os.path.splitext(os.path.basename(video))[0]
      name = lambda i: f"{stem}/{i:06d}"
      keep = lambda i: i % pc == pi and self.unfinished(name(i))
      for i, image in files_lib.video_frames(video, keep):
        yield from self.entry(name(i), f"{video} frame {i}" if i >= 0 else video, image)
      return
    for name, path in files[pi::pc]:
      if self.unfinished(name):
        try:
          image = decode.read_image(path)
        except decode.BadRecordError as e:
          image = e
        except OSError as e:   # vanished, unreadable
          image = decode.BadRecordError(f"cannot read image file {path}: {e}")
        yield from self.entry(name, path, image)

  def entry(self, name, where, image):
    if isinstance(image, Exception):
      self.fail(where, image)
      return
    try:
      yield _prepare(name, where, image, self.model, self.s, self.fixed_hw,
                     self.batch // len(self.devices))
    except decode.BadRecordError as e:
      self.fail(where, e)
    except MemoryError as e:   # too large for this device at this batch size
      self.fail(where, decode.BadRecordError(f"{where}: {e}"))

  def compiled(self, cache, key, fn, *args):
    """cache[key], `fn` compiled for `args` on first use (its time added to compile_s)."""
    if key not in cache:
      t0 = time.time()
      cache[key] = jax.jit(fn).lower(*args).compile()
      self.compile_s += time.time() - t0
    return cache[key]

  def segment(self, entries):
    """Runs the batches of `entries`; each batch's outputs are written while the next one
    runs on the devices. On the host dispatch a pool's batches run together (its
    capacities planned over the pool, host_scoring.pool_scores)."""
    in_flight = None
    if self.host is None:
      pools = _batches(entries, self.batch)
    else:   # pools of one shape sorted by token count (module doc)
      pools = _batches(entries, self.batch,
                       self.batch * evaluator.pool_batches(self.s, self.batch), self.token_counts)
    for pool in pools:
      args = []
      for group in pool:
        images, sizes = _stack(group, self.batch, group[0].key[0])
        args.append((self.variables, jax.device_put(images, self.rows),
                     jax.device_put(sizes, self.rows)))
      if self.host is None:
        results = (self.compiled(self.models, group[0].key[0],
                                 functools.partial(_scores, call=self.call, s=self.s),
                                 *a)(*a) for group, a in zip(pool, args))
      else:
        results = self.host_scores(args, [self.merges(group) for group in pool])
      for group, a, result in zip(pool, args, results):
        padded, out_hw = key = group[0].key
        self.shapes.add(padded)
        scores = result.pop("scores")
        result["pred"] = self.compiled(self.labels, key, functools.partial(_labels, out_hw=out_hw),
                                       scores, a[2])(scores, a[2])
        if in_flight:
          self.write(*in_flight)
        in_flight = (group, result)
        self.show()
    if in_flight:
      self.write(*in_flight)
    self.show(force=True)
    self.progress.close()

  def host_scores(self, args, merges):
    """_scores' dict of each batch (variables, images, sizes) of a pool, yielded in turn,
    the model's capacities chosen on the host (`merges`: see host_scoring.host_scores)."""
    before = sum(self.host.compile_s.values())
    for scores, info in host_scoring.pool_scores(
        self.host, self.variables, [(a[1], a[2], m) for a, m in zip(args, merges)], self.s):
      self.compile_s += sum(self.host.compile_s.values()) - before
      before = sum(self.host.compile_s.values())
      result = dict(scores=scores)
      if info is not None:
        result.update({k: v for k, v in info.items() if k in TOKEN_KEYS})
      yield result

  def token_counts(self, entries):
    """Tokens of each entry (the merge alone), for sorting a pool; batches as segment's.
    Each entry keeps its merge (entry.merge), which the batch that runs it reuses."""
    for i in range(0, len(entries), self.batch):
      group = entries[i:i + self.batch]
      images, sizes = _stack(group, self.batch, group[0].key[0])
      before = sum(self.host.compile_s.values())
      merges = host_scoring.host_merges(self.host, self.variables,
                                        jax.device_put(images, self.rows),
                                        jax.device_put(sizes, self.rows), self.s)
      for e, merge in zip(group, host_scoring.per_image(merges, len(group))):
        e.merge = merge
      self.compile_s += sum(self.host.compile_s.values()) - before
    return np.array([sum(int(c) for _, c in e.merge) for e in entries])

  def merges(self, group):
    """host_scores' merges of a batch of `group` (rows past it repeat its first, as
    _stack's), or None unless every entry kept its merge."""
    if any(e.merge is None for e in group):
      return None
    rows = list(range(len(group))) + [0] * (self.batch - len(group))
    return host_scoring.merges_of(rows, [e.merge for e in group],
                                  lambda a: jax.device_put(a, self.rows))

  def show(self, force=False):
    self.progress.update(self.done, len(self.failed), self.skipped, self.compile_s, force=force)

  def write(self, group, result):
    _write_batch(group, result, self.output, self.save, self.colours, self.config, self.model,
                 self.s, self.stats)
    self.done += len(group)


def _check_protocol(model, s, save, fixed_hw, num_classes):
  if model.merge == "oracle":
    raise ValueError("the oracle merge reads ground-truth labels; segmenting images needs a "
                     "model that merges without them")
  if num_classes > 256:
    raise ValueError(f"{num_classes} classes do not fit an indexed PNG (256 colours)")
  if "tokens" in save:
    if model.merge == "none" and not model.exit_layers:
      raise ValueError("save=tokens: this model keeps every token (no supertokens, no exits): "
                       "there are no token maps to draw")
    if s["mode"] != "whole":
      raise ValueError("save=tokens needs the whole-image protocol (config.eval.mode="
                       "'whole'); the config slides windows, whose token maps overlap")
  if fixed_hw is not None and s["mode"] == "slide" and tuple(s["crop"]) != tuple(fixed_hw):
    raise ValueError(f"the exported model takes {fixed_hw[0]}x{fixed_hw[1]} images but the "
                     f"config slides {s['crop'][0]}x{s['crop'][1]} windows; export at the "
                     "window size (--image_size)")


def _prepare(name, where, image, model, s, fixed_hw, rows_per_device):
  """The _Entry of a readable image: resized by the protocol, keyed by its padded shapes.
  Raises BadRecordError (MemoryError) for an image the model cannot take."""
  h, w = image.shape[:2]
  hr, wr = evaluator.target_size(h, w, s["resize_short"], s["max_long"])
  model_image = evaluator.resize_image(image, (hr, wr))
  if fixed_hw is not None and s["mode"] == "whole":
    if hr > fixed_hw[0] or wr > fixed_hw[1]:
      raise decode.BadRecordError(
          f"image {where} ({hr}x{wr}) is larger than the exported model's input "
          f"{fixed_hw[0]}x{fixed_hw[1]}; resize it, or export at that size (--image_size)")
    padded = tuple(fixed_hw)
  else:
    padded = evaluator.bucket_shape((hr, wr), s)
    if fixed_hw is None:
      at = s["crop"] if s["mode"] == "slide" else padded
      api.check_memory(model, rows_per_device, *at)
  out = None
  if s["resize_short"] or s["max_long"]:
    out = tuple(evaluator.label_bucket(n, s["label_multiple"]) for n in (h, w))
  return _Entry(name, image, model_image, (padded, out))


def _batches(entries, batch, pool=0, counts=None):
  """Pools (lists of batches: lists of up to `batch` entries of one key), each as soon as it
  is full, the rest last: one batch each, or with `pool` and `counts` (entries → token
  counts) up to `pool` entries of one key, sorted by token count and cut into batches."""
  pool = pool or batch

  def cut(group):
    if counts is not None and len(group) > batch:
      group = [group[i] for i in np.argsort(counts(group), kind="stable")]
    return [group[i:i + batch] for i in range(0, len(group), batch)]
  pending = collections.OrderedDict()
  for e in entries:
    pending.setdefault(e.key, []).append(e)
    if len(pending[e.key]) == pool:
      yield cut(pending.pop(e.key))
  for group in pending.values():
    yield cut(group)


def _stack(group, batch, padded):
  """images uint8 [batch, Hb, Wb, 3] and sizes int32 [batch, 4]; rows past the group repeat
  its first image (a representative capacity, not that of a blank image)."""
  images = np.zeros((batch, *padded, 3), np.uint8)
  sizes = np.zeros((batch, 4), np.int32)
  for k in range(batch):
    e = group[k] if k < len(group) else group[0]
    hr, wr = e.model_image.shape[:2]
    images[k, :hr, :wr] = e.model_image
    sizes[k] = (hr, wr) + e.image.shape[:2]
  return images, sizes


def _write_batch(group, result, output, save, colours, config, model, s, stats):
  """Writes each image's missing outputs and adds its token counts to `stats`."""
  result = {k: np.asarray(v) for k, v in jax.device_get(result).items()}
  patch = model.backbone.patch_size
  for j, e in enumerate(group):
    h, w = e.image.shape[:2]
    pred = result["pred"][j, :h, :w]
    paths = {k: p for k, p in files_lib.output_paths(output, e.name, save).items()
             if not os.path.isfile(p)}   # an earlier run's finished files are kept
    if s["mode"] == "whole":
      row = tokens_lib.image_tokens(config, model, result, j, image_size=e.key[0])
      stats["full"].append((e.key[0][0] // patch) * (e.key[0][1] // patch))
      tokens = row["tokens"]   # entering the encoder, [after each ALGM merge], [each exit]
      merges = len(np.asarray(result["algm_tokens"])[j]) if "algm_tokens" in result else 0
      stats["kept"].append(tokens[0])
      stats["merged"].append(tokens[0] - tokens[merges])
      stats["halted"].append(tokens[merges] - tokens[-1])
      stats["useful"].append(row["useful"]["total"])
      stats["executed"].append(row["executed"]["total"])
    if "tokens" in paths:
      info = {k: result[k][j] for k in PER_IMAGE if k in result}
      info.update(patch_size=patch, exit_layers=tuple(model.exit_layers))
      ims, titles = visualize.panels(e.model_image, pred, info, colours=colours)
      files_lib.write_png(visualize.side_by_side(ims[1:-1], titles[1:-1]), paths["tokens"])
    if "overlay" in paths:
      files_lib.write_png(Image.fromarray(visualize.overlay(e.image, pred, colours)),
                          paths["overlay"])
    if "labels" in paths:
      files_lib.write_png(files_lib.label_image(pred, colours), paths["labels"])
