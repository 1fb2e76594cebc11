"""dCTS policy net: shapes, loss/metric arithmetic, ImageNet init, end-to-end training run,
and resume after SIGKILL (the main trainer's checkpointing)."""
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import killed  # tests/killed.py

from numerics import assert_close  # tests/numerics.py

from configs import policy as policy_config
from step_jax.training import train_policy
from step_jax.models import policy as policy_lib
from step_jax.models import variables as variables_lib


def test_loss_and_counts_match_numpy():
  rng = np.random.default_rng(0)
  logits = {2: rng.normal(size=(2, 3, 4)).astype(np.float32)}
  t = rng.integers(0, 2, (2, 3, 4)).astype(np.uint8)
  t[0, 0, 0] = 255
  loss, m = policy_lib.policy_loss({2: jnp.asarray(logits[2])}, {2: jnp.asarray(t)})
  z, y, valid = logits[2], (t == 1).astype(np.float64), t != 255
  p = 1 / (1 + np.exp(-z))
  want = -(y * np.log(p) + (1 - y) * np.log(1 - p))[valid].mean()
  assert_close(m["policy_loss_2"], want, 1e-5)
  counts = np.asarray(policy_lib.policy_counts({2: jnp.asarray(z)}, {2: jnp.asarray(t)},
                                               {2: 0.6})[2])
  pred, pos = p > 0.6, t == 1
  np.testing.assert_array_equal(counts, [(valid & pred & pos).sum(), (valid & pred & ~pos).sum(),
                                         (valid & ~pred & pos).sum(),
                                         (valid & ~pred & ~pos).sum()])


def test_pretrained_init_and_shapes_on_an_odd_size():
  cfg = policy_config.get_config("dataset=synthetic,size=smoke")
  model = train_policy.build(cfg)
  v = train_policy.init_variables(model, (360, 480))
  out = jax.jit(model.apply)(v, jnp.zeros((1, 360, 480, 3)))
  # 22 x 30 patches: complete windows only.
  assert {k: o.shape for k, o in out.items()} == {2: (1, 11, 15), 4: (1, 5, 7), 8: (1, 2, 3),
                                                  16: (1, 1, 1)}
  from step_jax.models import convert_effnet
  pre = convert_effnet.load_pypi_lite0(include_head=False)
  np.testing.assert_array_equal(v["params"]["backbone"]["stem_conv"]["kernel"],
                                pre["params"]["stem_conv"]["kernel"])



def test_image_by_image_features_equal_the_batch(monkeypatch):
  """On a CPU the EfficientNet runs image by image at inference (policy.per_image_features);
  its scores equal the whole batch's (the path GPUs and training take), and they do not
  depend on which images share the batch."""
  net = policy_lib.PolicyNet(train_backbone=False)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3)), jnp.float32)
  variables = net.init(jax.random.PRNGKey(0), x[:1])
  assert policy_lib.per_image_features(False, False)   # this test runs on a CPU
  assert not policy_lib.per_image_features(True, False)
  score = lambda x: jax.jit(lambda v, x: net.apply(v, x))(variables, x)   # traced anew
  looped, alone = score(x), score(x[1:2])
  monkeypatch.setattr(policy_lib, "per_image_features", lambda train, init: False)
  batched = score(x)
  for k in looped:
    assert_close(looped[k], batched[k], 1e-5)
    assert_close(looped[k][1:2], alone[k], 1e-5)

@pytest.mark.slow  # trains the EfficientNet backbone too (minutes of compile on a CPU)
def test_train_policy_end_to_end(tmp_path):
  cfg = policy_config.get_config("dataset=synthetic,size=smoke")
  variables, ev = train_policy.train_and_evaluate(cfg, str(tmp_path))
  saved = json.load(open(tmp_path / "eval_policy.json"))
  assert set(saved["sizes"]) == {"2x2", "4x4", "8x8", "16x16"}
  assert set(saved["tokens"]) == {"4999", "6899"}
  t = saved["tokens"]["4999"]
  assert t["total"]["min"] <= t["total"]["mean"] <= t["total"]["max"] <= saved["tokens_full"]
  # Every image's tokens add up over superpatch sizes (means add too).
  parts = sum(t[f"{k}x{k}"]["mean"] for k in (1, 2, 4, 8, 16))
  assert_close(parts, t["total"]["mean"], 1e-9)
  restored = train_policy.load_variables(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(variables))
  with pytest.raises(FileNotFoundError, match="no policy checkpoint"):
    train_policy.load_variables(str(tmp_path / "nothing"))


def test_unseen_window_sizes_never_merge_on_larger_images():
  """A policy initialised on 64x64 crops has no 8x8/16x16 heads; add_unseen_sizes lets it run
  on 256x256 images with the trained heads unchanged and the new ones never merging."""
  net = policy_lib.PolicyNet(source="pypi", hidden=8)
  apply = jax.jit(net.apply)   # eager ops would compile one by one
  variables = variables_lib.random_variables(net, (64, 64))   # a compiled init takes ~10 s
  assert "logit_8" not in variables["params"] and "logit_4" in variables["params"]
  big = jax.random.uniform(jax.random.key(1), (1, 256, 256, 3), maxval=255)
  with pytest.raises(flax.errors.ScopeParamNotFoundError, match="hidden_8|logit_8"):
    apply(variables, big)
  full = dict(variables, params=policy_lib.add_unseen_sizes(variables["params"]))
  out = apply(full, big)
  assert {k: v.shape for k, v in out.items()} == {2: (1, 8, 8), 4: (1, 4, 4), 8: (1, 2, 2),
                                                  16: (1, 1, 1)}
  assert np.all(np.asarray(jax.nn.sigmoid(out[8])) < 1e-9)
  assert np.all(np.asarray(jax.nn.sigmoid(out[16])) < 1e-9)
  ref = variables_lib.random_variables(net, (256, 256), seed=1)   # heads 2/4 replaced below
  assert_close(out[2], apply(dict(ref, params=dict(ref["params"], **variables["params"])),
                             big)[2], 1e-6)
  assert policy_lib.add_unseen_sizes(full["params"]) is full["params"]  # nothing to add


def test_train_policy_resumes_bit_identically_after_sigkill(tmp_path):
  cfg = policy_config.get_config("dataset=synthetic,size=smoke")
  cfg.data.update(image_size=(64, 64), num_train=16, num_eval=2)
  cfg.data.eval_crop = (64, 64)
  cfg.optim.update(total_steps=4, warmup_steps=1)
  cfg.policy.train_backbone = False   # frozen ImageNet backbone: a fast compile on a CPU
  cfg.checkpoint_every = 2
  ref, _ = train_policy.train_and_evaluate(cfg, str(tmp_path / "ref"))
  wd = tmp_path / "run"
  killed.run_killed_after("step_jax.training.train_policy", str(wd), cfg, 2, timeout=300)
  assert not os.path.exists(wd / "policy_ckpt")   # it died before the end
  variables, ev = train_policy.train_and_evaluate(cfg, str(wd))   # steps 3..4 from step 2
  assert ev["resumed_from"] == 2
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0],
                          jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))  # bit-identical
