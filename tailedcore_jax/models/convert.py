"""torchvision / timm ResNet state dicts -> Flax variables for :mod:`tailedcore_jax.models.resnet`.

Host-side weight conversion (NumPy in, ``jax.Array`` out). The mapping is one-to-one and
total: every key of the state dict is consumed, every shape is checked, and anything left
over or missing is reported by name. torchvision and timm ResNets share parameter names
(``conv1``, ``bn1``, ``layerX.Y.convN``, ``layerX.Y.bnN``, ``layerX.Y.downsample.0/1``,
``fc``), so both load; a ``module.`` prefix (``DataParallel``) is stripped.

==========================================  ===============================================
torch key                                   Flax variable
==========================================  ===============================================
``conv1.weight`` (O, I, kh, kw)             ``params/conv1/kernel`` (kh, kw, I, O)
``bn1.weight`` / ``bn1.bias``               ``params/bn1/scale`` / ``params/bn1/bias``
``bn1.running_mean`` / ``running_var``      ``batch_stats/bn1/mean`` / ``batch_stats/bn1/var``
``layer2.0.conv2.weight``                   ``params/layer2_0/conv2/kernel``
``layer2.0.downsample.0.weight``            ``params/layer2_0/downsample_conv/kernel``
``layer2.0.downsample.1.*``                 ``.../layer2_0/downsample_bn/*``
``fc.weight`` (N, C) / ``fc.bias``          ``params/fc/kernel`` (C, N) / ``params/fc/bias``
``*.num_batches_tracked``                   ignored
==========================================  ===============================================

Command line (writes an orbax checkpoint, atomically)::

    python -m tailedcore_jax.models.convert wide_resnet50_2.pth OUT_DIR --arch wide_resnet50_2

``OUT_DIR`` then holds ``variables/`` (an ``orbax.checkpoint.StandardCheckpointer``
checkpoint of ``{"params", "batch_stats"}``) and ``model.json`` (architecture and
constructor arguments); :func:`load_variables` / :func:`load_model` read it back.

References:
    Flax guide "Convert PyTorch models to Flax" (google/flax,
    ``docs/guides/converting_and_upgrading/convert_pytorch_to_flax.rst``) for the
    kernel/BatchNorm correspondences.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tailedcore_jax.models.resnet import ARCHITECTURES, ResNet

__all__ = [
    "load_model",
    "load_state_dict",
    "load_variables",
    "main",
    "save_variables",
    "torchvision_state_dict_shapes",
    "torchvision_to_flax",
]

_FORMAT = "tailedcore_jax.models.resnet/1"
_TORCH_EXTRA = "pip install tailedcore_jax[torch]"
_MAX_LISTED = 25


# ---- model construction and the name mapping ---------------------------------------------------


def _make_model(arch, kwargs) -> tuple[ResNet, str]:
    if isinstance(arch, ResNet):
        return (arch.clone(**kwargs) if kwargs else arch), "the given ResNet"
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown arch {arch!r}; expected one of {', '.join(ARCHITECTURES)} or a ResNet module"
        )
    return ARCHITECTURES[arch](**kwargs), repr(arch)


def _abstract_variables(model: ResNet) -> dict:
    """Shapes/dtypes of the full variable tree, without allocating (``jax.eval_shape``)."""
    size = model.tap_stride("layer4")
    images = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    return jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), images)


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
    """Flax variable path -> torch state-dict key."""
    *modules, leaf = path
    parts = []
    for module in modules:
        if module.startswith("layer") and "_" in module:  # layer2_0 -> layer2.0
            parts.extend(module.split("_", 1))
        elif module == "downsample_conv":
            parts.append("downsample.0")
        elif module == "downsample_bn":
            parts.append("downsample.1")
        else:
            parts.append(module)
    if collection == "batch_stats":
        leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
    else:
        leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return ".".join(parts + [leaf])


def _torch_shape(collection: str, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if collection == "params" and path[-1] == "kernel":
        if len(shape) == 4:  # HWIO -> OIHW
            return (shape[3], shape[2], shape[0], shape[1])
        return (shape[1], shape[0])  # Dense (in, out) -> Linear (out, in)
    return tuple(shape)


def _to_flax_layout(array: np.ndarray, collection: str, path: tuple[str, ...]) -> np.ndarray:
    if collection == "params" and path[-1] == "kernel":
        if array.ndim == 4:
            return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
        return array.T
    return array


def _expected(model: ResNet) -> dict[str, tuple[str, tuple[str, ...], Any]]:
    """torch key -> (collection, flax path, abstract leaf)."""
    abstract = _abstract_variables(model)
    table = {}
    for collection, tree in abstract.items():
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        for keypath, leaf in flat:
            path = tuple(k.key for k in keypath)
            table[_torch_name(collection, path)] = (collection, path, leaf)
    return table


def torchvision_state_dict_shapes(arch: "str | ResNet", **kwargs) -> dict[str, tuple[int, ...]]:
    """Keys and (torch-layout) shapes of the torchvision state dict that ``arch`` expects.

    ``num_batches_tracked`` entries (ignored on load) are not listed. Computed with
    ``jax.eval_shape`` (no weights are allocated).

    Args:
        arch: a name in :data:`~tailedcore_jax.models.resnet.ARCHITECTURES` or a ``ResNet``.
        **kwargs: constructor arguments (``num_classes``, ``width``, ...).

    Returns:
        ``{torch_key: shape}``, e.g. ``{"conv1.weight": (64, 3, 7, 7), ...}``.
    """
    model, _ = _make_model(arch, kwargs)
    return {
        name: _torch_shape(collection, path, leaf.shape)
        for name, (collection, path, leaf) in _expected(model).items()
    }


# ---- architecture detection (for clear "wrong weights file" errors) ---------------------------


def _signature_of_state_dict(sd: Mapping[str, np.ndarray]) -> dict | None:
    if "conv1.weight" not in sd or not any(k.startswith("layer1.") for k in sd):
        return None
    conv1 = np.shape(sd["conv1.weight"])
    if len(conv1) != 4:
        return None
    bottleneck = "layer1.0.conv3.weight" in sd
    stages = []
    for stage in range(1, 5):
        prefix = f"layer{stage}."
        blocks = {k[len(prefix) :].split(".", 1)[0] for k in sd if k.startswith(prefix)}
        stages.append(len(blocks))
    sig = {
        "block": "bottleneck" if bottleneck else "basic",
        "stage_sizes": tuple(stages),
        "stem": f"{conv1[2]}x{conv1[3]}",
        "width": int(conv1[0]),
        "in_channels": int(conv1[1]),
    }
    if bottleneck and "layer1.0.conv1.weight" in sd:
        inner = int(np.shape(sd["layer1.0.conv1.weight"])[0])
        sig["width_per_group"] = round(inner * 64 / sig["width"])
    fc = np.shape(sd["fc.weight"]) if "fc.weight" in sd else None
    sig["features"] = int(fc[1]) if fc is not None and len(fc) == 2 else None
    sig["fc"] = tuple(int(s) for s in fc) if fc is not None else None
    return sig


def _signature_of_model(model: ResNet) -> dict:
    sig = {
        "block": model.block,
        "stage_sizes": tuple(int(s) for s in model.stage_sizes),
        "stem": "3x3" if model.cifar_stem else "7x7",
        "width": model.width,
        "in_channels": model.in_channels,
    }
    if model.block == "bottleneck":
        sig["width_per_group"] = model.width_per_group
    sig["features"] = model.tap_channels("layer4")
    return sig


_COMPARED = ("block", "stage_sizes", "stem", "width", "width_per_group")


def _describe(sig: dict) -> str:
    text = f"{sig['block']} blocks {sig['stage_sizes']}, {sig['stem']} stem, width {sig['width']}"
    if "width_per_group" in sig:
        text += f", width_per_group {sig['width_per_group']}"
    if sig.get("fc") is not None:
        text += f", {sig['features']}-d fc {sig['fc'][1]}->{sig['fc'][0]}"
    elif sig.get("features") is not None:
        text += f", {sig['features']}-d features"
    return text


def _guess_name(sig: dict) -> str | None:
    for name, ctor in ARCHITECTURES.items():
        ref = _signature_of_model(ctor())
        if all(ref.get(k) == sig.get(k) for k in _COMPARED):
            return name
    return None


def _check_architecture(sd: Mapping[str, np.ndarray], model: ResNet, arch_label: str) -> None:
    found = _signature_of_state_dict(sd)
    if found is None:
        keys = ", ".join(sorted(sd)[:8])
        raise ValueError(
            f"the state dict does not look like a torchvision/timm ResNet (no 'conv1.weight' "
            f"4-d kernel and 'layer1.*' keys); first keys: {keys}"
        )
    wanted = _signature_of_model(model)
    if all(found.get(k) == wanted.get(k) for k in _COMPARED):
        return
    name = _guess_name(found)
    looks = f"{name} ({_describe(found)})" if name else f"an unknown ResNet ({_describe(found)})"
    hint = ""
    if name is None and found["width"] != wanted["width"]:
        hint = f"; for a reduced-width network pass width={found['width']}"
    raise ValueError(
        f"state dict looks like {looks} but arch {arch_label} expects {_describe(wanted)}{hint}"
    )


# ---- conversion --------------------------------------------------------------------------------


def _to_numpy(name: str, value) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor
        value = value.detach().cpu()
        if not value.dtype.is_floating_point and not value.dtype.is_complex:
            return value.numpy()
        return value.float().numpy()  # bfloat16 has no NumPy dtype
    return np.asarray(value)


def _normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}"
        )
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state dict keys must be strings, got {key!r}")
        name = key.removeprefix("module.")
        if name.endswith("num_batches_tracked"):
            continue
        if name in out:
            raise ValueError(f"duplicate key {name!r} after stripping the 'module.' prefix")
        out[name] = value
    return out


def _listing(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def _defaults_from_state_dict(sd: Mapping[str, Any], arch, kwargs: dict) -> dict:
    """For a named ``arch``: ``num_classes`` from ``fc.weight`` (``None`` without one) and
    ``in_channels`` from ``conv1.weight``, unless given."""
    kwargs = dict(kwargs)
    if isinstance(arch, str) and "num_classes" not in kwargs:
        fc = sd.get("fc.weight")
        kwargs["num_classes"] = int(np.shape(fc)[0]) if fc is not None else None
    if (
        isinstance(arch, str)
        and "in_channels" not in kwargs
        and np.ndim(sd.get("conv1.weight")) == 4
    ):
        kwargs["in_channels"] = int(np.shape(sd["conv1.weight"])[1])
    return kwargs


def _check_keys(sd: Mapping[str, Any], expected: dict, arch_label: str) -> None:
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        raise ValueError(f"state dict does not match arch {arch_label}: " + "; ".join(parts))


def _checked_arrays(sd: Mapping[str, Any], expected: dict, arch_label: str) -> dict:
    """``{torch_key: np.ndarray}`` after checking every shape (all mismatches listed) and
    that every value is floating."""
    mismatched = []
    arrays = {}
    for name, (collection, path, leaf) in expected.items():
        array = _to_numpy(name, sd[name])
        want = _torch_shape(collection, path, leaf.shape)
        if tuple(array.shape) != want:
            mismatched.append(f"{name}: got {tuple(array.shape)}, expected {want}")
            continue
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got dtype {array.dtype}")
        arrays[name] = array
    if mismatched:
        shown = "; ".join(mismatched[:_MAX_LISTED])
        more = (
            f"; ... ({len(mismatched) - _MAX_LISTED} more)" if len(mismatched) > _MAX_LISTED else ""
        )
        raise ValueError(f"shape mismatch for arch {arch_label}: {shown}{more}")
    return arrays


def torchvision_to_flax(
    state_dict: Mapping[str, Any], arch: "str | ResNet", **kwargs
) -> tuple[ResNet, dict]:
    """Convert a torchvision/timm ResNet state dict into a Flax model and its variables.

    Every key is consumed and every shape checked (``num_batches_tracked`` is ignored, a
    ``module.`` prefix stripped). Conv kernels go OIHW -> HWIO, the ``fc`` weight is
    transposed, BN ``running_mean``/``running_var`` become ``batch_stats``. All values are
    cast to the model's ``param_dtype`` (float32 by default; float16/bfloat16 weights load).

    Args:
        state_dict: ``{torch_name: array}`` (NumPy arrays, or torch tensors).
        arch: a name in :data:`~tailedcore_jax.models.resnet.ARCHITECTURES`
            (``"wide_resnet50_2"``, ...) or a :class:`~tailedcore_jax.models.resnet.ResNet`
            instance (for non-standard depths).
        **kwargs: constructor arguments (``width``, ``dtype``, ``taps``, ...). For a named
            ``arch``, ``num_classes`` defaults to the ``fc`` size found in the state dict
            (``None`` when it has no ``fc``) and ``in_channels`` to ``conv1``'s input
            channels. To drop a head, remove the ``fc.*`` keys first.

    Returns:
        ``(model, variables)`` with ``variables = {"params": ..., "batch_stats": ...}``
        (nested dicts of ``jax.Array``), ready for ``model.apply(variables, images)``.

    Raises:
        ValueError: unknown ``arch``; a state dict of another architecture (names what it
            looks like and what ``arch`` expects); missing or unexpected keys (listed by
            name); shape mismatches (listed by name with both shapes).
        TypeError: not a mapping, or a non-floating value.
    """
    sd = _normalize_keys(state_dict)
    model, arch_label = _make_model(arch, _defaults_from_state_dict(sd, arch, kwargs))
    _check_architecture(sd, model, arch_label)
    expected = _expected(model)
    _check_keys(sd, expected, arch_label)
    arrays = _checked_arrays(sd, expected, arch_label)
    variables: dict = {}
    for name, (collection, path, leaf) in expected.items():
        value = _to_flax_layout(arrays[name], collection, path)
        node = variables.setdefault(collection, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(np.ascontiguousarray(value), dtype=leaf.dtype)
    return model, variables


# ---- reading weight files ------------------------------------------------------------------


def _unwrap_checkpoint(obj):
    """Accept a bare state dict or a training checkpoint holding one."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "state_dict_ema"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                return inner
        return obj
    if hasattr(obj, "state_dict"):  # a whole pickled nn.Module (only with weights_only=False)
        return obj.state_dict()
    raise ValueError(f"the file holds a {type(obj).__name__}, not a state dict")


