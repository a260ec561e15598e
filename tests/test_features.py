"""tailedcore_jax.features against the plain-numpy port of the official aggregation.

Oracles: ``tests/reference/features.py`` (loops, float64, step by step in the official order)
and, where torch is importable, the same pipeline written with the torch ops the official
code calls (``Unfold``, ``F.interpolate``, ``F.adaptive_avg_pool1d``, ``AvgPool2d``).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailedcore_jax import features
from tests.reference import features as ref

try:
    import torch
    import torch.nn.functional as torch_f
except ImportError:  # pragma: no cover - torch is optional
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not importable")

ATOL = 1e-5


def _maps(rng, batch, *specs):
    return [rng.standard_normal((batch, h, w, c)).astype(np.float32) for (h, w, c) in specs]


# ----------------------------------------------------------------------------- adaptive pool


POOL_CASES = [(4608, 1024), (9216, 1024), (2048, 1024), (144, 32), (10, 7), (7, 10), (1, 3), (5, 5)]


@pytest.mark.parametrize("length,out", POOL_CASES)
def test_adaptive_pool_matrix_and_jax_match_numpy_oracle(rng, length, out):
    x = rng.standard_normal((3, length)).astype(np.float32)
    want = ref.adaptive_avg_pool1d(x, out)
    mat = features.adaptive_avg_pool_matrix(length, out)
    assert mat.shape == (length, out)
    np.testing.assert_allclose(x.astype(np.float64) @ mat.astype(np.float64), want, atol=ATOL)
    got = jax.jit(lambda v: features.adaptive_avg_pool1d(v, out))(x)
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=1e-6)
    start, end = features.adaptive_avg_pool_bins(length, out)
    assert [tuple(b) for b in zip(start.tolist(), end.tolist())] == ref.adaptive_pool_bins(
        length, out
    )


def test_adaptive_pool_bins_layer2_are_uneven_and_overlapping():
    start, end = features.adaptive_avg_pool_bins(512 * 9, 1024)
    # 4.5 elements per bin: [0, 5), [4, 9), [9, 14), [13, 18), ...
    assert start[:4].tolist() == [0, 4, 9, 13]
    assert end[:4].tolist() == [5, 9, 14, 18]
    # layer3: exactly the 9 elements of one channel per bin
    start, end = features.adaptive_avg_pool_bins(1024 * 9, 1024)
    assert np.all(end - start == 9) and np.all(start == 9 * np.arange(1024))


@needs_torch
@pytest.mark.parametrize("length,out", POOL_CASES + [(13824, 1024), (1000, 999)])
def test_adaptive_pool_matches_torch(rng, length, out):
    x = rng.standard_normal((4, length)).astype(np.float32)
    want = torch_f.adaptive_avg_pool1d(torch.from_numpy(x)[:, None], out)[:, 0].numpy()
    np.testing.assert_allclose(x @ features.adaptive_avg_pool_matrix(length, out), want, atol=ATOL)
    got = jax.jit(lambda v: features.adaptive_avg_pool1d(v, out))(x)
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL)


def test_adaptive_pool_bad_input():
    with pytest.raises(ValueError, match="out must be >= 1"):
        features.adaptive_avg_pool1d(jnp.ones((2, 4)), 0)
    with pytest.raises(TypeError, match="floating"):
        features.adaptive_avg_pool1d(jnp.ones((2, 4), jnp.int32), 2)
    with pytest.raises(TypeError, match="int"):
        features.adaptive_avg_pool_bins(4.0, 2)


# -------------------------------------------------------------------- patchcore aggregation


# (layer specs (h, w, C), kwargs). The first case keeps the real ratios of WRN-50-2 at 224 px
# (28x28 / 14x14 grids, C2*9 / pretrain = 4.5 as 4608 / 1024, C3*9 / pretrain = 9) with 32x fewer
# channels.
AGG_CASES = [
    ([(28, 28, 16), (14, 14, 32)], {"dim": 32, "pretrain_dim": 32}),
    ([(20, 28, 24), (10, 14, 40)], {"dim": 64, "pretrain_dim": 96}),  # non-square
    ([(15, 15, 8), (8, 8, 12)], {"dim": 50, "pretrain_dim": 70}),  # odd grid, uneven bins
    ([(12, 10, 6), (6, 5, 10)], {"dim": 40, "pretrain_dim": 200}),  # pretrain_dim > C*9 (layer2)
    ([(9, 9, 7), (5, 5, 5)], {"dim": 16, "pretrain_dim": 24, "patch_size": 5}),
    ([(9, 9, 7), (5, 5, 5)], {"dim": 16, "pretrain_dim": 24, "patch_size": 1}),
    (
        [(8, 9, 7), (4, 5, 5)],
        {"dim": 16, "pretrain_dim": 24, "patch_size": 2},
    ),  # even: grid shrinks
    ([(16, 16, 8), (8, 8, 16), (4, 4, 32)], {"dim": 48, "pretrain_dim": 32}),  # three layers
    ([(7, 6, 9)], {"dim": 20, "pretrain_dim": 30}),  # one layer
    ([(6, 6, 8), (3, 3, 64)], {"dim": 16, "pretrain_dim": 32}),  # C3 = 2 * pretrain_dim
    ([(10, 10, 6), (10, 10, 6)], {"dim": 48, "pretrain_dim": 32}),  # same grid: no resize
]


@pytest.mark.parametrize("specs,kwargs", AGG_CASES)
def test_patchcore_features_matches_reference(rng, specs, kwargs):
    maps = _maps(rng, 2, *specs)
    want = ref.patchcore_features(*maps, **kwargs)
    got = jax.jit(lambda *m: features.patchcore_features(*m, **kwargs))(*maps)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=1e-5)


def test_patchcore_features_real_channel_counts(rng):
    # WRN-50-2 layer2 / layer3 at 224 px: (28, 28, 512) / (14, 14, 1024), one image.
    l2, l3 = _maps(rng, 1, (28, 28, 512), (14, 14, 1024))
    l2, l3 = np.maximum(l2, 0), np.maximum(l3, 0)  # post-ReLU like the real taps
    want = ref.patchcore_features(l2, l3)
    got = jax.jit(features.patchcore_features)(l2, l3)
    assert got.shape == (1, 28, 28, 1024)
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=1e-5)
    # Spec 2.3: dims 512..1023 are means of consecutive pairs of per-channel 3x3 means of layer3.
    p3 = ref.resize_bilinear(ref.patchify(l3).mean(axis=(-1, -2)), (28, 28))
    np.testing.assert_allclose(
        np.asarray(got)[..., 512:], p3.reshape(1, 28, 28, 512, 2).mean(-1), atol=ATOL
    )


def test_patchcore_features_list_argument_and_default_dim(rng):
    l2, l3 = _maps(rng, 2, (6, 6, 8), (3, 3, 16))
    a = jax.jit(features.patchcore_features)(l2, l3)
    b = jax.jit(features.patchcore_features)([l2, l3])
    assert a.shape == (2, 6, 6, 1024)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_torch
@pytest.mark.parametrize("specs,kwargs", [AGG_CASES[0], AGG_CASES[1], AGG_CASES[2], AGG_CASES[7]])
def test_patchcore_features_matches_torch_pipeline(rng, specs, kwargs):
    """The official post-backbone steps written with the torch ops FeatureEmbedder uses."""
    maps = _maps(rng, 2, *specs)
    p = kwargs.get("patch_size", 3)
    pad = (p - 1) // 2
    patches, grids = [], []
    for m in maps:
        x = torch.from_numpy(m).permute(0, 3, 1, 2)  # NCHW
        unf = torch.nn.Unfold(kernel_size=p, stride=1, padding=pad, dilation=1)(x)
        grid = [s + 2 * pad - (p - 1) for s in x.shape[-2:]]
        unf = unf.reshape(x.shape[0], x.shape[1], p, p, -1).permute(0, 4, 1, 2, 3)
        patches.append(unf)
        grids.append(grid)
    ref_grid = grids[0]
    for i in range(1, len(patches)):
        f = patches[i].reshape(patches[i].shape[0], *grids[i], *patches[i].shape[2:])
        f = f.permute(0, 3, 4, 5, 1, 2)
        base = f.shape
        f = torch_f.interpolate(
            f.reshape(-1, *f.shape[-2:]).unsqueeze(1),
            size=tuple(ref_grid),
            mode="bilinear",
            align_corners=False,
        ).squeeze(1)
        f = f.reshape(*base[:-2], *ref_grid).permute(0, 4, 5, 1, 2, 3)
        patches[i] = f.reshape(len(f), -1, *f.shape[-3:])
    flat = [f.reshape(-1, *f.shape[-3:]) for f in patches]
    pre = [
        torch_f.adaptive_avg_pool1d(f.reshape(len(f), 1, -1), kwargs["pretrain_dim"]).squeeze(1)
        for f in flat
    ]
    stacked = torch.stack(pre, dim=1)
    want = torch_f.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), kwargs["dim"])
    want = want.reshape(maps[0].shape[0], *ref_grid, kwargs["dim"]).numpy()
    got = jax.jit(lambda *m: features.patchcore_features(*m, **kwargs))(*maps)
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("specs", [[(28, 28, 16), (14, 14, 32)], [(15, 15, 8), (8, 8, 12)]])
def test_anomalib_mode_matches_reference(rng, specs):
    maps = _maps(rng, 2, *specs)
    want = ref.anomalib_features(*maps)
    got = jax.jit(lambda a, b: features.patchcore_features(a, b, mode="anomalib"))(*maps)
    assert got.shape == want.shape == (2, *specs[0][:2], specs[0][2] + specs[1][2])
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=1e-5)
    reduced = jax.jit(lambda a, b: features.patchcore_features(a, b, mode="anomalib", dim=10))(
        *maps
    )
    np.testing.assert_allclose(np.asarray(reduced), ref.adaptive_avg_pool1d(want, 10), atol=ATOL)


@needs_torch
def test_anomalib_mode_matches_torch(rng):
    l2, l3 = _maps(rng, 2, (20, 28, 6), (10, 14, 10))
    pool = torch.nn.AvgPool2d(3, 1, 1)
    t2 = pool(torch.from_numpy(l2).permute(0, 3, 1, 2))
    t3 = pool(torch.from_numpy(l3).permute(0, 3, 1, 2))
    t3 = torch_f.interpolate(t3, size=t2.shape[-2:], mode="bilinear")
    want = torch.cat([t2, t3], 1).permute(0, 2, 3, 1).numpy()
    got = jax.jit(lambda a, b: features.patchcore_features(a, b, mode="anomalib"))(l2, l3)
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=1e-5)


def test_bfloat16_maps_are_aggregated_in_float32(rng):
    l2, l3 = _maps(rng, 1, (8, 8, 8), (4, 4, 16))
    l2b, l3b = jnp.asarray(l2, jnp.bfloat16), jnp.asarray(l3, jnp.bfloat16)
    got = jax.jit(lambda a, b: features.patchcore_features(a, b, dim=32, pretrain_dim=32))(l2b, l3b)
    assert got.dtype == jnp.float32
    want = ref.patchcore_features(
        np.asarray(l2b.astype(jnp.float32)),
        np.asarray(l3b.astype(jnp.float32)),
        dim=32,
        pretrain_dim=32,
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL)


# -------------------------------------------------------------------- jit / vmap / retrace


def test_vmap_over_leading_axis_and_over_images(rng):
    specs = [(10, 12, 6), (5, 6, 10)]
    kwargs = {"dim": 24, "pretrain_dim": 40}
    stacks = [np.stack(z) for z in zip(*[_maps(rng, 2, *specs) for _ in range(3)])]  # (3, 2, ...)
    fn = jax.jit(jax.vmap(lambda a, b: features.patchcore_features(a, b, **kwargs)))
    got = np.asarray(fn(*stacks))
    want = np.stack([ref.patchcore_features(a, b, **kwargs) for a, b in zip(*stacks)])
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=1e-5)
    # vmap over the image axis with unbatched (h, w, C) maps equals the batched call
    per_image = jax.jit(jax.vmap(lambda a, b: features.patchcore_features(a, b, **kwargs)))
    np.testing.assert_allclose(
        np.asarray(per_image(stacks[0][0], stacks[1][0])), want[0], atol=ATOL, rtol=1e-5
    )


def test_no_retrace_for_same_shapes(rng):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def fn(a, b):
        return features.patchcore_features(a, b, dim=32, pretrain_dim=32)

    for _ in range(3):
        l2, l3 = _maps(rng, 2, (8, 8, 8), (4, 4, 16))
        fn(l2, l3).block_until_ready()


# ------------------------------------------------------------------------------ bad input


def test_bad_input_errors():
    l2 = jnp.ones((2, 8, 8, 4))
    l3 = jnp.ones((2, 4, 4, 6))
    f = features.patchcore_features
    with pytest.raises(ValueError, match="rank"):
        f(jnp.ones((8, 8)), jnp.ones((4, 4)))
    with pytest.raises(ValueError, match="same rank"):
        f(l2, l3[0])
    with pytest.raises(ValueError, match="batch size"):
        f(l2, l3[:1])
    with pytest.raises(ValueError, match="larger than the first"):
        f(l3, l2)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        f(l2, l3, dim=0)
    with pytest.raises(ValueError, match="pretrain_dim must be >= 1"):
        f(l2, l3, pretrain_dim=0)
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        f(l2, l3, patch_size=0)
    with pytest.raises(TypeError, match="int"):
        f(l2, l3, dim=3.5)
    with pytest.raises(ValueError, match="mode"):
        f(l2, l3, mode="padim")
    with pytest.raises(ValueError, match="at least one"):
        f()
    with pytest.raises(TypeError, match="floating"):
        f(jnp.ones((2, 8, 8, 4), jnp.int32), l3)
    with pytest.raises(ValueError, match="too small"):
        f(jnp.ones((1, 1, 1, 4)), patch_size=4)
    with pytest.raises(ValueError, match="non-finite"):
        f(l2.at[0, 0, 0, 0].set(jnp.nan), l3)
    # checks on shapes also fire under jit (trace time)
    with pytest.raises(ValueError, match="batch size"):
        jax.jit(f)(l2, l3[:1])


# ------------------------------------------------------------------------ image embedding


def test_image_embedding(rng):
    acts = {
        "layer3": rng.standard_normal((3, 5, 4, 7)).astype(np.float32),
        "pooled": rng.standard_normal((3, 9)).astype(np.float32),
    }
    np.testing.assert_allclose(
        np.asarray(jax.jit(features.image_embedding, static_argnums=1)(acts, "layer3")),
        acts["layer3"].mean(axis=(1, 2)),
        atol=1e-6,
    )
    np.testing.assert_array_equal(np.asarray(features.image_embedding(acts)), acts["pooled"])
    np.testing.assert_allclose(
        np.asarray(features.image_embedding(acts["layer3"])),
        acts["layer3"].mean(axis=(1, 2)),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(features.image_embedding(acts, "pooled_layer3")),
        acts["layer3"].mean(axis=(1, 2)),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(features.image_embedding({"layer4": acts["layer3"]})),
        acts["layer3"].mean(axis=(1, 2)),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="not found"):
        features.image_embedding(acts, "layer4")
    with pytest.raises(ValueError, match="rank 2 or 4"):
        features.image_embedding({"x": jnp.ones((2, 3, 4))}, "x")


# ----------------------------------------------------------------------- feature extractor


class TinyBackbone(nn.Module):
    """Stand-in with the ResNet tap dict (strides 2/4/8/16/32) and no ``taps`` keyword."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        def block(x, c, name):
            x = nn.Conv(c, (3, 3), strides=2, padding=1, name=f"{name}_conv")(x)
            x = nn.BatchNorm(use_running_average=not train, name=f"{name}_bn")(x)
            return nn.relu(x)

        stem = block(x, 4, "stem")
        l1 = block(stem, 6, "layer1")
        l2 = block(l1, 8, "layer2")
        l3 = block(l2, 16, "layer3")
        l4 = block(l3, 32, "layer4")
        pooled = l4.mean(axis=(1, 2))
        return {
            "stem": stem,
            "layer1": l1,
            "layer2": l2,
            "layer3": l3,
            "layer4": l4,
            "pooled": pooled,
            "logits": nn.Dense(5, name="fc")(pooled),
        }


