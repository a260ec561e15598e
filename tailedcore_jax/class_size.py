"""TailSampler statistics: self-similarity, trim-min thresholds, class-size votes, grouping.

JAX port of the image-level class-size estimator of TailedCore (CVPR 2025), variant
``ada_trim_min-mode`` (``adaptive_class_size.predict_adaptive_class_sizes`` with
``th_type='trim_min', vote_type='mode'`` and ``class_size.predict_few_shot_class_samples``
in jungyg/TailedCore, ``src/adaptive_class_size.py`` and ``src/class_size.py``). Written
from the specification (tailedcore-spec.md section 3), not copied.

Pipeline (N images, one embedding each)::

    S   = cosine_similarity_matrix(E)                  # (N, N) float32
    t   = trim_min_thresholds(S)                       # (N,)   per-image thresholds
    cs  = predict_class_sizes(S, t)                    # (N,)   mode vote, ties -> smallest
    G, gmask = group_class_sizes(cs)                   # (N,)   pseudo-class sizes, descending
    K*  = few_shot_threshold(G, mask=gmask)            # min(elbow(G), max_k_within_percentile(G))
    tail = cs <= K*

Everything is jit-compiled XLA (the grouping is a ``lax.while_loop``); variable-size
outputs (the groups) are fixed-capacity ``(N,)`` arrays plus a boolean mask. Every
function takes an optional ``mask`` (True = valid image) and then gives the result it
would give on the valid rows alone (padded entries are filled with documented values).

Exactness with respect to the official code (torch/NumPy float32):

* Quantisation ``trunc(n * s) / n`` is done in float32 exactly as NumPy does it
  (``n`` = number of valid images), so thresholds lie on the same float32 ``1/n`` grid.
* The half-angle boundary ``cos(arccos(m) / 2)`` is the one place where float32
  transcendental rounding decides a comparison on the grid. The official code evaluates
  it with NumPy float32; here the grid point where "q > h" starts is computed with exact
  integer arithmetic (``2 k^2 > n (n + k0)``) and corrected, point by point, wherever NumPy's
  float32 evaluation (run at trace time on this machine, for every possible quantised
  minimum ``k0``) lands on the other side. The result is bit-identical to NumPy's decision.
  The correction table is built at trace time (cached): for one ``n`` without a mask,
  for every count ``2..N`` with a mask (about 3 s for ``N = 5000`` on a busy 2-core CPU).
  The grid value ``k / n`` is a NumPy-made table for a static ``n`` and an IEEE float32
  division for a masked (traced) count (XLA's CPU division is IEEE; not checked on GPU).
* Pseudo-class means use float32 ``sum / count`` then round-half-to-even, like
  ``torch.mean`` + ``torch.round``: identical whenever the window sum is below 2**24
  (always for N <= 4096; beyond, only for a single class of more than ~4000 images could
  torch's float32 summation order matter).
* The elbow is the exact integer argmax of the point-to-chord distance. The official code
  computes the distances with float64 slope algebra and casts them to float32 before the
  argmax; for groups that are not collinear that is the same argmax whenever
  ``sum(groups) <= 5792`` (beyond, two distinct distances closer than float32 resolution
  could be merged by the cast), except for exact ties whose float64 noise straddles a
  float32 rounding boundary (probability ~1e-9). When every point lies on the chord (one
  group, two groups, all groups equal, or an arithmetic progression) all distances are
  mathematically 0 and the official
  choice is float64 rounding noise; here the first point (the largest group) is returned,
  which is what the official code returns for one group and for all-equal groups. With
  ``percentile < 1`` this never changes ``K*`` for two groups (the percentile rule then
  gives the smaller group).
* Where the official code crashes, this module defines the behaviour (see
  :func:`trim_min_thresholds` and :func:`group_class_sizes`).

References:
    Y. G. Jung, J. Park, J. Yoon, K.-C. Peng, W. Kim, A. B. J. Teoh, O. Camps,
    "TailedCore: Few-Shot Sampling for Unsupervised Long-Tail Noisy Anomaly Detection",
    CVPR 2025 (arXiv:2504.02775). Official code: jungyg/TailedCore.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from tailedcore_jax import _validation as V

__all__ = [
    "MAX_IMAGES",
    "cosine_similarity_matrix",
    "elbow",
    "few_shot_threshold",
    "group_class_sizes",
    "max_k_within_percentile",
    "predict_class_sizes",
    "trim_min_thresholds",
]

HIGHEST = jax.lax.Precision.HIGHEST

#: ``F.normalize`` epsilon: rows are divided by ``max(||x||, 1e-12)``.
NORMALIZE_EPS = 1e-12

#: Largest supported number of images (rows). The grid arithmetic (``2 k^2``,
#: ``n (n + k0)``) is done in int32; an N x N float32 matrix at this size is 3.6 GB.
MAX_IMAGES = 30000

#: Similarities must lie in ``[-1 - tol, 1 + tol]`` (checked on concrete inputs).
_SIM_TOL = 1e-3

_BIG = np.int32(2**30)


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _check_unit_fraction(name: str, value) -> float:
    """``value`` must be a Python real in (0, 1] (a static hyper-parameter)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a Python float in (0, 1] (a static argument), got {type(value)}"
        )
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def _check_num_images(name: str, n: int) -> None:
    if n < 2:
        raise ValueError(f"{name} needs at least 2 images, got {n}")
    if n > MAX_IMAGES:
        raise ValueError(f"{name} supports at most {MAX_IMAGES} images, got {n}")


