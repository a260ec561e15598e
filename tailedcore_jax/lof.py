"""Local outlier factor (scikit-learn equivalent) and the patch-position-wise LOF noise filter.

SoftPatch / TailedCore drop noisy training patches by LOF: at every patch position, the ``N``
images' features form one LOF problem (``k = 6``), and the patches whose score is not strictly
below the 85 % quantile of all scores are dropped. Per problem, in float32:

1. **Shortlist.** One GEMM gives ``|b|^2 - 2 a.b`` for every pair of mean-centred points (the
   norm rides along as an extra column). Columns are cut into blocks of ``_BLOCK``; the
   ``j``-th nearest non-self point lies in one of the ``j + 1`` blocks with the smallest minima,
   so ``k + _MARGIN`` candidates are picked inside those blocks by row-min passes over packed
   float keys (value in the high bits, column in the low bits): no ``lax.top_k``, which costs
   ~7 us per row on XLA:CPU whatever ``k``.
2. **Exact distances.** The ``k + 1`` best candidates get ``sum((a - b)**2)`` from the original
   features, so exact duplicates get 0 (sklearn's ``lrd = 1 / (mean reach + 1e-10)`` then
   gives 1e10, as in sklearn).
3. **Boundary refinement.** Only the k-th / (k+1)-th boundary decides the neighbour set; rows
   whose two boundary distances are within the float32 error bound are re-compared in
   float-float arithmetic (two-sum, Veltkamp split; ~1e-11 relative), so the set matches a
   float64 computation such as sklearn's.
4. **LOF** by sklearn's reach-distance, lrd and LOF formulas, summed in a fixed pairwise
   order so that every ``position_chunk`` (and every mesh) gives bit-identical scores.

Limit: the shortlist could drop a true neighbour only if more than ``_MARGIN`` other points
tie with it at ~1e-6 relative of the centred norms (a tight cluster of near-duplicates larger
than ``k + _MARGIN``). Exact duplicates are fine.

References:
    JAX port of ``LOFSampler._compute_patchwise_lof`` / ``LOFSampler.run`` in jungyg/TailedCore
    ``src/sampler.py`` (sklearn ``LocalOutlierFactor(n_neighbors=6, metric="l2")`` per
    position); Breunig et al., SIGMOD 2000; Jiang et al., SoftPatch, NeurIPS 2022.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from tailedcore_jax import _validation as V
from tailedcore_jax._numerics import pairwise_sum
from tailedcore_jax import sharding

__all__ = ["local_outlier_factor", "lof_filter_mask", "patchwise_lof"]

_HIGHEST = jax.lax.Precision.HIGHEST
# sklearn `_local_reachability_density`: 1e-10 avoids 1/0 when a point has >= k duplicates.
_LRD_EPS = 1e-10
# Working-set budget for one chunk of patch positions in `patchwise_lof` (bytes, estimated):
# accelerators, and CPU (where a cache-sized chunk is faster).
_CHUNK_BUDGET_BYTES = 512 * 2**20
_CPU_CHUNK_BYTES = 48 * 2**20
# Columns per block in the two-level shortlist (16 measured best at N = 800 and 2000).
_BLOCK = 16
# Extra shortlist candidates beyond k (plus one for the point itself).
_MARGIN = 2
# Keys are clamped into the normal float32 range so that their bit patterns order like values.
_KEY_MIN = np.float32(1e-30)
_KEY_MAX = np.float32(3.0e38)


def _num_candidates(n: int, k: int) -> int:
    """Shortlist size: ``k + _MARGIN`` non-self candidates (there are only ``n - 1``)."""
    return min(n - 1, k + _MARGIN)


def _smallest_indices(values: Float[Array, "r m"], c: int) -> Int[Array, "r c"]:
    """Column indices of the ``c`` smallest entries of each row, in ascending order.

    Values are packed with their column index into one float32 key (the low
    ``ceil(log2 m)`` mantissa bits are replaced by the index), so one vectorised row-min
    per pass returns value and index together and ties go to the lower index. The packing
    rounds values to ``2**-(23 - ceil(log2 m))`` relative, which is fine for a shortlist
    whose order is re-checked exactly. Negative values (rounding) count as 0; ``inf`` is
    clamped to the largest key, so all ``m >= c`` entries stay selectable.
    """
    m = values.shape[-1]
    if c > m:
        raise AssertionError(f"_smallest_indices: c={c} > m={m}")
    bits = max(1, math.ceil(math.log2(m)))
    low = (1 << bits) - 1
    v = jnp.clip(values.astype(jnp.float32), _KEY_MIN, _KEY_MAX)
    packed = (jax.lax.bitcast_convert_type(v, jnp.int32) & ~low) | jnp.arange(m, dtype=jnp.int32)[
        None, :
    ]
    keys = jax.lax.bitcast_convert_type(packed, jnp.float32)
    prev = jnp.zeros(values.shape[:-1], jnp.float32)
    picked = []
    for _ in range(c):
        # Float compares and min vectorise on XLA:CPU; the int32 equivalent is 3x slower.
        prev = jnp.min(jnp.where(keys > prev[..., None], keys, jnp.inf), axis=-1)
        picked.append(prev)
    return jax.lax.bitcast_convert_type(jnp.stack(picked, axis=-1), jnp.int32) & low


def _shortlist(
    xc: Float[Array, "n d"], sq_norm: Float[Array, " n"], mask: Bool[Array, " n"], c: int
) -> tuple[Int[Array, "n c"], Float[Array, "n c"]]:
    """The ``c`` nearest valid non-self columns of every row by the Gram expansion.

    Returns the column indices (-1 = none) and their expansion squared distances.
    """
    n, d = xc.shape
    dtype = xc.dtype
    num_blocks = -(-n // _BLOCK)
    width = num_blocks * _BLOCK
    # h[i, j] = |x_j|^2 - 2 x_i . x_j (+inf for padded or invalid j), straight from the GEMM.
    lhs = jnp.concatenate([xc, jnp.ones((n, 1), dtype)], axis=1)
    col_norm = jnp.where(mask, sq_norm, jnp.asarray(jnp.inf, dtype))
    rhs = jnp.concatenate([-2.0 * xc, col_norm[:, None]], axis=1)
    filler = jnp.zeros((width - n, d + 1), dtype).at[:, d].set(jnp.inf)
    rhs = jnp.concatenate([rhs, filler], axis=0)
    h = jnp.dot(lhs, rhs.T, precision=_HIGHEST)  # (n, width)
    blocks = h.reshape(n, num_blocks, _BLOCK)
    block_min = jnp.min(blocks, axis=-1) + sq_norm[:, None]
    # The point itself is still in the GEMM (its block minimum is ~0), so one more block than
    # candidates: the j-th nearest non-self point lies in one of the j + 1 smallest blocks.
    num_sel = min(c + 1, num_blocks)
    block_ids = _smallest_indices(block_min, num_sel)  # (n, num_sel)
    vals = jnp.take_along_axis(blocks, block_ids[:, :, None], axis=1)
    vals = vals.reshape(n, num_sel * _BLOCK) + sq_norm[:, None]
    cols = block_ids[:, :, None] * _BLOCK + jnp.arange(_BLOCK)[None, None, :]
    cols = cols.reshape(n, num_sel * _BLOCK)
    vals = jnp.where(cols == jnp.arange(n)[:, None], jnp.asarray(jnp.inf, dtype), vals)
    # Keys relative to the row's nearest candidate: the packing then rounds to a fraction of
    # the spread of the candidates' distances rather than of the distances themselves.
    base = jnp.min(vals, axis=-1)
    base = jnp.where(jnp.isfinite(base), base, jnp.zeros((), dtype))
    picked = _smallest_indices(vals - base[:, None], c)
    out = jnp.take_along_axis(cols, picked, axis=1)
    approx = jnp.take_along_axis(vals, picked, axis=1)  # expansion |x_i - x_j|^2, unrounded
    # Filler columns (index >= n, value +inf) are only picked when fewer than c real columns
    # exist in the chosen blocks; report them as -1 (no candidate).
    return jnp.where(out < n, out, -1), approx


def _two_sum(a, b):
    """Knuth's error-free sum: ``a + b == s + e`` exactly (no fast-math reassociation in XLA)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def _split(a):
    """Veltkamp's split: ``a == hi + lo`` exactly, each part with at most 12 significant bits.

    Float ops only (a bit-mask split is 5x slower inside XLA:CPU fusions). Exact unless the
    compiler contracts ``c - a`` into an FMA; XLA:CPU does not.
    """
    c = a * np.float32(4097.0)
    hi = c - (c - a)
    return hi, a - hi


