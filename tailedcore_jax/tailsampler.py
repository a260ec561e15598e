"""TailSampler: which training images belong to tail (few-shot) classes, in the paper's steps.

For ``N`` image embeddings (WRN-50 ``avgpool`` in TailedCore), variant ``ada_trim_min-mode``
of the paper (the one behind all of its results)::

    S     = cosine_similarity_matrix(E)              # (N, N)  self-similarity
    t     = trim_min_thresholds(S)                   # (N,)    half-angle of the row minimum, trimmed
    sizes = predict_class_sizes(S, t)                # (N,)    mode vote of neighbour counts
    G, gm = group_class_sizes(sizes)                 # (N,)    greedy pseudo-classes
    K*    = few_shot_threshold(G, mask=gm)           # min(elbow(G), max_k_within_percentile(G))
    tail  = sizes <= K*                              # tail_sample_mask(E) does all of this

Every step is a public, jit-compiled function that checks its inputs when called (shape checks
always, value checks on concrete inputs); :func:`tail_sample_mask` checks the embeddings once
and composes the steps' unchecked forms (``step.unchecked``) in one program. Variable sizes are
fixed-capacity ``(N,)`` arrays plus a mask; every step takes ``mask`` (True = valid image) and
gives on the valid rows what it gives on the valid rows alone.

Exactness with respect to the official NumPy/torch float32 code (``docs/fidelity.md``): the
``1/n`` grid is built like NumPy's, the half-angle decision ``q > cos(arccos(m) / 2)`` is exact
integer arithmetic corrected wherever NumPy's float32 ``cos``/``arccos`` lands on the other
side (a table made at trace time), means and rounding are torch's, and the elbow is an exact
integer argmax.

References:
    Jung et al., "TailedCore: Few-Shot Sampling for Unsupervised Long-Tail Noisy Anomaly
    Detection", CVPR 2025 (arXiv 2504.02775): JAX port of ``AdaptiveTailSampler('trim_min',
    'mode')`` in jungyg/TailedCore ``src/sampler.py``, with ``src/adaptive_class_size.py`` and
    ``src/class_size.py``.
"""

import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from tailedcore_jax import _validation as V

__all__ = [
    "MAX_IMAGES",
    "SIMILARITY_ROUNDINGS",
    "TailSamplerStatistics",
    "cosine_similarity_matrix",
    "elbow",
    "few_shot_threshold",
    "group_class_sizes",
    "max_k_within_percentile",
    "predict_class_sizes",
    "tail_sample_mask",
    "tail_sampler_statistics",
    "trim_min_thresholds",
]

_HIGHEST = jax.lax.Precision.HIGHEST
#: ``F.normalize`` epsilon: rows are divided by ``max(||x||, 1e-12)``.
NORMALIZE_EPS = 1e-12
#: Largest supported number of images: the grid arithmetic (``2 k^2``, ``n (n + k0)``) is int32.
MAX_IMAGES = 30000
#: Similarities must lie in ``[-1 - tol, 1 + tol]`` (checked on concrete inputs).
_SIM_TOL = 1e-3
_BIG = np.int32(2**30)
#: From this many rows the Gram matrix is built from the upper blocks of a 4 x 4 split and
#: mirrored (10 of 16 block products), which also makes it exactly symmetric.
_SYMMETRIC_BLOCKS_MIN_ROWS = 1024
_NUM_BLOCKS = 4


