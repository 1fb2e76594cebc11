"""Input pipelines: grain for training, plain numpy passes for evaluation.

Training (`make_train_iter`) is

  MapDataset.source(src).seed(seed).shuffle().repeat(None)     one global stream, reshuffled
    .random_map(RandomResize, RandomCrop, RandomFlip,           each epoch; augmentation is a
                PhotoMetricDistortion).map(Pad)                 function of (seed, position)
    .slice(process_index::process_count)                        this host's share
    .batch(batch_size // process_count, drop_remainder=True)
    .to_iter_dataset(ReadOptions).mp_prefetch(...)              threads, optional processes

so the same config gives the same batches on any number of workers, host k's batches are
disjoint from host j's, and together the hosts' step-s batches are the global stream's
positions [s·B, (s+1)·B). The iterator's `get_state()`/`set_state()` (or
`grain.checkpoint.CheckpointSave/CheckpointRestore` under orbax) resume on the exact batch.

Keys read under `config.data` (defaults in parentheses):
  name, data_dir, train_split, image_size (the crop: every batch is [b, *image_size]);
  the shuffle and augmentation seed is `config.seed`, not data.seed
  aug.scale (long, short) edges of mmseg's RandomResize; (0, 0) or absent: no resize
  aug.min_ratio, aug.max_ratio  ratio range (0.5, 2.0 in mmseg; 1, 1 = fixed scale)
  aug.cat_max_ratio  RandomCrop retry threshold (0.75 in mmseg; 1.0 = plain random crop)
  aug.flip  random horizontal flips (True)
  aug.photometric  mmseg PhotoMetricDistortion (False when `aug` is absent)
  num_workers  grain worker processes (0: threads only, in this process)
  num_threads  reader threads per process, each building whole batches (4)
  prefetch  batches buffered per process (4; at least num_threads)
  bad_records  'fail' (default): a bad record (undecodable or truncated file, 16-bit or
    transparent image, labels outside the classes, image/label size mismatch) raises,
    naming it; 'skip': it is replaced by the next good record of the split, logged, and
    counted in the iterator's `bad_records` (checkpointed with its state)
A config without `data.aug` gets random crops + flips only (the synthetic default).
"""
import json

from absl import logging
import grain
import numpy as np

from step_jax.data import get_source
from step_jax.data import transforms
from step_jax.data.decode import BadRecordError

BAD_RECORD_POLICIES = ("fail", "skip")


################################################################################
# Validation and the bad-record policy.                                        #
################################################################################
def check_example(ex, num_classes, ignore_index, where="example"):
  """Raises BadRecordError unless `ex` is {'image': uint8 [H,W,3], 'label': int [H,W]} with
  labels in 0..num_classes-1 or ignore_index: what every transform downstream assumes."""
  image, label = np.asarray(ex["image"]), np.asarray(ex["label"])
  if image.dtype != np.uint8:
    nonfinite = ""
    if np.issubdtype(image.dtype, np.floating):
      n = int(image.size - np.count_nonzero(np.isfinite(image)))
      nonfinite = f" with {n} NaN/Inf values" if n else ""
    raise BadRecordError(f"{where}: image has dtype {image.dtype}{nonfinite}; expected "
                         "uint8 pixels in [0, 255]")
  if image.ndim != 3 or image.shape[-1] != 3:
    raise BadRecordError(f"{where}: image has shape {image.shape}; expected [H, W, 3] RGB")
  if label.shape != image.shape[:2]:
    raise BadRecordError(f"{where}: label shape {label.shape} does not match the image's "
                         f"{image.shape[:2]}")
  if not np.issubdtype(label.dtype, np.integer):
    raise BadRecordError(f"{where}: label dtype {label.dtype}; expected integer class ids")
  bad = (label != ignore_index) & ((label < 0) | (label >= num_classes))
  if bad.any():
    raise BadRecordError(f"{where}: label values {np.unique(label[bad])[:8].tolist()} are "
                         f"outside the classes 0..{num_classes - 1} and the ignore value "
                         f"{ignore_index}")


class CheckedSource:
  """`source` with every example validated, under a bad-record policy.

  'fail' re-raises the first bad record's error (it names the file or index); 'skip'
  replaces a bad record by the next good one of the split (so batches stay full and the
  data order stays a pure function of the step) and logs it. Each example carries
  `bad_records`, the number of bad records passed over to produce it: the count travels
  inside the batch through threads, worker processes and checkpoints.
  """

  def __init__(self, source, num_classes, ignore_index, policy="fail"):
    if policy not in BAD_RECORD_POLICIES:
      raise ValueError(f"config.data.bad_records={policy!r}: use one of "
                       f"{BAD_RECORD_POLICIES}")
    self.source, self.policy = source, policy
    self.num_classes, self.ignore_index = num_classes, ignore_index

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    n = len(self.source)
    for k in range(n):
      i = (index + k) % n
      try:
        ex = self.source[i]
        check_example(ex, self.num_classes, self.ignore_index, f"training example {i}")
      except (BadRecordError, OSError) as e:   # OSError: e.g. a file deleted since listing
        if self.policy == "fail":
          e.add_note("config.data.bad_records='fail'; 'skip' skips and counts bad records")
          raise
        logging.warning("skipping bad training record %d (data.bad_records='skip'): %s", i, e)
        continue
      return dict(image=ex["image"], label=ex["label"], bad_records=np.int32(k))
    raise BadRecordError(f"all {n} records of the training split are bad (see the log)")


