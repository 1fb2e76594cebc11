"""Early exit (DToP rules) with static shapes: exactness, compaction ≡ masking, isolation.

Compiled forwards are memoised: on a 2-core CPU each tiny-model compile costs seconds.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close, rel_diff  # tests/numerics.py

from step_jax.data import synthetic
from step_jax.models import atm
from step_jax.models import early_exit
from step_jax.models import segmenter
from step_jax.models import vit


DESIGNS = ("dtop", "atm_shallow_first", "segvit")
# The heaviest invariants run for the default design by default, for the others with -m slow.
HEAVY = (pytest.param("dtop", marks=pytest.mark.slow),
         pytest.param("atm_shallow_first", marks=pytest.mark.slow), "segvit")
# The light ones for DToP's design too.
LIGHT = ("dtop", pytest.param("atm_shallow_first", marks=pytest.mark.slow), "segvit")


def make_model(mode="compact", tau=1.0, merge="none", buckets=(1.0,), design="dtop"):
  """4 blocks, exits after blocks 1 and 2. 'dtop': DToP's binary heads at the exits and on
  block 4; 'atm_shallow_first': one SegViT head whose stages at blocks 1, 2 (the exits) and 4
  run as the encoder reaches them; 'segvit': SegViT's head on blocks 2, 3, 4 (Mu/16's
  out_layers; exit 1 is not one of them), its stage 0 rating the tokens at the exits."""
  backbone = vit.ViT(width=32, depth=4, mlp_dim=64, num_heads=2, posemb_grid=(4, 4))
  kw = dict(merge=merge, buckets=buckets, exit_layers=(1, 2), exit_threshold=tau,
            exit_mode=mode, exit_buckets=(0.5, 0.75, 1.0), exit_head=design)
  head = lambda stages, binary: atm.ATMHead(num_classes=4, dim=32, num_heads=4, num_layers=1,
                                            num_stages=stages, binary_cls=binary)
  if design == "segvit":
    return segmenter.Segmenter(backbone, head(3, False), (2, 3, 4), **kw)
  if design == "atm_shallow_first":
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
  assert_close(conf, probs.max(1), 1e-6)
  np.testing.assert_array_equal(pred, probs.argmax(1))
  binary = jnp.stack([cls[..., 0], cls[..., 1]], -1)
  assert_close(early_exit.class_presence(binary), jax.nn.softmax(binary, -1)[..., 0], 1e-6)


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


def test_segvit_exits_at_threshold_one_are_segvit():
  """Nothing halts: the default design's outputs are SegViT's (the model without exits, the
  same variables), in place and compacted."""
  images, params = _images(), _params("segvit")
  segvit = jax.jit(make_model(design="segvit").clone(exit_layers=()).apply)
  ref, _ = segvit(params, images)
  for mode in ("mask", "compact"):
    out, info = forward(mode, 1.0, design="segvit")(params, images)
    assert np.all(np.asarray(info["halt_stage"]) == 2)          # nobody halted
    for key in ("pred_masks", "pred_logits"):
      assert_close(out[key], ref[key], 1e-5, what=f"{mode} {key}")
    # SegViT's deep supervision follows the exits' predictions in aux.
    for a, r in zip(out["aux"][2:], ref["aux"]):
      assert_close(a["pred_masks"], r["pred_masks"], 1e-5, what=f"{mode} aux")


def test_segvit_design_halted_tokens_carry_their_exit_features():
  """With halting, the prediction is SegViT's head over features in which a token halted at
  exit s keeps its layer-(exit s) features for every later out_layer, and later blocks run
  with halted tokens out of the keys (the halt map taken from the model)."""
  images, params = _images(), _params("segvit")
  tau = _median_tau(params, images, "segvit")
  out, info = forward("compact", tau, design="segvit")(params, images)
  halt = np.asarray(info["halt_stage"]).reshape(2, -1)
  assert np.any(halt == 0) and np.any(halt == 1) and np.any(halt == 2)

  def manual(mdl, im, halt):
    x = mdl.backbone.embed(mdl.normalize(im))
    b, gh, gw, d = x.shape
    x, active, feats = x.reshape(b, gh * gw, d), jnp.ones(halt.shape, bool), {}
    for k in range(mdl.backbone.depth):
      y = mdl.backbone.run_blocks(x, active, k, k + 1)[-1]
      x = jnp.where(active[..., None], y, x)
      feats[k + 1] = x
      if k + 1 in mdl.exit_layers:
        active = active & (halt != mdl.exit_layers.index(k + 1))
    return mdl.head([feats[l] for l in mdl.out_layers])
  ref = jax.jit(functools.partial(make_model(design="segvit").apply, method=manual))(
      params, images, jnp.asarray(halt))
  assert_close(out["pred_masks"].reshape(ref["pred_masks"].shape), ref["pred_masks"], 1e-5,
               what="masks")
  assert_close(out["pred_logits"], ref["pred_logits"], 1e-5, what="class logits")


@pytest.mark.parametrize("design", ["dtop", pytest.param("atm_shallow_first",
                                                      marks=pytest.mark.slow)])
def test_threshold_one_is_exactly_the_no_exit_model(design):
  """The other designs at τ = 1 against what they compute: DToP's final head on the last
  block; SegViT's stages shallowest first (not SegViT's head)."""
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
  assert_close(out["pred_masks"].reshape(ref["pred_masks"].shape), ref["pred_masks"], 1e-5,
               what="masks")
  assert_close(out["pred_logits"], ref["pred_logits"], 1e-5, what="class logits")
  compact, _ = forward("compact", 1.0, design=design)(params, images)
  assert_close(compact["pred_masks"], out["pred_masks"], 1e-5, what="compact masks")


def _check_compact_equals_mask(images, merge="none", buckets=(1.0,), design="dtop"):
  params = _params(design)
  labels = _labels(images) if merge == "oracle" else None
  tau = _median_tau(params, images, design)
  masked, info_m = forward("mask", tau, merge, buckets, design)(params, images, labels)
  compact, info_c = forward("compact", tau, merge, buckets, design)(params, images, labels)
  halted = np.asarray(info_m["halt_stage"]) < 2
  assert 0 < halted.mean() < 1, halted.mean()                # the test exercises halting
  np.testing.assert_array_equal(info_m["halt_stage"], info_c["halt_stage"])
  assert_close(compact["pred_masks"], masked["pred_masks"], 1e-5)
  assert_close(compact["pred_logits"], masked["pred_logits"], 1e-5)
  for a, b in zip(compact["aux"], masked["aux"]):
    assert_close(a["pred_masks"], b["pred_masks"], 1e-5)
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


@pytest.mark.parametrize("design", LIGHT)
@pytest.mark.parametrize("capacity", [None, 48])
def test_halted_tokens_never_influence_later_layers(capacity, design):
  """Segment 2 (block 2 and its head stage) run on inputs whose halted rows are garbage gives
  the same active outputs, queries and class logits."""
  m = make_model(design=design)
  segment = lambda mdl, x, a: mdl.run_segment(
      x, mdl.head.initial_queries(2) if design == "atm_shallow_first" else None, a, 1, 2,
      ((1, 2),), capacity, False)
  stage2 = jax.jit(functools.partial(m.apply, method=segment))
  x = jax.random.normal(jax.random.key(1), (2, 48, 32))
  active = jax.random.uniform(jax.random.key(2), (2, 48)) < 0.5
  garbage = jnp.where(active[..., None], x, 1e3 * jax.random.normal(jax.random.key(3), x.shape))
  y1, q1, [(c1, m1)], k1 = stage2(_params(design), x, active)
  y2, q2, [(c2, m2)], k2 = stage2(_params(design), garbage, active)
  a = np.asarray(active)
  assert_close(np.asarray(y2)[a], np.asarray(y1)[a], 1e-5)
  np.testing.assert_array_equal(np.asarray(y2)[~a], np.asarray(garbage)[~a])  # kept as halted
  assert_close(c2, c1, 1e-5)
  if design == "atm_shallow_first":
    assert_close(q2, q1, 1e-5)
  assert len(k1) == (1 if design == "segvit" else 0)   # 'segvit' keeps out_layer 2
  for f1, f2 in zip(k1, k2):
    assert_close(np.asarray(f2)[a], np.asarray(f1)[a], 1e-5)
  assert_close(np.swapaxes(np.asarray(m2), 1, 2)[a], np.swapaxes(np.asarray(m1), 1, 2)[a], 1e-5)


@pytest.mark.parametrize("design", LIGHT)
def test_canvas_keeps_exit_logits_for_halted_tokens_and_jit_once(design):
  images, params = _images(), _params(design)
  tau = _median_tau(params, images, design)
  fwd = forward("compact", tau, design=design)
  out, info = fwd(params, images)
  hs = np.asarray(info["halt_stage"]).reshape(2, -1)
  first = np.asarray(out["aux"][0]["pred_masks"]).reshape(2, 4, -1)
  # 'segvit': the exits' canvas (aux[1]); the final head re-reads halted tokens' features.
  final = np.asarray((out["aux"][1] if design == "segvit" else out)["pred_masks"])
  final = final.reshape(2, 4, -1)
  assert np.any(hs == 0)
  for b in range(2):
    assert_close(final[b][:, hs[b] == 0], first[b][:, hs[b] == 0], 1e-6)
    if design == "atm_shallow_first":  # active tokens got the later stages added
      assert rel_diff(final[b][:, hs[b] == 2], first[b][:, hs[b] == 2]) > 1e-2
  fwd(params, _images(seed=9))                          # other images: no retrace
  assert fwd._cache_size() == 1


@pytest.mark.parametrize("design", HEAVY)
def test_differentiable_through_compaction(design):
  """Gradients through compaction reach every block and the exits. 'segvit': the loss on the
  exits' predictions alone (the same program) reaches SegViT's stage 0 and the blocks up to
  the last exit (it would not with the exits detached), and no block after it."""
  images, params = _images(), _params(design)
  m = make_model("compact", _median_tau(params, images, design), design=design)

  def losses(p):
    out, _ = m.apply(p, images)
    exits = out["aux"][:len(m.exit_layers)]
    return jnp.stack([
        jnp.sum(out["pred_masks"] ** 2) + sum(jnp.sum(a["pred_masks"]) for a in out["aux"]),
        sum(jnp.sum(jnp.tanh(a["pred_masks"])) + jnp.sum(a["pred_logits"] ** 2) for a in exits)])
  jac = jax.jit(jax.jacrev(losses))(params)["params"]
  g, g_exits = jax.tree.map(lambda l: l[0], jac), jax.tree.map(lambda l: l[1], jac)
  nonzero = lambda tree: any(np.any(np.asarray(l) != 0) for l in jax.tree.leaves(tree))
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(jac))
  assert np.any(np.asarray(g["backbone"]["blocks_3"]["mlp"]["fc2"]["kernel"]) != 0)
  exit_params = g["exit_heads_0"] if design == "dtop" else g["head"]["decoder_0_0"]
  assert nonzero(exit_params)
  if design == "segvit":
    assert nonzero(g_exits["head"]["decoder_0_0"]) and nonzero(g_exits["head"]["input_proj_0"])
    assert nonzero(g_exits["backbone"]["blocks_0"]) and nonzero(g_exits["backbone"]["blocks_1"])
    assert not nonzero(g_exits["backbone"]["blocks_2"])
    assert not nonzero(g_exits["head"]["decoder_1_0"])
