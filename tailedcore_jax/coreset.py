"""Random projection and greedy k-center coreset selection (the memory subsampler).

JAX port of ``GreedyCoresetSampler`` with ``brute=True`` in ``src/sampler.py`` of
jungyg/TailedCore (itself derived from ``ApproximateGreedyCoresetSampler`` /
``GreedyCoresetSampler`` in amazon-science/patchcore-inspection ``src/patchcore/sampler.py``):

1. project the features with a random linear map to ``projection_dim`` (default 128);
2. start from one random valid row (kept in the coreset);
3. repeat ``num_samples - 1`` times: ``d = min(d, ||P - P[last]||)``, ``last = argmax(d)``.

The whole loop is one ``jax.lax.fori_loop`` that carries the min-distance vector and the
index buffer: no host round trip per step and no ``N x N`` matrix. Each step reads the
projected matrix once (a matrix-vector product), which makes the loop memory-bound; see
``benchmarks/bench_coreset.py`` and ``peers-and-performance.md`` section 5.1. For speed on
XLA:CPU the projected rows are stored transposed ``(p, n)`` and padded to a multiple of
1024 rows once before the loop, and the argmax is two-level (block maxima, then the first
block holding the maximum); each step is then a matvec, one fused elementwise update and
two small reductions (measured ~1.04x the time of a bare matvec over the matrix at
n = 200k, d = 128, and ~2x faster than the equivalent numpy loop).

Numerics (documented deviations from the official float32 torch loop):

* Distances are **squared** Euclidean, computed with the norm expansion
  ``||x||^2 - 2 x.c + ||c||^2`` from precomputed row norms and clamped at 0. ``sqrt`` is
  monotone, so ``min`` and ``argmax`` over squared distances select the same rows as over
  distances in exact arithmetic; in float32 the two formulas can disagree on near-ties
  (differences of a few ulps), so on real data a small fraction of the selected centres can
  differ from the torch loop while the covering radius stays the same to float32 accuracy.
  ``distance="difference"`` uses ``sum((x - c)^2)`` instead (about 2x slower on CPU, closer
  to the official rounding). With the expansion the ``||c||^2`` term is taken as
  ``2 x_c.c - ||x_c||^2`` so that rows bitwise equal to the centre get distance exactly 0.
* Rows already selected are excluded explicitly (their min distance is set to ``-inf``),
  so indices are unique as long as ``num_samples`` does not exceed the number of valid rows.
  The official loop can only re-select a row once every valid row is at distance 0 (more
  samples than distinct points); it then repeats the first such index, this port picks the
  first not-yet-selected row instead. Everywhere else the two agree.
* Opt-in ``storage_dtype=jnp.bfloat16`` / ``jnp.float16`` stores the projected matrix in
  16 bits (float32 accumulation): half the memory traffic per step, but it rounds the
  projected points and therefore changes which rows are selected. Off by default.

References:
    - Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (PatchCore),
      CVPR 2022, arXiv 2106.08265 (greedy coreset subsampling, section 3.2).
    - Sener & Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set
      Approach", ICLR 2018 (greedy k-center).
    - Jung et al., "TailedCore", CVPR 2025, arXiv 2504.02775; code ``jungyg/TailedCore``.
"""

import functools
from fractions import Fraction
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from tailedcore_jax import _validation as V

__all__ = [
    "CoresetSelection",
    "greedy_coreset",
    "greedy_coreset_masked",
    "random_projection",
]

_HIGHEST = jax.lax.Precision.HIGHEST
# Vectors longer than this use a two-level argmax (max per block of _ARGMAX_BLOCK, then the
# first block holding the maximum): XLA:CPU's variadic (value, index) reduction is not
# vectorised and costs ~0.9 ms on 200k floats, the two-level form ~0.04 ms.
_ARGMAX_BLOCK = 1024
_ARGMAX_TWO_LEVEL_MIN = 4 * _ARGMAX_BLOCK
# Largest denominator used to turn ``ratio`` into an exact fraction (keeps int32 exact).
_RATIO_MAX_DENOMINATOR = 1 << 15


