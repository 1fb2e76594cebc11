"""ViT self-attention through jax.nn.dot_product_attention ('xla'; cuDNN on a GPU) gives the
written-out einsum reference's outputs and gradients, with padding and halted tokens."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close  # tests/numerics.py

from step_jax.models import atm
from step_jax.models import attention
from step_jax.models import early_exit
from step_jax.models import segmenter
from step_jax.models import vit


def test_resolve_impl():
  gpu = jax.default_backend() == "gpu"
  assert attention.resolve_impl("auto", jnp.float32, 64) == ("xla" if gpu else "einsum")
  assert attention.resolve_impl("auto", jnp.bfloat16, 64) == ("cudnn" if gpu else "einsum")
  assert attention.resolve_impl("auto", jnp.bfloat16, 60) == ("xla" if gpu else "einsum")
  assert attention.resolve_impl("xla", jnp.bfloat16, 64) == "xla"
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    attention.resolve_impl("flash", jnp.float32, 64)


@pytest.mark.parametrize("masked", [False, True])
def test_fused_equals_einsum_with_key_mask_and_gradients(masked):
  x = jax.random.normal(jax.random.key(0), (2, 24, 32))
  key_mask = (jax.random.uniform(jax.random.key(1), (2, 24)) < 0.6) if masked else None
  make = lambda impl: attention.SelfAttention(4, impl=impl)
  params = make("einsum").init(jax.random.key(2), x, key_mask)

  def loss(impl, p, x):
    y = make(impl).apply(p, x, key_mask)
    return jnp.sum(jnp.sin(y)), y
  (l1, y1), g1 = jax.value_and_grad(functools.partial(loss, "einsum"), (0, 1), has_aux=True)(
      params, x)
  (l2, y2), g2 = jax.value_and_grad(functools.partial(loss, "xla"), (0, 1), has_aux=True)(
      params, x)
  assert_close(y2, y1, 1e-5)
  assert_close(g2, g1, 1e-5, what="grads")
  if masked:  # masked keys have no influence, in both paths
    garbage = jnp.where(key_mask[..., None], x, 100.0)
    y3 = make("xla").apply(params, garbage, key_mask)
    keep = np.asarray(key_mask)
    assert_close(np.asarray(y3)[keep], np.asarray(y2)[keep], 1e-5)


def test_fused_path_refuses_attention_dropout_in_training():
  x = jnp.ones((1, 4, 8))
  layer = attention.SelfAttention(2, dropout=0.1, impl="xla")
  params = layer.init(jax.random.key(0), x)
  layer.apply(params, x)                                   # inference: fine
  with pytest.raises(ValueError, match="no dropout on the attention weights"):
    layer.apply(params, x, train=True, rngs={"dropout": jax.random.key(1)})


def _model(impl, merge="none", exits=(), mode="compact", tau=1.0, dtype=jnp.float32,
           design="dtop", one_bucket=False):
  backbone = vit.ViT(width=32, depth=4, mlp_dim=64, num_heads=2, posemb_grid=(4, 4),
                     attention_impl=impl, dtype=dtype)
  head = lambda stages, binary: atm.ATMHead(num_classes=4, dim=32, num_heads=4, num_layers=1,
                                            num_stages=stages, binary_cls=binary, dtype=dtype)
  kw = dict(merge=merge, buckets=(1.0,) if one_bucket else (0.5, 1.0), exit_layers=exits,
            exit_threshold=tau, exit_mode=mode, exit_buckets=(0.5, 1.0), exit_head=design)
  if not exits or design == "segvit":
    return segmenter.Segmenter(backbone, head(3, False), (1, 2, 4), **kw)
  return segmenter.Segmenter(backbone, head(1, True), (4,),
                             exit_heads=tuple(head(1, True) for _ in exits), **kw)


def _images(b=2, h=64, w=96):
  return jax.random.uniform(jax.random.key(4), (b, h, w, 3), minval=0, maxval=255)


def _labels():
  lab = np.zeros((2, 64, 96), np.int32)
  lab[:, 32:] = 1
  lab[:, :, :24] = 2
  return jnp.asarray(lab)


CASES = {  # name: model kwargs (SegViT; dCTS-like padded buckets; DToP; STEP)
    "segvit": dict(),
    "supertokens": dict(merge="oracle"),
    "dtop_mask": dict(exits=(1, 2), mode="mask"),
    "dtop_compact": dict(exits=(1, 2), mode="compact"),
    "step_segvit": dict(merge="oracle", exits=(2,), mode="compact", design="segvit"),
}


def _slow(*names):  # bucket switches compile for minutes on 2 cores; step_segvit covers both
  return [pytest.param(n, marks=pytest.mark.slow) if n in names else n for n in sorted(CASES)]


# The default run compares the models' outputs with halting masks (dtop_mask); the gradients
# are checked at the layer level above (with a key mask), the models' with -m slow.
@pytest.mark.parametrize("case", _slow("segvit", "supertokens", "dtop_compact", "step_segvit"))
def test_fused_model_equals_einsum_model(case):
  _compare(CASES[case], grads=False)


@pytest.mark.parametrize("case", _slow(*CASES))
def test_fused_model_gradients_equal_einsum_model(case):
  _compare(CASES[case], grads=True)


def _compare(kw, grads):
  """The fused and einsum models give the same outputs (and, with `grads`, the same
  gradients: then outputs and gradients come from one program per model)."""
  images, labels = _images(), _labels()
  # Compiled (eagerly every op of the init compiles on its own), without bucket switches:
  # one capacity and masked exits have the same parameters.
  simple = _model("einsum", **dict(kw, mode="mask", one_bucket=True))
  params = jax.jit(lambda k: simple.init(k, images, labels=labels))(jax.random.key(0))
  if "exits" in kw:  # τ = the median first-exit confidence: about half of the tokens halt
    aux = jax.jit(simple.apply)(params, images, labels=labels)[0]["aux"][0]
    conf, _ = early_exit.token_confidence(
        aux["pred_logits"], aux["pred_masks"].reshape(aux["pred_masks"].shape[:2] + (-1,)))
    kw = dict(kw, tau=float(np.median(np.asarray(conf))))
  ref, fused = _model("einsum", **kw), _model("xla", **kw)

  def loss(model, p):
    out, info = model.apply(p, images, labels=labels)
    return jnp.mean(jnp.tanh(out["pred_masks"])) + jnp.mean(out["pred_logits"] ** 2), (out, info)
  if grads:
    run = lambda m: jax.jit(jax.grad(functools.partial(loss, m), has_aux=True))(params)
  else:
    run = lambda m: (None, jax.jit(lambda p: loss(m, p)[1])(params))
  (g1, (o1, i1)), (g2, (o2, i2)) = run(ref), run(fused)
  if "exits" in kw:  # the same tokens halted, so the comparison covers halting
    np.testing.assert_array_equal(i1["halt_stage"], i2["halt_stage"])
    assert 0 < np.mean(np.asarray(i1["halt_stage"]) < len(kw["exits"])) < 1
  if kw.get("merge"):
    assert np.all(np.asarray(i1["num_tokens"]) < 24)      # padded buckets in use
  assert_close(o2["pred_masks"], o1["pred_masks"], 1e-5)
  assert_close(o2["pred_logits"], o1["pred_logits"], 1e-5)
  if grads:
    assert_close(g2, g1, 1e-5, what="grads")


def test_fused_bf16_agrees_with_fp32_einsum():
  """bf16 on the fused path within the project's stated bf16 tolerances (tests/
  test_bad_input.py): logits within 2 % of their largest fp32 magnitude."""
  images = _images()
  params = jax.jit(_model("einsum").init)(jax.random.key(0), images)
  o32, _ = jax.jit(_model("einsum").apply)(params, images)
  o16, _ = jax.jit(_model("xla", dtype=jnp.bfloat16).apply)(params, images)
  for k in ("pred_logits", "pred_masks"):
    assert_close(o16[k], o32[k], 0.02, what=k)
