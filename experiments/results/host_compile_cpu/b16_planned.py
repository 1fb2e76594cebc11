"""B/16 STEP at 1024² on the 101 CamVid val frames, host_split with capacities planned over
the pool (dispatch.HostBuckets(plan_ratio=1.05).run, as evaluation runs a pool of
evaluator.POOL_IMAGES images: here all 101), at batch 1 and at batch 8 (batches grouped by
token count), then the one program's compile at b1 and b8 measured right after.

  python experiments/results/host_compile_cpu/b16_planned.py OUT.json
"""
import json, time, sys, jax, numpy as np
sys.path.insert(0, ".")
from b16_setup import prepared
from step_jax.evaluation import dispatch, tokens
OUT = sys.argv[1]
config, model, variables, imgs = prepared()
out = dict(taus=[float(t) for t in np.atleast_1d(model.exit_threshold)])
for b in (1, 8):
  h = dispatch.HostBuckets(dispatch.with_ladder(model, 1.05), split_exits=True, plan_ratio=1.05)
  t0 = time.time()
  pad = lambda idx: np.resize(idx, b)   # every batch of b images (the last repeats)
  counts = np.concatenate([h.token_counts(variables, imgs[pad(np.arange(i, min(i + b, 101)))])
                           [:min(b, 101 - i)] for i in range(0, 101, b)])
  groups = dispatch.group_by_tokens(counts, b)
  results = h.run(variables, [(imgs[pad(g)], None) for g in groups])
  useful = executed = 0.0
  for g, (_, info) in zip(groups, results):
    for j in range(len(g)):
      row = tokens.image_tokens(config, h.model, info, j)
      useful += row["useful"]["total"]
      executed += row["executed"]["total"]
  out[f"b{b}"] = dict(summary=h.compile_summary(), compile_s=sum(h.compile_s.values()),
                      seconds=time.time() - t0, executed_over_useful=executed / useful)
  print(b, out[f"b{b}"], flush=True)
  json.dump(out, open(OUT, "w"))
for b in (1, 8):
  t = time.perf_counter()
  jax.jit(model.apply).lower(variables, imgs[:b]).compile()
  out[f"device_compile_b{b}"] = time.perf_counter() - t
  print("device compile", b, out[f"device_compile_b{b}"], flush=True)
  json.dump(out, open(OUT, "w"))
