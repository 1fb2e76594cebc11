"""Attention that SegViT/DToP need and Flax's built-in module does not give.

* a key-padding mask (padded token buckets, halted tokens);
* the pre-softmax logits, averaged over heads (ATM turns them into masks).

Softmax always runs in float32, whatever the compute dtype.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from step_jax.models import cpu_attention

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
# 'portable' is 'auto' without the C++ kernel: what exported artifacts use, since they must
# run where the kernel is not registered.
IMPLS = ("auto", "portable", "xla", "cudnn", "einsum", "chunked", "cpu_fused")

# 'auto' on a CPU: the written-out einsum below this many tokens, 'chunked' from it on.
# ViT encoder forward, jitted, batch 1, fp32, ms, median of 3 after a warmup, the two paths
# interleaved, on a 2-core Intel Xeon (XLA:CPU, jax 0.10.2) shared with two trainings, so
# +-15 % noise (experiments/attention_memory.py --time_res; attention_time_cpu.json):
#   tokens          64     256     576    1024    2304    4096   (4096: 1024² images)
#   Ti/16 einsum    12      42     126     900    2105    6681
#   Ti/16 chunked   11      37     102     392    1032    2905
#   B/16 einsum            423    1168    2814   21868   39845
#   B/16 chunked           409    1032    2017   10760   16718
# The attention alone with its backward (12 heads of 64; ms, same machine): 64 tokens
# 1.4 / 3.0, 256 tokens 20 / 27, 576 tokens 257 / 86, 1024 tokens 1127 / 623. So 'chunked'
# wins from ~512 tokens on, 1.2-4x; below, its forward gains little and its backward (one
# block, the custom VJP's loops) loses, and the einsum reference stays.
CPU_CHUNKED_FROM = 512
# On a GPU, where cuDNN's kernel does not apply (fp32, odd head sizes): 'xla' below this many
# tokens, 'chunked' from it on. Unmeasured on a GPU: chosen for memory, as the 'xla' path
# keeps ~3 fp32 [B, heads, N, N] matrices per layer (13 GB each for ViT-B/16 at 16384
# tokens, 2048² images) and 'chunked' only blocks of them.
GPU_CHUNKED_FROM = 16384
# From CPU_CHUNKED_FROM tokens on, 'auto' takes the fused C++ kernel ('cpu_fused',
# cpu_attention.cc) where it builds. One attention, fp32, batch 1, heads of 64, forward, ms,
# medians of 6 rounds in rotating order; 2-core AMD EPYC (Zen 3, AVX2), quiet, 2026-12-04
# (experiments/attention_kernel.py; experiments/results/peer_bench_cpu/attention_kernel.jsonl):
#   heads x tokens   3 x 1024   12 x 1024   3 x 4096   12 x 4096
#   cpu_fused          10.5       34.2       100.3      378.0
#   chunked            10.9       58.6       140.4      593.9
#   PyTorch SDPA        7.0       33.5       101.6      400.9
# Training keeps 'chunked's blocked backward (from the kernel's row statistics), so below
# 512 tokens, where that backward loses to the einsum's, the einsum stays. Inference needs no
# backward, and there the kernel's forward beats the einsum's from far fewer tokens: ms,
# medians of 15 rounds interleaved, same machine, 2026-12-05 (einsum / cpu_fused):
#   tokens          64          128         196         256         344         400
#   3 heads     0.20 / 0.20 0.60 / 0.50 1.30 / 0.60 1.60 / 0.70 1.90 / 0.90 1.80 / 1.20
#   12 heads    0.60 / 0.40 1.90 / 0.90 3.20 / 1.50 5.90 / 2.10 6.00 / 3.80 9.50 / 4.80
# (Forward + backward on this AMD EPYC, 5 rounds, einsum / cpu_fused / chunked / torch SDPA,
# ms: 12 x 128 6.2 / 5.2 / 4.2 / 3.0, 12 x 196 11.9 / 9.1 / 5.9 / 5.1, 12 x 400 28.6 / 20.7 /
# 23.6 / 14.4: the blocked paths win in training too from 128 tokens here, unlike on the
# Xeon above; training keeps CPU_CHUNKED_FROM until one rule holds on both.)
# Whole encoders in inference at 196 / 256 / 400 tokens (224², 256², 320²) ran 1.11 /
# 1.18 / 1.15x faster with it (Ti/16) and 1.05 / 1.09 / 1.13x (B/16); so inference ('auto',
# train=False) takes the kernel from CPU_FUSED_FROM tokens.
CPU_FUSED_FROM = 128


def resolve_impl(impl, dtype, head_dim, num_tokens, train=False):
  """The path 'auto' / 'portable' take for `num_tokens` keys (others pass through). On a
  GPU: cuDNN's fused kernel where it applies (bf16/fp16, head dim a multiple of 8 up to 128),
  else XLA's `jax.nn.dot_product_attention`, or 'chunked' from GPU_CHUNKED_FROM tokens.
  Elsewhere the fused C++ kernel ('cpu_fused'; 'auto' only, see the numbers above) where it
  builds, the head dim suits it and there is one device (the kernel does not split over a
  sharded batch): from CPU_FUSED_FROM tokens in inference, from CPU_CHUNKED_FROM in training
  (`train`: its backward is 'chunked''s); below those the written-out einsum; and
  'chunked' from CPU_CHUNKED_FROM tokens where the kernel does not apply. The einsum was
  9 % faster than 'xla' (ViT-B/16 512²) and planned 31 % less
  temporary memory (1.77 vs 2.57 GB at 1024²;
  experiments/results/attention_memory_cpu_b16_1024.json)."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r}: use one of {IMPLS}")
  gpu = jax.default_backend() == "gpu"
  if impl == "cpu_fused" and gpu:
    raise ValueError("attention_impl='cpu_fused' runs on CPUs only; on a GPU use 'auto'")
  if impl not in ("auto", "portable"):
    return impl
  if not gpu:
    fused_from = CPU_CHUNKED_FROM if train else CPU_FUSED_FROM
    if num_tokens < fused_from:
      return "einsum"
    fused = (impl == "auto" and head_dim % cpu_attention.HEAD_DIM_MULTIPLE == 0
             and jax.device_count() == 1 and cpu_attention.available())
    if fused:
      return "cpu_fused"
    return "chunked" if num_tokens >= CPU_CHUNKED_FROM else "einsum"
  fused_ok = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
              and head_dim <= 128)
  if fused_ok:
    return "cudnn"
  return "chunked" if num_tokens >= GPU_CHUNKED_FROM else "xla"


