"""Patch scores -> full-resolution anomaly maps (bilinear upsampling + Gaussian smoothing).

JAX port of ``RescaleSegmentor.convert_to_segmentation`` in
amazon-science/patchcore-inspection (``src/patchcore/common.py``), which TailedCore
(jungyg/TailedCore) uses unchanged: ``F.interpolate(size, mode="bilinear",
align_corners=False)`` followed by ``scipy.ndimage.gaussian_filter(sigma=4)`` on every map.

Both steps are linear and separable, so each axis is one small constant matrix built on the
host from the static sizes: ``maps = M_h @ scores @ M_w.T`` with ``M = G @ A`` (``A``:
interpolation matrix, ``G``: Gaussian with the boundary extension folded in). The matrices
are computed in float64 and applied in float32 with ``precision=HIGHEST``. For 28 -> 224
this costs ~1.6 MFLOP per map, about the same as a 33-tap separable filter, and it handles
any radius (also one larger than the image) exactly like scipy.
"""

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from tailedcore_jax._validation import check_finite, check_floating, check_rank

__all__ = ["anomaly_maps", "gaussian_kernel1d", "gaussian_matrix", "resize_matrix"]


def _as_hw(out_size) -> tuple[int, int]:
    if isinstance(out_size, (int, np.integer)) and not isinstance(out_size, bool):
        hw = (int(out_size), int(out_size))
    elif isinstance(out_size, (tuple, list)) and len(out_size) == 2:
        if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in out_size):
            raise TypeError(f"out_size entries must be Python ints, got {out_size!r}")
        hw = (int(out_size[0]), int(out_size[1]))
    else:
        raise TypeError(f"out_size must be an int or a pair (H, W) of ints, got {out_size!r}")
    if hw[0] <= 0 or hw[1] <= 0:
        raise ValueError(f"out_size must be positive, got {hw}")
    return hw