def _float_float_add(x, y):
    """Sum of two unevaluated pairs ``hi + lo`` (Dekker/Knuth, error about eps**2)."""
    (x_hi, x_lo), (y_hi, y_lo) = x, y
    s, e = _two_sum(x_hi, y_hi)
    e = e + (x_lo + y_lo)
    hi = s + e
    return hi, e - (hi - s)


def _sq_dist_float_float(a: Float[Array, "... d"], b: Float[Array, "... d"]):
    """``sum((a - b)**2, -1)`` as an unevaluated float32 pair ``hi + lo`` (about 1e-11 relative).

    The difference is exact as a two-sum pair, the square of its leading part is split into
    exact 12-bit products, and the sum over ``d`` is a float-float reduction.
    """
    diff_hi, diff_lo = _two_sum(a, -b)
    h1, h2 = _split(diff_hi)
    hi = h1 * h1  # exact
    lo = (2.0 * h1) * h2 + h2 * h2 + (2.0 * diff_hi) * diff_lo
    zero = np.float32(0.0)
    return jax.lax.reduce((hi, lo), (zero, zero), _float_float_add, (hi.ndim - 1,))


def _take_smallest(values: Float[Array, "n c"], payload: Int[Array, "n c"], m: int):
    """The ``m`` smallest ``values`` per row in ascending order (ties: lower column first), with
    the matching ``payload`` entries. Pairwise ranks plus one-hot sums: no sort or top_k."""
    c = values.shape[1]
    pos = jnp.arange(c)
    v_a, v_b = values[:, :, None], values[:, None, :]
    before = (v_b < v_a) | ((v_b == v_a) & (pos[None, None, :] < pos[None, :, None]))
    rank = jnp.sum(before, axis=-1)  # (n, c), a permutation of 0..c-1 per row
    onehot = rank[:, :, None] == jnp.arange(m)[None, None, :]  # (n, c, m)
    out_v = jnp.sum(jnp.where(onehot, values[:, :, None], 0.0), axis=1)
    out_p = jnp.sum(jnp.where(onehot, payload[:, :, None], 0), axis=1)
    return out_v, out_p


