"""Tests for tailedcore_jax.models.convert: key/shape mapping against torchvision's real
state-dict listings (stored in the fixture), a full-size WideResNet-50-2 conversion, clear
errors, file formats and the orbax command line. No torch needed (torch-only cases skip)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailedcore_jax.models import convert as C
from tailedcore_jax.models import resnet as R

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "torchvision_fixture.npz")

# torchvision's architectures, described from scratch (block, layers, width_per_group, cifar stem)
ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2), 64, False),
    "resnet34": ("basic", (3, 4, 6, 3), 64, False),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 64, False),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 64, False),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 128, False),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), 128, False),
    "resnet18_cifar": ("basic", (2, 2, 2, 2), 64, True),
}


def torchvision_layout(arch, *, width=64, num_classes=1000):
    """[(key, shape)] of torchvision's state dict, in its order (plain Python, no torch)."""
    block, layers, width_per_group, cifar = ARCHS[arch]
    keys = []

    def conv(name, out_c, in_c, k):
        keys.append((f"{name}.weight", (out_c, in_c, k, k)))

    def bn(name, c):
        keys.extend(
            (f"{name}.{s}", (c,)) for s in ("weight", "bias", "running_mean", "running_var")
        )
        keys.append((f"{name}.num_batches_tracked", ()))

    conv("conv1", width, 3, 3 if cifar else 7)
    bn("bn1", width)
    expansion = 4 if block == "bottleneck" else 1
    inplanes = width
    for stage, n_blocks in enumerate(layers):
        planes = width * 2**stage
        for index in range(n_blocks):
            prefix = f"layer{stage + 1}.{index}"
            stride = 2 if stage > 0 and index == 0 else 1
            if block == "bottleneck":
                inner = int(planes * width_per_group / 64)
                conv(f"{prefix}.conv1", inner, inplanes, 1)
                bn(f"{prefix}.bn1", inner)
                conv(f"{prefix}.conv2", inner, inner, 3)
                bn(f"{prefix}.bn2", inner)
                conv(f"{prefix}.conv3", planes * 4, inner, 1)
                bn(f"{prefix}.bn3", planes * 4)
            else:
                conv(f"{prefix}.conv1", planes, inplanes, 3)
                bn(f"{prefix}.bn1", planes)
                conv(f"{prefix}.conv2", planes, planes, 3)
                bn(f"{prefix}.bn2", planes)
            if index == 0 and (stride != 1 or inplanes != planes * expansion):
                conv(f"{prefix}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{prefix}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    if num_classes is not None:
        keys.append(("fc.weight", (num_classes, inplanes)))
        keys.append(("fc.bias", (num_classes,)))
    return keys


def zero_state_dict(arch, **kwargs):
    """Shapes only (zero-stride views): enough for the architecture checks."""
    return {k: np.broadcast_to(np.float32(0), s) for k, s in torchvision_layout(arch, **kwargs)}


def flax_location(key):
    """torch key -> (collection, path) in the Flax variables, written from the docs table."""
    *modules, leaf = key.split(".")
    path = []
    i = 0
    while i < len(modules):
        if modules[i].startswith("layer"):
            path.append(f"{modules[i]}_{modules[i + 1]}")
            i += 2
        elif modules[i] == "downsample":
            path.append({"0": "downsample_conv", "1": "downsample_bn"}[modules[i + 1]])
            i += 2
        else:
            path.append(modules[i])
            i += 1
    if leaf in ("running_mean", "running_var"):
        return "batch_stats", tuple(path) + ({"running_mean": "mean", "running_var": "var"}[leaf],)
    is_bn = path[-1].startswith("bn") or path[-1] == "downsample_bn"
    name = {"weight": "scale" if is_bn else "kernel", "bias": "bias"}[leaf]
    return "params", tuple(path) + (name,)


def lookup(variables, collection, path):
    node = variables[collection]
    for part in path:
        node = node[part]
    return np.asarray(node)


def torch_to_flax_value(key, value):
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if key == "fc.weight":
        return value.T
    return value


def pattern_state_dict(arch, **kwargs):
    """Cheap distinct values per key (no RNG): a per-key phase of a sawtooth, scaled so a
    forward pass stays finite; BN variances positive."""
    sd = {}
    for i, (key, shape) in enumerate(torchvision_layout(arch, **kwargs)):
        if key.endswith("num_batches_tracked"):
            sd[key] = np.array(i, np.int64)
            continue
        n = int(np.prod(shape))
        saw = ((np.arange(n, dtype=np.int64) + 7919 * i) % 1009).astype(np.float32) / 1009.0 - 0.5
        saw = saw.reshape(shape)
        if key.endswith("running_var"):
            sd[key] = 1.0 + saw**2
        elif len(shape) == 4:
            sd[key] = saw * np.float32(np.sqrt(24.0 / (shape[0] * shape[2] * shape[3])))
        elif key.endswith("weight") and len(shape) == 1:
            sd[key] = 1.0 + 0.5 * saw
        else:
            sd[key] = 0.1 * saw
    return sd


@pytest.fixture(scope="module")
def torchvision_listing():
    with np.load(FIXTURE, allow_pickle=False) as data:
        return json.loads(str(data["arch_keys"]))


@pytest.fixture(scope="module")
def basic_sd():
    with np.load(FIXTURE, allow_pickle=False) as data:
        prefix = "basic/sd/"
        return {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}


def _basic_template():
    return R.ResNet(block="basic", stage_sizes=(1, 2, 1, 1), width=4, num_classes=3)


# ---- key/shape mapping for every architecture -------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_layout_matches_torchvision_and_converter(arch, torchvision_listing):
    layout = torchvision_layout(arch)
    real = [(k, tuple(s)) for k, s in torchvision_listing[arch]]
    assert layout == real  # our description of torchvision's layout is exact (order included)
    expected = {k: s for k, s in layout if not k.endswith("num_batches_tracked")}
    assert C.torchvision_state_dict_shapes(arch, num_classes=1000) == expected


def test_wide_resnet50_2_full_size_conversion():
    sd = pattern_state_dict("wide_resnet50_2")
    model, variables = C.torchvision_to_flax(sd, "wide_resnet50_2")
    assert model.num_classes == 1000 and model.width_per_group == 128
    n_leaves = len(jax.tree_util.tree_leaves(variables))
    consumed = [k for k in sd if not k.endswith("num_batches_tracked")]
    assert n_leaves == len(consumed) == 267
    for key in consumed:  # every key lands where the torchvision layout says, transposed
        collection, path = flax_location(key)
        got = lookup(variables, collection, path)
        np.testing.assert_array_equal(got, torch_to_flax_value(key, sd[key]), err_msg=key)
        assert got.dtype == np.float32

    x224 = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    shapes = jax.eval_shape(model.apply, variables, x224)
    assert shapes["layer2"].shape == (2, 28, 28, 512)
    assert shapes["layer3"].shape == (2, 14, 14, 1024)
    assert shapes["pooled"].shape == (2, 2048)
    assert shapes["logits"].shape == (2, 1000)

    # one real forward of one 224 image, stopping after layer3 (layer4 never runs)
    image = (np.arange(224 * 224 * 3, dtype=np.float32).reshape(1, 224, 224, 3) % 17) / 17.0 - 0.5
    out = jax.jit(lambda v, x: model.apply(v, x, taps=("layer2", "layer3")))(variables, image)
    assert out["layer2"].shape == (1, 28, 28, 512) and out["layer3"].shape == (1, 14, 14, 1024)
    assert np.isfinite(np.asarray(out["layer3"])).all() and float(out["layer3"].max()) > 0


def test_module_prefix_and_num_batches_tracked(basic_sd):
    assert any(k.endswith("num_batches_tracked") for k in basic_sd)
    _, ref = C.torchvision_to_flax(basic_sd, _basic_template())
    prefixed = {f"module.{k}": v for k, v in basic_sd.items()}
    half = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in basic_sd.items()}
    for sd in (prefixed, half):
        _, got = C.torchvision_to_flax(sd, _basic_template())
        tol = 0 if sd is prefixed else 2e-3
        for a, b in zip(
            jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_torch_tensors_accepted(basic_sd):
    torch = pytest.importorskip("torch")
    _, ref = C.torchvision_to_flax(basic_sd, _basic_template())
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in basic_sd.items()}
    tensors["bn1.weight"] = tensors["bn1.weight"].to(torch.bfloat16)
    _, got = C.torchvision_to_flax(tensors, _basic_template())
    np.testing.assert_allclose(
        got["params"]["bn1"]["scale"], ref["params"]["bn1"]["scale"], rtol=1e-2
    )
    np.testing.assert_array_equal(got["params"]["fc"]["kernel"], ref["params"]["fc"]["kernel"])


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "found, arch, pattern",
    [
        (
            "resnet18",
            "wide_resnet50_2",
            r"looks like resnet18 .*512-d fc 512->1000.* but arch 'wide_resnet50_2' expects bottleneck",
        ),
        (
            "resnet50",
            "wide_resnet50_2",
            r"looks like resnet50 .*width_per_group 64.* expects .*width_per_group 128",
        ),
        (
            "wide_resnet50_2",
            "wide_resnet101_2",
            r"looks like wide_resnet50_2 .*\(3, 4, 6, 3\).* expects .*\(3, 4, 23, 3\)",
        ),
        (
            "resnet18_cifar",
            "resnet18",
            r"looks like resnet18_cifar .*3x3 stem.* expects .*7x7 stem",
        ),
        ("resnet34", "resnet18", r"looks like resnet34"),
    ],
)
def test_state_dict_of_another_architecture(found, arch, pattern):
    with pytest.raises(ValueError, match=pattern):
        C.torchvision_to_flax(zero_state_dict(found), arch)