def gaussian_kernel1d(sigma: float, *, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1-D Gaussian taps, identical to ``scipy.ndimage.gaussian_filter1d``'s.

    Radius ``int(truncate * sigma + 0.5)``; weights ``exp(-x**2 / (2 sigma**2))`` divided by
    their sum (float64, host side).

    Args:
        sigma: standard deviation in pixels, > 0.
        truncate: radius in units of ``sigma``, > 0.

    Returns:
        ``(2 r + 1,)`` float64 weights, centre at index ``r``.
    """
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 / float(sigma) ** 2 * x**2)
    return w / w.sum()


def _extend_index(idx: np.ndarray, n: int, padding: str) -> np.ndarray:
    """Map out-of-range indices into ``[0, n)`` by the periodic boundary extension."""
    if padding == "symmetric":
        # scipy mode='reflect' == numpy/jnp.pad 'symmetric': (d c b a | a b c d | d c b a),
        # period 2n; this also holds when the extension is longer than the line (checked
        # against scipy.ndimage.gaussian_filter1d in the tests).
        m = np.mod(idx, 2 * n)
        return np.where(m >= n, 2 * n - 1 - m, m)
    if padding == "reflect":
        # torch/kornia 'reflect' == jnp.pad 'reflect': (d c b | a b c d | c b a), period 2n-2.
        if n == 1:
            return np.zeros_like(idx)
        m = np.mod(idx, 2 * n - 2)
        return np.where(m >= n, 2 * n - 2 - m, m)
    raise ValueError(f"padding must be 'symmetric' or 'reflect', got {padding!r}")


def gaussian_matrix(
    n: int, sigma: float, *, truncate: float = 4.0, padding: str = "symmetric"
) -> np.ndarray:
    """``(n, n)`` float64 matrix ``G`` with ``G @ x`` = 1-D Gaussian filtering of ``x``.

    With ``padding='symmetric'`` this equals ``scipy.ndimage.gaussian_filter1d(x, sigma,
    mode='reflect', truncate=truncate)`` for any radius, including radii larger than ``n``.
    With ``padding='reflect'`` the boundary is torch/kornia ``reflect`` (edge not repeated),
    also extended periodically when the radius exceeds ``n - 1`` (torch itself would refuse
    such a pad).
    """
    w = gaussian_kernel1d(sigma, truncate=truncate)
    r = (len(w) - 1) // 2
    rows = np.arange(n)[:, None] + np.arange(-r, r + 1)[None, :]  # (n, 2r+1)
    cols = _extend_index(rows, n, padding)
    g = np.zeros((n, n), dtype=np.float64)
    np.add.at(g, (np.repeat(np.arange(n), 2 * r + 1), cols.ravel()), np.tile(w, n))
    return g


def resize_matrix(n_in: int, n_out: int, *, method: str = "bilinear") -> np.ndarray:
    """``(n_out, n_in)`` float64 matrix of 1-D torch ``F.interpolate`` resampling.

    ``'bilinear'`` follows ``align_corners=False`` without antialiasing, in both directions:
    source coordinate ``(i + 0.5) * n_in / n_out - 0.5`` clamped at 0, neighbours
    ``floor`` and ``min(floor + 1, n_in - 1)``. ``'nearest'`` is torch's legacy ``nearest``:
    source index ``min(floor(i * n_in / n_out), n_in - 1)``.
    """
    a = np.zeros((n_out, n_in), dtype=np.float64)
    i = np.arange(n_out)
    scale = n_in / n_out
    if method == "bilinear":
        src = np.maximum((i + 0.5) * scale - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        np.add.at(a, (i, i0), 1.0 - lam)
        np.add.at(a, (i, i1), lam)
    elif method == "nearest":
        a[i, np.minimum(np.floor(i * scale).astype(np.int64), n_in - 1)] = 1.0
    else:
        raise ValueError(f"upsample must be 'bilinear' or 'nearest', got {method!r}")
    return a


@functools.lru_cache(maxsize=64)
def _axis_matrix(n_in, n_out, sigma, truncate, padding, upsample) -> np.ndarray:
    m = resize_matrix(n_in, n_out, method=upsample)
    if sigma is not None and sigma != 0:
        m = gaussian_matrix(n_out, sigma, truncate=truncate, padding=padding) @ m
    return m.astype(np.float32)


def anomaly_maps(
    patch_scores: Float[Array, "b h w"],
    out_size: int | tuple[int, int],
    *,
    sigma: float | None = 4.0,
    truncate: float = 4.0,
    padding: Literal["symmetric", "reflect"] = "symmetric",
    upsample: Literal["bilinear", "nearest"] = "bilinear",
) -> Float[Array, "b H W"]:
    """Upsample patch scores to image size and smooth them with a Gaussian.

    JAX port of ``RescaleSegmentor.convert_to_segmentation`` in
    amazon-science/patchcore-inspection (used by jungyg/TailedCore): torch
    ``F.interpolate(mode='bilinear', align_corners=False)`` then
    ``scipy.ndimage.gaussian_filter(sigma=4)`` (``mode='reflect'``, ``truncate=4.0``).

    The resampling is implemented explicitly (not with ``jax.image.resize``), so it equals
    torch's non-antialiased ``align_corners=False`` bilinear interpolation when
    *downsampling* too; ``jax.image.resize`` antialiases when downsampling and would differ
    there (for upsampling the two agree). The Gaussian is separable, with scipy's taps
    (radius ``int(truncate * sigma + 0.5)``), applied along H and then W. Both steps are
    folded into one constant matrix per axis (float64 on the host, applied in float32 with
    ``precision=HIGHEST``); results equal scipy/torch to float32 rounding.

    Args:
        patch_scores: patch anomaly scores, shape ``(B, h, w)``, floating point.
        out_size: output size, an int (square) or ``(H, W)``; static.
        sigma: Gaussian standard deviation in output pixels; ``0`` or ``None`` disables the
            smoothing. Static.
        truncate: kernel radius in units of sigma (scipy's ``truncate``). Static.
        padding: boundary handling of the Gaussian. ``'symmetric'`` (default) is scipy
            ``mode='reflect'`` = ``jnp.pad(mode='symmetric')`` (edge pixel repeated), as in
            the official code. ``'reflect'`` is torch/kornia/anomalib ``reflect`` =
            ``jnp.pad(mode='reflect')`` (edge pixel not repeated). Both are extended
            periodically when the radius exceeds the image size (scipy does the same for its
            mode). Static.
        upsample: ``'bilinear'`` (default, see above) or ``'nearest'`` (torch legacy
            ``mode='nearest'``: source ``floor(i * h / H)``). Static.

    Returns:
        ``(B, H, W)`` float32 anomaly maps.

    Raises:
        ValueError: ``patch_scores`` not of rank 3 or empty spatially; non-positive
            ``out_size``; negative ``sigma`` or non-positive ``truncate``; unknown
            ``padding``/``upsample``; NaN or inf in ``patch_scores`` (this value check runs
            only on concrete inputs; under ``jit``/``vmap`` non-finite scores propagate to the
            maps).
        TypeError: non-floating ``patch_scores``; ``out_size`` not int/pair of ints.

    Examples:
        >>> import jax.numpy as jnp
        >>> anomaly_maps(jnp.zeros((2, 28, 28)), 224).shape
        (2, 224, 224)

    References:
        Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022,
        https://arxiv.org/abs/2106.08265.
    """
    check_rank("patch_scores", patch_scores, 3)
    check_floating("patch_scores", patch_scores)
    _, h, w = jnp.shape(patch_scores)
    if h == 0 or w == 0:
        raise ValueError(f"patch_scores must have a non-empty (h, w) grid, got shape {(h, w)}")
    big_h, big_w = _as_hw(out_size)
    if sigma is not None:
        sigma = float(sigma)
        if not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be >= 0 (0 or None: no smoothing), got {sigma}")
    truncate = float(truncate)
    if not math.isfinite(truncate) or truncate <= 0:
        raise ValueError(f"truncate must be > 0, got {truncate}")
    if padding not in ("symmetric", "reflect"):
        raise ValueError(f"padding must be 'symmetric' or 'reflect', got {padding!r}")
    if upsample not in ("bilinear", "nearest"):
        raise ValueError(f"upsample must be 'bilinear' or 'nearest', got {upsample!r}")
    check_finite("patch_scores", patch_scores)

    m_h = jnp.asarray(_axis_matrix(h, big_h, sigma, truncate, padding, upsample))
    m_w = jnp.asarray(_axis_matrix(w, big_w, sigma, truncate, padding, upsample))
    x = jnp.asarray(patch_scores, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    # Contract the smaller input axis first: (B, h, w) -> (B, h, W) -> (B, H, W).
    x = jnp.einsum("bhw,Ww->bhW", x, m_w, precision=hi)
    return jnp.einsum("Hh,bhW->bHW", m_h, x, precision=hi)
