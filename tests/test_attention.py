"""ViT self-attention through jax.nn.dot_product_attention ('xla'; cuDNN on a GPU), through
key/value blocks with an online softmax ('chunked') and through the fused C++ CPU kernel
('cpu_fused') gives the written-out einsum reference's outputs and gradients, with padding and
halted tokens."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close  # tests/numerics.py
from numerics import assert_close_norm

from step_jax.models import atm
from step_jax.models import attention
from step_jax.models import cpu_attention
from step_jax.models import early_exit
from step_jax.models import segmenter
from step_jax.models import vit


# The kernel runs on x86-64 Linux CPUs with AVX2 and FMA and a C++ compiler; elsewhere 'auto'
# keeps the plain JAX paths (tested below) and its own tests skip, saying why.
KERNEL = cpu_attention.available() and jax.default_backend() == "cpu"
needs_kernel = pytest.mark.skipif(not KERNEL, reason=f"no fused CPU attention here: "
                                  f"{cpu_attention.why_not()}")
BLOCKED = ["chunked", pytest.param("cpu_fused", marks=needs_kernel)]


def test_resolve_impl(monkeypatch):
  gpu = jax.default_backend() == "gpu"
  monkeypatch.setattr(cpu_attention, "available", lambda: False)
  assert attention.resolve_impl("auto", jnp.float32, 64, 16) == ("xla" if gpu else "einsum")
  assert attention.resolve_impl("auto", jnp.bfloat16, 64, 16) == ("cudnn" if gpu else "einsum")
  assert attention.resolve_impl("auto", jnp.bfloat16, 60, 16) == ("xla" if gpu else "einsum")
  # Many tokens: 'chunked' instead of the paths that write the [B, H, N, N] matrix out.
  n = attention.GPU_CHUNKED_FROM if gpu else attention.CPU_CHUNKED_FROM
  assert attention.resolve_impl("auto", jnp.float32, 64, n - 1) == ("xla" if gpu else "einsum")
  assert attention.resolve_impl("auto", jnp.float32, 64, n) == "chunked"
  assert attention.resolve_impl("auto", jnp.bfloat16, 64, n) == ("cudnn" if gpu else "chunked")
  assert attention.resolve_impl("xla", jnp.bfloat16, 64, n) == "xla"
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    attention.resolve_impl("flash", jnp.float32, 64, 16)
  # Where the kernel runs, 'auto' takes it for head dims it serves: in training from
  # CPU_CHUNKED_FROM tokens on, in inference from CPU_FUSED_FROM; 'portable' (exported
  # artifacts) never does.
  monkeypatch.setattr(cpu_attention, "available", lambda: True)
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  if not gpu:
    small = attention.CPU_FUSED_FROM
    for train in (True, False):
      assert attention.resolve_impl("auto", jnp.float32, 64, n, train) == "cpu_fused"
      assert attention.resolve_impl("auto", jnp.float32, 64, small - 1, train) == "einsum"
      assert attention.resolve_impl("auto", jnp.float32, 40, n, train) == "chunked"
      assert attention.resolve_impl("auto", jnp.float32, 40, n - 1, train) == "einsum"
      assert attention.resolve_impl("portable", jnp.float32, 64, n, train) == "chunked"
      assert attention.resolve_impl("portable", jnp.float32, 64, n - 1, train) == "einsum"
    assert attention.resolve_impl("auto", jnp.float32, 64, n - 1, train=True) == "einsum"
    assert attention.resolve_impl("auto", jnp.float32, 64, small) == "cpu_fused"
    monkeypatch.setattr(jax, "device_count", lambda: 2)   # a sharded batch: blocks in JAX
    assert attention.resolve_impl("auto", jnp.float32, 64, n) == "chunked"
    assert attention.resolve_impl("auto", jnp.float32, 64, small) == "einsum"
  else:
    with pytest.raises(ValueError, match="runs on CPUs only"):
      attention.resolve_impl("cpu_fused", jnp.float32, 64, n)


def test_kernel_build_failure_is_reported(monkeypatch, tmp_path):
  """A compiler that fails: build() raises with the command and the compiler's words."""
  monkeypatch.setenv("CXX", "false")
  monkeypatch.setenv("STEP_JAX_KERNEL_DIR", str(tmp_path))
  with pytest.raises(RuntimeError, match="false .*cpu_attention.cc.* failed"):
    cpu_attention.build()
  assert not list(tmp_path.iterdir())   # no half-written library left behind


