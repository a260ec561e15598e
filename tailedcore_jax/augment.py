"""Rotation / flip augmentation of tail images, equal to the torchvision pipeline of TailedCore.

JAX port of the inline augmentation of ``TailedCore._get_tail_augmented_features_rotflip``
(and its 90-degree VisA variant) in jungyg/TailedCore ``src/coreset_model.py``. Per
(angle, flip) and image:

1. ``TF.hflip`` when ``flip``;
2. when ``angle != 0``: ``F.pad(mode="replicate")`` by ``calculate_padding_for_rotation`` on
   every side, then ``TF.rotate(angle)`` (counter-clockwise, nearest, ``expand=False``, fill 0);
3. ``TF.center_crop`` (``top = int(round((H - crop_h) / 2))``, Python's half-to-even round).

The rotation follows torchvision's tensor path (``_functional_tensor.rotate``: inverse matrix
of ``_get_inverse_affine_matrix``, base grid ``x = -W/2 + 0.5 + j`` rescaled by ``(W/2, H/2)``,
``grid_sample(nearest, zeros, align_corners=False)`` with CPU unnormalization ``(g + 1) * (W /
2) - 0.5`` and round-half-to-even), in float32, evaluated only on the output crop; clamped
gather indices into the un-padded image are the replicate padding. The result equals
torchvision bit for bit except at exact ``k + 0.5`` ties decided by float32 rounding (possible
for 90/270 degrees when ``H - W`` is odd), where torch's choice depends on its ``bmm``'s
operation order. Python and traced integer angles use torchvision's float64-derived matrix;
non-integer traced angles use device float32 trigonometry. NHWC.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from tailedcore_jax._validation import check_rank, is_concrete

__all__ = [
    "padding_for_rotation",
    "rotate_flip",
    "tail_augmentation_params",
    "tail_augmentations",
]

_KINDS = {"rot15flip": 15, "rot30flip": 30, "rot45flip": 45, "rotflip": 90}


def padding_for_rotation(crop_h: int, crop_w: int) -> tuple[int, int]:
    """Replicate padding that keeps a rotated ``crop_h x crop_w`` centre crop free of fill.

    Port of `calculate_padding_for_rotation(width, height)` in jungyg/TailedCore:
    ``ceil((sqrt(w^2 + h^2) - side) / 2)`` per side; 47 for 224 x 224.

    Returns:
        ``(pad_h, pad_w)``: rows added above and below, columns added left and right.
    """
    diagonal = math.sqrt(crop_w**2 + crop_h**2)
    return math.ceil((diagonal - crop_h) / 2), math.ceil((diagonal - crop_w) / 2)


def _inverse_rotation(angle_degrees: float) -> np.ndarray:
    """torchvision's inverse affine matrix entries (a, b, c, d) for `rotate(angle)`, float32.

    `F.rotate` calls `_get_inverse_affine_matrix([0, 0], -angle, ...)`; with zero centre,
    translation and shear the matrix is ``[cos r, sin r, 0, -sin r, cos r, 0]`` with
    ``r = radians(-angle)``, computed in float64 and cast to float32 by ``torch.tensor``.
    """
    rot = math.radians(-float(angle_degrees))
    return np.array([math.cos(rot), math.sin(rot), -math.sin(rot), math.cos(rot)], np.float32)


# torchvision's float32 matrices for every integer angle 0..359: a traced integer-valued angle
# reads this table, so it gets exactly the host (float64 -> float32) matrix. Device float32
# trigonometry would be off by an ulp, which flips pixels at the exact .5 ties that multiples
# of 30 degrees produce (cos 60 = 0.5).
_INTEGER_ANGLE_TABLE = np.stack([_inverse_rotation(a) for a in range(360)])


def _inverse_rotation_traced(angle_degrees):
    angle = jnp.asarray(angle_degrees, jnp.float32)
    rounded = jnp.round(angle)
    is_integer = (rounded == angle) & (jnp.abs(angle) < 2.0**24)
    index = jnp.mod(jnp.where(is_integer, rounded, 0.0).astype(jnp.int32), 360)
    from_table = jnp.asarray(_INTEGER_ANGLE_TABLE)[index]
    rot = jnp.deg2rad(-angle)
    c, s = jnp.cos(rot), jnp.sin(rot)
    from_trig = jnp.stack([c, s, -s, c])
    return jnp.where(is_integer, from_table, from_trig)


def _center_offset(size: int, crop: int) -> int:
    # TF.center_crop: int(round((size - crop) / 2.0)); Python rounds half to even.
    return round((size - crop) / 2.0)


def _normalize_pair(value, name):
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value), int(value)
    try:
        a, b = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    return int(a), int(b)


def _source_indices(theta, flip, is_identity, *, height, width, pad, crop):
    """Integer source rows/cols (into the un-padded image) and validity for one (angle, flip).

    Args:
        theta: ``(4,)`` float32 inverse rotation entries ``(a, b, c, d)``.
        flip: bool scalar (hflip before padding/rotation).
        is_identity: bool scalar; True when ``angle == 0`` (no padding, no rotation).
    """
    pad_h, pad_w = pad
    crop_h, crop_w = crop
    hp, wp = height + 2 * pad_h, width + 2 * pad_w
    f32 = jnp.float32

    # Rotated path: output pixel (i, j) of the crop is pixel (top + i, left + j) of the padded,
    # rotated image.
    top, left = _center_offset(hp, crop_h), _center_offset(wp, crop_w)
    x = jnp.arange(left, left + crop_w, dtype=f32) + f32(-wp * 0.5 + 0.5)  # base grid x
    y = jnp.arange(top, top + crop_h, dtype=f32) + f32(-hp * 0.5 + 0.5)
    a, b, c, d = theta[0], theta[1], theta[2], theta[3]
    # rescaled_theta = theta^T / (W/2, H/2); grid = base @ rescaled_theta (+ zero translation).
    gx = x[None, :] * (a / f32(0.5 * wp)) + y[:, None] * (b / f32(0.5 * wp))
    gy = x[None, :] * (c / f32(0.5 * hp)) + y[:, None] * (d / f32(0.5 * hp))
    # grid_sample, align_corners=False, CPU kernel: (g + 1) * (size / 2) - 0.5, then rint.
    ix = jnp.round((gx + f32(1.0)) * f32(wp / 2) - f32(0.5))
    iy = jnp.round((gy + f32(1.0)) * f32(hp / 2) - f32(0.5))
    inside = (ix >= 0) & (ix <= wp - 1) & (iy >= 0) & (iy <= hp - 1)
    ix = jnp.clip(ix, 0, wp - 1).astype(jnp.int32)
    iy = jnp.clip(iy, 0, hp - 1).astype(jnp.int32)

    # Identity path (angle == 0): plain centre crop of the un-padded image, in padded coords.
    top0 = pad_h + _center_offset(height, crop_h)
    left0 = pad_w + _center_offset(width, crop_w)
    iy0 = jnp.broadcast_to(jnp.arange(top0, top0 + crop_h, dtype=jnp.int32)[:, None], ix.shape)
    ix0 = jnp.broadcast_to(jnp.arange(left0, left0 + crop_w, dtype=jnp.int32)[None, :], ix.shape)

    ix = jnp.where(is_identity, ix0, ix)
    iy = jnp.where(is_identity, iy0, iy)
    inside = inside | is_identity
    # Replicate padding = clamping the padded coordinate back into the image.
    rows = jnp.clip(iy - pad_h, 0, height - 1)
    cols = jnp.clip(ix - pad_w, 0, width - 1)
    cols = jnp.where(flip, width - 1 - cols, cols)
    return rows, cols, inside


def _apply(images, theta, flip, is_identity, *, pad, crop):
    _, height, width, _ = images.shape
    rows, cols, inside = _source_indices(
        theta, flip, is_identity, height=height, width=width, pad=pad, crop=crop
    )
    out = images[:, rows, cols, :]  # (B, crop_h, crop_w, C)
    return jnp.where(inside[None, :, :, None], out, jnp.zeros((), images.dtype))


def _resolve_geometry(shape, pad, crop):
    _, height, width, _ = shape
    crop = _normalize_pair(crop, "crop")
    if crop is None:
        crop = (height, width)
    if crop[0] < 1 or crop[1] < 1 or crop[0] > height or crop[1] > width:
        raise ValueError(f"crop {crop} must be positive and fit in the {height}x{width} image")
    pad = _normalize_pair(pad, "pad")
    if pad is None:
        pad = padding_for_rotation(*crop) if crop != (height, width) else (0, 0)
    if pad[0] < 0 or pad[1] < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    return pad, crop


def _check_images(images):
    check_rank("images", images, 4)


def rotate_flip(
    images: Float[Array, "b h w c"],
    angle_degrees,
    flip,
    *,
    pad: int | tuple[int, int] | None = None,
    crop: int | tuple[int, int] | None = None,
) -> Float[Array, "b ch cw c"]:
    """Flip, replicate-pad, rotate and centre-crop a batch like TailedCore's torchvision code.

    Steps 1-3 of the module docstring with the given ``pad`` and ``crop``.

    Args:
        images: ``(B, H, W, C)`` NHWC images (any dtype; values are only gathered).
        angle_degrees: counter-clockwise angle in degrees, a Python number or a traced
            scalar (one compilation for all angles).
        flip: bool (Python or traced scalar): horizontal flip before rotating.
        pad: ``int`` or ``(pad_h, pad_w)`` replicate padding applied before a non-zero
            rotation; static. ``None``: `padding_for_rotation(crop)` when ``crop`` is smaller
            than the image, else 0.
        crop: ``int`` or ``(crop_h, crop_w)`` centre crop of the result; static. ``None``:
            the input size.

    Returns:
        ``(B, crop_h, crop_w, C)`` in the dtype of ``images``.

    Raises:
        ValueError: rank != 4, crop larger than the image, negative pad.
        TypeError: malformed ``pad``/``crop``.

    References:
        Jung et al., "TailedCore", CVPR 2025; torchvision `transforms.functional.rotate`.
    """
    _check_images(images)
    pad, crop = _resolve_geometry(images.shape, pad, crop)
    if jnp.ndim(angle_degrees) != 0:
        raise ValueError(f"angle_degrees must be a scalar, got shape {jnp.shape(angle_degrees)}")
    if is_concrete(angle_degrees):
        # Host float64 trigonometry, rounded to float32: torchvision's exact matrix.
        theta = jnp.asarray(_inverse_rotation(float(angle_degrees)))
        is_identity = jnp.asarray(float(angle_degrees) == 0.0)
    else:
        theta = _inverse_rotation_traced(angle_degrees)
        is_identity = jnp.asarray(angle_degrees) == 0
    if jnp.ndim(flip) != 0:
        raise ValueError(f"flip must be a scalar, got shape {jnp.shape(flip)}")
    return _rotate_flip_jit(
        jnp.asarray(images), theta, jnp.asarray(flip, bool), is_identity, pad=pad, crop=crop
    )


_rotate_flip_jit = jax.jit(_apply, static_argnames=("pad", "crop"))


def tail_augmentation_params(kind: str) -> tuple[tuple[int, bool], ...]:
    """The ``(angle, flip)`` pairs of an augmentation kind, in the official loop order.

    ``for angle in range(0, 360, step): for flip in (0, 1): skip (0, 0)`` with step 15, 30,
    45 (``rot15flip``/``rot30flip``/``rot45flip``: 47/23/15 copies) or 90 (``rotflip``: 7).
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown augmentation kind {kind!r}; expected one of {sorted(_KINDS)}")
    step = _KINDS[kind]
    return tuple(
        (angle, bool(flip))
        for angle in range(0, 360, step)
        for flip in (0, 1)
        if (angle, flip) != (0, 0)
    )