class CoresetSelection(NamedTuple):
    """Result of :func:`greedy_coreset_masked` (a pytree; unpacks as ``indices, valid``).

    Attributes:
        indices: ``(capacity,)`` int32 row indices in selection order; ``indices[0]`` is the
            start. Entries past the valid count repeat the start index.
        valid: ``(capacity,)`` bool, True for the first ``count`` entries (the selection).
    """

    indices: jax.Array
    valid: jax.Array


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def random_projection(
    key: jax.Array,
    in_dim: int,
    out_dim: int,
    *,
    kind: Literal["uniform", "gaussian"] = "uniform",
) -> Float[Array, "in_dim out_dim"]:
    """Random linear map used to project features before the greedy coreset.

    With ``kind="uniform"`` (default) the entries are i.i.d. ``U(-1/sqrt(in_dim),
    1/sqrt(in_dim))``, the default initialisation of the official
    ``torch.nn.Linear(in_dim, out_dim, bias=False)`` (Kaiming-uniform with ``a=sqrt(5)``);
    the returned matrix is that layer's ``weight.T``, so ``features @ W`` equals the layer's
    output. ``kind="gaussian"`` draws ``N(0, 1/out_dim)`` entries, a Johnson-Lindenstrauss
    projection that preserves squared distances in expectation.

    Args:
        key: PRNG key.
        in_dim: input feature dimension (static).
        out_dim: projected dimension (static).
        kind: ``"uniform"`` (torch ``nn.Linear`` default) or ``"gaussian"`` (JL).

    Returns:
        ``(in_dim, out_dim)`` float32 matrix.

    Raises:
        ValueError: if a dimension is not a positive int or ``kind`` is unknown.

    Examples:
        >>> import jax
        >>> w = random_projection(jax.random.key(0), 1024, 128)
        >>> w.shape, bool(abs(w).max() <= 1 / 32)
        ((1024, 128), True)

    References:
        JAX port of the projection ``torch.nn.Linear(..., bias=False)`` built in
        ``GreedyCoresetSampler._reduce_features`` (jungyg/TailedCore ``src/sampler.py``).
    """
    for name, v in (("in_dim", in_dim), ("out_dim", out_dim)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    in_dim, out_dim = int(in_dim), int(out_dim)
    if kind == "uniform":
        bound = 1.0 / np.sqrt(in_dim)
        return jax.random.uniform(
            key, (in_dim, out_dim), jnp.float32, minval=-bound, maxval=bound
        )
    if kind == "gaussian":
        return jax.random.normal(key, (in_dim, out_dim), jnp.float32) / np.float32(
            np.sqrt(out_dim)
        )
    raise ValueError(f"kind must be 'uniform' or 'gaussian', got {kind!r}")


# ----------------------------------------------------------------------------------------
# The shared core: projection, start draw and the greedy loop.
# ----------------------------------------------------------------------------------------


def _first_argmax(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(max, first index of the max)`` of a 1-D vector; the length is a multiple of the
    block when it is above ``_ARGMAX_TWO_LEVEL_MIN`` (see ``_padded_len``)."""
    n = v.shape[0]
    if n < _ARGMAX_TWO_LEVEL_MIN:
        i = jnp.argmax(v).astype(jnp.int32)
        return v[i], i
    blocks = v.reshape(n // _ARGMAX_BLOCK, _ARGMAX_BLOCK)
    # The first block whose maximum is the global maximum holds the first global argmax.
    b = jnp.argmax(jnp.max(blocks, axis=1)).astype(jnp.int32)
    row = jax.lax.dynamic_index_in_dim(blocks, b, axis=0, keepdims=False)
    j = jnp.argmax(row).astype(jnp.int32)
    return row[j], b * _ARGMAX_BLOCK + j


def _padded_len(n: int) -> int:
    if n < _ARGMAX_TWO_LEVEL_MIN:
        return n
    return -(-n // _ARGMAX_BLOCK) * _ARGMAX_BLOCK


def _random_start(key, row_ok, n: int) -> jax.Array:
    """Uniform draw over the valid rows: the r-th valid row with r ~ U{0..count-1}.

    Unmasked and masked calls use the same arithmetic, so a masked call starts at the row
    that an unmasked call on the valid rows alone starts at (mapped back)."""
    if row_ok is None:
        count = jnp.int32(n)
    else:
        count = jnp.sum(row_ok, dtype=jnp.int32)
    r = jax.random.randint(key, (), 0, jnp.maximum(count, 1), dtype=jnp.int32)
    if row_ok is None:
        return r
    return jnp.argmax(jnp.cumsum(row_ok, dtype=jnp.int32) > r).astype(jnp.int32)


def _greedy_loop(xs, sq, ok, start, num_steps, *, capacity: int, distance: str):
    """Greedy k-center loop. Returns ``(capacity,)`` int32 indices; entries at positions
    ``>= num_steps`` (static or traced) keep the start index.

    Args:
        xs: projected rows (float32 or the 16-bit storage dtype), masked rows 0, in the
            layout of ``_stored_layout(distance)``: ``(p, n)`` (transposed) for the
            expansion, where the per-step product ``c @ xs`` streams contiguous length-n
            rows into an n-vector that stays in cache (~35-45 % less time than ``x @ c``
            on (n, p) at n = 200k on XLA:CPU); ``(n, p)`` for the difference form, whose
            row-wise ``sum((x - c)^2)`` XLA:CPU fuses into one pass (the column-wise
            version on (p, n) is ~50x slower).
        sq: ``(n_pad,)`` float32 squared norms of the stored rows.
        ok: ``(n_pad,)`` bool, True for valid rows (False for masked and block padding).
        start: int32 scalar.
        num_steps: number of selections (<= capacity), int or int32 scalar.
    """
    transposed = _stored_layout(distance) == "pn"
    # Masked rows and the block padding start at -inf: min() keeps them there, so they
    # are never selected.
    min_d = jnp.where(ok, jnp.inf, -jnp.inf).astype(jnp.float32)
    min_d = min_d.at[start].set(-jnp.inf)
    idx = jnp.full((capacity,), start, jnp.int32)

    def body(i, carry):
        idx, min_d, last = carry
        c = jax.lax.dynamic_index_in_dim(xs, last, axis=1 if transposed else 0, keepdims=False)
        if distance == "expansion":
            # ||x||^2 - 2 x.c + ||c||^2 with ||c||^2 replaced by 2 c.c - ||c||^2 taken from
            # the same products: (a - 2t) + (2t - a) == 0 exactly, so rows bitwise equal to
            # the centre get distance 0 as in the difference form.
            dot = jnp.dot(c, xs, precision=_HIGHEST, preferred_element_type=jnp.float32)
            t = jax.lax.dynamic_index_in_dim(dot, last, keepdims=False)
            s = jax.lax.dynamic_index_in_dim(sq, last, keepdims=False)
            dist = (sq - 2.0 * dot) + (2.0 * t - s)
        else:
            diff = xs.astype(jnp.float32) - c.astype(jnp.float32)[None, :]
            dist = jnp.sum(diff * diff, axis=1)
        # Cancellation can make the expansion slightly negative: clamp before comparing.
        dist = jnp.maximum(dist, 0.0)
        min_d = jnp.minimum(min_d, dist)
        _, nxt = _first_argmax(min_d)
        min_d = min_d.at[nxt].set(-jnp.inf)  # never select a row twice
        return idx.at[i].set(nxt), min_d, nxt

    idx, _, _ = jax.lax.fori_loop(1, num_steps, body, (idx, min_d, start))
    return idx


# The work is split into jitted pieces so that eager calls reuse compilations (threefry
# draws are slow to compile on CPU): the key split and projection matrix compile once per
# (D, p), the projection and start draw once per (n, D, p), the loop once per
# (n, p, capacity, ...). Under an outer jit/vmap they are all inlined into one program.


@functools.partial(jax.jit, static_argnames=("in_dim", "out_dim"))
def _split_and_draw(key, *, in_dim, out_dim):
    """``key_proj, key_start = split(key)``; the projection matrix from ``key_proj``."""
    key_proj, key_start = jax.random.split(key)
    w = None if out_dim is None else random_projection(key_proj, in_dim, out_dim)
    return key_start, w


def _stored_layout(distance: str) -> str:
    return "pn" if distance == "expansion" else "np"


@functools.partial(jax.jit, static_argnames=("storage_dtype", "layout"))
def _prepare(key_start, features, row_ok, start_index, w, *, storage_dtype, layout):
    """Projected rows (masked rows zeroed, padded to ``n_pad = _padded_len(n)`` rows) in
    ``layout`` ("pn": transposed ``(p, n_pad)``, "np": ``(n_pad, p)``), their squared
    norms ``(n_pad,)``, the validity ``(n_pad,)`` and the start index."""
    x = features.astype(jnp.float32)
    if w is not None:
        x = jnp.dot(x, w.astype(jnp.float32), precision=_HIGHEST)
    if row_ok is not None:
        x = jnp.where(row_ok[:, None], x, 0.0)  # padded rows may hold anything (NaN)
    if storage_dtype is not None:
        x = x.astype(storage_dtype)
    # Pad the rows to a multiple of the argmax block once here, so the loop body has no
    # pad (a pad inside the per-step fusion costs ~10 % at n = 200k); padded rows are 0.
    n = x.shape[0]
    n_pad = _padded_len(n)
    x = jnp.pad(x, ((0, n_pad - n), (0, 0)))
    ok = jnp.arange(n_pad) < n
    if row_ok is not None:
        ok = ok & jnp.pad(row_ok, (0, n_pad - n))
    xf = x.astype(jnp.float32)
    sq = jnp.sum(xf * xf, axis=1)
    xs = x.T if layout == "pn" else x
    if start_index is None:
        start = _random_start(key_start, row_ok, features.shape[0])
    else:
        start = jnp.asarray(start_index, jnp.int32)
    return xs, sq, ok, start


@functools.partial(jax.jit, static_argnames=("capacity", "distance", "ratio_frac"))
def _select(xs, sq, ok, start, num_valid, *, capacity, distance, ratio_frac):
    """Count of selections and the greedy loop. Returns ``(indices (capacity,), count)``.

    ``ratio_frac=(a, b)``: count = floor(a/b * M); ``num_valid``: count = num_valid;
    neither: the static count ``capacity`` (a fixed trip count).
    """
    total = jnp.sum(ok, dtype=jnp.int32)
    if ratio_frac is not None:
        a, b = ratio_frac
        # floor(total * a / b) in exact int32 arithmetic (a <= b <= 2**15).
        count = (total // b) * a + ((total % b) * a) // b
        count = jnp.where(total > 0, jnp.maximum(count, 1), 0)
        count = jnp.minimum(count, capacity)
        num_steps = count
    elif num_valid is not None:
        count = jnp.clip(jnp.asarray(num_valid, jnp.int32), 0, jnp.minimum(total, capacity))
        num_steps = count
    else:
        count = jnp.int32(capacity)
        num_steps = capacity  # static trip count
    idx = _greedy_loop(xs, sq, ok, start, num_steps, capacity=capacity, distance=distance)
    return idx, count


def _coreset_core(key, features, row_ok, start_index, projection, num_valid, *, capacity,
                  projection_dim, storage_dtype, distance, ratio_frac):
    """Shared implementation of :func:`greedy_coreset` and :func:`greedy_coreset_masked`."""
    d_in = features.shape[1]
    out_dim = None
    if projection is None and projection_dim is not None and projection_dim != d_in:
        out_dim = projection_dim
    key_start, w = _split_and_draw(key, in_dim=d_in, out_dim=out_dim)
    if projection is not None:
        w = projection
    xs, sq, ok, start = _prepare(key_start, features, row_ok, start_index, w,
                                 storage_dtype=storage_dtype, layout=_stored_layout(distance))
    return _select(
        xs, sq, ok, start, num_valid, capacity=capacity, distance=distance,
        ratio_frac=ratio_frac,
    )


# ----------------------------------------------------------------------------------------
# Argument checks shared by the two public functions.
# ----------------------------------------------------------------------------------------


def _host_check_finite_rows(name, features, mask):
    """NaN/inf check of the valid rows of concrete inputs (skipped under tracing)."""
    if V.is_concrete(features) and (mask is None or V.is_concrete(mask)):
        rows = np.asarray(features)
        if mask is not None:
            rows = rows[np.asarray(mask)]
        V.check_finite(name, rows)


def _check_common(features, mask, projection_dim, projection, start_index, storage_dtype,
                  distance, *, check_finite_rows=_host_check_finite_rows):
    V.check_rank("features", features, 2)
    V.check_floating("features", features)
    n, d_in = features.shape
    if n == 0 or d_in == 0:
        raise ValueError(f"features is empty: shape {features.shape}")
    V.check_mask("mask", mask, n)
    if projection_dim is not None and (not _is_int(projection_dim) or projection_dim < 1):
        raise ValueError(f"projection_dim must be None or a positive int, got {projection_dim!r}")
    if projection is not None:
        V.check_rank("projection", projection, 2)
        V.check_floating("projection", projection)
        if projection.shape[0] != d_in:
            raise ValueError(
                f"projection must have shape ({d_in}, p) to match features {features.shape}, "
                f"got {projection.shape}"
            )
        V.check_finite("projection", projection)
    if storage_dtype is not None:
        storage_dtype = jnp.dtype(storage_dtype)
        if storage_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                 jnp.dtype(jnp.float16)):
            raise TypeError(
                f"storage_dtype must be None, float32, bfloat16 or float16, got {storage_dtype}"
            )
        if storage_dtype == jnp.dtype(jnp.float32):
            storage_dtype = None
    if distance not in ("expansion", "difference"):
        raise ValueError(f"distance must be 'expansion' or 'difference', got {distance!r}")
    # Value checks (only possible on concrete arrays; skipped under jit/vmap tracing).
    check_finite_rows("features (valid rows)", features, mask)
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
    if not _is_int(value):
        raise TypeError(f"{name} must be a Python int (static), got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if value > n:
        raise ValueError(f"{name}={value} exceeds the number of rows {n}")
    return int(value)


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
) -> Int[Array, " num_samples"]:
    """Greedy k-center coreset: ``num_samples`` row indices in selection order.

    Exact (brute-force) greedy farthest-point selection in the projected space:
    ``indices[0]`` is the start, and each next index is the valid row farthest (Euclidean)
    from all rows selected so far, ties broken by the first index. The min-distance vector
    starts at ``+inf`` (``-inf`` for masked rows, which are never selected), and one
    ``lax.fori_loop`` step costs one matrix-vector product over the projected rows.

    Randomness: ``key_proj, key_start = jax.random.split(key)``; ``key_proj`` draws the
    projection (:func:`random_projection` with ``kind="uniform"``) and ``key_start`` the
    start (uniform over the valid rows). Same key, same inputs -> same indices.

    Args:
        key: PRNG key (first positional argument).
        features: ``(n, D)`` float features (e.g. 1024-d patch features).
        num_samples: number of rows to select, static; with a traced ``mask`` it is a
            capacity (use :func:`greedy_coreset_masked` for a validity mask).
        mask: optional ``(n,)`` bool, True for valid rows. The result equals running on
            ``features[mask]`` alone and mapping the indices back (same key).
        projection_dim: projected dimension (static). No projection when it is None or
            equals ``D`` (as the official sampler, which skips 128-d inputs).
        projection: optional explicit ``(D, p)`` projection matrix; overrides
            ``projection_dim`` (use it to share a matrix with an external reference).
        start_index: optional start row (int or int32 scalar, may be traced); overrides
            the random start.
        storage_dtype: None (float32, default), ``jnp.bfloat16`` or ``jnp.float16``:
            dtype in which the projected rows are stored during the loop (float32
            accumulation). 16-bit halves the memory traffic per step but rounds the points
            and changes the selection; opt-in only.
        distance: ``"expansion"`` (default, ``||x||^2 - 2 x.c + ||c||^2``) or
            ``"difference"`` (``sum((x - c)^2)``, slower, closer to torch's rounding).

    Returns:
        ``(num_samples,)`` int32 indices into the rows of ``features``, in selection order,
        unique while ``num_samples`` does not exceed the number of valid rows.

    Raises:
        ValueError: rank/shape mismatch, empty features, ``num_samples < 1`` or larger than
            ``n``, bad ``projection_dim``/``projection``/``distance``, a non-scalar
            ``start_index``; and, on concrete (non-traced) inputs only: ``num_samples``
            larger than the number of valid rows, NaN/inf in the valid rows of
            ``features``, ``start_index`` out of range or on a masked row.
        TypeError: non-float ``features``, non-bool ``mask``, non-int ``num_samples`` or
            ``start_index``, unsupported ``storage_dtype``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.array([[0.0], [1.0], [10.0], [4.0]])
        >>> greedy_coreset(jax.random.key(0), x, 3, projection_dim=None, start_index=0)
        Array([0, 2, 3], dtype=int32)

    References:
        JAX port of ``GreedyCoresetSampler._compute_greedy_coreset_indices`` (``brute=True``)
        in jungyg/TailedCore ``src/sampler.py``; PatchCore (arXiv 2106.08265), section 3.2.
    """
    features = jnp.asarray(features)
    if mask is not None:
        mask = jnp.asarray(mask)
    storage_dtype = _check_common(
        features, mask, projection_dim, projection, start_index, storage_dtype, distance
    )
    n = features.shape[0]
    num_samples = _check_capacity("num_samples", num_samples, n)
    count = V.concrete_count(mask, n)
    if count is not None and num_samples > count:
        raise ValueError(f"num_samples={num_samples} exceeds the number of valid rows {count}")
    idx, _ = _coreset_core(
        key,
        features,
        mask,
        start_index,
        projection,
        None,
        capacity=num_samples,
        projection_dim=projection_dim,
        storage_dtype=storage_dtype,
        distance=distance,
        ratio_frac=None,
    )
    return idx


def _ratio_fraction(ratio) -> tuple[int, int]:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating, np.integer)):
        raise TypeError(f"ratio must be a Python float, got {type(ratio).__name__}")
    ratio = float(ratio)
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    frac = Fraction(ratio).limit_denominator(_RATIO_MAX_DENOMINATOR)
    if abs(float(frac) - ratio) > 1e-12 * ratio:
        raise ValueError(
            f"ratio={ratio!r} is not a fraction a/b with b <= {_RATIO_MAX_DENOMINATOR}; "
            "pass num_valid= instead"
        )
    return frac.numerator, frac.denominator


def _check_masked(features, mask, capacity, ratio, num_valid, projection_dim, projection,
                  start_index, storage_dtype, distance, *,
                  check_finite_rows=_host_check_finite_rows):
    """Validation shared by the masked coreset (single device and sharded).

    ``check_finite_rows`` is the NaN/inf check of the valid rows (the sharded module passes
    one that stays on device). Returns ``(storage_dtype, capacity,
    ratio_frac)``; ``ratio_frac`` is None when the count comes from ``num_valid``.
    """
    storage_dtype = _check_common(
        features, mask, projection_dim, projection, start_index, storage_dtype, distance,
        check_finite_rows=check_finite_rows,
    )
    n = features.shape[0]
    capacity = _check_capacity("capacity", capacity, n)
    if ratio is not None and num_valid is not None:
        raise ValueError("give either ratio or num_valid, not both")
    ratio_frac = None
    if num_valid is None:
        ratio_frac = _ratio_fraction(0.1 if ratio is None else ratio)
    else:
        if jnp.ndim(num_valid) != 0:
            raise ValueError(f"num_valid must be a scalar, got shape {jnp.shape(num_valid)}")
        if not jnp.issubdtype(jnp.result_type(num_valid), jnp.integer):
            raise TypeError(f"num_valid must be an integer, got {jnp.result_type(num_valid)}")
    total = V.concrete_count(mask, n)
    if total is not None:
        if total == 0:
            raise ValueError("mask selects no rows: cannot build a coreset of an empty set")
        if ratio_frac is not None:
            a, b = ratio_frac
            want = max(1, total * a // b)
            if want > capacity:
                raise ValueError(
                    f"ratio selects {want} of {total} valid rows, more than capacity={capacity}"
                )
    if num_valid is not None and V.is_concrete(num_valid):
        k = int(np.asarray(num_valid))
        if k < 0:
            raise ValueError(f"num_valid must be >= 0, got {k}")
        if k > capacity:
            raise ValueError(f"num_valid={k} exceeds capacity={capacity}")
        if total is not None and k > total:
            raise ValueError(f"num_valid={k} exceeds the number of valid rows {total}")
    return storage_dtype, capacity, ratio_frac


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
) -> CoresetSelection:
    """Greedy coreset of a padded set: fixed ``capacity`` output plus a validity mask.

    Made for ``jax.vmap`` over classes padded to one row capacity: ``capacity`` is static,
    the number of selected rows is dynamic, so all classes share one compilation. The
    selection is :func:`greedy_coreset` on the valid rows (same key -> same indices),
    truncated to ``count``:

    * ``ratio`` (default 0.1 when ``num_valid`` is None):
      ``count = floor(ratio * M)`` with ``M = mask.sum()``, the official size
      ``int(percentage * len(features))`` (start included), but at least 1 when ``M > 0``
      (the official loop also returns its start) and at most ``capacity``. The ratio is
      turned into an exact fraction ``a/b`` (``b <= 2**15``, e.g. 0.1 -> 1/10) and the
      floor is taken in integer arithmetic, which equals Python's ``int(0.1 * M)`` for
      every ``M``.
    * ``num_valid`` (int or traced int32 scalar): ``count = clip(num_valid, 0, min(M,
      capacity))``.

    Entries past ``count`` are marked ``valid == False`` and hold the start index (a valid
    row when ``M > 0``, so a gather stays in range); they must be dropped with ``valid``.
    With an all-False mask (possible under vmap) every entry is invalid and the indices are
    0. The loop runs ``count - 1`` steps (a ``while`` loop; under ``vmap`` it runs the
    classes' maximum).

    Args:
        key: PRNG key (first positional argument); use ``jax.random.fold_in(key, class)``
            per class.
        features: ``(n, D)`` float features of one class, padded to ``n``.
        capacity: static output length (``1 <= capacity <= n``).
        mask: ``(n,)`` bool, True for valid rows (required; padded rows may hold anything).
        ratio: fraction of valid rows to select (static float in ``(0, 1]``).
        num_valid: explicit number of rows to select (overrides ``ratio``; give only one).
        projection_dim, projection, start_index, storage_dtype, distance: as in
            :func:`greedy_coreset`.

    Returns:
        :class:`CoresetSelection` ``(indices (capacity,) int32, valid (capacity,) bool)``;
        ``valid`` is True exactly for the first ``count`` entries.

    Raises:
        ValueError: as :func:`greedy_coreset`, plus both ``ratio`` and ``num_valid`` given,
            ``ratio`` outside ``(0, 1]`` or not a small-denominator fraction; and, on
            concrete inputs only: an all-False ``mask``, a count (from ``ratio`` or
            ``num_valid``) larger than ``capacity``, ``num_valid`` negative or larger
            than the number of valid rows. Under tracing the count is clipped instead.
        TypeError: as :func:`greedy_coreset`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.array([[0.0], [1.0], [10.0], [4.0], [99.0]])
        >>> m = jnp.array([True, True, True, True, False])
        >>> sel = greedy_coreset_masked(jax.random.key(0), x, 3, mask=m, num_valid=2,
        ...                             projection_dim=None, start_index=0)
        >>> sel.indices, sel.valid
        (Array([0, 2, 0], dtype=int32), Array([ True,  True, False], dtype=bool))

    References:
        JAX port of ``GreedyCoresetSampler.run`` (``brute=True``, ``percentage``) in
        jungyg/TailedCore ``src/sampler.py``.
    """
    features = jnp.asarray(features)
    if mask is None:
        raise ValueError("greedy_coreset_masked needs a mask; use greedy_coreset without one")
    mask = jnp.asarray(mask)
    storage_dtype, capacity, ratio_frac = _check_masked(
        features, mask, capacity, ratio, num_valid, projection_dim, projection, start_index,
        storage_dtype, distance,
    )
    idx, count = _coreset_core(
        key,
        features,
        mask,
        start_index,
        projection,
        num_valid,
        capacity=capacity,
        projection_dim=projection_dim,
        storage_dtype=storage_dtype,
        distance=distance,
        ratio_frac=ratio_frac,
    )
    valid = jnp.arange(capacity, dtype=jnp.int32) < count
    return CoresetSelection(indices=idx, valid=valid)