class TrainIter:
  """The grain iterator plus `bad_records`, the number of bad records skipped so far.

  Batches come out as dict(image, label); the count is part of the iterator's state, so it
  survives a checkpoint and resume (states of plain grain iterators are read as count 0).
  """

  def __init__(self, it):
    self._it, self.bad_records = it, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self.bad_records += int(np.sum(batch.pop("bad_records")))
    return batch

  def get_state(self) -> bytes:
    return json.dumps(dict(grain=self._it.get_state(), bad_records=self.bad_records)).encode()

  def set_state(self, state):
    state = json.loads(state) if isinstance(state, (bytes, str)) else state
    if "grain" not in state:  # a plain grain iterator's state (older checkpoints)
      state = dict(grain=state, bad_records=0)
    self._it.set_state(state["grain"])
    self.bad_records = int(state["bad_records"])

  def start_prefetch(self):  # grain.checkpoint.CheckpointRestore calls it
    if hasattr(self._it, "start_prefetch"):
      self._it.start_prefetch()


################################################################################
# Training.                                                                    #
################################################################################
def _get(cfg, key, default):
  return cfg.get(key, default) if cfg is not None else default


def augmentations(data_cfg, ignore_index):
  """The per-example transforms, in mmseg's order, for `data_cfg.aug`."""
  aug = data_cfg.get("aug")
  crop = tuple(data_cfg.image_size)
  ops = []
  scale = tuple(_get(aug, "scale", (0, 0)))
  if any(scale):
    ops.append(transforms.RandomResize(
        scale, (_get(aug, "min_ratio", 0.5), _get(aug, "max_ratio", 2.0))))
  ops.append(transforms.RandomCrop(crop, _get(aug, "cat_max_ratio", 1.0), ignore_index))
  if _get(aug, "flip", True):
    ops.append(transforms.RandomFlip(0.5))
  if _get(aug, "photometric", False):
    ops.append(transforms.PhotoMetricDistortion())
  ops.append(transforms.Pad(crop, ignore_index))
  return ops


class _ToBatch(grain.transforms.Map):
  """Labels to int32 (the loss' dtype); images stay uint8; bad-record counts kept."""

  def map(self, batch):
    out = dict(image=batch["image"], label=batch["label"].astype(np.int32))
    if "bad_records" in batch:
      out["bad_records"] = batch["bad_records"]
    return out


def make_train_dataset(config, source, *, process_index=0, process_count=1):
  """The endless, batched grain MapDataset of this host (element s = batch of step s)."""
  if config.batch_size % process_count:
    raise ValueError(f"batch_size={config.batch_size} is not divisible by "
                     f"process_count={process_count}")
  if len(source) == 0:
    raise ValueError("the training split is empty")
  source = CheckedSource(source, config.num_classes, config.ignore_index,
                         config.data.get("bad_records", "fail"))
  ds = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat(None)
  for op in augmentations(config.data, config.ignore_index):
    # Augment before slicing: an example's randomness depends on its global position only.
    ds = ds.random_map(op) if isinstance(op, grain.transforms.RandomMap) else ds.map(op)
  ds = ds.slice(slice(process_index, None, process_count))
  ds = ds.batch(config.batch_size // process_count, drop_remainder=True)
  return ds.map(_ToBatch())


def make_train_iter(config, *, process_index=0, process_count=1, start_step=0, source=None):
  """A TrainIter (grain iterator + bad-record count) of dict(image uint8 [b,H,W,3], label
  int32 [b,H,W]).

  Args:
    config: the experiment config (reads config.data, seed, batch_size, ignore_index).
    process_index, process_count: this host and the number of hosts; b = batch_size //
      process_count.
    start_step: the first batch is that of this step. For a resume without saved iterator
      state. Saved state is relative to the start_step the iterator was made with: restore
      it into an iterator made with the same start_step (0 when you checkpoint it).
    source: overrides get_source(config.data, config.data.train_split, ...).
  """
  if source is None:
    source = get_source(config.data, config.data.train_split, config.num_classes,
                        config.ignore_index)
  ds = make_train_dataset(config, source, process_index=process_index,
                          process_count=process_count)
  if start_step:
    ds = ds.slice(slice(start_step, None))
  data = config.data
  threads = data.get("num_threads", 4)
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(data.get("prefetch", 4), threads)))
  if data.get("num_workers", 0) > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
  return TrainIter(iter(it))


################################################################################
# Evaluation.                                                                  #
################################################################################
def _stack(examples):
  return dict(image=np.stack([e["image"] for e in examples]),
              label=np.stack([e["label"] for e in examples]).astype(np.int32))


def eval_batches(source, batch_size):
  """One pass over a same-size split; the last batch is padded by repeating example 0,
  valid=False. Yields dict(image uint8 [B,H,W,3], label int32 [B,H,W], valid bool [B])."""
  n = len(source)
  for start in range(0, n, batch_size):
    idx = list(range(start, min(start + batch_size, n)))
    pad = batch_size - len(idx)
    examples = [source[i] for i in idx]
    shapes = {e["label"].shape for e in examples}
    if len(shapes) > 1:
      raise ValueError(f"eval_batches needs same-size examples, got sizes {sorted(shapes)}; "
                       "use eval_examples for variable-size splits")
    batch = _stack(examples + [examples[0]] * pad if pad else examples)
    batch["valid"] = np.array([True] * len(idx) + [False] * pad)
    yield batch


def eval_examples(source):
  """One pass over a split one example at a time, native size (variable-size splits such
  as ADE20K). Yields dict(image uint8 [H,W,3], label int32 [H,W], index int)."""
  for i in range(len(source)):
    ex = source[i]
    yield dict(image=ex["image"], label=ex["label"].astype(np.int32), index=i)
