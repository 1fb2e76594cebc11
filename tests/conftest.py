import os
import tempfile

import jax

# Four fake CPU devices for sharding tests; must happen before any JAX computation.
jax.config.update("jax_num_cpu_devices", 4)
# A persistent compilation cache: the suite compiles many small programs, and subprocess
# tests (kill-and-resume, the evaluate CLI) reuse what the parent compiled.
if not jax.config.jax_compilation_cache_dir:
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(tempfile.gettempdir(), "step_jax_test_jit_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain workers and absl-using code read flags
