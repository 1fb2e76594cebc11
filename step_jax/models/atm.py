"""SegViT's Attention-to-Mask (ATM) decoder and DToP's per-exit variant.

SegViT v1 (zbwxp/SegVit `ATMHead`): one learned query per class; for each of `num_stages`
feature levels, deepest first, a Linear+LayerNorm projection and a 3-layer post-norm
transformer decoder whose cross-attention logits (pre-softmax, averaged over heads, from
the last layer) are that stage's mask logits. Queries carry over from stage to stage;
mask logits are summed across stages; a shared Linear gives (C+1)-way class logits with
"no object" last.

DToP (`PruneHead`): the same decoder on one feature level, its own queries, and a binary
class head (present, no-object) per class query.

Masks are returned per token ([B, Q, N]); the segmenter owns the token→grid mapping, so
padded or shared tokens (dCTS) and halted tokens (early exit) never need a square reshape.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from step_jax.models import attention

Dtype = Any


class DecoderLayer(nn.Module):
  """torch `TransformerDecoderLayer` (post-norm, ReLU, dropout 0.1) with ATM cross-attention."""
  num_heads: int
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q, memory, key_mask=None, *, train=False):
    d = q.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda x: nn.Dropout(self.dropout, deterministic=not train)(x)
    norm = lambda name: nn.LayerNorm(1e-5, name=name, **kw)
    dense = lambda f, name: nn.Dense(f, kernel_init=nn.initializers.truncated_normal(0.02),
                                     name=name, **kw)
    y = attention.SelfAttention(self.num_heads, self.dropout, name="self_attn", **kw)(
        q, train=train)
    q = norm("norm1")(q + drop(y))
    y, logits = attention.CrossAttention(self.num_heads, self.dropout, name="cross_attn",
                                         **kw)(q, memory, key_mask, train=train)
    q = norm("norm2")(q + drop(y))
    y = dense(d, "linear2")(drop(nn.relu(dense(4 * d, "linear1")(q))))
    return norm("norm3")(q + drop(y)), logits


class ATMHead(nn.Module):
  """ATM decoder over `num_stages` feature levels.

  Stage i owns `input_proj_i`, `proj_norm_i` and `decoder_i_j`; queries and `class_embed` are
  shared by all stages. `__call__` is SegViT: stage 0 on the deepest feature, queries carried
  over, mask logits summed. The stage-wise methods (`initial_queries`, `stage`, `classify`)
  let an early-exit encoder run stage 0 at its exits (segmenter.Segmenter,
  exit_head='segvit'), or the stages one at a time, shallowest first, as its exits
  (exit_head='atm_shallow_first').

  Attributes:
    num_classes: C; one query per class.
    dim: decoder width (SegViT: 384 for ViT-B, 512 for ViT-L).
    binary_cls: DToP head: class logits [.., 2] = (present, no-object) per query instead of
      SegViT's [.., C+1].
  """
  num_classes: int
  dim: int = 384
  num_heads: int = 12
  num_layers: int = 3
  num_stages: int = 3
  binary_cls: bool = False
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = lambda f: nn.Dense(f, kernel_init=nn.initializers.truncated_normal(0.02), **kw)
    self.queries = self.param("queries", nn.initializers.normal(1.0),
                              (self.num_classes, self.dim), self.param_dtype)
    self.class_embed = dense(2 if self.binary_cls else self.num_classes + 1)
    self.input_proj = [dense(self.dim) for _ in range(self.num_stages)]
    self.proj_norm = [nn.LayerNorm(1e-5, **kw) for _ in range(self.num_stages)]
    self.decoder = [[DecoderLayer(self.num_heads, self.dropout, **kw)
                     for _ in range(self.num_layers)] for _ in range(self.num_stages)]

  def initial_queries(self, batch: int):
    """The learned class queries [B, Q, d]."""
    return jnp.broadcast_to(self.queries.astype(self.dtype),
                            (batch, self.num_classes, self.dim))

  def stage(self, i: int, q, x, key_mask=None, *, train=False):
    """Stage i on tokens x [B, N, D]: (new queries [B, Q, d], mask logits [B, Q, N] fp32),
    the last decoder layer's head-averaged pre-softmax cross-attention logits."""
    memory = self.proj_norm[i](self.input_proj[i](x))
    for layer in self.decoder[i]:
      q, logits = layer(q, memory, key_mask, train=train)
    self.sow("intermediates", "stage_logits", logits)  # for tests and analysis
    return q, logits

  def classify(self, q):
    """Class logits [B, Q, C+1] (binary head: [B, Q, 2]), fp32."""
    return self.class_embed(q).astype(jnp.float32)

  def __call__(self, features: Sequence[jax.Array], key_mask=None, *, train=False):
    """features: `num_stages` arrays [B, N, D], shallowest first (as the encoder emits them).

    Returns dict(pred_logits [B,Q,K], pred_masks [B,Q,N] (fp32), aux=[dict, ...]) where aux
    holds the earlier (deeper-first) stages' outputs for deep supervision.
    """
    if len(features) != self.num_stages:
      raise ValueError(f"ATMHead expects {self.num_stages} feature maps, got {len(features)}")
    q = self.initial_queries(features[0].shape[0])
    stage_logits, stage_masks, masks = [], [], 0.0
    for i, x in enumerate(reversed(features)):  # deepest first
      q, logits = self.stage(i, q, x, key_mask, train=train)
      masks = masks + logits  # last layer's logits; summed over stages
      stage_masks.append(masks)
      stage_logits.append(self.classify(q))
    aux = [dict(pred_logits=l, pred_masks=m) for l, m in zip(stage_logits[:-1], stage_masks[:-1])]
    return dict(pred_logits=stage_logits[-1], pred_masks=stage_masks[-1], aux=aux)


def class_probs(pred_logits):
  """Class probabilities: [B, Q, C] for the (C+1)-way head (no-object column dropped),
  [B, Q] = p(present) for DToP's binary head."""
  p = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)
  return p[..., 0] if p.shape[-1] == 2 else p[..., :-1]


def semantic_scores(pred_logits, mask_logits):
  """Class scores [B, C, ...] from class logits [B,Q,K] and mask logits [B, Q, ...].

  (C+1)-way head: Σ_q softmax(cls_q)[c] · σ(mask_q)   (SegViT `semantic_inference`).
  Binary head:    p_q(present) · σ(mask_q)             (DToP, Q == C).
  """
  p = class_probs(pred_logits)
  m = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  if p.ndim == 2:
    return p.reshape(p.shape + (1,) * (m.ndim - 2)) * m
  return jnp.einsum("bqc,bq...->bc...", p, m)
