"""Preemption: the real CLI (`python -m step_jax.cli.train`), SIGKILLed at random moments (mid-step,
mid-checkpoint-write), resumes from its last complete checkpoint and ends with parameters
bit-identical to an uninterrupted run.

tests/test_train.py kills once at a clean point (right after a finished save); here the
kills land anywhere, with a checkpoint started every step (async writes in flight). The
random seed is printed on failure; STEP_JAX_KILL_SEED=<n> replays it.
"""
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import segvit
from step_jax.runtime import checkpoint as ckpt_lib
from step_jax.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARG = "variant=Mu/16,dataset=synthetic,smoke"
OVERRIDES = {"data.image_size": (32, 32), "data.num_train": 16, "data.num_eval": 4,
             "model.out_layers": (2,), "model.head_layers": 1, "model.posemb_grid": (2, 2),
             "optim.total_steps": 10, "optim.warmup_steps": 2, "log_every": 1,
             "eval_every": 0, "checkpoint_every": 1, "keep_checkpoints": 2,
             "eval_batch_size": 4}
TOTAL = OVERRIDES["optim.total_steps"]


def _config():
  cfg = segvit.get_config(ARG)
  for key, value in OVERRIDES.items():
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def _launch(workdir, log):
  """The training CLI on the same 4 CPU devices and compilation cache as this process."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cmd = [sys.executable, "-m", "step_jax.cli.train", f"--workdir={workdir}",
         f"--config=configs/segvit.py:{ARG}"] + [f"--config.{k}={v!r}"
                                                 for k, v in OVERRIDES.items()]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log,
                          text=True)
  lines = queue.Queue()   # a reader thread, so that waiting for a line can time out

  def read():
    for line in proc.stdout:
      lines.put(line)
    lines.put(None)
  threading.Thread(target=read, daemon=True).start()
  return proc, lines


def _kill_at_step(proc, lines, step, delay, deadline):
  """Waits for the child's 'step <step>/' line (or its end), then SIGKILLs it after `delay`
  seconds. Returns True if it was still running when killed."""
  while True:
    try:
      line = lines.get(timeout=max(deadline - time.time(), 0.1))
    except queue.Empty:
      raise AssertionError(f"no progress line before the deadline (waiting for step {step})")
    if line is None:
      break
    if line.startswith("step ") and "/" in line.split()[1]:
      if int(line.split()[1].split("/")[0]) >= step:
        break
  time.sleep(delay)
  alive = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return alive


def _steps(workdir):
  """The checkpoint steps orbax lists (only complete ones)."""
  ck = ckpt_lib.Checkpointer(str(workdir))
  try:
    return ck.all_steps()
  finally:
    ck.close()


# Slow: test_train.py's kill-and-resume covers resuming in the default run; these random kills
# (mid-step, mid-write) run with -m slow.
@pytest.mark.parametrize("kills", [pytest.param(3, marks=pytest.mark.slow),
                                   pytest.param(6, marks=pytest.mark.slow)])
def test_random_sigkills_resume_bit_identical(tmp_path, kills):
  seed = int(os.environ.get("STEP_JAX_KILL_SEED", random.randrange(1 << 30)))
  rng = random.Random(seed)
  cfg = _config()
  ref_state, _ = train.train_and_evaluate(cfg, str(tmp_path / "ref"))   # uninterrupted
  ref = jax.device_get(ref_state["params"])

  wd = tmp_path / "run"
  history = []   # (target step, delay, latest checkpoint after the kill, killed while alive)
  with open(tmp_path / "child.log", "w") as log:
    for _ in range(kills):
      done = max(_steps(wd), default=0) if os.path.isdir(wd) else 0
      if done + 1 > TOTAL - 3:   # keep steps for the final resume to do
        break
      target, delay = rng.randint(done + 1, TOTAL - 3), rng.uniform(0.0, 0.5)
      proc, lines = _launch(wd, log)
      try:
        alive = _kill_at_step(proc, lines, target, delay, time.time() + 300)
      finally:
        proc.kill()
        proc.wait()
      steps = _steps(wd)
      latest = max(steps, default=0)
      history.append((target, round(delay, 2), latest, alive))
      # A kill never costs a complete checkpoint; a partial one is never listed.
      assert latest >= done and all(isinstance(s, int) for s in steps), (seed, history)
  note = f"seed {seed}, kills (step, delay s, latest checkpoint, alive): {history}"
  assert any(alive for *_, alive in history), note
  assert json.load(open(wd / "config.json")) == json.loads(
      json.dumps(cfg.to_dict(), default=str)), "CLI and in-process configs differ"

  state, ev = train.train_and_evaluate(cfg, str(wd))   # the last resume runs to the end
  assert ev["resumed_from"] == history[-1][2] < TOTAL, note
  got = jax.device_get(state["params"])
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=f"{jax.tree_util.keystr(path)}; {note}")