def _neighbors(x: Float[Array, "n d"], mask: Bool[Array, " n"], *, k: int):
    """Stages 1 and 2 for one problem: the k + 1 nearest valid non-self candidates of each row.

    Returns ``(xf, sq, idx)``: the masked features, ``(n, k + 1)`` squared distances (exact
    formula in the working dtype, ascending, ``inf`` where fewer valid points exist) and the
    matching row indices.
    """
    n = x.shape[0]
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    # Padded rows are zeroed so that NaN/inf padding cannot leak into valid rows.
    xf = jnp.where(mask[:, None], x.astype(dtype), jnp.zeros((), dtype))
    count = jnp.sum(mask)
    mean = jnp.sum(xf, axis=0) / jnp.maximum(count, 1).astype(dtype)
    xc = jnp.where(mask[:, None], xf - mean[None, :], jnp.zeros((), dtype))
    sq_norm = jnp.sum(xc * xc, axis=-1)

    c = _num_candidates(n, k)
    cand, approx = _shortlist(xc, sq_norm, mask, c)  # (n, c), -1 = no candidate
    keep = k + 1
    if c < keep:  # n == k + 1: there is no (k+1)-th neighbour; pad with "none".
        cand = jnp.pad(cand, ((0, 0), (0, keep - c)), constant_values=-1)
        approx = jnp.pad(approx, ((0, 0), (0, keep - c)), constant_values=jnp.inf)
    safe = jnp.maximum(cand, 0)
    ok = (cand >= 0) & mask[safe]
    # The k + 1 nearest candidates by the (unrounded) expansion ...
    _, idx = _take_smallest(jnp.where(ok, approx, jnp.inf), jnp.where(ok, safe, -1), keep)
    valid = idx >= 0
    idx = jnp.maximum(idx, 0)
    # ... get exact-formula distances and are re-ranked by them.
    sq = pairwise_sum((xf[:, None, :] - xf[idx]) ** 2)
    sq, idx = _take_smallest(jnp.where(valid, sq, jnp.inf), idx, keep)
    return xf, sq, idx