def _check_valid_count(name: str, mask, n: int) -> None:
    count = V.concrete_count(mask, n)
    if count is not None and count < 2:
        raise ValueError(f"{name} needs at least 2 valid images, got {count}")


def _check_similarity(similarity, mask) -> None:
    V.check_rank("similarity", similarity, 2)
    V.check_floating("similarity", similarity)
    n, n2 = jnp.shape(similarity)
    if n != n2:
        raise ValueError(f"similarity must be square, got shape {jnp.shape(similarity)}")
    _check_num_images("similarity", n)
    V.check_mask("mask", mask, n)
    _check_valid_count("similarity", mask, n)
    V.check_finite("similarity", similarity)
    if V.is_concrete(similarity) and (mask is None or V.is_concrete(mask)):
        s = np.asarray(similarity)
        if mask is not None:
            m = np.asarray(mask)
            s = s[m][:, m]
        if s.size and (s.min() < -1 - _SIM_TOL or s.max() > 1 + _SIM_TOL):
            raise ValueError(
                "similarity must be a cosine similarity in [-1, 1], got values in "
                f"[{s.min()}, {s.max()}]"
            )


def _valid_and_count(mask, n: int):
    """(valid (n,) bool, count int32 scalar)."""
    if mask is None:
        return jnp.ones((n,), bool), jnp.int32(n)
    return mask, jnp.sum(mask, dtype=jnp.int32)


# --------------------------------------------------------------------------------------
# Cosine similarity
# --------------------------------------------------------------------------------------


def cosine_similarity_matrix(embeddings: Float[Array, "n d"]) -> Float[Array, "n n"]:
    """Cosine self-similarity ``S = E_hat E_hat^T`` of L2-normalised rows, float32.

    JAX port of ``class_size.compute_self_sim`` in jungyg/TailedCore (``F.normalize`` then
    a float32 matmul). Rows are divided by ``max(||x||_2, 1e-12)`` (``F.normalize``), so an
    all-zero row becomes a zero vector whose similarity to every image, itself included,
    is 0. The matmul runs in float32 with ``precision=HIGHEST``; it agrees with torch's or
    NumPy's float32 matmul to rounding (a few ulps), not bit for bit. From 1024 rows on,
    only the upper blocks of a 4 x 4 block split are multiplied and mirrored, so the
    result is exactly symmetric there.

    Args:
        embeddings: ``(N, D)`` floating-point image embeddings (any float dtype; computed in
            float32).

    Returns:
        ``(N, N)`` float32 similarity matrix (diagonal ~1 for non-zero rows).

    Raises:
        ValueError: if ``embeddings`` is not rank 2, or (concrete inputs) holds NaN/inf.
        TypeError: if ``embeddings`` is not floating point.
    """
    V.check_rank("embeddings", embeddings, 2)
    V.check_floating("embeddings", embeddings)
    V.check_finite("embeddings", embeddings)
    return _cosine_similarity(jnp.asarray(embeddings, jnp.float32))


#: Above this many rows the Gram matrix is built from the upper blocks of a 4 x 4 block
#: split and mirrored (10 of 16 block products: ~35 % less matmul time on CPU).
_SYMMETRIC_BLOCKS_MIN_ROWS = 1024
_NUM_BLOCKS = 4


