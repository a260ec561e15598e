"""Mesh helpers shared by the kernels that take ``mesh=``.

:func:`~tailedcore_jax.knn.nearest_neighbors`, :func:`~tailedcore_jax.coreset.greedy_coreset`,
:func:`~tailedcore_jax.coreset.greedy_coreset_masked`, :func:`~tailedcore_jax.lof.patchwise_lof`,
every ``fit_*`` and :func:`~tailedcore_jax.memory.score` accept a :class:`jax.sharding.Mesh`
and then run their one kernel per shard inside :func:`jax.shard_map`, with a cross-device
reduction that is a selection (never a floating-point sum), so the result equals the
single-device call. This module holds only the mesh bookkeeping those kernels share.

Multi-host: build the mesh over ``jax.devices()`` after ``jax.distributed.initialize()``; the
inputs must then be global ``jax.Array``s (e.g. ``jax.make_array_from_process_local_data``).
"""

import math

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["mesh_axes", "mesh_size", "place", "shard_map", "split_spec"]

shard_map = jax.shard_map


def mesh_axes(mesh: Mesh, axis_name: str | tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The mesh axes a problem is split over: ``axis_name`` (checked), or all axes when None.

    Raises:
        TypeError: ``mesh`` is not a :class:`jax.sharding.Mesh`.
        ValueError: an ``axis_name`` that is not an axis of the mesh.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name is None:
        return tuple(mesh.axis_names)
    names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    for a in names:
        if a not in mesh.axis_names:
            raise ValueError(f"axis {a!r} is not an axis of the mesh {mesh.axis_names}")
    return names


def mesh_size(mesh: Mesh, axis_name: str | tuple[str, ...] | None = None) -> int:
    """Number of shards: the product of the mesh sizes of ``axis_name`` (all axes when None)."""
    return int(math.prod(mesh.shape[a] for a in mesh_axes(mesh, axis_name)))


def split_spec(axes: tuple[str, ...]):
    """The ``PartitionSpec`` entry that splits one array axis over ``axes``."""
    return axes[0] if len(axes) == 1 else axes


def place(x, mesh: Mesh, spec: P):
    """``x`` laid out as ``NamedSharding(mesh, spec)`` (a sharding constraint under jit)."""
    return jax.device_put(x, NamedSharding(mesh, spec))
