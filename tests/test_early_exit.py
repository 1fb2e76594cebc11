"""Early exit (DToP rules) with static shapes: exactness, compaction ≡ masking, isolation.

Compiled forwards are memoised: on a 2-core CPU each tiny-model compile costs seconds.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step_jax.data import synthetic
from step_jax.models import atm
from step_jax.models import early_exit
from step_jax.models import segmenter
from step_jax.models import vit


DESIGNS = ("dtop", "atm")
# The heaviest invariants run for the default design by default, for DToP's with -m slow.
HEAVY = (pytest.param("dtop", marks=pytest.mark.slow), "atm")


def make_model(mode="compact", tau=1.0, merge="none", buckets=(1.0,), design="dtop"):
  """4 blocks, exits after blocks 1 and 2. 'dtop': DToP's binary heads at the exits and on
  block 4; 'atm': one SegViT head whose stages at blocks 1, 2 (the exits) and 4 run as the
  encoder reaches them."""
  backbone = vit.ViT(width=32, depth=4, mlp_dim=64, num_heads=2, posemb_grid=(4, 4))
  kw = dict(merge=merge, buckets=buckets, exit_layers=(1, 2), exit_threshold=tau,
            exit_mode=mode, exit_buckets=(0.5, 0.75, 1.0), exit_head=design)
  head = lambda stages, binary: atm.ATMHead(num_classes=4, dim=32, num_heads=4, num_layers=1,
                                            num_stages=stages, binary_cls=binary)
  if design == "atm":
    return segmenter.Segmenter(backbone, head(3, False), (1, 2, 4), **kw)
  return segmenter.Segmenter(backbone, head(1, True), (4,),
                             exit_heads=(head(1, True), head(1, True)), **kw)


@functools.lru_cache(maxsize=None)
def forward(mode, tau, merge="none", buckets=(1.0,), design="dtop"):
  model = make_model(mode, tau, merge, buckets, design)
  return jax.jit(lambda p, im, lab=None: model.apply(p, im, labels=lab))


def _images(b=2, h=96, w=128, seed=0):
  return jax.random.uniform(jax.random.key(seed), (b, h, w, 3), minval=0, maxval=255)


def _labels(images):
  b, h, w, _ = images.shape
  lab = np.zeros((b, h, w), np.int32)
  lab[:, h // 2:] = 1
  lab[:, :, :w // 4] = 2
  return jnp.asarray(lab)


@functools.lru_cache(maxsize=None)
def _params(design="dtop"):
  """One compiled init (eagerly, every op compiles on its own) of the masked model: the same
  parameters as the compacting one, without a switch branch per exit bucket."""
  return jax.jit(make_model(mode="mask", design=design).init)(jax.random.key(0), _images())


def _median_tau(params, images, design="dtop"):
  """The median first-exit confidence: about half of the tokens halt at exit 1."""
  out = forward("mask", 1.0, design=design)(params, images)[0]["aux"][0]
  masks = out["pred_masks"].reshape(out["pred_masks"].shape[:2] + (-1,))
  conf, _ = early_exit.token_confidence(out["pred_logits"], masks)
  return float(np.quantile(np.asarray(conf), 0.5))


def test_confidence_of_a_multiclass_head_is_query_c_on_class_c():
  """(C+1)-way heads: p_c(present) = softmax(cls_c)[c], the analogue of DToP's binary p."""
  cls = jax.random.normal(jax.random.key(0), (2, 3, 4)) * 3
  masks = jax.random.normal(jax.random.key(1), (2, 3, 5)) * 3
  conf, pred = early_exit.token_confidence(cls, masks)
  p = np.asarray(jax.nn.softmax(cls, -1))
  probs = np.stack([p[:, c, c] for c in range(3)], 1)[..., None] * np.asarray(
      jax.nn.sigmoid(masks))
  np.testing.assert_allclose(conf, probs.max(1), rtol=1e-6)
  np.testing.assert_array_equal(pred, probs.argmax(1))
  binary = jnp.stack([cls[..., 0], cls[..., 1]], -1)
  np.testing.assert_allclose(early_exit.class_presence(binary),
                             jax.nn.softmax(binary, -1)[..., 0], rtol=1e-6)


