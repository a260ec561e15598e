"""Exact chunked nearest neighbours under the squared Euclidean distance.

The hot path of PatchCore / SoftPatch / TailedCore scoring (and of the KNN OOD baseline)
is "for every query patch, the squared L2 distance to its ``k`` nearest memory-bank rows".
This module computes it exactly, in float32 with ``precision=HIGHEST`` by default, without
ever materialising more than one ``(query_chunk, bank_chunk)`` block of distances:

* queries are split into chunks and processed one after the other (``lax.map``);
* for each query chunk, the bank is scanned in chunks (``lax.scan``) with a running
  ``(min, argmin)`` (``k == 1``: block minimum, then a strict ``<`` against the carry) or a
  running top-``k`` (``k > 1``: block top-``k``, then ``lax.top_k`` of the concatenation
  with the carry) carried across bank chunks;
* chunk sizes need not divide the number of rows: blocks are balanced, and the last
  block is shifted back to end at the last row, with the rows it shares with the previous
  block masked out (bank) or dropped (queries). Nothing is padded, so no copy of the
  whole bank is made.

Distances use the expansion ``||q - b||^2 = ||q||^2 - 2 q.b + ||b||^2``. Rows are ranked
with the half-norm key ``r = ||b||^2 / 2 - q.b`` (one GEMM plus one broadcast subtraction
per block; ``||q||^2`` does not change the ranking of a row of the block), and
``||q||^2 + 2 r`` is formed only for the selected neighbours, then clamped at 0 because
cancellation can make it slightly negative. The expansion loses absolute accuracy of
about ``eps_f32 * (||q||^2 + ||b||^2)`` compared with the direct difference; use
float64 inputs (with ``jax_enable_x64``) if that matters.

The references all compute the same quantity: ``faiss.IndexFlatL2.search`` in
amazon-science/patchcore-inspection (``patchcore/common.py::FaissNN.run``), and
``PatchcoreModel.nearest_neighbors`` / ``euclidean_dist`` in openvinotoolkit/anomalib
(``anomalib/models/image/patchcore/torch_model.py``). This is a JAX implementation of
that brute-force search, written from the formula, not a copy of either.

Ties: neighbours are ordered by ascending ranking key and, among exactly equal keys, by
ascending bank index (like ``np.argsort(..., kind="stable")`` and ``np.argmin``). Two
rows at the same true distance can still get keys that differ in the last bit (the
GEMM may sum them in different orders), so for near-duplicates only the distances, not
the order of the indices, are guaranteed.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from tailedcore_jax import _validation as V

__all__ = [
    "NeighborResult",
    "nearest_neighbors",
    "pairwise_sq_distances",
    "sq_norms",
]

HIGHEST = jax.lax.Precision.HIGHEST

#: Default number of query rows per block.
DEFAULT_QUERY_CHUNK = 2048
#: Default number of bank rows per block (a 2048 x 4096 float32 block is 32 MiB).
DEFAULT_BANK_CHUNK = 4096


class NeighborResult(NamedTuple):
    """Result of :func:`nearest_neighbors` (a plain tuple, so it also unpacks as one).

    Attributes:
        sq_distances: squared Euclidean distances, shape ``(m, k)``, ascending per row.
        indices: bank row indices, shape ``(m, k)``, int32; ``-1`` where fewer than ``k``
            valid bank rows exist (only possible under ``jit``/``vmap``; see
            :func:`nearest_neighbors`).
    """

    sq_distances: Float[Array, "m k"]
    indices: Int[Array, "m k"]


# --------------------------------------------------------------------------------------
# Small public helpers
# --------------------------------------------------------------------------------------


def sq_norms(bank: Float[Array, "... n d"]) -> Float[Array, "... n"]:
    """Squared Euclidean norm of every row, ``sum(bank**2, axis=-1)``.

    Pre-compute this once for a memory bank (e.g. at fit time) and pass it to
    :func:`nearest_neighbors` as ``bank_sq_norms`` to skip recomputing it per call.

    Args:
        bank: array of shape ``(..., n, d)`` (any leading batch axes), floating point.

    Returns:
        Array of shape ``(..., n)`` in the floating dtype of ``bank`` promoted to at
        least float32.

    Raises:
        TypeError: if ``bank`` is not floating point.
        ValueError: if ``bank`` has rank 0.
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
    precision: jax.lax.PrecisionLike = HIGHEST,
) -> Float[Array, "m n"]:
    """Dense squared Euclidean distance matrix ``||x_i - y_j||^2`` (materialised).

    Computed as ``||x||^2 - 2 x y^T + ||y||^2`` with one GEMM, clamped at 0. Meant for
    small sets (LOF neighbourhoods, per-image similarity, tests); for patch-sized banks
    use :func:`nearest_neighbors`, which never builds the full matrix.

    Args:
        x: array of shape ``(m, d)``.
        y: array of shape ``(n, d)``, or ``None`` for the distances of ``x`` to itself;
            in that case the diagonal is set to exactly 0 (the expansion would otherwise
            leave rounding noise there) and the result is symmetric.
        precision: matmul precision of the ``x y^T`` term (default ``HIGHEST``: true
            float32 on every backend, no TF32/bf16 passes).

    Returns:
        Array of shape ``(m, n)`` (``(m, m)`` when ``y is None``), non-negative.

    Raises:
        ValueError: if a rank is not 2 or the feature dimensions differ.
        TypeError: if an input is not floating point.
    """
    V.check_rank("x", x, 2)
    V.check_floating("x", x)
    self_distances = y is None
    if self_distances:
        y = x
    V.check_rank("y", y, 2)
    V.check_floating("y", y)
    if jnp.shape(x)[1] != jnp.shape(y)[1]:
        raise ValueError(
            f"x and y must have the same feature dimension, got {jnp.shape(x)} and {jnp.shape(y)}"
        )
    dtype = _compute_dtype(x, y)
    x = jnp.asarray(x, dtype)
    y = jnp.asarray(y, dtype)
    xx = jnp.sum(x * x, axis=1)
    yy = xx if self_distances else jnp.sum(y * y, axis=1)
    dots = jnp.dot(x, y.T, precision=precision)
    sq = xx[:, None] - 2.0 * dots + yy[None, :]
    sq = jnp.maximum(sq, 0.0)  # cancellation can make the expansion slightly negative
    if self_distances:
        # Symmetrise (the GEMM need not be bit-symmetric) and zero the diagonal.
        sq = 0.5 * (sq + sq.T)
        sq = jnp.where(jnp.eye(sq.shape[0], dtype=bool), jnp.zeros((), dtype), sq)
    return sq


