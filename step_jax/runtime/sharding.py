"""Device mesh, parameter/batch shardings and multi-host helpers (jit + NamedSharding, no pmap).

One mesh axis, 'data'. Batches are split over it (data parallel). Parameters and optimizer
state are replicated by default; with `config.sharding.fsdp=True` every array of at least
`fsdp_min_size` elements is split over the same axis along its largest dimension that the
axis size divides (ZeRO-3/FSDP style: XLA all-gathers a weight where it is used and
reduce-scatters its gradient). Small arrays (biases, norms) stay replicated.

Multi-host: call `initialize_distributed(config)` before anything touches a device; each
process then loads `batch_size // process_count` examples and `put_batch` assembles the
global array with `jax.make_array_from_process_local_data`.
"""
import os

from absl import logging
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA = "data"

# Environment variables that mean "this process is one of several launched together".
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def initialize_distributed(config) -> bool:
  """`jax.distributed.initialize()` when `config.multihost` or the launcher asks for it.

  Must run before the first JAX computation. On Cloud TPU, SLURM and Open MPI, JAX finds
  the coordinator itself; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. Returns True when distributed mode was (or already is) initialised.
  """
  wanted = bool(config.get("multihost", False)) or any(os.environ.get(k) for k in _MULTIHOST_ENV)
  if not wanted:
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {k: int(os.environ[e]) for k, e in (("num_processes", "JAX_NUM_PROCESSES"),
                                                 ("process_id", "JAX_PROCESS_ID"))
            if os.environ.get(e)}
  jax.distributed.initialize(**kwargs)  # reads JAX_COORDINATOR_ADDRESS itself
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def make_mesh(config=None, devices=None) -> jax.sharding.Mesh:
  """1-D mesh ('data',) over all devices, or the first `config.sharding.num_devices`.

  Auto axis types: jax 0.10's default (Explicit) rejects a plain data-parallel grad with
  "contracting dimensions are sharded" (environment-notes §4).
  """
  if devices is None:
    devices = jax.devices()
    n = int(config.get("sharding", {}).get("num_devices", 0) or 0) if config is not None else 0
    if n:
      if n > len(devices):
        raise ValueError(f"config.sharding.num_devices={n} but only {len(devices)} devices")
      devices = devices[:n]
  return jax.make_mesh((len(devices),), (DATA,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data'; trailing dimensions whole."""
  return NamedSharding(mesh, P(DATA))


def fsdp_spec(shape, axis_size: int, min_size: int) -> P:
  """Split the largest dimension that `axis_size` divides; replicate small arrays."""
  if axis_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  # Largest dimension first; among equal sizes the last (e.g. a square kernel's output dim).
  for d in sorted(range(len(shape)), key=lambda i: (-shape[i], -i)):
    if shape[d] % axis_size == 0:
      spec = [None] * len(shape)
      spec[d] = DATA
      return P(*spec)
  return P()


def tree_shardings(abstract_tree, mesh, *, fsdp=False, min_size=2 ** 18):
  """NamedShardings for a pytree of arrays/ShapeDtypeStructs (params, optimizer state).

  Rules depend only on the shape, so Adam's moments get the sharding of their parameter.
  """
  axis = mesh.shape[DATA]
  def rule(x):
    shape = tuple(getattr(x, "shape", ()))
    return NamedSharding(mesh, fsdp_spec(shape, axis, min_size) if fsdp else P())
  return jax.tree.map(rule, abstract_tree)


def state_shardings(abstract_state, mesh, config):
  sc = config.get("sharding", {})
  return tree_shardings(abstract_state, mesh, fsdp=bool(sc.get("fsdp", False)),
                        min_size=int(sc.get("fsdp_min_size", 2 ** 18)))


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying target shardings (the restore target for orbax)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def host_batch_size(global_batch: int, mesh=None) -> int:
  """Examples each process loads: batch_size // process_count (checked divisible)."""
  n_proc = jax.process_count()
  n_dev = mesh.size if mesh is not None else jax.device_count()
  if int(global_batch) != global_batch or global_batch < 1:
    raise ValueError(f"batch_size={global_batch} must be a positive whole number")
  if global_batch % n_dev or global_batch % n_proc:
    raise ValueError(f"batch_size={global_batch} must be divisible by the number of devices "
                     f"({n_dev}) and of processes ({n_proc})")
  return global_batch // n_proc


def put_batch(local_batch, mesh):
  """Host-local numpy batch (this process's rows) → global arrays split over 'data'."""
  sh = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sh, np.asarray(x)),
                      local_batch)


def describe(shardings) -> dict:
  """{'sharded': n, 'replicated': m} counts over a tree of NamedShardings, for the log."""
  leaves = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  sharded = sum(any(a is not None for a in s.spec) for s in leaves)
  return dict(sharded=sharded, replicated=len(leaves) - sharded)
