"""The setup every B/16 record here shares: STEP ViT-B/16 at 1024² (exits after blocks 6 and
8) with the CamVid policy trained here, random ViT and heads, exits calibrated to halt 40 %
of the active tokens on the first 8 of the 101 CamVid val frames."""
import sys
sys.path.insert(0, ".")
from configs import step as step_config
from step_jax.analysis import benchmark
from step_jax.evaluation import tokens


def prepared(num_images=101):
  """(config, model, variables, images uint8 [num_images, 1024, 1024, 3])."""
  config = step_config.get_config("method=step,variant=B/16,dataset=camvid,res=1024")
  config.model.policy.init_from = "workdirs/policy_camvid"
  imgs = tokens.load_images(config, "workdirs/segment_throughput/frames", num_images)
  config, model, variables, _ = benchmark.prepare(config, "fp32", None, imgs[:8], 0.4)
  return config, model, variables, imgs
