"""B/16 STEP at 1024² on the 101 CamVid val frames: host_split at batch 8, batches grouped by
token count (as evaluation and step-segment), compile seconds per program; executed/useful."""
import json, time, sys, numpy as np
sys.path.insert(0, ".")
from b16_setup import prepared
from step_jax.evaluation import dispatch, tokens
OUT = sys.argv[1]
config, model, variables, imgs = prepared()
h = dispatch.HostBuckets(dispatch.with_ladder(model, 1.05), split_exits=True)
t0 = time.time()
pad8 = lambda idx: np.resize(idx, 8)   # every batch of 8 images (the last repeats)
counts = np.concatenate([h.token_counts(variables, imgs[pad8(np.arange(i, min(i + 8, 101)))])
                         [:min(8, 101 - i)] for i in range(0, 101, 8)])
useful = executed = 0.0
for g in dispatch.group_by_tokens(counts, 8):
  idx = pad8(g)
  _, info = h(variables, imgs[idx])
  for j in range(len(g)):
    row = tokens.image_tokens(config, h.model, info, j)
    useful += row["useful"]["total"]
    executed += row["executed"]["total"]
out = dict(summary=h.compile_summary(), compile_s=sum(h.compile_s.values()),
           seconds=time.time() - t0, executed_over_useful=executed / useful,
           taus=[float(t) for t in np.atleast_1d(model.exit_threshold)])
json.dump(out, open(OUT, "w"))
print(out, flush=True)
