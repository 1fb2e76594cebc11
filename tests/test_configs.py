"""Every config builds, and its model has the shapes the paper's model has (eval_shape only)."""
import jax
import jax.numpy as jnp
import pytest

from configs import common
from configs import segvit
from step_jax.data import datasets
from step_jax.models import variables as variables_lib


VARIANTS = ("Ti/16", "S/16", "B/16", "L/16")
# Every dataset and every variant once by default; the whole cross product with -m slow.
_ONCE = {(d, VARIANTS[i % len(VARIANTS)]) for i, d in enumerate(sorted(datasets.DATASETS))}
_PAIRS = [(d, v) if (d, v) in _ONCE else pytest.param(d, v, marks=pytest.mark.slow)
          for d in sorted(datasets.DATASETS) for v in VARIANTS]


@pytest.mark.parametrize("dataset,variant", _PAIRS)
def test_segvit_configs_build(dataset, variant):
  cfg = segvit.get_config(f"variant={variant},dataset={dataset}")
  assert cfg.num_classes == datasets.DATASETS[dataset].num_classes
  model = variables_lib.create_model(cfg)
  h, w = cfg.data.image_size
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, h, w, 3)))
  head = shapes["params"]["head"]
  assert head["queries"].shape == (cfg.num_classes, cfg.model.head_dim)
  assert head["class_embed"]["kernel"].shape == (cfg.model.head_dim, cfg.num_classes + 1)


def test_paper_param_counts():
  """ViT-B/16 backbone has ~86M parameters, ViT-L/16 ~303M (no CLS token, no classifier)."""
  for variant, lo, hi in [("B/16", 85e6, 87.5e6), ("L/16", 302e6, 306e6)]:
    cfg = segvit.get_config(f"variant={variant},dataset=ade20k,res=224")
    shapes = jax.eval_shape(variables_lib.create_model(cfg).init, jax.random.key(0),
                            jnp.zeros((1, 224, 224, 3)))
    n = sum(x.size for x in jax.tree.leaves(shapes["params"]["backbone"]))
    assert lo < n < hi, (variant, n)


def test_parse_arg_errors_are_clear():
  with pytest.raises(ValueError, match="unknown config argument 'resolution'"):
    segvit.get_config("resolution=512")
  with pytest.raises(ValueError, match="unknown dataset"):
    segvit.get_config("dataset=pascal")
  with pytest.raises(ValueError, match="unknown variant"):
    segvit.get_config("variant=H/14")
  with pytest.raises(ValueError, match="must be true or false"):
    segvit.get_config("smoke=maybe")


def test_out_layers_beyond_depth_is_an_error():
  cfg = segvit.get_config("variant=B/16,dataset=ade20k")
  cfg.model.out_layers = (6, 8, 13)
  with pytest.raises(ValueError, match="out_layers"):
    variables_lib.create_model(cfg)