def load_state_dict(path: "str | os.PathLike") -> dict[str, np.ndarray]:
    """Read a state dict as ``{name: np.ndarray}``.

    ``.safetensors`` is read with ``safetensors.numpy`` (no torch), ``.npz`` with NumPy
    (``allow_pickle=False``), ``.pth`` / ``.pt`` / ``.bin`` with ``torch.load(...,
    weights_only=True)`` when PyTorch is installed; a training checkpoint holding the state
    dict under ``state_dict`` / ``model`` / ``model_state_dict`` is unwrapped. bfloat16 torch
    tensors are returned as float32.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        ImportError: a ``.pth``/``.pt`` file and PyTorch is not installed (names the extra:
            ``pip install tailedcore_jax[torch]``).
        ValueError: an unsupported suffix, or a file that holds no state dict.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    if suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError as err:
            raise ImportError(
                f"reading {path!r} needs PyTorch, which is not installed: {_TORCH_EXTRA} "
                "(or convert the file to .safetensors / .npz elsewhere)"
            ) from err
        obj = torch.load(path, map_location="cpu", weights_only=True)
        sd = _unwrap_checkpoint(obj)
        return {str(k): _to_numpy(str(k), v) for k, v in sd.items()}
    raise ValueError(f"unsupported weights file {path!r}: expected .safetensors, .npz, .pth or .pt")


# ---- orbax checkpoint of converted variables ------------------------------------------------


def _model_kwargs(model: ResNet) -> dict:
    kwargs = {
        "num_classes": model.num_classes,
        "width": model.width,
        "in_channels": model.in_channels,
    }
    if model.block == "bottleneck":
        kwargs["width_per_group"] = model.width_per_group
    return kwargs


def save_variables(
    path: "str | os.PathLike",
    variables: dict,
    *,
    arch: str,
    model_kwargs: dict | None = None,
    force: bool = False,
) -> str:
    """Write ``variables`` and the model description to the directory ``path``, atomically.

    Everything is written to a temporary sibling directory first and renamed into place,
    so an interrupted save never leaves a ``path`` that restores wrong data.

    Args:
        path: output directory (must not exist unless ``force``).
        variables: ``{"params": ..., "batch_stats": ...}``.
        arch: architecture name recorded for :func:`load_model`.
        model_kwargs: constructor arguments recorded with it (JSON-serialisable).
        force: replace an existing ``path``.

    Returns:
        The absolute path written.

    Raises:
        FileExistsError: ``path`` exists and ``force`` is False.
    """
    import orbax.checkpoint as ocp

    out = os.path.abspath(os.fspath(path))
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out!r} already exists; pass force=True (--force) to overwrite it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, "variables"), variables)
        checkpointer.wait_until_finished()
        checkpointer.close()
        meta = {"format": _FORMAT, "arch": arch, "model_kwargs": model_kwargs or {}}
        with open(os.path.join(tmp, "model.json"), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "previous"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _read_meta(path: str) -> dict | None:
    meta_path = os.path.join(path, "model.json")
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        return json.load(f)


def load_model(path: "str | os.PathLike", **kwargs) -> tuple[ResNet, dict]:
    """Restore ``(model, variables)`` from a directory written by :func:`save_variables`
    (or the command line).

    Args:
        path: the checkpoint directory.
        **kwargs: extra constructor arguments for the model (``dtype``, ``taps``, ...);
            the recorded ones (``num_classes``, ``width``, ...) cannot be changed.

    Raises:
        FileNotFoundError: ``path`` or its ``model.json`` does not exist.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"converted checkpoint not found: {path!r}")
    meta = _read_meta(path)
    if meta is None:
        raise FileNotFoundError(
            f"{path!r} has no model.json; use load_variables for a bare checkpoint"
        )
    model = ARCHITECTURES[meta["arch"]](**{**kwargs, **meta["model_kwargs"]})
    return model, _restore(path, model)


