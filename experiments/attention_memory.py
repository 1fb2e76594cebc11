"""XLA's memory analysis of a compiled forward for each self-attention implementation
(issue 17): nothing runs, the programs are only compiled for this machine's backend.

  python experiments/attention_memory.py --variant=B/16 --res=1024 \
      --out=experiments/results/attention_memory_cpu.json

On a CPU both 'einsum' and 'xla' materialise the [B, heads, N, N] attention matrix (XLA:CPU
has no fused attention); on a GPU, 'cudnn' (what 'auto' picks in bf16) does not.
"""
import json
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import step as step_config  # noqa: E402
from step_jax.models import attention  # noqa: E402
from step_jax.models import builder


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
  out = dict(variant=variant, res=res, impl=impl,
             resolved=attention.resolve_impl(impl, jnp.dtype(dtype), width), dtype=dtype,
             batch=batch, device=jax.devices()[0].platform)
  for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
            "generated_code_size_in_bytes"):
    out[k] = getattr(mem, k, None) if mem is not None else None
  n = (res // 16) ** 2
  out["one_attention_matrix_bytes"] = batch * model.backbone.num_heads * n * n * 4
  return out


def main(argv):
  del argv
  f = flags.FLAGS
  rows = [analyse(f.variant, f.res, impl, f.dtype) for impl in f.impls.split(",")]
  for r in rows:
    print(json.dumps(r), flush=True)
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
  app.run(main)