def _paper_step(check, *, static_argnames=()):
    """A public step: ``check(**arguments)`` (raises on bad input) then the jitted equation.

    ``step.unchecked`` is the jitted equation alone, for composing steps whose inputs are
    already checked (inside another jit it is inlined).
    """

    def decorate(fn):
        jitted = jax.jit(fn, static_argnames=static_argnames)
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def step(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            check(**bound.arguments)
            return jitted(*args, **kwargs)

        step.unchecked = jitted
        return step

    return decorate


# ------------------------------------------------------------------------------ input checks


def _check_num_images(name: str, n: int) -> None:
    if n < 2:
        raise ValueError(f"{name} needs at least 2 images, got {n}")
    if n > MAX_IMAGES:
        raise ValueError(f"{name} supports at most {MAX_IMAGES} images, got {n}")


def _check_valid_count(name: str, mask, n: int) -> None:
    count = V.concrete_count(mask, n)
    if count is not None and count < 2:
        raise ValueError(f"{name} needs at least 2 valid images, got {count}")


def _check_embeddings_only(embeddings):
    V.check_rank("embeddings", embeddings, 2)
    V.check_floating("embeddings", embeddings)
    V.check_finite("embeddings", embeddings)


def _check_square(similarity, mask):
    V.check_rank("similarity", similarity, 2)
    V.check_floating("similarity", similarity)
    n, n2 = jnp.shape(similarity)
    if n != n2:
        raise ValueError(f"similarity must be square, got shape {jnp.shape(similarity)}")
    _check_num_images("similarity", n)
    V.check_mask("mask", mask, n)
    V.check_finite("similarity", similarity)
    return n


def _check_thresholds_args(similarity, keep, mask):
    V.unit_fraction("keep", keep)
    n = _check_square(similarity, mask)
    _check_valid_count("similarity", mask, n)
    if V.is_concrete(similarity) and (mask is None or V.is_concrete(mask)):
        s = np.asarray(similarity)
        if mask is not None:
            s = s[np.asarray(mask)][:, np.asarray(mask)]
        if s.size and (s.min() < -1 - _SIM_TOL or s.max() > 1 + _SIM_TOL):
            raise ValueError("similarity must be a cosine similarity in [-1, 1], got values in "
                             f"[{s.min()}, {s.max()}]")


def _check_class_sizes_args(similarity, thresholds, mask):
    n = _check_square(similarity, mask)
    V.check_rank("thresholds", thresholds, 1)
    V.check_floating("thresholds", thresholds)
    if jnp.shape(thresholds)[0] != n:
        raise ValueError(f"thresholds must have shape ({n},), got {jnp.shape(thresholds)}")
    if V.is_concrete(thresholds) and np.any(np.isnan(np.asarray(thresholds))):
        raise ValueError("thresholds contain NaN")


def _check_group_args(class_sizes, mask):
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
    if V.concrete_count(mask, n) == 0:
        raise ValueError("class_sizes needs at least one valid entry")
    if V.is_concrete(class_sizes):
        a = np.asarray(class_sizes, np.float64)
        if mask is not None and V.is_concrete(mask):
            a = a[np.asarray(mask)]
        if np.any(np.isinf(a)):
            raise ValueError("class_sizes contain inf")
        if a.size and np.nanmax(np.concatenate([a, [0.0]])) > n:
            raise ValueError(f"class_sizes must be at most N = {n}, got {np.nanmax(a)}")


def _check_groups_args(groups, mask, percentile=1.0):
    V.unit_fraction("percentile", percentile)
    V.check_rank("groups", groups, 1)
    dtype = jnp.result_type(groups)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"groups must be an integer array of group sizes, got dtype {dtype}")
    k = jnp.shape(groups)[0]
    if k < 1:
        raise ValueError("groups must not be empty")
    V.check_mask("mask", mask, k)
    if V.concrete_count(mask, k) == 0:
        raise ValueError("groups needs at least one valid entry")
    if V.is_concrete(groups):
        g = np.asarray(groups)
        if mask is not None and V.is_concrete(mask):
            g = g[np.asarray(mask)]
        if g.size and g.min() < 1:
            raise ValueError(f"group sizes must be >= 1, got {g.min()}")
        if g.size and int(g.astype(np.int64).sum()) > MAX_IMAGES:
            raise ValueError(f"the group sizes must sum to at most {MAX_IMAGES}")


def _check_sampler_args(embeddings, keep, percentile, mask, similarity_rounding):
    if similarity_rounding not in SIMILARITY_ROUNDINGS:
        raise ValueError(f"similarity_rounding must be one of {SIMILARITY_ROUNDINGS}, got "
                         f"{similarity_rounding!r}")
    V.unit_fraction("keep", keep)
    V.unit_fraction("percentile", percentile)
    _check_embeddings_only(embeddings)
    n = jnp.shape(embeddings)[0]
    _check_num_images("embeddings", n)
    V.check_mask("mask", mask, n)
    _check_valid_count("embeddings", mask, n)
    if V.is_concrete(embeddings) and (mask is None or V.is_concrete(mask)):
        e = np.asarray(embeddings, np.float32)
        bad = np.sqrt(np.sum(e.astype(np.float64) ** 2, axis=1)) <= NORMALIZE_EPS
        if mask is not None:
            bad &= np.asarray(mask)
        if np.any(bad):
            rows = np.nonzero(bad)[0]
            raise ValueError(
                f"embeddings has {rows.size} all-zero row(s) (first: {rows[:5].tolist()}); their "
                "cosine similarity is undefined and the official TailSampler fails on them")


def _valid_and_count(mask, n: int):
    if mask is None:
        return jnp.ones((n,), bool), jnp.int32(n)
    return mask, jnp.sum(mask, dtype=jnp.int32)


# ------------------------------------------------------------------------------ 1. similarity


