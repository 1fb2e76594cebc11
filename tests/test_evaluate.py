"""Whole/sliding-window inference against hand-computed references, variable-size batching,
test-time resizing, and the evaluate CLI."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close  # tests/numerics.py

from configs import segvit
from step_jax.runtime import checkpoint as ckpt_lib
from step_jax.evaluation import evaluator as evaluate
from step_jax.evaluation import metrics as metrics_lib
from step_jax.training import optim
from step_jax.runtime import sharding
from step_jax.training import train
from step_jax.models import resize
from step_jax.evaluation import tokens
from step_jax.models import variables as variables_lib

_CACHE = jax.config.jax_compilation_cache_dir  # set in conftest.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN = (127.5, 127.5, 127.5)
CONFIG_ARG = "configs/segvit.py:variant=Mu/16,dataset=synthetic,smoke"
# The tiny model of these tests, as command-line overrides and as config updates.
TINY = {"data.image_size": (32, 32), "data.num_eval": 5, "model.out_layers": (2,),
        "model.head_layers": 1, "model.posemb_grid": (2, 2), "eval_batch_size": 4}


def _tiny(**eval_overrides):
  cfg = segvit.get_config(CONFIG_ARG.split(":")[1])
  for k, v in TINY.items():
    node = cfg
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  cfg.eval.update(eval_overrides)
  return cfg


@pytest.fixture(scope="module")
def tiny_model():
  cfg = _tiny()
  model = variables_lib.create_model(cfg)
  params = jax.jit(lambda k: variables_lib.init_variables(model, cfg, k))(  # eagerly, each
      jax.random.key(0))["params"]                                      # op would compile
  apply_fn = jax.jit(evaluate.make_apply_fn(model))
  return cfg, model, params, apply_fn


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def _padded(img, hw, value=127.5):
  out = np.full(hw + (3,), value, np.float32)
  out[:img.shape[0], :img.shape[1]] = img
  return out


def _infer(params, img, bucket, **kw):
  x = np.zeros((1,) + bucket + (3,), np.uint8)
  x[0, :img.shape[0], :img.shape[1]] = img
  hw = jnp.array([img.shape[:2]], jnp.int32)
  return np.asarray(jax.jit(lambda p, x, hw: evaluate.infer(p, x, hw, pad_value=MEAN, **kw))(
      params, x, hw))[0]


def test_slide_equals_whole_when_one_window_covers_the_image(tiny_model):
  _, _, params, apply_fn = tiny_model
  img = _image(32, 32)
  whole = _infer(params, img, (32, 32), apply_fn=apply_fn, mode="whole", crop=None, stride=None)
  slide = _infer(params, img, (32, 32), apply_fn=apply_fn, mode="slide", crop=(32, 32),
                 stride=(16, 16))
  assert_close(slide, whole, 1e-6)


def test_slide_matches_hand_computed_window_average(tiny_model):
  _, _, params, apply_fn = tiny_model
  run = lambda x: np.asarray(apply_fn(params, jnp.asarray(x)[None]))[0]
  # 32x40 image, 32x32 windows, stride 16: windows at x = 0 and (clipped) x = 8.
  img = _image(32, 40, seed=1).astype(np.float32)
  s1, s2 = run(img[:, 0:32]), run(img[:, 8:40])
  want = np.zeros((32, 40, s1.shape[-1]), np.float32)
  count = np.zeros((32, 40, 1), np.float32)
  want[:, 0:32] += s1; count[:, 0:32] += 1
  want[:, 8:40] += s2; count[:, 8:40] += 1
  want /= count
  bucket = evaluate.bucket_shape((32, 40), dict(mode="slide", crop=(32, 32), stride=(16, 16)))
  assert bucket == (32, 48)   # the third static window is masked out for this image
  got = _infer(params, img.astype(np.uint8), bucket, apply_fn=apply_fn, mode="slide",
               crop=(32, 32), stride=(16, 16))
  assert_close(got[:32, :40], want, 1e-5)
  # An image shorter than the window: one row of windows over the mean-padded image.
  img = _image(24, 32, seed=2)
  want = run(_padded(img, (32, 32)))[:24]
  got = _infer(params, img, (32, 48), apply_fn=apply_fn, mode="slide", crop=(32, 32),
               stride=(16, 16))
  assert_close(got[:24, :32], want, 1e-5)


def test_whole_pads_to_patch_multiple_and_crops_back(tiny_model):
  _, _, params, apply_fn = tiny_model
  img = _image(40, 56, seed=3)
  bucket = evaluate.bucket_shape((40, 56), dict(mode="whole", patch=16))
  assert bucket == (48, 64)
  want = np.asarray(apply_fn(params, jnp.asarray(_padded(img, bucket))[None]))[0][:40, :56]
  got = _infer(params, img, bucket, apply_fn=apply_fn, mode="whole", crop=None, stride=None)
  assert_close(got[:40, :56], want, 1e-6)


def test_resize_scores_is_pytorch_bilinear_with_traced_sizes():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 20, 24, 3)).astype(np.float32)
  in_hw = np.array([[13, 17], [20, 24]], np.int32)
  out_hw = np.array([[30, 9], [20, 24]], np.int32)
  got = np.asarray(evaluate.resize_scores(jnp.asarray(x), in_hw, out_hw, (32, 32)))
  a = x[0, :13, :17]
  want = np.einsum("oh,hwc->owc", resize.interp_matrix(13, 30, "bilinear"), a)
  want = np.einsum("pw,owc->opc", resize.interp_matrix(17, 9, "bilinear"), want)
  assert_close(got[0, :30, :9], want, 1e-5)
  np.testing.assert_array_equal(got[1, :20, :24], x[1])   # same size: exact


def test_target_size_follows_mmcv_rescale():
  assert evaluate.target_size(360, 480, 180) == (180, 240)
  assert evaluate.target_size(512, 683, 512, 2048) == (512, 683)
  assert evaluate.target_size(300, 2000, 512, 2048) == (307, 2048)   # long side capped
  assert evaluate.target_size(360, 480) == (360, 480)


class _VariableSource:
  """Images of several sizes, labels at (possibly) another size."""

  def __init__(self, sizes, num_classes=6, ignore=255):
    self.items = []
    for k, (ih, iw, lh, lw) in enumerate(sizes):
      rng = np.random.default_rng(k)
      lab = rng.integers(0, num_classes, (lh, lw)).astype(np.uint8)
      lab[0, :3] = ignore
      self.items.append(dict(image=_image(ih, iw, seed=10 + k), label=lab))

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return self.items[i]


@pytest.mark.parametrize("mode,resize_short", [("whole", 0), ("slide", 0), ("whole", 24)])
def test_evaluator_on_variable_sizes_matches_per_image_reference(tiny_model, mode,
                                                                 resize_short):
  cfg, model, params, apply_fn = tiny_model
  cfg = _tiny(mode=mode, stride=(16, 16), resize_short=resize_short)
  sizes = [(32, 32, 32, 32), (40, 56, 40, 56), (32, 32, 32, 32), (24, 40, 24, 40),
           (40, 56, 40, 56)]
  if resize_short:  # labels keep the original size; scores are resized back
    sizes = [(h, w, h, w) for h, w, _, _ in sizes]
  src = _VariableSource(sizes)
  mesh = sharding.make_mesh(cfg)
  ev = evaluate.Evaluator(cfg, model, mesh, source=src)
  out = ev(params)
  s = evaluate.settings(cfg)
  conf = np.zeros((6, 6), np.int64)
  for ex in src.items:
    img, lab = ex["image"], ex["label"]
    hr, wr = evaluate.target_size(*img.shape[:2], resize_short)
    img_r = evaluate.resize_image(img, (hr, wr))
    scores = _infer(params, img_r, evaluate.bucket_shape((hr, wr), s), apply_fn=apply_fn,
                    mode=mode, crop=s["crop"], stride=s["stride"])[:hr, :wr]
    if (hr, wr) != lab.shape:
      scores = np.einsum("oh,hwc->owc", resize.interp_matrix(hr, lab.shape[0], "bilinear"),
                         scores)
      scores = np.einsum("pw,owc->opc", resize.interp_matrix(wr, lab.shape[1], "bilinear"),
                         scores)
    conf += np.asarray(metrics_lib.confusion_matrix(
        jnp.argmax(scores, -1)[None], jnp.asarray(lab, jnp.int32)[None], 6, 255))
  want = metrics_lib.summarize(conf)
  assert out["images"] == 5
  assert_close(out["miou"], want["miou"], 1e-6)
  assert_close(out["pixel_acc"], want["pixel_acc"], 1e-6)
  # Five images, three bucket shapes, batches of 4 padded with invalid rows.
  assert out["compiled_shapes"] == 3, out["shapes"]


def test_evaluate_cli_writes_json(tmp_path):
  cfg = _tiny()
  model, tx = variables_lib.create_model(cfg), optim.make_optimizer(cfg.optim)
  mesh = sharding.make_mesh(cfg)
  _, sh = train.abstract_train_state(cfg, model, mesh, tx)
  import functools  # pylint: disable=g-import-not-at-top
  state = jax.jit(functools.partial(train.init_state, model=model, tx=tx, config=cfg),
                  out_shardings=sh)(jax.random.key(0))
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  ck.save(7, state)
  ck.close()
  overrides = [f"--config.{k}={v}" if not isinstance(v, tuple) else
               f"--config.{k}=({','.join(map(str, v))},)" for k, v in TINY.items()]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=_CACHE)
  res = subprocess.run(
      [sys.executable, "-m", "step_jax.cli.evaluate", f"--config={CONFIG_ARG}",
       f"--workdir={tmp_path}", "--config.data.split=train", "--config.data.num_train=3",
       *overrides], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.load(open(tmp_path / "eval_train.json"))
  assert {"miou", "per_class_iou", "pixel_acc", "gflops", "images", "step"} <= set(out)
  assert out["step"] == 7 and out["images"] == 3 and out["split"] == "train"
  assert 0 <= out["miou"] <= 1 and out["gflops"] > 0 and len(out["per_class_iou"]) == 6
  assert "mIoU" in res.stdout


def test_token_statistics_read_the_evaluated_split():
  """`evaluate --config.data.split=test` measures tokens/GFLOPs on test images, not val."""
  cfg = _tiny()
  cfg.data.image_size = (32, 32)
  val = tokens.load_images(cfg, "", 2)
  cfg.data.split = "test"
  test = tokens.load_images(cfg, "", 2)
  np.testing.assert_array_equal(test, tokens.load_images(cfg, "", 2, split="test"))
  np.testing.assert_array_equal(val, tokens.load_images(cfg, "", 2, split="val"))
  assert not np.array_equal(test, val)