# --------------------------------------------------------------------------------------
# nearest_neighbors
# --------------------------------------------------------------------------------------


def nearest_neighbors(
    queries: Float[Array, "m d"],
    bank: Float[Array, "n d"],
    *,
    k: int = 1,
    bank_mask: Bool[Array, " n"] | None = None,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    bank_chunk: int = DEFAULT_BANK_CHUNK,
    precision: jax.lax.PrecisionLike = HIGHEST,
    bank_sq_norms: Float[Array, " n"] | None = None,
) -> NeighborResult:
    """Exact ``k`` nearest valid bank rows of every query, by squared Euclidean distance.

    Equals a brute-force search (``numpy``: full distance matrix, then ``argsort``) to
    float32 tolerance, with peak extra memory of one ``(query_chunk, bank_chunk)``
    block. ``k == 1`` keeps a running ``(min, argmin)`` (compare-and-select across bank
    chunks); ``k > 1`` a running top-``k`` merged with ``lax.top_k`` across bank chunks.
    Block minima use ``lax.top_k`` on the negated keys (measured faster than
    ``jnp.min``/``argmin`` on XLA:CPU, same lowest-index tie rule).

    JAX implementation of the exhaustive search done with ``faiss.IndexFlatL2`` in
    ``patchcore/common.py::FaissNN`` (amazon-science/patchcore-inspection) and with
    ``torch.cdist`` + ``topk`` in ``PatchcoreModel.nearest_neighbors``
    (openvinotoolkit/anomalib).

    Works under ``jax.jit`` and ``jax.vmap`` (e.g. over a leading product-class axis,
    with every class's bank padded to the same ``n`` and described by ``bank_mask``);
    classes with different valid counts but the same padded shape share one compilation.
    Bind the keyword arguments with ``functools.partial`` before ``vmap`` if they
    must not be mapped.

    Ties: among exactly equal ranking keys the lower bank index comes first (as with
    ``np.argmin`` / a stable ``np.argsort``). Rows at the same true distance may get
    keys that differ in the last float32 bit, so with (near-)duplicate rows only the
    distances are guaranteed to match a reference, not which duplicate is returned.

    Args:
        queries: query features, shape ``(m, d)``, floating point.
        bank: memory bank, shape ``(n, d)``, floating point, possibly padded.
        k: number of neighbours (static, part of the jit cache key); ``1 <= k <= n``.
        bank_mask: optional boolean validity mask of shape ``(n,)`` (``True`` = valid).
            Masked rows are never returned: the result equals running on
            ``bank[bank_mask]`` with indices mapped back to ``bank``'s rows. Masked rows
            may hold any finite values.
        query_chunk: query rows per block (static). Need not divide ``m``.
        bank_chunk: bank rows per block (static). Need not divide ``n``. The block size
            is balanced, e.g. ``n = 20000`` with ``bank_chunk = 8192`` gives three
            blocks of 6667 rows (the last one starting at row 13333).
        precision: matmul precision of the ``q.b`` term; default ``HIGHEST`` (exact
            float32 everywhere; on CPU it costs nothing, on GPU it avoids TF32).
        bank_sq_norms: optional pre-computed ``sq_norms(bank)``, shape ``(n,)``; saves
            one pass over the bank per call. Not checked against ``bank``.

    Returns:
        ``NeighborResult(sq_distances, indices)`` (a tuple): ``sq_distances`` float32
        (or the promoted input dtype if wider) of shape ``(m, k)``, ascending per row;
        ``indices`` int32 of shape ``(m, k)``.

        If, under ``jit``/``vmap``, a bank has fewer than ``k`` valid rows, the missing
        neighbour slots hold distance ``inf`` and index ``-1`` (never the index of a
        masked or padded row). With no valid row at all every slot is ``(inf, -1)``.

    Raises:
        ValueError: rank of ``queries``/``bank`` is not 2; feature dimensions differ;
            ``k < 1``; ``k > n``; a chunk size ``< 1``; ``bank_mask`` or
            ``bank_sq_norms`` has the wrong shape; *(concrete inputs only)* fewer than
            ``k`` valid rows in ``bank_mask``; *(concrete inputs only)* NaN or inf in
            ``queries``, in the valid rows of ``bank``, or in ``bank_sq_norms``.
        TypeError: ``queries``/``bank`` not floating point; ``bank_mask`` not boolean;
            ``k`` or a chunk size not an integer.

        The checks marked *concrete inputs only* need values, so they are skipped when
        the argument is a tracer (inside ``jit``/``vmap``); there, NaN inputs give
        unspecified neighbours (never an out-of-range index).

    Examples:
        >>> import jax.numpy as jnp
        >>> bank = jnp.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
        >>> d, i = nearest_neighbors(jnp.array([[0.9, 0.0]]), bank, k=2)
        >>> i.tolist(), [round(v, 4) for v in d[0].tolist()]
        ([[1, 0]], [0.01, 0.81])

    References:
        Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022,
        arXiv:2106.08265 (PatchCore). Johnson, Douze, Jegou, "Billion-scale similarity
        search with GPUs", arXiv:1702.08734 (faiss ``IndexFlatL2``).
    """
    # ---- static validation (trace time) ----------------------------------------------
    V.check_rank("queries", queries, 2)
    V.check_rank("bank", bank, 2)
    V.check_floating("queries", queries)
    V.check_floating("bank", bank)
    m, d = jnp.shape(queries)
    n, d_bank = jnp.shape(bank)
    if d != d_bank:
        raise ValueError(
            "queries and bank must have the same feature dimension, got "
            f"queries {jnp.shape(queries)} and bank {jnp.shape(bank)}"
        )
    k = _static_int("k", k)
    query_chunk = _static_int("query_chunk", query_chunk)
    bank_chunk = _static_int("bank_chunk", bank_chunk)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if query_chunk < 1 or bank_chunk < 1:
        raise ValueError(
            f"query_chunk and bank_chunk must be >= 1, got {query_chunk} and {bank_chunk}"
        )
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

    # ---- value validation (concrete inputs only) -------------------------------------
    n_valid = V.concrete_count(bank_mask, n)
    if n_valid is not None and n_valid < k:
        raise ValueError(
            f"k={k} is larger than the number of valid bank rows ({n_valid} of {n} in bank_mask)"
        )
    _check_finite_rows("queries", queries)
    if bank_mask is None or V.is_concrete(bank_mask):
        _check_finite_rows("bank (valid rows)", bank, bank_mask)
    if bank_sq_norms is not None:
        V.check_finite("bank_sq_norms", bank_sq_norms)

    dtype = _compute_dtype(queries, bank)
    if m == 0:
        return NeighborResult(jnp.zeros((0, k), dtype), jnp.zeros((0, k), jnp.int32))
    return _nearest_neighbors(
        jnp.asarray(queries, dtype),
        jnp.asarray(bank, dtype),
        bank_mask,
        None if bank_sq_norms is None else jnp.asarray(bank_sq_norms, dtype),
        k=k,
        query_chunk=query_chunk,
        bank_chunk=bank_chunk,
        precision=precision,
    )


