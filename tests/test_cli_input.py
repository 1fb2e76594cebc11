"""Config arguments and command lines that fail say which argument and what form it takes;
asking for help is not an error."""
import os
import subprocess
import sys

import pytest

from configs import camvid
from configs import step as step_config
from step_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", ["step_jax.main", "step_jax.evaluate"])
def test_help_exits_zero_and_lists_the_flags(module):
  res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "--workdir" in res.stdout and "--config" in res.stdout


@pytest.mark.parametrize("tau", ["-1-2-3-4", "0.6-0.8-x-0.9", "68", "6899a"])
def test_bad_tau_names_the_argument_and_the_form(tau):
  with pytest.raises(ValueError, match=rf"config argument tau='{tau}': give 4 digits"):
    step_config.get_config(f"method=step,variant=Mu/16,dataset=synthetic,tau={tau}")


@pytest.mark.parametrize("get", [
    lambda t: step_config.get_config(f"method=step,variant=Mu/16,dataset=synthetic,exit_tau={t}"),
    lambda t: camvid.get_config(f"method=step,exit_tau={t}")])
@pytest.mark.parametrize("tau", ["-0.5", "1.5"])
def test_exit_tau_outside_0_1_is_refused(get, tau):
  with pytest.raises(ValueError, match=f"config argument exit_tau={float(tau):g} must lie in"):
    get(tau)


def test_smoke_keeps_the_users_exits():
  cfg = step_config.get_config("method=step,variant=Mu/16,dataset=synthetic,smoke,exits=3")
  assert tuple(cfg.model.exit_layers) == (3,)
  cfg = step_config.get_config("method=step,variant=Mu/16,dataset=synthetic,smoke")
  assert tuple(cfg.model.exit_layers) == (2,)
  cfg = step_config.get_config("method=step,variant=Mu/16,dataset=synthetic,smoke,exits=30")
  with pytest.raises(ValueError, match=r"exit_layers=\(30,\) must be increasing 1-based "
                     "layers below the depth 4"):
    train.create_model(cfg)


def test_unknown_config_argument_lists_the_allowed_ones():
  with pytest.raises(ValueError, match=r"unknown config argument 'exit'; allowed: \[.*'exits'"):
    step_config.get_config("method=step,exit=8")