def test_reduced_width_hint():
    with pytest.raises(ValueError, match=r"unknown ResNet .*width 4.*pass width=4"):
        C.torchvision_to_flax(zero_state_dict("resnet18", width=4), "resnet18")
    model, _ = C.torchvision_to_flax(zero_state_dict("resnet18", width=4), "resnet18", width=4)
    assert model.width == 4


def test_missing_unexpected_and_shape_errors_named(basic_sd):
    sd = dict(basic_sd)
    del sd["layer2.1.bn1.running_var"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(
        ValueError,
        match=r"missing keys: layer2\.1\.bn1\.running_var.*unexpected keys: extra\.weight",
    ):
        C.torchvision_to_flax(sd, _basic_template())
    sd = dict(basic_sd)
    sd["fc.bias"] = np.zeros(4, np.float32)
    sd["layer3.0.conv2.weight"] = np.zeros((16, 16, 3, 2), np.float32)
    with pytest.raises(
        ValueError, match=r"fc\.bias: got \(4,\), expected \(3,\).*layer3\.0\.conv2\.weight: got"
    ):
        C.torchvision_to_flax(sd, _basic_template())
    sd = dict(basic_sd)
    sd["layer1.0.conv1.weight"] = sd["layer1.0.conv1.weight"].astype(np.int32)
    with pytest.raises(TypeError, match=r"layer1\.0\.conv1\.weight must be floating"):
        C.torchvision_to_flax(sd, _basic_template())


def test_other_bad_arguments(basic_sd):
    with pytest.raises(ValueError, match="unknown arch 'resnet999'"):
        C.torchvision_to_flax(basic_sd, "resnet999")
    with pytest.raises(TypeError, match="mapping"):
        C.torchvision_to_flax([("conv1.weight", np.zeros(1))], "resnet18")
    with pytest.raises(ValueError, match="does not look like a torchvision/timm ResNet"):
        C.torchvision_to_flax({"encoder.weight": np.zeros((3, 3))}, "resnet18")
    with pytest.raises(ValueError, match="missing keys: fc.bias, fc.weight"):
        C.torchvision_to_flax(
            {k: v for k, v in basic_sd.items() if not k.startswith("fc.")}, _basic_template()
        )


# ---- files -----------------------------------------------------------------------------------


def test_load_npz_and_safetensors(tmp_path, basic_sd):
    from safetensors.numpy import save_file

    arrays = {k: np.asarray(v) for k, v in basic_sd.items()}
    np.savez(tmp_path / "w.npz", **arrays)
    save_file(arrays, str(tmp_path / "w.safetensors"))
    for name in ("w.npz", "w.safetensors"):
        loaded = C.load_state_dict(tmp_path / name)
        assert set(loaded) == set(arrays)
        for k, value in arrays.items():
            np.testing.assert_array_equal(loaded[k], value)


def test_load_pth_with_torch(tmp_path, basic_sd):
    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in basic_sd.items()}
    torch.save(tensors, tmp_path / "w.pth")
    torch.save({"state_dict": tensors, "epoch": 3}, tmp_path / "ckpt.pt")
    for name in ("w.pth", "ckpt.pt"):
        loaded = C.load_state_dict(tmp_path / name)
        assert set(loaded) == set(basic_sd)
        np.testing.assert_array_equal(loaded["fc.weight"], basic_sd["fc.weight"])
        C.torchvision_to_flax(loaded, _basic_template())


