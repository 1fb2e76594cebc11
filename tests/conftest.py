import jax

# Four fake CPU devices for sharding tests; must happen before any JAX computation.
jax.config.update("jax_num_cpu_devices", 4)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain workers and absl-using code read flags
