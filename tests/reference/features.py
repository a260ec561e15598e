"""Plain-numpy oracle of the PatchCore / TailedCore patch-feature aggregation.

Written step by step in the official order, with loops and float64 arithmetic. It is the
reference for ``tailedcore_jax.features``; it deliberately does NOT use the tricks of the JAX
implementation (pooling before resizing, banded depthwise sums): it materialises the full
unfolded (C, p, p) neighbourhoods, resizes every (channel, ky, kx) slice of the later layers
to the first layer's grid, flattens channel-major and adaptive-average-pools, exactly as
``FeatureEmbedder.forward`` in jungyg/TailedCore (PatchCore's ``PatchMaker.patchify``,
``MeanMapper``, ``Aggregator``) does.

All inputs are NHWC numpy arrays; outputs are float64.
"""

from __future__ import annotations

import math

import numpy as np


def adaptive_pool_bins(length: int, out: int) -> list[tuple[int, int]]:
    """PyTorch ``adaptive_avg_pool1d`` bins: bin i spans [floor(i*L/out), ceil((i+1)*L/out))."""
    bins = []
    for i in range(out):
        start = math.floor(i * length / out)
        end = math.ceil((i + 1) * length / out)
        # Use exact integer arithmetic to guard against float rounding for big L.
        start_int = (i * length) // out
        end_int = -((-(i + 1) * length) // out)
        assert (start, end) == (start_int, end_int)
        bins.append((start_int, end_int))
    return bins


def adaptive_avg_pool1d(x: np.ndarray, out: int) -> np.ndarray:
    """Adaptive average pooling of the last axis of ``x`` to ``out`` values (loops over bins)."""
    x = np.asarray(x, np.float64)
    length = x.shape[-1]
    res = np.empty(x.shape[:-1] + (out,), np.float64)
    for i, (s, e) in enumerate(adaptive_pool_bins(length, out)):
        acc = np.zeros(x.shape[:-1], np.float64)
        for j in range(s, e):
            acc = acc + x[..., j]
        res[..., i] = acc / (e - s)
    return res


def patchify(x: np.ndarray, patch_size: int = 3) -> np.ndarray:
    """``torch.nn.Unfold(k=p, stride=1, padding=(p-1)//2)`` of an NHWC map.

    Returns (B, h', w', C, p, p) with h' = h + 2*pad - p + 1: element [b, y, x, c, ky, kx] is
    the zero-padded input at (y + ky - pad, x + kx - pad), channel c.
    """
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    pad = (patch_size - 1) // 2
    ho = h + 2 * pad - patch_size + 1
    wo = w + 2 * pad - patch_size + 1
    out = np.zeros((b, ho, wo, c, patch_size, patch_size), np.float64)
    for y in range(ho):
        for xx in range(wo):
            for ky in range(patch_size):
                for kx in range(patch_size):
                    sy = y + ky - pad
                    sx = xx + kx - pad
                    if 0 <= sy < h and 0 <= sx < w:
                        out[:, y, xx, :, ky, kx] = x[:, sy, sx, :]
    return out


def _torch_linear_taps(in_size: int, out_size: int):
    """Source indices and weights of torch bilinear interpolation, align_corners=False."""
    scale = in_size / out_size
    taps = []
    for d in range(out_size):
        src = (d + 0.5) * scale - 0.5
        if src < 0:
            src = 0.0
        i0 = math.floor(src)
        i0 = min(i0, in_size - 1)
        i1 = i0 + 1 if i0 < in_size - 1 else i0
        lam1 = src - i0
        taps.append((i0, i1, 1.0 - lam1, lam1))
    return taps


def resize_bilinear(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(mode='bilinear', align_corners=False)`` over axes 1 and 2 of x (loops)."""
    x = np.asarray(x, np.float64)
    h, w = x.shape[1], x.shape[2]
    ho, wo = out_hw
    ty = _torch_linear_taps(h, ho)
    tx = _torch_linear_taps(w, wo)
    out = np.empty((x.shape[0], ho, wo) + x.shape[3:], np.float64)
    for y, (y0, y1, ly0, ly1) in enumerate(ty):
        for xx, (x0, x1, lx0, lx1) in enumerate(tx):
            out[:, y, xx] = ly0 * (lx0 * x[:, y0, x0] + lx1 * x[:, y0, x1]) + ly1 * (
                lx0 * x[:, y1, x0] + lx1 * x[:, y1, x1]
            )
    return out


def patchcore_features(*layers: np.ndarray, patch_size=3, dim=1024, pretrain_dim=1024):
    """Official PatchCore aggregation of NHWC layer maps -> (B, h0', w0', dim).

    1. unfold every layer into p x p neighbourhoods (zero padding);
    2. bilinearly resize every (c, ky, kx) slice of layers 1.. onto layer 0's patch grid;
    3. flatten each neighbourhood channel-major (c, ky, kx) and adaptive-avg-pool to pretrain_dim;
    4. stack the layers (M, n_layers, pretrain_dim), flatten, adaptive-avg-pool to dim.
    """
    patches = [patchify(x, patch_size) for x in layers]
    b, h0, w0 = patches[0].shape[:3]
    pooled = []
    for p in patches:
        if p.shape[1:3] != (h0, w0):
            p = resize_bilinear(p, (h0, w0))  # each (c, ky, kx) slice independently
        flat = p.reshape(b * h0 * w0, -1)  # (M, C*p*p), channel-major (c, ky, kx)
        pooled.append(adaptive_avg_pool1d(flat, pretrain_dim))
    stacked = np.stack(pooled, axis=1)  # (M, n_layers, pretrain_dim)
    out = adaptive_avg_pool1d(stacked.reshape(stacked.shape[0], -1), dim)
    return out.reshape(b, h0, w0, dim)


def anomalib_features(*layers: np.ndarray, patch_size=3):
    """anomalib PatchCore embedding: AvgPool2d(p, 1, (p-1)//2) with count_include_pad=True
    per layer, bilinear resize of layers 1.. to layer 0's size, channel concat."""
    outs = []
    target = None
    for x in layers:
        p = patchify(x, patch_size)  # zero padded neighbourhoods
        avg = p.sum(axis=(-1, -2)) / (patch_size * patch_size)  # count_include_pad=True
        if target is None:
            target = avg.shape[1:3]
        elif avg.shape[1:3] != target:
            avg = resize_bilinear(avg, target)
        outs.append(avg)
    return np.concatenate(outs, axis=-1)