# Blocks of the 'chunked' path, queries x keys per step. The attention alone at 4096 tokens,
# batch 1, fp32, heads of 64, on the 2-core Xeon above (ms, medians of 3-7 interleaved runs
# in 1-3 sessions, +-15 % noise): Ti/16 (3 heads) and B/16 (12 heads) forward, and
# forward + backward:
#   blocks        einsum     all x 256  all x 512  all x 1024  all x 2048
#   Ti forward    596-876    278        336-341    364-379     482
#   B forward     2835-3307  1079       1062-1648  1220-1674   1214
#   blocks        256 x 256  512 x 128  512 x 256  512 x 512   1024 x 256  1024 x 512
#   Ti forward    236        209        216-231    196-228     188-256     170-288
#   B forward     876        776        844-1077   1201-1298   1249-1273   1011-1520
#   Ti fwd+bwd    868        834        803-844    966         901         -
#   B fwd+bwd     -          -          3436       4625        4778        -
# (einsum fwd+bwd: Ti 2287-2402, B 13077; keys-only blocks of 512: Ti 1675, B 7082.) Query
# blocks help (a block of logits stays in cache); 512 x 256 is within the noise of the best
# everywhere and the best forward + backward. Unmeasured on a GPU, where larger blocks
# (fewer, bigger matmuls) are likely better.
# Since blocks are laid out head-major once (_head_blocks), quiet, 2026-12-03 (ms; one
# attention, 4096 tokens; experiments/peer_bench.py's machine):
#   blocks        512 x 256  1024 x 256  1024 x 512  2048 x 256  4096 x 256   torch SDPA
#   Ti forward    117        90          89          79          83           42-60
#   B forward     374        347         336         325         356          171-222
#   Ti fwd+bwd    380        345         319         329         307
#   B fwd+bwd     1288       1152        1362        1253        1331
# (1024 tokens, forward: Ti 8.5 / 7.5 at 512 / 1024 x 256, B 31.6 / 30.2.) 1024 x 256 is
# within 10 % of the best everywhere. PyTorch's fused CPU kernel stays ~2x faster.
Q_BLOCK, K_BLOCK = 1024, 256


def chunked_attention(q, k, v, key_mask=None, *, q_block=Q_BLOCK, k_block=K_BLOCK):
  """softmax(q kᵀ) v without the [B, H, N, N] matrix (Rabe & Staats 2021; FlashAttention's
  tiling): queries in blocks, and for each the keys/values in blocks with an online softmax
  (fp32 running max and sum). The backward recomputes each block (FlashAttention's), so
  neither pass stores more than a [B, H, q_block, k_block] block of the matrix.

  q, k, v: [B, N, H, Dh], q already scaled; key_mask [B, N] (True = attend) or None. Equal to
  the einsum path (masked_softmax), a fully masked row included: its masked keys get the same
  logit -1e9, so it averages all N values uniformly.
  """
  blocks = _layout(q, k, v, key_mask, q_block, k_block)
  return _unblock(_flash(*blocks[:5]), q.shape)


