"""Patch scores -> full-resolution anomaly maps (bilinear upsampling + Gaussian smoothing).

JAX port of ``RescaleSegmentor.convert_to_segmentation`` in amazon-science/patchcore-inspection
``src/patchcore/common.py`` (used unchanged by jungyg/TailedCore): ``F.interpolate(bilinear,
align_corners=False)``, then ``scipy.ndimage.gaussian_filter(sigma=4)``. Both steps are linear
and separable: one host-built float64 matrix per axis (boundary extension folded in, any
radius), applied in float32 with ``precision=HIGHEST``.
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
    """``exp(-x**2 / (2 sigma**2))`` for ``|x| <= int(truncate * sigma + 0.5)``, normalized
    to sum 1 (float64): the taps of ``scipy.ndimage.gaussian_filter1d``.

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

    ``'symmetric'``: equals ``scipy.ndimage.gaussian_filter1d(x, sigma, mode='reflect',
    truncate=truncate)`` for any radius. ``'reflect'``: torch/kornia ``reflect`` (edge not
    repeated), extended periodically also beyond ``n - 1`` (where torch refuses the pad).
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

    ``'bilinear'`` (``align_corners=False``, no antialiasing): source ``(i + 0.5) * n_in /
    n_out - 0.5`` clamped at 0, neighbors ``floor`` and ``min(floor + 1, n_in - 1)``.
    ``'nearest'`` (torch legacy): source ``min(floor(i * n_in / n_out), n_in - 1)``.
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


def _check_map_args(patch_scores, out_size, sigma, truncate, padding, upsample):
    """Validate :func:`anomaly_maps`' arguments; returns ``(h, w, H, W, sigma, truncate)``."""
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
    return h, w, big_h, big_w, sigma, truncate


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

    ``maps = M_h @ scores @ M_w.T``, ``M = G @ A`` per axis: ``A`` torch's non-antialiased
    bilinear ``align_corners=False`` resampling (also when downsampling, unlike
    ``jax.image.resize``), ``G`` scipy's ``gaussian_filter1d``. Equal to the official
    ``RescaleSegmentor.convert_to_segmentation`` to float32 rounding.

    Args:
        patch_scores: ``(B, h, w)`` floating patch anomaly scores.
        out_size: output size, an int (square) or ``(H, W)``; static.
        sigma: Gaussian standard deviation in output pixels; ``0`` or ``None`` disables the
            smoothing. Static.
        truncate: kernel radius in units of sigma (scipy's ``truncate``). Static.
        padding: Gaussian boundary: ``'symmetric'`` (default, the official code) is scipy
            ``mode='reflect'`` (edge repeated), ``'reflect'`` is torch/anomalib ``reflect``
            (edge not repeated). Static.
        upsample: ``'bilinear'`` (default) or ``'nearest'`` (torch legacy ``nearest``:
            source ``floor(i * h / H)``). Static.

    Returns:
        ``(B, H, W)`` float32 anomaly maps.

    Raises:
        ValueError: rank not 3 or empty grid; non-positive ``out_size``; negative ``sigma``
            or non-positive ``truncate``; unknown ``padding``/``upsample``; NaN or inf scores
            (concrete inputs only).
        TypeError: non-floating ``patch_scores``; ``out_size`` not int/pair of ints.

    Examples:
        >>> import jax.numpy as jnp
        >>> anomaly_maps(jnp.zeros((2, 28, 28)), 224).shape
        (2, 224, 224)

    References:
        Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.
    """
    h, w, big_h, big_w, sigma, truncate = _check_map_args(
        patch_scores, out_size, sigma, truncate, padding, upsample
    )
    m_h = jnp.asarray(_axis_matrix(h, big_h, sigma, truncate, padding, upsample))
    m_w = jnp.asarray(_axis_matrix(w, big_w, sigma, truncate, padding, upsample))
    x = jnp.asarray(patch_scores, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    # Contract the smaller input axis first: (B, h, w) -> (B, h, W) -> (B, H, W).
    x = jnp.einsum("bhw,Ww->bhW", x, m_w, precision=hi)
    return jnp.einsum("Hh,bhW->bHW", m_h, x, precision=hi)