SIMILARITY_ROUNDINGS = ("xla", "torch_cpu")
#: torch-CPU's float32 ``vector_norm`` accumulates ``x**2`` in 8 lanes.
_TORCH_NORM_LANES = 8
#: MKL sgemm's K-block for ``X @ X.T`` on x86-64 (MKL 2024.2, measured).
_MKL_KC = 192


def _ieee_divide(a, b):
    """``a / b`` with ``b`` broadcast to ``a``'s shape behind a barrier: XLA:CPU rewrites a
    division by a broadcast value into a multiplication by its (rounded) reciprocal."""
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(b, a.shape))


def _check_similarity_args(embeddings, rounding):
    _check_embeddings_only(embeddings)
    if rounding not in SIMILARITY_ROUNDINGS:
        raise ValueError(f"rounding must be one of {SIMILARITY_ROUNDINGS}, got {rounding!r}")


@_paper_step(_check_similarity_args, static_argnames=("rounding",))
def cosine_similarity_matrix(
    embeddings: Float[Array, "n d"], *, rounding: str = "xla"
) -> Float[Array, "n n"]:
    """``S = E_hat E_hat^T`` with ``E_hat = E / max(|E|_2, 1e-12)`` per row, float32.

    Port of ``class_size.compute_self_sim`` (``F.normalize`` then a float32 matmul; an
    all-zero row gets similarity 0 to everything). The TailSampler's later steps are
    bit-exact given ``S``, so ``S``'s rounding decides whether the result is the official one:

    * ``rounding="xla"``: an XLA matmul with ``precision=HIGHEST`` (fast; a few ulps from
      torch, which can move a similarity across a ``1/N`` grid point and change a count);
    * ``rounding="torch_cpu"``: torch-CPU's rounding, operation by operation (its 8-lane norm,
      IEEE division, and MKL sgemm's FMA chains in K-blocks of 192), measured bit-equal to the
      official torch 2.14 / MKL 2024.2 float32 ``S`` on x86-64 for ``N >= 12`` (MKL takes other
      kernels below); ``D`` sequential ``N x N`` FMA sweeps (about 2.5 s at ``N = 1858,
      D = 1024`` on 2 cores). Needs a backend that contracts ``a + b * c`` into an FMA (XLA:CPU
      does; checked on first use).

    Raises:
        ValueError: rank not 2, NaN/inf (concrete inputs), an unknown ``rounding``, no FMA
            contraction for ``"torch_cpu"``. TypeError: non-floating input.
    """
    x = jnp.asarray(embeddings, jnp.float32)
    if rounding == "torch_cpu":
        if not _fma_contracted():
            raise ValueError('rounding="torch_cpu" needs a backend that contracts a + b * c '
                             "into a fused multiply-add; this one does not")
        return _mkl_gram(_torch_cpu_normalize(x))
    norms = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    x = _ieee_divide(x, jnp.maximum(norms, NORMALIZE_EPS))
    n = x.shape[0]
    if n < _SYMMETRIC_BLOCKS_MIN_ROWS:
        return jnp.dot(x, x.T, precision=_HIGHEST)
    size = -(-n // _NUM_BLOCKS)
    parts = [x[i * size:(i + 1) * size] for i in range(_NUM_BLOCKS)]
    upper = {(i, j): jnp.dot(parts[i], parts[j].T, precision=_HIGHEST)
             for i in range(_NUM_BLOCKS) for j in range(i, _NUM_BLOCKS)}
    return jnp.concatenate([
        jnp.concatenate([upper[i, j] if j >= i else upper[j, i].T for j in range(_NUM_BLOCKS)],
                        axis=1)
        for i in range(_NUM_BLOCKS)], axis=0)


def _torch_cpu_normalize(x):
    """``F.normalize`` as torch-CPU rounds it: lane ``l`` of 8 sums ``x[:, 8 j + l]**2`` in
    order (products rounded: no FMA), the lanes are added in order, then the ``D % 8`` tail one
    by one; IEEE ``sqrt`` and division."""
    n, d = x.shape
    lanes = _TORCH_NORM_LANES
    sq = jax.lax.optimization_barrier(x * x)  # keeps XLA from fusing the squares into FMAs
    full = (d // lanes) * lanes
    acc = jnp.zeros((n, lanes), jnp.float32)
    if full:
        chunks = jnp.transpose(sq[:, :full].reshape(n, full // lanes, lanes), (1, 0, 2))
        acc, _ = jax.lax.scan(lambda a, c: (a + c, None), acc, chunks)
    s = acc[:, 0]
    for lane in range(1, lanes):
        s = s + acc[:, lane]
    for k in range(full, d):
        s = s + sq[:, k]
    return _ieee_divide(x, jnp.maximum(jnp.sqrt(s), jnp.float32(NORMALIZE_EPS))[:, None])


def _mkl_k_blocks(d: int, kc: int = _MKL_KC) -> list[int]:
    """MKL sgemm's K-blocks for inner dimension ``d`` (measured): one block up to ``kc``, two
    equal halves up to ``2 kc`` (an odd last element alone), else blocks of ``kc``."""
    if d <= kc:
        return [d]
    if d <= 2 * kc:
        return [d // 2, d // 2] + ([1] if d % 2 else [])
    return [kc] * (d // kc) + ([d % kc] if d % kc else [])


def _mkl_gram(x):
    """``x @ x.T`` as MKL rounds it: a float32 FMA chain along ``k`` inside each K-block, the
    block sums added in order."""
    n, d = x.shape
    total, k0 = None, 0
    for b in _mkl_k_blocks(d):
        acc, _ = jax.lax.scan(lambda a, v: (a + v[:, None] * v[None, :], None),
                              jnp.zeros((n, n), jnp.float32), x.T[k0:k0 + b])
        total = acc if total is None else total + acc
        k0 += b
    return total


@functools.lru_cache(maxsize=None)
def _fma_contracted() -> bool:
    """True if XLA on the default backend fuses ``c + a * b`` into one rounding."""
    with jax.ensure_compile_time_eval():  # concrete even when asked inside a trace
        a = jnp.asarray(np.float32(1.0 + 2.0**-12))
        c = jnp.asarray(np.float32(-(1.0 + 2.0**-11)))
        return float(jax.jit(lambda a, c: c + a * a)(a, c)) == 2.0**-24


# ------------------------------------------------------------------------------ 2. thresholds


def _exact_boundary_np(n: int, k0: np.ndarray) -> np.ndarray:
    """Smallest integer k >= 0 with ``2 k^2 > n (n + k0)`` (exact, int64)."""
    rhs = np.int64(n) * (np.int64(n) + k0.astype(np.int64))
    k = np.floor(np.sqrt(np.maximum(rhs, 0) / 2.0)).astype(np.int64) + 1
    k = np.where(2 * (k - 1) ** 2 > rhs, k - 1, k)  # float64 sqrt is off by at most one
    k = np.where(2 * k * k <= rhs, k + 1, k)
    return np.maximum(k, 0)


def _numpy_boundary(n: int, k0: np.ndarray) -> np.ndarray:
    """The official NumPy float32 boundary: smallest k with ``f32(k)/n > cos(arccos(f32(k0)/n)/2)``."""
    grid = np.arange(-n, n + 1).astype(np.float32) / np.float32(n)
    m = k0.astype(np.float32) / np.float32(n)
    with np.errstate(invalid="ignore"):
        h = np.cos(np.arccos(m) / np.float32(2))
    return np.searchsorted(grid, h, side="right").astype(np.int64) - n


@functools.lru_cache(maxsize=64)
def _boundary_corrections(n_lo: int, n_hi: int, stride: int):
    """Keys ``n * stride + (k0 + stride // 2)`` and deltas (+-1) where NumPy's float32 boundary
    differs from the exact one, for ``n_lo <= n <= n_hi``; a sentinel closes the table."""
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
    keys, deltas = np.concatenate(keys), np.concatenate(deltas)
    assert keys.max() <= np.iinfo(np.int32).max
    return keys.astype(np.int32), deltas.astype(np.int32)


def _half_angle_boundary(n, k0, *, n_lo: int, n_hi: int, capacity: int):
    """In-graph: the first grid index ``k`` with the official ``k / n > cos(arccos(k0 / n) / 2)``,
    for int32 ``n`` (valid images) and ``k0`` (quantised row minima); ``n_lo..n_hi`` is the
    static range of ``n``, ``capacity`` the static N."""
    stride = 2 * capacity + 1
    k0 = jnp.clip(k0, -n, n)
    rhs = n * (n + k0)
    k = jnp.maximum(jnp.floor(jnp.sqrt(rhs.astype(jnp.float32) * 0.5)).astype(jnp.int32) - 2, 0)
    for _ in range(6):
        k = k + (2 * k * k <= rhs).astype(jnp.int32)
    keys_np, deltas_np = _boundary_corrections(n_lo, n_hi, stride)
    keys, deltas = jnp.asarray(keys_np), jnp.asarray(deltas_np)
    key = n * stride + k0 + capacity
    idx = jnp.clip(jnp.searchsorted(keys, key, side="left"), 0, keys.shape[0] - 1)
    return k + jnp.where(keys[idx] == key, deltas[idx], 0)


@functools.lru_cache(maxsize=64)
def _grid_table(n: int) -> np.ndarray:
    """The official float32 grid ``k.astype(float32) / n`` for ``k = -n..n``."""
    return np.arange(-n, n + 1).astype(np.float32) / np.float32(n)


@functools.lru_cache(maxsize=64)
def _keep_table(capacity: int, keep: float) -> np.ndarray:
    """``int(u * keep)`` in Python float64 for ``u = 0..capacity`` (the official trim size)."""
    return np.floor(np.arange(capacity + 1, dtype=np.float64) * keep).astype(np.int32)


def _rth_largest(q_masked, r, lo, hi):
    """Per row, the ``r``-th largest entry on the integer grid, by bisection.

    Invariant: ``count(q >= lo) >= r > count(q >= hi)``."""

    def cond(c):
        return jnp.any(c[1] - c[0] > 1)

    def body(c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(q_masked >= mid[:, None], axis=1, dtype=jnp.int32) >= r
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.while_loop(cond, body, (lo, hi))[0]


@_paper_step(_check_thresholds_args, static_argnames=("keep",))
def trim_min_thresholds(
    similarity: Float[Array, "n n"],
    *,
    keep: float = 0.85,
    mask: Bool[Array, " n"] | None = None,
) -> Float[Array, " n"]:
    """Per-image trim-min thresholds on the ``1/n`` grid (``n`` valid images), float32.

    Row ``i``: ``q = sort(trunc(n S_i) / n)``; ``h = cos(arccos(q_0) / 2)`` (the half angle of
    the quantised minimum: the symmetric assumption); ``U = [q_j > h]``; ``t_i = U[-int(|U|
    keep)]`` (Python's ``U[-0]`` is ``U[0]``). Bit-identical to the official NumPy float32
    ``_compute_th_trim_min`` (``adaptive_class_size._compute_ths(S, 'trim_min')``) for the same
    ``S``. Where the official code raises ``IndexError`` (empty ``U``: all images identical up
    to the grid, or an all-zero embedding) ``t_i`` is the raw row minimum instead.

    Args:
        similarity: ``(N, N)`` cosine similarities (cast to float32).
        keep: fraction of ``U`` kept by the trim, in ``(0, 1]`` (static; official 0.85).
        mask: ``(N,)`` bool, True = valid image; the grid is then ``1/count`` and padded rows
            get ``+inf``.

    Raises:
        ValueError: not square, ``N < 2`` or ``> MAX_IMAGES``, ``keep`` outside ``(0, 1]``; on
            concrete inputs, fewer than 2 valid images, NaN/inf, values outside ``[-1, 1]``.
        TypeError: non-floating similarity, non-bool mask, non-real keep.
    """
    s = jnp.asarray(similarity, jnp.float32)
    cap = s.shape[0]
    n_lo, n_hi = (cap, cap) if mask is None else (2, cap)
    valid, n = _valid_and_count(mask, cap)
    nf = n.astype(jnp.float32)
    q_int = (nf * s).astype(jnp.int32)  # NumPy: float32 product, truncation toward zero
    vcol = valid[None, :]
    k0 = jnp.min(jnp.where(vcol, q_int, _BIG), axis=1)
    kmax = jnp.max(jnp.where(vcol, q_int, -_BIG), axis=1)
    q_masked = jnp.where(vcol, q_int, -_BIG)
    kh = _half_angle_boundary(n, k0, n_lo=n_lo, n_hi=n_hi, capacity=cap)
    u = jnp.sum(q_masked >= kh[:, None], axis=1, dtype=jnp.int32)  # |U|
    trim = jnp.asarray(_keep_table(cap, keep))[u]
    r = jnp.where(trim >= 1, trim, u)  # rank from the top: U[-k], or U[0] when k == 0
    lo = _rth_largest(q_masked, r, jnp.where(r > 0, kh, kmax), kmax + 1)
    if n_lo == n_hi:  # a NumPy-made table: XLA would turn "/ n" into "* (1/n)"
        t = jnp.asarray(_grid_table(n_lo))[jnp.clip(lo, -n_lo, n_lo) + n_lo]
    else:
        t = _ieee_divide(lo.astype(jnp.float32), nf)  # as NumPy's astype(float32) / n
    t = jnp.where(u > 0, t, jnp.min(jnp.where(vcol, s, jnp.inf), axis=1))
    return jnp.where(valid, t, jnp.inf)


# ------------------------------------------------------------------------------ 3. class sizes


@_paper_step(_check_class_sizes_args)
def predict_class_sizes(
    similarity: Float[Array, "n n"],
    thresholds: Float[Array, " n"],
    *,
    mask: Bool[Array, " n"] | None = None,
) -> Float[Array, " n"]:
    """Class size of every image by mode vote, float32.

    ``M_ij = S_ij >= t_i``, ``n_i = sum_j M_ij``; the size of image ``j`` is the most frequent
    ``n_i`` over the rows ``i`` with ``M_ij`` (``scipy.stats.mode`` of the count map, ties to
    the smallest). A column no row selects gets NaN, as the official mode of an all-NaN column.
    Port of ``adaptive_class_size.predict_adaptive_class_sizes(S, 'trim_min', 'mode')``.

    Args:
        similarity: ``(N, N)`` (cast to float32). thresholds: ``(N,)``.
        mask: ``(N,)`` bool; padded rows/columns neither vote nor count and get 0.

    Raises:
        ValueError: wrong shapes, ``N < 2``; NaN in concrete inputs. TypeError: dtypes.
    """
    s = jnp.asarray(similarity, jnp.float32)
    t = jnp.asarray(thresholds, jnp.float32)
    n = s.shape[0]
    valid = jnp.ones((n,), bool) if mask is None else mask
    sel = (s >= t[:, None]) & valid[:, None] & valid[None, :]
    counts = jnp.sum(sel, axis=1, dtype=jnp.int32)
    # Rows in ascending order of n_i; per column, a running count over the current run of
    # equal n_i against the best so far (strictly greater wins: ties keep the smaller value).
    order = jnp.argsort(counts, stable=True)
    sorted_counts = counts[order]
    run_end = jnp.concatenate([sorted_counts[1:] != sorted_counts[:-1], jnp.array([True])])

    def step(carry, x):
        acc, run_start, best, best_val = carry
        row, end, value = x
        acc = acc + row.astype(jnp.int32)
        better = end & (acc - run_start > best)
        best = jnp.where(better, acc - run_start, best)
        best_val = jnp.where(better, value, best_val)
        return (acc, jnp.where(end, acc, run_start), best, best_val), None

    zeros = jnp.zeros((n,), jnp.int32)
    (_, _, best, best_val), _ = jax.lax.scan(
        step, (zeros, zeros, zeros, zeros), (sel[order], run_end, sorted_counts), unroll=8)
    sizes = jnp.where(best > 0, best_val.astype(jnp.float32), jnp.nan)
    return jnp.where(valid, sizes, 0.0)


# ------------------------------------------------------------------------------ 4. grouping


def _round_to_int(x):
    """``torch.round(x).long()`` then clamp to >= 1 (NaN -> 1); clipped to ``[1, N]``."""
    n = x.shape[0]
    if jnp.issubdtype(x.dtype, jnp.floating):
        xf = jnp.asarray(x, jnp.float32)
        r = jnp.round(jnp.clip(xf, -1.0, float(n)))  # round half to even
        r = jnp.where(jnp.isnan(xf), 1.0, r).astype(jnp.int32)
    else:
        r = jnp.clip(x, -1, n).astype(jnp.int32)
    return jnp.maximum(r, 1)


@_paper_step(_check_group_args)
def group_class_sizes(
    class_sizes: Float[Array, " n"],
    *,
    mask: Bool[Array, " n"] | None = None,
) -> tuple[Int[Array, " n"], Bool[Array, " n"]]:
    """Greedy pseudo-classes: round the sizes (half to even), sort ascending, clamp to >= 1
    (NaN -> 1) into ``R``; while ``R`` is not empty: if ``len(R) < R[0]`` add ``len(R)`` to the
    last group, else append ``g = min(round(mean(R[:R[0]])), len(R))`` and drop ``g`` entries.

    Port of ``class_size.predict_num_samples_per_class``. Where the official code raises
    (``len(R) < R[0]`` at the start, impossible for sizes from :func:`predict_class_sizes`)
    the first group absorbs everything.

    Args:
        class_sizes: ``(N,)`` float or int sizes (NaN allowed; concrete values above ``N``
            raise, traced ones are clipped).
        mask: ``(N,)`` bool, True = valid entry.

    Returns:
        ``(groups (N,) int32`` descending then zeros, ``group_mask (N,) bool)``;
        ``sum(groups)`` is the number of valid entries.

    Raises:
        ValueError: rank != 1, empty, inf, values above ``N``. TypeError: dtypes.
    """
    n = class_sizes.shape[0]
    valid = jnp.ones((n,), bool) if mask is None else mask
    num = jnp.sum(valid, dtype=jnp.int32)
    r_sorted = jnp.sort(jnp.where(valid, _round_to_int(class_sizes), _BIG))  # valid first
    prefix = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                              jnp.cumsum(jnp.where(r_sorted < _BIG, r_sorted, 0))])

    def body(c):
        pos, ng, groups = c
        rem = num - pos
        r0 = r_sorted[jnp.minimum(pos, n - 1)]
        absorb = rem < r0
        mean = (prefix[jnp.minimum(pos + r0, n)] - prefix[pos]).astype(jnp.float32) / r0.astype(
            jnp.float32)
        g = jnp.minimum(jnp.round(mean).astype(jnp.int32), rem)
        groups = jnp.where(absorb, groups.at[jnp.maximum(ng - 1, 0)].add(rem),
                           groups.at[jnp.minimum(ng, n - 1)].set(g))
        return (jnp.where(absorb, num, pos + g), jnp.where(absorb, jnp.maximum(ng, 1), ng + 1),
                groups)

    init = (jnp.int32(0), jnp.int32(0), jnp.zeros((n,), jnp.int32))
    _, ng, groups = jax.lax.while_loop(lambda c: c[0] < num, body, init)
    return -jnp.sort(-groups), jnp.arange(n) < ng


# ------------------------------------------------------------------------------ 5. elbow and K


def _sorted_desc(groups, mask):
    """Valid group sizes descending (padding last, as 0) and their count."""
    valid = jnp.ones(groups.shape, bool) if mask is None else mask
    g = -jnp.sort(-jnp.where(valid, groups.astype(jnp.int32), -1))
    return jnp.maximum(g, 0), jnp.sum(valid, dtype=jnp.int32)


@_paper_step(_check_groups_args)
def elbow(groups: Int[Array, " k"], *, mask: Bool[Array, " k"] | None = None) -> Int[Array, ""]:
    """``G_desc[argmax_k |dy k - dx (G_k - G_0)|]``: the group farthest from the chord through
    the first and last points of the descending curve (first maximum; exact integers).

    Port of ``class_size.elbow`` (``sort=True``). When every point lies on the chord (one
    group, equal groups, an arithmetic progression) the official choice is float64 noise; here
    it is the first (largest) group, as the official result for one and for equal groups.

    Raises:
        ValueError: rank != 1, no valid group; concrete sizes < 1 or summing above
            ``MAX_IMAGES``. TypeError: non-integer groups, non-bool mask.
    """
    g, k = _sorted_desc(groups, mask)
    idx = jnp.arange(g.shape[0], dtype=jnp.int32)
    numer = jnp.abs((g[jnp.maximum(k - 1, 0)] - g[0]) * idx - (k - 1) * (g - g[0]))
    return g[jnp.argmax(jnp.where(idx < k, numer, -1))]


@_paper_step(_check_groups_args, static_argnames=("percentile",))
def max_k_within_percentile(
    groups: Int[Array, " k"],
    *,
    mask: Bool[Array, " k"] | None = None,
    percentile: float = 0.15,
) -> Int[Array, ""]:
    """The largest group among the smallest groups that fit in ``percentile`` of the data.

    ``n = int(f32(sum G) * f32(percentile))``; ``k`` = number of ascending cumulative sums
    ``<= n``; result ``G_desc[min(K - k, K - 1)]``. Port of
    ``class_size._predict_max_K_max_within_percnetile``.

    Args:
        groups, mask: as :func:`elbow`. percentile: a fraction in ``(0, 1]`` (static; 0.15).

    Raises:
        as :func:`elbow`, plus ``percentile`` outside ``(0, 1]``.
    """
    g, k = _sorted_desc(groups, mask)
    size = g.shape[0]
    limit = jnp.floor(jnp.sum(g).astype(jnp.float32) * jnp.float32(percentile)).astype(jnp.int32)
    idx = jnp.arange(size, dtype=jnp.int32)
    cum = jnp.cumsum(jnp.where(idx < k, g[jnp.clip(k - 1 - idx, 0, size - 1)], 0))  # ascending
    fits = jnp.sum((cum <= limit) & (idx < k), dtype=jnp.int32)
    return g[jnp.maximum(jnp.minimum(k - fits, k - 1), 0)]


@_paper_step(_check_groups_args, static_argnames=("percentile",))
def few_shot_threshold(
    groups: Int[Array, " k"],
    *,
    mask: Bool[Array, " k"] | None = None,
    percentile: float = 0.15,
) -> Int[Array, ""]:
    """The tail cut-off ``K* = min(elbow(G), max_k_within_percentile(G))`` (``elbow(G)`` alone
    at ``percentile == 1``, as the official ``class_size.predict_max_K``). Images whose class
    size is ``<= K*`` form the tail.

    Raises:
        as :func:`max_k_within_percentile`.
    """
    e = elbow.unchecked(groups, mask=mask)
    if percentile >= 1.0:
        return e
    return jnp.minimum(e, max_k_within_percentile.unchecked(groups, mask=mask,
                                                            percentile=percentile))


# ------------------------------------------------------------------------------ 6. tail mask


class TailSamplerStatistics(NamedTuple):
    """Every intermediate of the TailSampler, in step order (a pytree).

    Attributes:
        similarity: ``(N, N)``. thresholds: ``(N,)`` (``+inf`` padded). class_sizes: ``(N,)``
        (NaN where no image selects it, 0 padded). groups / group_mask: ``(N,)`` int32 / bool.
        elbow, k_percentile, k_star: int32 scalars. tail_mask: ``(N,)`` bool.
    """

    similarity: Float[Array, "n n"]
    thresholds: Float[Array, " n"]
    class_sizes: Float[Array, " n"]
    groups: Int[Array, " n"]
    group_mask: Bool[Array, " n"]
    elbow: Int[Array, ""]
    k_percentile: Int[Array, ""]
    k_star: Int[Array, ""]
    tail_mask: Bool[Array, " n"]


@_paper_step(_check_sampler_args, static_argnames=("keep", "percentile", "similarity_rounding"))
def tail_sampler_statistics(
    embeddings: Float[Array, "n d"],
    *,
    keep: float = 0.85,
    percentile: float = 0.15,
    mask: Bool[Array, " n"] | None = None,
    similarity_rounding: str = "xla",
) -> TailSamplerStatistics:
    """Run the TailSampler and return every intermediate (see :func:`tail_sample_mask`)."""
    s = cosine_similarity_matrix.unchecked(embeddings, rounding=similarity_rounding)
    t = trim_min_thresholds.unchecked(s, keep=keep, mask=mask)
    sizes = predict_class_sizes.unchecked(s, t, mask=mask)
    groups, group_mask = group_class_sizes.unchecked(sizes, mask=mask)
    e = elbow.unchecked(groups, mask=group_mask)
    p = max_k_within_percentile.unchecked(groups, mask=group_mask, percentile=percentile)
    k_star = jnp.minimum(e, p) if percentile < 1.0 else e
    valid = jnp.ones(sizes.shape, bool) if mask is None else mask
    tail = valid & (sizes <= k_star.astype(jnp.float32))
    return TailSamplerStatistics(s, t, sizes, groups, group_mask, e, p, k_star, tail)


def tail_sample_mask(
    embeddings: Float[Array, "n d"],
    *,
    keep: float = 0.85,
    percentile: float = 0.15,
    mask: Bool[Array, " n"] | None = None,
    similarity_rounding: str = "xla",
) -> tuple[Bool[Array, " n"], Float[Array, " n"]]:
    """Tail (few-shot) images and predicted class sizes (variant ``ada_trim_min-mode``).

    Selects the images ``AdaptiveTailSampler('trim_min', 'mode').run(E)`` selects given the
    same float32 similarity matrix (``jnp.nonzero(tail)`` is the official ``idx``); with
    ``similarity_rounding="torch_cpu"`` that matrix is the official one too. One compilation
    per ``(N, D)``.

    Args:
        embeddings: ``(N, D)`` floating-point embeddings (computed in float32).
        keep: trim fraction in ``(0, 1]`` (static; official 0.85).
        percentile: tail fraction of the data in ``(0, 1]`` (static; official 0.15); at 1 the
            percentile rule is skipped, as in the official code.
        mask: ``(N,)`` bool, True = valid; padded images are never selected and get size 0.
        similarity_rounding: ``"xla"`` (default) or ``"torch_cpu"``: the rounding of the
            similarity matrix (see :func:`cosine_similarity_matrix`); ``"torch_cpu"`` selects
            exactly the official images and class sizes from the embeddings.

    Returns:
        ``(tail_mask (N,) bool, class_sizes (N,) float32)``.

    Raises:
        ValueError: rank not 2, ``N < 2`` (or fewer than 2 valid), ``N > MAX_IMAGES``,
            ``keep``/``percentile`` outside ``(0, 1]``; on concrete inputs, NaN/inf or an
            all-zero valid row (the official code raises ``IndexError``; under jit it votes
            for every image).
        TypeError: non-floating embeddings, non-bool mask, non-real keep/percentile.
    """
    stats = tail_sampler_statistics(embeddings, keep=keep, percentile=percentile, mask=mask,
                                    similarity_rounding=similarity_rounding)
    return stats.tail_mask, stats.class_sizes