def _restore(path: str, model: ResNet | None) -> dict:
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    try:
        target = path_target = os.path.join(path, "variables")
        if not os.path.isdir(path_target):
            target = path  # a bare orbax checkpoint
        if model is not None:
            abstract = _abstract_variables(model)
            return checkpointer.restore(target, abstract)
        return checkpointer.restore(target)
    finally:
        checkpointer.close()


def load_variables(path: "str | os.PathLike") -> dict:
    """Restore the Flax ``variables`` written by :func:`save_variables` / the command line.

    With a ``model.json`` the restore is checked against the model's abstract variables
    (shapes and dtypes); otherwise ``path`` is read as a bare orbax checkpoint.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"converted checkpoint not found: {path!r}")
    meta = _read_meta(path)
    model = ARCHITECTURES[meta["arch"]](**meta["model_kwargs"]) if meta is not None else None
    return _restore(path, model)


# ---- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m tailedcore_jax.models.convert IN OUT --arch ARCH [--width N] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="python -m tailedcore_jax.models.convert",
        description="Convert a torchvision/timm ResNet state dict (.pth/.pt/.safetensors/.npz) "
        "into an orbax checkpoint of Flax variables.",
    )
    parser.add_argument("input", help="weights file (.safetensors, .npz, .pth/.pt)")
    parser.add_argument(
        "output", help="output checkpoint directory (must not exist unless --force)"
    )
    parser.add_argument("--arch", required=True, choices=sorted(ARCHITECTURES))
    parser.add_argument(
        "--width", type=int, default=None, help="base width (default: the architecture's)"
    )
    parser.add_argument(
        "--width-per-group", type=int, default=None, help="bottleneck width_per_group"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.output)
    if os.path.exists(out) and not args.force:
        parser.error(f"{out} already exists; pass --force to overwrite it")
    kwargs = {}
    if args.width is not None:
        kwargs["width"] = args.width
    if args.width_per_group is not None:
        kwargs["width_per_group"] = args.width_per_group
    sd = load_state_dict(args.input)
    model, variables = torchvision_to_flax(sd, args.arch, **kwargs)
    written = save_variables(
        out, variables, arch=args.arch, model_kwargs=_model_kwargs(model), force=args.force
    )
    n = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(variables))
    print(json.dumps({"arch": args.arch, "output": written, "num_values": n, "num_keys": len(sd)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
