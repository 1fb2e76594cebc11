"""The fused CPU attention kernel (cpu_attention.cc): built on first use, called through XLA's FFI.

XLA:CPU has no fused attention; in plain JAX our blocked path ('chunked') writes each block
of logits out and reads it back several times, and its small batched matmuls run below the
speed of large ones. The C++ kernel keeps a 96 x 256 block of logits in cache and runs both
matmuls in register-blocked AVX2/FMA micro-kernels (attention.py's 'cpu_fused' path).

It compiles once per source, jax and compiler version with the C++ compiler on the PATH ($CXX,
else c++; ~4 s) into $STEP_JAX_KERNEL_DIR (default ~/.cache/step_jax/kernels). Where it cannot
(no compiler, no AVX2/FMA, not x86-64, not Linux), `available()` is False, says why once in
the log, and 'auto' keeps the plain JAX paths. XLA's partitioner does not split the call
over a sharded batch (it gathers the batch onto every device, even when the target is
registered as batch-partitionable: tried, jax 0.10.2), so 'auto' takes it with one device
only.
"""
import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile

import jax
import jax.numpy as jnp

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_attention.cc")
TARGET = "step_jax_cpu_attention"
FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-shared", "-fPIC", "-pthread", "-w")
HEAD_DIM_MULTIPLE = 16   # the micro-kernels' width


def kernel_dir():
  return os.environ.get("STEP_JAX_KERNEL_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "step_jax",
      "kernels")


def cpu_problem():
  """Why this machine cannot run the kernel, or None."""
  if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
    return f"needs Linux on x86-64, not {platform.system()} on {platform.machine()}"
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")),
                   [])
  except OSError as e:
    return f"cannot read /proc/cpuinfo ({e})"
  missing = [f for f in ("avx2", "fma") if f not in flags]
  return f"the CPU lacks {', '.join(missing)}" if missing else None


def build():
  """Compiles the kernel (or finds it compiled) and returns the shared library's path."""
  compiler = os.environ.get("CXX", "c++")
  with open(SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                   jax.__version__.encode()])).hexdigest()[:16]
  path = os.path.join(kernel_dir(), f"cpu_attention_{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(kernel_dir(), exist_ok=True)
  # Written under a temporary name and renamed: processes building at once never load half
  # a library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=kernel_dir())
  os.close(fd)
  try:
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def _load():
  """(True, '') once the FFI target is registered, else (False, why)."""
  problem = cpu_problem()
  if problem is None:
    try:
      lib = ctypes.cdll.LoadLibrary(build())
      jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.StepJaxCpuAttention),
                                  platform="cpu")
    except (OSError, RuntimeError) as e:
      problem = f"could not build or load it: {e}"
  if problem:
    logging.warning("The fused CPU attention is off (%s); 'auto' uses the plain JAX paths.",
                    problem)
  return problem is None, problem or ""


def available():
  """Whether the kernel runs here (built and registered on the first call)."""
  return _load()[0]


def why_not():
  """Why the kernel does not run here ('' where it does)."""
  return _load()[1]


def attention(q, k, v, key_mask):
  """out [B, Nq, H, D], row max and 1 / row sum [B, H, Nq] of softmax(q kᵀ) v in fp32.

  q [B, Nq, H, D] (already scaled), k/v [B, Nk, H, D], key_mask [B, Nk] bool (True =
  attend); a masked key's logit is -1e9 (the einsum path's rule). No gradient of its own:
  attention.py gives it the blocked backward.
  """
  if not available():
    raise RuntimeError(f"the fused CPU attention cannot run here: {why_not()}")
  b, nq, h, d = q.shape
  if d % HEAD_DIM_MULTIPLE or k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, d):
    raise ValueError(f"cpu attention: q {q.shape}, k {k.shape}, v {v.shape}: need q [B, Nq, "
                     f"H, D], k = v [B, Nk, H, D], D a multiple of {HEAD_DIM_MULTIPLE}")
  f32 = jnp.float32
  stats = jax.ShapeDtypeStruct((b, h, nq), f32)
  call = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct(q.shape, f32), stats, stats),
                          vmap_method="sequential")
  return call(q.astype(f32), k.astype(f32), v.astype(f32), key_mask.astype(bool))
