"""One self-attention, our paths against PyTorch's `scaled_dot_product_attention`, in one process.

Per cell (heads x tokens, heads of 64, batch 1, fp32, forward): the fused C++ kernel
('cpu_fused'), the blocked plain-JAX path ('chunked') and torch's SDPA run interleaved, one
call each per round in a rotating order, after a warm-up round; ms median (min-max) of
--reps rounds, and each path's max |difference| to torch's output relative to its largest
value.

  python experiments/attention_kernel.py --cells=3x1024,12x1024,3x4096,12x4096 \\
      --out=experiments/results/peer_bench_cpu/attention_kernel.jsonl
"""
import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_bench  # noqa: E402
from step_jax.models import attention  # noqa: E402
from step_jax.models import cpu_attention  # noqa: E402
from step_jax.runtime import writers  # noqa: E402

FLAGS = flags.FLAGS
IMPLS = {"cpu_fused": attention.cpu_fused_attention, "chunked": attention.chunked_attention}


def cell_row(heads, tokens, reps):
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((1, tokens, heads, 64), np.float32) for _ in range(3))
  q *= 64 ** -0.5
  tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))

  def torch_call():
    with torch.inference_mode():
      return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=1.0)
  calls = {"torch_sdpa": torch_call}
  jq, jk, jv = jax.device_put((q, k, v))   # once: a call should not pay the host copy
  for name, fn in IMPLS.items():
    jitted = jax.jit(fn)
    calls[name] = lambda jitted=jitted: jax.block_until_ready(jitted(jq, jk, jv))
  ms, outs = peer_bench.interleave(calls, reps)
  ref = outs["torch_sdpa"].transpose(1, 2).numpy()
  row = dict(kind="attention", heads=heads, tokens=tokens, head_dim=64, batch=1,
             dtype="float32", reps=reps)
  for name, t in ms.items():
    row[name] = peer_bench.spread(t)
    if name != "torch_sdpa":
      row[name]["max_rel_diff"] = float(np.abs(np.asarray(outs[name]) - ref).max()
                                        / np.abs(ref).max())
  return row


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  threads = os.cpu_count()
  torch.set_num_threads(threads)
  if not cpu_attention.available():
    raise SystemExit(f"the fused CPU attention does not run here: {cpu_attention.why_not()}")
  for cell in FLAGS.cells.split(","):
    heads, _, tokens = cell.partition("x")
    row = cell_row(int(heads), int(tokens), FLAGS.reps)
    row.update(cpu=peer_bench.cpu_name(), cores=threads,
               jax=jax.__version__, torch=torch.__version__,
               when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    writers.print_row(row, FLAGS.out)


if __name__ == "__main__":
  flags.DEFINE_string("cells", "3x1024,12x1024,3x4096,12x4096", "HEADSxTOKENS cells.")
  flags.DEFINE_integer("reps", 5, "Timed rounds per cell (after one warm-up round).")
  flags.DEFINE_string("out", "", "JSON-lines file the rows are appended to.")
  app.run(main)
