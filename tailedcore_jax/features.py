"""PatchCore-exact patch features, image embeddings and a jitted feature extractor.

The PatchCore / TailedCore patch feature of a location is built from backbone maps (normally
WideResNet-50-2 ``layer2`` and ``layer3``) in four parameter-free steps, as
``FeatureEmbedder.forward`` in jungyg/TailedCore ``src/feature_embedder.py`` (which reuses
``PatchMaker.patchify`` / ``common.MeanMapper`` / ``common.Aggregator`` of
amazon-science/patchcore-inspection):

1. ``Unfold(kernel=p, stride=1, padding=(p-1)//2)``: the zero-padded p x p neighborhood of
   every location, flattened channel-major as ``(C, ky, kx)``;
2. later layers are bilinearly resized (``align_corners=False``) onto the first layer's grid;
3. per layer, ``F.adaptive_avg_pool1d`` of the ``C*p*p`` vector to ``pretrain_dim`` (bin i =
   mean of ``[floor(i*L/n), ceil((i+1)*L/n))``; bins overlap when n does not divide L);
4. the ``(M, n_layers, pretrain_dim)`` stack is flattened and pooled the same way to ``dim``.

Evaluation order here (same numbers, far less work): every step is linear, the resize acts
on the spatial axes and the poolings on the feature axis, so they commute. Step 3 runs on each
layer's own grid before the resize, and without materialising the unfolded tensor: each bin
covers a contiguous range of the ``(C, ky, kx)`` vector, i.e. a short sum of channel-gathered,
spatially shifted slices (a banded depthwise filter) instead of a dense
``(C*p*p) x pretrain_dim`` matmul. Results equal the step-by-step construction of
``tests/reference/features.py`` to float32 rounding.

``mode='anomalib'`` gives the anomalib PatchCore embedding instead (open-edge-platform/anomalib
``src/anomalib/models/image/patchcore/torch_model.py``): ``AvgPool2d(p, 1, (p-1)//2,
count_include_pad=True)`` per layer, bilinear resize to the first grid, channel concatenation,
optionally pooled to ``dim``.

References:
    Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.
    Jung et al., "TailedCore: Few-Shot Sampling for Unsupervised Long-Tail Noisy Anomaly
    Detection", CVPR 2025 (jungyg/TailedCore).
"""

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tailedcore_jax._validation import check_finite, check_floating

__all__ = [
    "adaptive_avg_pool1d",
    "adaptive_avg_pool_bins",
    "adaptive_avg_pool_matrix",
    "extract_features",
    "image_embedding",
    "make_feature_extractor",
    "patchcore_features",
]

# Taps of a ResNet forward pass (models/resnet.py) in network order.
LAYER_ORDER = ("stem", "layer1", "layer2", "layer3", "layer4", "pooled", "logits")
_MODES = ("patchcore", "anomalib")


# --------------------------------------------------------------------------------------------
# Adaptive average pooling (PyTorch semantics)
# --------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


