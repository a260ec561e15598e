"""Multi-device (``shard_map``) versions of the kNN search, the greedy coreset and patch-wise LOF.

Each function takes a :class:`jax.sharding.Mesh` (``mesh=``) and splits the large axis of
its problem over the mesh devices (all mesh axes, flattened, unless ``axis_name`` names a
subset):

* :func:`sharded_nearest_neighbors`: the memory bank is split by rows, in the very blocks
  that :func:`tailedcore_jax.knn.nearest_neighbors` scans on one device; every device runs
  that block scan (running top-``k``) over its blocks, and the ``devices x k`` candidates
  per query are merged into the global top-``k`` with the single-device tie rule.
* :func:`sharded_greedy_coreset` / :func:`sharded_greedy_coreset_masked`: the projected
  points are split by rows. Each greedy step is a local matrix-vector product and a local
  first-argmax, then a cross-device reduction (an ``all_gather`` of one candidate per
  device) that picks the first device holding the global maximum, so ties resolve to the
  lowest global index exactly as on one device. The selected centre row travels with the
  reduction; nothing of size ``N`` is ever exchanged.
* :func:`sharded_patchwise_lof`: patch positions are split over devices; each device runs
  :func:`tailedcore_jax.lof.patchwise_lof` on its positions.

Uneven sizes (``N`` not a multiple of the device count) are padded to the next multiple
and the padding is masked out, so the results equal the single-device functions,
including masks and first-index tie-breaking. The padding copies only what is split:
the bank blocks (kNN), the *projected* ``(p, N)`` points (coreset; the ``(N, D)``
features are projected where they live and never copied), the ``d``-dimensional LOF
features (LOF).

Equality with one device is bit for bit, by construction: every floating-point operation
runs on the same operand shapes as on one device (XLA:CPU GEMMs are *not* bitwise
invariant to the block shape, so the kNN distributes the single-device bank blocks rather
than re-blocking each shard, and the coreset fetches ``c . c`` from the centre's owner),
and every cross-device step is a selection (no floating-point sum across devices).
One exception: the kNN bank norms ``sum(b * b)`` are computed in another XLA program than
on one device, and XLA does not promise the same rounding of a fused reduction in two
programs; distances can then differ by an ulp (observed: 1 ulp on some rows). Pass
``bank_sq_norms`` (e.g. :func:`tailedcore_jax.knn.sq_norms` stored at fit time) to both
and the kNN results are bit-identical. Also, inside an outer ``jit`` the per-row
preparation (norms, coreset projection) joins the caller's program, where XLA's
partitioner may split it over the devices; eager calls (as in
:mod:`tailedcore_jax.memory`) are exact, and all tests here compare bit for bit except
that documented kNN-norm case.

Working under ``jax.jit``: the functions may be called inside ``jit`` (their value checks
are then skipped, as in the single-device functions). They are not meant to be ``vmap``-ed;
map over classes outside, or shard the class axis yourself.

Multi-host: create the mesh over ``jax.devices()`` after ``jax.distributed.initialize()``;
inputs must then be global ``jax.Array``s (e.g. from
``jax.make_array_from_process_local_data``) and the same call runs on every process.

References:
    - ``jax.shard_map`` (JAX SPMD, "Introduction to parallel programming" and shard_map docs).
    - PatchCore (arXiv 2106.08265) / TailedCore (arXiv 2504.02775): the algorithms sharded
      here; see :mod:`tailedcore_jax.knn`, :mod:`tailedcore_jax.coreset`,
      :mod:`tailedcore_jax.lof` for the single-device ports of
      ``jungyg/TailedCore`` ``src/sampler.py`` and ``src/common.py``.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from tailedcore_jax import _validation as V
from tailedcore_jax.coreset import (
    CoresetSelection,
    _check_capacity,
    _check_common,
    _check_masked,
    greedy_coreset,
    random_projection,
)
from tailedcore_jax.knn import (
    DEFAULT_BANK_CHUNK,
    DEFAULT_QUERY_CHUNK,
    NeighborResult,
    _empty_best,
    _merge_block,
)
from tailedcore_jax.lof import patchwise_lof

__all__ = [
    "mesh_size",
    "sharded_greedy_coreset",
    "sharded_greedy_coreset_masked",
    "sharded_nearest_neighbors",
    "sharded_patchwise_lof",
]

_HIGHEST = jax.lax.Precision.HIGHEST
_f32 = jnp.float32
# Local argmax in two levels (max per block, then first block with the maximum) once a
# shard holds at least _TWO_LEVEL_MIN rows: XLA:CPU's variadic (value, index) reduce is slow.
_ARGMAX_BLOCK = 1024
_TWO_LEVEL_MIN = 4 * _ARGMAX_BLOCK
_RATIO_MAX_DENOMINATOR = 1 << 15

try:  # jax >= 0.6 exports shard_map at top level (jax 0.10.2 does).
    _shard_map = jax.shard_map
except AttributeError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _legacy_shard_map

    def _shard_map(f, *, mesh, in_specs, out_specs, check_vma=False):
        return _legacy_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                 check_rep=check_vma)


# ----------------------------------------------------------------------------------------
# mesh helpers
# ----------------------------------------------------------------------------------------


def _axes(mesh, axis_name) -> tuple[str, ...]:
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
    """Number of shards the data is split into: the product of the mesh sizes of ``axis_name``
    (all mesh axes when None)."""
    return int(math.prod(mesh.shape[a] for a in _axes(mesh, axis_name)))


def _spec_axes(axes):
    return axes[0] if len(axes) == 1 else axes


def _put(x, mesh, spec):
    """Place ``x`` with ``NamedSharding(mesh, spec)`` (a sharding constraint under jit)."""
    return jax.device_put(x, NamedSharding(mesh, spec))


def _pad_rows(n: int, shards: int, *, block: bool = False) -> int:
    """Rows per shard: ceil(n / shards), rounded up to the argmax block when large."""
    per = -(-n // shards)
    if block and per >= _TWO_LEVEL_MIN:
        per = -(-per // _ARGMAX_BLOCK) * _ARGMAX_BLOCK
    return per


def _static_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int (static), got {value!r}")
    return int(value)


@jax.jit
def _all_finite_rows(x, mask):
    """True when every valid row of ``x`` is finite (fused reduction, no temporary)."""
    a = x * 0.0  # 0 for finite entries, NaN for NaN/inf
    if mask is not None:
        a = jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), a, 0.0)
    # A sum propagates NaN: one fused reduction. (jnp.all(jnp.isfinite(x)) materialised an
    # x-sized bool temporary on XLA:CPU, and its max-reduction does not propagate NaN.)
    return jnp.sum(a) == 0.0


def _check_finite_valid(name, x, mask=None):
    if V.is_concrete(x) and (mask is None or V.is_concrete(mask)):
        ok = _all_finite_rows(x, mask)
        if V.is_concrete(ok) and not bool(ok):  # inside an outer trace ok is a tracer
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")


# ----------------------------------------------------------------------------------------
# kNN: bank rows split over devices
# ----------------------------------------------------------------------------------------


def sharded_nearest_neighbors(
    queries: Float[Array, "m d"],
    bank: Float[Array, "n d"],
    *,
    k: int = 1,
    mesh: Mesh,
    bank_mask: Bool[Array, " n"] | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    bank_chunk: int = DEFAULT_BANK_CHUNK,
    precision: jax.lax.PrecisionLike = _HIGHEST,
    bank_sq_norms: Float[Array, " n"] | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> NeighborResult:
    """:func:`~tailedcore_jax.knn.nearest_neighbors` with the bank split over a device mesh.

    The bank is cut into the balanced blocks of the single-device search (at most
    ``bank_chunk`` rows; the last block shifted back to end at row ``n``), the blocks are
    dealt out in order, ``ceil(blocks / S)`` per device (padded with fully masked blocks),
    and each device keeps the running top-``k`` ranking keys ``|b|^2/2 - q.b`` of every
    query over its blocks (queries are replicated). The ``S`` partial results are merged by
    key with the single-device tie rule (earlier block first), then turned into squared
    distances. Peak memory per device: its bank blocks plus one
    ``(query_chunk, bank_chunk)`` block. For a balanced load choose ``bank_chunk`` so that
    ``n / bank_chunk`` is at least the device count (e.g. ``n / S``).

    Args:
        queries: ``(m, d)`` float queries (replicated to every device).
        bank: ``(n, d)`` float memory bank, possibly padded.
        k: neighbours (static), ``1 <= k <= n``.
        mesh: the device mesh.
        bank_mask, query_chunk, bank_chunk, precision, bank_sq_norms: as in
            :func:`~tailedcore_jax.knn.nearest_neighbors`.
        axis_name: mesh axis (or axes) to split the bank over; None = all axes.

    Returns:
        ``NeighborResult(sq_distances (m, k), indices (m, k))``, bit-identical to
        ``nearest_neighbors`` on one device with the same chunks and the same
        ``bank_sq_norms`` (when the norms are computed on both sides, distances may differ
        by an ulp; see the module docstring) (indices refer to ``bank``'s rows; ``(inf, -1)``
        slots when fewer than ``k`` valid rows exist under ``jit``).

    Raises:
        ValueError / TypeError: as :func:`~tailedcore_jax.knn.nearest_neighbors`, plus a
            mesh that is not a :class:`~jax.sharding.Mesh` or an unknown ``axis_name``.

    References:
        Distributed brute-force search as in faiss ``IndexShards`` (Johnson et al.,
        arXiv 1702.08734): local top-k per shard, then a merge.
    """
    axes = _axes(mesh, axis_name)
    V.check_rank("queries", queries, 2)
    V.check_rank("bank", bank, 2)
    V.check_floating("queries", queries)
    V.check_floating("bank", bank)
    m, d = jnp.shape(queries)
    n, d_bank = jnp.shape(bank)
    if d != d_bank:
        raise ValueError(
            f"queries and bank must have the same feature dimension, got {jnp.shape(queries)} "
            f"and {jnp.shape(bank)}"
        )
    k = _static_int("k", k)
    query_chunk = _static_int("query_chunk", query_chunk)
    bank_chunk = _static_int("bank_chunk", bank_chunk)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if query_chunk < 1 or bank_chunk < 1:
        raise ValueError(f"query_chunk and bank_chunk must be >= 1, got {query_chunk}, {bank_chunk}")
    if n == 0:
        raise ValueError("bank is empty (0 rows)")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of bank rows n={n}")
    V.check_mask("bank_mask", bank_mask, n)
    if bank_sq_norms is not None:
        V.check_floating("bank_sq_norms", bank_sq_norms)
        if jnp.shape(bank_sq_norms) != (n,):
            raise ValueError(f"bank_sq_norms must have shape ({n},), got {jnp.shape(bank_sq_norms)}")
    n_valid = V.concrete_count(bank_mask, n)
    if n_valid is not None and n_valid < k:
        raise ValueError(
            f"k={k} is larger than the number of valid bank rows ({n_valid} of {n} in bank_mask)"
        )
    _check_finite_valid("queries", queries)
    _check_finite_valid("bank (valid rows)", bank, bank_mask)
    if bank_sq_norms is not None:
        _check_finite_valid("bank_sq_norms", bank_sq_norms)

    dtype = jnp.promote_types(jnp.result_type(queries, bank), _f32)
    if m == 0:
        return NeighborResult(jnp.zeros((0, k), dtype), jnp.zeros((0, k), jnp.int32))
    shards = mesh_size(mesh, axes)
    # The single-device block structure (knn._nearest_neighbors): balanced blocks of
    # b_rows rows, the last one shifted back to end at row n. The blocks themselves are
    # distributed (padded with fully masked blocks to a multiple of the shard count), so
    # every GEMM has the single-device shape and the keys are bit-identical.
    n_blocks, b_rows = _balanced(n, bank_chunk)
    per_shard = -(-n_blocks // shards)
    blocks, h, begins = _block_bank(
        jnp.asarray(bank, dtype), bank_mask,
        None if bank_sq_norms is None else jnp.asarray(bank_sq_norms, dtype),
        n_blocks=n_blocks, b_rows=b_rows, total_blocks=per_shard * shards,
    )
    spec = _spec_axes(axes)
    blocks = _put(blocks, mesh, P(spec, None, None))
    h = _put(h, mesh, P(spec, None))
    begins = _put(begins, mesh, P(spec))
    return _sharded_knn(
        jnp.asarray(queries, dtype), blocks, h, begins, mesh=mesh, axes=axes, k=k,
        query_chunk=query_chunk, precision=precision, single_block=n_blocks == 1,
    )


def _balanced(total: int, chunk: int) -> tuple[int, int]:
    """(number of blocks, rows per block): the fewest blocks of at most ``chunk`` rows."""
    blocks = max(1, math.ceil(total / chunk))
    return blocks, math.ceil(total / blocks)


@functools.partial(jax.jit, static_argnames=("n_blocks", "b_rows", "total_blocks"))
def _block_bank(bank, bank_mask, bank_sq, *, n_blocks, b_rows, total_blocks):
    """Bank as ``(total_blocks, b_rows, d)`` blocks, their half norms (``inf`` for masked,
    duplicated and padding rows) and the global row index each block starts at."""
    n, d = bank.shape
    inf = jnp.array(jnp.inf, bank.dtype)
    if bank_sq is None:
        bank_sq = jnp.sum(bank * bank, axis=1)  # as on one device: over the whole bank
    half = 0.5 * bank_sq
    if bank_mask is not None:
        half = jnp.where(bank_mask, half, inf)
    last = n - b_rows  # start of the (shifted) last block
    head = (n_blocks - 1) * b_rows
    pad = total_blocks - n_blocks
    rows = jnp.concatenate([bank[:head], bank[last:], jnp.zeros((pad * b_rows, d), bank.dtype)])
    # Rows of the shifted last block that the previous block already covers are masked.
    tail_h = jnp.where(jnp.arange(b_rows) + last >= head, half[last:], inf)
    hs = jnp.concatenate([half[:head], tail_h, jnp.full((pad * b_rows,), inf, bank.dtype)])
    begins = jnp.concatenate([
        jnp.arange(n_blocks - 1, dtype=jnp.int32) * b_rows,
        jnp.array([last], jnp.int32),
        jnp.zeros((pad,), jnp.int32),
    ])
    return (rows.reshape(total_blocks, b_rows, d), hs.reshape(total_blocks, b_rows), begins)


@functools.partial(
    jax.jit, static_argnames=("mesh", "axes", "k", "query_chunk", "precision", "single_block"),
)
def _sharded_knn(queries, blocks, h, begins, *, mesh, axes, k, query_chunk, precision,
                 single_block):
    shards = mesh_size(mesh, axes)
    m = queries.shape[0]
    dtype = queries.dtype
    inf = jnp.array(jnp.inf, dtype)
    n_qblocks, q_rows = _balanced(m, query_chunk)
    spec = _spec_axes(axes)

    def local(q_all, blk, hh, beg):
        """Running best keys ``r = |b|^2/2 - q.b`` over this device's blocks, per query
        block; the arithmetic and merge rules of knn.nearest_neighbors."""

        def one_query_block(q):
            rows = q.shape[0]

            def keys(j):
                return hh[j][None, :] - jnp.dot(q, blk[j].T, precision=precision)

            def merge(carry, j):
                return _merge_block(carry, keys(j), beg[j], k=k)

            init = _empty_best(rows, k, dtype)
            n_local = blk.shape[0]
            # Same control flow as on one device (a scan unless the whole bank is one
            # block): XLA may emit a dot differently inside a loop body.
            if single_block:
                best_r, best_i = merge(init, 0)
            else:
                (best_r, best_i), _ = jax.lax.scan(
                    lambda c, j: (merge(c, j), None), init, jnp.arange(n_local, dtype=jnp.int32)
                )
            if k == 1:
                best_r, best_i = best_r[:, None], best_i[:, None]
            qq = jnp.sum(q * q, axis=1, keepdims=True)
            return best_r, best_i, qq

        def query_block(j):
            begin = jnp.minimum(j * q_rows, m - q_rows)
            return one_query_block(jax.lax.dynamic_slice_in_dim(q_all, begin, q_rows, axis=0))

        if n_qblocks == 1:
            r, i, qq = jax.tree.map(lambda a: a[None], one_query_block(q_all))
        else:
            r, i, qq = jax.lax.map(query_block, jnp.arange(n_qblocks, dtype=jnp.int32))
        return r[None], i[None], qq[None]

    r, idx, qq = _shard_map(
        local, mesh=mesh, in_specs=(P(), P(spec, None, None), P(spec, None), P(spec)),
        out_specs=(P(spec), P(spec), P(spec)), check_vma=False,
    )(queries, blocks, h, begins)
    # r, idx: (S, n_qblocks, q_rows, k) in block order; qq: identical on every shard.
    qq = qq[0]
    if k == 1:
        # Single device: running minimum with a strict "<", so on equal keys the earliest
        # block wins; blocks are in shard order, and argmin returns the first minimum.
        win = jnp.argmin(r[..., 0], axis=0)
        best_r = jnp.take_along_axis(r[..., 0], win[None], axis=0)[0][..., None]
        best_i = jnp.take_along_axis(idx[..., 0], win[None], axis=0)[0][..., None]
    else:
        # Stable merge in shard (= block) order: lax.top_k keeps the first position on ties.
        cand_r = jnp.moveaxis(r, 0, -2).reshape(n_qblocks, q_rows, shards * k)
        cand_i = jnp.moveaxis(idx, 0, -2).reshape(n_qblocks, q_rows, shards * k)
        neg, sel = jax.lax.top_k(-cand_r, k)
        best_r, best_i = -neg, jnp.take_along_axis(cand_i, sel, axis=-1)
    found = best_r < inf
    sq = jnp.maximum(qq + 2.0 * best_r, 0.0)
    sq, best_i = jnp.where(found, sq, inf), jnp.where(found, best_i, -1)
    if n_qblocks == 1:
        return NeighborResult(sq[0], best_i[0])
    overlap = n_qblocks * q_rows - m
    sq = jnp.concatenate([sq[:-1].reshape(-1, k), sq[-1, overlap:]])
    best_i = jnp.concatenate([best_i[:-1].reshape(-1, k), best_i[-1, overlap:]])
    return NeighborResult(sq, best_i)


# ----------------------------------------------------------------------------------------
# Greedy coreset: projected points split over devices
# ----------------------------------------------------------------------------------------


def _local_first_argmax(v):
    """(max, first index of the max) of a 1-D vector (two-level when long)."""
    n = v.shape[0]
    if n < _TWO_LEVEL_MIN or n % _ARGMAX_BLOCK:
        i = jnp.argmax(v).astype(jnp.int32)
        return v[i], i
    blocks = v.reshape(n // _ARGMAX_BLOCK, _ARGMAX_BLOCK)
    b = jnp.argmax(jnp.max(blocks, axis=1)).astype(jnp.int32)
    row = jax.lax.dynamic_index_in_dim(blocks, b, axis=0, keepdims=False)
    j = jnp.argmax(row).astype(jnp.int32)
    return row[j], b * _ARGMAX_BLOCK + j


@functools.partial(jax.jit, static_argnames=("storage_dtype", "total"))
def _project_t(features, row_ok, w, *, storage_dtype, total):
    """Transposed projected rows ``(p, total)`` (masked and padded rows 0), squared norms and
    the validity of every (padded) row. Same arithmetic as the single-device coreset."""
    n = features.shape[0]
    x = features.astype(_f32)
    if w is not None:
        x = jnp.dot(x, w.astype(_f32), precision=_HIGHEST)
    xt = x.T
    if row_ok is not None:
        xt = jnp.where(row_ok[None, :], xt, 0.0)
    if storage_dtype is not None:
        xt = xt.astype(storage_dtype)
    xf = xt.astype(_f32)
    sq = jnp.sum(xf * xf, axis=0)
    ok = jnp.ones((n,), bool) if row_ok is None else row_ok
    pad = total - n
    if pad:
        xt = jnp.pad(xt, ((0, 0), (0, pad)))
        sq = jnp.pad(sq, (0, pad))
        ok = jnp.pad(ok, (0, pad), constant_values=False)
    return xt, sq, ok


def _greedy_shard(xt, sq, ok, start, num_steps, *, axes, capacity, distance, static_steps):
    """Per-device greedy loop body (inside shard_map). xt: (p, per) local columns."""
    per = xt.shape[1]
    shard = jax.lax.axis_index(axes).astype(jnp.int32)
    offset = shard * per
    pos = jnp.arange(per, dtype=jnp.int32)

    def from_owner(value, g):
        """``value`` (computed at local column g - offset on its owner) from the owner."""
        return jax.lax.all_gather(value, axes)[g // per]

    def local_col(g):
        return jnp.clip(g - offset, 0, per - 1)

    min_d = jnp.where(ok, jnp.inf, -jnp.inf).astype(_f32)
    min_d = jnp.where(pos + offset == start, -jnp.inf, min_d)
    j0 = local_col(start)
    c0 = from_owner(jax.lax.dynamic_index_in_dim(xt, j0, axis=1, keepdims=False), start)
    s0 = from_owner(sq[j0], start)
    idx = jnp.full((capacity,), start, jnp.int32)

    def body(i, carry):
        idx, min_d, last, c, s = carry
        if distance == "expansion":
            dot = jnp.dot(c, xt, precision=_HIGHEST, preferred_element_type=_f32)
            t = from_owner(dot[local_col(last)], last)
            dist = (sq - 2.0 * dot) + (2.0 * t - s)
        else:
            diff = xt.astype(_f32) - c.astype(_f32)[:, None]
            dist = jnp.sum(diff * diff, axis=0)
        dist = jnp.maximum(dist, 0.0)
        min_d = jnp.minimum(min_d, dist)
        v, j = _local_first_argmax(min_d)
        # Cross-device reduction: the first shard holding the global maximum wins (shards
        # are contiguous ascending row ranges, so this is the lowest global index).
        vs = jax.lax.all_gather(v, axes)
        js = jax.lax.all_gather(j, axes)
        cs = jax.lax.all_gather(jax.lax.dynamic_index_in_dim(xt, j, axis=1, keepdims=False), axes)
        ss = jax.lax.all_gather(sq[j], axes)
        win = jnp.argmax(vs).astype(jnp.int32)
        nxt = win * per + js[win]
        min_d = jnp.where((shard == win) & (pos == js[win]), -jnp.inf, min_d)
        return idx.at[i].set(nxt), min_d, nxt, cs[win], ss[win]

    steps = capacity if static_steps else num_steps
    idx, *_ = jax.lax.fori_loop(1, steps, body, (idx, min_d, start, c0, s0))
    return idx


@functools.partial(
    jax.jit, static_argnames=("mesh", "axes", "capacity", "distance", "ratio_frac", "counted")
)
def _sharded_select(xt, sq, ok, start, num_valid, *, mesh, axes, capacity, distance, ratio_frac,
                    counted):
    total = jnp.sum(ok, dtype=jnp.int32)
    if ratio_frac is not None:
        a, b = ratio_frac
        count = (total // b) * a + ((total % b) * a) // b
        count = jnp.where(total > 0, jnp.maximum(count, 1), 0)
        count = jnp.minimum(count, capacity)
    elif counted:
        count = jnp.clip(jnp.asarray(num_valid, jnp.int32), 0, jnp.minimum(total, capacity))
    else:
        count = jnp.int32(capacity)
    spec = _spec_axes(axes)
    loop = functools.partial(_greedy_shard, axes=axes, capacity=capacity, distance=distance,
                             static_steps=ratio_frac is None and not counted)
    idx = _shard_map(
        loop, mesh=mesh, in_specs=(P(None, spec), P(spec), P(spec), P(), P()), out_specs=P(),
        check_vma=False,
    )(xt, sq, ok, start, count)
    return idx, count


def _check_coreset_args(*args):
    """coreset's argument checks, with the NaN/inf check of the valid rows kept on device."""
    return _check_common(*args, check_finite_rows=_check_finite_valid)