def tail_augmentations(
    images: Float[Array, "b h w c"],
    kind: str,
    *,
    crop: int | tuple[int, int] = 224,
) -> Float[Array, "copies_b ch cw c"]:
    """All augmented copies of the tail images for one augmentation kind.

    ``rot15flip`` / ``rot30flip`` / ``rot45flip`` (MVTec): ``images`` are the uncropped
    ``Resize(256)`` images; each copy is :func:`rotate_flip` with ``crop`` and
    ``pad = padding_for_rotation(crop)``. ``rotflip`` (VisA): already cropped images, angles
    0/90/180/270, no pad, no crop. Row ``copy * B + b`` is image ``b`` under
    ``tail_augmentation_params(kind)[copy]`` (the official angle -> flip -> image order within
    a batch); the unaugmented images are not included. All copies run in one vmapped gather.

    Args:
        images: ``(B, H, W, C)`` NHWC tail images, ``B >= 1``.
        kind: ``"rot15flip" | "rot30flip" | "rot45flip" | "rotflip"``; static.
        crop: centre-crop size of the rot*flip kinds; static.

    Returns:
        ``(copies * B, crop_h, crop_w, C)`` (``(7 * B, H, W, C)`` for ``rotflip``).

    Raises:
        ValueError: unknown ``kind``, rank != 4, ``B == 0``, crop larger than the image.

    References:
        Jung et al., "TailedCore", CVPR 2025 (`_get_tail_augmented_features_rotflip`).
    """
    params = tail_augmentation_params(kind)
    _check_images(images)
    if images.shape[0] == 0:
        raise ValueError("tail_augmentations: the tail is empty (B == 0), nothing to augment")
    if kind == "rotflip":
        pad, crop_hw = (0, 0), (images.shape[1], images.shape[2])
    else:
        crop_hw = _normalize_pair(crop, "crop")
        pad, crop_hw = _resolve_geometry(images.shape, padding_for_rotation(*crop_hw), crop_hw)
    thetas = jnp.asarray(np.stack([_inverse_rotation(a) for a, _ in params]))
    flips = jnp.asarray([f for _, f in params])
    identity = jnp.asarray([a == 0 for a, _ in params])
    return _augment_all(jnp.asarray(images), thetas, flips, identity, pad=pad, crop=crop_hw)


@functools.partial(jax.jit, static_argnames=("pad", "crop"))
def _augment_all(images, thetas, flips, identity, *, pad, crop):
    one = functools.partial(_apply, pad=pad, crop=crop)
    out = jax.vmap(one, in_axes=(None, 0, 0, 0))(images, thetas, flips, identity)
    return out.reshape((-1,) + out.shape[2:])
