"""XLA's memory analysis of a compiled forward for each self-attention implementation
(issue 17): nothing runs, the programs are only compiled for this machine's backend.

  python experiments/attention_memory.py --variant=B/16 --res=1024 \
      --out=experiments/results/attention_memory_cpu.json

On a CPU both 'einsum' and 'xla' materialise the [B, heads, N, N] attention matrix (XLA:CPU
has no fused attention); on a GPU, 'cudnn' (what 'auto' picks in bf16) does not; 'chunked'
does not on any device.

With --time_res, times the ViT encoder instead (jitted, batch 1, random weights, the
implementations interleaved, median of --reps after a warmup): where 'auto' switches paths.

  python experiments/attention_memory.py --variant=Ti/16 --impls=einsum,chunked \
      --time_res=512,768,1024
"""
import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import step as step_config  # noqa: E402
from step_jax.models import attention  # noqa: E402
from step_jax.models import builder
from step_jax.models import vit  # noqa: E402


def analyse(variant, res, impl, dtype="float32", batch=1):
  """Bytes XLA plans for one forward of SegViT at res² (temp = activations/workspace)."""
  cfg = step_config.get_config(f"method=segvit,variant={variant},dataset=cityscapes,res={res}")
  cfg.model.update(attention_impl=impl, dtype=dtype)
  model = builder.build(cfg.model, cfg.num_classes, (res, res), cfg.ignore_index)
  x = jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  compiled = jax.jit(lambda v, im: model.apply(v, im)[0]).lower(variables, x).compile()
  mem = compiled.memory_analysis()
  width = model.backbone.width // model.backbone.num_heads
  n = (res // 16) ** 2
  out = dict(variant=variant, res=res, impl=impl,
             resolved=attention.resolve_impl(impl, jnp.dtype(dtype), width, n), dtype=dtype,
             batch=batch, device=jax.devices()[0].platform)
  for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
            "generated_code_size_in_bytes"):
    out[k] = getattr(mem, k, None) if mem is not None else None
  out["one_attention_matrix_bytes"] = batch * model.backbone.num_heads * n * n * 4
  return out


def time_encoder(variant, res, impls, dtype="float32", reps=3):
  """Milliseconds of one jitted ViT encoder forward at res², batch 1, per implementation."""
  x = jax.random.uniform(jax.random.key(1), (1, res, res, 3))
  calls = {}
  for impl in impls:
    model = vit.ViT(**vit.decode_variant(variant), posemb_grid=(res // 16, res // 16),
                    attention_impl=impl, dtype=dtype)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    calls[impl] = (jax.jit(lambda v, im, model=model: model.apply(v, im)[0]), variables)
  ms = {impl: [] for impl in impls}
  for rep in range(reps + 1):   # interleaved; the first round compiles and warms up
    for impl, (call, variables) in calls.items():
      t = time.perf_counter()
      jax.block_until_ready(call(variables, x))
      if rep:
        ms[impl].append(1000 * (time.perf_counter() - t))
  return [dict(variant=variant, res=res, tokens=(res // 16) ** 2, impl=impl, dtype=dtype,
               batch=1, device=jax.devices()[0].platform, ms_median=statistics.median(t),
               ms=[round(v, 1) for v in t]) for impl, t in ms.items()]


def main(argv):
  del argv
  f = flags.FLAGS
  impls = f.impls.split(",")
  rows = []
  for res in f.time_res.split(",") if f.time_res else [f.res]:
    got = (time_encoder(f.variant, int(res), impls, f.dtype, f.reps) if f.time_res
           else [analyse(f.variant, f.res, impl, f.dtype) for impl in impls])
    for r in got:
      print(json.dumps(r), flush=True)
    rows += got
  if f.out:
    os.makedirs(os.path.dirname(f.out) or ".", exist_ok=True)
    with open(f.out, "w") as fh:
      json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  flags.DEFINE_string("variant", "B/16", "ViT variant.")
  flags.DEFINE_integer("res", 1024, "Square input size.")
  flags.DEFINE_string("impls", "einsum,xla", "Comma-separated attention implementations.")
  flags.DEFINE_string("dtype", "float32", "Compute dtype.")
  flags.DEFINE_string("out", "", "JSON file for the rows.")
  flags.DEFINE_string("time_res", "", "Comma-separated square sizes: time the encoder there.")
  flags.DEFINE_integer("reps", 3, "Timed calls per implementation and size (--time_res).")
  app.run(main)