def _coreset_driver(key, features, mask, start_index, projection, num_valid, *, mesh, axis_name,
                    capacity, projection_dim, storage_dtype, distance, ratio_frac):
    axes = _axes(mesh, axis_name)
    n, d_in = features.shape
    # Same random draws as the single-device coreset: key_proj, key_start = split(key);
    # the projection is random_projection(key_proj, D, p) (documented in greedy_coreset),
    # the start is taken from greedy_coreset itself (it depends only on key and mask), so
    # the two stay in step whatever the single-device internals do.
    w = projection
    if w is None and projection_dim is not None and projection_dim != d_in:
        key_proj, _ = jax.random.split(key)
        w = random_projection(key_proj, d_in, int(projection_dim))
    if start_index is None:
        start = greedy_coreset(key, jnp.zeros((n, 1), _f32), 1, mask=mask, projection_dim=None)[0]
    else:
        start = jnp.asarray(start_index, jnp.int32)
    shards = mesh_size(mesh, axes)
    per = _pad_rows(n, shards, block=True)
    xt, sq, ok = _project_t(features, mask, w, storage_dtype=storage_dtype, total=per * shards)
    spec = _spec_axes(axes)
    xt = _put(xt, mesh, P(None, spec))
    sq = _put(sq, mesh, P(spec))
    ok = _put(ok, mesh, P(spec))
    return _sharded_select(
        xt, sq, ok, start, num_valid, mesh=mesh, axes=axes, capacity=capacity, distance=distance,
        ratio_frac=ratio_frac, counted=num_valid is not None,
    )


