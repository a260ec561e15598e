"""Every input check shared by the numeric modules, written once.

Shape, rank and dtype checks read static shapes only, so they run at trace time and work under
``jax.jit`` and ``jax.vmap``. Value checks (NaN/inf, counts behind a mask) need concrete arrays:
they are skipped on tracers, and each public function documents which of its checks are of
that kind.

The ratio -> count rule of the coresets (:func:`ratio_fraction`, :func:`ratio_count`,
:func:`traced_ratio_count`) also lives here: one rule, ``int(ratio * M)`` in Python float64
arithmetic as the official sampler computes it, for static and traced ``M`` alike.
"""

import functools
import numbers
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

#: Largest denominator of the exact fraction a ratio is turned into (keeps int32 exact).
RATIO_MAX_DENOMINATOR = 1 << 15


def is_concrete(x) -> bool:
    """True when ``x`` holds actual values (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


# ---------------------------------------------------------------------------- static values


def static_int(name: str, value, *, minimum: int | None = None) -> int:
    """``value`` as a Python int (a static argument); ``TypeError`` for bools, floats, arrays."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int (static), got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def unit_fraction(name: str, value, *, closed_low: bool = False, closed_high: bool = True) -> float:
    """``value`` as a Python float fraction in ``(0, 1]`` (``[0, 1)`` etc. by the flags)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float fraction (static), got {type(value).__name__}")
    value = float(value)
    low_ok = value >= 0.0 if closed_low else value > 0.0
    high_ok = value <= 1.0 if closed_high else value < 1.0
    if not (low_ok and high_ok):
        interval = ("[" if closed_low else "(") + "0, 1" + ("]" if closed_high else ")")
        raise ValueError(f"{name} must be a fraction in {interval}, got {value!r}")
    return value


# ---------------------------------------------------------------------------- array shapes


def check_rank(name: str, x, rank: int) -> None:
    if jnp.ndim(x) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {jnp.shape(x)}")


def check_floating(name: str, x) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def check_mask(name: str, mask, n: int) -> None:
    if mask is None:
        return
    if jnp.shape(mask) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {jnp.shape(mask)}")
    if jnp.result_type(mask) != jnp.bool_:
        raise TypeError(f"{name} must be boolean, got dtype {jnp.result_type(mask)}")


def concrete_count(mask, n: int) -> int | None:
    """Number of True entries of a concrete mask (``n`` when mask is None), else None."""
    if mask is None:
        return n
    if is_concrete(mask):
        return int(np.asarray(mask).sum())
    return None


# ---------------------------------------------------------------------------- values


def check_finite(name: str, x) -> None:
    """``ValueError`` if a concrete ``x`` holds NaN or inf (no-op on tracers). Small arrays."""
    if is_concrete(x):
        arr = np.asarray(x)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(np.isinf(arr).sum())
            raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} inf)")


@jax.jit
def _valid_rows_finite(x, mask):
    # x * 0 is 0 for finite entries and NaN for NaN/inf, and a sum propagates NaN: one fused
    # reduction with no x-sized temporary (jnp.all(jnp.isfinite(x)) materialised a boolean
    # copy on XLA:CPU, and a max-reduction does not propagate NaN).
    a = x * jnp.zeros((), x.dtype)
    if mask is not None:
        a = jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), a, 0.0)
    return jnp.sum(a) == 0.0


def check_finite_rows(name: str, x, mask=None) -> None:
    """``ValueError`` if a concrete ``x`` has NaN/inf where ``mask`` (over its leading axes) is
    True. Runs on the device as one fused reduction, so a multi-GB array needs no host copy and
    no temporary; no-op when ``x`` or ``mask`` is a tracer."""
    if not is_concrete(x) or (mask is not None and not is_concrete(mask)):
        return
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact) or jnp.size(x) == 0:
        return
    ok = _valid_rows_finite(jnp.asarray(x), None if mask is None else jnp.asarray(mask))
    if is_concrete(ok) and not bool(ok):  # inside an outer trace ok is a tracer
        bad = np.asarray(x)
        if mask is not None:
            bad = bad[np.asarray(mask)]
        n_nan, n_inf = int(np.isnan(bad).sum()), int(np.isinf(bad).sum())
        raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} inf)")


# ---------------------------------------------------------------------------- ratio -> count


def ratio_fraction(ratio) -> tuple[int, int]:
    """``ratio`` in ``(0, 1]`` as an exact fraction ``(a, b)``, ``b <= RATIO_MAX_DENOMINATOR``."""
    ratio = unit_fraction("ratio", ratio)
    frac = Fraction(ratio).limit_denominator(RATIO_MAX_DENOMINATOR)
    if abs(float(frac) - ratio) > 1e-12 * ratio:
        raise ValueError(
            f"ratio={ratio!r} is not a fraction a/b with b <= {RATIO_MAX_DENOMINATOR}; "
            "pass an explicit count instead"
        )
    return frac.numerator, frac.denominator


def ratio_count(ratio: float, total: int) -> int:
    """Rows a coreset of ``ratio`` keeps of ``total`` candidates: ``int(ratio * total)`` (the
    official ``GreedyCoresetSampler`` size, start included), at least 1 when ``total > 0``."""
    ratio_fraction(ratio)  # same domain as the traced rule
    total = int(total)
    return 0 if total <= 0 else max(1, int(ratio * total))


@functools.lru_cache(maxsize=64)
def _ratio_corrections(ratio: float, max_total: int) -> tuple[np.ndarray, np.ndarray]:
    """Totals ``M <= max_total`` where the float64 ``int(ratio * M)`` differs from the exact
    ``floor(a M / b)``, and the difference there (+-1). A sentinel closes the table."""
    a, b = ratio_fraction(ratio)
    m = np.arange(max_total + 1, dtype=np.int64)
    delta = np.floor(ratio * m.astype(np.float64)).astype(np.int64) - (m * a) // b
    where = np.nonzero(delta)[0]
    keys = np.append(m[where], np.iinfo(np.int32).max).astype(np.int32)
    return keys, np.append(delta[where], 0).astype(np.int32)


def traced_ratio_count(ratio: float, total, *, max_total: int, capacity: int):
    """:func:`ratio_count` for a traced int32 ``total <= max_total``, clipped to ``capacity``.

    ``floor(a * total / b)`` in exact int32 arithmetic, then corrected at the (rare, for 0.1
    none) totals where Python's float64 product rounds across an integer.
    """
    a, b = ratio_fraction(ratio)
    total = jnp.asarray(total, jnp.int32)
    count = (total // b) * a + ((total % b) * a) // b
    keys, deltas = _ratio_corrections(float(ratio), int(max_total))
    if keys.shape[0] > 1:
        i = jnp.clip(jnp.searchsorted(jnp.asarray(keys), total), 0, keys.shape[0] - 1)
        count = count + jnp.where(jnp.asarray(keys)[i] == total, jnp.asarray(deltas)[i], 0)
    count = jnp.where(total > 0, jnp.maximum(count, 1), 0)
    return jnp.minimum(count, capacity)