@functools.partial(jax.jit, static_argnames=("k", "query_chunk", "bank_chunk", "precision"))
def _nearest_neighbors(queries, bank, bank_mask, bank_sq, *, k, query_chunk, bank_chunk, precision):
    # Jitted as a unit so that eager calls compile once instead of op by op; inside an
    # outer jit/vmap this is simply inlined.
    m = queries.shape[0]
    n = bank.shape[0]
    dtype = queries.dtype
    inf = jnp.array(jnp.inf, dtype)

    # Balanced chunking: the fewest blocks of at most `*_chunk` rows, all of one size.
    # When the block size does not divide the row count, the last block is shifted back
    # to end at the last row (it overlaps its predecessor by fewer rows than there are
    # blocks). Overlapping bank rows are masked out in that block; overlapping query rows
    # are computed twice and dropped once. So nothing is padded or copied as a whole:
    # every block is a dynamic slice of the inputs and the kernel has a single shape.
    n_qblocks, q_rows = _balanced(m, query_chunk)
    n_bblocks, b_rows = _balanced(n, bank_chunk)

    if bank_sq is None:
        bank_sq = jnp.sum(bank * bank, axis=1)
    half_norms = 0.5 * bank_sq  # exact (power-of-two scaling)
    # Masked bank rows get a key of +inf, so they are never selected while a valid row
    # remains; slots that could only be filled by them become (inf, -1) at the end.
    if bank_mask is not None:
        half_norms = jnp.where(bank_mask, half_norms, inf)
    row_in_block = jnp.arange(b_rows, dtype=jnp.int32)

    def bank_block(j):
        """Rows of bank block ``j``, their half norms (inf where masked) and offset."""
        nominal = j * b_rows
        begin = jnp.minimum(nominal, n - b_rows)  # the last block is shifted back
        b = jax.lax.dynamic_slice_in_dim(bank, begin, b_rows, axis=0)
        h = jax.lax.dynamic_slice_in_dim(half_norms, begin, b_rows, axis=0)
        # rows before `nominal` were covered by the previous block (last block only)
        h = jnp.where(row_in_block + begin >= nominal, h, inf)
        return b, h, begin

    def block_keys(q, b, h):
        # r = ||b||^2/2 - q.b : the squared distance minus ||q||^2, halved. +inf rows
        # stay +inf since q.b is finite.
        return h[None, :] - jnp.dot(q, b.T, precision=precision)

    def one_query_block(q):
        """(sq_distances, indices) of the k nearest valid bank rows, for one query block."""
        rows = q.shape[0]

        def merge(carry, j):
            b, h, begin = bank_block(j)
            return _merge_block(carry, block_keys(q, b, h), begin, k=k)

        init = _empty_best(rows, k, dtype)
        if n_bblocks == 1:
            best_r, best_i = merge(init, 0)
        else:
            (best_r, best_i), _ = jax.lax.scan(
                lambda c, j: (merge(c, j), None), init, jnp.arange(n_bblocks, dtype=jnp.int32)
            )
        if k == 1:
            best_r, best_i = best_r[:, None], best_i[:, None]
        found = best_r < inf
        qq = jnp.sum(q * q, axis=1, keepdims=True)
        sq = jnp.maximum(qq + 2.0 * best_r, 0.0)  # clamp: cancellation in the expansion
        return jnp.where(found, sq, inf), jnp.where(found, best_i, -1)

    if n_qblocks == 1:
        return NeighborResult(*one_query_block(queries))

    def query_block(j):
        begin = jnp.minimum(j * q_rows, m - q_rows)  # the last block is shifted back
        return one_query_block(jax.lax.dynamic_slice_in_dim(queries, begin, q_rows, axis=0))

    sq, idx = jax.lax.map(query_block, jnp.arange(n_qblocks, dtype=jnp.int32))
    overlap = n_qblocks * q_rows - m  # rows of the last block already in the previous one
    sq = jnp.concatenate([sq[:-1].reshape(-1, k), sq[-1, overlap:]])
    idx = jnp.concatenate([idx[:-1].reshape(-1, k), idx[-1, overlap:]])
    return NeighborResult(sq, idx)


