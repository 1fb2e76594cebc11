"""Metric writers: clu log lines + a JSON-lines file + TensorBoard when it is installed.

`clu.metric_writers` (and `clu.periodic_actions`, which imports it) import TensorFlow's
summary writer at module level, but TensorFlow is an optional dependency here. Importing
this module first stubs `clu.metric_writers.summary_writer` when TensorFlow or TensorBoard is
missing (environment-notes §1), so the rest of clu works; TensorBoard files are written only
when both are importable.

`metrics.jsonl` in the workdir gets one JSON object per `write_scalars` call:
`{"step": 12, "loss": 0.83, ...}`; tests and scripts read it without TensorBoard.
"""
import importlib.util
import json
import os
import sys
import threading
import types

import numpy as np

HAVE_TENSORBOARD = (importlib.util.find_spec("tensorflow") is not None
                    and importlib.util.find_spec("tensorboard") is not None)

if not HAVE_TENSORBOARD and "clu.metric_writers.summary_writer" not in sys.modules:
  _stub = types.ModuleType("clu.metric_writers.summary_writer")
  _stub.SummaryWriter = None  # create_default_writer(logdir=None) never touches it
  sys.modules["clu.metric_writers.summary_writer"] = _stub

from clu import metric_writers  # noqa: E402  pylint: disable=g-import-not-at-top
from clu import periodic_actions  # noqa: E402,F401  pylint: disable=g-import-not-at-top,unused-import


def _plain(v):
  """Scalars (numpy, jax, python) → JSON-serialisable python numbers."""
  v = np.asarray(v)
  if v.dtype.kind in "iub":
    return int(v) if v.dtype.kind != "b" else bool(v)
  f = float(v)
  return f if np.isfinite(f) else str(f)  # JSON has no NaN/Inf literals


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one line `{"step": s, **scalars}` per `write_scalars` call."""

  def __init__(self, path):
    self._path = path
    self._lock = threading.Lock()
    self._f = open(path, "a")

  def write_summaries(self, step, values, metadata=None):
    self.write_scalars(step, {k: v for k, v in values.items() if np.ndim(v) == 0})

  def write_scalars(self, step, scalars):
    line = json.dumps({"step": int(step), **{k: _plain(v) for k, v in scalars.items()}})
    with self._lock:
      self._f.write(line + "\n")
      self._f.flush()

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    with self._lock:
      self._f.flush()

  def close(self):
    with self._lock:
      if not self._f.closed:
        self._f.close()


def create_writer(workdir, *, process_index=0, tensorboard=True):
  """clu MultiWriter: logging everywhere; JSONL (+ TensorBoard) on process 0 only."""
  writers = [metric_writers.LoggingWriter()]
  if process_index == 0:
    writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
    if tensorboard and HAVE_TENSORBOARD:
      writers.append(metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")))
  return metric_writers.MultiWriter(writers)


def print_row(row, path=""):
  """Prints `row` as one JSON line and, with `path`, appends it there (its folder created):
  the result files of the experiments/ scripts, a row as each lands."""
  line = json.dumps(row)
  print(line, flush=True)
  if path:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
      f.write(line + "\n")


def read_jsonl(path):
  """All records of a metrics.jsonl file (for tests and analysis scripts)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
