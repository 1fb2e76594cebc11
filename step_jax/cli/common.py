"""What every command-line module shares: --help listing, quiet logging, user errors as one
line, and configs from a Python file, a .json or a workdir with --config.a.b=value
overrides."""
import ast
import functools
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from step_jax.runtime import checkpoint


def list_flags_in_help(module_name: str):
  """Console scripts (`step-train` …) run a wrapper script as sys.argv[0], and absl's --help
  lists only that script's flags; list the flags `module_name` defined under it too, and
  answer --help with status 0."""
  listed = {f.name for f in flags.FLAGS.get_flags_for_module(sys.argv[0])}
  for f in flags.FLAGS.get_flags_for_module(module_name):
    if f.name not in listed:
      flags.FLAGS.register_flag_by_module(sys.argv[0], f)
  if any(a in ("--help", "-h", "-?", "--helpshort") for a in sys.argv[1:]):
    # absl exits with status 1 after --help; asking for help is not an error.
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)


def quiet_by_default(argv=None):
  """Third-party INFO logging (orbax, grain, jax, clu) off unless asked for: absl's
  --verbosity (-v) defaults to WARNING here; `-v 0` (or --verbosity=0) shows INFO again.
  Warnings that matter (checkpoint fallbacks, skipped records, NaN skips) still show."""
  argv = sys.argv if argv is None else argv
  if not any(a.startswith(("--verbosity", "-v")) for a in argv[1:]):
    argv.append("--verbosity=-1")


def take_config_args(argv=None):
  """Takes from `argv` (default sys.argv, edited in place) what absl's config flag cannot
  handle without a Python config: `--config=<path>.json` (e.g. a workdir's config.json) and
  `--config.a.b=value` overrides. With a Python `--config=file.py[:args]` nothing is taken
  (absl applies the overrides). Returns (json path or '', [(dotted key, value string)])."""
  argv = sys.argv if argv is None else argv
  if any(a.startswith("--config=") and not a.endswith(".json") for a in argv[1:]):
    return "", []
  path, overrides, keep = "", [], argv[:1]
  for a in argv[1:]:
    if a.startswith("--config=") and a.endswith(".json"):
      path = a.split("=", 1)[1]
    elif a.startswith("--config."):
      key, eq, value = a[len("--config."):].partition("=")
      if not eq:
        raise ValueError(f"{a}: write config overrides as --config.{key}=VALUE")
      overrides.append((key, value))
    else:
      keep.append(a)
  argv[:] = keep
  return path, overrides


def _parse_like(old, value, key):
  try:
    if isinstance(old, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      return value.lower() in ("true", "1")
    if isinstance(old, (int, float)):
      return type(old)(value) if not (isinstance(old, int) and "." in value) else float(value)
    if isinstance(old, str):
      return value
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    raise ValueError(f"--config.{key}={value!r} cannot be read as a {type(old).__name__} "
                     f"like the current value {old!r}") from None


def config_name(flag_values, taken=("", [])):
  """Where the config of a command with `--config` and `--workdir` came from (for its output)."""
  if flag_values.config:
    return config_flags.get_config_filename(flag_values["config"])
  return taken[0] or os.path.join(flag_values.workdir, "config.json")


def config_from(flag_config, workdir, taken=("", [])):
  """The config of a command that has `--config` and `--workdir`: the Python `--config`
  (absl already applied its overrides), else a `--config=….json` or `<workdir>/config.json`
  with the `--config.a.b=value` overrides of `take_config_args` applied."""
  if flag_config is not None:
    return flag_config
  path, overrides = taken
  if not path:
    if not workdir:
      raise ValueError("give --config=<configs/….py[:args] or ….json>, or --workdir of a "
                       "training run (its config.json is used)")
    path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: give --config=<configs/….py[:args]> or "
                            "the config.json of a training workdir")
  config = checkpoint.read_config(path)
  for key, value in overrides:
    node = config
    for part in key.split(".")[:-1]:
      if part not in node or not hasattr(node[part], "items"):
        raise ValueError(f"--config.{key}: {path} has no section {part!r}")
      node = node[part]
    leaf = key.split(".")[-1]
    if leaf not in node:
      raise ValueError(f"--config.{key}: {path} has no key {leaf!r} there; known: "
                       f"{sorted(node.keys())}")
    with node.ignore_type():
      node[leaf] = _parse_like(node[leaf], value, key)
  return config


# What a user can get wrong (arguments, paths, config values, data, checkpoints): one line, not
# a traceback. Anything else is a bug in step_jax and keeps its traceback.
USER_ERRORS = (ValueError, OSError, KeyError, MemoryError, app.UsageError)
TRACEBACK_ENV = "STEP_JAX_TRACEBACK"


def _fail(message):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _message(exc):
  if isinstance(exc, KeyError) and exc.args:
    return f"missing key {exc.args[0]!r}"
  if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in str(exc):
    return f"{exc.filename}: {exc.strerror or exc}"
  return " ".join(str(exc).split()) or type(exc).__name__


def _flag_message(text):
  """absl's flag error as one line; a config file that raised (config_flags puts the whole
  traceback in the message) as `--config=...: <its exception's message>`."""
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if "Error whilst parsing config file" in text and len(lines) > 1:
    flag = lines[0].split(": Error whilst parsing")[0].removeprefix("flag ")
    return f"{flag}: {lines[-1].split(': ', 1)[-1]}"
  return " ".join(lines) + " (--help lists the flags)"


def run_command(main, argv=None, take_config=False):
  """`app.run(main)` with user errors (USER_ERRORS, bad flags, a --config.a.b override that
  names no key) printed as one line `error: <what is wrong>` and exit status 2. The traceback
  shows with --traceback or STEP_JAX_TRACEBACK=1. take_config: `main(argv, taken)` gets
  what take_config_args took from argv."""
  argv = sys.argv if argv is None else argv
  show = "--traceback" in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
  argv[:] = [a for a in argv if a != "--traceback"]
  if take_config:
    try:
      taken = take_config_args(argv)
    except ValueError as e:
      if show:
        raise
      _fail(_message(e))
    main = functools.partial(main, taken=taken)
  overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]

  def parse(args):
    try:
      return flags.FLAGS(args)
    except flags.Error as e:
      if show:
        raise
      _fail(_flag_message(str(e)))
    except AttributeError as e:   # ml_collections: an override names no key of the config
      key = str(e).strip("\"'")
      named = [o for o in overrides if key in o[len("--config."):].split(".")]
      if show or not named:
        raise
      _fail(f"{named[0]}: the config has no key {key!r}")

  def guarded(args):
    try:
      return main(args)
    except USER_ERRORS as e:
      if show:
        raise
      _fail(_message(e))
  app.run(guarded, argv=argv, flags_parser=parse)
