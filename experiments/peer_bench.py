"""Our ViT encoder and whole SegViT against timm's PyTorch ViT encoder, in one process.

The baseline a user compares with is the PyTorch ViT they run today (timm, whose attention is
`F.scaled_dot_product_attention`). Per cell (variant, square size): timm's
`VisionTransformer` built at the size without class token (`forward_features`, inference
mode), our `vit.ViT` encoder (jitted, attention_impl 'auto') and our whole SegViT (encoder +
ATM head, `builder.build`), batch 1, fp32 (--dtype=bf16: all three in bf16), random weights,
on the GPU where torch and jax have one; the three run interleaved, one
call each per round in a rotating order (from 2026-12-04; before, timm always ran first)
after a warm-up round (jit compile, torch's first call), so a busy CPU slows all of them
alike. Each row has the median, min and max of --reps rounds and the
median of the per-round ratios timm / ours (> 1: we are faster).

Cells that do not fit (L/16 at 2048², or the N x N 'einsum' path at 2048²) are compiled only:
`--memory` rows give XLA's planned temporary bytes of our encoder per attention path.

  python experiments/peer_bench.py --cells=Ti/16@512,B/16@512,Ti/16@1024,B/16@1024 \
      --out=experiments/results/peer_bench_cpu/rows.jsonl
  python experiments/peer_bench.py --memory --cells=B/16@2048,L/16@2048 \
      --impls=einsum,chunked --out=experiments/results/peer_bench_cpu/memory.jsonl

`--split` rows profile both encoders (fp32) instead: ms and GFLOP/s of the dense layers and of
the attention, the rest as one figure (split_cell).

  python experiments/peer_bench.py --split --cells=Ti/16@512,B/16@512 \
      --out=experiments/results/peer_bench_cpu/split.jsonl

Resumable: a cell already in --out (same kind, variant, size, threads) is skipped, so a run
stopped half-way continues with the next cell.
"""
import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import step as step_config  # noqa: E402
from step_jax.analysis import ops  # noqa: E402
from step_jax.models import attention  # noqa: E402
from step_jax.models import cpu_attention  # noqa: E402
from step_jax.models import flops  # noqa: E402
from step_jax.models import builder  # noqa: E402
from step_jax.models import vit  # noqa: E402
from step_jax.runtime import writers  # noqa: E402

FLAGS = flags.FLAGS
DEFAULT_CELLS = ("Ti/16@512,B/16@512,Ti/16@1024,B/16@1024,Ti/16@2048,B/16@2048")


def parse_cells(text):
  """'Ti/16@512,B/16@1024' -> [('Ti/16', 512), ('B/16', 1024)], checked."""
  cells = []
  for cell in filter(None, text.split(",")):
    variant, _, res = cell.partition("@")
    if variant not in step_config.DTOP_HEADS or not res.isdigit() or int(res) % 16:
      raise ValueError(f"cell {cell!r}: give VARIANT@SIZE with a variant of "
                       f"{tuple(step_config.DTOP_HEADS)} and a size that is a multiple of 16")
    cells.append((variant, int(res)))
  return cells


def cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def timm_encoder(variant, res, dtype="fp32"):
  """timm's ViT at res² without class token (on the GPU when torch has one, in `dtype`): a
  callable that runs it on a fixed input and waits for the result."""
  import torch  # pylint: disable=g-import-not-at-top
  import step_jax.testing.tv_shim  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  v = vit.decode_variant(variant)
  model = vision_transformer.VisionTransformer(
      img_size=res, patch_size=16, embed_dim=v["width"], depth=v["depth"],
      num_heads=v["num_heads"], mlp_ratio=v["mlp_dim"] / v["width"], class_token=False,
      global_pool="avg", num_classes=0).eval()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
  model = model.to(device=device, dtype=tdtype)
  x = torch.rand(1, 3, res, res, device=device, dtype=tdtype)

  def call():
    with torch.inference_mode():
      out = model.forward_features(x)
    if device == "cuda":
      torch.cuda.synchronize()
    return out
  return call


DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def our_attention(res, impl="auto", dtype="fp32"):
  """The attention path `impl` resolves to in our encoder at res² (heads of 64, inference)."""
  return attention.resolve_impl(impl, DTYPES[dtype], 64, (res // 16) ** 2)


def our_encoder_program(variant, res, impl="auto", dtype="fp32"):
  """Our encoder at res², compiled, and its arguments (random weights, a fixed input)."""
  x = jax.random.uniform(jax.random.key(1), (1, res, res, 3))
  model = vit.ViT(**vit.decode_variant(variant), posemb_grid=(res // 16, res // 16),
                  attention_impl=our_attention(res, impl, dtype), dtype=DTYPES[dtype])
  variables = jax.jit(model.init)(jax.random.key(0), x)
  fn = jax.jit(lambda v, im: model.apply(v, im)[0])
  return fn.lower(variables, x).compile(), (variables, x)


def our_encoder(variant, res, impl="auto", dtype="fp32"):
  compiled, args = our_encoder_program(variant, res, impl, dtype)
  return lambda: jax.block_until_ready(compiled(*args))


def our_segvit(variant, res, dtype="fp32"):
  cfg = step_config.get_config(f"method=segvit,variant={variant},dataset=cityscapes,res={res}")
  cfg.model.dtype = jnp.dtype(DTYPES[dtype]).name
  model = builder.build(cfg.model, cfg.num_classes, (res, res), cfg.ignore_index)
  x = jax.random.uniform(jax.random.key(1), (1, res, res, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  fn = jax.jit(lambda v, im: model.apply(v, im)[0]["pred_masks"])
  return lambda: jax.block_until_ready(fn(variables, x))


def interleave(calls, reps):
  """{name: callable} called once each per round, `reps` timed rounds after a warm-up round:
  ({name: [ms per round]}, {name: the last round's result})."""
  ms, outs = {k: [] for k in calls}, {}
  names = list(calls)
  for rnd in range(reps + 1):
    # The order rotates: whatever runs right after torch competes with the OpenMP threads
    # it leaves spinning (one attention: 10.5 ms after torch, 6-9 ms in a row), so each
    # path follows each other one in turn.
    for name in names[rnd % len(names):] + names[:rnd % len(names)]:
      t = time.perf_counter()
      outs[name] = calls[name]()
      if rnd:
        ms[name].append(1000 * (time.perf_counter() - t))
  return ms, outs


def spread(t):
  """Median, min and max of a list of ms, rounded."""
  return dict(ms_median=round(statistics.median(t), 1), ms_min=round(min(t), 1),
              ms_max=round(max(t), 1))


def time_cell(variant, res, reps, dtype="fp32"):
  """One row: the three callables interleaved, `reps` timed rounds after a warm-up round."""
  calls = {"timm": timm_encoder(variant, res, dtype),
           "ours_encoder": our_encoder(variant, res, dtype=dtype),
           "ours_segvit": our_segvit(variant, res, dtype)}
  ms, _ = interleave(calls, reps)
  row = dict(kind="time", variant=variant, res=res, tokens=(res // 16) ** 2, batch=1,
             dtype=jnp.dtype(DTYPES[dtype]).name, reps=reps,
             ours_attention=our_attention(res, dtype=dtype))
  for name, t in ms.items():
    row[name] = spread(t)
  ratios = [a / b for a, b in zip(ms["timm"], ms["ours_encoder"])]
  row["timm_over_ours_encoder"] = dict(median=round(statistics.median(ratios), 3),
                                       min=round(min(ratios), 3), max=round(max(ratios), 3))
  return row


def encoder_gflops(variant, res):
  """FLOPs (÷1e9) of the encoder's dense layers (patch embedding, qkv, projection, MLP) and
  of its attention (q·kᵀ and p·v) at res², batch 1."""
  v, n = vit.decode_variant(variant), (res // 16) ** 2
  w = v["width"]
  dense = flops.patch_embed_macs(n, w, 16) + v["depth"] * n * w * (4 * w + 2 * v["mlp_dim"])
  return 2 * dense / 1e9, v["depth"] * 4 * n * n * w / 1e9


def split_cell(variant, res, reps):
  """Where each encoder's time goes (fp32, batch 1): ms per call in dense layers, attention
  and everything else, and the GFLOP/s of the first two. Ours from a jax.profiler trace
  (step_jax.analysis.ops), timm's from torch.profiler's self times; timed separately (the
  profilers would slow each other), so compare shares and rates rather than totals. Our
  attention is told apart only as the fused kernel's custom call (`ours_attention`
  'cpu_fused'); on the plain JAX paths its matmuls count as dense."""
  from torch import profiler  # pylint: disable=g-import-not-at-top
  dense_gf, attn_gf = encoder_gflops(variant, res)
  compiled, args = our_encoder_program(variant, res)
  rows, wall = ops.op_times(compiled, args, reps=reps, warmup=1)
  is_attention = lambda r: r["kind"] == f"custom-call {cpu_attention.TARGET}"
  ours = dict(wall_ms=wall, dense_ms=sum(r["ms"] for r in rows if r["dot"]),
              attention_ms=sum(r["ms"] for r in rows if is_attention(r)),
              other_ms=sum(r["ms"] for r in rows if not r["dot"] and not is_attention(r)))
  call = timm_encoder(variant, res)
  call()
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    t = time.perf_counter()
    for _ in range(reps):
      call()
    timm_wall = 1000 * (time.perf_counter() - t) / reps
  self_ms = {e.key: e.self_cpu_time_total / 1000 / reps for e in prof.key_averages()}
  dense_ops = ("aten::addmm", "aten::mkldnn_convolution", "aten::mm")
  timm = dict(wall_ms=timm_wall, dense_ms=sum(self_ms.get(k, 0) for k in dense_ops),
              attention_ms=sum(v for k, v in self_ms.items() if "scaled_dot_product" in k))
  timm["other_ms"] = sum(self_ms.values()) - timm["dense_ms"] - timm["attention_ms"]
  for d in (ours, timm):
    d["dense_gflop_per_s"] = dense_gf / d["dense_ms"] * 1000 if d["dense_ms"] else None
    d["attention_gflop_per_s"] = attn_gf / d["attention_ms"] * 1000 if d["attention_ms"] \
        else None
    for k in list(d):
      d[k] = round(d[k], 1) if d[k] is not None else None
  return dict(kind="split", variant=variant, res=res, tokens=(res // 16) ** 2, batch=1,
              dtype="float32", reps=reps, dense_gflop=round(dense_gf, 2),
              attention_gflop=round(attn_gf, 2), ours=ours, timm=timm,
              ours_attention=our_attention(res))


def memory_cell(variant, res, impl):
  """XLA's planned bytes for our encoder's forward at res² with attention path `impl`."""
  model = vit.ViT(**vit.decode_variant(variant), posemb_grid=(res // 16, res // 16),
                  attention_impl=impl)
  x = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  compiled = jax.jit(lambda v, im: model.apply(v, im)[0]).lower(variables, x).compile()
  mem = compiled.memory_analysis()
  n = (res // 16) ** 2
  return dict(kind="memory", variant=variant, res=res, tokens=n, impl=impl, batch=1,
              dtype="float32", temp_bytes=getattr(mem, "temp_size_in_bytes", None),
              argument_bytes=getattr(mem, "argument_size_in_bytes", None),
              one_attention_matrix_bytes=model.num_heads * n * n * 4)


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  threads = FLAGS.threads or os.cpu_count()
  torch.set_num_threads(threads)
  rows = writers.read_jsonl(FLAGS.out) if FLAGS.out and os.path.exists(FLAGS.out) else []
  done = {(r["kind"], r["variant"], r["res"], r.get("impl", ""), r["threads"], r["dtype"])
          for r in rows}
  machine = dict(cpu=cpu_name(), cores=os.cpu_count(), threads=threads,
                 device=jax.devices()[0].platform, jax=jax.__version__,
                 torch=torch.__version__,
                 torch_device="cuda" if torch.cuda.is_available() else "cpu")
  jobs = [(v, r, impl) for v, r in parse_cells(FLAGS.cells)
          for impl in (FLAGS.impls.split(",") if FLAGS.memory else [""])]
  kind = "memory" if FLAGS.memory else "split" if FLAGS.split else "time"
  for variant, res, impl in jobs:
    key = (kind, variant, res, impl, threads,
           jnp.dtype(DTYPES[FLAGS.dtype]).name if kind == "time" else "float32")
    if key in done:
      print(f"skip {variant}@{res} {impl} (in {FLAGS.out})", flush=True)
      continue
    if kind == "memory":
      row = memory_cell(variant, res, impl)
    elif kind == "split":
      row = split_cell(variant, res, FLAGS.reps)
    else:
      row = time_cell(variant, res, FLAGS.reps, FLAGS.dtype)
    row.update(machine, when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    writers.print_row(row, FLAGS.out)


if __name__ == "__main__":
  flags.DEFINE_string("cells", DEFAULT_CELLS, "Comma-separated VARIANT@SIZE cells.")
  flags.DEFINE_integer("reps", 3, "Timed rounds per cell (after one warm-up round).")
  flags.DEFINE_integer("threads", 0, "torch threads (0: every core, as XLA uses).")
  flags.DEFINE_enum("dtype", "fp32", list(DTYPES), "Compute dtype of both (--memory: fp32).")
  flags.DEFINE_bool("memory", False, "Compile only: XLA's planned bytes per --impls path.")
  flags.DEFINE_bool("split", False, "Profile both encoders (fp32): ms and GFLOP/s of dense "
                    "layers and attention.")
  flags.DEFINE_string("impls", "einsum,chunked", "Attention paths for --memory.")
  flags.DEFINE_string("out", "", "JSON-lines file the rows are appended to (resumable).")
  app.run(main)