def test_halting_rule_keeps_top_k_per_class():
  n, q = 20, 3
  cls = jnp.array([[[9.0, -9.0]] * q])                                     # p(present) ≈ 1
  masks = np.full((1, q, n), -9.0, np.float32)
  masks[0, 0, :8] = np.linspace(3, 10, 8)                                  # class 0: 8 tokens
  masks[0, 1, 8:11] = 8.0                                                  # class 1: 3 tokens
  masks[0, 2, 11] = 0.0                                                    # conf .5 < τ
  active = np.ones((1, n), bool)
  active[0, 7] = False                                                     # already halted
  halt = np.asarray(early_exit.halting(cls, jnp.asarray(masks), jnp.asarray(active), 0.9, 5))
  # class 0 candidates are tokens 0..6; its 5 most confident (2..6) stay: 0 and 1 halt.
  # class 1 has only 3 candidates: all stay. Token 11 is below τ, token 7 was not active.
  np.testing.assert_array_equal(np.flatnonzero(halt[0]), [0, 1])
  no_keep = np.asarray(early_exit.halting(cls, jnp.asarray(masks), jnp.asarray(active), 0.9, 0))
  np.testing.assert_array_equal(np.flatnonzero(no_keep[0]), [0, 1, 2, 3, 4, 5, 6, 8, 9, 10])


@pytest.mark.parametrize("design", HEAVY)
def test_threshold_one_is_exactly_the_no_exit_model(design):
  images, params = _images(), _params(design)
  out, info = forward("mask", 1.0, design=design)(params, images)
  assert np.all(np.asarray(info["halt_stage"]) == 2)          # nobody halted

  def manual(mdl, im):  # all blocks on all tokens, then the head(s) on every token
    x = mdl.backbone.embed(mdl.normalize(im))
    b, gh, gw, d = x.shape
    outs = mdl.backbone.run_blocks(x.reshape(b, gh * gw, d))
    if design == "dtop":   # the final head alone on the last block
      return mdl.head([outs[-1]])
    q, masks = mdl.head.initial_queries(b), 0.0  # SegViT's stages, shallowest first
    for i, layer in enumerate(mdl.out_layers):
      q, logits = mdl.head.stage(i, q, outs[layer - 1])
      masks = masks + logits
    return dict(pred_logits=mdl.head.classify(q), pred_masks=masks)
  ref = jax.jit(functools.partial(make_model(design=design).apply, method=manual))(
      params, images)
  np.testing.assert_allclose(out["pred_masks"].reshape(ref["pred_masks"].shape),
                             ref["pred_masks"], atol=1e-5)
  np.testing.assert_allclose(out["pred_logits"], ref["pred_logits"], atol=1e-5)
  compact, _ = forward("compact", 1.0, design=design)(params, images)
  np.testing.assert_allclose(compact["pred_masks"], out["pred_masks"], atol=1e-5)


def _check_compact_equals_mask(images, merge="none", buckets=(1.0,), design="dtop"):
  params = _params(design)
  labels = _labels(images) if merge == "oracle" else None
  tau = _median_tau(params, images, design)
  masked, info_m = forward("mask", tau, merge, buckets, design)(params, images, labels)
  compact, info_c = forward("compact", tau, merge, buckets, design)(params, images, labels)
  halted = np.asarray(info_m["halt_stage"]) < 2
  assert 0 < halted.mean() < 1, halted.mean()                # the test exercises halting
  np.testing.assert_array_equal(info_m["halt_stage"], info_c["halt_stage"])
  np.testing.assert_allclose(compact["pred_masks"], masked["pred_masks"], atol=2e-4)
  np.testing.assert_allclose(compact["pred_logits"], masked["pred_logits"], atol=2e-4)
  for a, b in zip(compact["aux"], masked["aux"]):
    np.testing.assert_allclose(a["pred_masks"], b["pred_masks"], atol=2e-4)
  # Compaction really ran the later stages on fewer slots.
  assert np.asarray(info_c["stage_capacity"])[-1] < np.asarray(info_m["stage_capacity"])[-1]
  return info_c


# -m slow only: the real-image test (DToP heads) and the STEP test below (ATM exits) check
# the same on the default run.
@pytest.mark.slow
@pytest.mark.parametrize("design", DESIGNS)
def test_compaction_equals_masking_on_random_images(design):
  _check_compact_equals_mask(_images(seed=3), design=design)


