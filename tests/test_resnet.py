"""Tests for tailedcore_jax.models.resnet: torchvision parity (committed fixture, no torch
needed), taps / early stop, BatchNorm modes, shapes of every architecture, bad input."""

import json
import os

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailedcore_jax.models import resnet as R
from tailedcore_jax.models.convert import torchvision_state_dict_shapes, torchvision_to_flax

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "torchvision_fixture.npz")
NETS = ("bottleneck", "basic", "cifar")
ALL_TAPS = ("stem", "layer1", "layer2", "layer3", "layer4", "pooled", "logits")


@pytest.fixture(scope="module")
def fixture_data():
    with np.load(FIXTURE, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _net(data, net):
    cfg = json.loads(str(data[f"{net}/config"]))
    prefix = f"{net}/sd/"
    sd = {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}
    model = R.ResNet(
        block=cfg["block"],
        stage_sizes=tuple(cfg["layers"]),
        width=cfg["width"],
        width_per_group=cfg["width_per_group"],
        num_classes=cfg["num_classes"],
        cifar_stem=cfg["cifar"],
    )
    return cfg, sd, model


def _apply(model, variables, images, **kwargs):
    """model.apply under jax.jit (eager Flax dispatch compiles op by op and is slow on CPU)."""
    return jax.jit(model.apply, static_argnames=("train", "taps", "mutable"))(
        variables, images, **kwargs
    )


def _tolerance(ref):
    return {"rtol": 1e-4, "atol": 1e-5 * float(np.abs(ref).max())}


# ---- parity with torchvision ------------------------------------------------------------------


@pytest.mark.parametrize("net", NETS)
def test_torchvision_parity_every_tap(fixture_data, net):
    """Random torchvision networks (eval mode, random BN statistics) vs the Flax port."""
    _, sd, template = _net(fixture_data, net)
    model, variables = torchvision_to_flax(sd, template)
    images = fixture_data[f"{net}/input"]
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    assert set(out) == set(ALL_TAPS)
    for name in ALL_TAPS:
        ref = fixture_data[f"{net}/tap/{name}"]
        assert out[name].shape == ref.shape, name
        assert np.count_nonzero(ref) > 0.2 * ref.size, f"fixture tap {name} is degenerate"
        np.testing.assert_allclose(np.asarray(out[name]), ref, **_tolerance(ref), err_msg=name)


def test_cifar_fixture_is_resnet18_cifar(fixture_data):
    """The CIFAR fixture network is exactly the named constructor at width 3."""
    cfg, sd, _ = _net(fixture_data, "cifar")
    model, variables = torchvision_to_flax(sd, "resnet18_cifar", width=cfg["width"])
    assert model.cifar_stem and tuple(model.stage_sizes) == (2, 2, 2, 2)
    out = _apply(model, variables, fixture_data["cifar/input"], taps=("layer4", "logits"))
    for name in ("layer4", "logits"):
        ref = fixture_data[f"cifar/tap/{name}"]
        np.testing.assert_allclose(np.asarray(out[name]), ref, **_tolerance(ref))


def test_parity_fails_with_same_padding(fixture_data):
    """Negative control: torch pads (1, 1) while 'SAME' pads (0, 1) on even sizes, and the
    tolerance above is tight enough to see the half-pixel shift."""
    _, sd, template = _net(fixture_data, "bottleneck")
    model, variables = torchvision_to_flax(sd, template)
    images = fixture_data["bottleneck/input"]
    stem = np.asarray(_apply(model, variables, images, taps=("stem",))["stem"])
    # emulate SAME on the max-pool: pad (0, 1) instead of (1, 1)
    import flax.linen as nn

    same = np.asarray(nn.max_pool(jnp.asarray(stem), (3, 3), strides=(2, 2), padding="SAME"))
    torch_like = np.asarray(
        nn.max_pool(jnp.asarray(stem), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    )
    assert same.shape == torch_like.shape
    assert not np.allclose(same, torch_like, rtol=1e-4)


# ---- taps and early stopping ---------------------------------------------------------------


def random_variables(model, rng):
    """Variables with torchvision-like random values, built in NumPy and converted.

    (``model.init`` under jit compiles slowly on CPU: every threefry draw is a separate
    kernel; the init scheme itself is tested once in ``test_init_scheme``.)
    """
    sd = {}
    for name, shape in torchvision_state_dict_shapes(model).items():
        if name.endswith("running_var"):
            sd[name] = rng.uniform(0.5, 2.0, shape)
        elif name.endswith("running_mean"):
            sd[name] = rng.normal(0.0, 0.3, shape)
        elif name == "fc.weight" or name == "fc.bias":
            sd[name] = rng.uniform(-1, 1, shape) / np.sqrt(model.tap_channels("pooled"))
        elif len(shape) == 4:  # conv OIHW: kaiming normal, fan_out
            sd[name] = rng.normal(0.0, np.sqrt(2.0 / (shape[0] * shape[2] * shape[3])), shape)
        elif name.endswith("weight"):
            sd[name] = rng.uniform(0.5, 1.5, shape)
        else:
            sd[name] = rng.normal(0.0, 0.2, shape)
    return torchvision_to_flax(sd, model)[1]


@pytest.fixture(scope="module")
def small():
    model = R.resnet18(width=8, num_classes=7)
    variables = random_variables(model, np.random.default_rng(1))
    images = np.random.default_rng(2).standard_normal((3, 64, 48, 3)).astype(np.float32)
    return model, variables, images


@pytest.fixture(scope="module")
def small_out(small):
    model, variables, images = small
    return _apply(model, variables, images)


def test_default_taps_and_shapes(small, small_out):
    model, _, _images = small
    out = small_out
    assert list(out) == list(ALL_TAPS) or set(out) == set(ALL_TAPS)
    for name in R.LAYER_NAMES:
        s = model.tap_stride(name)
        assert out[name].shape == (3, -(-64 // s), -(-48 // s), model.tap_channels(name)), name
        assert out[name].dtype == jnp.float32
        assert float(out[name].min()) >= 0.0  # post-ReLU
        assert float(out[name].max()) > 0.0
    assert out["pooled"].shape == (3, 64)
    assert out["logits"].shape == (3, 7)
    np.testing.assert_allclose(
        out["pooled"], np.asarray(out["layer4"]).mean(axis=(1, 2)), rtol=1e-6, atol=1e-6
    )


def test_requested_taps_only_and_equal(small, small_out):
    model, variables, images = small
    full = small_out
    taps = ("layer3", "stem", "pooled_layer3", "pooled_layer2", "pooled_layer4")
    out = jax.jit(lambda v, x: model.apply(v, x, taps=taps))(variables, images)
    assert set(out) == set(taps)
    for name in ("layer3", "stem"):
        np.testing.assert_allclose(out[name], full[name], rtol=1e-6, atol=1e-6)
    for layer in ("layer2", "layer3", "layer4"):
        ref = np.asarray(full[layer]).mean(axis=(1, 2))
        np.testing.assert_allclose(out[f"pooled_{layer}"], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["pooled_layer4"], full["pooled"], rtol=1e-5, atol=1e-6)


def test_stops_after_deepest_requested_layer(small, small_out):
    """With taps up to layer2, layer3/layer4/fc are never touched: remove their variables."""
    model, variables, images = small

    def strip(tree):
        return {k: v for k, v in tree.items() if not k.startswith(("layer3", "layer4", "fc"))}

    partial_vars = {col: strip(tree) for col, tree in variables.items()}
    out = _apply(model, partial_vars, images, taps=("layer2", "layer1"))
    np.testing.assert_allclose(out["layer2"], small_out["layer2"], rtol=1e-6, atol=1e-6)
    with pytest.raises(flax.errors.ScopeParamNotFoundError):  # pooled_layer3 needs layer3
        jax.eval_shape(
            lambda v, x: model.apply(v, x, taps=("pooled_layer3",)), partial_vars, images
        )
    # fewer convolutions in the traced graph
    n_full = str(jax.make_jaxpr(lambda x: model.apply(variables, x))(images)).count(
        "conv_general_dilated"
    )
    n_l2 = str(jax.make_jaxpr(lambda x: model.apply(variables, x, taps=("layer2",)))(images)).count(
        "conv_general_dilated"
    )
    assert n_l2 < n_full


def test_taps_attribute_and_init_is_complete(small):
    _, variables, _ = small
    model = R.resnet18(width=8, num_classes=7, taps=("layer2",))
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(variables)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    assert set(jax.eval_shape(model.apply, variables, x)) == {"layer2"}
    out = jax.eval_shape(
        lambda v, x: model.apply(v, x, taps=("logits",)), variables, x
    )  # call overrides
    assert out["logits"].shape == (2, 7)


def test_batch_independence_in_eval_mode(small, small_out):
    model, variables, images = small
    one = _apply(model, variables, images[1:2])
    for name in ("layer3", "logits"):
        np.testing.assert_allclose(small_out[name][1:2], one[name], rtol=1e-5, atol=1e-5)


def test_jit_compiles_once(small):
    model, variables, images = small

    @jax.jit
    @chex.assert_max_traces(n=1)
    def features(v, x):
        return model.apply(v, x, taps=("layer2",))

    a = features(variables, images)
    b = features(variables, images * 2.0)
    assert a["layer2"].shape == b["layer2"].shape


def test_bad_taps(small):
    model, variables, images = small
    with pytest.raises(ValueError, match="unknown tap 'layer5'"):
        jax.eval_shape(lambda v, x: model.apply(v, x, taps=("layer5",)), variables, images)
    with pytest.raises(TypeError, match="sequence of tap names"):
        jax.eval_shape(lambda v, x: model.apply(v, x, taps="layer2"), variables, images)
    headless = R.resnet18(width=8)
    with pytest.raises(ValueError, match="no head"):
        jax.eval_shape(lambda v, x: headless.apply(v, x, taps=("logits",)), variables, images)


# ---- BatchNorm ------------------------------------------------------------------------------


def _np_conv_stem(images, kernel_hwio):
    """Plain-NumPy 7x7 stride-2 padding-3 convolution (NHWC, HWIO)."""
    x = np.pad(images, ((0, 0), (3, 3), (3, 3), (0, 0))).astype(np.float64)
    b, h, w, _ = images.shape
    oh, ow = (h + 6 - 7) // 2 + 1, (w + 6 - 7) // 2 + 1
    out = np.zeros((b, oh, ow, kernel_hwio.shape[-1]), np.float64)
    for i in range(7):
        for j in range(7):
            patch = x[:, i : i + 2 * oh : 2, j : j + 2 * ow : 2, :]
            out += np.einsum("bhwc,co->bhwo", patch, kernel_hwio[i, j].astype(np.float64))
    return out


def test_train_mode_updates_batch_stats(small, small_out):
    model, variables, images = small
    kernel = np.asarray(variables["params"]["conv1"]["kernel"])
    conv = _np_conv_stem(images, kernel)
    batch_mean = conv.mean(axis=(0, 1, 2))
    batch_var = conv.var(axis=(0, 1, 2))  # biased, as Flax (torch stores the unbiased one)

    out, updates = _apply(model, variables, images, train=True, mutable=("batch_stats",))
    old = variables["batch_stats"]["bn1"]
    new = updates["batch_stats"]["bn1"]
    np.testing.assert_allclose(
        new["mean"], 0.9 * np.asarray(old["mean"]) + 0.1 * batch_mean, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        new["var"], 0.9 * np.asarray(old["var"]) + 0.1 * batch_var, rtol=1e-4, atol=1e-5
    )
    assert jax.tree_util.tree_structure(updates["batch_stats"]) == jax.tree_util.tree_structure(
        variables["batch_stats"]
    )
    # the stem is normalised with the batch statistics, not the running ones
    scale = np.asarray(variables["params"]["bn1"]["scale"])
    bias = np.asarray(variables["params"]["bn1"]["bias"])
    stem = np.maximum((conv - batch_mean) / np.sqrt(batch_var + 1e-5) * scale + bias, 0.0)
    np.testing.assert_allclose(out["stem"], stem, rtol=1e-4, atol=1e-4)
    assert not np.allclose(small_out["stem"], out["stem"], atol=1e-3)


def test_train_mode_early_stop_updates_only_used_layers(small):
    model, variables, images = small
    zero = model.clone(bn_momentum=0.0)  # updated stats = this batch's statistics
    _, updates = _apply(
        zero, variables, images, train=True, taps=("layer1",), mutable=("batch_stats",)
    )
    new, old = updates["batch_stats"], variables["batch_stats"]
    kernel = np.asarray(variables["params"]["conv1"]["kernel"])
    np.testing.assert_allclose(
        new["bn1"]["mean"], _np_conv_stem(images, kernel).mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
    )
    assert not np.allclose(new["layer1_1"]["bn2"]["mean"], old["layer1_1"]["bn2"]["mean"])
    for name in ("layer2_0", "layer3_1", "layer4_1"):
        for bn in old[name]:
            np.testing.assert_array_equal(new[name][bn]["mean"], old[name][bn]["mean"])


# ---- dtype ------------------------------------------------------------------------------------


def test_bfloat16_compute(small):
    model, variables, images = small
    taps = ("layer3", "pooled_layer3")
    ref = _apply(model, variables, images, taps=taps)
    out = _apply(model.clone(dtype=jnp.bfloat16), variables, images, taps=taps)
    assert out["layer3"].dtype == jnp.bfloat16
    assert out["pooled_layer3"].dtype == jnp.float32
    assert jax.tree_util.tree_leaves(variables)[0].dtype == jnp.float32
    for name in taps:
        scale = float(np.abs(ref[name]).max())
        np.testing.assert_allclose(np.asarray(out[name], np.float32), ref[name], atol=0.1 * scale)


# ---- architectures -----------------------------------------------------------------------------

EXPECTED = {
    # name: (stage sizes, block, pooled dim at width 64, stride of layer4)
    "resnet18": ((2, 2, 2, 2), "basic", 512, 32),
    "resnet34": ((3, 4, 6, 3), "basic", 512, 32),
    "resnet50": ((3, 4, 6, 3), "bottleneck", 2048, 32),
    "resnet101": ((3, 4, 23, 3), "bottleneck", 2048, 32),
    "wide_resnet50_2": ((3, 4, 6, 3), "bottleneck", 2048, 32),
    "wide_resnet101_2": ((3, 4, 23, 3), "bottleneck", 2048, 32),
    "resnet18_cifar": ((2, 2, 2, 2), "basic", 512, 8),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_architecture_shapes(arch):
    stages, block, dim, stride = EXPECTED[arch]
    model = R.ARCHITECTURES[arch](num_classes=10)
    assert tuple(model.stage_sizes) == stages and model.block == block
    assert model.tap_channels("pooled") == dim and model.tap_stride("layer4") == stride
    wide = arch.startswith("wide")
    if block == "bottleneck":
        assert [model.bottleneck_width(s) for s in (1, 2, 3, 4)] == [
            (128 if wide else 64) * 2**i for i in range(4)
        ]
    # eval_shape at reduced width: every spatial tap has the advertised stride/channels
    small = R.ARCHITECTURES[arch](num_classes=10, width=8)
    x = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
    variables = jax.eval_shape(small.init, jax.random.key(0), x)
    out = jax.eval_shape(small.apply, variables, x)
    for name in R.LAYER_NAMES:
        s = small.tap_stride(name)
        assert out[name].shape == (2, 64 // s, 96 // s, small.tap_channels(name)), (arch, name)
    assert out["pooled"].shape == (2, small.tap_channels("pooled"))
    assert out["logits"].shape == (2, 10)


def test_wide_resnet50_2_shapes_at_224():
    model = R.wide_resnet50_2()
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"]))
    assert n_params == 68_883_240 - 2_049_000  # torchvision count minus the 1000-class fc
    out = jax.eval_shape(model.apply, variables, x)
    assert out["layer2"].shape == (2, 28, 28, 512)
    assert out["layer3"].shape == (2, 14, 14, 1024)
    assert out["pooled"].shape == (2, 2048)
    assert "logits" not in out


def test_init_scheme():
    """kaiming_normal(fan_out) convs, BN (1, 0, 0, 1), torch Linear uniform head.

    Uses an ``rbg`` key: threefry-heavy inits compile very slowly on CPU."""
    model = R.ResNet(block="basic", stage_sizes=(1, 1, 1, 1), num_classes=10, width=16)
    variables = jax.jit(model.init)(jax.random.key(3, impl="rbg"), jnp.zeros((1, 32, 32, 3)))
    kernel = np.asarray(variables["params"]["layer4_0"]["conv2"]["kernel"])  # 3x3, 128 -> 128
    np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 128)), rtol=0.05)
    bn = variables["params"]["layer4_0"]["bn2"]
    np.testing.assert_array_equal(bn["scale"], 1.0)
    np.testing.assert_array_equal(bn["bias"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], 1.0)
    fc = np.asarray(variables["params"]["fc"]["kernel"])
    assert np.abs(fc).max() <= 1 / np.sqrt(128) and np.abs(fc).max() > 0.8 / np.sqrt(128)


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_images(small):
    model, variables, _ = small
    with pytest.raises(ValueError, match="rank 4"):
        _apply(model, variables, jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="3 channels"):
        _apply(model, variables, jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="NCHW"):
        _apply(model, variables, jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(TypeError, match="floating"):
        _apply(model, variables, jnp.zeros((1, 32, 32, 3), jnp.uint8))
    with pytest.raises(ValueError, match="smaller than the total stride 32"):
        _apply(model, variables, jnp.zeros((1, 31, 64, 3)))
    # the check follows the deepest computed stage: 16 px is enough up to layer2 (stride 8)
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, taps=("layer2",)), variables, x)
    assert out["layer2"].shape == (1, 2, 2, 16)
    with pytest.raises(ValueError, match="total stride 8"):
        jax.eval_shape(R.resnet18_cifar(width=4).init, jax.random.key(0), jnp.zeros((1, 4, 4, 3)))


def test_bad_construction():
    with pytest.raises(TypeError, match="unexpected keyword"):
        R.resnet18(stage_sizes=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="block must be"):
        jax.eval_shape(
            R.ResNet(block="dense", stage_sizes=(1, 1, 1, 1)).init,
            jax.random.key(0),
            jnp.zeros((1, 32, 32, 3)),
        )
    with pytest.raises(ValueError, match="stage_sizes"):
        jax.eval_shape(
            R.ResNet(block="basic", stage_sizes=(1, 1, 1)).init,
            jax.random.key(0),
            jnp.zeros((1, 32, 32, 3)),
        )