# --------------------------------------------------------------------------------------
# internals
# --------------------------------------------------------------------------------------


def _empty_best(rows: int, k: int, dtype):
    """Initial carry of `_merge_block`: no neighbour yet (key +inf, index -1)."""
    shape = (rows,) if k == 1 else (rows, k)
    return jnp.full(shape, jnp.inf, dtype), jnp.full(shape, -1, jnp.int32)


def _merge_block(carry, keys, begin, *, k: int):
    """Fold one bank block's ``(rows, b_rows)`` keys into the running best ``k`` (ascending).

    ``begin`` is the bank index of the block's first row. For ``k == 1`` the carry is
    ``(rows,)`` (running min/argmin), else ``(rows, k)``. Ties go to the lowest bank index as
    long as blocks are folded in index order. Shared by `nearest_neighbors` and the sharded
    kNN so that both round and break ties identically.
    """
    b_rows = keys.shape[1]
    if k == 1:
        best_r, best_i = carry
        # lax.top_k(., 1) rather than min/argmin: on XLA:CPU the TopK custom call was
        # measured faster than the variadic (value, index) reduce behind argmin.
        # Same tie rule (lowest index first).
        neg, i = jax.lax.top_k(-keys, 1)
        rmin, i = -neg[:, 0], i[:, 0].astype(jnp.int32) + begin
        better = rmin < best_r  # strict: on equal keys the earlier block wins
        return jnp.where(better, rmin, best_r), jnp.where(better, i, best_i)
    top_r, top_i = carry
    if b_rows > k:
        neg, i = jax.lax.top_k(-keys, k)
        r, i = -neg, i.astype(jnp.int32) + begin
    else:
        r = keys
        i = jnp.broadcast_to(jnp.arange(b_rows, dtype=jnp.int32) + begin, keys.shape)
    # The carry comes first and holds lower indices, and lax.top_k puts the lower
    # position first on ties, so equal keys stay in index order.
    neg, sel = jax.lax.top_k(-jnp.concatenate([top_r, r], axis=1), k)
    all_i = jnp.concatenate([top_i, i], axis=1)
    return -neg, jnp.take_along_axis(all_i, sel, axis=1)


