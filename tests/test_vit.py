import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close, rel_diff  # tests/numerics.py

from step_jax.models import vit


def tiny(**kw):
  cfg = dict(width=32, depth=3, mlp_dim=64, num_heads=2, posemb_grid=(4, 4))
  cfg.update(kw)
  return vit.ViT(**cfg)


def test_decode_variant():
  assert vit.decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                            patch_size=16)
  assert vit.decode_variant("L/16")["depth"] == 24
  with pytest.raises(ValueError, match="unknown ViT variant"):
    vit.decode_variant("H/14x")


def test_shapes_and_intermediates():
  m = tiny()
  x = jax.random.normal(jax.random.key(0), (2, 48, 80, 3))
  params = jax.jit(m.init)(jax.random.key(1), x)   # (eagerly every op compiles alone)
  y, outs = jax.jit(m.apply)(params, x)
  assert y.shape == (2, 3, 5, 32)
  assert len(outs) == 3 and outs[-1].shape == (2, 15, 32)
  np.testing.assert_array_equal(outs[-1].reshape(y.shape), y)  # final_norm=False


def test_rejects_sizes_off_the_patch_grid():
  m = tiny()
  with pytest.raises(ValueError, match="not a multiple of the patch size"):
    m.init(jax.random.key(0), jnp.zeros((1, 40, 48, 3)))


def test_patch_embedding_equals_strided_conv():
  m = tiny()
  x = jax.random.normal(jax.random.key(0), (1, 32, 48, 3))
  params = jax.jit(m.init)(jax.random.key(1), x)
  tokens = m.apply(params, x, method=lambda mod, im: mod.embed_patches(mod.patchify(im)))
  k = params["params"]["embedding"]["kernel"].reshape(16, 16, 3, 32)  # HWIO
  conv = jax.lax.conv_general_dilated(x, k, (16, 16), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  conv = conv + params["params"]["embedding"]["bias"]
  assert_close(tokens, conv, 1e-5)   # a matmul against XLA's convolution


def test_posemb_resample_identity_and_smoothness():
  m = tiny()
  params = jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  same = m.apply(params, (4, 4), method=lambda mod, g: mod.posemb(g))
  np.testing.assert_array_equal(same, params["params"]["pos_embedding"])
  big = m.apply(params, (8, 12), method=lambda mod, g: mod.posemb(g))
  assert big.shape == (8, 12, 32)
  # A constant embedding stays constant under (partition-of-unity) bicubic resampling.
  const = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.ones_like(v) if p[-1].key == "pos_embedding" else v, params)
  assert_close(m.apply(const, (7, 9), method=lambda mod, g: mod.posemb(g)),
               np.ones((7, 9, 32)), 1e-6)


def test_key_mask_makes_padding_invisible():
  """Padded tokens (any values) behind a False key mask never change valid outputs."""
  m = tiny()
  x = jax.random.normal(jax.random.key(0), (2, 10, 32))
  params = jax.jit(m.init)(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
  run = jax.jit(lambda t, mask: m.apply(params, t, mask,
                                        method=lambda mod, a, b: mod.run_blocks(a, b)))
  ref = run(x, None)[-1]
  pad = jax.random.normal(jax.random.key(2), (2, 6, 32)) * 100
  mask = jnp.concatenate([jnp.ones((2, 10), bool), jnp.zeros((2, 6), bool)], 1)
  out = run(jnp.concatenate([x, pad], 1), mask)[-1]
  assert_close(out[:, :10], ref, 1e-5)


def test_drop_path_train_vs_eval():
  m = tiny(drop_path=0.5)
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  params = jax.jit(m.init)(jax.random.key(1), x)
  apply = jax.jit(m.apply, static_argnames="train")
  e1, _ = apply(params, x)
  e2, _ = apply(params, x)
  np.testing.assert_array_equal(e1, e2)
  t1, _ = apply(params, x, train=True, rngs={"dropout": jax.random.key(3)})
  assert rel_diff(t1, e1) > 0.1


def test_remat_same_values_and_grads():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  plain, remat = tiny(), tiny(remat=True)
  params = jax.jit(plain.init)(jax.random.key(1), x)   # jitted: eagerly every op compiles
  f = lambda m: lambda p: jnp.sum(m.apply(p, x)[0] ** 2)
  (v1, g1), (v2, g2) = [jax.jit(jax.value_and_grad(f(m)))(params) for m in (plain, remat)]
  assert_close(v1, v2, 1e-6)
  # Compiled, the two programs fuse differently: gradients up to ~1e2 differ in rounding.
  assert_close(g2, g1, 1e-5, what="grads")


def test_bf16_close_to_fp32():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = jax.jit(tiny().init)(jax.random.key(1), x)
  y32, _ = jax.jit(tiny().apply)(params, x)
  y16, _ = jax.jit(tiny(dtype=jnp.bfloat16).apply)(params, x)
  assert y16.dtype == jnp.bfloat16
  assert_close(y16, y32, 0.1)   # bf16 activations through 3 blocks (~1 % measured)