@needs_kernel
@pytest.mark.parametrize("n, heads, dim", [(601, 3, 64), (37, 2, 16), (300, 1, 32)])
def test_cpu_kernel_equals_einsum_with_statistics(n, heads, dim):
  """The kernel alone: several query blocks (96) and key blocks (256), token counts that are
  not multiples of the 16-key panels, a fully masked row, random halts, a padded bucket; the
  row max and 1 / sum it returns are the softmax's."""
  q, k, v = (jax.random.normal(jax.random.key(i), (3, n, heads, dim)) for i in range(3))
  key_mask = _key_mask(3, n, 5)
  out, m, inv_l = jax.jit(cpu_attention.attention)(q * dim ** -0.5, k, v, key_mask)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * dim ** -0.5, k)
  attn = attention.masked_softmax(logits, key_mask)
  assert_close(out, jnp.einsum("bhqk,bkhd->bqhd", attn, v), 1e-5)
  masked = jnp.where(key_mask[:, None, None], logits, -1e9)
  assert_close(m, masked.max(-1), 1e-5)
  assert_close(inv_l, 1 / jnp.exp(masked - masked.max(-1, keepdims=True)).sum(-1), 1e-5)
  with pytest.raises(ValueError, match="D a multiple of 16"):
    cpu_attention.attention(q[..., :8], k[..., :8], v[..., :8], key_mask)


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


@pytest.mark.parametrize("impl", ["xla", "chunked", pytest.param("cpu_fused", marks=needs_kernel)])
def test_fused_path_refuses_attention_dropout_in_training(impl):
  x = jnp.ones((1, 4, 32))
  layer = attention.SelfAttention(2, dropout=0.1, impl=impl)
  params = layer.init(jax.random.key(0), x)
  layer.apply(params, x)                                   # inference: fine
  with pytest.raises(ValueError, match="no dropout on the attention weights"):
    layer.apply(params, x, train=True, rngs={"dropout": jax.random.key(1)})


@needs_kernel
def test_auto_takes_the_kernel_in_inference_and_the_einsum_in_training(monkeypatch):
  """At 200 tokens (between CPU_FUSED_FROM and CPU_CHUNKED_FROM) 'auto' runs the kernel when
  nothing needs its backward, the einsum in training; both give the einsum's outputs."""
  monkeypatch.setattr(jax, "device_count", lambda: 1)   # one device, as outside the tests
  x = jax.random.normal(jax.random.key(0), (1, 200, 128))
  key_mask = jax.random.uniform(jax.random.key(1), (1, 200)) < 0.7
  auto, ref = attention.SelfAttention(2, impl="auto"), attention.SelfAttention(2, impl="einsum")
  params = ref.init(jax.random.key(2), x, key_mask)
  for train in (False, True):
    fn = lambda p, train=train: auto.apply(p, x, key_mask, train=train)
    calls_kernel = cpu_attention.TARGET in jax.jit(fn).lower(params).as_text()
    assert calls_kernel == (not train), train
    assert_close(fn(params), ref.apply(params, x, key_mask, train=train), 1e-5)


def _key_mask(b, n, seed):
  """Row 0 random halts, row 1 fully masked, row 2 a padded bucket (its last third) plus
  random halts, later rows random."""
  mask = np.array(jax.random.uniform(jax.random.key(seed), (b, n)) < 0.6)
  mask[1] = False
  mask[2, 2 * n // 3:] = False
  return jnp.asarray(mask)


@pytest.mark.parametrize("impl", BLOCKED)
def test_blocked_layer_equals_einsum_with_key_mask_and_gradients(impl):
  """601 tokens: 2 query blocks and 3 key blocks of the default sizes, each padded (the
  kernel: 7 query blocks, 3 key blocks, 16-key panels padded). (Without a key mask: the
  model test below, whose first blocks have none.)"""
  n = 601
  assert n % attention.Q_BLOCK and n % attention.K_BLOCK and n > 2 * attention.K_BLOCK
  x = jax.random.normal(jax.random.key(0), (3, n, 64))
  key_mask = _key_mask(3, n, 1)
  make = lambda impl: attention.SelfAttention(4, impl=impl)
  params = make("einsum").init(jax.random.key(2), x, key_mask)

  def loss(impl, p, x):
    y = make(impl).apply(p, x, key_mask)
    return jnp.sum(jnp.sin(y)), y
  grad = lambda impl: jax.jit(jax.value_and_grad(functools.partial(loss, impl), (0, 1),
                                                 has_aux=True))(params, x)
  (_, y1), g1 = grad("einsum")
  (_, y2), g2 = grad(impl)
  assert_close(y2, y1, 1e-5)
  assert_close(g2, g1, 1e-5, what="grads")
  assert np.all(np.isfinite(np.asarray(y2)))   # the fully masked row too
  # Masked keys have no influence.
  y3 = jax.jit(make(impl).apply)(params, jnp.where(key_mask[..., None], x, 100.0), key_mask)
  keep = np.asarray(key_mask)
  assert_close(np.asarray(y3)[keep], np.asarray(y2)[keep], 1e-5)


@pytest.mark.parametrize("masked", [True, False])
def test_chunked_attention_with_small_blocks_equals_einsum(masked):
  """Many blocks (50 tokens in 4 query blocks of 13 and 7 key blocks of 8, both padded), a
  fully masked row; unmasked, 48 tokens in whole blocks (the path without a masking pass)."""
  n = 50 if masked else 48
  q, k, v = (jax.random.normal(jax.random.key(i), (3, n, 2, 8)) for i in range(3))
  key_mask = _key_mask(3, n, 3) if masked else None

  def einsum(q, k, v):
    attn = attention.masked_softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), key_mask)
    return jnp.einsum("bhqk,bkhd->bqhd", attn, v)
  chunked = functools.partial(attention.chunked_attention, key_mask=key_mask, q_block=16,
                              k_block=8)
  run = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(f(*a))), (0, 1, 2)))
  (_, g1), (_, g2) = run(einsum)(q, k, v), run(chunked)(q, k, v)
  assert_close(jax.jit(chunked)(q, k, v), jax.jit(einsum)(q, k, v), 1e-5)
  assert_close(g2, g1, 1e-5, what="grads")


