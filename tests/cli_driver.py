"""Runs command lines of step_jax.cli modules, each in a forked copy of this process (the
heavy imports are paid once), and prints one JSON line per command line: its exit status
and what it wrote to stderr. Used by test_cli_errors.py:

  python tests/cli_driver.py '<json list of [module, [args...], {env}]>'
"""
import importlib
import json
import os
import sys
import tempfile

MODULES = ("train", "evaluate", "export", "flops", "benchmark", "profile", "train_policy",
           "segment")


def run_forked(module, args, env):
  err = tempfile.TemporaryFile()
  pid = os.fork()
  if pid == 0:   # the child: the command line as `python -m step_jax.cli.<module> ARGS`
    os.dup2(err.fileno(), 2)
    os.environ.update(env)
    sys.argv = [f"step_jax.cli.{module}"] + list(args)
    try:
      importlib.import_module(f"step_jax.cli.{module}").run()
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else int(e.code is not None)   # None: success
    except BaseException:   # pylint: disable=broad-except
      import traceback   # pylint: disable=g-import-not-at-top
      traceback.print_exc()
      code = 1
    sys.stderr.flush()
    os._exit(code)   # pylint: disable=protected-access
  _, status = os.waitpid(pid, 0)
  err.seek(0)
  return os.waitstatus_to_exitcode(status), err.read().decode(errors="replace")


def main():
  for m in MODULES:
    importlib.import_module(f"step_jax.cli.{m}")
  for module, args, env in json.loads(sys.argv[1]):
    code, stderr = run_forked(module, args, env)
    print(json.dumps(dict(module=module, args=args, code=code, stderr=stderr)), flush=True)


if __name__ == "__main__":
  main()
