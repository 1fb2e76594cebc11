"""model.scan_blocks: the encoder's blocks as one lax.scan at inference (one compiled block
per bucket program) gives the model's own outputs, with buckets, supertokens and exits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close  # tests/numerics.py

from step_jax.models import capacity
from step_jax.models import supertokens
from step_jax.models import vit


def test_scanned_blocks_equal_the_unrolled_blocks_with_a_key_mask():
  m = vit.ViT(width=32, depth=4, mlp_dim=64, num_heads=2, posemb_grid=(4, 4))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 16)) > 0.3)
  run = lambda mod, x, k: mod.run_blocks(x, k, 1, 4)
  v = m.init(jax.random.key(0), x, mask, method=lambda mod, x, k: mod.run_blocks(x, k))
  want = m.apply(v, x, mask, method=run)
  got = m.clone(scan_blocks=True).apply(v, x, mask, method=run)
  assert len(got) == len(want) == 3
  for a, b in zip(want, got):
    assert_close(b, a, 1e-5)
  # Training ignores the flag (dropout / stochastic depth need per-block rngs).
  train = m.clone(scan_blocks=True).apply(v, x, mask, method=lambda mod, x, k: mod.run_blocks(
      x, k, 1, 4, train=True))
  np.testing.assert_array_equal(train[-1], want[-1])


def test_scanned_step_model_matches_the_unrolled_one():
  """dCTS supertokens in capacity buckets + an exit compacting into buckets, SegViT exits."""
  from test_early_exit import make_model  # pylint: disable=g-import-not-at-top
  model = make_model("compact", tau=0.5, merge="oracle", buckets=(0.5, 1.0), design="segvit")
  model = model.clone(exit_buckets=(0.5, 1.0))   # two capacities per switch: fewer programs
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.integers(0, 255, (2, 64, 64, 3)), jnp.float32)
  labels = jnp.asarray(np.repeat(np.repeat(rng.integers(0, 3, (2, 8, 8)), 8, 1), 8, 2))
  init_model = model.clone(buckets=(1.0,), exit_mode="mask")   # same params, no switches
  variables = jax.jit(lambda k: init_model.init(k, images, labels=labels))(jax.random.key(0))
  run = lambda m: jax.jit(lambda v, x, y: m.apply(v, x, labels=y))(variables, images, labels)
  (out_a, info_a), (out_b, info_b) = run(model), run(
      model.clone(backbone=model.backbone.clone(scan_blocks=True)))
  np.testing.assert_array_equal(info_a["halt_stage"], info_b["halt_stage"])
  assert_close(out_b["pred_masks"], out_a["pred_masks"], 1e-5)
  assert_close(out_b["pred_logits"], out_a["pred_logits"], 1e-5)


def test_geometric_buckets():
  b = capacity.geometric_buckets(1.1, 0.1)
  assert b[0] == 0.1 and b[-1] == 1.0 and len(b) == 26
  assert all(1.0 < hi / lo <= 1.1 + 1e-4 for lo, hi in zip(b[:-2], b[1:-1]))
  caps = supertokens.bucket_capacities(4096, b)
  # Above the smallest bucket, the chosen capacity never exceeds 1.1x the tokens (+ rounding).
  for n in (500, 1687, 2500, 4000):
    cap = caps[int(supertokens.bucket_index(jnp.asarray([n]), caps))]
    assert n <= cap <= 1.1 * n + 16
  with pytest.raises(ValueError, match="ratio > 1"):
    capacity.geometric_buckets(1.0)
