"""Local outlier factor (scikit-learn equivalent) and the patch-position-wise LOF filter.

JAX port of the SoftPatch / TailedCore noise filter: `LOFSampler._compute_patchwise_lof` and
`LOFSampler.run` in jungyg/TailedCore (`src/sampler.py`), which call
`sklearn.neighbors.LocalOutlierFactor(n_neighbors=6, metric="l2")` once per patch position and
then keep the patches below the 85% quantile of all scores (tailedcore-spec section 4).

Numerics (float32, ``precision=HIGHEST``):

* A shortlist of ``min(n - 1, 2 k + 4)`` candidate neighbours per point comes from the
  Gram-matrix expansion ``|a|^2 + |b|^2 - 2 a.b`` on mean-centred data (centring removes most
  of the cancellation of the expansion).
* The distances to the candidates are then recomputed **exactly** as
  ``sqrt(sum((a - b)^2))`` from the original features and re-ranked; the first ``k`` are the
  neighbours. Exact duplicates therefore get distance exactly 0 (the expansion alone would
  give ~1e-4 |a|), which matters because sklearn's ``lrd = 1 / (mean reach + 1e-10)``
  turns a zero reach distance into 1e10.
* Ties at the k-th distance only occur between exact duplicates on continuous data; which of
  the tied points is chosen does not change any score (their distances and lrd are equal).

Axis glossary: ``n`` points, ``d`` feature dim, ``N`` images, ``P`` patch positions.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from tailedcore_jax._validation import (
    check_finite,
    check_floating,
    check_mask,
    check_rank,
    concrete_count,
    is_concrete,
)

__all__ = ["local_outlier_factor", "lof_filter_mask", "patchwise_lof"]

_HIGHEST = jax.lax.Precision.HIGHEST
# sklearn `_local_reachability_density`: 1e-10 avoids 1/0 when a point has >= k duplicates.
_LRD_EPS = 1e-10
# Memory budget for one chunk of patch positions in `patchwise_lof` (bytes, estimated).
_CHUNK_BUDGET_BYTES = 512 * 2**20


def _num_candidates(n: int, k: int) -> int:
    return min(n - 1, 2 * k + 4)


def _lof_one(x: Float[Array, "n d"], mask: Bool[Array, " n"], *, k: int) -> Float[Array, " n"]:
    """LOF of every row of ``x`` among the valid rows (no validation; see the public API)."""
    n = x.shape[0]
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    # Padded rows are zeroed so that NaN/inf padding cannot leak into valid rows.
    xf = jnp.where(mask[:, None], x.astype(dtype), jnp.zeros((), dtype))
    count = jnp.sum(mask)
    mean = jnp.sum(xf, axis=0) / jnp.maximum(count, 1).astype(dtype)
    xc = jnp.where(mask[:, None], xf - mean[None, :], jnp.zeros((), dtype))

    # Shortlist by the Gram expansion (cheap GEMM); HIGHEST keeps full float32 products.
    sq_norm = jnp.sum(xc * xc, axis=-1)
    gram = jnp.dot(xc, xc.T, precision=_HIGHEST)
    sq = sq_norm[:, None] + sq_norm[None, :] - 2.0 * gram
    # Self and padded rows are never neighbours.
    not_neighbour = (~mask)[None, :] | jnp.eye(n, dtype=bool)
    sq = jnp.where(not_neighbour, jnp.inf, jnp.maximum(sq, 0.0))
    num_cand = _num_candidates(n, k)
    _, cand = jax.lax.top_k(-sq, num_cand)  # (n, c)

    # Exact Euclidean distances to the candidates, then the k smallest (stable on ties).
    diff = xf[:, None, :] - xf[cand]  # (n, c, d)
    dist_c = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
    cand_ok = mask[cand] & (cand != jnp.arange(n)[:, None])
    dist_c = jnp.where(cand_ok, dist_c, jnp.inf)
    neg_dist, pos = jax.lax.top_k(-dist_c, k)
    dist = -neg_dist  # (n, k), ascending
    idx = jnp.take_along_axis(cand, pos, axis=1)  # (n, k)

    # sklearn: reach_dist(a, b) = max(d(a, b), k_distance(b)); lrd = 1 / (mean + 1e-10).
    k_distance = dist[:, k - 1]
    reach = jnp.maximum(dist, k_distance[idx])
    lrd = 1.0 / (jnp.mean(reach, axis=1) + jnp.asarray(_LRD_EPS, dtype))
    lof = jnp.mean(lrd[idx] / lrd[:, None], axis=1)

    enough = count >= k + 1
    lof = jnp.where(enough, lof, jnp.nan)
    return jnp.where(mask, lof, jnp.zeros((), dtype))


def _validate_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a Python int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def local_outlier_factor(
    x: Float[Array, "n d"],
    *,
    k: int = 6,
    mask: Bool[Array, " n"] | None = None,
) -> Float[Array, " n"]:
    """Local outlier factor of every row, equal to scikit-learn's training-set LOF.

    Equals ``-sklearn.neighbors.LocalOutlierFactor(n_neighbors=k).fit(x).negative_outlier_factor_``
    (Euclidean metric; each point's neighbours exclude the point itself; ``lrd = 1 / (mean
    reach distance + 1e-10)`` as in sklearn, so groups of more than ``k`` exact duplicates get
    lrd 1e10 and their neighbours huge scores, exactly as sklearn does).

    JAX port of `LocalOutlierFactor.fit` in scikit-learn/scikit-learn
    (`sklearn/neighbors/_lof.py`).

    Unlike sklearn, ``k`` is never silently clipped: sklearn replaces ``n_neighbors`` by
    ``n_samples - 1`` (with a warning only when ``k > n``); here ``k + 1`` valid points are
    required (``ValueError`` otherwise), so the caller sees the problem.

    Args:
        x: points, shape ``(n, d)``, floating point; computed in float32 (float64 if given
            float64 with x64 enabled).
        k: number of neighbours (``n_neighbors``); static.
        mask: optional ``(n,)`` bool, True = valid. Padded rows are neither scored nor used as
            neighbours (their values, even NaN, are ignored); the valid rows get exactly the
            scores of running on the valid rows alone.

    Returns:
        ``(n,)`` LOF scores (about 1 for inliers, larger for outliers). Padded rows get 0. If,
        under jit, fewer than ``k + 1`` rows are valid, every valid row gets NaN.

    Raises:
        ValueError: ``x`` not rank 2; ``k < 1``; ``n < k + 1``; (concrete inputs only) fewer
            than ``k + 1`` valid rows, or NaN/inf in the valid rows.
        TypeError: non-floating ``x``, non-int ``k``, non-bool ``mask``.

    Under ``jax.jit``/``jax.vmap`` the value checks (valid count, NaN) cannot run; the
    shape and ``k`` checks always run at trace time.

    Examples:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
        >>> s = local_outlier_factor(x, k=2)
        >>> bool(s[4] > 2.0)
        True

    References:
        Breunig et al., "LOF: Identifying Density-Based Local Outliers", SIGMOD 2000.
    """
    check_rank("x", x, 2)
    check_floating("x", x)
    _validate_k(k)
    n = x.shape[0]
    if n < k + 1:
        raise ValueError(f"local_outlier_factor needs at least k + 1 = {k + 1} points, got {n}")
    check_mask("mask", mask, n)
    count = concrete_count(mask, n)
    if count is not None and count < k + 1:
        raise ValueError(
            f"local_outlier_factor needs at least k + 1 = {k + 1} valid points, got {count}"
        )
    if mask is None:
        mask = jnp.ones((n,), bool)
    if is_concrete(x) and is_concrete(mask):
        check_finite("x (valid rows)", np.asarray(x)[np.asarray(mask)])
    return _lof_jit(jnp.asarray(x), jnp.asarray(mask), k=k)


# Eager calls run one compiled program instead of dispatching op by op.
_lof_jit = jax.jit(_lof_one, static_argnames=("k",))


def _auto_position_chunk(num_images: int, num_positions: int, dim: int, k: int) -> int:
    # Per position: a few (N, N) float32 temporaries (Gram, distances, top_k workspace) plus the
    # (N, c, d) candidate differences if XLA materialises them.
    per_position = 4 * (
        3 * num_images * num_images + num_images * _num_candidates(num_images, k) * dim
    )
    return int(max(1, min(num_positions, _CHUNK_BUDGET_BYTES // max(per_position, 1))))


def patchwise_lof(
    features: Float[Array, "N P d"],
    *,
    k: int = 6,
    mask: Bool[Array, " N"] | None = None,
    position_chunk: int | None = None,
) -> Float[Array, "N P"]:
    """LOF computed independently at each patch position across the images.

    For each position ``p`` the ``N`` vectors ``features[:, p]`` are one LOF problem
    (`local_outlier_factor` with the same ``k`` and image mask). Positions are processed in
    chunks of ``position_chunk`` (vmapped inside a ``fori_loop``), so memory is bounded by
    about ``position_chunk * (3 N^2 + N c d) * 4`` bytes with ``c = min(N - 1, 2k + 4)``.

    JAX port of `LOFSampler._compute_patchwise_lof` in jungyg/TailedCore (`src/sampler.py`),
    which loops sklearn's `LocalOutlierFactor(n_neighbors=k)` over the 784 positions. The
    official input is the flattened ``(N * P, d)`` array; use ``features.reshape(N, P, d)``
    and ``scores.reshape(-1)`` to convert.

    Args:
        features: ``(N, P, d)`` patch features (SoftPatch/TailedCore project them to d = 128).
        k: LOF neighbours; static.
        mask: optional ``(N,)`` bool image mask (True = valid image).
        position_chunk: positions per vmapped block; static. ``None`` picks the largest chunk
            whose estimated working set is under 512 MiB (e.g. 37 at N = 800, d = 128; 8 at
            N = 2000), which keeps the peak well below 1 GB.

    Returns:
        ``(N, P)`` LOF scores; rows of padded images are 0.

    Raises:
        ValueError / TypeError: as `local_outlier_factor`, plus rank != 3 and
            ``position_chunk < 1``.

    References:
        Jiang et al., "SoftPatch: Unsupervised Anomaly Detection with Noisy Data", NeurIPS 2022;
        Jung et al., "TailedCore", CVPR 2025.
    """
    check_rank("features", features, 3)
    check_floating("features", features)
    _validate_k(k)
    num_images, num_positions, dim = features.shape
    if num_images < k + 1:
        raise ValueError(f"patchwise_lof needs at least k + 1 = {k + 1} images, got {num_images}")
    check_mask("mask", mask, num_images)
    count = concrete_count(mask, num_images)
    if count is not None and count < k + 1:
        raise ValueError(f"patchwise_lof needs at least k + 1 = {k + 1} valid images, got {count}")
    if position_chunk is None:
        position_chunk = _auto_position_chunk(num_images, num_positions, dim, k)
    if int(position_chunk) < 1:
        raise ValueError(f"position_chunk must be >= 1, got {position_chunk}")
    chunk = min(int(position_chunk), num_positions)
    if mask is None:
        mask = jnp.ones((num_images,), bool)
    if is_concrete(features) and is_concrete(mask):
        # Checked on device: copying a (2000, 784, 128) array to the host would cost more than
        # the check.
        finite = jnp.isfinite(jnp.where(jnp.asarray(mask)[:, None, None], features, 0.0))
        if not bool(jnp.all(finite)):
            raise ValueError("features (valid images) contains non-finite values (NaN or inf)")
    if num_positions == 0:
        return jnp.zeros((num_images, 0), jnp.promote_types(features.dtype, jnp.float32))
    return _patchwise(jnp.asarray(features), jnp.asarray(mask), k=k, chunk=chunk)


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _patchwise(features, mask, *, k, chunk):
    num_images, num_positions, _ = features.shape
    one = functools.partial(_lof_one, k=k)
    per_chunk = jax.vmap(one, in_axes=(1, None), out_axes=1)  # (N, chunk, d) -> (N, chunk)
    num_chunks = math.ceil(num_positions / chunk)
    out_dtype = jnp.promote_types(features.dtype, jnp.float32)

    def body(i, out):
        # The last chunk is shifted left to stay in bounds; overlapping positions are simply
        # recomputed with identical values.
        start = jnp.minimum(i * chunk, num_positions - chunk)
        block = jax.lax.dynamic_slice_in_dim(features, start, chunk, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(out, per_chunk(block, mask), start, axis=1)

    out = jnp.zeros((num_images, num_positions), out_dtype)
    return jax.lax.fori_loop(0, num_chunks, body, out)


def lof_filter_mask(
    scores: Float[Array, "..."],
    *,
    keep: float = 0.85,
    mask: Bool[Array, "..."] | None = None,
) -> Bool[Array, "..."]:
    """Which patches survive the SoftPatch/TailedCore LOF cut (score strictly below a quantile).

    ``thr = torch.quantile(valid scores, keep)`` with linear interpolation (numpy's default
    ``method="linear"``), and a patch is kept iff ``score < thr`` (strict), as in
    `LOFSampler.run` of jungyg/TailedCore (tailedcore-spec section 4, step 3). The quantile
    position ``keep * (count - 1)`` is computed in float32 like torch (numpy uses float64;
    the two agree exactly while ``count - 1 < 2**24 / 8``-ish, and for any count where
    ``keep * (count - 1)`` is exact), and the interpolation uses torch/numpy's ``lerp``.

    Args:
        scores: LOF scores of any shape (e.g. ``(N, P)`` from `patchwise_lof`).
        keep: quantile in ``(0, 1]``; static.
        mask: optional bool array of the same shape (True = valid); masked entries are left out
            of the quantile and are never kept.

    Returns:
        Bool array shaped like ``scores``.

    Raises:
        ValueError: ``keep`` outside ``(0, 1]``; ``mask`` shape differs; (concrete only) no
            valid entry, NaN in valid scores. Under jit with no valid entry, nothing is kept.
        TypeError: non-floating scores or non-bool mask.
    """
    check_floating("scores", scores)
    keep = float(keep)
    if not (0.0 < keep <= 1.0):
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    shape = jnp.shape(scores)
    if mask is not None:
        if jnp.shape(mask) != shape:
            raise ValueError(f"mask must have the shape of scores {shape}, got {jnp.shape(mask)}")
        if jnp.result_type(mask) != jnp.bool_:
            raise TypeError(f"mask must be boolean, got dtype {jnp.result_type(mask)}")
    size = math.prod(shape)
    if size == 0:
        raise ValueError("lof_filter_mask got an empty scores array")
    if mask is None:
        mask = jnp.ones(shape, bool)
    if is_concrete(mask):
        if not np.any(np.asarray(mask)):
            raise ValueError("lof_filter_mask: mask has no valid entry")
        if is_concrete(scores):
            check_finite("scores (valid entries)", np.asarray(scores)[np.asarray(mask)])
    return _filter(jnp.asarray(scores), jnp.asarray(mask), keep=keep)


@functools.partial(jax.jit, static_argnames=("keep",))
def _filter(scores, mask, *, keep):
    dtype = jnp.promote_types(scores.dtype, jnp.float32)
    flat = jnp.where(mask, scores.astype(dtype), jnp.inf).reshape(-1)
    ordered = jnp.sort(flat)  # valid values first, masked (+inf) last
    count = jnp.sum(mask)
    # torch: ranks = q * (n - 1) in the input dtype; below = floor, above = ceil.
    rank = jnp.asarray(keep, dtype) * (count - 1).astype(dtype)
    below = jnp.floor(rank)
    weight = rank - below
    i_below = jnp.clip(below.astype(jnp.int32), 0, flat.shape[0] - 1)
    i_above = jnp.clip(jnp.ceil(rank).astype(jnp.int32), 0, flat.shape[0] - 1)
    a = ordered[i_below]
    b = ordered[i_above]
    diff = b - a
    # torch.lerp / numpy _lerp: exact at both ends.
    thr = jnp.where(weight >= 0.5, b - diff * (1.0 - weight), a + diff * weight)
    thr = jnp.where(count > 0, thr, -jnp.inf)
    return mask & (scores.astype(dtype) < thr)
