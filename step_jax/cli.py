"""Console-script helpers."""
import sys


def list_flags_in_help(module_name: str):
  """Console scripts (`step-train` …) run a wrapper script as sys.argv[0], and absl's --help
  lists only that script's flags; list the flags `module_name` defined under it too, and
  answer --help with status 0."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  listed = {f.name for f in flags.FLAGS.get_flags_for_module(sys.argv[0])}
  for f in flags.FLAGS.get_flags_for_module(module_name):
    if f.name not in listed:
      flags.FLAGS.register_flag_by_module(sys.argv[0], f)
  if any(a in ("--help", "-h", "-?", "--helpshort") for a in sys.argv[1:]):
    # absl exits with status 1 after --help; asking for help is not an error.
    from absl import app  # pylint: disable=g-import-not-at-top
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
