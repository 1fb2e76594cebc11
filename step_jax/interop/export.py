"""Exports a trained model for use without the training code.

  python -m step_jax.cli.export --workdir=DIR --out=OUT [--formats=jax,msgpack,safetensors,tf]

writes into OUT:
  config.json         the run's config (`step_jax.load(OUT)` rebuilds the Flax model)
  export.json         input size, outputs, platforms, versions
  params.msgpack      flax variables {'params', 'batch_stats' (policy net)} (flax.serialization)
  params.safetensors  the same arrays under '/'-joined names ('params/backbone/...')
  model.jaxexport     `jax.export` of the whole inference function: policy net, merge,
                      encoder, exits, heads and the upsampled prediction, for CPU and CUDA
  saved_model/        a TF SavedModel through jax2tf (with 'tf' in --formats; needs TensorFlow;
                      TF 2.21 runs SegViT/dCTS exports but not early exits, see save_tf)

The artifact takes the variables as its first argument (not baked in as constants: a ViT-L
would exceed the 2 GB protobuf limit) and runs with jax and flax alone:

  exp = jax.export.deserialize(open("OUT/model.jaxexport", "rb").read())
  variables = flax.serialization.msgpack_restore(open("OUT/params.msgpack", "rb").read())
  out = exp.call(variables, images)   # float32 [B, H, W, 3] in 0..255, H, W as export.json
  out["pred"] int32 [B, H, W], out["scores"] float32 [B, H, W, C], and the token maps
  (level, halt_stage, num_tokens, ...; see step_jax.api.inference_fn)

Batch size is symbolic: one artifact serves every batch size. The capacity buckets are
chosen on device from the largest token count in the batch (`lax.switch`), so the branch
count and every shape except the batch are static, which is what shape polymorphism needs.
Height and width are fixed (the token capacities, pyramid tables and position embedding
depend on the grid); export another size with --image_size.
"""
import importlib.util
import json
import os

from flax import serialization
import jax
from jax import export
import jax.numpy as jnp
import numpy as np

from step_jax import api
from step_jax.models import pretrained
from step_jax.models import variables as variables_lib

FORMATS = ("jax", "msgpack", "safetensors", "tf")


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def export_inference(model, variables, image_hw, *, platforms=("cpu", "cuda"), batch=None):
  """`jax.export.Exported` of api.inference_fn(model) for images [batch, H, W, 3].

  batch None: a symbolic dimension 'b' (any batch size at call time).
  """
  if getattr(model, "merge", "none") == "oracle":
    raise ValueError("merge='oracle' reads labels; it cannot be exported for inference")
  if model.backbone.attention_impl in ("auto", "cpu_fused"):
    # The fused CPU attention is a custom call registered by this process: the artifact takes
    # the plain JAX paths, which run anywhere.
    model = model.clone(backbone=model.backbone.clone(attention_impl="portable"))
  fn = api.inference_fn(model)
  b = export.symbolic_shape("b")[0] if batch is None else int(batch)
  images = jax.ShapeDtypeStruct((b, *image_hw, 3), jnp.float32)
  return export.export(jax.jit(lambda v, x: fn(v, x)), platforms=tuple(platforms))(
      _abstract(variables), images)


def flatten(variables):
  """{'params/backbone/...': array} (numpy), the safetensors layout."""
  return pretrained.flatten(variables)


def save_params(out, variables, formats):
  """Writes params.msgpack and/or params.safetensors."""
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), variables)
  if "msgpack" in formats:
    with open(os.path.join(out, api.MSGPACK), "wb") as f:
      f.write(serialization.msgpack_serialize(host))
  if "safetensors" in formats:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file({k: np.ascontiguousarray(v) for k, v in flatten(host).items()},
              os.path.join(out, api.SAFETENSORS))