def test_chunked_bf16_agrees_with_fp32_einsum():
  """bf16 compute (fp32 softmax statistics) within the project's bf16 tolerance (2 %)."""
  x = jax.random.normal(jax.random.key(0), (3, 601, 32))
  key_mask = _key_mask(3, 601, 1)
  params = attention.SelfAttention(4).init(jax.random.key(2), x, key_mask)

  def run(impl, dtype):
    def loss(p, x):
      y = attention.SelfAttention(4, impl=impl, dtype=dtype).apply(p, x, key_mask)
      return jnp.sum(jnp.sin(y.astype(jnp.float32))), y
    return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
  (_, y32), g32 = run("einsum", jnp.float32)
  (_, y16), g16 = run("chunked", jnp.bfloat16)
  assert y16.dtype == jnp.bfloat16
  assert_close(y16, y32, 0.02)
  assert_close_norm(g16, g32, 0.02, what="grads")


def test_chunked_never_holds_the_attention_matrix():
  """XLA's memory analysis (compiled, not run) of one layer at 2048 tokens: the forward's
  and the gradient's temporaries under 25 % of the einsum path's (which holds [1, 2, N, N])."""
  x = jax.ShapeDtypeStruct((1, 2048, 64), jnp.float32)
  key_mask = jax.ShapeDtypeStruct((1, 2048), jnp.bool_)

  def temp_bytes(impl):
    layer = attention.SelfAttention(2, impl=impl)
    params = jax.eval_shape(layer.init, jax.random.key(0), x, key_mask)
    grad = jax.grad(lambda p, x, m: jnp.sum(layer.apply(p, x, m) ** 2), (0, 1))
    return [jax.jit(f).lower(params, x, key_mask).compile().memory_analysis().temp_size_in_bytes
            for f in (layer.apply, grad)]
  einsum, chunked = temp_bytes("einsum"), temp_bytes("chunked")
  assert einsum[0] >= 2 * 2048 ** 2 * 4                        # at least one matrix
  assert chunked[0] <= 0.25 * einsum[0], (chunked, einsum)     # forward
  assert chunked[1] <= 0.25 * einsum[1], (chunked, einsum)     # gradient


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


# The default run compares the models' outputs with halting masks (dtop_mask; for 'chunked'
# also with compaction, dtop_compact); the gradients are checked at the layer level above
# (with a key mask), the models' with -m slow.
@pytest.mark.parametrize("case", _slow("segvit", "supertokens", "dtop_compact", "step_segvit"))
def test_fused_model_equals_einsum_model(case):
  _compare(CASES[case], grads=False, impl="xla")


@pytest.mark.parametrize("impl", BLOCKED)
@pytest.mark.parametrize("case", _slow("segvit", "supertokens", "step_segvit"))
def test_blocked_model_equals_einsum_model(case, impl):
  _compare(CASES[case], grads=False, impl=impl)


@pytest.mark.parametrize("impl", ["xla", "chunked", pytest.param("cpu_fused", marks=needs_kernel)])
@pytest.mark.parametrize("case", _slow(*CASES))
def test_fused_model_gradients_equal_einsum_model(case, impl):
  _compare(CASES[case], grads=True, impl=impl)


def _compare(kw, grads, impl):
  """The `impl` and einsum models give the same outputs (and, with `grads`, the same
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
  ref, fused = _model("einsum", **kw), _model(impl, **kw)

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
