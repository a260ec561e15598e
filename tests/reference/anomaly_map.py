"""Plain-numpy oracle for tailedcore_jax.anomaly_map (written from the torch definition)."""

import numpy as np


def bilinear_align_corners_false(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """torch ``F.interpolate(x, size, mode='bilinear', align_corners=False)`` on (B, h, w).

    For each output pixel: source coordinate ``(dst + 0.5) * in / out - 0.5`` clamped at 0
    per axis, neighbours ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``, weights
    ``1 - frac`` and ``frac``; the four neighbours are combined, pixel by pixel (float64).
    """
    x = np.asarray(x, np.float64)
    b, h, w = x.shape
    big_h, big_w = out_hw
    out = np.zeros((b, big_h, big_w))

    def src(dst, n_in, n_out):
        s = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(s)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, s - i0

    for i in range(big_h):
        y0, y1, ly = src(i, h, big_h)
        for j in range(big_w):
            x0, x1, lx = src(j, w, big_w)
            out[:, i, j] = (1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1]) + ly * (
                (1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]
            )
    return out


def nearest_legacy(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """torch ``F.interpolate(mode='nearest')``: source ``min(floor(dst * in / out), in - 1)``."""
    x = np.asarray(x, np.float64)
    _, h, w = x.shape
    rows = [min(int(np.floor(i * h / out_hw[0])), h - 1) for i in range(out_hw[0])]
    cols = [min(int(np.floor(j * w / out_hw[1])), w - 1) for j in range(out_hw[1])]
    return x[:, rows][:, :, cols]


def torch_reflect_gaussian(x: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Separable Gaussian (scipy taps) with numpy 'reflect' padding (torch/kornia style), (B,H,W).

    Requires radius < H and < W (numpy pads larger widths by repeated reflection as well,
    but torch would refuse).
    """
    r = int(truncate * sigma + 0.5)
    t = np.arange(-r, r + 1)
    k = np.exp(-0.5 * t**2 / sigma**2)
    k /= k.sum()
    x = np.asarray(x, np.float64)
    p = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="reflect")
    x = sum(k[i] * p[:, i : i + x.shape[1]] for i in range(2 * r + 1))
    p = np.pad(x, ((0, 0), (0, 0), (r, r)), mode="reflect")
    return sum(k[i] * p[:, :, i : i + x.shape[2]] for i in range(2 * r + 1))
