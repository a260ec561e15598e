"""Plain-NumPy oracle of TailedCore's tail augmentation (torchvision tensor semantics), NHWC.

Written from torchvision's definitions (`transforms.functional.rotate` ->
`_get_inverse_affine_matrix(center=[0, 0], -angle, ...)` -> `_functional_tensor.rotate` ->
`_gen_affine_grid` -> `grid_sample(mode="nearest", padding_mode="zeros",
align_corners=False)`), `torch.nn.functional.pad(mode="replicate")`, `TF.hflip` and
`TF.center_crop`. Everything is float32 like torch. The grid product reproduces torch's CPU
`bmm` rounding, which is ``fma(y, r10, x * r00)`` (emulated exactly here through float64:
a product of two float32 numbers is exact in float64).
"""

import math

import numpy as np

F32 = np.float32


def padding_for_rotation(width: int, height: int) -> tuple[int, int]:
    """`calculate_padding_for_rotation(width, height)` -> (horizontal, vertical)."""
    diagonal = math.sqrt(width**2 + height**2)
    return math.ceil((diagonal - width) / 2), math.ceil((diagonal - height) / 2)


def inverse_affine_matrix_rotate(angle: float) -> list[float]:
    """`_get_inverse_affine_matrix([0., 0.], -angle, [0., 0.], 1.0, [0., 0.])`."""
    rot = math.radians(-angle)
    a, b = math.cos(rot), -math.sin(rot)
    c, d = math.sin(rot), math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    cx = cy = tx = ty = 0.0
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return m


def affine_grid(matrix, w: int, h: int) -> np.ndarray:
    """`_gen_affine_grid(theta, w, h, ow=w, oh=h)` -> (h, w, 2) float32 normalised grid."""
    theta = np.asarray(matrix, F32).reshape(2, 3)
    rescaled = theta.T / np.array([0.5 * w, 0.5 * h], F32)  # (3, 2)
    xs = np.arange(w, dtype=F32) + F32(-w * 0.5 + 0.5)
    ys = np.arange(h, dtype=F32) + F32(-h * 0.5 + 0.5)
    x, y = np.meshgrid(xs, ys)
    out = []
    for j in range(2):
        first = (x * rescaled[0, j]).astype(F32)
        acc = (y.astype(np.float64) * np.float64(rescaled[1, j]) + first).astype(F32)  # fma
        acc = (acc.astype(np.float64) + np.float64(rescaled[2, j])).astype(F32)  # fma(1, r2j)
        out.append(acc)
    return np.stack(out, axis=-1)


def grid_sample_nearest(img: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(B, H, W, C) image, (h, w, 2) grid -> (B, h, w, C); zeros outside, align_corners=False."""
    _, height, width, _ = img.shape
    ix = np.rint((grid[..., 0] + F32(1)) * F32(width / 2) - F32(0.5))
    iy = np.rint((grid[..., 1] + F32(1)) * F32(height / 2) - F32(0.5))
    inside = (ix >= 0) & (ix <= width - 1) & (iy >= 0) & (iy <= height - 1)
    ixc = np.clip(ix, 0, width - 1).astype(np.int64)
    iyc = np.clip(iy, 0, height - 1).astype(np.int64)
    out = img[:, iyc, ixc, :]
    return np.where(inside[None, :, :, None], out, np.zeros((), img.dtype))


def rotate(img: np.ndarray, angle: float) -> np.ndarray:
    """`TF.rotate(img, angle)` (nearest, expand=False, fill=None -> 0) on NHWC."""
    _, height, width, _ = img.shape
    grid = affine_grid(inverse_affine_matrix_rotate(angle), width, height)
    return grid_sample_nearest(img, grid)


def center_crop(img: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    _, height, width, _ = img.shape
    top = round((height - crop_h) / 2.0)
    left = round((width - crop_w) / 2.0)
    return img[:, top : top + crop_h, left : left + crop_w, :]


def rotate_flip(img, angle, flip, pad_h, pad_w, crop_h, crop_w):
    """One (angle, flip) of `_get_tail_augmented_features_rotflip`, NHWC numpy."""
    out = img[:, :, ::-1, :] if flip else img
    if angle != 0:
        out = np.pad(out, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)), mode="edge")
        out = rotate(out, angle)
    return center_crop(out, crop_h, crop_w)


def tail_augmentations(img, step, crop_h=None, crop_w=None, use_padding=True):
    """All copies, copy-major (angle -> flip -> image)."""
    _, height, width, _ = img.shape
    crop_h = height if crop_h is None else crop_h
    crop_w = width if crop_w is None else crop_w
    pad_w, pad_h = padding_for_rotation(crop_w, crop_h) if use_padding else (0, 0)
    outs = [
        rotate_flip(img, angle, flip, pad_h, pad_w, crop_h, crop_w)
        for angle in range(0, 360, step)
        for flip in (0, 1)
        if (angle, flip) != (0, 0)
    ]
    return np.concatenate(outs, axis=0)


def tie_mask(height, width, angle, flip, pad_h, pad_w, crop_h, crop_w, tol=1e-6):
    """Output pixels whose exact (float64) source coordinate lies on a nearest-rounding tie.

    At such pixels torch's choice depends on the last bit of its float32 GEMM (FMA order of
    the CPU/GPU kernel), so they are excluded from bit-exact comparisons.
    """
    del flip  # flipping permutes columns of the source, not the geometry of the grid
    if angle == 0:
        return np.zeros((crop_h, crop_w), bool)
    hp, wp = height + 2 * pad_h, width + 2 * pad_w
    top = round((hp - crop_h) / 2.0)
    left = round((wp - crop_w) / 2.0)
    rot = math.radians(-angle)
    a, b, c, d = math.cos(rot), math.sin(rot), -math.sin(rot), math.cos(rot)
    x = np.arange(left, left + crop_w) - wp * 0.5 + 0.5
    y = np.arange(top, top + crop_h) - hp * 0.5 + 0.5
    xx, yy = np.meshgrid(x, y)
    ix = a * xx + b * yy + wp / 2 - 0.5
    iy = c * xx + d * yy + hp / 2 - 0.5
    frac_x = np.abs(ix - np.floor(ix) - 0.5)
    frac_y = np.abs(iy - np.floor(iy) - 0.5)
    return (frac_x < tol) | (frac_y < tol)
