"""Tests for tailedcore_jax.anomaly_map against scipy / a numpy bilinear oracle / torch."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from tailedcore_jax.anomaly_map import anomaly_maps, gaussian_matrix, resize_matrix
from tests.reference.anomaly_map import (
    bilinear_align_corners_false,
    nearest_legacy,
    torch_reflect_gaussian,
)


def _ref(x, hw, sigma, truncate=4.0):
    up = bilinear_align_corners_false(x, hw)
    if not sigma:
        return up
    return np.stack([ndimage.gaussian_filter(m, sigma=sigma, truncate=truncate) for m in up])


def _close(a, b, rtol=1e-5):
    scale = float(np.max(np.abs(b))) + 1e-12
    np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize(
    "in_hw,out_hw,sigma",
    [
        ((28, 28), (224, 224), 4.0),
        ((7, 5), (31, 17), 1.0),  # non-square, odd sizes
        ((6, 9), (13, 40), 2.0),
        ((9, 11), (4, 6), 1.0),  # downsampling (torch semantics, no antialias)
        ((3, 2), (5, 3), 4.0),  # radius 16 > image: scipy's repeated reflection
        ((8, 8), (8, 8), 0.0),  # identity resize, no smoothing
    ],
)
def test_matches_scipy_and_bilinear_oracle(rng, in_hw, out_hw, sigma):
    x = rng.normal(size=(2, *in_hw)).astype(np.float32)
    f = jax.jit(functools.partial(anomaly_maps, out_size=out_hw, sigma=sigma))
    out = f(x)
    assert out.shape == (2, *out_hw) and out.dtype == jnp.float32
    _close(out, _ref(x, out_hw, sigma))


def test_int_out_size_and_sigma_none(rng):
    x = rng.random((1, 10, 10)).astype(np.float32)
    out = anomaly_maps(x, 23, sigma=None)
    _close(out, bilinear_align_corners_false(x, (23, 23)))
    # sigma None and 0 are the same switch
    np.testing.assert_array_equal(out, anomaly_maps(x, (23, 23), sigma=0))


@pytest.mark.parametrize("sigma", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("n", [1, 2, 3, 9, 40])
def test_gaussian_matrix_equals_scipy_reflect(rng, sigma, n):
    x = rng.normal(size=n)
    for truncate in (4.0, 2.5):
        ref = ndimage.gaussian_filter1d(x, sigma, mode="reflect", truncate=truncate)
        np.testing.assert_allclose(
            gaussian_matrix(n, sigma, truncate=truncate) @ x, ref, rtol=1e-12, atol=1e-12
        )


def test_reflect_padding_option(rng):
    x = rng.normal(size=(2, 6, 5)).astype(np.float32)
    out = anomaly_maps(x, (40, 36), sigma=2.0, padding="reflect")
    ref = torch_reflect_gaussian(bilinear_align_corners_false(x, (40, 36)), 2.0)
    _close(out, ref)
    # the two paddings really differ at the border
    sym = anomaly_maps(x, (40, 36), sigma=2.0)
    assert np.max(np.abs(np.asarray(sym) - np.asarray(out))) > 1e-3


def test_nearest_option(rng):
    x = rng.normal(size=(2, 5, 7)).astype(np.float32)
    out = anomaly_maps(x, (12, 9), sigma=None, upsample="nearest")
    np.testing.assert_array_equal(np.asarray(out), nearest_legacy(x, (12, 9)).astype(np.float32))
    out_s = anomaly_maps(x, (12, 9), sigma=1.0, upsample="nearest")
    ref = np.stack([ndimage.gaussian_filter(m, 1.0) for m in nearest_legacy(x, (12, 9))])
    _close(out_s, ref)


def test_resize_matrix_rows_sum_to_one():
    for n_in, n_out in [(28, 224), (9, 4), (1, 5), (5, 1)]:
        np.testing.assert_allclose(resize_matrix(n_in, n_out).sum(1), 1.0, rtol=1e-12)


def test_upsampling_equals_jax_image_resize(rng):
    # jax.image.resize('linear') equals torch's bilinear interpolation when upsampling
    x = rng.normal(size=(2, 28, 28)).astype(np.float32)
    ref = jax.image.resize(jnp.asarray(x), (2, 224, 224), "linear")
    _close(anomaly_maps(x, 224, sigma=None), np.asarray(ref))


def test_vmap_over_classes(rng):
    x = rng.normal(size=(3, 2, 7, 7)).astype(np.float32)
    f = jax.jit(jax.vmap(functools.partial(anomaly_maps, out_size=(20, 15), sigma=2.0)))
    out = f(x)
    assert out.shape == (3, 2, 20, 15)
    for c in range(3):
        _close(out[c], _ref(x[c], (20, 15), 2.0))


def test_compiles_once(rng):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x):
        return anomaly_maps(x, 32, sigma=4.0)

    for _ in range(3):
        f(jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float32))


@pytest.mark.parametrize(
    "in_hw,out_hw", [((28, 28), (224, 224)), ((7, 5), (31, 17)), ((9, 11), (4, 6))]
)
def test_torch_cross_check(rng, in_hw, out_hw):
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(2, *in_hw)).astype(np.float32)
    up = torch.nn.functional.interpolate(
        torch.from_numpy(x)[:, None], size=out_hw, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    ref = np.stack([ndimage.gaussian_filter(m, sigma=4) for m in up])
    _close(anomaly_maps(x, out_hw), ref)
    near = torch.nn.functional.interpolate(
        torch.from_numpy(x)[:, None], size=out_hw, mode="nearest"
    )
    np.testing.assert_array_equal(
        np.asarray(anomaly_maps(x, out_hw, sigma=None, upsample="nearest")), near[:, 0].numpy()
    )


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((np.zeros((4, 4), np.float32), 8), {}, ValueError, "rank 3"),
        ((np.zeros((1, 4, 4, 1), np.float32), 8), {}, ValueError, "rank 3"),
        ((np.zeros((1, 0, 4), np.float32), 8), {}, ValueError, "non-empty"),
        ((np.zeros((1, 4, 4), np.float32), 0), {}, ValueError, "positive"),
        ((np.zeros((1, 4, 4), np.float32), (8, -1)), {}, ValueError, "positive"),
        ((np.zeros((1, 4, 4), np.float32), 8.0), {}, TypeError, "out_size"),
        ((np.zeros((1, 4, 4), np.float32), (8, 8, 8)), {}, TypeError, "out_size"),
        ((np.zeros((1, 4, 4), np.int32), 8), {}, TypeError, "floating"),
        ((np.zeros((1, 4, 4), np.float32), 8), {"sigma": -1.0}, ValueError, "sigma"),
        ((np.zeros((1, 4, 4), np.float32), 8), {"truncate": 0.0}, ValueError, "truncate"),
        ((np.zeros((1, 4, 4), np.float32), 8), {"padding": "zeros"}, ValueError, "padding"),
        ((np.zeros((1, 4, 4), np.float32), 8), {"upsample": "bicubic"}, ValueError, "upsample"),
        ((np.full((1, 4, 4), np.nan, np.float32), 8), {}, ValueError, "non-finite"),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        anomaly_maps(*args, **kwargs)


def test_rank_error_at_trace_time():
    with pytest.raises(ValueError, match="rank 3"):
        jax.jit(lambda x: anomaly_maps(x, 8))(jnp.zeros((4, 4)))
