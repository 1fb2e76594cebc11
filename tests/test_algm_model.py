"""method=algm: ALGM's merges inside the ViT (models/algm_encoder.py) on a tiny Mu/16 model at
64x96 (a 4x6 grid: capacities 8, 16, 24)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs import step as step_config
from numerics import assert_close
from step_jax.evaluation import tokens as tokens_lib
from step_jax.models import builder
from step_jax.models import flops
from step_jax.models import variables as variables_lib

HW, GRID, N = (64, 96), (4, 6), 24


def _config(**model):
  config = common.ml_collections.ConfigDict(dict(num_classes=4))
  config.data = common.ml_collections.ConfigDict(dict(image_size=HW))
  config.model = common.model_config("Mu/16", 64)
  step_config.set_method(config.model, "algm", "Mu/16")
  config.model.update(buckets=(0.25, 0.5, 0.75, 1.0), head_layers=1, **model)
  return config


def _build(config):
  return builder.build(config.model, config.num_classes, HW)


@functools.lru_cache(maxsize=None)
def _variables():
  return variables_lib.random_variables(_build(_config()), HW)


def _images():
  """Noise but for flat regions: image 0 flat (its 6 2x2 windows merge), image 1 on its top
  half (3 windows), image 2 nowhere, image 3 on its left 4 columns (4 windows)."""
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, (4, *HW, 3)).astype(np.float32)
  images[0] = 90.0
  images[1, :32] = 200.0
  images[3, :, :64] = 30.0
  return jnp.asarray(images)


def _same_outputs(a, b, rel):
  assert_close(a["pred_logits"], b["pred_logits"], rel, what="pred_logits")
  assert_close(a["pred_masks"], b["pred_masks"], rel, what="pred_masks")
  for i, (x, y) in enumerate(zip(a["aux"], b["aux"])):
    assert_close(x["pred_masks"], y["pred_masks"], rel, what=f"aux {i}")


def test_thresholds_above_one_give_segvit_exactly():
  """Nothing merges: SegViT with the same variables, with out_layers before, between and
  after the merges (blocks 1, 2, 4 around merges in blocks 2 and 3)."""
  config = _config(algm_layers=(2, 3), out_layers=(1, 2, 4), algm_threshold=1.01,
                   algm_global_min=1.01)
  model = _build(config)
  segvit = model.clone(merge="none")
  variables = variables_lib.random_variables(model, HW)
  images = _images()
  ref, _ = jax.jit(segvit.apply)(variables, images)
  out, info = jax.jit(model.apply)(variables, images)
  np.testing.assert_array_equal(info["algm_tokens"], np.full((4, 2), N))
  np.testing.assert_array_equal(info["algm_capacity"], [N, N])
  _same_outputs(out, ref, 1e-5)


def test_bucketed_equals_full_capacity_and_per_image_counts():
  """The capacities chosen on device (the smallest bucket that holds the batch's largest
  count) give the outputs of both merged segments run at the full capacity; every cell
  maps to a valid token; batch_min merges what the batch's fewest-merging image does."""
  model, variables, images = _build(_config()), _variables(), _images()[:2]
  out, info = jax.jit(model.apply)(variables, images)
  full, full_info = jax.jit(functools.partial(model.apply, capacity=N))(variables, images)
  counts = np.asarray(info["algm_tokens"])
  np.testing.assert_array_equal(counts, full_info["algm_tokens"])
  assert counts[0, 0] == N - 3 * 6 and counts[1, 0] == N - 3 * 3     # 6 and 3 windows merge
  assert (counts[:, 1] < counts[:, 0]).all()                         # the global merge too
  caps = np.asarray(info["algm_capacity"])
  assert caps.tolist() == [min(c for c in (8, 16, 24) if c >= counts[:, s].max())
                           for s in (0, 1)] and caps[0] < N
  _same_outputs(out, full, 1e-5)
  for key, col in (("algm_source_local", 0), ("algm_source", 1)):   # cell → slot maps
    source = np.asarray(info[key]).reshape(2, -1)
    for b in range(2):   # onto the image's tokens: every slot below its count covers a cell
      np.testing.assert_array_equal(np.unique(source[b]), np.arange(counts[b, col]))
  local = np.asarray(info["algm_source_local"])[0]   # the flat image: one token per window
  assert len(np.unique(local[:2, :2])) == 1 and local[0, 0] != local[0, 2]

  batch_min, bm_info = jax.jit(_build(_config(algm_batch_min=True)).apply)(variables, images)
  bm_counts = np.asarray(bm_info["algm_tokens"])
  assert bm_counts[:, 0].tolist() == [N - 3 * 3] * 2   # 3 windows each: image 1's count
  assert bm_counts[0, 1] == bm_counts[1, 1] < bm_counts[0, 0]   # one global count too
  assert np.isfinite(np.asarray(batch_min["pred_masks"])).all()