def test_load_pth_without_torch(tmp_path, monkeypatch):
    (tmp_path / "w.pth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r"pip install tailedcore_jax\[torch\]"):
        C.load_state_dict(tmp_path / "w.pth")


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        C.load_state_dict(missing)
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported weights file"):
        C.load_state_dict(tmp_path / "w.h5")
    with pytest.raises(FileNotFoundError, match="nope_dir"):
        C.load_variables(tmp_path / "nope_dir")


# ---- command line and orbax round trip ------------------------------------------------------------


def test_command_line_round_trip(tmp_path):
    from safetensors.numpy import save_file

    sd = pattern_state_dict("resnet18", width=4, num_classes=5)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    src = tmp_path / "in.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "converted"
    argv = [str(src), str(out), "--arch", "resnet18", "--width", "4"]
    assert C.main(argv) == 0
    assert sorted(os.listdir(tmp_path)) == ["converted", "in.safetensors"]  # no temp leftovers

    _model_ref, ref = C.torchvision_to_flax(sd, "resnet18", width=4)
    restored = C.load_variables(out)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(ref)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, ref
    )
    model, variables = C.load_model(out)
    assert (model.width, model.num_classes, model.block) == (4, 5, "basic")
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    assert jax.eval_shape(model.apply, variables, x)["logits"].shape == (1, 5)

    with pytest.raises(SystemExit) as exc:  # refuses to overwrite
        C.main(argv)
    assert exc.value.code == 2
    with pytest.raises(FileExistsError):
        C.save_variables(out, ref, arch="resnet18")
    sd["fc.bias"] = sd["fc.bias"] + 1.0
    save_file(sd, str(src))
    assert C.main(argv + ["--force"]) == 0
    np.testing.assert_allclose(C.load_variables(out)["params"]["fc"]["bias"], sd["fc.bias"])
    assert sorted(os.listdir(tmp_path)) == ["converted", "in.safetensors"]


def test_module_entry_point():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "tailedcore_jax.models.convert", "--help"],
        check=False,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    assert "--arch" in result.stdout and "--force" in result.stdout
