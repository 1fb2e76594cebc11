"""Early exit (DToP rules) with static shapes: exactness, compaction ≡ masking, isolation."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step_jax.models import atm
from step_jax.models import early_exit
from step_jax.models import segmenter
from step_jax.models import vit


def make_model(mode="compact", tau=1.0, merge="none", exits=(1, 2),
               exit_buckets=(0.5, 0.75, 1.0), **kw):
  backbone = vit.ViT(width=32, depth=4, mlp_dim=64, num_heads=2, posemb_grid=(4, 4))
  head = lambda: atm.ATMHead(num_classes=4, dim=32, num_heads=4, num_layers=1, num_stages=1,
                             binary_cls=True)
  return segmenter.Segmenter(backbone, head(), (4,), merge=merge, exit_layers=exits,
                             exit_heads=tuple(head() for _ in exits), exit_threshold=tau,
                             exit_mode=mode, exit_buckets=exit_buckets, **kw)


def japply(model, *args, **kw):
  """model.apply under jit (eager Flax with lax.switch is slow on CPU)."""
  return jax.jit(functools.partial(model.apply, **kw))(*args)


def _images(b=2, h=96, w=128, seed=0):
  return jax.random.uniform(jax.random.key(seed), (b, h, w, 3), minval=0, maxval=255)


def _params(images):
  return make_model().init(jax.random.key(0), images)


def test_halting_rule_keeps_top_k_per_class():
  n, q = 20, 3
  # class 0 confident on tokens 0..7 (8 candidates), class 1 on 8..10 (3), class 2 nowhere.
  cls = jnp.tile(jnp.array([[[9.0, -9.0]] * q]), (1, 1, 1))               # p(present) ≈ 1
  masks = np.full((1, q, n), -9.0, np.float32)
  masks[0, 0, :8] = np.linspace(3, 10, 8)                                  # σ > .95
  masks[0, 1, 8:11] = 8.0
  masks[0, 2, 11] = 0.0                                                    # conf .5: below τ
  active = np.ones((1, n), bool)
  active[0, 7] = False                                                     # already halted
  halt = np.asarray(early_exit.halting(cls, jnp.asarray(masks), jnp.asarray(active), 0.9, 5))
  # class 0 candidates: tokens 0..6 (7 active); the 5 most confident (2..6) stay → 0, 1 halt
  np.testing.assert_array_equal(np.flatnonzero(halt[0]), [0, 1])
  no_keep = np.asarray(early_exit.halting(cls, jnp.asarray(masks), jnp.asarray(active), 0.9, 0))
  np.testing.assert_array_equal(np.flatnonzero(no_keep[0]), [0, 1, 2, 3, 4, 5, 6, 8, 9, 10])


def test_threshold_one_is_exactly_the_no_exit_model():
  images = _images()
  params = _params(images)
  m = make_model("mask", tau=1.0)
  out, info = japply(m, params, images)
  assert np.all(np.asarray(info["halt_stage"]) == 2)          # nobody halted
  # Reference: all blocks on all tokens, then the final head alone.
  def manual(mdl, im):
    x = mdl.backbone.embed(mdl.normalize(im))
    b, gh, gw, d = x.shape
    y = mdl.backbone.run_blocks(x.reshape(b, gh * gw, d))[-1]
    return mdl.head([y])
  ref = m.apply(params, images, method=manual)
  np.testing.assert_allclose(out["pred_masks"].reshape(ref["pred_masks"].shape),
                             ref["pred_masks"], atol=1e-5)
  np.testing.assert_allclose(out["pred_logits"], ref["pred_logits"], atol=1e-5)
  compact, _ = japply(make_model("compact", tau=1.0), params, images)
  np.testing.assert_allclose(compact["pred_masks"], out["pred_masks"], atol=1e-5)


def _tau_halting_about_half(params, images):
  """The median first-exit confidence: about half of the tokens halt at exit 1."""
  out = japply(make_model("mask", tau=1.0), params, images)[0]["aux"][0]
  c, _ = early_exit.token_confidence(out["pred_logits"], out["pred_masks"].reshape(
      out["pred_masks"].shape[:2] + (-1,)))
  return float(np.quantile(np.asarray(c), 0.5))


def _check_compact_equals_mask(images, merge="none", **kw):
  params = make_model(merge=merge, **kw).init(jax.random.key(0), images, **(
      {"labels": kw_labels(images)} if merge == "oracle" else {}))
  tau = _tau_halting_about_half(params, images) if merge == "none" else 0.2
  call = lambda mode: japply(make_model(mode, tau, merge=merge, **kw), params, images, **(
      {"labels": kw_labels(images)} if merge == "oracle" else {}))
  masked, info_m = call("mask")
  compact, info_c = call("compact")
  halted = np.asarray(info_m["halt_stage"]) < 2
  assert 0 < halted.mean() < 1, halted.mean()                # the test exercises halting
  np.testing.assert_array_equal(info_m["halt_stage"], info_c["halt_stage"])
  np.testing.assert_allclose(compact["pred_masks"], masked["pred_masks"], atol=2e-4)
  np.testing.assert_allclose(compact["pred_logits"], masked["pred_logits"], atol=2e-4)
  for a, b in zip(compact["aux"], masked["aux"]):
    np.testing.assert_allclose(a["pred_masks"], b["pred_masks"], atol=2e-4)
  # compaction really ran later stages on fewer slots
  assert np.all(np.asarray(info_c["stage_capacity"])[1:] <= np.asarray(info_m["stage_capacity"])[1:])
  assert np.asarray(info_c["stage_capacity"])[-1] < np.asarray(info_m["stage_capacity"])[-1]
  return info_c


def kw_labels(images):
  b, h, w, _ = images.shape
  lab = np.zeros((b, h, w), np.int32)
  lab[:, h // 2:] = 1
  lab[:, :, : w // 4] = 2
  return jnp.asarray(lab)


def test_compaction_equals_masking_on_random_images():
  _check_compact_equals_mask(_images(b=2, seed=3))


def test_compaction_equals_masking_on_real_images():
  root = None
  for cand in ("../shared/data/camvid_segnet", "/work/shared/data/camvid_segnet"):
    if os.path.isdir(os.path.join(cand, "CamVid", "val")):
      root = cand
  if root is None:
    pytest.skip("CamVid not available")
  from PIL import Image
  files = sorted(os.listdir(os.path.join(root, "CamVid", "val")))[:2]
  ims = [np.asarray(Image.open(os.path.join(root, "CamVid", "val", f)).convert("RGB")
                    .resize((128, 96))) for f in files]
  _check_compact_equals_mask(jnp.asarray(np.stack(ims), jnp.float32))


def test_step_supertokens_plus_exits_compact_equals_mask():
  info = _check_compact_equals_mask(_images(b=2, seed=5), merge="oracle", buckets=(0.5, 1.0))
  assert np.all(np.asarray(info["num_tokens"]) < 48)


def test_halted_tokens_never_influence_later_layers():
  images = _images()
  params = _params(images)
  tau = _tau_halting_about_half(params, images)
  for mode, cap in (("mask", None), ("compact", 48)):
    m = make_model(mode, tau)
    def stage2(mdl, x, active):
      return mdl.run_stage(x, active, 1, 2, 1, cap, False)
    x = jax.random.normal(jax.random.key(1), (2, 48, 32))
    active = jax.random.uniform(jax.random.key(2), (2, 48)) < 0.5
    garbage = jnp.where(active[..., None], x, 1e3 * jax.random.normal(jax.random.key(3), x.shape))
    y1, c1, m1 = japply(m, params, x, active, method=stage2)
    y2, c2, m2 = japply(m, params, garbage, active, method=stage2)
    a = np.asarray(active)
    np.testing.assert_allclose(np.asarray(y1)[a], np.asarray(y2)[a], atol=1e-4)
    np.testing.assert_allclose(c1, c2, atol=1e-4)
    np.testing.assert_allclose(np.asarray(m1).transpose(0, 2, 1)[a],
                               np.asarray(m2).transpose(0, 2, 1)[a], atol=1e-4)


def test_canvas_keeps_exit_logits_for_halted_tokens():
  images = _images()
  params = _params(images)
  tau = _tau_halting_about_half(params, images)
  out, info = japply(make_model("compact", tau), params, images)
  hs = np.asarray(info["halt_stage"]).reshape(2, -1)
  first = np.asarray(out["aux"][0]["pred_masks"]).reshape(2, 4, -1)
  final = np.asarray(out["pred_masks"]).reshape(2, 4, -1)
  for b in range(2):
    h0 = hs[b] == 0
    np.testing.assert_allclose(final[b][:, h0], first[b][:, h0], atol=1e-6)


def test_jit_once_and_differentiable():
  images = _images()
  params = _params(images)
  m = make_model("compact", 0.3)
  fwd = jax.jit(lambda p, im: m.apply(p, im))
  fwd(params, images)
  fwd(params, _images(seed=9))
  assert fwd._cache_size() == 1

  def loss(p):
    out, _ = m.apply(p, images)
    return jnp.sum(out["pred_masks"] ** 2) + sum(jnp.sum(a["pred_masks"]) for a in out["aux"])
  g = jax.jit(jax.grad(loss))(params)["params"]
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(g))
  assert np.any(np.asarray(g["backbone"]["blocks_3"]["mlp"]["fc2"]["kernel"]) != 0)
  assert np.any(np.asarray(g["exit_heads_0"]["queries"]) != 0)
