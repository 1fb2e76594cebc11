"""Config arguments and command lines that fail say which argument and what form it takes;
asking for help is not an error."""
import os
import subprocess
import sys

import pytest

from configs import camvid
from configs import step as step_config
from step_jax.training import train
from step_jax.models import variables as variables_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", ["step_jax.cli.train", "step_jax.cli.evaluate"])
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
    variables_lib.create_model(cfg)


def test_unknown_config_argument_lists_the_allowed_ones():
  with pytest.raises(ValueError, match=r"unknown config argument 'exit'; allowed: \[.*'exits'"):
    step_config.get_config("method=step,exit=8")


def test_config_from_a_workdir_with_overrides(tmp_path):
  from step_jax.cli import common as cli
  from step_jax.runtime import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  cfg = step_config.get_config("method=step,variant=Mu/16,dataset=synthetic,smoke")
  ckpt_lib.write_json(str(tmp_path / "config.json"), cfg.to_dict())
  argv = ["prog", f"--workdir={tmp_path}", "--config.data.split=test",
          "--config.model.exit_threshold=0.5", "--config.batch_size=4",
          "--config.data.image_size=(64, 64)", "--config.model.remat=true"]
  taken = cli.take_config_args(argv)
  assert argv == ["prog", f"--workdir={tmp_path}"]          # absl never sees the overrides
  got = cli.config_from(None, str(tmp_path), taken)
  assert (got.data.split, got.model.exit_threshold, got.batch_size, tuple(got.data.image_size),
          got.model.remat) == ("test", 0.5, 4, (64, 64), True)
  # The workdir's config.json given as --config works the same way.
  argv = ["prog", f"--config={tmp_path}/config.json", "--config.data.split=val"]
  assert cli.config_from(None, None, cli.take_config_args(argv)).data.split == "val"
  # A Python config keeps absl's own handling of the overrides.
  argv = ["prog", "--config=configs/step.py:smoke", "--config.data.split=val"]
  assert cli.take_config_args(argv) == ("", []) and len(argv) == 3


@pytest.mark.parametrize("override, message", [
    ("--config.data.nope=1", r"--config.data.nope: .*config.json has no key 'nope' there"),
    ("--config.nosection.x=1", "has no section 'nosection'"),
    ("--config.batch_size=many", r"--config.batch_size='many' cannot be read as a int"),
    ("--config.model.remat=maybe", "cannot be read as a bool"),
    ("--config.batch_size", "write config overrides as --config.batch_size=VALUE"),
])
def test_bad_overrides_name_the_key(tmp_path, override, message):
  from step_jax.cli import common as cli
  from step_jax.runtime import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  cfg = step_config.get_config("method=segvit,variant=Mu/16,dataset=synthetic,smoke")
  ckpt_lib.write_json(str(tmp_path / "config.json"), cfg.to_dict())
  with pytest.raises(ValueError, match=message):
    cli.config_from(None, str(tmp_path), cli.take_config_args(["prog", override]))


def test_missing_workdir_config_is_named(tmp_path):
  from step_jax.cli import common as cli
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/config.json does not exist"):
    cli.config_from(None, str(tmp_path), ("", []))
  with pytest.raises(ValueError, match="give --config="):
    cli.config_from(None, None, ("", []))