def sharded_greedy_coreset(
    key: jax.Array,
    features: Float[Array, "n D"],
    num_samples: int,
    *,
    mesh: Mesh,
    mask: Bool[Array, " n"] | None = None,
    projection_dim: int | None = 128,
    projection: Float[Array, "D p"] | None = None,
    start_index: int | Int[Array, ""] | None = None,
    storage_dtype=None,
    distance: Literal["expansion", "difference"] = "expansion",
    axis_name: str | tuple[str, ...] | None = None,
) -> Int[Array, " num_samples"]:
    """:func:`~tailedcore_jax.coreset.greedy_coreset` with the points split over a device mesh.

    The features are projected where they live (one GEMM; if they are already sharded by
    rows, XLA partitions it), and only the projected ``(p, N)`` matrix, padded to a multiple
    of the shard count with masked columns, is distributed. Each greedy step: a local
    matrix-vector product and running minimum, a local first-argmax, then one
    ``all_gather`` of ``(value, index, row, norm)`` per shard; the first shard holding the
    maximum wins, which is the lowest global index, as on one device. (With
    ``distance="expansion"`` one more scalar ``all_gather`` per step fetches ``c . c`` from
    the centre's owner so that the arithmetic is the single-device one bit for bit.)

    Args:
        key, features, num_samples, mask, projection_dim, projection, start_index,
            storage_dtype, distance: as in :func:`~tailedcore_jax.coreset.greedy_coreset`
            (same key -> same indices as the single-device function).
        mesh: the device mesh.
        axis_name: mesh axis (or axes) to split the points over; None = all axes.

    Returns:
        ``(num_samples,)`` int32 indices in selection order, equal to ``greedy_coreset``.

    Raises:
        ValueError / TypeError: as :func:`~tailedcore_jax.coreset.greedy_coreset`, plus a
            bad ``mesh`` / ``axis_name``.

    References:
        Sharded form of ``GreedyCoresetSampler._compute_greedy_coreset_indices`` in
        jungyg/TailedCore ``src/sampler.py``; PatchCore (arXiv 2106.08265), section 3.2.
    """
    features = jnp.asarray(features)
    if mask is not None:
        mask = jnp.asarray(mask)
    storage_dtype = _check_coreset_args(features, mask, projection_dim, projection, start_index,
                                        storage_dtype, distance)
    n = features.shape[0]
    num_samples = _check_capacity("num_samples", num_samples, n)
    count = V.concrete_count(mask, n)
    if count is not None and num_samples > count:
        raise ValueError(f"num_samples={num_samples} exceeds the number of valid rows {count}")
    idx, _ = _coreset_driver(
        key, features, mask, start_index, projection, None, mesh=mesh, axis_name=axis_name,
        capacity=num_samples, projection_dim=projection_dim, storage_dtype=storage_dtype,
        distance=distance, ratio_frac=None,
    )
    return idx


