"""Input checks shared by the numeric modules.

Shape, rank and dtype checks run at trace time (they only read static shapes), so they
work under ``jax.jit`` and ``jax.vmap``. Value checks (NaN/inf, counts that depend on a
mask) can only run on concrete arrays: they are skipped on tracers, and each public
function documents which of its checks are of that kind.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` holds actual values (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_rank(name: str, x, rank: int) -> None:
    if jnp.ndim(x) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {jnp.shape(x)}")


def check_floating(name: str, x) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def check_finite(name: str, x) -> None:
    """Raise ``ValueError`` if a concrete ``x`` holds NaN or inf (no-op on tracers)."""
    if is_concrete(x):
        arr = np.asarray(x)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(np.isinf(arr).sum())
            raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} inf)")


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