def test_compaction_equals_masking_on_real_images():
  """DToP's design on two CamVid val frames (the embedded synthetic street scenes when
  CamVid is absent, as in CI)."""
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "data", "camvid_segnet")
  folder = os.path.join(root, "CamVid", "val")
  if os.path.isdir(folder):
    from PIL import Image
    ims = [np.asarray(Image.open(os.path.join(folder, f)).convert("RGB").resize((128, 96)))
           for f in sorted(os.listdir(folder))[:2]]
  else:
    scenes = synthetic.SyntheticScenes(2, image_size=(96, 128), seed=1)
    ims = [scenes[i]["image"] for i in range(2)]
  _check_compact_equals_mask(jnp.asarray(np.stack(ims), jnp.float32))


@pytest.mark.parametrize("design", HEAVY)
def test_step_supertokens_plus_exits_compact_equals_mask(design):
  info = _check_compact_equals_mask(_images(seed=5), merge="oracle", buckets=(0.5, 1.0),
                                    design=design)
  assert np.all(np.asarray(info["num_tokens"]) < 48)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("capacity", [None, 48])
def test_halted_tokens_never_influence_later_layers(capacity, design):
  """Segment 2 (block 2 and its head stage) run on inputs whose halted rows are garbage gives
  the same active outputs, queries and class logits."""
  m = make_model(design=design)
  segment = lambda mdl, x, a: mdl.run_segment(
      x, mdl.head.initial_queries(2) if design == "atm" else None, a, 1, 2, ((1, 2),),
      capacity, False)
  stage2 = jax.jit(functools.partial(m.apply, method=segment))
  x = jax.random.normal(jax.random.key(1), (2, 48, 32))
  active = jax.random.uniform(jax.random.key(2), (2, 48)) < 0.5
  garbage = jnp.where(active[..., None], x, 1e3 * jax.random.normal(jax.random.key(3), x.shape))
  y1, q1, [(c1, m1)] = stage2(_params(design), x, active)
  y2, q2, [(c2, m2)] = stage2(_params(design), garbage, active)
  a = np.asarray(active)
  np.testing.assert_allclose(np.asarray(y1)[a], np.asarray(y2)[a], atol=1e-4)
  np.testing.assert_allclose(c1, c2, atol=1e-4)
  if design == "atm":
    np.testing.assert_allclose(q1, q2, atol=1e-4)
  np.testing.assert_allclose(np.swapaxes(np.asarray(m1), 1, 2)[a],
                             np.swapaxes(np.asarray(m2), 1, 2)[a], atol=1e-4)


@pytest.mark.parametrize("design", DESIGNS)
def test_canvas_keeps_exit_logits_for_halted_tokens_and_jit_once(design):
  images, params = _images(), _params(design)
  tau = _median_tau(params, images, design)
  fwd = forward("compact", tau, design=design)
  out, info = fwd(params, images)
  hs = np.asarray(info["halt_stage"]).reshape(2, -1)
  first = np.asarray(out["aux"][0]["pred_masks"]).reshape(2, 4, -1)
  final = np.asarray(out["pred_masks"]).reshape(2, 4, -1)
  assert np.any(hs == 0)
  for b in range(2):
    np.testing.assert_allclose(final[b][:, hs[b] == 0], first[b][:, hs[b] == 0], atol=1e-6)
    if design == "atm":  # active tokens got the later stages added
      assert np.abs(final[b][:, hs[b] == 2] - first[b][:, hs[b] == 2]).max() > 1e-3
  fwd(params, _images(seed=9))                          # other images: no retrace
  assert fwd._cache_size() == 1


@pytest.mark.parametrize("design", HEAVY)
def test_differentiable_through_compaction(design):
  images, params = _images(), _params(design)
  m = make_model("compact", _median_tau(params, images, design), design=design)

  def loss(p):
    out, _ = m.apply(p, images)
    return jnp.sum(out["pred_masks"] ** 2) + sum(jnp.sum(a["pred_masks"]) for a in out["aux"])
  g = jax.jit(jax.grad(loss))(params)["params"]
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(g))
  assert np.any(np.asarray(g["backbone"]["blocks_3"]["mlp"]["fc2"]["kernel"]) != 0)
  exit_params = g["exit_heads_0"] if design == "dtop" else g["head"]["decoder_0_0"]
  assert any(np.any(np.asarray(l) != 0) for l in jax.tree.leaves(exit_params))