def _layout(q, k, v, key_mask, q_block, k_block):
  """_flash's operands: q/k/v in head-major blocks, the keys' keep/fill blocks (None when
  every key is attended and N divides into blocks), and the query block size."""
  b, n = k.shape[:2]
  q_block, k_block = _even_block(q.shape[1], q_block), _even_block(n, k_block)
  if key_mask is None and n % k_block == 0:
    keep = fill = None   # every key attended: no masking pass over the logits
  else:
    keep = jnp.ones((b, n), bool) if key_mask is None else key_mask
    # Padding slots (N not a multiple of the block) sit below the masked keys' -1e9, so
    # that they get no weight even in a fully masked row.
    fill = jnp.full((b, n), _MASK_VALUE, jnp.float32)
    keep = _blocks(_pad(keep, k_block), k_block)
    fill = _blocks(_pad(fill, k_block, 2 * _MASK_VALUE), k_block)
  return (_head_blocks(_pad(q, q_block), q_block), _head_blocks(_pad(k, k_block), k_block),
          _head_blocks(_pad(v, k_block), k_block), keep, fill, q_block)


def _pad(x, to, value=0):
  """x [B, N, ...] padded along N to a multiple of `to`."""
  return jnp.pad(x, [(0, 0), (0, -x.shape[1] % to)] + [(0, 0)] * (x.ndim - 2),
                 constant_values=value)


def _unblock(out, shape):
  """[nq, B, H, Q, Dh] -> [B, N, H, Dh] (`shape`, the queries' shape; padding dropped)."""
  b, nq, h, dh = shape
  return out.transpose(1, 0, 3, 2, 4).reshape(b, -1, h, dh)[:, :nq]


def _even_block(n, target):
  """The block size near `target` that splits n into equal blocks (padding < their count)."""
  return -(-n // -(-n // target))


def _blocks(x, size):
  """[B, N] → [N / size, B, size]: the leading axis for lax.scan / lax.map."""
  return jnp.moveaxis(x.reshape(x.shape[0], -1, size), 1, 0)


def _head_blocks(x, size):
  """[B, N, H, Dh] → [N / size, B, H, size, Dh]: blocks with the heads as a batch axis, laid
  out once here so that no block's matmul transposes its operands (~10 % of the time)."""
  b, n, h, dh = x.shape
  return x.reshape(b, n // size, size, h, dh).transpose(1, 0, 3, 2, 4)


def _scores(q, k, keep, fill):
  """fp32 logits [B, H, q_block, k_block]; masked keys and padding set to their fill."""
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  return s if keep is None else jnp.where(keep[:, None, None], s, fill[:, None, None])


def _attend(q, k, v, keep, fill):
  """One query block [B, H, Q, Dh] over all key blocks: (output, row max, 1 / row sum)."""
  def step(carry, kv):
    m, l, acc = carry
    kj, vj, keep_j, fill_j = kv
    s = _scores(q, kj, keep_j, fill_j)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    rescale = jnp.exp(m - m_new)  # earlier blocks' weights, relative to the new max
    l = l * rescale + p.sum(-1)
    acc = acc * rescale[..., None] + jnp.einsum(
        "bhqk,bhkd->bhqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
    return (m_new, l, acc), None
  f32 = jnp.float32
  init = (jnp.full(q.shape[:-1], -jnp.inf, f32), jnp.zeros(q.shape[:-1], f32),
          jnp.zeros(q.shape, f32))
  (m, l, acc), _ = jax.lax.scan(step, init, (k, v, keep, fill))
  # Kept apart, not as m + log(l): at m = -1e9 (a fully masked row) fp32 would drop log(l).
  return (acc / l[..., None]).astype(q.dtype), m, 1.0 / l


@jax.custom_vjp
def _flash(q, k, v, keep, fill):
  """Blocked q [nq, B, H, Q, Dh], k/v [nk, B, H, K, Dh], keep/fill [nk, B, K] or None."""
  return _flash_fwd(q, k, v, keep, fill)[0]


def _flash_fwd(q, k, v, keep, fill):
  out, m, inv_l = jax.lax.map(lambda qi: _attend(qi, k, v, keep, fill), q)
  return out, (q, k, v, keep, fill, out, m, inv_l)


def _flash_bwd(res, d_out):
  """Recomputes each block's probabilities from the saved row max and sum."""
  q, k, v, keep, fill, out, m, inv_l = res
  f32 = jnp.float32

  def query_block(dkv, xs):
    qi, oi, mi, inv_li, doi = xs
    d_sum = jnp.einsum("bhqd,bhqd->bhq", doi.astype(f32), oi.astype(f32))

    def key_block(dqi, kv):
      kj, vj, keep_j, fill_j = kv
      p = jnp.exp(_scores(qi, kj, keep_j, fill_j) - mi[..., None]) * inv_li[..., None]
      dv = jnp.einsum("bhqk,bhqd->bhkd", p.astype(doi.dtype), doi, preferred_element_type=f32)
      dp = jnp.einsum("bhqd,bhkd->bhqk", doi, vj, preferred_element_type=f32)
      ds = p * (dp - d_sum[..., None])
      if keep_j is not None:
        # Masked keys' logits are constants (their fill): no gradient, as through jnp.where.
        ds = jnp.where(keep_j[:, None, None], ds, 0.0)
      ds = ds.astype(qi.dtype)
      dqi = dqi + jnp.einsum("bhqk,bhkd->bhqd", ds, kj, preferred_element_type=f32)
      dk = jnp.einsum("bhqk,bhqd->bhkd", ds, qi, preferred_element_type=f32)
      return dqi, (dk, dv)
    dqi, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qi.shape, f32), (k, v, keep, fill))
    return (dkv[0] + dk, dkv[1] + dv), dqi
  zeros = jnp.zeros(k.shape, f32)
  (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), (q, out, m, inv_l, d_out))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@jax.custom_vjp
