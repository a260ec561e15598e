"""Random projection and exact greedy k-center coreset selection (the memory subsampler).

Greedy farthest-point selection in a random projection (PatchCore section 3.2):

1. ``P = features @ W`` with ``W`` a random ``(D, 128)`` map (torch ``nn.Linear`` init);
2. start from one random valid row;
3. repeat: ``d = min(d, |P - P[last]|^2)``, ``last = argmax(d)`` (first index on ties).

The loop is one ``lax.fori_loop`` carrying the min-distance vector: each step is one
matrix-vector product over the projected rows, so the loop is bound by memory bandwidth.
The projected rows are stored transposed ``(p, n)`` for the expansion (the product streams
contiguous rows) and padded once to a multiple of 1024 so the argmax can be two-level. With
``mesh=`` the rows are split over the devices and the same loop runs per shard, the argmax
becoming a local argmax plus an ``all_gather`` of one candidate per device (the first device
holding the maximum wins: the lowest global index, as on one device).

Numerics (deviations from the official float32 torch loop, see ``docs/fidelity.md``):
squared distances by the expansion ``|x|^2 - 2 x.c + |c|^2`` (``|c|^2`` taken as
``2 x_c.c - |x_c|^2`` so that copies of the centre get exactly 0), clamped at 0;
``distance="difference"`` uses ``sum((x - c)^2)``. Selected rows are excluded explicitly, so
indices are unique while ``num_samples`` does not exceed the valid rows. Opt-in 16-bit
``storage_dtype`` halves the traffic but rounds the points (changes the selection).

References:
    JAX port of ``GreedyCoresetSampler`` (``brute=True``) in jungyg/TailedCore
    ``src/sampler.py``; Roth et al., "Towards Total Recall in Industrial Anomaly Detection",
    CVPR 2022 (arXiv 2106.08265); Sener & Savarese, ICLR 2018 (k-center).
"""

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from tailedcore_jax import _validation as V
from tailedcore_jax import sharding

__all__ = ["CoresetSelection", "greedy_coreset", "greedy_coreset_masked", "random_projection"]

_HIGHEST = jax.lax.Precision.HIGHEST
# Vectors of at least _ARGMAX_TWO_LEVEL_MIN entries use a two-level argmax (block maxima, then
# the first block holding the maximum): XLA:CPU's variadic (value, index) reduce is not
# vectorised (~0.9 ms on 200k floats, the two-level form ~0.04 ms).
_ARGMAX_BLOCK = 1024
_ARGMAX_TWO_LEVEL_MIN = 4 * _ARGMAX_BLOCK


class CoresetSelection(NamedTuple):
    """Result of :func:`greedy_coreset_masked` (a pytree; unpacks as ``indices, valid``).

    Attributes:
        indices: ``(capacity,)`` int32 rows in selection order; ``indices[0]`` is the start.
            Entries past the valid count repeat the start.
        valid: ``(capacity,)`` bool, True for the first ``count`` entries (the selection).
    """

    indices: jax.Array
    valid: jax.Array


