"""Where a training run executes: the device mesh, shardings, and the persistent compilation cache.

Devices: a mesh with axes ``('data', 'model')``. The batch is split over
``data``; a 2-D kernel (and every optimizer-state leaf of the same shape:
masks, master weights, moments) is split over ``model`` along its output axis
when ``config.mesh.model > 1`` and it divides; everything else is replicated.
The rule depends only on a leaf's shape, which is what makes masks and master
weights shard like their parameters.

Compilation cache: JAX's persistent cache (``jax_compilation_cache_dir``)
stores compiled programs on disk, so a repeated run or the next run of a sweep
loads its train step instead of compiling it again. :func:`compilation_cache`
turns it on for the duration of a run and restores JAX's settings afterwards.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache as jax_cache
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

#: JAX's default ``jax_persistent_cache_min_compile_time_secs``; we lower it to this.
_JAX_DEFAULT_MIN_COMPILE_S = 1.0
#: Programs compiling faster than this are not written to the cache. 0 caches also the
#: small programs of the model's initialisation, which cost seconds in total on CPU.
MIN_COMPILE_TIME_S = 0.0


def make_mesh(config) -> jax.sharding.Mesh:
  """A ``('data', 'model')`` mesh over all devices (``data=-1``: what ``model`` leaves)."""
  count = jax.device_count()
  model = config.mesh.model
  data = config.mesh.data if config.mesh.data != -1 else count // max(model, 1)
  if model < 1 or data < 1 or data * model != count:
    raise ValueError(f"`config.mesh` data={config.mesh.data} x model={model} must use all "
                     f"{count} devices (data=-1 fills in what model leaves).")
  if config.batch_size % data:
    raise ValueError(f"`config.batch_size` = {config.batch_size} must be divisible by the "
                     f"{data} devices of the 'data' mesh axis.")
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, model), ("data", "model"), axis_types=axis_types)


def leaf_sharding(mesh, shape) -> NamedSharding:
  """Output axis of a 2-D leaf over ``model`` when it divides; else replicated."""
  model = mesh.shape["model"]
  if model > 1 and len(shape) == 2 and shape[1] % model == 0:
    return NamedSharding(mesh, P(None, "model"))
  return NamedSharding(mesh, P())


def state_shardings(mesh, tree):
  return jax.tree.map(lambda x: leaf_sharding(mesh, np.shape(x)), tree)


def global_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """The same host batch on every process; each contributes its addressable shards."""
  return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def cache_dir(setting: str) -> str | None:
  """The directory a run's compilation cache uses, for ``config.compilation_cache``.

  ``'off'``: None (JAX's own setting stays in force). ``''``: JAX's setting if
  the user made one (``JAX_COMPILATION_CACHE_DIR``), else ``$JAXPRUNE_CACHE_DIR``,
  else ``$XDG_CACHE_HOME/jaxprune/jax_cache`` (``~/.cache/jaxprune/jax_cache``).
  Anything else is a directory (``~`` expanded).
  """
  if setting == "off":
    return None
  if setting:
    return str(pathlib.Path(setting).expanduser())
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  if os.environ.get("JAXPRUNE_CACHE_DIR"):
    return str(pathlib.Path(os.environ["JAXPRUNE_CACHE_DIR"]).expanduser())
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return str(pathlib.Path(base) / "jaxprune" / "jax_cache")


@contextlib.contextmanager
def compilation_cache(setting: str) -> Iterator[str | None]:
  """JAX's persistent compilation cache in :func:`cache_dir` while the block runs.

  Yields the directory in use (None when off). Restores JAX's directory and
  minimum compile time afterwards, so that a run leaves no global setting behind.
  """
  path = cache_dir(setting)
  old_dir = jax.config.jax_compilation_cache_dir
  old_min = jax.config.jax_persistent_cache_min_compile_time_secs
  if path is None:
    yield old_dir
    return
  changed = path != old_dir
  if changed:
    jax.config.update("jax_compilation_cache_dir", path)
    jax_cache.reset_cache()   # JAX opens its cache once; reopen it at the new place.
  if old_min == _JAX_DEFAULT_MIN_COMPILE_S:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
  try:
    yield path
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
    if changed:
      jax.config.update("jax_compilation_cache_dir", old_dir)
      jax_cache.reset_cache()
