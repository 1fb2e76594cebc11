import json, time, sys, jax, numpy as np
sys.path.insert(0, ".")
from configs import step as step_config
from step_jax.analysis import benchmark
from step_jax.evaluation import tokens
config = step_config.get_config("method=step,variant=B/16,dataset=camvid,res=1024")
config.model.policy.init_from = "workdirs/policy_camvid"
imgs = tokens.load_images(config, "workdirs/segment_throughput/frames", 8)
config, model, variables, w = benchmark.prepare(config, "fp32", None, None, -1)
model = model.clone(exit_threshold=(0.10067714005708694, 0.07742337882518768))
for b in (1, 8):
  t = time.perf_counter(); jax.jit(model.apply).lower(variables, imgs[:b]).compile()
  print("device compile", b, time.perf_counter() - t, flush=True)
