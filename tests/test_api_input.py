"""Bad input at the Python API (step_jax.segment) and the exported model: each case raises the
right error type with a message that names the problem, before anything is compiled."""
import numpy as np
import pytest

import step_jax
from step_jax import api
from step_jax.interop import export
from test_export import _tiny_segvit  # pylint: disable=g-bad-import-order

RNG = np.random.default_rng(0)
GOOD = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def flax_model():
  return step_jax.build(_tiny_segvit())


@pytest.fixture(scope="module")
def exported_model(flax_model, tmp_path_factory):
  _, variables = flax_model
  folder = str(tmp_path_factory.mktemp("export"))
  export.export_model(_tiny_segvit(), variables, folder, formats=("jax", "msgpack"),
                      image_size=(32, 32))
  return step_jax.load(folder, exported=True)


def _nan(x):
  x = x.astype(np.float32)
  x[3, 4, 1] = np.nan
  return x


def _inf(x):
  x = x.astype(np.float32)
  x[0, 0, 0] = np.inf
  return x


BAD = {  # name: (images, error type, pattern the message must contain)
    "nan": (_nan(GOOD), ValueError, "1 NaN/Inf values"),
    "inf": (_inf(GOOD), ValueError, "NaN/Inf"),
    "uint16": (GOOD.astype(np.uint16) * 257, ValueError, "uint16"),
    "uint16_small_values": (GOOD.astype(np.uint16), ValueError, "16-bit"),
    "bool": (GOOD > 128, ValueError, "dtype bool"),
    "negative_ints": (GOOD.astype(np.int32) - 128, ValueError, r"values in \[-128"),
    "int_above_255": (GOOD.astype(np.int32) * 2, ValueError, "expected pixels in"),
    "floats_0_1": (GOOD.astype(np.float32) / 255, ValueError, "multiply by 255"),
    "negative_floats": (GOOD.astype(np.float32) - 300, ValueError, "expected pixels in"),
    "complex": (GOOD.astype(np.complex64), ValueError, "dtype complex64"),
    "empty": (np.zeros((0, 0, 3), np.uint8), ValueError, "empty input"),
    "empty_batch": (np.zeros((0, 32, 32, 3), np.uint8), ValueError, "empty input"),
    "grayscale": (GOOD[..., :1], ValueError, "grayscale"),
    "rgba": (np.concatenate([GOOD, GOOD[..., :1]], -1), ValueError, "RGBA"),
    "two_dims": (GOOD[..., 0], ValueError, "expected an image"),
    "five_dims": (GOOD[None, None], ValueError, "expected an image"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_segment_refuses_bad_images(flax_model, case):
  model, variables = flax_model
  images, error, pattern = BAD[case]
  with pytest.raises(error, match=pattern):
    step_jax.segment(model, variables, images)


@pytest.mark.parametrize("case", ["nan", "uint16", "bool", "negative_ints", "floats_0_1",
                                  "empty", "rgba"])
def test_exported_model_refuses_bad_images(exported_model, case):
  model, variables = exported_model
  images, error, pattern = BAD[case]
  with pytest.raises(error, match=pattern):
    step_jax.segment(model, variables, images)
  if images.ndim == 3 and images.size:   # calling the wrapper directly checks too
    with pytest.raises(error, match=pattern):
      model(variables, images[None])


def test_exported_model_direct_call_needs_its_size(exported_model):
  model, variables = exported_model
  with pytest.raises(ValueError, match="takes images of 32x32, got 16x32"):
    model(variables, GOOD[None, :16].astype(np.float32))


def test_good_inputs_still_work(flax_model, exported_model):
  for model, variables in (flax_model, exported_model):
    for images in (GOOD, GOOD.astype(np.float32), GOOD.astype(np.int64), np.zeros_like(GOOD)):
      pred, _ = step_jax.segment(model, variables, images)
      assert pred.shape == (32, 32)


def test_labels_of_the_wrong_shape_or_type(flax_model):
  model, variables = flax_model
  with pytest.raises(ValueError, match=r"labels have shape \(16, 32\); expected \(32, 32\)"):
    step_jax.segment(model, variables, GOOD, labels=np.zeros((16, 32), np.int32))
  with pytest.raises(ValueError, match="labels have dtype float32"):
    step_jax.segment(model, variables, GOOD, labels=np.zeros((32, 32), np.float32))


def test_an_image_too_big_for_the_device_is_refused_before_compiling(flax_model, monkeypatch):
  cfg = _tiny_segvit()
  cfg.model.attention_impl = "einsum"   # the [N, N] matrix ('auto' on a CPU: 'chunked' here)
  model, variables = step_jax.build(cfg)
  need = api.memory_estimate(model, 1, 8000, 8000)
  assert need > 100 * 2**30                                  # hundreds of GiB of attention
  assert api.memory_estimate(flax_model[0], 1, 8000, 8000) < need / 20   # chunked
  with pytest.raises(MemoryError, match=r"1x8000x8000 input needs about .* resize to "
                     r"about \d+x\d+") as err:
    api.check_memory(model, 1, 8000, 8000)
  side = int(str(err.value).split("resize to about ")[1].split("x")[0])   # and that fits
  assert api.memory_estimate(model, 1, side, side) <= api.available_memory()
  # segment runs the check before padding or compiling anything.
  monkeypatch.setattr(api, "available_memory", lambda: 2**30)
  with pytest.raises(MemoryError, match="this device has 1.0 GiB"):
    step_jax.segment(model, variables, np.zeros((1, 4096, 4096, 3), np.uint8))
  api.check_memory(model, 1, 512, 512)


def _built(variant, res, impl="einsum", dtype="float32", dataset="cityscapes"):
  from configs import step as step_config   # pylint: disable=g-import-not-at-top
  from step_jax.models import builder   # pylint: disable=g-import-not-at-top
  cfg = step_config.get_config(f"method=segvit,variant={variant},dataset={dataset},res={res}")
  cfg.model.update(attention_impl=impl, dtype=dtype)
  return builder.build(cfg.model, cfg.num_classes, (res, res), cfg.ignore_index)


def test_memory_check_follows_the_attention_path_dtype_and_classes(monkeypatch):
  """ViT-L/16 Cityscapes at 4096², bf16, cuDNN's fused attention (no N x N matrix) fits a
  141 GB device; the einsum path at 8000² does not fit a 23 GiB host."""
  monkeypatch.setattr(api, "available_memory", lambda: 141 * 10**9)
  fused = _built("L/16", 4096, "cudnn", "bfloat16")
  api.check_memory(fused, 1, 4096, 4096)
  einsum = _built("L/16", 4096, "einsum", "bfloat16")
  assert api.memory_estimate(einsum, 1, 4096, 4096) > 141 * 10**9   # 65536² per head
  api.check_memory(_built("L/16", 4096, "chunked"), 1, 4096, 4096)   # no N x N either, fp32
  # The per-pixel fp32 scores grow with the classes: 150 (ADE20K) vs 19 (Cityscapes).
  ade = _built("L/16", 4096, "cudnn", "bfloat16", dataset="ade20k")
  grow = api.memory_estimate(ade, 1, 4096, 4096) - api.memory_estimate(fused, 1, 4096, 4096)
  assert grow >= 2 * (150 - 19) * 4096 ** 2 * 4 * 0.99 - 150 * 1024 * 16 * 4   # head params
  monkeypatch.setattr(api, "available_memory", lambda: 23 * 2**30)
  with pytest.raises(MemoryError, match="einsum attention"):
    api.check_memory(_built("B/16", 512), 1, 8000, 8000)


@pytest.mark.parametrize("impl", ["einsum"] + [pytest.param(i, marks=pytest.mark.slow)
                                                for i in ("chunked", "xla")])
def test_memory_estimate_is_within_2x_of_xla_at_three_sizes(impl):
  """Against XLA's own memory analysis of the compiled forward (nothing runs)."""
  import jax   # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top
  from step_jax.models import segmenter   # pylint: disable=g-import-not-at-top
  for res in (256, 512, 768):
    model = _built("Ti/16", res, impl)
    x = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    forward = lambda v, im, model=model: segmenter.predict_scores(
        model.apply(v, im)[0], im.shape[1:3])
    m = jax.jit(forward).lower(v, x).compile().memory_analysis()
    xla = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    ratio = api.memory_estimate(model, 1, res, res) / xla
    assert 0.5 <= ratio <= 2.0, (impl, res, ratio)
