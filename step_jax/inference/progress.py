"""Bulk inference's progress line and summary.json (merged over processes)."""
import json
import os
import sys
import time

from jax.experimental import multihost_utils

from step_jax.inference import files
from step_jax.runtime import checkpoint as ckpt_lib

SUMMARY = "summary.json"


class Progress:
  """One updating stderr line: images done of those to do (`total` less those an earlier run
  finished), images/s, ETA (a new line every 10 s when stderr is not a terminal); `note`
  prints a message above it. total: None when unknown (a video that does not say)."""

  def __init__(self, total, stream=None):
    self.total, self.stream = total, stream or sys.stderr
    self.tty = self.stream.isatty()
    self.start, self.last, self.line = time.time(), 0.0, ""

  def update(self, done, failed, skipped=0, compile_s=0.0, force=False):
    now = time.time()
    if not force and now - self.last < (0.5 if self.tty else 10.0):
      return
    self.last = now
    rate = done / max(now - self.start - compile_s, 1e-9)
    todo = self.total - skipped if self.total else None
    eta = f"ETA {_clock(max(todo - done - failed, 0) / rate)}" if todo and rate > 0 else "ETA ?"
    bad = f", {failed} failed" if failed else ""
    self.line = (f"segment: {done}{f'/{todo}' if todo else ''} images{bad}, "
                 f"{rate:.2f} images/s, {eta}")
    self._show()

  def _show(self):
    end = "" if self.tty else "\n"
    self.stream.write(("\r\033[K" if self.tty else "") + self.line + end)
    self.stream.flush()

  def note(self, message):
    self.stream.write(("\r\033[K" if self.tty else "") + message + "\n")
    if self.tty and self.line:
      self._show()
    self.stream.flush()

  def close(self):
    if self.tty and self.line:
      self.stream.write("\n")
      self.stream.flush()


def _clock(seconds):
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


def merge_summaries(parts):
  """One summary from the processes' own: counts and failures added up, means weighted by
  images, times the slowest process's, images/s the sum."""
  out = dict(parts[0])
  n = [p["images"] for p in parts]
  out.update(images=sum(n), already_done=sum(p["already_done"] for p in parts),
             failed=[f for p in parts for f in p["failed"]],
             seconds=max(p["seconds"] for p in parts),
             compile_s=max(p["compile_s"] for p in parts),
             images_per_s=sum(p["images_per_s"] for p in parts),
             compiled_shapes=max(p["compiled_shapes"] for p in parts))
  out["failed_count"] = len(out["failed"])
  for key in ("mean_tokens_full", "mean_tokens_kept", "mean_tokens_merged",
              "mean_tokens_halted", "gflops_useful", "gflops_executed"):
    rows = [(p[key], k) for p, k in zip(parts, n) if p[key] is not None and k]
    out[key] = (sum(v * k for v, k in rows) / sum(k for _, k in rows)) if rows else None
  return out


def write_summary(summary, output):
  """summary.json (atomically); with several processes each writes its part and process 0
  merges them once all have."""
  index, count = files.process_share()
  if count == 1:
    ckpt_lib.write_json(os.path.join(output, SUMMARY), summary)
    return summary
  part = os.path.join(output, f"summary.process{index}.json")
  ckpt_lib.write_json(part, summary)
  multihost_utils.sync_global_devices("step_jax.inference summary")
  parts = []
  for i in range(count):
    with open(os.path.join(output, f"summary.process{i}.json")) as f:
      parts.append(json.load(f))
  merged = merge_summaries(parts)
  if index == 0:
    ckpt_lib.write_json(os.path.join(output, SUMMARY), merged)
  return merged