def test_gradient_reaches_the_vit_through_padded_merges():
  """train=True, jitted, both merged segments in 16 slots (flat images merge to fewer): the
  ViT's parameters get finite, non-zero gradients through the merged values."""
  model, variables = _build(_config()), _variables()
  images = _images()[jnp.array([0, 3])]

  def loss(params):
    out, info = model.apply(dict(variables, params=params), images, train=True, capacity=16,
                            rngs={"dropout": jax.random.key(0)})
    return jnp.sum(out["pred_masks"] ** 2) + jnp.sum(out["pred_logits"] ** 2), info
  grads, info = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  assert int(np.max(info["algm_tokens"])) <= 16
  for name in ("embedding", "pos_embedding", "blocks_0", "blocks_1", "blocks_3"):
    leaves = jax.tree.leaves(grads["backbone"][name])
    assert all(np.isfinite(l).all() for l in leaves), name
    assert any(np.any(np.asarray(l) != 0) for l in leaves), name


def _block(n_attn, n_mlp, d=64, mlp=256):
  """One pre-norm block, attention on n_attn tokens and MLP on n_mlp (fvcore's convention:
  LayerNorm 5 per element, one per multiply-add)."""
  return 5 * n_attn * d + 4 * n_attn * d * d + 2 * n_attn * n_attn * d + \
      5 * n_mlp * d + 2 * n_mlp * d * mlp


def test_flops_count_each_segment_at_its_real_tokens():
  """image_tokens (what evaluation and the benchmark report) against a hand count: blocks 1
  and 2 split at the merges, the global matching (|A|·|B|·D), the head on the full grid."""
  config = _config()
  model, variables, images = _build(config), _variables(), _images()[:2]
  _, info = jax.jit(model.apply)(variables, images)
  segvit = flops.token_macs(_with(config, merge="none"), N)
  for j in range(2):
    n1, n2 = (int(t) for t in np.asarray(info["algm_tokens"])[j])
    c1, c2 = (int(c) for c in np.asarray(info["algm_capacity"]))
    row = tokens_lib.image_tokens(config, model, info, j)
    assert row["tokens"] == [N, n1, n2] and row["capacity"] == [N, c1, c2]
    for key, (a, b) in (("useful", (n1, n2)), ("executed", (c1, c2))):
      blocks = _block(N, a) + _block(a, b) + 2 * _block(b, b) + -(-a // 2) * (a // 2) * 64
      backbone = (N * 16 * 16 * 3 * 64 + blocks) / 1e9
      assert_close(row[key]["backbone"], backbone, 1e-12, what=key)
      assert_close(row[key]["heads"], segvit["heads"], 1e-12, what=key)
  full = _block(N, N) * 4 + (N // 2) ** 2 * 64 + N * 16 * 16 * 3 * 64
  assert_close(flops.token_macs(config, N)["backbone"], full / 1e9, 1e-12)


def _with(config, **model):
  out = config.copy_and_resolve_references()
  out.model.update(model)
  return out


@pytest.mark.parametrize("key, value, match", [
    ("algm_layers", (2, 1), r"algm_layers=\(2, 1\)"),
    ("algm_layers", (1, 5), "depth 4"),
    ("algm_layers", (1,), "two 1-based blocks"),
    ("algm_threshold", 90, "algm_threshold=90.*e.g. 0.9"),
    ("algm_global_min", "high", "algm_global_min='high'"),
    ("algm_batch_min", "yes", "algm_batch_min='yes'"),
    ("exit_layers", (1,), "at or after the global merge's block 2"),
])
def test_bad_algm_config_is_a_clear_error(key, value, match):
  model = common.ml_collections.ConfigDict(_config().model.to_dict(), type_safe=False)
  model[key] = value
  with pytest.raises(ValueError, match=match):
    builder.build(model, 4, HW)


def test_camvid_config_builds_algm_with_the_variant_defaults():
  from configs import camvid
  config = camvid.get_config("method=algm,size=cpu,variant=Ti/16")
  model = builder.build(config.model, config.num_classes, config.data.image_size)
  assert (model.merge, tuple(model.algm_layers), model.algm_threshold) == ("algm", (1, 5), 0.9)
  assert not model.algm_batch_min and not model.exit_layers
