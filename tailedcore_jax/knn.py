"""Exact chunked nearest neighbours under the squared Euclidean distance.

The hot path of PatchCore / SoftPatch / TailedCore scoring and of the KNN OOD baseline: for
every query, the squared L2 distance to its ``k`` nearest bank rows. Queries are cut into
blocks (``lax.map``); for each query block the bank is scanned in blocks (``lax.scan``) with a
running best ``k`` (a strict ``<`` against the carry for ``k == 1``, a ``lax.top_k`` of the
carry and the block's ``k`` best otherwise). Blocks are balanced and the last one is shifted
back to end at the last row (its rows already covered are masked), so nothing is padded or
copied. With ``mesh=`` the same blocks are dealt out to the devices, every device runs the
same scan over its blocks, and the per-device candidates are merged with the same rule.

Rows are ranked by the half-norm key ``r = |b|^2 / 2 - q.b`` (one GEMM per block); the
distances of the selected rows are then computed directly, ``sum((q - b)^2)`` in a fixed
order. The expansion only decides the ranking: its absolute error ``~eps_f32 (|q|^2 + |b|^2)``
can be most of a small distance between patches far from the origin (faiss ``IndexFlatL2``
reports that error in its distances; this search does not).

Ties: equal keys are ordered by ascending bank index (as a stable ``np.argsort``). Rows at the
same true distance can get keys that differ in the last bit, so for near-duplicates only the
distances, not which duplicate is returned, are guaranteed.

References:
    The exhaustive search of ``faiss.IndexFlatL2`` in ``patchcore/common.py::FaissNN``
    (amazon-science/patchcore-inspection) and ``PatchcoreModel.nearest_neighbors``
    (openvinotoolkit/anomalib); Roth et al., CVPR 2022 (arXiv 2106.08265).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from tailedcore_jax import _validation as V
from tailedcore_jax import sharding
from tailedcore_jax._numerics import pairwise_sum

__all__ = ["NeighborResult", "nearest_neighbors", "pairwise_sq_distances", "sq_norms"]

_HIGHEST = jax.lax.Precision.HIGHEST

#: Default number of query rows per block.
DEFAULT_QUERY_CHUNK = 2048
#: Default number of bank rows per block (a 2048 x 4096 float32 block is 32 MiB).
DEFAULT_BANK_CHUNK = 4096


class NeighborResult(NamedTuple):
    """Result of :func:`nearest_neighbors` (a plain tuple, so it also unpacks as one).

    Attributes:
        sq_distances: ``(m, k)`` squared Euclidean distances, ascending per row.
        indices: ``(m, k)`` int32 bank rows; ``-1`` (distance ``inf``) where fewer than ``k``
            valid rows exist (only possible under ``jit``/``vmap``).
    """

    sq_distances: Float[Array, "m k"]
    indices: Int[Array, "m k"]


def sq_norms(bank: Float[Array, "... n d"]) -> Float[Array, "... n"]:
    """``sum(bank**2, -1)`` in at least float32: pass it to :func:`nearest_neighbors` as
    ``bank_sq_norms`` to compute it once per bank.

    Raises:
        TypeError: non-floating ``bank``. ValueError: rank 0.
    """
    V.check_floating("bank", bank)
    if jnp.ndim(bank) < 1:
        raise ValueError(f"bank must have rank >= 1, got shape {jnp.shape(bank)}")
    bank = jnp.asarray(bank, _compute_dtype(bank))
    return jnp.sum(bank * bank, axis=-1)


def pairwise_sq_distances(
    x: Float[Array, "m d"],
    y: Float[Array, "n d"] | None = None,
    *,
    precision: jax.lax.PrecisionLike = _HIGHEST,
) -> Float[Array, "m n"]:
    """Dense ``|x_i - y_j|^2 = |x_i|^2 - 2 x_i.y_j + |y_j|^2``, clamped at 0 (materialised).

    For small sets; patch-sized banks go through :func:`nearest_neighbors`. With ``y=None`` the
    distances of ``x`` to itself, symmetrised, with an exact zero diagonal.

    Raises:
        ValueError: rank not 2 or feature dimensions differ. TypeError: non-floating input.
    """
    V.check_rank("x", x, 2)
    V.check_floating("x", x)
    self_distances = y is None
    y = x if self_distances else y
    V.check_rank("y", y, 2)
    V.check_floating("y", y)
    if jnp.shape(x)[1] != jnp.shape(y)[1]:
        raise ValueError(
            f"x and y must have the same feature dimension, got {jnp.shape(x)} and {jnp.shape(y)}"
        )
    dtype = _compute_dtype(x, y)
    x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    xx = jnp.sum(x * x, axis=1)
    yy = xx if self_distances else jnp.sum(y * y, axis=1)
    sq = xx[:, None] - 2.0 * jnp.dot(x, y.T, precision=precision) + yy[None, :]
    sq = jnp.maximum(sq, 0.0)  # cancellation can make the expansion slightly negative
    if self_distances:  # the GEMM need not be bit-symmetric
        sq = 0.5 * (sq + sq.T)
        sq = jnp.where(jnp.eye(sq.shape[0], dtype=bool), jnp.zeros((), dtype), sq)
    return sq


def nearest_neighbors(
    queries: Float[Array, "m d"],
    bank: Float[Array, "n d"],
    *,
    k: int = 1,
    bank_mask: Bool[Array, " n"] | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    bank_chunk: int = DEFAULT_BANK_CHUNK,
    precision: jax.lax.PrecisionLike = _HIGHEST,
    bank_sq_norms: Float[Array, " n"] | None = None,
    mesh: Mesh | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> NeighborResult:
    """Exact ``k`` nearest valid bank rows of every query, by squared Euclidean distance.

    Equals brute force (full distance matrix, then a stable ``argsort``) to float32 rounding,
    with peak extra memory of one ``(query_chunk, bank_chunk)`` block. Works under ``jit`` and
    ``vmap`` (banks padded to one ``n`` and described by ``bank_mask``: one compilation).

    Args:
        queries: ``(m, d)`` floating-point queries.
        bank: ``(n, d)`` floating-point memory bank, possibly padded.
        k: neighbours per query (static), ``1 <= k <= n``.
        bank_mask: ``(n,)`` bool, True = valid. Masked rows (any finite values) are never
            returned: the result is that of ``bank[bank_mask]`` with indices mapped back.
        query_chunk, bank_chunk: rows per block (static; need not divide ``m`` / ``n``).
        precision: matmul precision of the ranking ``q.b``; ``HIGHEST`` is exact float32 on
            every backend.
        bank_sq_norms: optional ``sq_norms(bank)`` (not checked against ``bank``).
        mesh: optional :class:`jax.sharding.Mesh`: the bank blocks are dealt out over its
            devices (queries replicated) and the result equals the single-device call bit for
            bit (with norms computed in two XLA programs an exact near-tie of keys could
            order differently; pass the same ``bank_sq_norms`` to exclude that). Not under
            ``vmap``.
        axis_name: mesh axis (or axes) to split over; None = all.

    Returns:
        ``NeighborResult(sq_distances, indices)``, each ``(m, k)``: float32 (or the wider input
        dtype), ascending; int32. Under ``jit`` with fewer than ``k`` valid rows the missing
        slots are ``(inf, -1)``.

    Raises:
        ValueError: rank not 2, feature dimensions differ, ``k < 1`` or ``k > n``, a chunk
            ``< 1``, wrong ``bank_mask`` / ``bank_sq_norms`` shape, an unknown mesh axis; on
            concrete inputs only, fewer than ``k`` valid rows or NaN/inf in ``queries``, the
            valid bank rows or ``bank_sq_norms`` (under ``jit`` NaN gives unspecified, always
            in-range neighbours).
        TypeError: non-floating arrays, non-bool mask, non-int sizes, ``mesh`` not a Mesh.

    Examples:
        >>> import jax.numpy as jnp
        >>> bank = jnp.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
        >>> d, i = nearest_neighbors(jnp.array([[0.9, 0.0]]), bank, k=2)
        >>> i.tolist(), [round(v, 4) for v in d[0].tolist()]
        ([[1, 0]], [0.01, 0.81])
    """
    axes = None if mesh is None else sharding.mesh_axes(mesh, axis_name)
    k, query_chunk, bank_chunk = _check_args(
        queries, bank, k, bank_mask, query_chunk, bank_chunk, bank_sq_norms
    )
    dtype = _compute_dtype(queries, bank)
    m = jnp.shape(queries)[0]
    if m == 0:
        return NeighborResult(jnp.zeros((0, k), dtype), jnp.zeros((0, k), jnp.int32))
    queries, bank = jnp.asarray(queries, dtype), jnp.asarray(bank, dtype)
    if bank_sq_norms is not None:
        bank_sq_norms = jnp.asarray(bank_sq_norms, dtype)
    static = dict(k=k, query_chunk=query_chunk, bank_chunk=bank_chunk, precision=precision)
    if mesh is None:
        return _nearest_neighbors(queries, bank, bank_mask, bank_sq_norms, **static)
    return _nearest_neighbors_mesh(queries, bank, bank_mask, bank_sq_norms, mesh=mesh, axes=axes,
                                   **static)


def _check_args(queries, bank, k, bank_mask, query_chunk, bank_chunk, bank_sq_norms):
    """Every check of :func:`nearest_neighbors`; returns the static ints."""
    V.check_rank("queries", queries, 2)
    V.check_rank("bank", bank, 2)
    V.check_floating("queries", queries)
    V.check_floating("bank", bank)
    n, d_bank = jnp.shape(bank)
    if jnp.shape(queries)[1] != d_bank:
        raise ValueError(
            "queries and bank must have the same feature dimension, got "
            f"queries {jnp.shape(queries)} and bank {jnp.shape(bank)}"
        )
    k = V.static_int("k", k, minimum=1)
    query_chunk = V.static_int("query_chunk", query_chunk, minimum=1)
    bank_chunk = V.static_int("bank_chunk", bank_chunk, minimum=1)
    if n == 0:
        raise ValueError("bank is empty (0 rows)")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of bank rows n={n}")
    V.check_mask("bank_mask", bank_mask, n)
    if bank_sq_norms is not None:
        V.check_floating("bank_sq_norms", bank_sq_norms)
        if jnp.shape(bank_sq_norms) != (n,):
            raise ValueError(
                f"bank_sq_norms must have shape ({n},), got {jnp.shape(bank_sq_norms)}"
            )
    n_valid = V.concrete_count(bank_mask, n)
    if n_valid is not None and n_valid < k:
        raise ValueError(
            f"k={k} is larger than the number of valid bank rows ({n_valid} of {n} in bank_mask)"
        )
    V.check_finite_rows("queries", queries)
    V.check_finite_rows("bank (valid rows)", bank, bank_mask)
    if bank_sq_norms is not None:
        V.check_finite_rows("bank_sq_norms", bank_sq_norms)
    return k, query_chunk, bank_chunk


# ------------------------------------------------------------------------ the block kernel


def _half_norms(bank, bank_mask, bank_sq):
    """``|b|^2 / 2`` per row (exact scaling), ``+inf`` for masked rows (never selected)."""
    if bank_sq is None:
        bank_sq = jnp.sum(bank * bank, axis=1)
    half = 0.5 * bank_sq
    if bank_mask is not None:
        half = jnp.where(bank_mask, half, jnp.array(jnp.inf, half.dtype))
    return half


def _empty_best(rows: int, k: int, dtype):
    """The running best before any block: key ``+inf``, index -1 (``(rows,)`` for k == 1)."""
    shape = (rows,) if k == 1 else (rows, k)
    return jnp.full(shape, jnp.inf, dtype), jnp.full(shape, -1, jnp.int32)


def _merge(best, r, i, *, k: int):
    """Fold candidates ``(r, i)`` into the running best ``k``. The carry holds earlier (lower)
    indices and comes first, so equal keys keep index order."""
    best_r, best_i = best
    if k == 1:
        better = r < best_r  # strict: on equal keys the earlier candidate wins
        return jnp.where(better, r, best_r), jnp.where(better, i, best_i)
    neg, sel = jax.lax.top_k(-jnp.concatenate([best_r, r], axis=1), k)
    return -neg, jnp.take_along_axis(jnp.concatenate([best_i, i], axis=1), sel, axis=1)


def _merge_block(best, keys, begin, *, k: int):
    """Fold one bank block's ``(rows, b_rows)`` keys (first row ``begin``) into the best ``k``."""
    b_rows = keys.shape[1]
    if k == 1:
        # lax.top_k(., 1) rather than min/argmin: the TopK custom call was measured faster
        # than XLA:CPU's variadic reduce, with the same lowest-index tie rule.
        neg, i = jax.lax.top_k(-keys, 1)
        return _merge(best, -neg[:, 0], i[:, 0].astype(jnp.int32) + begin, k=1)
    if b_rows > k:
        neg, i = jax.lax.top_k(-keys, k)
        r, i = -neg, i.astype(jnp.int32) + begin
    else:
        r = keys
        i = jnp.broadcast_to(jnp.arange(b_rows, dtype=jnp.int32) + begin, keys.shape)
    return _merge(best, r, i, k=k)