def sharded_greedy_coreset_masked(
    key: jax.Array,
    features: Float[Array, "n D"],
    capacity: int,
    *,
    mesh: Mesh,
    mask: Bool[Array, " n"],
    ratio: float | None = None,
    num_valid: int | Int[Array, ""] | None = None,
    projection_dim: int | None = 128,
    projection: Float[Array, "D p"] | None = None,
    start_index: int | Int[Array, ""] | None = None,
    storage_dtype=None,
    distance: Literal["expansion", "difference"] = "expansion",
    axis_name: str | tuple[str, ...] | None = None,
) -> CoresetSelection:
    """:func:`~tailedcore_jax.coreset.greedy_coreset_masked` with the points split over a mesh.

    Same semantics as the single-device function (fixed ``capacity`` output, ``valid``
    marks the first ``count`` entries, ``count = floor(ratio * M)`` (at least 1) or
    ``num_valid``), with the greedy loop of :func:`sharded_greedy_coreset`.

    Args:
        key, features, capacity, mask, ratio, num_valid, projection_dim, projection,
            start_index, storage_dtype, distance: as in
            :func:`~tailedcore_jax.coreset.greedy_coreset_masked`.
        mesh: the device mesh.
        axis_name: mesh axis (or axes) to split the points over; None = all axes.

    Returns:
        :class:`~tailedcore_jax.coreset.CoresetSelection` ``(indices, valid)``, equal to
        ``greedy_coreset_masked`` with the same key.

    Raises:
        ValueError / TypeError: as :func:`~tailedcore_jax.coreset.greedy_coreset_masked`.

    References:
        Sharded form of ``GreedyCoresetSampler.run`` in jungyg/TailedCore ``src/sampler.py``.
    """
    features = jnp.asarray(features)
    if mask is None:
        raise ValueError("sharded_greedy_coreset_masked needs a mask; use sharded_greedy_coreset")
    mask = jnp.asarray(mask)
    storage_dtype, capacity, ratio_frac = _check_masked(
        features, mask, capacity, ratio, num_valid, projection_dim, projection, start_index,
        storage_dtype, distance, check_finite_rows=_check_finite_valid,
    )
    idx, count = _coreset_driver(
        key, features, mask, start_index, projection, num_valid, mesh=mesh, axis_name=axis_name,
        capacity=capacity, projection_dim=projection_dim, storage_dtype=storage_dtype,
        distance=distance, ratio_frac=ratio_frac,
    )
    valid = jnp.arange(capacity, dtype=jnp.int32) < count
    # The single-device function reports indices 0 for an all-False mask; so does the start
    # draw here, and the loop then never moves.
    return CoresetSelection(indices=idx, valid=valid)