def _refine_boundaries(xf, sq, idx, *, k: int, budget: int | None = None):
    """Settle the k-th / (k+1)-th neighbour in float-float where float32 cannot tell them apart.

    Batched over ``B`` problems: ``xf`` ``(B, n, d)``, ``sq`` and ``idx`` ``(B, n, k + 1)``.
    Only that boundary decides the neighbour set (order inside the first k does not matter).
    A float32 sum of ``d`` squares is within ``(d + 2) * 2**-24`` relative of the truth, so only
    rows whose two boundary distances are closer than twice that are re-compared. Those rows
    (0.2% on Gaussian benchmark data) are gathered into a buffer of ``R = B n / 16`` rows
    (at least 64); if more are ambiguous (data with many exact duplicates), every row is
    re-compared instead (a ``lax.cond``; under an outer ``vmap`` both branches run, with the
    same result).

    ``budget`` overrides ``R`` (tests use it to force either branch).

    Returns ``(sq, idx)`` of the first ``k`` neighbours.
    """
    if xf.dtype != jnp.float32:  # float64 (x64 enabled) already resolves such ties.
        return sq[..., :k], idx[..., :k]
    num_problems, n, d = xf.shape
    total = num_problems * n
    window = np.float32(2 * (d + 2) * 2.0**-24)
    ambiguous = jnp.isfinite(sq[..., k]) & (sq[..., k] - sq[..., k - 1] <= window * sq[..., k])
    ambiguous = ambiguous.reshape(total)
    xf_flat = xf.reshape(total, d)
    offsets = (jnp.arange(num_problems) * n)[:, None, None]
    pair_flat = (idx[..., k - 1 : k + 1] + offsets).reshape(total, 2)

    def compare(rows):
        hi, lo = _sq_dist_float_float(xf_flat[rows][:, None, :], xf_flat[pair_flat[rows]])
        swap = (hi[:, 1] < hi[:, 0]) | ((hi[:, 1] == hi[:, 0]) & (lo[:, 1] < lo[:, 0]))
        return swap & ambiguous[rows], hi[:, 1]

    def every_row(_):
        return compare(jnp.arange(total))

    if budget is None:
        budget = max(64, total // 16)
    if budget >= total:
        swap, swapped_sq = every_row(None)
    else:

        def compacted(_):
            rows = jnp.nonzero(ambiguous, size=budget, fill_value=total)[0]
            swap_r, sq_r = compare(jnp.minimum(rows, total - 1))
            put = jnp.where(rows < total, rows, total)  # fill slots are dropped
            swap = jnp.zeros((total,), bool).at[put].set(swap_r, mode="drop")
            return swap, jnp.zeros((total,), xf.dtype).at[put].set(sq_r, mode="drop")

        fits = jnp.sum(ambiguous) <= budget
        swap, swapped_sq = jax.lax.cond(fits, compacted, every_row, None)
    swap = swap.reshape(num_problems, n)
    swapped_sq = swapped_sq.reshape(num_problems, n)
    kth_idx = jnp.where(swap, idx[..., k], idx[..., k - 1])
    kth_sq = jnp.where(swap, swapped_sq, sq[..., k - 1])
    if k >= 2:  # float rounding must not put the k-th below the (k-1)-th
        kth_sq = jnp.maximum(kth_sq, sq[..., k - 2])
    out_sq = jnp.concatenate([sq[..., : k - 1], kth_sq[..., None]], axis=-1)
    out_idx = jnp.concatenate([idx[..., : k - 1], kth_idx[..., None]], axis=-1)
    return out_sq, out_idx


def _lof_from_neighbors(sq, idx, mask, *, k: int):
    """Stage 3 for one problem: sklearn's reach distance, lrd and LOF from ``(n, k)`` neighbours."""
    dtype = sq.dtype
    dist = jnp.sqrt(sq)
    # sklearn: reach_dist(a, b) = max(d(a, b), k_distance(b)); lrd = 1 / (mean + 1e-10).
    k_distance = dist[:, k - 1]
    reach = jnp.maximum(dist, k_distance[idx])
    # Fixed-order means (`pairwise_sum`): results do not depend on the batch shape.
    lrd = 1.0 / (pairwise_sum(reach) / k + jnp.asarray(_LRD_EPS, dtype))
    lof = pairwise_sum(lrd[idx] / lrd[:, None]) / k
    # Under jit with fewer than k + 1 valid rows some "neighbours" are inf: report NaN.
    enough = jnp.sum(mask) >= k + 1
    lof = jnp.where(enough, lof, jnp.nan)
    return jnp.where(mask, lof, jnp.zeros((), dtype))


def _lof_batch(
    x: Float[Array, "B n d"], mask: Bool[Array, "B n"], *, k: int
) -> Float[Array, "B n"]:
    """LOF of ``B`` independent problems (no validation; see the public API)."""
    xf, sq, idx = jax.vmap(functools.partial(_neighbors, k=k))(x, mask)
    sq, idx = _refine_boundaries(xf, sq, idx, k=k)
    return jax.vmap(functools.partial(_lof_from_neighbors, k=k))(sq, idx, mask)


def _check_problem(name, x, k, mask, *, rank):
    """Checks shared by both public LOF functions; returns (k, mask or all-True)."""
    V.check_rank(name, x, rank)
    V.check_floating(name, x)
    k = V.static_int("k", k, minimum=1)
    n = x.shape[0]
    what = "points" if rank == 2 else "images"
    if n < k + 1:
        raise ValueError(f"LOF needs at least k + 1 = {k + 1} {what}, got {n}")
    V.check_mask("mask", mask, n)
    count = V.concrete_count(mask, n)
    if count is not None and count < k + 1:
        raise ValueError(f"LOF needs at least k + 1 = {k + 1} valid {what}, got {count}")
    mask = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask)
    V.check_finite_rows(f"{name} (valid {'rows' if rank == 2 else 'images'})", x, mask)
    return k, mask