def _scan_blocks(q, block, num_blocks: int, *, k: int, precision, loop: bool):
    """Running best keys ``(rows, k)`` of query block ``q`` over bank blocks ``block(j)``
    (``-> rows (b, d), half norms (b,), first row``), plus ``|q|^2`` per query. ``loop=False``
    (a one-block bank) folds block 0 without a scan: XLA may emit a dot differently inside a
    loop body, so the mesh path makes the same choice as the single-device one."""

    def fold(best, j):
        b, h, begin = block(j)
        keys = h[None, :] - jnp.dot(q, b.T, precision=precision)  # +inf rows stay +inf
        return _merge_block(best, keys, begin, k=k)

    best = _empty_best(q.shape[0], k, q.dtype)
    if not loop:
        best = fold(best, 0)
    else:
        best, _ = jax.lax.scan(lambda c, j: (fold(c, j), None), best,
                               jnp.arange(num_blocks, dtype=jnp.int32))
    best_r, best_i = best
    if k == 1:
        best_r, best_i = best_r[:, None], best_i[:, None]
    return best_r, best_i


def _distances(q, bank, best_r, best_i):
    """``sum((q - b)^2)`` of the selected rows (fixed-order sum); empty slots ``(inf, -1)``.

    The expansion only ranks: its absolute error ``~eps (|q|^2 + |b|^2)`` can be most of a
    small distance (patches far from the origin), while the direct difference is accurate to
    ``~eps log2(d)`` relative, and exactly 0 for a copy of a bank row.
    """
    found = best_r < jnp.inf
    rows = jnp.take(bank, jnp.maximum(best_i, 0), axis=0)  # (m, k, d)
    sq = pairwise_sum((q[:, None, :] - rows) ** 2)
    return jnp.where(found, sq, jnp.inf), jnp.where(found, best_i, -1)


