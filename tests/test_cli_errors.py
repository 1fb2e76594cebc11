"""Every command turns a user error into one line `error: <what is wrong>` and exit status 2;
the traceback only with --traceback or STEP_JAX_TRACEBACK=1. The command lines run in forked
copies of one process (tests/cli_driver.py), and two as real `python -m` commands."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/step.py:method=step,variant=Mu/16,dataset=synthetic,smoke"
CAMVID = "--config=configs/camvid.py:method=segvit,size=cpu"


def _cases(tmp):
  """[(module, args, what stderr's error line must contain)]."""
  a_file = os.path.join(tmp, "a_file")
  open(a_file, "w").close()
  truncated = os.path.join(tmp, "truncated")
  os.makedirs(truncated)
  with open(os.path.join(truncated, "config.json"), "w") as f:
    f.write('{"model": {"variant": "Mu/16", "out_la')
  no_ckpt = os.path.join(tmp, "no_ckpt")
  os.makedirs(no_ckpt)
  subprocess.run([sys.executable, "-c", "import json, sys; from configs import step; "
                  "c = step.get_config('method=segvit,variant=Mu/16,dataset=synthetic,smoke');"
                  f"json.dump(c.to_dict(), open({os.path.join(no_ckpt, 'config.json')!r}, 'w'))"],
                 cwd=REPO, check=True)
  wd = f"--workdir={os.path.join(tmp, 'wd')}"
  return [
      ("train", [SMOKE, f"--workdir={a_file}"], f"workdir {a_file} exists and is a file"),
      ("train", [SMOKE, f"--workdir={a_file}/sub"], "is a file"),
      ("train", [CAMVID, wd, "--config.data.data_dir=/no/such/folder"], "/no/such/folder"),
      ("train", [SMOKE, wd, "--config.batch_size=0"], "batch_size=0 must be a positive"),
      ("train", [SMOKE, wd, "--config.model.some_key=1"],
       "--config.model.some_key: the config has no key 'some_key'"),
      ("train", [SMOKE], "--workdir"),
      ("train", ["--config=configs/step.py:method=step,exit=8", wd],
       "unknown config argument 'exit'"),
      ("train", ["--config=configs/step.py:method=foo", wd], "unknown method 'foo'"),
      ("train", [SMOKE, wd, "--config.model.exit_head=atm"], "renamed 'atm_shallow_first'"),
      ("train", [SMOKE, wd, "--config.model.dtype=float64"], "model.dtype='float64'"),
      ("train", [SMOKE, wd, "stray"], "unexpected arguments"),
      ("evaluate", [f"--workdir={tmp}/missing"], f"{tmp}/missing"),
      ("evaluate", [f"--workdir={truncated}"], f"{truncated}/config.json is not valid JSON"),
      ("evaluate", [f"--workdir={no_ckpt}", "--config.data.splitt=val"],
       "--config.data.splitt: "),
      ("evaluate", [f"--workdir={no_ckpt}", "--step=abc"], "--step"),
      ("evaluate", [f"--workdir={no_ckpt}", "--config.eval_batch_size"],
       "write config overrides as --config.eval_batch_size=VALUE"),
      ("export", [f"--workdir={truncated}", f"--out={tmp}/out"], "is not valid JSON"),
      ("flops", ["--config=configs/step.py:method=segvit,variant=X/16"], "'X/16'"),
      ("benchmark", [SMOKE, "--dtype=fp64"], "--dtype"),
      ("train_policy", ["--config=configs/policy.py:dataset=synthetic", f"--workdir={a_file}"],
       "is a file"),
  ]


def _drive(cases, env=None):
  spec = json.dumps([[m, args, env or {}] for m, args, *_ in cases])
  res = subprocess.run([sys.executable, os.path.join(REPO, "tests", "cli_driver.py"), spec],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=REPO))
  assert res.returncode == 0, res.stderr[-3000:]
  return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def _error_line(stderr):
  lines = [l for l in stderr.splitlines() if l.strip()]
  return lines[-1] if lines else ""


def test_user_errors_are_one_line_and_status_2(tmp_path):
  cases = _cases(str(tmp_path))
  results = _drive(cases)
  assert len(results) == len(cases) >= 15
  for (module, args, want), r in zip(cases, results):
    where = f"{module} {' '.join(args)}:\n{r['stderr'][-2000:]}"
    assert r["code"] == 2, where
    assert "Traceback" not in r["stderr"], where
    line = _error_line(r["stderr"])
    assert line.startswith("error: ") and want in line, where
    assert sum(l.startswith("error: ") for l in r["stderr"].splitlines()) == 1, where


def test_traceback_on_request(tmp_path):
  a_file = str(tmp_path / "a_file")
  open(a_file, "w").close()
  case = ("train", [SMOKE, f"--workdir={a_file}"])
  flag, env = _drive([("train", case[1] + ["--traceback"])]), _drive([case],
                                                                    {"STEP_JAX_TRACEBACK": "1"})
  for (r,) in (flag, env):
    assert r["code"] != 0 and "Traceback" in r["stderr"] and "NotADirectoryError" in r["stderr"]


@pytest.mark.parametrize("module,args,want", [
    ("step_jax.cli.train", [SMOKE, "--workdir=/tmp/x", "--config.model.some_key=1"],
     "--config.model.some_key: the config has no key 'some_key'"),
    ("step_jax.cli.evaluate", ["--workdir=/no/such/workdir"], "/no/such/workdir"),
])
def test_real_commands(module, args, want):
  res = subprocess.run([sys.executable, "-m", module] + args, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
  assert _error_line(res.stderr).startswith("error: ") and want in res.stderr


def test_load_names_a_truncated_config(tmp_path):
  import step_jax   # pylint: disable=g-import-not-at-top
  (tmp_path / "config.json").write_text('{"model": {"variant": "Mu/16", "out_la')
  with pytest.raises(ValueError, match=f"{tmp_path}/config.json is not valid JSON"):
    step_jax.load(str(tmp_path))
