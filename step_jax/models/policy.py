"""dCTS policy network: EfficientNet-Lite0 → one "same class" logit per window of k x k patches.

CTS scores 2x2 windows with a 1x1 conv on the stride-32 map. dCTS needs 4x4, 8x8 and 16x16
windows too: the stride-32 features are average- and max-pooled over each window (so a large
window sees both its typical content and its most unusual part) and a small per-size MLP gives
the logit. One network, one score map per window size.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from step_jax.models import efficientnet


def per_image_features(train, initializing):
  """Whether the EfficientNet runs image by image (a loop over the batch) rather than on the
  whole batch: at inference on a CPU. Its early activations are large (B x H/2 x W/2 x 32
  floats: 1 GB for 32 images at 1024²) and a batch's leave the caches; image by image the
  policy net took 294-307 ms per image at batch 8 and 32 against 503-725 batched (Ti/16
  CamVid config at 1024², 2-core Xeon, a training sharing the CPU; batch 1: 366 ms). Every
  batch size then computes each image's scores alike. GPUs keep the batch. The choice is
  made when tracing: a `jax.export` artifact lowered on a CPU host for CUDA keeps the loop
  (same scores; on the GPU the policy net then runs image by image)."""
  return not train and not initializing and jax.default_backend() == "cpu"


class PolicyNet(nn.Module):
  """Window scores {k: logits [B, H // (16 k), W // (16 k)]} from pixels in [0, 255].

  Attributes:
    sizes: window sides in patches.
    source: EfficientNet weight source ('pypi', 'timm', 'timm_tf'), which fixes padding,
      BatchNorm eps and input normalisation (see efficientnet.SOURCES).
    hidden: width of the per-size MLP.
    train_backbone: when False the EfficientNet is frozen: BatchNorm in inference mode and no
      gradient into it (only the window heads learn; much cheaper on a CPU).
  """
  sizes: Sequence[int] = (2, 4, 8, 16)
  patch_size: int = 16
  source: str = "pypi"
  hidden: int = 128
  train_backbone: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train=False):
    b, h, w, _ = images.shape
    gh, gw = h // self.patch_size, w // self.patch_size
    if self.source not in efficientnet.SOURCES:
      raise ValueError(f"policy source {self.source!r}: use one of {list(efficientnet.SOURCES)}")
    model_kw, convention = efficientnet.SOURCES[self.source]
    backbone = efficientnet.EfficientNetLite0(**model_kw, out_indices=(4,), dtype=self.dtype,
                                              name="backbone")
    x = efficientnet.normalize(images, convention)
    if per_image_features(train, self.is_initializing()):
      f = nn.scan(lambda mdl, carry, xi: (carry, mdl(xi[None], train=False)[0][0][0]),
                  variable_broadcast=True, split_rngs={"params": False})(backbone, None, x)[1]
    else:
      (f,), _ = backbone(x, train=train and self.train_backbone)
    f = f.astype(jnp.float32)
    if not self.train_backbone:
      f = jax.lax.stop_gradient(f)
    out = {}
    for k in self.sizes:
      nh, nw, r = gh // k, gw // k, k // 2   # the stride-32 map has one cell per 2x2 patches
      if nh == 0 or nw == 0:
        out[k] = jnp.zeros((b, nh, nw), jnp.float32)
        continue
      win = f[:, :nh * r, :nw * r].reshape(b, nh, r, nw, r, f.shape[-1])
      pooled = jnp.concatenate([win.mean(axis=(2, 4)), win.max(axis=(2, 4))], axis=-1)
      y = nn.relu(nn.Dense(self.hidden, name=f"hidden_{k}")(pooled))
      out[k] = nn.Dense(1, name=f"logit_{k}")(y)[..., 0]
    return out


NEVER_LOGIT = -30.0  # σ(-30) ≈ 1e-13: below any threshold


def add_unseen_sizes(params, sizes=(2, 4, 8, 16)):
  """PolicyNet params with a head for every window size in `sizes`.

  Flax creates hidden_k/logit_k only when a k x k window fits the image, so a policy trained
  on small crops (CamVid cpu: 176x240, no 16x16 window) cannot run on larger images. The heads
  added here score every window NEVER_LOGIT: those windows never merge, as in training.
  """
  have = [k for k in sizes if f"logit_{k}" in params]
  if not have or len(have) == len(sizes):
    return params
  hidden, logit = params[f"hidden_{have[0]}"], params[f"logit_{have[0]}"]
  out = dict(params)
  for k in sizes:
    if k not in have:
      out[f"hidden_{k}"] = jax.tree.map(jnp.zeros_like, dict(hidden))
      out[f"logit_{k}"] = dict(kernel=jnp.zeros_like(logit["kernel"]),
                               bias=jnp.full_like(logit["bias"], NEVER_LOGIT))
  return out


def policy_loss(logits, targets, ignore=255):
  """Mean binary cross-entropy per window size (targets 0/1, `ignore` skipped), summed."""
  total, metrics = 0.0, {}
  for k, z in logits.items():
    t = targets[k]
    valid = t != ignore
    y = (t == 1).astype(jnp.float32)
    bce = jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))
    loss = jnp.sum(jnp.where(valid, bce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    total += loss
    metrics[f"policy_loss_{k}"] = loss
  metrics["policy_loss"] = total
  return total, metrics


def policy_counts(logits, targets, thresholds, ignore=255):
  """Per-size counts (tp, fp, fn, tn) at thresholds {k: τ_k} for accuracy/precision/recall."""
  out = {}
  for k, z in logits.items():
    valid = targets[k] != ignore
    pred = (1 / (1 + jnp.exp(-z))) > thresholds[k]
    pos = targets[k] == 1
    out[k] = jnp.stack([jnp.sum(valid & pred & pos), jnp.sum(valid & pred & ~pos),
                        jnp.sum(valid & ~pred & pos), jnp.sum(valid & ~pred & ~pos)])
  return out