def _balanced(total: int, chunk: int) -> tuple[int, int]:
    """(number of blocks, rows per block): the fewest blocks of at most ``chunk`` rows."""
    blocks = max(1, math.ceil(total / chunk))
    return blocks, math.ceil(total / blocks)


def _map_query_blocks(fn, queries, query_chunk: int):
    """``fn`` over balanced query blocks (the last shifted back); outputs stacked
    ``(num_blocks, q_rows, ...)``. :func:`_unblock` drops the rows computed twice."""
    m = queries.shape[0]
    n_qblocks, q_rows = _balanced(m, query_chunk)
    if n_qblocks == 1:
        return jax.tree.map(lambda a: a[None], fn(queries))

    def one(j):
        begin = jnp.minimum(j * q_rows, m - q_rows)
        return fn(jax.lax.dynamic_slice_in_dim(queries, begin, q_rows, axis=0))

    return jax.lax.map(one, jnp.arange(n_qblocks, dtype=jnp.int32))


def _unblock(x, m: int):
    """``(num_blocks, q_rows, k) -> (m, k)``: rows of the last block already in the previous
    one are dropped."""
    overlap = x.shape[0] * x.shape[1] - m
    if x.shape[0] == 1:
        return x[0]
    return jnp.concatenate([x[:-1].reshape(-1, x.shape[-1]), x[-1, overlap:]])


