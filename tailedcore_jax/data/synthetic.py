"""A procedural long-tail noisy anomaly-detection dataset (the offline default).

Host-side module (NumPy + PIL only). No real dataset or pretrained weight can be downloaded
on the development and CI machines, so the default experiment runs on this generated data
(with a random ResNet-18 and BatchNorm recalibration as the backbone):

* 256 x 256 RGB images, defects kept inside the centre-crop window (16 px margin of the
  256 -> 224 crop, also inside the 146 -> 128 crop of the 128-px recipe);
* 10 product classes with distinct color families and structures -- textures
  (``stripes`` diagonal stripes, ``checker`` checkerboard, ``dots``, ``weave`` basket weave,
  ``mesh`` square mesh) and objects on a plain background (``gear`` toothed disc, ``ring``
  torus, ``screw`` shaft with thread marks and a head, ``cap`` bottle cap with a marking,
  ``nut`` hexagonal nut);
* per-image variation: texture rotation (+-4 degrees) and phase, object position jitter
  (+-8 px), free rotation of rotation-symmetric objects, color gain (std 0.02 per channel),
  brightness (+-0.03) and Gaussian pixel noise (std 2 of 255);
* five defect types with exact 0/255 masks (the mask is exactly the set of pixels the defect
  changed): ``scratch`` (thin curved line, 60-110 px long, 2-3.5 px wide, light on dark or
  dark on light), ``hole`` (near-black ellipse, 9-16 px radii, with a darker -- or, on dark
  surfaces, brighter -- rim), ``stain`` (multi-lobed translucent blob, 13-22 px, another hue
  and a clearly different brightness), ``missing_part`` (a 16-24 px bite out of an object's
  outline filled with background; a bald patch of the mean color on textures),
  ``contamination`` (a cluster of 6-12 specks of 2-4 px radius); sizes are large enough to
  stay visible at the 128-px recipe (``_SIZES`` and ``_VARIATION`` hold the numbers);
* long-tail splits: ``pareto`` sizes 60, 40, 30, 20, 12, 8, 5, 3, 2, 1 (class order shuffled
  by the seed), ``step_k4`` four classes of 40 and six of 4, ``step_k1`` four of 40 and six
  of 1, ``balanced`` 30 each; noise: ``round(noise_ratio * size)`` test defects injected
  into each head class (>= 20 images), the "overlap" protocol (they stay in the test set);
  test set per class: 12 good and 3 per defect type.

Determinism: every image has its own ``np.random.SeedSequence(seed, spawn_key=(class,
split, defect, index))``, so a subset (e.g. fewer training images) is generated identically
and the output does not depend on generation order. The class-size order uses
``np.random.default_rng([seed, 7919])``, the choice of injected images
``np.random.default_rng([seed, 104729])``.

Use in memory (:func:`make_synthetic` -> :class:`SyntheticDataset` of uint8 arrays; then
``mvtec.preprocess_images``) or on disk (:func:`write_synthetic` writes the built long-tail
noisy folder in MVTec layout, read back with ``mvtec.mvtec_records`` /
``longtail.nlt_train_records``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

__all__ = [
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_DEFECTS",
    "SYNTHETIC_OBJECTS",
    "SYNTHETIC_SETTINGS",
    "SYNTHETIC_TEXTURES",
    "SyntheticDataset",
    "make_synthetic",
    "synthetic_class_sizes",
    "synthetic_image",
    "write_synthetic",
]

SYNTHETIC_TEXTURES = ("stripes", "checker", "dots", "weave", "mesh")
SYNTHETIC_OBJECTS = ("gear", "ring", "screw", "cap", "nut")
SYNTHETIC_CLASSES = tuple(sorted(SYNTHETIC_TEXTURES + SYNTHETIC_OBJECTS))
SYNTHETIC_DEFECTS = ("contamination", "hole", "missing_part", "scratch", "stain")
SYNTHETIC_SETTINGS = ("pareto", "step_k4", "step_k1", "balanced")

_SPLIT_CODE = {"train": 0, "test": 1}
# per-image photometric variation: colour gain std, brightness range (+-), pixel noise std (0..255)
_VARIATION = {"colour_gain": 0.02, "brightness": 0.03, "pixel_noise": 2.0}
# defect sizes in pixels of the 256 px image (large enough to survive the 128 px recipe)
_SIZES = {
    "scratch_length": (60.0, 110.0),
    "scratch_width": (2.0, 3.5),
    "hole_radius": (9.0, 16.0),
    "blob_radius": (13.0, 22.0),
    "bite_radius": (16.0, 24.0),
    "speck_radius": (2.0, 4.0),
    "speck_spread": 16.0,
}
_PARETO_SIZES = (60, 40, 30, 20, 12, 8, 5, 3, 2, 1)

# colour families (RGB, 0..255): (background, foreground[, accent])
_PALETTE = {
    "stripes": ((30, 50, 120), (120, 170, 235)),
    "checker": ((25, 90, 40), (150, 210, 80)),
    "dots": ((165, 55, 125), (245, 205, 230)),
    "weave": ((90, 60, 30), (205, 165, 105)),
    "mesh": ((45, 45, 52), (190, 190, 205)),
    "gear": ((60, 30, 80), (215, 180, 60)),
    "ring": ((20, 80, 85), (235, 130, 40)),
    "screw": ((160, 178, 205), (140, 95, 50)),
    "cap": ((240, 240, 236), (200, 30, 30), (250, 235, 190)),
    "nut": ((215, 195, 140), (60, 160, 175)),
}
_STAIN_COLOURS = np.asarray(
    [
        (80, 50, 15),
        (225, 205, 50),
        (40, 60, 40),
        (110, 30, 110),
        (25, 25, 140),
        (240, 150, 190),
        (170, 235, 240),
    ],
    np.float32,
)


# --------------------------------------------------------------------------------------------
# Drawing helpers (all on (S, S) float32 grids)
# --------------------------------------------------------------------------------------------


class _Grid(NamedTuple):
    y: np.ndarray
    x: np.ndarray
    size: int


_GRIDS: dict[int, _Grid] = {}


def _grid(size: int) -> _Grid:
    g = _GRIDS.get(size)
    if g is None:
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        g = _Grid(y, x, size)
        _GRIDS[size] = g
    return g


def _ramp(d: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Anti-aliased step: 0 for d <= -width/2, 1 for d >= width/2 (d = signed distance)."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


def _rot(g: _Grid, cx: float, cy: float, ang: float):
    dx, dy = g.x - cx, g.y - cy
    c, s = np.float32(np.cos(ang)), np.float32(np.sin(ang))
    return dx * c + dy * s, -dx * s + dy * c


def _mix(bg, fg, a):
    a = a[..., None]
    return bg * (1.0 - a) + fg * a


def _const(size, rgb):
    return np.broadcast_to(np.asarray(rgb, np.float32), (size, size, 3))


# --------------------------------------------------------------------------------------------
# Class renderers: rng -> (image float (S,S,3) in 0..255, object mask bool, background image)
# --------------------------------------------------------------------------------------------


def _texture_common(rng, g):
    ang = np.deg2rad(rng.uniform(-4.0, 4.0))
    c = g.size / 2.0
    return _rot(g, c, c, ang)


def _stripes(rng, g, pal):
    u, v = _texture_common(rng, g)
    period = 22.0
    t = (u + v) * np.float32(1 / np.sqrt(2.0)) + rng.uniform(0, period)
    a = _ramp(np.sin(t * np.float32(2 * np.pi / period)) * 4.0)
    return _mix(_const(g.size, pal[0]), _const(g.size, pal[1]), a)


def _checker(rng, g, pal):
    u, v = _texture_common(rng, g)
    period = 36.0
    pu, pv = rng.uniform(0, period, size=2)
    s = np.sin((u + pu) * np.float32(2 * np.pi / period)) * np.sin(
        (v + pv) * np.float32(2 * np.pi / period)
    )
    a = _ramp(s * 12.0)
    return _mix(_const(g.size, pal[0]), _const(g.size, pal[1]), a)


def _dots(rng, g, pal):
    u, v = _texture_common(rng, g)
    period, radius = 24.0, 6.5
    pu, pv = rng.uniform(0, period, size=2)
    du = np.mod(u + pu, period) - period / 2
    dv = np.mod(v + pv, period) - period / 2
    a = _ramp(radius - np.sqrt(du * du + dv * dv))
    return _mix(_const(g.size, pal[0]), _const(g.size, pal[1]), a)


def _weave(rng, g, pal):
    u, v = _texture_common(rng, g)
    cell = 32.0
    pu, pv = rng.uniform(0, 2 * cell, size=2)
    uu, vv = u + pu, v + pv
    parity = (np.floor(uu / cell) + np.floor(vv / cell)) % 2
    strand = cell / 4
    across = np.where(parity == 0, vv, uu)  # coordinate across the strands
    along = np.where(parity == 0, uu, vv)
    ph = np.mod(across, strand) / strand  # 0..1 across a strand
    body = _ramp((0.42 - np.abs(ph - 0.5)) * strand, 1.5)  # strand with dark gaps
    shade = (
        0.75
        + 0.25 * np.cos((ph - 0.5) * np.pi)
        + 0.05 * np.sin(along * np.float32(2 * np.pi / cell))
    )
    fg = _const(g.size, pal[1]) * shade[..., None]
    return _mix(_const(g.size, pal[0]), fg, body)


def _mesh(rng, g, pal):
    u, v = _texture_common(rng, g)
    period, width = 20.0, 3.0
    pu, pv = rng.uniform(0, period, size=2)
    du = np.abs(np.mod(u + pu, period) - period / 2)
    dv = np.abs(np.mod(v + pv, period) - period / 2)
    dist = period / 2 - np.maximum(du, dv)  # distance to the nearest line
    a = _ramp(width / 2 - dist)
    return _mix(_const(g.size, pal[0]), _const(g.size, pal[1]), a)


def _object_pose(rng, g, free_rotation=True):
    c = g.size / 2.0
    cx, cy = c + rng.uniform(-8, 8), c + rng.uniform(-8, 8)
    ang = rng.uniform(0, 2 * np.pi) if free_rotation else np.deg2rad(rng.uniform(-20, 20))
    return cx, cy, ang


def _shade(g, cx, cy, radius, strength=0.25):
    # light from the upper left
    s = 1.0 - strength * ((g.x - cx) + (g.y - cy)) / (2.0 * radius)
    return np.clip(s, 1.0 - 2 * strength, 1.0 + strength)[..., None].astype(np.float32)


def _gear(rng, g, pal):
    cx, cy, ang = _object_pose(rng, g)
    u, v = _rot(g, cx, cy, ang)
    r = np.sqrt(u * u + v * v)
    th = np.arctan2(v, u)
    teeth, r0, h = 12, 68.0, 11.0
    tooth = np.clip(3.0 * np.sin(teeth * th), -1.0, 1.0) * 0.5 + 0.5
    a = _ramp(r0 + h * tooth - r) * _ramp(r - 18.0)
    fg = _const(g.size, pal[1]) * _shade(g, cx, cy, r0 + h)
    fg = fg * (1.0 - 0.18 * _ramp(6.0 - np.abs(r - 40.0), 2.0))[..., None]  # engraved circle
    bg = _const(g.size, pal[0])
    return _mix(bg, fg, a), a > 0.5, bg


def _ring(rng, g, pal):
    cx, cy, _ = _object_pose(rng, g)
    r = np.sqrt((g.x - cx) ** 2 + (g.y - cy) ** 2)
    r_in, r_out = 46.0 + rng.uniform(-2, 2), 80.0 + rng.uniform(-2, 2)
    a = _ramp(r - r_in) * _ramp(r_out - r)
    mid, half = (r_in + r_out) / 2, (r_out - r_in) / 2
    tube = np.cos(np.clip((r - mid) / half, -1, 1) * (np.pi / 2))  # tube highlight
    fg = _const(g.size, pal[1]) * (0.55 + 0.45 * tube)[..., None] * _shade(g, cx, cy, r_out, 0.15)
    bg = _const(g.size, pal[0])
    return _mix(bg, fg, a), a > 0.5, bg


def _screw(rng, g, pal):
    cx, cy, ang = _object_pose(rng, g, free_rotation=False)
    ang += rng.choice([0.0, np.pi / 2])
    u, v = _rot(g, cx, cy, ang)
    length, width = 150.0, 26.0
    shaft = _ramp(length / 2 - np.abs(u)) * _ramp(width / 2 - np.abs(v))
    tip = _ramp((length / 2 + 14.0 - u) * 0.9 - np.abs(v) * 1.1) * _ramp(u - length / 2 + 0.5)
    head_c = -length / 2 - 12.0
    head = _ramp(14.0 - np.abs(u - head_c)) * _ramp(25.0 - np.abs(v))
    a = np.maximum(np.maximum(shaft, tip), head)
    thread = 0.75 + 0.25 * np.cos(u * np.float32(2 * np.pi / 8.0))
    thread = np.where(u > head_c + 14.0, thread, 1.0)
    slot = 1.0 - 0.6 * _ramp(3.0 - np.abs(v)) * _ramp(14.0 - np.abs(u - head_c))
    fg = _const(g.size, pal[1]) * (thread * slot)[..., None] * _shade(g, cx, cy, 90.0, 0.15)
    bg = _const(g.size, pal[0])
    return _mix(bg, fg, a), a > 0.5, bg


def _cap(rng, g, pal):
    cx, cy, ang = _object_pose(rng, g)
    u, v = _rot(g, cx, cy, ang)
    r = np.sqrt(u * u + v * v)
    radius = 76.0
    a = _ramp(radius - r)
    rim = 1.0 - 0.25 * _ramp(4.0 - np.abs(r - (radius - 9.0)), 2.0)
    knurl = 1.0 - 0.12 * (np.sin(np.arctan2(v, u) * 60.0) > 0) * (r > radius - 6.0)
    fg = _const(g.size, pal[1]) * (rim * knurl)[..., None] * _shade(g, cx, cy, radius, 0.15)
    # marking: a "T"
    mark = np.maximum(
        _ramp(5.0 - np.abs(u)) * _ramp(24.0 - np.abs(v - 4.0)),
        _ramp(5.0 - np.abs(v + 22.0)) * _ramp(20.0 - np.abs(u)),
    )
    fg = _mix(fg, _const(g.size, pal[2]), mark)
    bg = _const(g.size, pal[0])
    return _mix(bg, fg, a), a > 0.5, bg


def _nut(rng, g, pal):
    cx, cy, ang = _object_pose(rng, g)
    u, v = _rot(g, cx, cy, ang)
    r = np.sqrt(u * u + v * v)
    th = np.arctan2(v, u)
    apothem = 70.0
    hexd = r * np.cos(np.mod(th, np.pi / 3) - np.pi / 6)  # hexagon "radius"
    a = _ramp(apothem - hexd) * _ramp(r - 30.0)
    chamfer = 1.0 - 0.2 * _ramp(8.0 - np.abs(r - 38.0), 3.0)
    face = 0.85 + 0.15 * np.cos(3 * th)
    fg = _const(g.size, pal[1]) * (chamfer * face)[..., None] * _shade(g, cx, cy, apothem, 0.2)
    bg = _const(g.size, pal[0])
    return _mix(bg, fg, a), a > 0.5, bg


_RENDER = {
    "stripes": _stripes,
    "checker": _checker,
    "dots": _dots,
    "weave": _weave,
    "mesh": _mesh,
    "gear": _gear,
    "ring": _ring,
    "screw": _screw,
    "cap": _cap,
    "nut": _nut,
}


# --------------------------------------------------------------------------------------------
# Defects: (rng, image, object mask, background, grid) -> (new image, bool mask) or None
# --------------------------------------------------------------------------------------------


def _window(g):
    m = 24
    return (g.x >= m) & (g.x < g.size - m) & (g.y >= m) & (g.y < g.size - m)


def _pick(rng, candidates: np.ndarray):
    idx = np.flatnonzero(candidates)
    if idx.size == 0:
        return None
    i = idx[rng.integers(idx.size)]
    return float(i % candidates.shape[1]), float(i // candidates.shape[1])


def _erode(mask, k):
    out = mask.copy()
    for dy, dx in ((k, 0), (-k, 0), (0, k), (0, -k)):
        out &= np.roll(mask, (dy, dx), axis=(0, 1))
    return out


def _lum(rgb):
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _disc(g, cx, cy, r):
    return (g.x - cx) ** 2 + (g.y - cy) ** 2 <= r * r


def _lobes(rng, g, cx, cy, radius):
    m = _disc(g, cx, cy, radius * rng.uniform(0.6, 0.8))
    for _ in range(rng.integers(3, 6)):
        ang = rng.uniform(0, 2 * np.pi)
        d = radius * rng.uniform(0.3, 0.6)
        m |= _disc(g, cx + d * np.cos(ang), cy + d * np.sin(ang), radius * rng.uniform(0.35, 0.6))
    return m


def _scratch(rng, img, obj, bg, g):
    win = _window(g)
    p = _pick(rng, _erode(obj, 4) & win)
    if p is None:
        return None
    length = rng.uniform(*_SIZES["scratch_length"])
    ang = rng.uniform(0, np.pi)
    d = np.array([np.cos(ang), np.sin(ang)]) * length / 2
    p0, p2 = np.array(p) - d, np.array(p) + d
    bend = rng.uniform(-0.25, 0.25) * length
    p1 = np.array(p) + np.array([-np.sin(ang), np.cos(ang)]) * bend
    t = np.linspace(0, 1, int(length * 2))[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    half = rng.uniform(*_SIZES["scratch_width"]) / 2 + 0.25
    x0, y0 = np.floor(pts.min(0) - 3).astype(int)
    x1, y1 = np.ceil(pts.max(0) + 3).astype(int)
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, g.size), min(y1, g.size)
    if x1 <= x0 or y1 <= y0:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d2 = (xx[..., None] - pts[:, 0]) ** 2 + (yy[..., None] - pts[:, 1]) ** 2
    local = d2.min(-1) <= half * half
    mask = np.zeros_like(obj)
    mask[y0:y1, x0:x1] = local
    mask &= obj & win
    if mask.sum() < 25:
        return None
    base = img[mask].mean(0)
    if _lum(base) > 110:
        colour = base * 0.3
    else:
        colour = 0.35 * base + 0.65 * np.float32(235)
    out = img.copy()
    out[mask] = colour
    return out, mask


def _hole(rng, img, obj, bg, g):
    win = _window(g)
    p = _pick(rng, _erode(obj, 12) & _erode(win, 18))
    if p is None:
        return None
    ra, rb = rng.uniform(*_SIZES["hole_radius"], size=2)
    ang = rng.uniform(0, np.pi)
    u, v = _rot(g, p[0], p[1], ang)
    e = (u / ra) ** 2 + (v / rb) ** 2
    inner = e <= 1.0
    rim = (e <= (1.0 + 2.2 / min(ra, rb)) ** 2) & ~inner
    mask = inner | rim
    out = img.copy()
    if _lum(img[mask].mean(0)) > 90:
        out[rim] = img[rim] * 0.45  # darker rim around a dark hole
    else:
        out[rim] = img[rim] * 0.3 + np.float32(0.7 * 220)  # bright rim on dark surfaces
    out[inner] = np.float32(12)
    return out, mask


def _stain(rng, img, obj, bg, g):
    win = _window(g)
    p = _pick(rng, _erode(obj, 8) & _erode(win, 20))
    if p is None:
        return None
    mask = _lobes(rng, g, p[0], p[1], rng.uniform(*_SIZES["blob_radius"])) & obj & win
    if mask.sum() < 40:
        return None
    mean = img[mask].mean(0)
    # a different hue and a clearly different brightness (random features see luminance)
    lum = _STAIN_COLOURS @ np.float32([0.299, 0.587, 0.114])
    ok = (np.abs(_STAIN_COLOURS - mean).sum(1) > 150) & (np.abs(lum - _lum(mean)) > 70)
    choices = np.flatnonzero(ok)
    colour = _STAIN_COLOURS[
        rng.choice(choices) if choices.size else int(np.argmax(np.abs(lum - _lum(mean))))
    ]
    alpha = np.float32(rng.uniform(0.6, 0.8))
    out = img.copy()
    out[mask] = img[mask] * (1 - alpha) + colour * alpha
    return out, mask


def _missing_part(rng, img, obj, bg, g):
    win = _window(g)
    if bg is None:  # texture: bald patch of the mean colour
        p = _pick(rng, _erode(win, 20))
        mask = _lobes(rng, g, p[0], p[1], rng.uniform(*_SIZES["blob_radius"])) & win
        out = img.copy()
        out[mask] = img.reshape(-1, 3).mean(0)
        return out, mask
    edge = obj & ~_erode(obj, 2) & _erode(win, 8)
    p = _pick(rng, edge)
    if p is None:
        return None
    r = rng.uniform(*_SIZES["bite_radius"])
    mask = _disc(g, p[0], p[1], r) & obj & win
    if mask.sum() < 60:
        return None
    out = img.copy()
    out[mask] = bg[mask]
    return out, mask


def _contamination(rng, img, obj, bg, g):
    win = _window(g)
    p = _pick(rng, _erode(obj, 6) & _erode(win, 18))
    if p is None:
        return None
    mask = np.zeros_like(obj)
    for _ in range(rng.integers(6, 13)):
        ang = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0, _SIZES["speck_spread"])
        mask |= _disc(
            g, p[0] + d * np.cos(ang), p[1] + d * np.sin(ang), rng.uniform(*_SIZES["speck_radius"])
        )
    mask &= win
    base = img[mask].mean(0)
    colour = np.float32([25, 20, 15]) if _lum(base) > 110 else np.float32([235, 230, 215])
    out = img.copy()
    out[mask] = colour
    return out, mask


_DEFECTS = {
    "contamination": _contamination,
    "hole": _hole,
    "missing_part": _missing_part,
    "scratch": _scratch,
    "stain": _stain,
}


# --------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------


def _check_image_args(class_name, defect, split, size) -> None:
    if class_name not in _RENDER:
        raise ValueError(f"unknown class {class_name!r}; expected one of {SYNTHETIC_CLASSES}")
    if defect is not None and defect not in _DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; expected one of {SYNTHETIC_DEFECTS}")
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if size < 96:
        raise ValueError(f"size must be >= 96, got {size}")


def _render_base(rng, class_name: str, g: _Grid):
    """``(image float32 (S, S, 3), object mask, background or None, gain (3,), noise)``.

    Draws, in this order: the class rendering, the color gain x brightness, the pixel noise.
    """
    size = g.size
    out = _RENDER[class_name](rng, g, _PALETTE[class_name])
    if isinstance(out, tuple):
        img, obj, bg = out
    else:
        img, obj, bg = out, np.ones((size, size), bool), None
    v = _VARIATION
    gain = (
        rng.normal(1.0, v["colour_gain"], size=3)
        * rng.uniform(1 - v["brightness"], 1 + v["brightness"])
    ).astype(np.float32)
    noise = rng.standard_normal(size=(size, size, 3), dtype=np.float32) * np.float32(
        v["pixel_noise"]
    )
    return np.asarray(img, np.float32), obj, bg, gain, noise


def _place_defect(drng, defect: str, class_name: str, img, obj, bg, g: _Grid):
    """``(image, bool mask)`` with one ``defect``; up to 50 placement attempts."""
    for _ in range(50):
        res = _DEFECTS[defect](drng, img, obj, bg, g)
        if res is not None and res[1].any():
            return res
    raise RuntimeError(f"could not place a {defect} on {class_name}")  # pragma: no cover


def synthetic_image(
    class_name: str,
    *,
    seed: int,
    split: str = "train",
    index: int = 0,
    defect: str | None = None,
    variant: str | None = None,
    size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """One generated image and its mask.

    The base image depends on ``(seed, class_name, split, variant, index)`` with
    ``variant`` defaulting to ``defect or "good"``; the defect is drawn from a separate
    stream. So ``synthetic_image(c, ..., defect=d)`` and ``synthetic_image(c, ...,
    variant=d, defect=None)`` show the same product, without and with the defect, and
    differ exactly inside the mask.

    Args:
        class_name: one of :data:`SYNTHETIC_CLASSES`.
        seed: dataset seed (non-negative int).
        split: ``"train"`` or ``"test"``.
        index: image index within (class, split, variant).
        defect: ``None`` (good) or one of :data:`SYNTHETIC_DEFECTS`.
        variant: ``"good"`` or a defect name selecting the base-image stream (default
            ``defect or "good"``).
        size: image side >= 96 (default 256; the design and margins assume 256).

    Returns:
        ``(image (size, size, 3) uint8, mask (size, size) uint8 in {0, 255})``.

    Raises:
        ValueError: unknown class, defect or split; ``size < 96``.
    """
    _check_image_args(class_name, defect, split, size)
    variant = variant if variant is not None else (defect or "good")
    vcode = 0 if variant == "good" else 1 + SYNTHETIC_DEFECTS.index(variant)
    ss = np.random.SeedSequence(
        int(seed),
        spawn_key=(SYNTHETIC_CLASSES.index(class_name), _SPLIT_CODE[split], vcode, int(index)),
    )
    base_ss, defect_ss = ss.spawn(2)
    g = _grid(size)
    img, obj, bg, gain, noise = _render_base(np.random.default_rng(base_ss), class_name, g)
    mask = np.zeros((size, size), bool)
    if defect is not None:
        drng = np.random.default_rng(defect_ss)
        img, mask = _place_defect(drng, defect, class_name, img, obj, bg, g)
    img = np.clip(img * gain + noise, 0, 255)
    img = np.rint(img).astype(np.uint8)
    return img, mask.astype(np.uint8) * np.uint8(255)


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class SyntheticDataset(NamedTuple):
    """A generated long-tail noisy dataset held in memory.

    Training arrays follow the official loader order (classes sorted; inside a class the
    ``train/good`` file names sorted: ``000.png``... then injected ``<defect>_NNN.png``).

    Attributes:
        class_names: sorted class names; ``*_class`` arrays index into it.
        train_images: ``(N, S, S, 3)`` uint8.
        train_class: ``(N,)`` int32 ground-truth class (evaluation only, never a model input).
        train_is_noise: ``(N,)`` bool, injected test defects (evaluation only).
        train_keys: NLT-layout keys ``"<class>/train/good/<file>"``.
        test_images: ``(M, S, S, 3)`` uint8; test_masks: ``(M, S, S)`` uint8 in {0, 255}.
        test_labels: ``(M,)`` int32, 0 good / 1 defect; test_class: ``(M,)`` int32.
        test_defect_types: ``"good"`` or the defect type, per test image.
        test_keys: ``"<class>/test/<defect>/<file>"``.
        class_sizes / noise_counts / tail_classes / head_classes / setting / seed: the split.
    """

    class_names: tuple
    train_images: np.ndarray
    train_class: np.ndarray
    train_is_noise: np.ndarray
    train_keys: tuple
    test_images: np.ndarray
    test_masks: np.ndarray
    test_labels: np.ndarray
    test_class: np.ndarray
    test_defect_types: tuple
    test_keys: tuple
    class_sizes: dict
    noise_counts: dict
    tail_classes: tuple
    head_classes: tuple
    setting: str
    seed: int


def synthetic_class_sizes(
    setting: str = "pareto", *, seed: int = 0, classes: Sequence[str] = SYNTHETIC_CLASSES
) -> dict[str, int]:
    """Training-set size per class for a setting (class order shuffled by ``seed``).

    ``pareto``: 60, 40, 30, 20, 12, 8, 5, 3, 2, 1; ``step_k4``: four classes of 40, six of
    4; ``step_k1``: four of 40, six of 1; ``balanced``: 30 each. For 10 classes only (other
    class counts: ``balanced`` only).
    """
    classes = sorted(classes)
    if setting not in SYNTHETIC_SETTINGS:
        raise ValueError(f"setting must be one of {SYNTHETIC_SETTINGS}, got {setting!r}")
    if setting == "balanced":
        return {c: 30 for c in classes}
    if len(classes) != 10:
        raise ValueError(f"setting {setting!r} is defined for 10 classes, got {len(classes)}")
    if setting == "pareto":
        sizes = list(_PARETO_SIZES)
    else:
        k = 4 if setting == "step_k4" else 1
        sizes = [40] * 4 + [k] * 6
    rng = np.random.default_rng([int(seed), 7919])
    perm = rng.permutation(len(classes))
    return {classes[i]: sizes[j] for j, i in enumerate(perm)}


def _resolve_sizes(classes, setting, class_sizes, noise_ratio, seed):
    """Validated ``(classes sorted, {class: normal training images}, setting)``."""
    classes = tuple(sorted(classes))
    unknown = set(classes) - set(SYNTHETIC_CLASSES)
    if unknown or not classes:
        raise ValueError(
            f"classes must be a non-empty subset of {SYNTHETIC_CLASSES}, got {list(classes)}"
        )
    if not 0 <= noise_ratio <= 1:
        raise ValueError(f"noise_ratio must be in [0, 1], got {noise_ratio}")
    if class_sizes is None:
        sizes = synthetic_class_sizes(setting, seed=seed, classes=classes)
    else:
        sizes = {c: int(class_sizes.get(c, 0)) for c in classes}
        setting = "custom"
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"class sizes must be >= 0, got {sizes}")
    return classes, sizes, setting


def _class_test_set(c, *, seed, n_good, n_per_defect, image_size):
    """``(test items, defect items)`` of one class; an item is ``(image, mask, label,
    defect type, key)``. Test items are in the official loader order: folders sorted
    (``good`` among the defect names), file names sorted within a folder."""
    good = []
    for i in range(n_good):
        im, m = synthetic_image(c, seed=seed, split="test", index=i, size=image_size)
        good.append((im, m, 0, "good", f"{c}/test/good/{i:03d}.png"))
    defect_items = []
    for d in sorted(SYNTHETIC_DEFECTS):
        for i in range(n_per_defect):
            im, m = synthetic_image(c, seed=seed, split="test", index=i, defect=d, size=image_size)
            defect_items.append((im, m, 1, d, f"{c}/test/{d}/{i:03d}.png"))
    return sorted(good + defect_items, key=lambda t: (t[3], t[4])), defect_items


def _class_train_set(c, n, *, seed, image_size, defect_items, n_noise, rng):
    """Sorted ``(file name, image, is_noise)`` of one class: ``n`` normal images plus
    ``n_noise`` test defects drawn (without replacement) by ``rng`` from ``defect_items``."""
    items = []
    for i in range(n):
        im, _ = synthetic_image(c, seed=seed, split="train", index=i, size=image_size)
        items.append((f"{i:03d}.png", im, False))
    if n_noise:
        pick = np.sort(rng.choice(len(defect_items), size=n_noise, replace=False))
        for j in pick:
            im, _, _, d, key = defect_items[j]
            items.append((f"{d}_{key.rsplit('/', 1)[-1]}", im, True))
    return sorted(items, key=lambda t: t[0])


def _stack(arrays: list, empty_shape: tuple) -> np.ndarray:
    return np.stack(arrays) if arrays else np.zeros(empty_shape, np.uint8)


def make_synthetic(
    seed: int = 0,
    *,
    setting: str = "pareto",
    class_sizes: Mapping[str, int] | None = None,
    noise_ratio: float = 0.1,
    head_min: int = 20,
    n_test_good: int = 12,
    n_test_per_defect: int = 3,
    classes: Sequence[str] = SYNTHETIC_CLASSES,
    image_size: int = 256,
) -> SyntheticDataset:
    """Generate the long-tail noisy synthetic dataset in memory.

    Args:
        seed: dataset seed.
        setting: ``"pareto"`` (default), ``"step_k4"``, ``"step_k1"`` or ``"balanced"``
            (ignored when ``class_sizes`` is given).
        class_sizes: explicit normal training images per class.
        noise_ratio: fraction in ``[0, 1]``: each class with ``>= head_min`` images
            receives ``round(noise_ratio * size)`` of its test defect images (uniform over
            them) in its training set; they stay in the test set. 0 disables noise.
        head_min: smallest head-class size (smaller classes are tail classes, never noisy).
        n_test_good / n_test_per_defect: test images per class.
        classes: subset of :data:`SYNTHETIC_CLASSES`.
        image_size: side of the generated images.

    Returns:
        :class:`SyntheticDataset`.

    Raises:
        ValueError: unknown classes or setting, ``noise_ratio`` outside ``[0, 1]``,
            negative class sizes.
    """
    classes, sizes, setting = _resolve_sizes(classes, setting, class_sizes, noise_ratio, seed)
    n_def = n_test_per_defect * len(SYNTHETIC_DEFECTS)
    noise = {c: min(n_def, round(noise_ratio * n)) for c, n in sizes.items() if n >= head_min}
    noise = {c: n for c, n in noise.items() if n > 0}
    rng = np.random.default_rng([int(seed), 104729])

    test, train = [], []  # (class id, item) pairs
    for cid, c in enumerate(classes):
        class_test, defect_items = _class_test_set(
            c, seed=seed, n_good=n_test_good, n_per_defect=n_test_per_defect,
            image_size=image_size,
        )
        test += [(cid, item) for item in class_test]
        class_train = _class_train_set(
            c, sizes[c], seed=seed, image_size=image_size, defect_items=defect_items,
            n_noise=noise.get(c, 0), rng=rng,
        )
        train += [(cid, item) for item in class_train]

    s = image_size
    tail = tuple(sorted(c for c, n in sizes.items() if n < head_min))
    head = tuple(sorted(c for c in sizes if c not in tail))
    return SyntheticDataset(
        class_names=classes,
        train_images=_stack([im for _, (_, im, _) in train], (0, s, s, 3)),
        train_class=np.asarray([cid for cid, _ in train], np.int32),
        train_is_noise=np.asarray([is_noise for _, (_, _, is_noise) in train], bool),
        train_keys=tuple(f"{classes[cid]}/train/good/{name}" for cid, (name, _, _) in train),
        test_images=_stack([t[0] for _, t in test], (0, s, s, 3)),
        test_masks=_stack([t[1] for _, t in test], (0, s, s)),
        test_labels=np.asarray([t[2] for _, t in test], np.int32),
        test_class=np.asarray([cid for cid, _ in test], np.int32),
        test_defect_types=tuple(t[3] for _, t in test),
        test_keys=tuple(t[4] for _, t in test),
        class_sizes=dict(sizes),
        noise_counts=noise,
        tail_classes=tail,
        head_classes=head,
        setting=setting,
        seed=int(seed),
    )


def write_synthetic(
    root: str | os.PathLike, data: SyntheticDataset, *, compress_level: int = 1
) -> Path:
    """Write a :class:`SyntheticDataset` as a built long-tail noisy folder in MVTec layout.

    ``<root>/<class>/train/good/NNN.png`` (+ injected ``<defect>_NNN.png`` copies),
    ``<root>/<class>/test/{good,<defect>}/NNN.png`` and
    ``<root>/<class>/ground_truth/<defect>/NNN_mask.png`` (0/255). PNG is lossless, so
    ``mvtec_records`` / ``nlt_train_records`` + ``load_batch`` give the arrays back exactly.

    Returns:
        the root path.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    def save(key, arr, mode):
        p = root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, mode).save(p, compress_level=compress_level)

    for key, im in zip(data.train_keys, data.train_images):
        save(key, im, "RGB")
    for key, im, m, lab, d in zip(
        data.test_keys, data.test_images, data.test_masks, data.test_labels, data.test_defect_types
    ):
        save(key, im, "RGB")
        if lab:
            cls, _, _, fname = key.split("/")
            stem = os.path.splitext(fname)[0]
            save(f"{cls}/ground_truth/{d}/{stem}_mask.png", m, "L")
    return root
