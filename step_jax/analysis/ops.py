"""Where a compiled program spends its time, op by op: a jax.profiler trace of a few calls,
its events matched to the instructions of the compiled module and summed per kind of op.

The per-layer profile (step_jax.analysis.profile) says which layer is slow; this says which
XLA op is: a dense layer's dot fusion, the attention custom call, a LayerNorm's elementwise
fusion, a copy. Kinds are instruction names without their numeric suffix (XLA names a fusion
after what it fuses; `ynn_fusion` is YNNPACK's on CPU), custom calls go by target, and a
fusion that contains a dot or convolution (the FLOPs' home) is told apart from one that does
not (YNNPACK fuses elementwise ops too): `ynn_fusion (dot)` vs `ynn_fusion`.

XLA:CPU only: there each op runs as a thunk traced under the op's name; on a GPU the trace
names kernels (use xprof or Nsight there).

Control-flow ops (while, conditional, call) are left out of the sum: the ops they run are
traced as their own events. Async thunks may overlap, so the sum can exceed wall time.
"""
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+) = .*? ([a-z][\w-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(\S+) .*\{\s*$")
_CONTROL = ("while", "conditional", "call")


def instructions(hlo_text):
  """{instruction name: (kind, has_dot)} of an HLO module's text (compiled.as_text())."""
  bodies, current = {}, None   # computation name -> its instruction lines
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = bodies.setdefault(m.group(1), [])
    elif line.startswith("}"):
      current = None
    elif current is not None:
      current.append(line)
  found = {}
  for body in bodies.values():
    for line in body:
      m = _INSTR.match(line)
      if not m:
        continue
      name, opcode = m.groups()
      if opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line)
        kind = f"custom-call {target.group(1) if target else '?'}"
      elif opcode == "fusion":
        kind = re.sub(r"\.\d+$", "", name)
      else:
        kind = opcode
      called = re.search(r"calls=%(\S+?)[,\s]", line + " ")
      inner = "\n".join(bodies.get(called.group(1), [])) if called else ""
      has_dot = opcode in ("dot", "convolution") or bool(re.search(r" (dot|convolution)\(",
                                                                     inner))
      found[name] = (f"{kind} (dot)" if has_dot and opcode == "fusion" else kind, has_dot)
  return found


def _trace_events(trace_dir):
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def op_times(compiled, args, *, reps=3, warmup=1):
  """Rows {kind, dot, count, ms, share} (per call, largest first) of `compiled(*args)`, and
  the median wall ms of the traced calls."""
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  names = instructions(compiled.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    wall = []
    jax.profiler.start_trace(trace_dir)
    try:
      for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        wall.append(1000 * (time.perf_counter() - t))
    finally:
      jax.profiler.stop_trace()
    events = _trace_events(trace_dir)
  us, count, dot = collections.Counter(), collections.Counter(), {}
  for e in events:
    if e["name"] not in names:
      continue
    kind, has_dot = names[e["name"]]
    if kind in _CONTROL:
      continue
    us[kind] += e["dur"]
    count[kind] += 1
    dot[kind] = has_dot
  if not us:
    raise RuntimeError("the trace has no events named after the program's ops (the profiler "
                       "of this jax version does not trace them on this backend)")
  total = sum(us.values())
  rows = [dict(kind=k, dot=dot[k], count=count[k] / reps, ms=v / 1000 / reps, share=v / total)
          for k, v in us.most_common()]
  return rows, sorted(wall)[len(wall) // 2]


def markdown(rows, wall_ms, title):
  """A Markdown table of op_times' rows."""
  lines = [f"{title}: {wall_ms:.1f} ms per call (median wall); per op kind, summed over a "
           f"call ({sum(r['ms'] for r in rows):.1f} ms).", "",
           "| op kind | dot/conv | ops per call | ms | % |", "|---|---|---|---|---|"]
  lines += [f"| {r['kind']} | {'yes' if r['dot'] else ''} | {r['count']:g} | {r['ms']:.2f} | "
            f"{100 * r['share']:.1f} |" for r in rows]
  return "\n".join(lines)