@jax.jit
def _cosine_similarity(x):
    norms = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    x = x / jnp.maximum(norms, jnp.float32(NORMALIZE_EPS))
    n = x.shape[0]
    if n < _SYMMETRIC_BLOCKS_MIN_ROWS:
        return jnp.dot(x, x.T, precision=HIGHEST)
    size = -(-n // _NUM_BLOCKS)
    parts = [x[i * size : (i + 1) * size] for i in range(_NUM_BLOCKS)]
    upper = {
        (i, j): jnp.dot(parts[i], parts[j].T, precision=HIGHEST)
        for i in range(_NUM_BLOCKS)
        for j in range(i, _NUM_BLOCKS)
    }
    rows = [
        jnp.concatenate(
            [upper[i, j] if j >= i else upper[j, i].T for j in range(_NUM_BLOCKS)], axis=1
        )
        for i in range(_NUM_BLOCKS)
    ]
    return jnp.concatenate(rows, axis=0)


# --------------------------------------------------------------------------------------
# Half-angle boundary on the 1/n grid (exact integer arithmetic + NumPy corrections)
# --------------------------------------------------------------------------------------


def _exact_boundary_np(n: int, k0: np.ndarray) -> np.ndarray:
    """Smallest integer k >= 0 with ``2 k^2 > n (n + k0)`` (exact, int64)."""
    rhs = np.int64(n) * (np.int64(n) + k0.astype(np.int64))
    k = np.floor(np.sqrt(np.maximum(rhs, 0) / 2.0)).astype(np.int64) + 1
    k = np.where(2 * (k - 1) ** 2 > rhs, k - 1, k)  # float64 sqrt is off by at most one
    k = np.where(2 * k * k <= rhs, k + 1, k)
    return np.maximum(k, 0)


def _numpy_boundary(n: int, k0: np.ndarray) -> np.ndarray:
    """NumPy float32's boundary: smallest k with ``f32(k)/n > cos(arccos(f32(k0)/n) / 2)``.

    This is the official ``_compute_th_trim_min`` arithmetic: the quantised row minimum
    ``m`` is a grid value, ``h = np.cos(np.arccos(m) / 2)`` in float32, and ``U`` keeps the
    grid values strictly above ``h``.
    """
    grid = np.arange(-n, n + 1).astype(np.float32) / np.float32(n)
    m = k0.astype(np.float32) / np.float32(n)
    with np.errstate(invalid="ignore"):
        h = np.cos(np.arccos(m) / np.float32(2))
    return np.searchsorted(grid, h, side="right").astype(np.int64) - n


@functools.lru_cache(maxsize=64)
def _boundary_corrections(n_lo: int, n_hi: int, stride: int):
    """Sorted keys ``n * stride + (k0 + stride // 2)`` and deltas where NumPy's float32
    half-angle boundary differs from the exact integer one, for ``n_lo <= n <= n_hi``.

    ``stride = 2 * capacity + 1``. A sentinel key (int32 max) with delta 0 is appended.
    Deltas are always -1 or +1 (grid points within a float32 rounding of the true
    half-angle); they are found by evaluating NumPy for every ``k0`` in ``[-n, n]``.
    """
    half = stride // 2
    keys, deltas = [], []
    for n in range(max(n_lo, 1), n_hi + 1):
        k0 = np.arange(-n, n + 1, dtype=np.int64)
        d = _numpy_boundary(n, k0) - _exact_boundary_np(n, k0)
        nz = np.nonzero(d)[0]
        if nz.size:
            keys.append(n * stride + k0[nz] + half)
            deltas.append(d[nz])
    keys.append(np.array([np.iinfo(np.int32).max], np.int64))
    deltas.append(np.zeros(1, np.int64))
    keys = np.concatenate(keys)
    deltas = np.concatenate(deltas)
    assert keys.max() <= np.iinfo(np.int32).max
    return keys.astype(np.int32), deltas.astype(np.int32)


def _half_angle_boundary(n, k0, *, n_lo: int, n_hi: int, capacity: int):
    """In-graph: first grid index k for which the official ``q > h`` holds.

    Args:
        n: int32 scalar, number of valid images (the grid is ``1/n``).
        k0: int32 ``(N,)`` quantised row minima ``trunc(n * min_j s_ij)``.
        n_lo, n_hi: static range of possible ``n`` (``n_lo == n_hi`` without a mask).
        capacity: static N (key stride).
    """
    stride = 2 * capacity + 1
    k0 = jnp.clip(k0, -n, n)
    rhs = n * (n + k0)
    k = jnp.floor(jnp.sqrt(rhs.astype(jnp.float32) * 0.5)).astype(jnp.int32)
    k = jnp.maximum(k - 2, 0)
    for _ in range(6):
        k = k + (2 * k * k <= rhs).astype(jnp.int32)
    keys_np, deltas_np = _boundary_corrections(n_lo, n_hi, stride)
    keys = jnp.asarray(keys_np)
    deltas = jnp.asarray(deltas_np)
    key = n * stride + k0 + capacity
    idx = jnp.clip(jnp.searchsorted(keys, key, side="left"), 0, keys.shape[0] - 1)
    return k + jnp.where(keys[idx] == key, deltas[idx], 0)


@functools.lru_cache(maxsize=64)
def _grid_table(n: int) -> np.ndarray:
    """The official float32 grid ``k.astype(float32) / n`` for ``k = -n..n``."""
    return np.arange(-n, n + 1).astype(np.float32) / np.float32(n)


@functools.lru_cache(maxsize=64)
def _keep_table(capacity: int, keep: float) -> np.ndarray:
    """``int(u * keep)`` in Python float64 for ``u = 0..capacity`` (official trim size)."""
    u = np.arange(capacity + 1, dtype=np.float64)
    return np.floor(u * keep).astype(np.int32)


# --------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------


def trim_min_thresholds(
    similarity: Float[Array, "n n"],
    *,
    keep: float = 0.85,
    mask: Bool[Array, " n"] | None = None,
) -> Float[Array, " n"]:
    """Per-image trim-min thresholds (tailedcore-spec section 3.2), float32.

    JAX port of ``adaptive_class_size._compute_ths(S, 'trim_min')`` in jungyg/TailedCore
    (``_compute_th_trim_min`` per row). For row ``i``, with ``n`` valid images:

    1. ``q = sort(trunc(n * S[i, :]) / n)`` in float32 (the ``1/n`` grid);
    2. ``h = cos(arccos(q[0]) / 2)`` (half-angle of the quantised minimum);
    3. ``U = [q_j : q_j > h]`` (strict);
    4. ``k = int(len(U) * keep)``; ``t_i = U[-k]``, i.e. the ``k``-th largest element of
       ``U``, or ``U[0]`` (its smallest) when ``k == 0`` (Python's ``U[-0]``).

    The result is bit-identical to the official NumPy float32 code for the same
    ``similarity`` (see the module docstring for how the ``cos``/``arccos`` rounding is
    reproduced). The raw ``similarity`` is later compared with these grid values.

    Defined behaviour where the official code crashes: if ``U`` is empty (every quantised
    similarity of the row is at or below the half-angle, which only happens when all
    images are identical up to the ``1/n`` grid, or for an all-zero embedding), the
    official code raises ``IndexError``; here ``t_i`` falls back to the raw row minimum
    ``min_j S[i, j]``, so every valid image counts as a neighbour of image ``i``.

    Args:
        similarity: ``(N, N)`` cosine similarities (float32 as from
            :func:`cosine_similarity_matrix`; other float dtypes are cast to float32).
        keep: fraction of ``U`` kept by the trim, in ``(0, 1]`` (static; official 0.85).
        mask: optional ``(N,)`` bool, True for valid images. Padded rows and columns are
            ignored and the grid is ``1/count``; the thresholds of valid rows equal those
            computed on the valid sub-matrix alone. Padded rows get threshold ``+inf``.

    Returns:
        ``(N,)`` float32 thresholds.

    Raises:
        ValueError: wrong rank/shape, ``N < 2`` (or fewer than 2 valid images for a
            concrete mask), ``N > MAX_IMAGES``, ``keep`` outside ``(0, 1]``; on concrete
            inputs, NaN/inf or values outside ``[-1, 1]`` (tolerance 1e-3).
        TypeError: non-floating ``similarity``, non-bool ``mask``, non-real ``keep``.
    """
    keep = _check_unit_fraction("keep", keep)
    _check_similarity(similarity, mask)
    s = jnp.asarray(similarity, jnp.float32)
    if mask is None:
        return _thresholds_static(s, keep=keep)
    return _thresholds_masked(s, mask, keep=keep)


@functools.partial(jax.jit, static_argnames=("keep",))
def _thresholds_static(s, *, keep):
    n = s.shape[0]
    return _thresholds_impl(s, None, keep=keep, n_lo=n, n_hi=n)


@functools.partial(jax.jit, static_argnames=("keep",))
def _thresholds_masked(s, mask, *, keep):
    n = s.shape[0]
    return _thresholds_impl(s, mask, keep=keep, n_lo=2, n_hi=n)


def _thresholds_impl(s, mask, *, keep: float, n_lo: int, n_hi: int):
    """Traced body of :func:`trim_min_thresholds` (``n_lo/n_hi``: static range of count)."""
    cap = s.shape[0]
    valid, n = _valid_and_count(mask, cap)
    nf = n.astype(jnp.float32)
    # Quantise exactly like NumPy: float32 product, then truncation toward zero.
    q_int = (nf * s).astype(jnp.int32)
    vcol = valid[None, :]
    k0 = jnp.min(jnp.where(vcol, q_int, _BIG), axis=1)
    kmax = jnp.max(jnp.where(vcol, q_int, -_BIG), axis=1)
    raw_min = jnp.min(jnp.where(vcol, s, jnp.inf), axis=1)
    q_masked = jnp.where(vcol, q_int, -_BIG)

    kh = _half_angle_boundary(n, k0, n_lo=n_lo, n_hi=n_hi, capacity=cap)
    u = jnp.sum(q_masked >= kh[:, None], axis=1, dtype=jnp.int32)  # |U|
    trim = jnp.asarray(_keep_table(cap, keep))[u]
    r = jnp.where(trim >= 1, trim, u)  # rank from the top: U[-k], or U[0] when k == 0

    # r-th largest valid quantised value per row, by bisection on the integer grid.
    # Invariant: count(q >= lo) >= r > count(q >= hi). Rows with r == 0 skip the search.
    lo = jnp.where(r > 0, kh, kmax)
    hi = kmax + 1

    def cond(c):
        lo, hi = c
        return jnp.any(hi - lo > 1)

    def body(c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        cnt = jnp.sum(q_masked >= mid[:, None], axis=1, dtype=jnp.int32)
        ok = cnt >= r
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.while_loop(cond, body, (lo, hi))
    if n_lo == n_hi:
        # Static n: look the grid value up in a NumPy-made table (XLA would rewrite a
        # division by a constant into a multiplication by its rounded reciprocal).
        grid = jnp.asarray(_grid_table(n_lo))
        t = grid[jnp.clip(lo, -n_lo, n_lo) + n_lo]
    else:
        t = lo.astype(jnp.float32) / nf  # float32 grid value, exactly as NumPy's astype / n
    t = jnp.where(u > 0, t, raw_min)
    return jnp.where(valid, t, jnp.inf)


# --------------------------------------------------------------------------------------
# Class sizes (mode vote)
# --------------------------------------------------------------------------------------


def predict_class_sizes(
    similarity: Float[Array, "n n"],
    thresholds: Float[Array, " n"],
    *,
    mask: Bool[Array, " n"] | None = None,
) -> Float[Array, " n"]:
    """Class size of every image by mode vote (tailedcore-spec section 3.3), float32.

    JAX port of ``adaptive_class_size.predict_adaptive_class_sizes(S, 'trim_min', 'mode')``
    after the thresholds (jungyg/TailedCore): ``M[i, j] = S[i, j] >= t_i``, ``n_i = sum_j
    M[i, j]``, and the class size of image ``j`` is the most frequent ``n_i`` among the rows
    ``i`` with ``M[i, j]`` (``scipy.stats.mode`` over the non-zero entries of the count map);
    ties go to the smallest value.

    A column that no row selects (possible only through float32 rounding, e.g. an isolated
    image whose own similarity is just below its grid threshold) gets NaN, exactly like the
    official ``scipy.stats.mode`` of an all-NaN column; NaN never compares ``<= K*``.

    Args:
        similarity: ``(N, N)`` cosine similarities (cast to float32).
        thresholds: ``(N,)`` per-row thresholds (e.g. :func:`trim_min_thresholds`).
        mask: optional ``(N,)`` bool, True for valid images; padded rows/columns neither
            vote nor are counted, and padded entries of the result are 0.

    Returns:
        ``(N,)`` float32 class sizes (integer values, NaN for unselected columns).

    Raises:
        ValueError: wrong ranks/shapes, ``N < 2``; NaN in concrete ``similarity``.
        TypeError: non-floating inputs, non-bool mask.
    """
    V.check_rank("similarity", similarity, 2)
    V.check_floating("similarity", similarity)
    n, n2 = jnp.shape(similarity)
    if n != n2:
        raise ValueError(f"similarity must be square, got shape {jnp.shape(similarity)}")
    _check_num_images("similarity", n)
    V.check_rank("thresholds", thresholds, 1)
    V.check_floating("thresholds", thresholds)
    if jnp.shape(thresholds)[0] != n:
        raise ValueError(f"thresholds must have shape ({n},), got {jnp.shape(thresholds)}")
    V.check_mask("mask", mask, n)
    V.check_finite("similarity", similarity)
    if V.is_concrete(thresholds) and np.any(np.isnan(np.asarray(thresholds))):
        raise ValueError("thresholds contain NaN")
    valid = jnp.ones((n,), bool) if mask is None else mask
    return _class_sizes_jit(
        jnp.asarray(similarity, jnp.float32), jnp.asarray(thresholds, jnp.float32), valid
    )


@jax.jit
def _class_sizes_jit(s, t, valid):
    return _class_sizes_impl(s, t, valid)


def _class_sizes_impl(s, t, valid):
    """Mode vote. Rows are visited in ascending order of their count ``n_i``; for each
    column a running count over the current run of equal ``n_i`` is compared with the best
    count so far (strictly greater wins, so ties keep the smaller value)."""
    n = s.shape[0]
    sel = (s >= t[:, None]) & valid[:, None] & valid[None, :]
    counts = jnp.sum(sel, axis=1, dtype=jnp.int32)
    order = jnp.argsort(counts, stable=True)
    sorted_counts = counts[order]
    run_end = jnp.concatenate([sorted_counts[1:] != sorted_counts[:-1], jnp.array([True])])
    rows = sel[order]

    def step(carry, x):
        acc, run_start, best, best_val = carry
        row, end, value = x
        acc = acc + row.astype(jnp.int32)
        run = acc - run_start
        better = end & (run > best)
        best = jnp.where(better, run, best)
        best_val = jnp.where(better, value, best_val)
        run_start = jnp.where(end, acc, run_start)
        return (acc, run_start, best, best_val), None

    zeros = jnp.zeros((n,), jnp.int32)
    (_, _, best, best_val), _ = jax.lax.scan(
        step, (zeros, zeros, zeros, zeros), (rows, run_end, sorted_counts), unroll=8
    )
    sizes = jnp.where(best > 0, best_val.astype(jnp.float32), jnp.nan)
    return jnp.where(valid, sizes, 0.0)


# --------------------------------------------------------------------------------------
# Grouping into pseudo-classes
# --------------------------------------------------------------------------------------


def group_class_sizes(
    class_sizes: Float[Array, " n"],
    *,
    mask: Bool[Array, " n"] | None = None,
) -> tuple[Int[Array, " n"], Bool[Array, " n"]]:
    """Greedy pseudo-class grouping of per-image class sizes (spec section 3.4, step 1).

    JAX port of ``class_size.predict_num_samples_per_class`` (jungyg/TailedCore), as a
    ``lax.while_loop``: round the sizes (half to even) to integers, sort ascending, clamp to
    at least 1 (NaN counts as 1, like the official ``round(nan).long()`` then clamp) to get
    ``R``, then repeat while ``R`` is non-empty:

    * if ``len(R) < R[0]``: add ``len(R)`` to the last group and stop;
    * else ``g = min(round(mean(R[:R[0]])), len(R))`` (float32 mean, round half to even),
      append ``g`` and drop the first ``g`` entries of ``R``.

    Groups are returned sorted descending. The official code raises ``IndexError`` if
    ``len(R) < R[0]`` already at the start, which needs a class size above the number of
    images (impossible for sizes from :func:`predict_class_sizes`): such values are
    rejected on concrete input and clipped to ``N`` under tracing, so it cannot happen.
    Every group is at least the smallest (rounded, clamped) class size, so ``K*`` is too
    and the tail is never empty unless every class size is NaN.

    Args:
        class_sizes: ``(N,)`` class size per image (float or int; NaN allowed, inf not).
            Values above ``N`` are out of domain (concrete inputs raise; traced inputs are
            clipped to ``N``).
        mask: optional ``(N,)`` bool, True for valid entries (padded entries are ignored).

    Returns:
        ``(groups, group_mask)``: ``groups`` is ``(N,)`` int32, the group sizes in
        descending order followed by zeros; ``group_mask`` is ``(N,)`` bool, True for the
        first ``num_groups`` entries. ``sum(groups)`` equals the number of valid entries.

    Raises:
        ValueError: rank != 1, empty input, inf or (concrete) values above ``N``.
        TypeError: non-numeric input, non-bool mask.
    """
    V.check_rank("class_sizes", class_sizes, 1)
    dtype = jnp.result_type(class_sizes)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"class_sizes must be a float or integer array, got dtype {dtype}")
    n = jnp.shape(class_sizes)[0]
    if n < 1:
        raise ValueError("class_sizes must not be empty")
    if n > MAX_IMAGES:
        raise ValueError(f"at most {MAX_IMAGES} class sizes are supported, got {n}")
    V.check_mask("mask", mask, n)
    count = V.concrete_count(mask, n)
    if count is not None and count < 1:
        raise ValueError("class_sizes needs at least one valid entry")
    if V.is_concrete(class_sizes):
        a = np.asarray(class_sizes, np.float64)
        if mask is not None and V.is_concrete(mask):
            a = a[np.asarray(mask)]
        if np.any(np.isinf(a)):
            raise ValueError("class_sizes contain inf")
        if a.size and np.nanmax(np.concatenate([a, [0.0]])) > n:
            raise ValueError(f"class_sizes must be at most N = {n}, got {np.nanmax(a)}")
    valid = jnp.ones((n,), bool) if mask is None else mask
    return _group_jit(jnp.asarray(class_sizes), valid)


@jax.jit
def _group_jit(class_sizes, valid):
    return _group_impl(class_sizes, valid)


def _round_to_int(x):
    """torch.round(x).long() then clamp to >= 1, with NaN -> 1; clipped to [1, N]."""
    n = x.shape[0]
    if jnp.issubdtype(x.dtype, jnp.floating):
        xf = jnp.asarray(x, jnp.float32)
        r = jnp.round(jnp.clip(xf, -1.0, float(n)))  # round half to even
        r = jnp.where(jnp.isnan(xf), 1.0, r)
        r = r.astype(jnp.int32)
    else:
        r = jnp.clip(x, -1, n).astype(jnp.int32)
    return jnp.maximum(r, 1)


def _group_impl(class_sizes, valid):
    n = class_sizes.shape[0]
    sizes = _round_to_int(class_sizes)
    num = jnp.sum(valid, dtype=jnp.int32)
    r_sorted = jnp.sort(jnp.where(valid, sizes, _BIG))  # valid entries first, ascending
    prefix = jnp.concatenate(
        [jnp.zeros((1,), jnp.int32), jnp.cumsum(jnp.where(r_sorted < _BIG, r_sorted, 0))]
    )

    def cond(c):
        pos, _, _ = c
        return pos < num

    def body(c):
        pos, ng, groups = c
        rem = num - pos
        r0 = r_sorted[jnp.minimum(pos, n - 1)]
        absorb = rem < r0
        window = prefix[jnp.minimum(pos + r0, n)] - prefix[pos]
        mean = window.astype(jnp.float32) / r0.astype(jnp.float32)
        g = jnp.minimum(jnp.round(mean).astype(jnp.int32), rem)
        # absorb: add the rest to the last group (or open the first one: defined behaviour)
        last = jnp.maximum(ng - 1, 0)
        absorbed = groups.at[last].add(rem)
        appended = groups.at[jnp.minimum(ng, n - 1)].set(g)
        groups = jnp.where(absorb, absorbed, appended)
        ng_new = jnp.where(absorb, jnp.maximum(ng, 1), ng + 1)
        pos = jnp.where(absorb, num, pos + g)
        return pos, ng_new, groups

    init = (jnp.int32(0), jnp.int32(0), jnp.zeros((n,), jnp.int32))
    _, ng, groups = jax.lax.while_loop(cond, body, init)
    groups = -jnp.sort(-groups)  # descending; zeros (unused slots) last
    return groups, jnp.arange(n) < ng


# --------------------------------------------------------------------------------------
# Elbow, percentile rule and K*
# --------------------------------------------------------------------------------------


def _check_groups(groups, mask):
    V.check_rank("groups", groups, 1)
    dtype = jnp.result_type(groups)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"groups must be an integer array of group sizes, got dtype {dtype}")
    k = jnp.shape(groups)[0]
    if k < 1:
        raise ValueError("groups must not be empty")
    V.check_mask("mask", mask, k)
    count = V.concrete_count(mask, k)
    if count is not None and count < 1:
        raise ValueError("groups needs at least one valid entry")
    if V.is_concrete(groups):
        g = np.asarray(groups)
        if mask is not None and V.is_concrete(mask):
            g = g[np.asarray(mask)]
        if g.size and g.min() < 1:
            raise ValueError(f"group sizes must be >= 1, got {g.min()}")
        if g.size and int(g.astype(np.int64).sum()) > MAX_IMAGES:
            raise ValueError(f"the group sizes must sum to at most {MAX_IMAGES}")


