"""tailedcore_jax.augment against a NumPy port of torchvision's rotate and against torch itself."""

import functools
import importlib.util
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailedcore_jax.augment import (
    padding_for_rotation,
    rotate_flip,
    tail_augmentation_params,
    tail_augmentations,
)
from tests.reference import augment as ref

ANGLES = list(range(0, 360, 15))


def geometry(h, w, crop):
    if crop is None:
        return 0, 0, h, w
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    pad_w, pad_h = ref.padding_for_rotation(cw, ch)
    return pad_h, pad_w, ch, cw


def test_padding_for_rotation():
    assert padding_for_rotation(224, 224) == (47, 47)
    assert ref.padding_for_rotation(224, 224) == (47, 47)
    assert padding_for_rotation(20, 17) == ref.padding_for_rotation(17, 20)[::-1]


@pytest.mark.parametrize(
    "h, w, crop",
    [
        (31, 37, None),
        (37, 31, None),
        (24, 24, None),
        (40, 40, 28),
        (33, 33, 20),
        (41, 38, (21, 26)),
    ],
)
def test_rotate_flip_matches_reference_exactly(rng, h, w, crop):
    img = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    pad_h, pad_w, ch, cw = geometry(h, w, crop)
    f = jax.jit(rotate_flip, static_argnames=("pad", "crop"))
    for angle in ANGLES:
        for flip in (False, True):
            want = ref.rotate_flip(img, angle, flip, pad_h, pad_w, ch, cw)
            got = np.asarray(rotate_flip(img, angle, flip, pad=(pad_h, pad_w), crop=(ch, cw)))
            np.testing.assert_array_equal(got, want, err_msg=f"angle={angle} flip={flip}")
            traced = np.asarray(
                f(img, jnp.float32(angle), jnp.asarray(flip), pad=(pad_h, pad_w), crop=(ch, cw))
            )
            np.testing.assert_array_equal(traced, want, err_msg=f"traced angle={angle}")


@pytest.mark.parametrize("h, w, crop", [(31, 36, None), (36, 31, (20, 17))])
def test_rotate_flip_exact_except_rounding_ties(rng, h, w, crop):
    """(H - W) odd: 90/270 degrees put source centres exactly on .5; only those may differ."""
    img = rng.normal(size=(1, h, w, 2)).astype(np.float32)
    pad_h, pad_w, ch, cw = geometry(h, w, crop)
    n_diff = n_ties = 0
    for angle in ANGLES:
        for flip in (False, True):
            want = ref.rotate_flip(img, angle, flip, pad_h, pad_w, ch, cw)
            got = np.asarray(rotate_flip(img, angle, flip, pad=(pad_h, pad_w), crop=(ch, cw)))
            diff = np.any(got != want, axis=(0, 3))
            ties = ref.tie_mask(h, w, angle, flip, pad_h, pad_w, ch, cw)
            assert not np.any(diff & ~ties), f"non-tie pixel differs at angle={angle}"
            n_diff += int(diff.sum())
            n_ties += int(ties.sum())
    assert n_ties > 0  # the test really exercises ties
    assert n_diff <= n_ties


def test_default_crop_and_pad(rng):
    img = rng.normal(size=(1, 30, 30, 1)).astype(np.float32)
    # crop smaller than the image -> pad defaults to padding_for_rotation(crop)
    got = np.asarray(rotate_flip(img, 30, True, crop=20))
    np.testing.assert_array_equal(got, ref.rotate_flip(img, 30, True, 5, 5, 20, 20))
    # no crop -> no pad, output keeps the input size (zero-filled corners)
    got = np.asarray(rotate_flip(img, 45, False))
    np.testing.assert_array_equal(got, ref.rotate(img, 45))
    assert got[0, 0, 0, 0] == 0.0
    np.testing.assert_array_equal(np.asarray(rotate_flip(img, 0, False)), img)
    np.testing.assert_array_equal(np.asarray(rotate_flip(img, 0, True)), img[:, :, ::-1])