def random_projection(
    key: jax.Array,
    in_dim: int,
    out_dim: int,
    *,
    kind: Literal["uniform", "gaussian"] = "uniform",
) -> Float[Array, "in_dim out_dim"]:
    """Random linear map applied to the features before the greedy search and the LOF.

    ``kind="uniform"``: entries ``U(-1/sqrt(in_dim), 1/sqrt(in_dim))``, the default init of the
    official ``torch.nn.Linear(in_dim, out_dim, bias=False)``; the matrix is that layer's
    ``weight.T``. ``kind="gaussian"``: ``N(0, 1/out_dim)`` (Johnson-Lindenstrauss).

    Returns:
        ``(in_dim, out_dim)`` float32.

    Raises:
        ValueError: a dimension that is not a positive int, an unknown ``kind``.

    Examples:
        >>> import jax
        >>> w = random_projection(jax.random.key(0), 1024, 128)
        >>> w.shape, bool(abs(w).max() <= 1 / 32)
        ((1024, 128), True)
    """
    for name, v in (("in_dim", in_dim), ("out_dim", out_dim)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    in_dim, out_dim = int(in_dim), int(out_dim)
    if kind == "uniform":
        bound = 1.0 / np.sqrt(in_dim)
        return jax.random.uniform(key, (in_dim, out_dim), jnp.float32, minval=-bound, maxval=bound)
    if kind == "gaussian":
        return jax.random.normal(key, (in_dim, out_dim), jnp.float32) / np.float32(np.sqrt(out_dim))
    raise ValueError(f"kind must be 'uniform' or 'gaussian', got {kind!r}")


def greedy_coreset(
    key: jax.Array,
    features: Float[Array, "n D"],
    num_samples: int,
    *,
    mask: Bool[Array, " n"] | None = None,
    projection_dim: int | None = 128,
    projection: Float[Array, "D p"] | None = None,
    start_index: int | Int[Array, ""] | None = None,
    storage_dtype=None,
    distance: Literal["expansion", "difference"] = "expansion",
    mesh: Mesh | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> Int[Array, " num_samples"]:
    """Greedy k-center coreset: ``num_samples`` row indices in selection order.

    ``indices[0]`` is the start; each next index is the valid row farthest from all rows
    selected so far (first index on ties). Randomness: ``key_proj, key_start = split(key)``;
    ``key_proj`` draws :func:`random_projection` (uniform), ``key_start`` the start (uniform
    over the valid rows). Same key and inputs -> same indices, with or without ``mesh``.

    Args:
        key: PRNG key.
        features: ``(n, D)`` floating-point features.
        num_samples: rows to select (static).
        mask: ``(n,)`` bool, True = valid; equals running on ``features[mask]`` (same key).
        projection_dim: projected dimension (static); no projection when None or ``D``.
        projection: explicit ``(D, p)`` matrix instead of the random one.
        start_index: explicit start row (may be traced) instead of the random one.
        storage_dtype: None (float32), ``jnp.bfloat16`` or ``jnp.float16`` storage of the
            projected rows (float32 accumulation; changes the selection).
        distance: ``"expansion"`` (default) or ``"difference"`` (``sum((x - c)^2)``).
        mesh: optional :class:`jax.sharding.Mesh`: rows split over its devices, same result.
            Not under ``vmap``.
        axis_name: mesh axis (or axes) to split over; None = all.

    Returns:
        ``(num_samples,)`` int32 indices, unique while ``num_samples`` <= the valid rows.

    Raises:
        ValueError: bad ranks/shapes, empty features, ``num_samples`` outside ``[1, n]``, bad
            ``projection_dim``/``projection``/``distance``; on concrete inputs only,
            ``num_samples`` above the valid rows, NaN/inf in valid rows, a bad ``start_index``.
        TypeError: non-float features, non-bool mask, non-int sizes, bad ``storage_dtype``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.array([[0.0], [1.0], [10.0], [4.0]])
        >>> greedy_coreset(jax.random.key(0), x, 3, projection_dim=None, start_index=0)
        Array([0, 2, 3], dtype=int32)
    """
    features = jnp.asarray(features)
    mask = None if mask is None else jnp.asarray(mask)
    axes = None if mesh is None else sharding.mesh_axes(mesh, axis_name)
    storage_dtype = _check_args(features, mask, projection_dim, projection, start_index,
                                storage_dtype, distance)
    n = features.shape[0]
    num_samples = _check_capacity("num_samples", num_samples, n)
    count = V.concrete_count(mask, n)
    if count is not None and num_samples > count:
        raise ValueError(f"num_samples={num_samples} exceeds the number of valid rows {count}")
    idx, _ = _coreset(key, features, mask, start_index, projection, None, capacity=num_samples,
                      projection_dim=projection_dim, storage_dtype=storage_dtype,
                      distance=distance, ratio=None, mesh=mesh, axes=axes)
    return idx


def greedy_coreset_masked(
    key: jax.Array,
    features: Float[Array, "n D"],
    capacity: int,
    *,
    mask: Bool[Array, " n"],
    ratio: float | None = None,
    num_valid: int | Int[Array, ""] | None = None,
    projection_dim: int | None = 128,
    projection: Float[Array, "D p"] | None = None,
    start_index: int | Int[Array, ""] | None = None,
    storage_dtype=None,
    distance: Literal["expansion", "difference"] = "expansion",
    mesh: Mesh | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> CoresetSelection:
    """Greedy coreset of a padded set: a fixed ``capacity`` output plus a validity mask.

    For ``jax.vmap`` over classes padded to one capacity (one compilation). The selection is
    :func:`greedy_coreset` on the valid rows (same key) truncated to ``count``:

    * ``ratio`` (default 0.1 when ``num_valid`` is None): ``count = int(ratio * M)`` with
      ``M = mask.sum()``, Python's float64 product as in the official sampler, at least 1
      when ``M > 0``, at most ``capacity``;
    * ``num_valid`` (int or traced int32): ``count = clip(num_valid, 0, min(M, capacity))``.

    Entries past ``count`` are invalid and hold the start; with an all-False mask every
    entry is invalid and the indices are 0. The loop runs ``count - 1`` steps.

    Args:
        key, features, mask, projection_dim, projection, start_index, storage_dtype,
            distance, mesh, axis_name: as in :func:`greedy_coreset` (``mask`` required).
        capacity: static output length, ``1 <= capacity <= n``.
        ratio: fraction of valid rows to select (static, in ``(0, 1]``).
        num_valid: explicit count instead of ``ratio`` (give only one).

    Returns:
        :class:`CoresetSelection` ``(indices (capacity,), valid (capacity,))``.

    Raises:
        ValueError: as :func:`greedy_coreset`, plus both ``ratio`` and ``num_valid``, a ratio
            outside ``(0, 1]``; on concrete inputs, an all-False mask or a count above
            ``capacity`` / the valid rows (under tracing the count is clipped instead).
        TypeError: as :func:`greedy_coreset`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.array([[0.0], [1.0], [10.0], [4.0], [99.0]])
        >>> m = jnp.array([True, True, True, True, False])
        >>> sel = greedy_coreset_masked(jax.random.key(0), x, 3, mask=m, num_valid=2,
        ...                             projection_dim=None, start_index=0)
        >>> sel.indices, sel.valid
        (Array([0, 2, 0], dtype=int32), Array([ True,  True, False], dtype=bool))
    """
    features = jnp.asarray(features)
    if mask is None:
        raise ValueError("greedy_coreset_masked needs a mask; use greedy_coreset without one")
    mask = jnp.asarray(mask)
    axes = None if mesh is None else sharding.mesh_axes(mesh, axis_name)
    storage_dtype = _check_args(features, mask, projection_dim, projection, start_index,
                                storage_dtype, distance)
    n = features.shape[0]
    capacity = _check_capacity("capacity", capacity, n)
    ratio = _check_count(mask, n, capacity, ratio, num_valid)
    idx, count = _coreset(key, features, mask, start_index, projection, num_valid,
                          capacity=capacity, projection_dim=projection_dim,
                          storage_dtype=storage_dtype, distance=distance, ratio=ratio,
                          mesh=mesh, axes=axes)
    return CoresetSelection(indices=idx, valid=jnp.arange(capacity, dtype=jnp.int32) < count)


# ------------------------------------------------------------------------------ checks


def _check_args(features, mask, projection_dim, projection, start_index, storage_dtype,
                distance):
    """Checks shared by both coresets; returns the storage dtype (None for float32)."""
    V.check_rank("features", features, 2)
    V.check_floating("features", features)
    n, d_in = features.shape
    if n == 0 or d_in == 0:
        raise ValueError(f"features is empty: shape {features.shape}")
    V.check_mask("mask", mask, n)
    if projection_dim is not None:
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, (int, np.integer)) \
                or projection_dim < 1:
            raise ValueError(f"projection_dim must be None or a positive int, got {projection_dim!r}")
    if projection is not None:
        V.check_rank("projection", projection, 2)
        V.check_floating("projection", projection)
        if projection.shape[0] != d_in:
            raise ValueError(f"projection must have shape ({d_in}, p) to match features "
                             f"{features.shape}, got {projection.shape}")
        V.check_finite("projection", projection)
    if storage_dtype is not None:
        storage_dtype = jnp.dtype(storage_dtype)
        if storage_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                 jnp.dtype(jnp.float16)):
            raise TypeError(
                f"storage_dtype must be None, float32, bfloat16 or float16, got {storage_dtype}")
        if storage_dtype == jnp.dtype(jnp.float32):
            storage_dtype = None
    if distance not in ("expansion", "difference"):
        raise ValueError(f"distance must be 'expansion' or 'difference', got {distance!r}")
    V.check_finite_rows("features (valid rows)", features, mask)
    if start_index is not None:
        if jnp.ndim(start_index) != 0:
            raise ValueError(f"start_index must be a scalar, got shape {jnp.shape(start_index)}")
        if not jnp.issubdtype(jnp.result_type(start_index), jnp.integer):
            raise TypeError(f"start_index must be an integer, got {jnp.result_type(start_index)}")
        if V.is_concrete(start_index):
            s = int(np.asarray(start_index))
            if not 0 <= s < n:
                raise ValueError(f"start_index {s} is out of range for {n} rows")
            if mask is not None and V.is_concrete(mask) and not bool(np.asarray(mask)[s]):
                raise ValueError(f"start_index {s} is a masked (invalid) row")
    return storage_dtype


def _check_capacity(name, value, n):
    value = V.static_int(name, value, minimum=1)
    if value > n:
        raise ValueError(f"{name}={value} exceeds the number of rows {n}")
    return value


def _check_count(mask, n, capacity, ratio, num_valid):
    """Checks of the masked count; returns the ratio (None when ``num_valid`` decides)."""
    if ratio is not None and num_valid is not None:
        raise ValueError("give either ratio or num_valid, not both")
    if num_valid is None:
        ratio = 0.1 if ratio is None else ratio
        V.ratio_fraction(ratio)
        ratio = float(ratio)
    else:
        if jnp.ndim(num_valid) != 0:
            raise ValueError(f"num_valid must be a scalar, got shape {jnp.shape(num_valid)}")
        if not jnp.issubdtype(jnp.result_type(num_valid), jnp.integer):
            raise TypeError(f"num_valid must be an integer, got {jnp.result_type(num_valid)}")
    total = V.concrete_count(mask, n)
    if total == 0:
        raise ValueError("mask selects no rows: cannot build a coreset of an empty set")
    if total is not None and ratio is not None and V.ratio_count(ratio, total) > capacity:
        raise ValueError(f"ratio selects {V.ratio_count(ratio, total)} of {total} valid rows, "
                         f"more than capacity={capacity}")
    if num_valid is not None and V.is_concrete(num_valid):
        k = int(np.asarray(num_valid))
        if k < 0:
            raise ValueError(f"num_valid must be >= 0, got {k}")
        if k > capacity:
            raise ValueError(f"num_valid={k} exceeds capacity={capacity}")
        if total is not None and k > total:
            raise ValueError(f"num_valid={k} exceeds the number of valid rows {total}")
    return ratio


# ------------------------------------------------------------------------------ the kernel
#
# Split into jitted pieces so that eager calls reuse compilations (threefry draws are slow to
# compile on CPU): the projection matrix compiles once per (D, p), the projection and start
# draw once per (n, D, p), the loop once per (n, p, capacity, ...). Under an outer jit/vmap
# they are inlined into one program.


def _coreset(key, features, mask, start_index, projection, num_valid, *, capacity,
             projection_dim, storage_dtype, distance, ratio, mesh, axes):
    """Draws, projected rows and the greedy loop; returns ``(indices (capacity,), count)``."""
    n, d_in = features.shape
    out_dim = None
    if projection is None and projection_dim is not None and projection_dim != d_in:
        out_dim = int(projection_dim)
    key_start, w = _split_and_draw(key, in_dim=d_in, out_dim=out_dim)
    if projection is not None:
        w = projection
    shards = 1 if mesh is None else sharding.mesh_size(mesh, axes)
    layout = _stored_layout(distance)
    xs, sq, ok, start = _prepare(key_start, features, mask, start_index, w,
                                 storage_dtype=storage_dtype, layout=layout,
                                 local_rows=_padded_len(-(-n // shards)), shards=shards)
    static = dict(capacity=capacity, distance=distance, ratio=ratio,
                  counted=num_valid is not None)
    if mesh is None:
        return _select(xs, sq, ok, start, num_valid, n=n, axes=None, **static)
    spec = sharding.split_spec(axes)
    xs = sharding.place(xs, mesh, P(None, spec) if layout == "pn" else P(spec, None))
    sq, ok = sharding.place(sq, mesh, P(spec)), sharding.place(ok, mesh, P(spec))
    return _select_mesh(xs, sq, ok, start, num_valid, n=n, mesh=mesh, axes=axes, **static)


@functools.partial(jax.jit, static_argnames=("in_dim", "out_dim"))
def _split_and_draw(key, *, in_dim, out_dim):
    """``key_proj, key_start = split(key)``; the projection matrix from ``key_proj``."""
    key_proj, key_start = jax.random.split(key)
    w = None if out_dim is None else random_projection(key_proj, in_dim, out_dim)
    return key_start, w


def _stored_layout(distance: str) -> str:
    # "pn" (transposed): the per-step product c @ xs streams contiguous length-n rows into a
    # vector that stays in cache (~35-45 % faster than x @ c on XLA:CPU). "np" for the
    # difference form, whose row-wise sum((x - c)^2) XLA:CPU fuses into one pass.
    return "pn" if distance == "expansion" else "np"


def _padded_len(n: int) -> int:
    """Rows after padding: a multiple of the argmax block once the two-level argmax is used."""
    return n if n < _ARGMAX_TWO_LEVEL_MIN else -(-n // _ARGMAX_BLOCK) * _ARGMAX_BLOCK


def _random_start(key, row_ok, n: int) -> jax.Array:
    """The r-th valid row, ``r ~ U{0..count-1}``: a masked call starts at the row an unmasked
    call on the valid rows alone starts at."""
    count = jnp.int32(n) if row_ok is None else jnp.sum(row_ok, dtype=jnp.int32)
    r = jax.random.randint(key, (), 0, jnp.maximum(count, 1), dtype=jnp.int32)
    if row_ok is None:
        return r
    return jnp.argmax(jnp.cumsum(row_ok, dtype=jnp.int32) > r).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("storage_dtype", "layout", "local_rows", "shards"))
def _prepare(key_start, features, row_ok, start_index, w, *, storage_dtype, layout, local_rows,
             shards):
    """Projected rows (masked rows 0), padded to ``shards * local_rows`` rows, in ``layout``;
    their squared norms, their validity and the start index."""
    x = features.astype(jnp.float32)
    if w is not None:
        x = jnp.dot(x, w.astype(jnp.float32), precision=_HIGHEST)
    if row_ok is not None:
        x = jnp.where(row_ok[:, None], x, 0.0)  # padded rows may hold anything (NaN)
    if storage_dtype is not None:
        x = x.astype(storage_dtype)
    # Padding once here keeps pads out of the per-step fusion (~10 % at n = 200k).
    n, n_pad = x.shape[0], shards * local_rows
    x = jnp.pad(x, ((0, n_pad - n), (0, 0)))
    ok = jnp.arange(n_pad) < n
    if row_ok is not None:
        ok = ok & jnp.pad(row_ok, (0, n_pad - n))
    xf = x.astype(jnp.float32)
    sq = jnp.sum(xf * xf, axis=1)
    start = _random_start(key_start, row_ok, n) if start_index is None else jnp.asarray(
        start_index, jnp.int32)
    return (x.T if layout == "pn" else x), sq, ok, start


def _count(ok, num_valid, *, n, capacity, ratio, counted):
    """``(count, loop trip count)``: ``int(ratio * M)``, ``num_valid`` clipped, or static."""
    total = jnp.sum(ok, dtype=jnp.int32)
    if ratio is not None:
        count = V.traced_ratio_count(ratio, total, max_total=n, capacity=capacity)
        return count, count
    if counted:
        count = jnp.clip(jnp.asarray(num_valid, jnp.int32), 0, jnp.minimum(total, capacity))
        return count, count
    return jnp.int32(capacity), capacity  # a static trip count


@functools.partial(jax.jit, static_argnames=("n", "axes", "capacity", "distance", "ratio",
                                             "counted"))
def _select(xs, sq, ok, start, num_valid, *, n, axes, capacity, distance, ratio, counted):
    count, steps = _count(ok, num_valid, n=n, capacity=capacity, ratio=ratio, counted=counted)
    return _greedy_loop(xs, sq, ok, start, steps, capacity=capacity, distance=distance,
                        axes=axes), count


@functools.partial(jax.jit, static_argnames=("n", "mesh", "axes", "capacity", "distance",
                                             "ratio", "counted"))
def _select_mesh(xs, sq, ok, start, num_valid, *, n, mesh, axes, capacity, distance, ratio,
                 counted):
    count, steps = _count(ok, num_valid, n=n, capacity=capacity, ratio=ratio, counted=counted)
    spec = sharding.split_spec(axes)
    loop = functools.partial(_greedy_loop, capacity=capacity, distance=distance, axes=axes)
    xs_spec = P(None, spec) if _stored_layout(distance) == "pn" else P(spec, None)
    idx = sharding.shard_map(
        loop, mesh=mesh, in_specs=(xs_spec, P(spec), P(spec), P(), P()), out_specs=P(),
        check_vma=False,
    )(xs, sq, ok, start, steps)
    return idx, count


def _first_argmax(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(max, first index of the max)``; two-level once the length allows it."""
    n = v.shape[0]
    if n < _ARGMAX_TWO_LEVEL_MIN or n % _ARGMAX_BLOCK:
        i = jnp.argmax(v).astype(jnp.int32)
        return v[i], i
    blocks = v.reshape(n // _ARGMAX_BLOCK, _ARGMAX_BLOCK)
    # The first block whose maximum is the global maximum holds the first global argmax.
    b = jnp.argmax(jnp.max(blocks, axis=1)).astype(jnp.int32)
    row = jax.lax.dynamic_index_in_dim(blocks, b, axis=0, keepdims=False)
    j = jnp.argmax(row).astype(jnp.int32)
    return row[j], b * _ARGMAX_BLOCK + j


def _greedy_loop(xs, sq, ok, start, num_steps, *, capacity: int, distance: str, axes):
    """Greedy k-center over the stored rows of this device (all rows when ``axes`` is None).

    Indices at positions ``>= num_steps`` keep the start. Per shard, the rows ``offset ..
    offset + per`` are local; values at a global row ``g`` come from its owner by an
    ``all_gather`` (a selection: no arithmetic crosses devices).
    """
    transposed = _stored_layout(distance) == "pn"
    per = xs.shape[1] if transposed else xs.shape[0]
    shard = jnp.int32(0) if axes is None else jax.lax.axis_index(axes).astype(jnp.int32)
    pos = jnp.arange(per, dtype=jnp.int32)

    def row(j):
        return jax.lax.dynamic_index_in_dim(xs, j, axis=1 if transposed else 0, keepdims=False)

    def at_global(values_at, g):
        """``values_at(local index)`` evaluated on the owner of global row ``g``."""
        if axes is None:
            return values_at(g)
        local = jnp.clip(g - shard * per, 0, per - 1)
        return jax.tree.map(lambda a: a[g // per], jax.lax.all_gather(values_at(local), axes))

    # Masked rows and padding start at -inf: min() keeps them there, so they are never picked.
    min_d = jnp.where(ok, jnp.inf, -jnp.inf).astype(jnp.float32)
    if axes is None:
        min_d = min_d.at[start].set(-jnp.inf)
    else:
        min_d = jnp.where(pos + shard * per == start, -jnp.inf, min_d)
    c0, s0 = at_global(lambda j: (row(j), sq[j]), start)

    def body(i, carry):
        idx, min_d, last, c, s = carry
        if distance == "expansion":
            dot = jnp.dot(c, xs, precision=_HIGHEST, preferred_element_type=jnp.float32)
            t = at_global(lambda j: dot[j], last)
            # (a - 2t) + (2t - a) == 0 exactly: copies of the centre get distance 0.
            dist = (sq - 2.0 * dot) + (2.0 * t - s)
        else:
            diff = xs.astype(jnp.float32) - c.astype(jnp.float32)[None, :]
            dist = jnp.sum(diff * diff, axis=1)
        min_d = jnp.minimum(min_d, jnp.maximum(dist, 0.0))  # clamp: cancellation
        v, j = _first_argmax(min_d)
        if axes is None:
            nxt, c, s = j, row(j), sq[j]
            min_d = min_d.at[j].set(-jnp.inf)  # never select a row twice
        else:  # the first shard holding the global maximum: the lowest global index
            vs, js, cs, ss = jax.lax.all_gather((v, j, row(j), sq[j]), axes)
            win = jnp.argmax(vs).astype(jnp.int32)
            nxt, c, s = win * per + js[win], cs[win], ss[win]
            min_d = jnp.where((shard == win) & (pos == js[win]), -jnp.inf, min_d)
        return idx.at[i].set(nxt), min_d, nxt, c, s

    idx = jnp.full((capacity,), start, jnp.int32)
    idx, *_ = jax.lax.fori_loop(1, num_steps, body, (idx, min_d, start, c0, s0))
    return idx
