"""Where a segmenter's variables come from: the model a config builds, its initial variables,
random ones for benchmarks, and the trained ones of a workdir (for inference: no train state,
no optimizer is built).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from step_jax.models import policy as policy_lib
from step_jax.models import builder
from step_jax.models import segmenter
from step_jax.runtime import checkpoint
from step_jax.runtime import sharding


def create_model(config):
  """The Segmenter `config` describes (config.model, num_classes, crop, ignore_index)."""
  return builder.build(config.model, config.num_classes, tuple(config.data.image_size),
                         ignore_index=config.ignore_index)


def dummy_batch(config, batch=1):
  h, w = config.data.image_size
  return dict(image=jnp.zeros((batch, h, w, 3), jnp.uint8),
              label=jnp.zeros((batch, h, w), jnp.int32))


def _switch_free(model):
  """A segmenter with one token capacity and masked exits: the same parameter shapes, but
  tracing it goes through one path instead of every bucket's switch branch. Shapes only:
  its init draws other values for the layers after the first exit (they sit inside the exit
  switch in compact mode), so a real init uses the model itself (_core_model)."""
  if not isinstance(model, segmenter.Segmenter):
    return model
  return model.clone(buckets=(1.0,), exit_mode="mask")


def _core_model(model):
  """The model without token sharing, for init: the same parameters minus the policy net
  (whose variables never come from a random init) and no labels needed (oracle). Not
  switch-free: a seed keeps drawing the initial weights it drew for the recorded runs."""
  return model.clone(policy=None, merge="none") if model.merge != "none" else model


def abstract_policy_variables(model, config):
  """Shapes of the policy net's variables ({'params', 'batch_stats'}), or None."""
  if model.policy is None:
    return None
  x = dummy_batch(config)["image"].astype(jnp.float32)
  return jax.eval_shape(model.policy.init, jax.random.key(0), x)


def init_variables(model, config, rng, policy_vars=None):
  """Flax variables {'params': ..., 'batch_stats': {'policy': ...}}.

  ViT and heads come from `rng`; a CTS/dCTS policy net must be *trained* (a random one merges
  at random), so its variables are passed in (the trainer loads or trains them). Without
  them (shape-only uses: eval_shape, restoring a checkpoint) zeros stand in.
  """
  x = dummy_batch(config)["image"].astype(jnp.float32)
  variables = {"params": _core_model(model).init(rng, x)["params"]}
  if model.policy is not None:
    if policy_vars is None:
      policy_vars = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 abstract_policy_variables(model, config))
    variables["params"] = dict(variables["params"], policy=policy_vars["params"])
    variables["batch_stats"] = {"policy": policy_vars["batch_stats"]}
  return variables


def random_variables(model, image_hw, seed=0):
  """Variables of `model` drawn with numpy from eval_shape (no compiled init): kernels
  lecun-normal, embeddings N(0, .02), norms 1, biases 0."""
  shapes = jax.eval_shape(_switch_free(model).init, jax.random.key(0),
                          jnp.zeros((1, *image_hw, 3)))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = getattr(path[-1], "key", "")
    if name == "kernel":
      return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
    if name in ("pos_embedding", "queries"):
      return (rng.normal(size=s.shape) * (0.02 if name == "pos_embedding" else 1)).astype(s.dtype)
    return np.full(s.shape, 1.0 if name in ("scale", "var") else 0.0, s.dtype)

  return jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, shapes))


def with_trained_policy(variables, path):
  """`variables` with the policy net of a policy-trainer workdir `path`, given heads for every
  window size (see policy.add_unseen_sizes) so it runs on images larger than its crops."""
  pol = checkpoint.read_policy(path)
  pol = dict(pol, params=policy_lib.add_unseen_sizes(pol["params"]))
  return {col: dict(variables[col], policy=pol[col]) for col in variables}


def restore(config, workdir, step=None, *, model=None, mesh=None):
  """(flax variables, step) of the latest (or `step`) checkpoint of a training workdir,
  placed on `mesh`: {'params', plus 'batch_stats' with a policy net}. Only params and
  model_state are read. A policy net gets heads for window sizes its training crops were too
  small for (they never merge)."""
  mesh = mesh or sharding.make_mesh(config)
  if os.path.isfile(os.path.join(workdir, "config.json")):
    # The policy's window heads depend on the crop size: build at the run's own crop.
    crop = tuple(checkpoint.read_config(workdir).data.image_size)
    if crop != tuple(config.data.image_size):
      config = config.copy_and_resolve_references()
      config.data.image_size, model = crop, None
  model = model or create_model(config)
  abstract = jax.eval_shape(lambda r: init_variables(model, config, r), jax.random.key(0))
  abstract = dict(params=abstract.pop("params"), **({"model_state": abstract} if abstract else {}))
  shardings = sharding.state_shardings(abstract, mesh, config)
  tree, step = checkpoint.restore_subtree(workdir, sharding.with_shardings(abstract, shardings),
                                          step)
  params = tree["params"]
  if "policy" in params:  # runnable on images larger than the training crops
    params = dict(params, policy=policy_lib.add_unseen_sizes(params["policy"]))
  return dict(tree.get("model_state", {}), params=params), step


def load(config, workdir, step=None):
  """Flax variables of a workdir's checkpoint (see `restore`); config None reads
  <workdir>/config.json."""
  return restore(config or checkpoint.read_config(workdir), workdir, step)[0]