def _random_variables(model, images, seed):
    """Random variables without compiling ``model.init`` (shapes from ``jax.eval_shape``):
    He-scaled kernels, small biases / BN shifts, BN scales near 1, running means near 0 and
    running variances in [0.5, 1.5], so activations are neither all zero after ReLU nor
    trivially scaled."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images[:1])

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        if "kernel" in name:
            fan_in = int(np.prod(shape[:-1]))
            return rng.standard_normal(shape).astype(np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        if "var" in name:
            return (0.5 + rng.random(shape)).astype(np.float32)
        if "scale" in name:
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, shapes)


TINY_KW = {"dim": 32, "pretrain_dim": 32}


@pytest.fixture(scope="module")
def tiny():
    model = TinyBackbone()
    images = np.random.default_rng(1).standard_normal((3, 64, 48, 3)).astype(np.float32)
    variables = _random_variables(model, images, 0)
    acts = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    fn = features.make_feature_extractor(model, variables, **TINY_KW)
    return model, variables, images, acts, fn


def test_feature_extractor_matches_patchcore_features(tiny):
    model, variables, images, acts, fn = tiny
    out = fn(images)
    want = ref.patchcore_features(np.asarray(acts["layer2"]), np.asarray(acts["layer3"]), **TINY_KW)
    assert set(out) == {"patches", "embedding"}
    assert out["patches"].shape == (3, 8, 6, 32) and out["patches"].dtype == jnp.float32
    assert np.abs(want).max() > 0.1  # the backbone produced non-trivial maps
    np.testing.assert_allclose(np.asarray(out["patches"]), want, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["embedding"]), np.asarray(acts["pooled"]), atol=1e-6)

    fn3 = features.make_feature_extractor(
        model, variables, ("layer1", "layer2"), embedding_layer="layer3", dim=16, pretrain_dim=24
    )
    out3 = fn3(images)
    want3 = ref.patchcore_features(
        np.asarray(acts["layer1"]), np.asarray(acts["layer2"]), dim=16, pretrain_dim=24
    )
    np.testing.assert_allclose(np.asarray(out3["patches"]), want3, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(out3["embedding"]), np.asarray(acts["layer3"]).mean(axis=(1, 2)), atol=1e-6
    )


def _flops(fn, images):
    cost = fn.lower(images).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return cost["flops"]


def test_feature_extractor_skips_layer4_when_not_needed(tiny):
    model, variables, images, _, fn = tiny
    with_l4 = _flops(fn, images)
    fn_l3 = features.make_feature_extractor(model, variables, embedding_layer=None, **TINY_KW)
    without = _flops(fn_l3, images)
    # layer4 conv alone: (B * 2 * 2 positions) x (3*3*16 inputs) x 32 outputs multiply-adds
    # (XLA's cost analysis counts one flop per multiply-add of a convolution).
    layer4_conv_macs = 3 * 2 * 2 * 3 * 3 * 16 * 32
    assert with_l4 - without >= layer4_conv_macs
    assert set(fn_l3(images)) == {"patches"}


def test_feature_extractor_no_retrace_and_bad_input(tiny):
    model, variables, images, _, fn = tiny
    with pytest.raises(ValueError, match="NHWC"):
        fn(images[0])
    with pytest.raises(TypeError, match="floating"):
        fn(images.astype(np.int32))
    with pytest.raises(ValueError, match="spatial taps"):
        features.make_feature_extractor(model, variables, ("pooled",))
    with pytest.raises(ValueError, match="at least one"):
        features.make_feature_extractor(model, variables, ())
    with pytest.raises(TypeError, match="string"):
        features.make_feature_extractor(model, variables, "layer2")
    with pytest.raises(TypeError, match="floating"):
        features.make_feature_extractor(model, variables, compute_dtype=jnp.int32)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        features.make_feature_extractor(model, variables, dim=0)


def test_feature_extractor_traces_once(tiny):
    _, variables, images, _, _ = tiny
    traces = []

    class Counting(TinyBackbone):
        def __call__(self, x, train: bool = False):
            traces.append(x.shape)
            return super().__call__(x, train)

    fn = features.make_feature_extractor(Counting(), variables, **TINY_KW)
    for scale in (1.0, 2.0, 3.0):
        fn(images * scale)
    assert len(traces) == 1


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_feature_extractor_bfloat16_close_to_float32(tiny):
    model, variables, images, _, fn = tiny
    f32 = fn(images)
    bf16 = features.make_feature_extractor(model, variables, compute_dtype=jnp.bfloat16, **TINY_KW)(
        images
    )
    assert bf16["patches"].dtype == jnp.float32 and bf16["embedding"].dtype == jnp.float32
    assert 0 < _rel_err(bf16["patches"], f32["patches"]) < 3e-2
    assert _rel_err(bf16["embedding"], f32["embedding"]) < 3e-2


def test_extract_features_pads_last_batch(tiny):
    _, _, images, _, fn = tiny
    seen = []

    def spy(x):
        seen.append(x.shape)
        return fn(x)

    many = np.concatenate([images, images[::-1] * 0.5, images[:1]])  # 7 images
    out = features.extract_features(spy, many, 3)
    assert seen == [(3, 64, 48, 3)] * 3  # one shape -> one compilation
    for s in range(0, 7, 3):
        direct = fn(many[s : s + 3])
        for k in ("patches", "embedding"):
            np.testing.assert_allclose(out[k][s : s + 3], np.asarray(direct[k])[: 7 - s], atol=1e-6)
    assert out["patches"].shape == (7, 8, 6, 32) and isinstance(out["patches"], np.ndarray)
    # iterable of single images and batches of any size, re-chunked to the batch size
    seen.clear()
    out_it = features.extract_features(spy, [many[0], many[1:5], many[5:]], batch_size=3)
    assert seen == [(3, 64, 48, 3)] * 3
    np.testing.assert_allclose(out_it["patches"], out["patches"], atol=1e-6)
    with pytest.raises(ValueError, match="no images"):
        features.extract_features(spy, [], 2)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        features.extract_features(spy, many[0], 2)


# ------------------------------------------------------------------- with the real ResNets

try:
    from tailedcore_jax.models import resnet
except ImportError:  # pragma: no cover - lands separately
    resnet = None

needs_resnet = pytest.mark.skipif(resnet is None, reason="tailedcore_jax.models.resnet missing")


RESNET_KW = {"dim": 32, "pretrain_dim": 64}


@pytest.fixture(scope="module")
def small_resnet():
    model = resnet.resnet18(width=8)
    images = np.random.default_rng(2).standard_normal((2, 64, 64, 3)).astype(np.float32)
    variables = _random_variables(model, images, 3)
    taps = ("layer2", "layer3", "pooled", "pooled_layer3")
    acts = jax.jit(lambda v, x: model.apply(v, x, train=False, taps=taps))(variables, images)
    fn = features.make_feature_extractor(model, variables, **RESNET_KW)
    return model, variables, images, acts, fn


@needs_resnet
def test_resnet_extractor_matches_reference(small_resnet):
    _, _, images, acts, fn = small_resnet
    out = fn(images)
    want = ref.patchcore_features(
        np.asarray(acts["layer2"]), np.asarray(acts["layer3"]), **RESNET_KW
    )
    assert out["patches"].shape == (2, 8, 8, 32)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(out["patches"]), want, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["embedding"]), np.asarray(acts["pooled"]), atol=1e-5)


def _count_convs(fn, images):
    return fn.lower(images).as_text().count("stablehlo.convolution")


@needs_resnet
def test_resnet_extractor_layer3_embedding_does_not_run_layer4(small_resnet):
    model, variables, images, acts, fn_pooled = small_resnet
    fn_l3 = features.make_feature_extractor(model, variables, embedding_layer="layer3", **RESNET_KW)
    # layer4 of ResNet-18: 2 basic blocks = 4 3x3 convs + 1 downsample conv, not even traced
    assert _count_convs(fn_pooled, images) - _count_convs(fn_l3, images) == 5
    np.testing.assert_allclose(
        np.asarray(fn_l3(images)["embedding"]), np.asarray(acts["pooled_layer3"]), atol=1e-5
    )
    with pytest.raises(ValueError, match="no tap"):
        features.make_feature_extractor(model, variables, embedding_layer="logits")


@needs_resnet
def test_resnet_extractor_bfloat16(small_resnet):
    model, variables, images, _, fn = small_resnet
    f32 = fn(images)
    fn16 = features.make_feature_extractor(
        model, variables, compute_dtype=jnp.bfloat16, **RESNET_KW
    )
    bf16 = fn16(images)
    assert "bf16" in fn16.lower(images).as_text()
    assert bf16["patches"].dtype == jnp.float32
    assert 0 < _rel_err(bf16["patches"], f32["patches"]) < 5e-2
    assert _rel_err(bf16["embedding"], f32["embedding"]) < 5e-2
