"""STEP (supertokens + early pruning) for ViT semantic segmentation, in JAX/Flax.

  import step_jax
  model, variables = step_jax.load("WORKDIR_OR_EXPORT")
  pred, info = step_jax.segment(model, variables, image)

Importing the package stays cheap: the functions below import JAX and the model on first use
(see step_jax/api.py).
"""


def load(path, **kw):
  """(model, variables) from a training workdir or an export folder; see `api.load`."""
  from step_jax import api  # pylint: disable=g-import-not-at-top
  return api.load(path, **kw)


def build(config, **kw):
  """(model, random variables) from a config; see `api.build`."""
  from step_jax import api  # pylint: disable=g-import-not-at-top
  return api.build(config, **kw)


def segment(model, variables, images, **kw):
  """(pred, info) for an image or a batch; see `api.segment`."""
  from step_jax import api  # pylint: disable=g-import-not-at-top
  return api.segment(model, variables, images, **kw)
