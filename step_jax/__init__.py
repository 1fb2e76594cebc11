"""STEP (supertokens + early pruning) for ViT semantic segmentation, in JAX/Flax.

  import step_jax
  model, variables = step_jax.load("WORKDIR_OR_EXPORT")
  pred, info = step_jax.segment(model, variables, image)

The package root is the top layer: it re-exports the Python API (step_jax/api.py).
"""
from step_jax.api import build
from step_jax.api import load
from step_jax.api import segment

__all__ = ["build", "load", "segment"]