def test_traced_angle_compiles_once_and_batches(rng):
    img = rng.normal(size=(2, 26, 26, 3)).astype(np.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(angle, flip):
        return rotate_flip(img, angle, flip, crop=18)

    for angle in (0, 15, 90, 135, 330):
        for flip in (False, True):
            np.testing.assert_array_equal(
                np.asarray(f(jnp.float32(angle), jnp.asarray(flip))),
                ref.rotate_flip(img, angle, flip, 4, 4, 18, 18),
            )
    angles = jnp.asarray([15.0, 60.0, 0.0, 300.0])
    flips = jnp.asarray([True, False, True, False])
    batched = np.asarray(jax.vmap(lambda a, fl: rotate_flip(img, a, fl, crop=18))(angles, flips))
    for i in range(4):
        want = ref.rotate_flip(img, float(angles[i]), bool(flips[i]), 4, 4, 18, 18)
        np.testing.assert_array_equal(batched[i], want)


def test_params_counts_and_order():
    assert len(tail_augmentation_params("rot15flip")) == 47
    assert len(tail_augmentation_params("rot30flip")) == 23
    assert len(tail_augmentation_params("rot45flip")) == 15
    assert tail_augmentation_params("rotflip") == (
        (0, True),
        (90, False),
        (90, True),
        (180, False),
        (180, True),
        (270, False),
        (270, True),
    )


@pytest.mark.parametrize("kind, step", [("rot30flip", 30), ("rot45flip", 45)])
def test_tail_augmentations_match_reference(rng, kind, step):
    img = rng.normal(size=(3, 36, 36, 2)).astype(np.float32)
    got = np.asarray(tail_augmentations(img, kind, crop=28))
    want = ref.tail_augmentations(img, step, 28, 28)
    assert got.shape == (len(tail_augmentation_params(kind)) * 3, 28, 28, 2)
    np.testing.assert_array_equal(got, want)
    # copy-major order: rows [c*B:(c+1)*B] are copy c of all images
    first = tail_augmentation_params(kind)[0]
    np.testing.assert_array_equal(got[:3], ref.rotate_flip(img, first[0], first[1], 6, 6, 28, 28))


def test_tail_augmentations_rotflip(rng):
    img = rng.normal(size=(2, 20, 20, 3)).astype(np.float32)
    got = np.asarray(tail_augmentations(img, "rotflip"))
    want = ref.tail_augmentations(img, 90, use_padding=False)
    np.testing.assert_array_equal(got, want)
    # on a square image TF.rotate by 90 is an exact pixel permutation
    np.testing.assert_array_equal(got[2:4], np.rot90(img, k=1, axes=(1, 2)))


def test_tail_augmentations_full_size_rot15flip(rng):
    """The MVTec case: 256x256 Resize(256) images, 47 copies, crop 224, replicate pad 47."""
    img = rng.normal(size=(1, 256, 256, 1)).astype(np.float32)
    got = np.asarray(tail_augmentations(img, "rot15flip"))
    assert got.shape == (47, 224, 224, 1)
    np.testing.assert_array_equal(got, ref.tail_augmentations(img, 15, 224, 224))
    np.testing.assert_array_equal(got[0], img[0, 16:240, 16:240][:, ::-1])  # angle 0, flip


def _torch_rotate():
    """torchvision's rotate, or (torchvision not importable) its tensor kernel file alone."""
    torch = pytest.importorskip("torch")
    try:
        import torchvision.transforms.functional as tf

        def rotate(t, angle):
            return tf.rotate(t, angle)

        return torch, rotate, "torchvision.transforms.functional.rotate"
    except Exception:  # noqa: BLE001 - a broken torchvision build raises RuntimeError on import
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("torchvision not installed")
        path = os.path.join(
            next(iter(spec.submodule_search_locations)), "transforms", "_functional_tensor.py"
        )
        if not os.path.exists(path):
            pytest.skip("torchvision tensor kernels not found")
        mod_spec = importlib.util.spec_from_file_location("_tv_functional_tensor", path)
        ft = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(ft)

        def rotate(t, angle):
            m = ref.inverse_affine_matrix_rotate(angle)
            return ft.rotate(t, matrix=m, interpolation="nearest", expand=False, fill=None)

        return torch, rotate, "torchvision _functional_tensor.rotate (standalone)"


@pytest.mark.parametrize("h, w, crop", [(40, 40, 28), (31, 37, None), (37, 31, None)])
def test_matches_torch(rng, h, w, crop):
    torch, rotate, _ = _torch_rotate()
    img = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    pad_h, pad_w, ch, cw = geometry(h, w, crop)
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(0, 3, 1, 2)))
    for angle in ANGLES:
        for flip in (False, True):
            x = t.flip(-1) if flip else t  # TF.hflip
            if angle != 0:
                x = torch.nn.functional.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="replicate")
                x = rotate(x, angle)
            top = round((x.shape[-2] - ch) / 2.0)
            left = round((x.shape[-1] - cw) / 2.0)
            want = x[..., top : top + ch, left : left + cw].numpy().transpose(0, 2, 3, 1)
            got = np.asarray(rotate_flip(img, angle, flip, pad=(pad_h, pad_w), crop=(ch, cw)))
            np.testing.assert_array_equal(got, want, err_msg=f"angle={angle} flip={flip}")


def test_bad_input(rng):
    img = rng.normal(size=(2, 30, 30, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="empty"):
        tail_augmentations(img[:0], "rot30flip", crop=20)
    with pytest.raises(ValueError, match="unknown augmentation kind"):
        tail_augmentations(img, "rot10flip", crop=20)
    with pytest.raises(ValueError, match="rank 4"):
        tail_augmentations(img[0], "rotflip")
    with pytest.raises(ValueError, match="rank 4"):
        rotate_flip(img[0], 15, False)
    with pytest.raises(ValueError, match="crop"):
        rotate_flip(img, 15, False, crop=31)
    with pytest.raises(ValueError, match="crop"):
        tail_augmentations(img, "rot15flip")  # default crop 224 > 30
    with pytest.raises(ValueError, match="scalar"):
        rotate_flip(img, jnp.zeros(2), False)
    with pytest.raises(ValueError, match="pad"):
        rotate_flip(img, 15, False, pad=-1)
    with pytest.raises(TypeError, match="pair"):
        rotate_flip(img, 15, False, crop="big")


def test_jit_of_tail_augmentations(rng):
    img = rng.normal(size=(2, 24, 24, 1)).astype(np.float32)
    f = jax.jit(functools.partial(tail_augmentations, kind="rot45flip", crop=16))
    np.testing.assert_array_equal(np.asarray(f(img)), ref.tail_augmentations(img, 45, 16, 16))
