"""configs/camvid.py builds for every size, rejects bad arguments, and (slow,
when the data is present) trains and evaluates a few steps on the real CamVid files."""
import json
import os

import jax
import pytest

from configs import camvid
from configs import common
from step_jax.evaluation import evaluator as evaluate
from step_jax.models import flops
from step_jax.training import train
from step_jax.models import variables as variables_lib


@pytest.mark.parametrize("size", ["cpu", "gpu"])
def test_camvid_config_builds(size):
  cfg = camvid.get_config(f"method=segvit,size={size}")
  assert cfg.data.name == "camvid" and cfg.num_classes == 11 and cfg.ignore_index == 11
  assert all(s % 16 == 0 for s in cfg.data.image_size)
  assert tuple(cfg.model.posemb_grid) == tuple(s // 16 for s in cfg.data.image_size)
  assert cfg.batch_size % 4 == 0 and cfg.eval.mode == "whole"
  h, w = cfg.data.image_size
  shapes = jax.eval_shape(variables_lib.create_model(cfg).init, jax.random.key(0),
                          jax.numpy.zeros((1, h, w, 3)))
  assert shapes["params"]["head"]["queries"].shape[0] == 11
  assert flops.model_macs(cfg)["total"] > 0
  # 480x360 frames → one whole-image shape (padded to a multiple of 16).
  s = evaluate.settings(cfg)
  hr, wr = evaluate.target_size(360, 480, s["resize_short"], s["max_long"])
  assert all(n % 16 == 0 for n in evaluate.bucket_shape((hr, wr), s))


def test_camvid_config_rejects_bad_arguments():
  with pytest.raises(ValueError, match="unknown method"):
    camvid.get_config("method=maskformer")
  with pytest.raises(ValueError, match="size"):
    camvid.get_config("size=tpu")


def test_camvid_data_dir_default():
  cfg = camvid.get_config("method=segvit")
  assert cfg.data.data_dir == common.default_data_dir("camvid_segnet")
  assert cfg.data.data_dir == "" or os.path.isdir(os.path.join(cfg.data.data_dir, "CamVid"))


@pytest.mark.slow
@pytest.mark.skipif(not common.default_data_dir("camvid_segnet"), reason="CamVid not present")
def test_camvid_short_run_trains_and_evaluates(tmp_path):
  cfg = camvid.get_config("method=segvit,size=cpu")
  cfg.optim.update(total_steps=4, warmup_steps=1)
  cfg.update(log_every=2, eval_every=0, checkpoint_every=2)
  _, ev = train.train_and_evaluate(cfg, str(tmp_path))
  assert ev["images"] == 101 and ev["compiled_shapes"] == 1
  assert json.load(open(tmp_path / "eval_val.json"))["step"] == 4