def local_outlier_factor(
    x: Float[Array, "n d"],
    *,
    k: int = 6,
    mask: Bool[Array, " n"] | None = None,
) -> Float[Array, " n"]:
    """Local outlier factor of every row: ``-LocalOutlierFactor(n_neighbors=k).fit(x)
    .negative_outlier_factor_`` of scikit-learn (Euclidean; neighbours exclude the point).

    ``k`` is never silently clipped (sklearn uses ``n - 1`` neighbours when ``k >= n``): ``k + 1``
    valid points are required.

    Args:
        x: ``(n, d)`` points (float32 with float-float tie-breaking; float64 under x64).
        k: neighbours (static).
        mask: ``(n,)`` bool, True = valid. Padded rows (any values, even NaN) are neither
            scored nor neighbours: the valid rows get the scores of the valid rows alone.

    Returns:
        ``(n,)`` LOF (about 1 for inliers). Padded rows 0; under ``jit`` with fewer than
        ``k + 1`` valid rows, NaN.

    Raises:
        ValueError: rank not 2, ``k < 1``, ``n < k + 1``; on concrete inputs, fewer than
            ``k + 1`` valid rows or NaN/inf in them.
        TypeError: non-floating ``x``, non-int ``k``, non-bool ``mask``.

    Examples:
        >>> import jax.numpy as jnp
        >>> s = local_outlier_factor(jnp.array([[0.0], [1.0], [2.0], [3.0], [10.0]]), k=2)
        >>> bool(s[4] > 2.0)
        True

    References:
        JAX port of ``LocalOutlierFactor.fit`` (scikit-learn ``sklearn/neighbors/_lof.py``).
    """
    k, mask = _check_problem("x", x, k, mask, rank=2)
    return _lof_one(jnp.asarray(x), mask, k=k)


@functools.partial(jax.jit, static_argnames=("k",))
def _lof_one(x, mask, *, k):
    return _lof_batch(x[None], mask[None], k=k)[0]


