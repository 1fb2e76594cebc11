"""Test helper: a trainer run in a child process, SIGKILLed right after it checkpointed a given
step (the stand-in for a preemption), for the resume-bit-identically tests."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = textwrap.dedent("""
    import importlib, json, sys, time
    import jax
    jax.config.update("jax_num_cpu_devices", 4)   # as conftest: the same reduction order
    jax.config.update("jax_compilation_cache_dir", sys.argv[4])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import ml_collections
    from step_jax.runtime import checkpoint
    module, workdir, cfg, kill_step = (sys.argv[1], sys.argv[2],
                                       ml_collections.ConfigDict(json.loads(sys.argv[3])),
                                       int(sys.argv[5]))
    save = checkpoint.Checkpointer.save
    def save_then_hang(self, step, *a, **k):
      out = save(self, step, *a, **k)
      if step == kill_step:
        self.wait()
        print("SAVED", flush=True)
        time.sleep(600)
      return out
    checkpoint.Checkpointer.save = save_then_hang
    importlib.import_module(module).train_and_evaluate(cfg, workdir)
""")


def run_killed_after(module, workdir, cfg, step, timeout=300):
  """Runs `module.train_and_evaluate(cfg, workdir)` in a child and SIGKILLs it once its
  step-`step` checkpoint is written; fails if it never gets there or ends first."""
  proc = subprocess.Popen(
      [sys.executable, "-c", _CHILD, module, str(workdir), json.dumps(cfg.to_dict()),
       jax.config.jax_compilation_cache_dir or "", str(step)],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    deadline = time.time() + timeout
    for line in proc.stdout:
      if "SAVED" in line or time.time() > deadline:
        break
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step))), \
        f"child never checkpointed step {step}"
    assert proc.poll() is None, "child finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