def _check_finite_rows(name: str, x, mask=None, rows_per_pass: int = 4096) -> None:
    """``ValueError`` if a concrete ``x`` has NaN/inf in a row where ``mask`` is True.

    Works in row blocks so that a large bank needs no full-size temporary (a full
    ``np.isfinite`` would allocate n*d bytes); no-op on tracers.
    """
    if not V.is_concrete(x):
        return
    arr = np.asarray(x)
    keep = None if mask is None else np.asarray(mask)
    n_nan = n_inf = 0
    for start in range(0, arr.shape[0], rows_per_pass):
        block = arr[start : start + rows_per_pass]
        if keep is not None:
            block = block[keep[start : start + rows_per_pass]]
        if not np.isfinite(block).all():
            n_nan += int(np.isnan(block).sum())
            n_inf += int(np.isinf(block).sum())
    if n_nan or n_inf:
        raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} inf)")


def _balanced(total: int, chunk: int) -> tuple[int, int]:
    """(number of blocks, rows per block) covering ``total`` rows with blocks <= chunk."""
    blocks = max(1, math.ceil(total / chunk))
    return blocks, math.ceil(total / blocks)


def _static_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int (static), got {value!r}")
    return int(value)


def _compute_dtype(*arrays):
    """Promoted floating dtype of the inputs, at least float32."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
