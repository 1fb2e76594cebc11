"""DToP-style early exit ("halting") with static shapes.

Rules (zbwxp/Dynamic-Token-Pruning, docs/design.md §3 and §5):
  * each exit head is an independent single-stage ATM head with a binary (present,
    no-object) class head; confidence of token t = max_c p_c(present) · σ(mask_c,t)
    (other exit designs, segmenter.EXIT_HEADS, use the same rule with p_c from their head);
  * tokens with confidence > τ halt, except that for every predicted class the `keep_top_k`
    (5) most confident candidates stay active as context;
  * halted tokens leave the queries and the keys/values of every later layer; their mask
    logits stay on a canvas, later heads overwrite only active tokens; the final prediction
    uses the final head's class probabilities with the canvas. (exit_head='segvit' keeps the
    canvas for the exits' own predictions only: its final prediction is SegViT's head over
    every token, halted ones with the features they had at their exit.)

Two execution modes give the same outputs: 'mask' keeps tokens in place and hides halted ones
behind the key mask (what DToP's masking costs), 'compact' gathers the active tokens of each
stage into the smallest capacity bucket that holds them, so later layers really do less work.
"""
import jax
import jax.numpy as jnp


def class_presence(cls_logits):
  """p(query c's class is present) [B, Q]: DToP's binary head gives it directly; for SegViT's
  (C+1)-way head (Q == C, query c matched to class c) it is softmax(cls_c)[c]."""
  p = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)
  if p.shape[-1] == 2:
    return p[..., 0]
  q = p.shape[1]
  return p[:, jnp.arange(q), jnp.arange(q)]


def token_confidence(cls_logits, mask_logits):
  """(confidence [B, N], predicted class [B, N]) from class logits [B, Q, 2] (binary) or
  [B, Q, C+1] and mask logits [B, Q, N]: max_c p_c(present) · σ(mask_c,t)."""
  probs = class_presence(cls_logits)[:, :, None] * jax.nn.sigmoid(
      mask_logits.astype(jnp.float32))
  return probs.max(axis=1), probs.argmax(axis=1)


def halting(cls_logits, mask_logits, active, threshold, keep_top_k=5):
  """Tokens [B, N] that halt at this exit (a subset of `active`)."""
  conf, pred = token_confidence(cls_logits, mask_logits)
  cand = active & (conf > threshold)
  if keep_top_k:
    q = mask_logits.shape[1]
    per_class = cand[:, None, :] & (pred[:, None, :] == jnp.arange(q)[None, :, None])
    score = jnp.where(per_class, conf[:, None, :], -jnp.inf)               # [B, Q, N]
    k = min(keep_top_k, score.shape[-1])
    vals, idx = jax.lax.top_k(score, k)                                     # [B, Q, k]
    b = jnp.arange(score.shape[0])[:, None, None]
    keep = jnp.zeros(cand.shape, bool).at[b, idx].max(jnp.isfinite(vals))
    cand &= ~keep
  return cand


def compact_indices(active, capacity):
  """Indices [B, capacity] of the active tokens first (stable), and their mask."""
  order = jnp.argsort(jnp.logical_not(active).astype(jnp.int32), axis=-1, stable=True)
  idx = order[:, :capacity]
  return idx, jnp.take_along_axis(active, idx, axis=-1)


def gather(x, idx):
  """x [B, N, ...] → [B, C, ...] at idx [B, C]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def scatter(full, part, idx, where):
  """Writes part [B, C, ...] into full [B, N, ...] at idx where `where` [B, C] holds."""
  b = jnp.arange(full.shape[0])[:, None]
  old = full[b, idx]
  w = where.reshape(where.shape + (1,) * (part.ndim - 2))
  return full.at[b, idx].set(jnp.where(w, part, old))