def _auto_position_chunk(num_images: int, num_positions: int, dim: int, k: int) -> int:
    # Per position: the (N, N) GEMM output plus the gathered (N, k + 1, d) candidate rows and
    # their differences. On CPU a cache-sized chunk is fastest (4 positions at N = 800); on
    # accelerators a larger batch keeps the device busy.
    width = -(-num_images // _BLOCK) * _BLOCK
    per_position = 4 * (num_images * width + 3 * num_images * (k + 1) * dim)
    budget = _CPU_CHUNK_BYTES if jax.default_backend() == "cpu" else _CHUNK_BUDGET_BYTES
    return int(max(1, min(num_positions, budget // max(per_position, 1))))


def patchwise_lof(
    features: Float[Array, "N P d"],
    *,
    k: int = 6,
    mask: Bool[Array, " N"] | None = None,
    position_chunk: int | None = None,
    mesh: Mesh | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> Float[Array, "N P"]:
    """LOF computed independently at each patch position across the images.

    ``out[:, p] = local_outlier_factor(features[:, p], k=k, mask=mask)``. Positions run in
    chunks of ``position_chunk`` (vmapped in a ``fori_loop``): memory about
    ``position_chunk * 4 * (N^2 + 3 N (k + 1) d)`` bytes. The official input is the flattened
    ``(N * P, d)`` array: use ``features.reshape(N, P, d)`` and ``scores.reshape(-1)``.

    Args:
        features: ``(N, P, d)`` patch features (SoftPatch / TailedCore: a 128-d projection).
        k: neighbours (static).
        mask: ``(N,)`` bool image mask, True = valid.
        position_chunk: positions per vmapped block (static); None: the largest chunk whose
            working set fits 48 MiB on CPU or 512 MiB on accelerators.
        mesh: optional :class:`jax.sharding.Mesh`: positions split over its devices, each
            running this kernel on its share (no communication); bit-identical scores.
        axis_name: mesh axis (or axes) to split over; None = all.

    Returns:
        ``(N, P)`` LOF scores; rows of padded images 0.

    Raises:
        ValueError / TypeError: as :func:`local_outlier_factor`, plus rank != 3 and
            ``position_chunk < 1``.
    """
    axes = None if mesh is None else sharding.mesh_axes(mesh, axis_name)
    k, mask = _check_problem("features", features, k, mask, rank=3)
    num_images, num_positions, dim = features.shape
    if position_chunk is not None:
        position_chunk = V.static_int("position_chunk", position_chunk, minimum=1)
    out_dtype = jnp.promote_types(features.dtype, jnp.float32)
    if num_positions == 0:
        return jnp.zeros((num_images, 0), out_dtype)
    features = jnp.asarray(features)
    if mesh is None:
        chunk = position_chunk or _auto_position_chunk(num_images, num_positions, dim, k)
        return _patchwise(features, mask, k=k, chunk=min(chunk, num_positions))
    shards = sharding.mesh_size(mesh, axes)
    per = -(-num_positions // shards)
    chunk = min(position_chunk or _auto_position_chunk(num_images, per, dim, k), per)
    if per * shards != num_positions:  # zero positions, dropped below
        features = _pad_positions(features, pad=per * shards - num_positions)
    spec = sharding.split_spec(axes)
    features = sharding.place(features, mesh, P(None, spec, None))
    mask = sharding.place(mask, mesh, P())
    out = _patchwise_mesh(features, mask, mesh=mesh, axes=axes, k=k, chunk=chunk)
    return out[:, :num_positions]


@functools.partial(jax.jit, static_argnames=("pad",))
def _pad_positions(features, *, pad):
    return jnp.pad(features, ((0, 0), (0, pad), (0, 0)))


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _patchwise(features, mask, *, k, chunk):
    """The position-chunk kernel: ``(N, P, d) -> (N, P)``."""
    num_images, num_positions, _ = features.shape

    def per_chunk(block):  # (N, chunk, d) -> (N, chunk)
        problems = jnp.swapaxes(block, 0, 1)
        masks = jnp.broadcast_to(mask[None, :], (problems.shape[0], num_images))
        return jnp.swapaxes(_lof_batch(problems, masks, k=k), 0, 1)

    def body(i, out):
        # The last chunk is shifted left to stay in bounds; overlapping positions are
        # recomputed with identical values.
        start = jnp.minimum(i * chunk, num_positions - chunk)
        block = jax.lax.dynamic_slice_in_dim(features, start, chunk, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(out, per_chunk(block), start, axis=1)

    out = jnp.zeros((num_images, num_positions), jnp.promote_types(features.dtype, jnp.float32))
    return jax.lax.fori_loop(0, math.ceil(num_positions / chunk), body, out)


@functools.partial(jax.jit, static_argnames=("mesh", "axes", "k", "chunk"))
def _patchwise_mesh(features, mask, *, mesh, axes, k, chunk):
    spec = sharding.split_spec(axes)
    return sharding.shard_map(functools.partial(_patchwise, k=k, chunk=chunk), mesh=mesh,
                              in_specs=(P(None, spec, None), P()), out_specs=P(None, spec),
                              check_vma=False)(features, mask)


def lof_filter_mask(
    scores: Float[Array, "..."],
    *,
    drop: float = 0.15,
    mask: Bool[Array, "..."] | None = None,
) -> Bool[Array, "..."]:
    """Which patches survive the LOF noise cut: ``score < quantile(valid scores, 1 - drop)``.

    The quantile is torch's/numpy's ``"linear"`` method with the position
    ``(1 - drop) * (count - 1)`` in float32 as ``torch.quantile`` computes it, and the
    comparison is strict, as in ``LOFSampler.run`` of jungyg/TailedCore.

    Args:
        scores: LOF scores of any shape (e.g. ``(N, P)`` from :func:`patchwise_lof`).
        drop: fraction of the patches dropped as noise, in ``[0, 1)`` (static; official 0.15).
        mask: bool array shaped like ``scores`` (True = valid); masked entries are left out of
            the quantile and never kept.

    Returns:
        Bool array shaped like ``scores``.

    Raises:
        ValueError: ``drop`` outside ``[0, 1)``, a mask of another shape, empty scores; on
            concrete inputs, no valid entry or NaN among them (under jit: nothing kept).
        TypeError: non-floating scores, non-bool mask.
    """
    V.check_floating("scores", scores)
    keep = 1.0 - V.unit_fraction("drop", drop, closed_low=True, closed_high=False)
    shape = jnp.shape(scores)
    if mask is not None:
        if jnp.shape(mask) != shape:
            raise ValueError(f"mask must have the shape of scores {shape}, got {jnp.shape(mask)}")
        if jnp.result_type(mask) != jnp.bool_:
            raise TypeError(f"mask must be boolean, got dtype {jnp.result_type(mask)}")
    if math.prod(shape) == 0:
        raise ValueError("lof_filter_mask got an empty scores array")
    mask = jnp.ones(shape, bool) if mask is None else jnp.asarray(mask)
    if V.concrete_count(mask.reshape(-1), mask.size) == 0:
        raise ValueError("lof_filter_mask: mask has no valid entry")
    V.check_finite_rows("scores (valid entries)", scores, mask)
    return _filter(jnp.asarray(scores), mask, keep=keep)


@functools.partial(jax.jit, static_argnames=("keep",))
def _filter(scores, mask, *, keep):
    dtype = jnp.promote_types(scores.dtype, jnp.float32)
    flat = jnp.where(mask, scores.astype(dtype), jnp.inf).reshape(-1)
    ordered = jnp.sort(flat)  # valid values first, masked (+inf) last
    count = jnp.sum(mask)
    # torch: rank = q * (n - 1) in the input dtype; below = floor, above = ceil.
    rank = jnp.asarray(keep, dtype) * (count - 1).astype(dtype)
    below = jnp.floor(rank)
    weight = rank - below
    i_below = jnp.clip(below.astype(jnp.int32), 0, flat.shape[0] - 1)
    i_above = jnp.clip(jnp.ceil(rank).astype(jnp.int32), 0, flat.shape[0] - 1)
    a, b = ordered[i_below], ordered[i_above]
    diff = b - a
    # torch.lerp / numpy _lerp: exact at both ends.
    thr = jnp.where(weight >= 0.5, b - diff * (1.0 - weight), a + diff * weight)
    thr = jnp.where(count > 0, thr, -jnp.inf)
    return mask & (scores.astype(dtype) < thr)