# ----------------------------------------------------------------------------------------
# Patch-wise LOF: positions split over devices
# ----------------------------------------------------------------------------------------


def sharded_patchwise_lof(
    features: Float[Array, "N P d"],
    *,
    mesh: Mesh,
    k: int = 6,
    mask: Bool[Array, " N"] | None = None,
    position_chunk: int | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> Float[Array, "N P"]:
    """:func:`~tailedcore_jax.lof.patchwise_lof` with the patch positions split over a mesh.

    Every position is an independent LOF problem across the ``N`` images, so the positions
    (padded with zero positions to a multiple of the shard count, then dropped) are split
    over the devices and each runs the single-device ``patchwise_lof`` on its share. No
    communication. ``position_chunk`` applies per device (None: the single-device memory
    budget).

    Args:
        features: ``(N, P, d)`` patch features (usually the LOF projection, d = 128).
        mesh: the device mesh.
        k, mask, position_chunk: as in :func:`~tailedcore_jax.lof.patchwise_lof`.
        axis_name: mesh axis (or axes) to split the positions over; None = all axes.

    Returns:
        ``(N, P)`` LOF scores equal to ``patchwise_lof`` (rows of padded images 0).

    Raises:
        ValueError / TypeError: as :func:`~tailedcore_jax.lof.patchwise_lof`.

    References:
        Sharded form of ``LOFSampler._compute_patchwise_lof`` in jungyg/TailedCore
        ``src/sampler.py`` (SoftPatch, NeurIPS 2022).
    """
    axes = _axes(mesh, axis_name)
    V.check_rank("features", features, 3)
    V.check_floating("features", features)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a Python int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    num_images, num_positions, _ = features.shape
    if num_images < k + 1:
        raise ValueError(f"patchwise_lof needs at least k + 1 = {k + 1} images, got {num_images}")
    V.check_mask("mask", mask, num_images)
    count = V.concrete_count(mask, num_images)
    if count is not None and count < k + 1:
        raise ValueError(f"patchwise_lof needs at least k + 1 = {k + 1} valid images, got {count}")
    if position_chunk is not None and int(position_chunk) < 1:
        raise ValueError(f"position_chunk must be >= 1, got {position_chunk}")
    _check_finite_valid("features (valid images)", features, mask)
    if num_positions == 0:
        return jnp.zeros((num_images, 0), jnp.promote_types(features.dtype, _f32))
    if mask is None:
        mask = jnp.ones((num_images,), bool)
    shards = mesh_size(mesh, axes)
    per = _pad_rows(num_positions, shards)
    features = jnp.asarray(features)
    if per * shards != num_positions:
        features = _pad_positions(features, pad=per * shards - num_positions)
    spec = _spec_axes(axes)
    features = _put(features, mesh, P(None, spec, None))
    out = _sharded_lof(features, _put(jnp.asarray(mask), mesh, P()), mesh=mesh, axes=axes, k=k,
                       position_chunk=None if position_chunk is None else int(position_chunk))
    return out[:, :num_positions]


@functools.partial(jax.jit, static_argnames=("pad",))
def _pad_positions(features, *, pad):
    return jnp.pad(features, ((0, 0), (0, pad), (0, 0)))


@functools.partial(jax.jit, static_argnames=("mesh", "axes", "k", "position_chunk"))
def _sharded_lof(features, mask, *, mesh, axes, k, position_chunk):
    spec = _spec_axes(axes)

    def local(f, m):
        return patchwise_lof(f, k=k, mask=m, position_chunk=position_chunk)

    return _shard_map(local, mesh=mesh, in_specs=(P(None, spec, None), P()),
                      out_specs=P(None, spec), check_vma=False)(features, mask)
