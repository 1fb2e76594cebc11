"""Attention that SegViT/DToP need and Flax's built-in module does not give.

* a key-padding mask (padded token buckets, halted tokens);
* the pre-softmax logits, averaged over heads (ATM turns them into masks).

Softmax always runs in float32, whatever the compute dtype.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Added to masked logits: large enough to zero them after softmax in fp32, finite so a
# fully masked row gives a uniform (not NaN) distribution.
_MASK_VALUE = -1e9


def masked_softmax(logits, key_mask):
  """Softmax over the last axis in fp32; `key_mask` [B, Nk] (True = attend) or None."""
  logits = logits.astype(jnp.float32)
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, _MASK_VALUE)
  return jax.nn.softmax(logits, axis=-1)


# Self-attention implementations (SelfAttention.impl, config `model.attention_impl`).
IMPLS = ("auto", "xla", "cudnn", "einsum")


def resolve_impl(impl, dtype, head_dim):
  """'auto' → on a GPU, cuDNN's fused kernel where it applies (bf16/fp16, head dim a multiple
  of 8 up to 128), else XLA's `jax.nn.dot_product_attention`; elsewhere 'einsum': XLA:CPU
  has no fused attention, and there the written-out einsum was 9 % faster (ViT-B/16 512²)
  and planned 31 % less temporary memory (1.77 vs 2.57 GB at 1024²) than the 'xla' path
  (experiments/results/attention_memory_cpu_b16_1024.json). Other values pass through."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r}: use one of {IMPLS}")
  if impl != "auto":
    return impl
  if jax.default_backend() != "gpu":
    return "einsum"
  fused_ok = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
              and head_dim <= 128)
  return "cudnn" if fused_ok else "xla"


class SelfAttention(nn.Module):
  """Self-attention with a fused qkv projection (timm / torch MultiheadAttention layout).

  impl: 'einsum' writes the attention out (the reference, and the only path with dropout on
  the attention weights); 'xla' / 'cudnn' call `jax.nn.dot_product_attention` (cuDNN: the
  fused flash-style kernel, no [B, H, N, N] matrix in memory); 'auto' picks (resolve_impl).
  The key mask (padding in capacity buckets, halted tokens) is a boolean mask on the keys in
  every path; softmax statistics are fp32 in every path.
  """
  num_heads: int
  dropout: float = 0.0  # on the attention weights (torch MultiheadAttention semantics)
  impl: str = "einsum"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, key_mask=None, *, train=False):  # x: [B, N, D]
    b, n, d = x.shape
    h = self.num_heads
    dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype,
                                     kernel_init=nn.initializers.xavier_uniform(), name=name)
    qkv = dense(3 * d, "qkv")(x).reshape(b, n, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]          # [B, N, H, Dh]
    impl = resolve_impl(self.impl, self.dtype, d // h)
    if impl != "einsum":
      if self.dropout and train:
        raise ValueError(f"attention_impl={impl!r} has no dropout on the attention weights; "
                         "use 'einsum' for attention dropout")
      mask = None if key_mask is None else key_mask[:, None, None, :]
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=(d // h) ** -0.5,
                                         implementation=impl)
      return dense(d, "proj")(out.reshape(b, n, d))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * (d // h) ** -0.5, k)
    attn = masked_softmax(logits, key_mask)
    attn = nn.Dropout(self.dropout, deterministic=not train)(attn).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
    return dense(d, "proj")(out)


class CrossAttention(nn.Module):
  """SegViT's ATM cross-attention: separate q/k/v, returns head-averaged pre-softmax logits."""
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xq, xkv, key_mask=None, *, train=False):  # xq [B,Q,d], xkv [B,N,d]
    b, nq, d = xq.shape
    nk = xkv.shape[1]
    h = self.num_heads
    dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=nn.initializers.truncated_normal(0.02), name=name)
    q = dense("q")(xq).reshape(b, nq, h, d // h)
    k = dense("k")(xkv).reshape(b, nk, h, d // h)
    v = dense("v")(xkv).reshape(b, nk, h, d // h)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (d // h) ** -0.5
    attn = masked_softmax(logits, key_mask)
    attn = nn.Dropout(self.dropout, deterministic=not train)(attn).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, nq, d)
    return dense("proj")(out), logits.mean(axis=1)  # [B,Q,d], [B,Q,N] (fp32)