def save_tf(path, model, variables, image_hw, platforms=("cpu", "cuda")):
  """TF SavedModel of the inference function (jax2tf, native serialization, symbolic batch):
  `tf.saved_model.load(path).serve(images)` → dict of tensors; the variables are tf.Variables."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  fn = api.inference_fn(model)
  converted = jax2tf.convert(lambda v, x: fn(v, x), polymorphic_shapes=[None, "(b, ...)"],
                             native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.variables_tree = tf.nest.map_structure(
      lambda x: tf.Variable(np.asarray(jax.device_get(x)), trainable=False), variables)

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, *image_hw, 3], tf.float32, name="images")])
  def serve(images):
    return converted(module.variables_tree, images)

  module.serve = serve
  try:  # TF deserializes the StableHLO only when it runs it: fail here, not when serving
    serve(tf.zeros([1, *image_hw, 3], tf.float32))
  except Exception as e:  # pylint: disable=broad-except  (tf.errors.* or InvalidArgumentError)
    raise RuntimeError(
        f"TensorFlow {tf.__version__} cannot run the StableHLO that JAX {jax.__version__} "
        f"wrote ({str(e).strip().splitlines()[0][:200]}). Early-exit models use top_k, which "
        "TensorFlow 2.21 cannot read from JAX 0.10; use the jax artifact (--formats=jax) or "
        "a TensorFlow with a newer StableHLO.") from e
  tf.saved_model.save(module, path, signatures={"serving_default": serve})


def export_model(config, variables, out, *, formats=("jax", "msgpack"), platforms=("cpu", "cuda"),
                 image_size=None, batch=None, model=None):
  """Writes everything for `formats` into `out`; returns the export.json dict."""
  unknown = set(formats) - set(FORMATS)
  if unknown:
    raise ValueError(f"unknown export formats {sorted(unknown)}; choose from {FORMATS}")
  config = api.get_config(config)
  model = model or api.create_model(config)
  hw = tuple(int(s) for s in (image_size or config.data.image_size))
  patch = model.backbone.patch_size
  if hw[0] % patch or hw[1] % patch:
    raise ValueError(f"image_size {hw} must be a multiple of the patch size {patch}")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, api.CONFIG_JSON), "w") as f:
    json.dump(config.to_dict(), f, indent=1, default=str)
  save_params(out, variables, formats)
  meta = dict(image_size=list(hw), patch_size=patch, num_classes=int(config.num_classes),
              exit_layers=list(model.exit_layers), merge=model.merge,
              pixel_mean=list(model.pixel_mean), pixel_std=list(model.pixel_std),
              input="images float32 [batch, H, W, 3], raw pixels in 0..255",
              batch="symbolic" if batch is None else int(batch),
              formats=list(formats), jax_version=jax.__version__)
  if "jax" in formats:
    exp = export_inference(model, variables, hw, platforms=platforms, batch=batch)
    with open(os.path.join(out, api.ARTIFACT), "wb") as f:
      f.write(exp.serialize())
    # Output names → shapes as the artifact states them ('b' is the symbolic batch).
    meta.update(platforms=list(exp.platforms), outputs=jax.tree_util.tree_unflatten(
        exp.out_tree, [str(a) for a in exp.out_avals]))
  if "tf" in formats:
    save_tf(os.path.join(out, "saved_model"), model, variables, hw, platforms)
  with open(os.path.join(out, api.EXPORT_JSON), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def _have(module):
  return importlib.util.find_spec(module) is not None


def export_workdir(config, workdir, out, *, step=None, formats=("jax", "msgpack"),
                   platforms=("cpu", "cuda"), image_size=None, batch=None):
  """Exports the latest (or `step`) checkpoint of a training workdir into `out` (see the
  module doc); returns export.json's dict."""
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    raise ValueError(f"unknown export formats {unknown}; choose from {FORMATS}")
  if "safetensors" in formats and not _have("safetensors"):
    raise ValueError("formats=safetensors needs the safetensors package "
                     "(pip install safetensors)")
  if "tf" in formats and not _have("tensorflow"):
    raise ValueError("formats=tf needs TensorFlow: pip install -r requirements-tf.txt")
  variables = variables_lib.load(config, workdir, step)
  return export_model(config, variables, out, formats=formats, platforms=platforms,
                      image_size=image_size, batch=batch)