def test_evaluate_runs_from_the_workdir_alone_with_overrides(tmp_path):
  """`evaluate --workdir=DIR --config.data.split=...` without retyping the config spec."""
  from test_export import _tiny_segvit, make_workdir  # pylint: disable=g-import-not-at-top
  make_workdir(tmp_path, _tiny_segvit())
  res = subprocess.run(
      [sys.executable, "-m", "step_jax.cli.evaluate", f"--workdir={tmp_path}",
       "--config.data.split=train", "--config.data.num_train=3"], cwd=REPO,
      capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  out = json.load(open(tmp_path / "eval_train.json"))
  assert out["split"] == "train" and out["images"] == 3


def _tiny_train_config():
  cfg = step_config.get_config("method=segvit,variant=Mu/16,dataset=synthetic,smoke")
  cfg.data.update(image_size=(32, 32), num_train=8, num_eval=2)
  cfg.model.update(posemb_grid=(2, 2), head_layers=1)
  return cfg


def test_a_rejected_run_leaves_nothing_behind(tmp_path):
  cfg = _tiny_train_config()
  cfg.nan_policy = "ignore"
  with pytest.raises(ValueError, match="nan_policy='ignore'"):
    train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  cfg = _tiny_train_config()
  cfg.prune_from_step = 10
  cfg.model.exit_layers = (2,)
  cfg.optim.total_steps = 5
  with pytest.raises(ValueError, match="prune_from_step=10 must lie in"):
    train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_workdir_that_is_a_file_or_unwritable(tmp_path, monkeypatch):
  from step_jax.runtime import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from step_jax.evaluation import evaluator as evaluate
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError, match="exists and is a file"):
    train.train_and_evaluate(_tiny_train_config(), str(tmp_path / "file"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    evaluate.evaluate_checkpoint(_tiny_train_config(), str(tmp_path / "missing"))
  real_open = open

  def read_only(path, *a, **k):   # root ignores chmod, so refuse writes here instead
    if ".write_test_" in str(path):
      raise PermissionError(13, "Permission denied")
    return real_open(path, *a, **k)
  monkeypatch.setattr("builtins.open", read_only)
  with pytest.raises(PermissionError, match="is not writable"):
    ckpt_lib.prepare_workdir(str(tmp_path))
  monkeypatch.setattr("builtins.open", real_open)
  with pytest.raises(OSError, match="MiB free"):
    ckpt_lib.prepare_workdir(str(tmp_path), min_free_bytes=2**62)


@pytest.mark.slow   # a whole CLI training run: 30-90 s on 2 cores
def test_training_console_is_short_and_the_parameter_table_goes_to_the_workdir(tmp_path):
  overrides = ["--config.data.image_size=(32,32)", "--config.data.num_train=8",
               "--config.data.num_eval=2", "--config.model.posemb_grid=(2,2)",
               "--config.model.head_layers=1", "--config.optim.total_steps=6",
               "--config.optim.warmup_steps=1", "--config.log_every=2",
               "--config.eval_every=0", "--config.checkpoint_every=3"]
  res = subprocess.run(
      [sys.executable, "-m", "step_jax.cli.train",
       "--config=configs/step.py:method=segvit,variant=Mu/16,dataset=synthetic,smoke",
       f"--workdir={tmp_path}", *overrides], cwd=REPO, capture_output=True, text=True,
      timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  lines = (res.stdout + res.stderr).strip().splitlines()
  assert len(lines) <= 20, "\n".join(lines)
  assert "ETA after compiling" in res.stdout and " s\n" in res.stdout   # then a real ETA
  assert "final val mIoU" in res.stdout
  assert "head/queries" in (tmp_path / "parameters.txt").read_text()


def test_data_root_from_the_environment(tmp_path, monkeypatch):
  from configs import common  # pylint: disable=g-import-not-at-top
  from step_jax.data import sources  # pylint: disable=g-import-not-at-top
  (tmp_path / "camvid_segnet" / "CamVid").mkdir(parents=True)
  monkeypatch.setenv("STEP_JAX_DATA", str(tmp_path))
  assert camvid.get_config("method=segvit").data.data_dir == str(tmp_path / "camvid_segnet")
  with pytest.raises(FileNotFoundError, match="STEP_JAX_DATA"):
    sources.camvid_root("")
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/nothing does not exist.*"
                     "STEP_JAX_DATA"):
    sources.camvid_root(str(tmp_path / "nothing"))
  assert common.default_data_dir("no_such_dataset") == ""
