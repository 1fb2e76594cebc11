"""B/16 STEP at 1024² on the 101 CamVid val frames: per-image counts and per-program compile
seconds under host_split (b1), then the one-program compile at b1 and b8."""
import json, time, sys, jax, numpy as np
sys.path.insert(0, ".")
from b16_setup import prepared
from step_jax.evaluation import dispatch, tokens
OUT = sys.argv[1]
config, model, variables, imgs = prepared()
print("taus", model.exit_threshold, flush=True)
host_model = dispatch.with_ladder(model, 1.05)
h = dispatch.HostBuckets(host_model, split_exits=True)
rows = []
t0 = time.time()
for i in range(len(imgs)):
  _, info = h(variables, imgs[i:i+1])
  rows.append(dict(count=int(np.asarray(info["num_tokens"])[0]),
                   active=np.asarray(info["active_tokens"])[0].tolist(),
                   caps=np.asarray(info["stage_capacity"]).reshape(-1).tolist()))
  if i % 10 == 0:
    print(i, time.time() - t0, flush=True)
out = dict(rows=rows, taus=[float(t) for t in np.atleast_1d(model.exit_threshold)],
           compile=[[k[0], dict(k[1]), v] for k, v in h.compile_s.items()],
           summary=h.compile_summary(), host_seconds=time.time() - t0)
json.dump(out, open(OUT, "w"))
print(out["summary"], flush=True)
for b in () if len(sys.argv) > 2 else (1, 8):
  t = time.perf_counter()
  jax.jit(model.apply).lower(variables, imgs[:b]).compile()
  out[f"device_compile_b{b}"] = time.perf_counter() - t
  print("device compile", b, out[f"device_compile_b{b}"], flush=True)
  json.dump(out, open(OUT, "w"))