@functools.partial(jax.jit, static_argnames=("k", "query_chunk", "bank_chunk", "precision"))
def _nearest_neighbors(queries, bank, bank_mask, bank_sq, *, k, query_chunk, bank_chunk,
                       precision):
    n = bank.shape[0]
    n_bblocks, b_rows = _balanced(n, bank_chunk)
    half = _half_norms(bank, bank_mask, bank_sq)
    row_in_block = jnp.arange(b_rows, dtype=jnp.int32)

    def block(j):  # a dynamic slice of the bank: no copy
        nominal = j * b_rows
        begin = jnp.minimum(nominal, n - b_rows)  # the last block is shifted back
        h = jax.lax.dynamic_slice_in_dim(half, begin, b_rows, axis=0)
        h = jnp.where(row_in_block + begin >= nominal, h, jnp.inf)  # rows already covered
        return jax.lax.dynamic_slice_in_dim(bank, begin, b_rows, axis=0), h, begin

    def one_query_block(q):
        best_r, best_i = _scan_blocks(q, block, n_bblocks, k=k, precision=precision,
                                      loop=n_bblocks > 1)
        return _distances(q, bank, best_r, best_i)

    sq, idx = _map_query_blocks(one_query_block, queries, query_chunk)
    m = queries.shape[0]
    return NeighborResult(_unblock(sq, m), _unblock(idx, m))


