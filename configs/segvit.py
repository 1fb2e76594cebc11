"""SegViT baseline (plain ViT + ATM head, Zhang et al., NeurIPS'22): configs/step.py with
method=segvit, so the baseline row trains and is evaluated exactly like every STEP row.

  python -m step_jax.cli.train --config=configs/segvit.py:variant=Mu/16,dataset=synthetic,smoke \
      --workdir=/tmp/segvit_smoke
  python -m step_jax.cli.flops --config=configs/segvit.py:variant=L/16,dataset=cityscapes,res=1024

Arguments: those of configs/step.py without `method`.
"""
from configs import step


def get_config(arg=None):
  if "method=" in (arg or ""):
    raise ValueError("configs/segvit.py is method=segvit; use configs/step.py for others")
  return step.get_config(",".join(filter(None, ["method=segvit", arg])))
