import os
import tempfile

# XLA's CPU backend at optimization level 0: the suite compiles hundreds of small programs
# and runs each a few times, so compile time is what counts (~20 % less wall time); a user's
# own XLA_FLAGS win. Must be set before the backend starts.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

# Four fake CPU devices for sharding tests; must happen before any JAX computation.
jax.config.update("jax_num_cpu_devices", 4)
# A persistent compilation cache: tests that rebuild a model and subprocess tests
# (kill-and-resume, the evaluate CLI) reuse what was compiled before. Programs that compile
# in under 0.5 s are not written: writing hundreds of tiny entries cost more than compiling
# them again (test_train + test_early_exit cold: 227 s with every entry, 195 s without).
if not jax.config.jax_compilation_cache_dir:
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(tempfile.gettempdir(), "step_jax_test_jit_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain workers and absl-using code read flags

# The heaviest files first, longest first (their seconds in a cold default run on 2 cores):
# with two xdist workers taking whole files in order, a heavy file left for the end would run
# alone while the other worker idles.
HEAVY_FIRST = ("test_train_step.py",   # 130
               "test_early_exit.py",   # 105
               "test_train.py",        # 86
               "test_dispatch.py",     # 82
               "test_bad_input.py",    # 75
               "test_eval_dispatch.py",  # 60 (measured with two trainings on the 2 cores)
               "test_supertokens.py",  # 59
               "test_export.py",       # 58
               "test_policy.py",       # 55
               "test_evaluate.py",     # 54
               "test_efficientnet.py", # 45
               "test_attention.py")    # 42


def pytest_collection_modifyitems(items):
  rank = lambda item: (HEAVY_FIRST.index(item.path.name) if item.path.name in HEAVY_FIRST
                       else len(HEAVY_FIRST))
  items.sort(key=rank)   # stable: the tests of a file keep their order