def _sorted_desc(groups, valid):
    """Valid group sizes in descending order (padding last, as 0) and their count."""
    g = jnp.where(valid, groups.astype(jnp.int32), -1)
    g = -jnp.sort(-g)
    k = jnp.sum(valid, dtype=jnp.int32)
    return jnp.maximum(g, 0), k


def elbow(groups: Int[Array, " k"], *, mask: Bool[Array, " k"] | None = None) -> Int[Array, ""]:
    """Elbow of the descending group-size curve (spec section 3.4, step 2), int32 scalar.

    JAX port of ``class_size.elbow`` (jungyg/TailedCore, ``sort=True``): with ``G`` sorted
    descending and points ``(k, G_k)``, return ``G`` at the point farthest from the chord
    through the first and last points (first maximum). The distance is compared through
    its exact integer numerator ``|dy k - dx (G_k - G_0)|``. One group, all-equal groups and
    other collinear cases return ``G_0`` (see the module docstring for how that relates to
    the official float64 rounding noise).

    Args:
        groups: ``(K,)`` integer group sizes (any order; sorted internally), each >= 1.
        mask: optional ``(K,)`` bool, True for valid groups (e.g. from
            :func:`group_class_sizes`).

    Returns:
        int32 scalar, the elbow group size.

    Raises:
        ValueError: rank != 1, no valid group; on concrete input, sizes < 1 or a total
            above ``MAX_IMAGES``.
        TypeError: non-integer ``groups``, non-bool mask.
    """
    _check_groups(groups, mask)
    valid = jnp.ones(jnp.shape(groups), bool) if mask is None else mask
    return _elbow_jit(jnp.asarray(groups), valid)


