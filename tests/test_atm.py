import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close, rel_diff  # tests/numerics.py

from step_jax.models import atm


def _feats(b=2, n=12, d=24, stages=3, seed=0):
  keys = jax.random.split(jax.random.key(seed), stages)
  return [jax.random.normal(k, (b, n, d)) for k in keys]


def _head(**kw):
  cfg = dict(num_classes=5, dim=32, num_heads=4, num_layers=2, num_stages=3)
  cfg.update(kw)
  return atm.ATMHead(**cfg)


def test_shapes_segvit_and_dtop():
  feats = _feats()
  head = _head()
  params = head.init(jax.random.key(1), feats)
  out = head.apply(params, feats)
  assert out["pred_logits"].shape == (2, 5, 6)  # C+1, no-object last
  assert out["pred_masks"].shape == (2, 5, 12)
  assert len(out["aux"]) == 2
  dtop = _head(binary_cls=True, num_stages=1)
  out = dtop.apply(dtop.init(jax.random.key(1), feats[-1:]), feats[-1:])
  assert out["pred_logits"].shape == (2, 5, 2) and out["aux"] == []


def test_wrong_number_of_stages_is_an_error():
  head = _head()
  with pytest.raises(ValueError, match="expects 3 feature maps"):
    head.init(jax.random.key(0), _feats(stages=2))


def test_stages_run_deepest_first_and_masks_accumulate():
  feats = _feats()
  head = _head()
  params = head.init(jax.random.key(1), feats)
  out, state = head.apply(params, feats, mutable="intermediates")
  stage = state["intermediates"]["stage_logits"]
  # Masks are cumulative sums of per-stage (last-layer, head-averaged) logits.
  assert_close(out["aux"][0]["pred_masks"], stage[0], 1e-6)
  assert_close(out["aux"][1]["pred_masks"], stage[0] + stage[1], 1e-6)
  assert_close(out["pred_masks"], stage[0] + stage[1] + stage[2], 1e-6)
  # Stage 0 reads the deepest features only: changing the shallowest leaves it untouched,
  # and changing the deepest changes it.
  shallow = [feats[0] + 5.0] + feats[1:]
  out2 = head.apply(params, shallow)
  assert_close(out2["aux"][0]["pred_masks"], out["aux"][0]["pred_masks"], 1e-6)
  assert rel_diff(out2["pred_masks"], out["pred_masks"]) > 0.01
  deep = feats[:2] + [feats[2] + 5.0]
  assert rel_diff(head.apply(params, deep)["aux"][0]["pred_masks"],
                  out["aux"][0]["pred_masks"]) > 0.01


def test_queries_carry_over_between_stages():
  """Stage 1's class logits depend on the deepest features through the carried queries."""
  feats = _feats()
  head = _head()
  params = head.init(jax.random.key(1), feats)
  out = head.apply(params, feats)
  # Other deepest features, not a multiple of them: the input LayerNorm undoes a scale
  # (doubling them moved these logits by 4e-6 of their size, rounding; new ones by ~1e-2).
  out2 = head.apply(params, feats[:2] + [_feats(seed=1)[2]])
  assert rel_diff(out2["aux"][1]["pred_logits"], out["aux"][1]["pred_logits"]) > 1e-3


def test_mask_logits_are_pre_softmax_head_average():
  """masks = mean over heads of (q Wq)(m Wk)ᵀ / sqrt(d_head), before any softmax."""
  feats = _feats(stages=1)
  head = _head(num_heads=4, num_layers=1, num_stages=1)
  params = head.init(jax.random.key(1), feats)
  out, state = head.apply(params, feats, capture_intermediates=True)
  inter = state["intermediates"]
  q_in = inter["decoder_0_0"]["norm1"]["__call__"][0]        # queries entering cross-attn
  mem = inter["proj_norm_0"]["__call__"][0]
  ca = params["params"]["decoder_0_0"]["cross_attn"]
  q = (q_in @ ca["q"]["kernel"] + ca["q"]["bias"]).reshape(2, 5, 4, 8)
  k = (mem @ ca["k"]["kernel"] + ca["k"]["bias"]).reshape(2, 12, 4, 8)
  want = np.einsum("bqhd,bkhd->bhqk", q, k).mean(1) / np.sqrt(8)
  assert_close(out["pred_masks"], want, 1e-5)
  assert np.any(np.asarray(out["pred_masks"]) < 0)  # logits, not probabilities


def test_key_mask_hides_padded_memory_tokens():
  feats = _feats(n=10)
  head = _head()
  params = head.init(jax.random.key(1), feats)
  ref = head.apply(params, feats)
  padded = [jnp.concatenate([f, 50 * jnp.ones((2, 4, 24))], 1) for f in feats]
  mask = jnp.arange(14)[None, :].repeat(2, 0) < 10
  out = head.apply(params, padded, mask)
  assert_close(out["pred_logits"], ref["pred_logits"], 1e-5)
  assert_close(out["pred_masks"][..., :10], ref["pred_masks"], 1e-5)


def test_semantic_scores_formulas():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 5)).astype(np.float32)   # Q=4 classes + no-object
  masks = rng.normal(size=(2, 4, 3, 3)).astype(np.float32)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  sig = 1 / (1 + np.exp(-masks))
  want = np.einsum("bqc,bqhw->bchw", p[..., :-1], sig)     # no-object column dropped
  assert_close(atm.semantic_scores(logits, masks), want, 1e-5)
  binary = rng.normal(size=(2, 4, 2)).astype(np.float32)
  pb = np.exp(binary) / np.exp(binary).sum(-1, keepdims=True)
  assert_close(atm.semantic_scores(binary, masks), pb[..., 0, None, None] * sig, 1e-5)