@functools.cache
def _bins(length: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(out, dtype=np.int64)
    start = (i * length) // out
    end = -((-(i + 1) * length) // out)  # ceil division
    start.setflags(write=False)
    end.setflags(write=False)
    return start, end


def adaptive_avg_pool_bins(length: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges of PyTorch ``adaptive_avg_pool1d`` from ``length`` to ``out`` values.

    Bin ``i`` spans ``[floor(i*length/out), ceil((i+1)*length/out))`` (exact integer
    arithmetic, as ATen's ``start_index`` / ``end_index``). Bins overlap when ``out`` does not
    divide ``length`` and repeat elements when ``out > length``.

    Args:
        length: input length L >= 1.
        out: number of bins >= 1.

    Returns:
        ``(start, end)``, two read-only int64 numpy arrays of shape ``(out,)``.

    Raises:
        TypeError, ValueError: if ``length`` or ``out`` is not a positive int.
    """
    return _bins(_check_positive_int("length", length), _check_positive_int("out", out))


def adaptive_avg_pool_matrix(length: int, out: int, dtype=np.float32) -> np.ndarray:
    """The ``(length, out)`` matrix A with ``x @ A == F.adaptive_avg_pool1d(x, out)``.

    Column ``i`` holds ``1 / n_i`` on the rows of bin ``i`` (see
    :func:`adaptive_avg_pool_bins`). Useful as a readable oracle; the library itself pools
    with banded sums (:func:`adaptive_avg_pool1d`), which is far cheaper than this dense matmul.

    Args:
        length: input length L >= 1.
        out: output length >= 1.
        dtype: numpy dtype of the result.

    Returns:
        numpy array of shape ``(length, out)``.
    """
    start, end = adaptive_avg_pool_bins(length, out)
    rows = np.arange(length)[:, None]
    inside = (rows >= start[None, :]) & (rows < end[None, :])
    return (inside / (end - start)[None, :]).astype(dtype)


def adaptive_avg_pool1d(x: jax.Array, out: int) -> jax.Array:
    """``F.adaptive_avg_pool1d`` over the last axis of ``x``: ``(..., L) -> (..., out)``.

    JAX port of the pooling used by ``common.MeanMapper`` / ``common.Aggregator`` in
    amazon-science/patchcore-inspection. Evaluated as a sum of at most ``max bin size``
    static gathers (strided slices when ``out`` divides ``L``), never as a dense matmul.

    Args:
        x: floating array ``(..., L)``.
        out: static output length >= 1.

    Returns:
        ``(..., out)`` array of ``x``'s dtype.

    Raises:
        TypeError: ``x`` is not floating or ``out`` not an int.
        ValueError: ``x`` is a scalar or ``out < 1``.
    """
    check_floating("x", x)
    if jnp.ndim(x) < 1:
        raise ValueError("x must have at least one axis")
    out = _check_positive_int("out", out)
    x = jnp.asarray(x)
    length = x.shape[-1]
    if length == out:
        return x
    axis = x.ndim - 1
    if length % out == 0:
        # Disjoint bins of k: a sum of k strided slices (much faster on XLA:CPU than a
        # reshape + reduction over a tiny minor axis).
        k = length // out
        acc = None
        for j in range(k):
            term = jax.lax.slice_in_dim(x, j, length, stride=k, axis=axis)
            acc = term if acc is None else acc + term
        return acc / k
    start, end = adaptive_avg_pool_bins(length, out)
    count = end - start
    bshape = (1,) * (x.ndim - 1) + (out,)  # explicit rank: no implicit rank promotion
    acc = None
    for j in range(int(count.max())):
        idx = np.minimum(start + j, length - 1)
        valid = j < count
        term = jnp.take(x, idx, axis=-1)
        if not valid.all():
            term = term * jnp.asarray(valid, x.dtype).reshape(bshape)
        acc = term if acc is None else acc + term
    return acc / jnp.asarray(count, x.dtype).reshape(bshape)


# --------------------------------------------------------------------------------------------
# Building blocks on NHWC maps
# --------------------------------------------------------------------------------------------


@functools.cache
def _mean_map_plan(channels: int, patch_size: int, out: int):
    """Static plan of ``adaptive_avg_pool1d(unfold(x).reshape(C*p*p), out)``.

    Returns ``(terms, count)`` where ``terms`` is a list of ``(channel_index (out,),
    window_masks (p, p, out) float32)`` and ``count (out,)`` the bin sizes: output bin ``i``
    equals ``sum_t sum_{ky,kx} mask_t[ky,kx,i] * xpad[y+ky, x+kx, channel_t[i]] / count[i]``.
    """
    kk = patch_size * patch_size
    length = channels * kk
    start, end = adaptive_avg_pool_bins(length, out)
    c_first = start // kk
    c_last = (end - 1) // kk
    n_terms = int((c_last - c_first).max()) + 1
    pos = np.arange(kk).reshape(patch_size, patch_size)
    terms = []
    for t in range(n_terms):
        ch = c_first + t
        flat = ch[None, None, :] * kk + pos[:, :, None]  # (p, p, out) flat index per (ky,kx)
        mask = (flat >= start) & (flat < end) & (ch <= c_last)[None, None, :]
        terms.append((np.minimum(ch, channels - 1), mask.astype(np.float32)))
    return terms, (end - start).astype(np.float32)


def _pad_hw(x: jax.Array, patch_size: int) -> tuple[jax.Array, int, int]:
    pad = (patch_size - 1) // 2
    h_out = x.shape[1] + 2 * pad - patch_size + 1
    w_out = x.shape[2] + 2 * pad - patch_size + 1
    if pad:
        x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return x, h_out, w_out


def _mean_map(x: jax.Array, *, patch_size: int, out: int) -> jax.Array:
    """PatchCore ``MeanMapper`` of the unfolded neighborhoods, without unfolding.

    ``x (B, h, w, C) -> (B, h', w', out)`` equal to
    ``adaptive_avg_pool1d(Unfold(p, pad=(p-1)//2)(x) flattened as (C, ky, kx), out)``.
    """
    channels = x.shape[-1]
    terms, count = _mean_map_plan(channels, patch_size, out)
    xp, h_out, w_out = _pad_hw(x, patch_size)
    batch = x.shape[0]

    if out % channels == 0 and len(terms) == 1:
        # r = out / C bins per channel (e.g. layer2: 512 -> 1024, two bins per channel), and the
        # window mask only depends on the bin's position q within its channel: accumulate in a
        # (B, h, w, C, r) layout with broadcasts instead of gathering channels.
        r = out // channels
        mask = terms[0][1].reshape(patch_size, patch_size, channels, r)
        if np.all(mask == mask[:, :, :1, :]):
            acc = None
            for ky in range(patch_size):
                for kx in range(patch_size):
                    m = mask[ky, kx, 0]
                    if not m.any():
                        continue
                    s = jax.lax.slice_in_dim(xp, ky, ky + h_out, axis=1)
                    s = jax.lax.slice_in_dim(s, kx, kx + w_out, axis=2)
                    s = s.reshape(batch, h_out, w_out, channels, 1)
                    if not m.all():
                        s = s * jnp.asarray(m, x.dtype).reshape(1, 1, 1, 1, r)
                    else:
                        s = jnp.broadcast_to(s, (batch, h_out, w_out, channels, r))
                    acc = s if acc is None else acc + s
            acc = acc.reshape(batch, h_out, w_out, out)
            return acc / jnp.asarray(count, x.dtype).reshape(1, 1, 1, out)

    acc = None
    for ch, mask in terms:
        if np.array_equal(ch, np.arange(channels)):
            g = xp
        elif channels % out == 0 and np.array_equal(ch, ch[0] + np.arange(out) * (channels // out)):
            # m = C / out whole channels per bin: a strided channel slice, no gather.
            g = jax.lax.slice_in_dim(xp, int(ch[0]), channels, stride=channels // out, axis=3)
        else:
            g = jnp.take(xp, ch, axis=-1)  # (B, h+2pad, w+2pad, out), static channel gather
        for ky in range(patch_size):
            for kx in range(patch_size):
                m = mask[ky, kx]
                if not m.any():
                    continue
                s = jax.lax.slice_in_dim(g, ky, ky + h_out, axis=1)
                s = jax.lax.slice_in_dim(s, kx, kx + w_out, axis=2)
                if not m.all():
                    s = s * jnp.asarray(m, x.dtype).reshape(1, 1, 1, out)
                acc = s if acc is None else acc + s
    return acc / jnp.asarray(count, x.dtype).reshape(1, 1, 1, out)


def _box_mean(x: jax.Array, *, patch_size: int) -> jax.Array:
    """``AvgPool2d(p, stride=1, padding=(p-1)//2, count_include_pad=True)`` of NHWC x."""
    xp, h_out, w_out = _pad_hw(x, patch_size)
    acc = None
    for ky in range(patch_size):
        for kx in range(patch_size):
            s = jax.lax.slice_in_dim(xp, ky, ky + h_out, axis=1)
            s = jax.lax.slice_in_dim(s, kx, kx + w_out, axis=2)
            acc = s if acc is None else acc + s
    return acc / (patch_size * patch_size)


@functools.cache
def _linear_taps(in_size: int, out_size: int):
    """Torch ``bilinear, align_corners=False`` taps along one axis: (i0, i1, w0, w1)."""
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)  # ATen clamps negative source coordinates to 0
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = src - i0
    return i0, i1, 1.0 - w1, w1


def _resize_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    in_size = x.shape[axis]
    if in_size == size:
        return x
    i0, i1, w0, w1 = _linear_taps(in_size, size)
    shape = [1] * x.ndim
    shape[axis] = size
    w0 = jnp.asarray(w0, x.dtype).reshape(shape)
    w1 = jnp.asarray(w1, x.dtype).reshape(shape)
    return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def _resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(mode='bilinear', align_corners=False)`` of NHWC ``x`` to ``size``."""
    return _resize_axis(_resize_axis(x, 2, size[1]), 1, size[0])


# --------------------------------------------------------------------------------------------
# Public aggregation
# --------------------------------------------------------------------------------------------


def _as_layer_list(layers) -> list:
    if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
        layers = tuple(layers[0])
    if len(layers) == 0:
        raise ValueError("patchcore_features needs at least one feature map")
    return list(layers)


def _check_sizes(mode: str, patch_size, pretrain_dim, dim) -> tuple[int, int, int | None]:
    """Validate ``mode`` and the static sizes; returns ``(patch_size, pretrain_dim, dim)``."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    patch_size = _check_positive_int("patch_size", patch_size)
    pretrain_dim = _check_positive_int("pretrain_dim", pretrain_dim)
    if dim is not None:
        dim = _check_positive_int("dim", dim)
    return patch_size, pretrain_dim, dim


def _check_maps(layers: list, patch_size: int) -> tuple[list, bool]:
    """Shape/dtype checks of the maps (values: concrete inputs only).

    Returns ``(maps as (B, h, w, C) arrays, unbatched)``.
    """
    shapes = [jnp.shape(x) for x in layers]
    ranks = {len(shape) for shape in shapes}
    if not ranks <= {3, 4}:
        raise ValueError(f"feature maps must be NHWC (rank 4) or HWC (rank 3), got shapes {shapes}")
    if len(ranks) != 1:
        raise ValueError(f"all feature maps must have the same rank, got shapes {shapes}")
    for i, x in enumerate(layers):
        check_floating(f"layers[{i}]", x)
    unbatched = ranks == {3}
    if unbatched:
        layers = [jnp.asarray(x)[None] for x in layers]
    elif len({shape[0] for shape in shapes}) != 1:
        raise ValueError(f"all feature maps must have the same batch size, got shapes {shapes}")
    h0, w0 = jnp.shape(layers[0])[1:3]
    for i, x in enumerate(layers[1:], start=1):
        h, w = jnp.shape(x)[1:3]
        if h > h0 or w > w0:
            raise ValueError(
                f"layers[{i}] has grid {(h, w)}, larger than the first map's grid {(h0, w0)}; "
                "the first map defines the patch grid (pass the shallowest layer first)"
            )
    shrink = 2 * ((patch_size - 1) // 2) - patch_size + 1  # grid change of the unfold
    for i, x in enumerate(layers):
        h, w = jnp.shape(x)[1:3]
        if h + shrink < 1 or w + shrink < 1:
            raise ValueError(f"layers[{i}] grid {(h, w)} is too small for patch_size={patch_size}")
        check_finite(f"layers[{i}]", x)
    return layers, unbatched


def _per_layer_dim(n_layers: int, pretrain_dim: int, final_dim: int) -> int | None:
    """Width to pool each layer to when the cross-layer bins never straddle two layers.

    The ``n_layers * pretrain_dim -> final_dim`` pooling then equals pooling every layer to
    ``pretrain_dim // k`` with ``k = n_layers * pretrain_dim / final_dim`` (e.g. 2*1024 ->
    1024), which can run on the layer's own grid before the resize. ``None`` otherwise.
    """
    total = n_layers * pretrain_dim
    if total % final_dim == 0 and pretrain_dim % (total // final_dim) == 0:
        return pretrain_dim // (total // final_dim)
    return None


def patchcore_features(
    *layers: jax.Array,
    patch_size: int = 3,
    dim: int | None = None,
    pretrain_dim: int = 1024,
    mode: str = "patchcore",
) -> jax.Array:
    """PatchCore / TailedCore patch features from NHWC backbone maps.

    JAX port of ``FeatureEmbedder.forward`` (after the backbone) in jungyg/TailedCore
    ``src/feature_embedder.py``: ``PatchMaker.patchify``, grid alignment, ``MeanMapper`` and
    ``Aggregator`` of amazon-science/patchcore-inspection (the four steps of the module
    docstring). ``patchcore_features(layer2, layer3)`` is the paper's setting; any number of
    maps (or one list of maps) may be given, the first defines the patch grid.
    ``mode='anomalib'``: per-layer ``AvgPool2d``, resize, channel concat; ``pretrain_dim``
    is ignored.

    Args:
        *layers: floating maps ``(B, h_l, w_l, C_l)``, or ``(h_l, w_l, C_l)`` for one image
            (same rank and batch for all), computed in ``promote_types(dtype, float32)``.
            Later maps must not have a larger grid than the first.
        patch_size: static neighborhood size p >= 1 (padding ``(p-1)//2``, stride 1; even p
            shrinks the grid by one, as ``torch.nn.Unfold``).
        dim: static output dimension. ``None``: 1024 in ``'patchcore'`` mode (the official
            ``target_embed_dimension``), no reduction (``sum(C_l)``) in ``'anomalib'`` mode.
        pretrain_dim: static per-layer dimension (``pretrain_embed_dimension``, 1024).
        mode: ``'patchcore'`` or ``'anomalib'``.

    Returns:
        ``(B, h0', w0', D)`` float32 (float64 for float64 input), ``h0' = h0 + 2*((p-1)//2)
        - p + 1``, D = ``dim`` (1024 by default) or ``sum(C_l)``.

    Raises:
        ValueError: no maps, rank not 3/4 or mixed ranks, batch mismatch, a later map with a
            larger grid, an empty grid, sizes < 1, unknown ``mode``, or (concrete inputs only)
            NaN/inf values.
        TypeError: non-floating maps or non-int sizes.
    """
    layers = _as_layer_list(layers)
    patch_size, pretrain_dim, dim = _check_sizes(mode, patch_size, pretrain_dim, dim)
    layers, unbatched = _check_maps(layers, patch_size)
    dtype = jnp.promote_types(jnp.result_type(layers[0]), jnp.float32)
    layers = [jnp.asarray(x).astype(dtype) for x in layers]

    final_dim = (1024 if dim is None else dim) if mode == "patchcore" else dim
    per_layer_dim = None
    if mode == "patchcore":
        per_layer_dim = _per_layer_dim(len(layers), pretrain_dim, final_dim)

    pooled = []
    grid = None
    for x in layers:
        if mode == "patchcore":
            y = _mean_map(x, patch_size=patch_size, out=pretrain_dim)
            if per_layer_dim is not None:
                y = adaptive_avg_pool1d(y, per_layer_dim)
        else:
            y = _box_mean(x, patch_size=patch_size)
        if grid is None:
            grid = y.shape[1:3]
        elif y.shape[1:3] != grid:
            # Linear in space, so resizing after the (linear, per-location) pooling equals
            # resizing every (c, ky, kx) slice before it, as the official code does.
            y = _resize_bilinear(y, grid)
        pooled.append(y)
    stacked = pooled[0] if len(pooled) == 1 else jnp.concatenate(pooled, axis=-1)
    if final_dim is None or per_layer_dim is not None:
        out = stacked
    else:
        out = adaptive_avg_pool1d(stacked, final_dim)
    return out[0] if unbatched else out


def image_embedding(activations: Mapping[str, jax.Array] | jax.Array, layer: str = "pooled"):
    """Global-average-pooled image embedding of one backbone tap.

    ``'pooled'`` is the backbone's ``avgpool`` output (global average of ``layer4``, 2048-d
    for WRN-50-2): TailedCore's TailSampler embedding (``embedding_to_extract_from='avgpool'``
    in jungyg/TailedCore). Any other tap is averaged over its spatial axes, e.g.
    ``'layer3'``, the embedding of the offline recipe (random ResNet-18 with BatchNorm
    recalibration). ``'pooled'`` / ``'pooled_<tap>'`` missing from the dict are computed from
    ``'layer4'`` / ``'<tap>'``.

    Args:
        activations: dict of taps from ``model.apply`` (``(B, h, w, C)`` maps or ``(B, E)``
            vectors), or one such array.
        layer: key to read when ``activations`` is a dict.

    Returns:
        ``(B, C)`` array in ``promote_types(dtype, float32)``.

    Raises:
        ValueError: missing key, or a tap whose rank is not 2 or 4.
        TypeError: non-floating tap.
    """
    if isinstance(activations, Mapping):
        source = "layer4" if layer == "pooled" else layer.removeprefix("pooled_")
        if layer not in activations and source in activations:
            layer = source  # 'pooled' / 'pooled_<tap>' = global average of the spatial tap
        if layer not in activations:
            raise ValueError(
                f"activation {layer!r} not found; available: {sorted(activations.keys())}"
            )
        a = activations[layer]
    else:
        a = activations
    check_floating(f"activations[{layer!r}]", a)
    a = jnp.asarray(a)
    a = a.astype(jnp.promote_types(a.dtype, jnp.float32))
    if a.ndim == 2:
        return a
    if a.ndim == 4:
        return jnp.mean(a, axis=(1, 2))
    raise ValueError(f"activation {layer!r} must have rank 2 or 4, got shape {a.shape}")


# --------------------------------------------------------------------------------------------
# Feature extractor
# --------------------------------------------------------------------------------------------


def _cast_floating(tree, dtype):
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(cast, tree)


def _accepts_taps(model) -> bool:
    """True when ``model.__call__`` takes a ``taps=`` keyword (tailedcore_jax ResNets)."""
    import inspect

    try:
        return "taps" in inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return False


def _check_patch_layers(layers) -> tuple[str, ...]:
    if isinstance(layers, str):
        raise TypeError(f"layers must be a sequence of tap names, got the string {layers!r}")
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must name at least one tap")
    for name in layers:
        if name not in LAYER_ORDER[:5]:
            raise ValueError(f"patch layers must be spatial taps {LAYER_ORDER[:5]}, got {name!r}")
    return layers


def _requested_taps(model, layers: tuple[str, ...], embedding_layer: str | None) -> tuple:
    """The patch layers plus the embedding tap (a spatial embedding tap is averaged later)."""
    taps = list(layers)
    if embedding_layer is not None and embedding_layer not in taps:
        taps.append(embedding_layer)
    available = getattr(model, "available_taps", None)
    if available is not None:
        for name in taps:
            if name not in available:
                raise ValueError(f"model has no tap {name!r}; available: {tuple(available)}")
    return tuple(taps)


def _with_compute_dtype(model, variables, compute_dtype):
    """``(model, variables, input_dtype)`` for running the backbone in ``compute_dtype``.

    A Flax module with a ``dtype`` field is cloned with it and only ``params`` are cast
    (BatchNorm statistics stay float32); any other module gets every floating variable cast
    and ``input_dtype`` (else ``None``) for casting the images.
    """
    if compute_dtype is None:
        return model, variables, None
    compute_dtype = jnp.dtype(compute_dtype)
    if not jnp.issubdtype(compute_dtype, jnp.floating):
        raise TypeError(f"compute_dtype must be floating, got {compute_dtype}")
    fields = getattr(type(model), "__dataclass_fields__", {})
    if hasattr(model, "clone") and "dtype" in fields:
        model = model.clone(dtype=compute_dtype)
        variables = dict(variables)
        if "params" in variables:
            variables["params"] = _cast_floating(variables["params"], compute_dtype)
        return model, variables, None
    return model, _cast_floating(variables, compute_dtype), compute_dtype


def _extract_fn(model, apply_kwargs, taps, layers, embedding_layer, input_dtype, patch_kwargs):
    """The traced body ``(variables, images) -> {"patches", "embedding"}``."""

    def core(variables, images):
        if jnp.ndim(images) != 4:
            raise ValueError(f"images must be NHWC (B, H, W, C), got shape {jnp.shape(images)}")
        check_floating("images", images)
        if input_dtype is not None:
            images = images.astype(input_dtype)
        acts = model.apply(variables, images, train=False, **apply_kwargs)
        for name in taps:
            if name not in acts:
                raise ValueError(f"model did not return tap {name!r}; got {sorted(acts)}")
        maps = [
            acts[name].astype(jnp.promote_types(acts[name].dtype, jnp.float32)) for name in layers
        ]
        out = {"patches": patchcore_features(*maps, **patch_kwargs)}
        if embedding_layer is not None:
            out["embedding"] = image_embedding(acts, embedding_layer)
        return out

    return core


def make_feature_extractor(
    model,
    variables,
    layers: Sequence[str] = ("layer2", "layer3"),
    *,
    embedding_layer: str | None = "pooled",
    patch_size: int = 3,
    dim: int | None = None,
    pretrain_dim: int = 1024,
    compute_dtype=None,
    mode: str = "patchcore",
) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """Build one jitted ``images -> {"patches", "embedding"}`` function for a Flax backbone.

    JAX counterpart of ``FeatureEmbedder(..., layers_to_extract_from=layers,
    embedding_to_extract_from='avgpool').forward(images, return_embeddings=True)`` in
    jungyg/TailedCore ``src/feature_embedder.py``, NHWC, patch grid kept as ``(B, h, w, D)``.
    The backbone runs with ``train=False`` (BatchNorm running statistics). Models with a
    ``taps=`` keyword (``tailedcore_jax.models.resnet``) are asked only for the needed taps, so
    later stages are never traced; for other modules XLA removes the unused taps.

    Args:
        model: Flax module whose ``apply(variables, images, train=False)`` returns a dict of
            NHWC taps (``stem``, ``layer1``..``layer4``) and ``pooled`` (B, E).
        variables: the module's variables, passed to the jitted function as arguments.
        layers: spatial taps aggregated into patch features; the first defines the grid.
        embedding_layer: tap of the image embedding (:func:`image_embedding`): ``'pooled'``
            (the paper's TailSampler embedding), a spatial tap such as ``'layer3'`` (its
            global average, as ``'pooled_layer3'``), or ``None`` (no embedding).
        patch_size, dim, pretrain_dim, mode: as in :func:`patchcore_features`.
        compute_dtype: ``None`` (the model's own dtype) or a floating dtype such as
            ``jnp.bfloat16`` for the backbone. Modules with a ``dtype`` field are cloned with
            it and their ``params`` cast (BatchNorm statistics stay float32); otherwise images
            and all floating variables are cast. Taps are upcast to float32 before the
            aggregation and the embedding. bfloat16 keeps 8 mantissa bits, so it is not
            parity-exact: keep float32 for comparisons with the official code.

    Returns:
        Jitted ``extract(images)``: ``(B, H, W, C)`` floating, normalised images ->
        ``{"patches": (B, h, w, D) float32, "embedding": (B, E) float32}`` (no
        ``"embedding"`` when ``embedding_layer is None``); one compilation per input shape.
        ``extract.lower(images)`` gives the lowered computation.

    Raises:
        ValueError: empty ``layers``, a non-spatial patch layer, a tap the model does not
            offer, unknown ``mode``; at the first call, images not of rank 4 (and the checks
            of the model and of :func:`patchcore_features`).
        TypeError: non-floating ``compute_dtype`` or images.
    """
    layers = _check_patch_layers(layers)
    patch_size, pretrain_dim, dim = _check_sizes(mode, patch_size, pretrain_dim, dim)
    taps = _requested_taps(model, layers, embedding_layer)
    apply_kwargs = {"taps": taps} if _accepts_taps(model) else {}
    model, variables, input_dtype = _with_compute_dtype(model, variables, compute_dtype)
    patch_kwargs = dict(patch_size=patch_size, dim=dim, pretrain_dim=pretrain_dim, mode=mode)
    core = _extract_fn(
        model, apply_kwargs, taps, layers, embedding_layer, input_dtype, patch_kwargs
    )

    # Committed device arrays: no host-to-device copy of the weights on each call.
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    jitted = jax.jit(core)

    def extract(images):
        return jitted(variables, images)

    extract.lower = lambda images: jitted.lower(variables, images)
    return extract


def _iter_blocks(images, batch_size: int):
    """Yield ``(block (batch_size, ...), n_valid)`` from an array or an iterable of arrays."""
    if isinstance(images, (np.ndarray, jax.Array)):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
        n = images.shape[0]
        for s in range(0, n, batch_size):
            yield images[s : s + batch_size]
        return
    buf, size = [], 0
    for item in images:
        item = np.asarray(item)
        if item.ndim == 3:
            item = item[None]
        if item.ndim != 4:
            raise ValueError(f"each item must be (H, W, C) or (b, H, W, C), got {item.shape}")
        buf.append(item)
        size += item.shape[0]
        while size >= batch_size:
            cat = np.concatenate(buf, axis=0)
            yield cat[:batch_size]
            rest = cat[batch_size:]
            buf, size = ([rest] if rest.shape[0] else []), rest.shape[0]
    if size:
        yield np.concatenate(buf, axis=0)


def extract_features(
    fn: Callable[[jax.Array], dict[str, jax.Array]],
    images: np.ndarray | jax.Array | Iterable,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Run a feature extractor over a whole data set in fixed-size batches (host side).

    Every call to ``fn`` gets exactly ``batch_size`` images: the last block is padded by
    repeating its last image and the padding rows are dropped from the result, so ``fn``
    compiles once. The next batch is dispatched before the previous result is copied to the
    host, so device work and transfers overlap.

    Args:
        fn: e.g. the result of :func:`make_feature_extractor`; maps ``(batch_size, H, W, C)``
            to a dict of arrays with a leading batch axis.
        images: an ``(N, H, W, C)`` array, or an iterable of ``(H, W, C)`` images and/or
            ``(b, H, W, C)`` batches of any sizes.
        batch_size: static batch size >= 1.

    Returns:
        dict of numpy arrays, each with N rows in input order.

    Raises:
        ValueError: no images, or items of the wrong rank.
    """
    batch_size = _check_positive_int("batch_size", batch_size)
    results: dict[str, list[np.ndarray]] = {}
    pending = None

    def collect(item):
        out, n_valid = item
        for k, v in out.items():
            results.setdefault(k, []).append(np.asarray(v)[:n_valid])

    for block in _iter_blocks(images, batch_size):
        n_valid = block.shape[0]
        if n_valid < batch_size:
            xp = np if isinstance(block, np.ndarray) else jnp
            reps = xp.repeat(block[-1:], batch_size - n_valid, axis=0)
            block = xp.concatenate([block, reps], axis=0)
        out = fn(block)  # dispatched asynchronously
        if pending is not None:
            collect(pending)
        pending = (out, n_valid)
    if pending is None:
        raise ValueError("extract_features got no images")
    collect(pending)
    return {k: np.concatenate(v, axis=0) for k, v in results.items()}