@jax.jit
def _elbow_jit(groups, valid):
    g, k = _sorted_desc(groups, valid)
    return _elbow_sorted(g, k)


def _elbow_sorted(g, k):
    idx = jnp.arange(g.shape[0], dtype=jnp.int32)
    last = g[jnp.maximum(k - 1, 0)]
    dx = k - 1
    dy = last - g[0]
    numer = jnp.abs(dy * idx - dx * (g - g[0]))
    numer = jnp.where(idx < k, numer, -1)
    return g[jnp.argmax(numer)]


def max_k_within_percentile(
    groups: Int[Array, " k"],
    *,
    mask: Bool[Array, " k"] | None = None,
    percentile: float = 0.15,
) -> Int[Array, ""]:
    """Largest group among the smallest groups that fit in ``percentile`` of the data.

    JAX port of ``class_size._predict_max_K_max_within_percnetile`` (jungyg/TailedCore;
    spec section 3.4, step 3): ``n = int(float32(sum G) * float32(p))`` (torch's float32
    scalar product), ``k`` = number of leading ascending cumulative sums ``<= n``,
    ``idx = min(K - k, K - 1)`` and the result is ``G_desc[idx]`` (the smallest group when
    none fits).

    Args:
        groups: ``(K,)`` integer group sizes (any order), each >= 1.
        mask: optional ``(K,)`` bool, True for valid groups.
        percentile: fraction of the data, in ``(0, 1]`` (static; official 0.15).

    Returns:
        int32 scalar.

    Raises:
        ValueError: as :func:`elbow`, or ``percentile`` outside ``(0, 1]``.
        TypeError: as :func:`elbow`, or a non-real ``percentile``.
    """
    percentile = _check_unit_fraction("percentile", percentile)
    _check_groups(groups, mask)
    valid = jnp.ones(jnp.shape(groups), bool) if mask is None else mask
    return _percentile_jit(jnp.asarray(groups), valid, percentile=percentile)