def _flash_from_stats(q, k, v, keep, fill, out, m, inv_l):
  """`out` (blocked), computed by another forward from the same operands, with _flash's
  backward from that forward's row max and 1 / sum: no forward runs twice."""
  return out


def _from_stats_fwd(q, k, v, keep, fill, out, m, inv_l):
  return out, (q, k, v, keep, fill, out, m, inv_l)


def _from_stats_bwd(res, d_out):
  zeros = tuple(jnp.zeros_like(x) for x in res[5:])
  return _flash_bwd(res, d_out) + zeros


_flash_from_stats.defvjp(_from_stats_fwd, _from_stats_bwd)


def cpu_fused_attention(q, k, v, key_mask=None):
  """chunked_attention's result from the fused C++ kernel (cpu_attention.py): the same
  arguments and rule (masked keys at -1e9), fp32 inside; gradients by chunked_attention's
  blocked backward from the kernel's row statistics."""
  keep = jnp.ones(k.shape[:2], bool) if key_mask is None else key_mask
  return _fused(q, k, v, keep)


@jax.custom_vjp
def _fused(q, k, v, keep):
  return cpu_attention.attention(q, k, v, keep)[0].astype(q.dtype)


def _fused_fwd(q, k, v, keep):
  out, m, inv_l = cpu_attention.attention(q, k, v, keep)
  out = out.astype(q.dtype)
  return out, (q, k, v, keep, out, m, inv_l)


def _fused_bwd(res, d_out):
  q, k, v, keep, out, m, inv_l = res
  b, nq, h, _ = q.shape

  def replay(q, k, v):
    qb, kb, vb, keep_b, fill, q_block = _layout(q, k, v, keep, Q_BLOCK, K_BLOCK)
    # Padded query rows (zeros, zero cotangent) get max 0 and sum 1: finite, no gradient.
    stats = lambda x, pad: jnp.moveaxis(
        jnp.pad(x, [(0, 0), (0, 0), (0, -nq % q_block)], constant_values=pad).reshape(
            b, h, -1, q_block), 2, 0)
    out_b = _head_blocks(_pad(out, q_block), q_block)
    return _unblock(_flash_from_stats(qb, kb, vb, keep_b, fill, out_b, stats(m, 0.0),
                                      stats(inv_l, 1.0)), q.shape)
  _, vjp = jax.vjp(replay, q, k, v)
  return (*vjp(d_out), None)


_fused.defvjp(_fused_fwd, _fused_bwd)


class SelfAttention(nn.Module):
  """Self-attention with a fused qkv projection (timm / torch MultiheadAttention layout).

  impl: 'einsum' writes the attention out (the reference, and the only path with dropout on
  the attention weights); 'xla' / 'cudnn' call `jax.nn.dot_product_attention` (cuDNN: the
  fused flash-style kernel, no [B, H, N, N] matrix in memory); 'chunked' is
  chunked_attention (blocks in plain JAX, no [B, H, N, N] matrix either, on any device);
  'auto' picks by device, dtype, token count and whether it trains (resolve_impl).
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
    impl = resolve_impl(self.impl, self.dtype, d // h, n, train)
    if impl != "einsum":
      if self.dropout and train:
        raise ValueError(f"attention_impl={impl!r} has no dropout on the attention weights; "
                         "use 'einsum' for attention dropout")
      if impl in ("chunked", "cpu_fused"):
        fn = chunked_attention if impl == "chunked" else cpu_fused_attention
        out = fn(q * (d // h) ** -0.5, k, v, key_mask)
      else:
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