@functools.partial(jax.jit, static_argnames=("n_blocks", "b_rows", "total_blocks"))
def _deal_blocks(bank, half, *, n_blocks, b_rows, total_blocks):
    """The single-device blocks as ``(total_blocks, b_rows, d)`` (padding blocks masked), their
    half norms and first rows, so that every device's GEMMs have the single-device shapes."""
    n, d = bank.shape
    last, head = n - b_rows, (n_blocks - 1) * b_rows
    pad = total_blocks - n_blocks
    rows = jnp.concatenate([bank[:head], bank[last:], jnp.zeros((pad * b_rows, d), bank.dtype)])
    tail_h = jnp.where(jnp.arange(b_rows) + last >= head, half[last:], jnp.inf)
    hs = jnp.concatenate([half[:head], tail_h, jnp.full((pad * b_rows,), jnp.inf, half.dtype)])
    begins = jnp.concatenate([jnp.arange(n_blocks - 1, dtype=jnp.int32) * b_rows,
                              jnp.array([last], jnp.int32), jnp.zeros((pad,), jnp.int32)])
    return rows.reshape(total_blocks, b_rows, d), hs.reshape(total_blocks, b_rows), begins


def _nearest_neighbors_mesh(queries, bank, bank_mask, bank_sq, *, mesh, axes, k, query_chunk,
                            bank_chunk, precision):
    shards = sharding.mesh_size(mesh, axes)
    n_blocks, b_rows = _balanced(bank.shape[0], bank_chunk)
    per_shard = -(-n_blocks // shards)
    half = jax.jit(_half_norms)(bank, bank_mask, bank_sq)  # over the whole bank, as on one device
    blocks, hs, begins = _deal_blocks(bank, half, n_blocks=n_blocks, b_rows=b_rows,
                                      total_blocks=per_shard * shards)
    spec = sharding.split_spec(axes)
    blocks = sharding.place(blocks, mesh, P(spec, None, None))
    hs = sharding.place(hs, mesh, P(spec, None))
    begins = sharding.place(begins, mesh, P(spec))
    return _knn_over_shards(queries, bank, blocks, hs, begins, mesh=mesh, axes=axes, k=k,
                            query_chunk=query_chunk, precision=precision,
                            num_blocks_one_device=n_blocks)


@functools.partial(jax.jit, static_argnames=("mesh", "axes", "k", "query_chunk", "precision",
                                             "num_blocks_one_device"))
def _knn_over_shards(queries, bank, blocks, hs, begins, *, mesh, axes, k, query_chunk, precision,
                     num_blocks_one_device):
    spec = sharding.split_spec(axes)

    def local(q_all, blk, hh, beg):
        def one_query_block(q):
            return _scan_blocks(q, lambda j: (blk[j], hh[j], beg[j]), blk.shape[0], k=k,
                                precision=precision, loop=num_blocks_one_device > 1)

        return jax.tree.map(lambda a: a[None], _map_query_blocks(one_query_block, q_all,
                                                                 query_chunk))

    r, idx = sharding.shard_map(
        local, mesh=mesh, in_specs=(P(), P(spec, None, None), P(spec, None), P(spec)),
        out_specs=(P(spec), P(spec)), check_vma=False,
    )(queries, blocks, hs, begins)
    # (shards, query blocks, q_rows, k), shards in block order: fold them with the merge rule.
    rows = r.shape[1] * r.shape[2]
    flat = (rows,) if k == 1 else (rows, k)
    best = _empty_best(rows, k, r.dtype)
    for s in range(r.shape[0]):
        best = _merge(best, r[s].reshape(flat), idx[s].reshape(flat), k=k)
    m = queries.shape[0]
    best_r, best_i = (_unblock(b.reshape(r.shape[1:]), m) for b in best)
    return NeighborResult(*_distances(queries, bank, best_r, best_i))


def _compute_dtype(*arrays):
    """Promoted floating dtype of the inputs, at least float32."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