@functools.partial(jax.jit, static_argnames=("percentile",))
def _percentile_jit(groups, valid, *, percentile):
    g, k = _sorted_desc(groups, valid)
    return _percentile_sorted(g, k, percentile)


def _percentile_sorted(g, k, percentile: float):
    size = g.shape[0]
    total = jnp.sum(g)
    limit = jnp.floor(total.astype(jnp.float32) * jnp.float32(percentile)).astype(jnp.int32)
    idx = jnp.arange(size, dtype=jnp.int32)
    ascending = g[jnp.clip(k - 1 - idx, 0, size - 1)]  # G_desc reversed (valid part)
    cum = jnp.cumsum(jnp.where(idx < k, ascending, 0))
    fits = jnp.sum((cum <= limit) & (idx < k), dtype=jnp.int32)
    pick = jnp.minimum(k - fits, k - 1)
    return g[jnp.maximum(pick, 0)]


def few_shot_threshold(
    groups: Int[Array, " k"],
    *,
    mask: Bool[Array, " k"] | None = None,
    percentile: float = 0.15,
) -> Int[Array, ""]:
    """Tail cut-off ``K*`` (spec section 3.4, step 4), int32 scalar.

    JAX port of ``class_size.predict_max_K`` (jungyg/TailedCore): ``K* = elbow(G)``, and
    when ``percentile < 1``, ``K* = min(elbow(G), max_k_within_percentile(G, percentile))``
    (the official code skips the percentile rule at ``percentile == 1``). Images whose
    class size is ``<= K*`` form the tail.

    Args:
        groups: ``(K,)`` integer group sizes (any order), each >= 1.
        mask: optional ``(K,)`` bool, True for valid groups.
        percentile: in ``(0, 1]`` (static; official 0.15).

    Returns:
        int32 scalar ``K*``.

    Raises:
        ValueError / TypeError: as :func:`max_k_within_percentile`.
    """
    percentile = _check_unit_fraction("percentile", percentile)
    _check_groups(groups, mask)
    valid = jnp.ones(jnp.shape(groups), bool) if mask is None else mask
    return _k_star_jit(jnp.asarray(groups), valid, percentile=percentile)


@functools.partial(jax.jit, static_argnames=("percentile",))
def _k_star_jit(groups, valid, *, percentile):
    g, k = _sorted_desc(groups, valid)
    return _k_star_sorted(g, k, percentile)[0]


def _k_star_sorted(g, k, percentile: float):
    """(K*, elbow, percentile-K) from descending groups ``g`` with ``k`` valid entries."""
    e = _elbow_sorted(g, k)
    p = _percentile_sorted(g, k, percentile)
    k_star = jnp.minimum(e, p) if percentile < 1.0 else e
    return k_star, e, p
