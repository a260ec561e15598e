"""Flax (linen) ResNets in torchvision's exact layout, returning named activations ("taps").

JAX port of ``ResNet`` in pytorch/vision ``torchvision/models/resnet.py`` (ResNet v1.5: the
stride of a bottleneck sits on its 3x3 convolution), NHWC. Parameter names and layout match
torchvision / timm one-to-one (:mod:`tailedcore_jax.models.convert`), so converted weights
give the same activations:

* every stride-2 3x3 convolution and the stem max-pool pad ``(1, 1)`` explicitly, as torch.
  Never ``'SAME'``: on even inputs it pads ``(0, 1)`` and shifts every feature by half a pixel;
* stem ``7x7/2 conv (pad 3) -> BN -> ReLU -> 3x3/2 max-pool (pad 1)``; the CIFAR stem is one
  3x3/1 conv (pad 1) and no max-pool;
* bottleneck inner width ``int(planes * width_per_group / 64)`` (WideResNet: 128);
* BatchNorm ``momentum=0.9`` (torch's 0.1), ``eps=1e-5``; ``train=False`` uses running stats.

Taps (keys of the returned dict, NHWC unless noted):

========================  ===================================================================
``stem``                  ``conv1 -> bn1 -> relu``, before the max-pool (stride 2; CIFAR 1)
``layer1`` .. ``layer4``  last block of each stage, strides 4/8/16/32 (CIFAR: 1/2/4/8)
``pooled``                float32 global average of ``layer4``, ``(B, C)``
``pooled_<name>``         float32 global average of ``stem`` / ``layer1`` .. ``layer4``
                          (``pooled_layer3`` is the image embedding of the offline recipe:
                          a random ResNet-18 with BatchNorm recalibration)
``logits``                ``fc(pooled)``, ``(B, num_classes)``; only with a head
========================  ===================================================================

The forward pass stops after the deepest stage a requested tap needs (``("layer2",
"layer3")`` never runs ``layer4``). A dict leaving ``jax.jit`` has sorted keys: index by name.
Initialisation follows torchvision (kaiming-normal fan-out convs, BN scale 1 / bias 0,
``torch.nn.Linear``'s uniform head) and always creates every variable. On CPU,
``jax.jit(model.init)`` compiles much faster with a ``jax.random.key(seed, impl="rbg")`` key
than with the default threefry key.

Example::

    model = resnet18(width=16)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    out = model.apply(variables, images, taps=("layer2", "layer3", "pooled_layer3"))
    out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])

References:
    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
"""

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = [
    "ARCHITECTURES",
    "LAYER_NAMES",
    "ResNet",
    "resnet18",
    "resnet18_cifar",
    "resnet34",
    "resnet50",
    "resnet101",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

#: Spatial taps in network order.
LAYER_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")
_POOLED_NAMES = tuple(f"pooled_{name}" for name in LAYER_NAMES)

# torchvision init: kaiming_normal_(mode="fan_out", nonlinearity="relu") for every conv
# (untruncated normal, std = sqrt(2 / (k*k*out_channels))); BN scale 1, bias 0.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight and the bias.
_dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _dense_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


_PAD1 = ((1, 1), (1, 1))


def _pool(a: Array) -> Array:
    """Float32 spatial mean ``(B, h, w, C) -> (B, C)`` whatever the compute dtype."""
    return jnp.mean(a.astype(jnp.float32), axis=(1, 2))


class _BasicBlock(nn.Module):
    """torchvision ``BasicBlock``: two 3x3 convs, stride on the first, expansion 1."""

    planes: int
    stride: int
    downsample: bool
    conv: Any
    norm: Any

    @nn.compact
    def __call__(self, x):
        out = self.conv(self.planes, (3, 3), strides=self.stride, padding=_PAD1, name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out))
        out = self.conv(self.planes, (3, 3), padding=_PAD1, name="conv2")(out)
        out = self.norm(name="bn2")(out)
        identity = x
        if self.downsample:
            identity = self.conv(
                self.planes, (1, 1), strides=self.stride, padding="VALID", name="downsample_conv"
            )(x)
            identity = self.norm(name="downsample_bn")(identity)
        return nn.relu(out + identity)


class _Bottleneck(nn.Module):
    """torchvision ``Bottleneck`` (v1.5): 1x1 -> 3x3 (stride here) -> 1x1, expansion 4."""

    planes: int
    stride: int
    downsample: bool
    inner: int
    conv: Any
    norm: Any

    @nn.compact
    def __call__(self, x):
        out = self.conv(self.inner, (1, 1), padding="VALID", name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out))
        out = self.conv(self.inner, (3, 3), strides=self.stride, padding=_PAD1, name="conv2")(out)
        out = nn.relu(self.norm(name="bn2")(out))
        out = self.conv(4 * self.planes, (1, 1), padding="VALID", name="conv3")(out)
        out = self.norm(name="bn3")(out)
        identity = x
        if self.downsample:
            identity = self.conv(
                4 * self.planes,
                (1, 1),
                strides=self.stride,
                padding="VALID",
                name="downsample_conv",
            )(x)
            identity = self.norm(name="downsample_bn")(identity)
        return nn.relu(out + identity)


class ResNet(nn.Module):
    """ResNet in torchvision's layout; ``__call__`` returns a dict of named activations.

    Use the constructors (:func:`resnet18`, :func:`wide_resnet50_2`, ...) for the standard
    architectures; build ``ResNet`` directly only for non-standard depths.

    Attributes:
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50/101, WRN).
        stage_sizes: blocks per stage, 4 ints (torchvision ``layers``).
        num_classes: size of the ``fc`` head; ``None`` = no head (no ``logits`` tap).
        width: stem channels and stage-1 ``planes`` (torchvision: 64); stage ``i`` has
            ``planes = width * 2**i``.
        width_per_group: bottleneck inner width ``int(planes * width_per_group / 64)``
            (128 = "wide"). Ignored by basic blocks.
        cifar_stem: 3x3 stride-1 stem conv and no max-pool (CIFAR ResNet, 32x32 inputs).
        in_channels: input channels the stem expects.
        taps: default taps (``None`` = ``default_taps``); overridden by ``__call__(taps=)``.
        dtype: computation dtype; ``pooled*`` taps are always averaged in float32.
        param_dtype: parameter dtype.
        precision: ``jax.lax.Precision`` of convolutions and the head (``None`` = backend
            default, which may be TF32 on GPU).
        bn_momentum: running = m * running + (1 - m) * batch (torch ``momentum=0.1`` is
            0.9). 0.0 stores one batch's statistics in the updated ``batch_stats``. Flax
            stores the biased batch variance (torch's ``running_var`` the unbiased one).
        bn_axis_name: ``axis_name`` for cross-device batch statistics (``None`` = local).
    """

    block: str
    stage_sizes: Sequence[int]
    num_classes: int | None = None
    width: int = 64
    width_per_group: int = 64
    cifar_stem: bool = False
    in_channels: int = 3
    taps: Sequence[str] | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    bn_momentum: float = 0.9
    bn_axis_name: str | None = None

    # ---- static description (usable on an unbound module) -------------------------------

    @property
    def expansion(self) -> int:
        """Channel expansion of the last conv of a block: 1 (basic) or 4 (bottleneck)."""
        return 4 if self.block == "bottleneck" else 1

    @property
    def available_taps(self) -> tuple[str, ...]:
        """Every tap name this model can return, in network order."""
        names = LAYER_NAMES + ("pooled",) + _POOLED_NAMES
        return names + ("logits",) if self.num_classes is not None else names

    @property
    def default_taps(self) -> tuple[str, ...]:
        """Taps returned when none are requested: spatial taps, ``pooled``, ``logits``."""
        names = LAYER_NAMES + ("pooled",)
        return names + ("logits",) if self.num_classes is not None else names

    def tap_stride(self, name: str) -> int:
        """Total stride (input pixels per output pixel) of a spatial tap, or of the layer a
        ``pooled*`` / ``logits`` tap is computed from."""
        depth = self._tap_depth(name)
        first = 1 if self.cifar_stem else 2
        if depth == 0:
            return first
        # stage 1 follows the max-pool (x2, none in the CIFAR stem); stages 2-4 halve.
        return first * (1 if self.cifar_stem else 2) * 2 ** (depth - 1)

    def tap_channels(self, name: str) -> int:
        """Channel count (last axis) of a tap."""
        if name == "logits":
            self._check_taps((name,))
            return int(self.num_classes)
        depth = self._tap_depth(name)
        if depth == 0:
            return self.width
        return self.width * 2 ** (depth - 1) * self.expansion

    def bottleneck_width(self, stage: int) -> int:
        """Inner width of the bottleneck blocks of ``stage`` (1..4), torchvision's formula."""
        planes = self.width * 2 ** (stage - 1)
        return int(planes * (self.width_per_group / 64.0))

    def _tap_depth(self, name: str) -> int:
        self._check_taps((name,))
        if name in ("pooled", "logits"):
            return 4
        name = name.removeprefix("pooled_")
        return LAYER_NAMES.index(name)

    def _check_taps(self, taps) -> tuple[str, ...]:
        if isinstance(taps, str):
            raise TypeError(f"taps must be a sequence of tap names, got the string {taps!r}")
        taps = tuple(taps)
        if not taps:
            raise ValueError("taps must name at least one tap")
        for name in taps:
            if name == "logits" and self.num_classes is None:
                raise ValueError(
                    "tap 'logits' requested but the model has no head (num_classes=None)"
                )
            if name not in self.available_taps:
                raise ValueError(
                    f"unknown tap {name!r}; available taps: {', '.join(self.available_taps)}"
                )
        return taps

    def _check_config(self) -> None:
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        sizes = tuple(self.stage_sizes)
        if len(sizes) != 4 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"stage_sizes must be 4 positive ints, got {sizes}")
        if self.width < 1 or (self.block == "bottleneck" and self.bottleneck_width(1) < 1):
            raise ValueError(
                f"width={self.width}, width_per_group={self.width_per_group} give empty layers"
            )

    def _check_images(self, images, depth: int) -> None:
        shape = jnp.shape(images)
        if len(shape) != 4:
            hint = " (a single image? add a batch axis)" if len(shape) == 3 else ""
            raise ValueError(f"images must have rank 4 (B, H, W, C), got shape {shape}{hint}")
        if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
            raise TypeError(
                f"images must be floating point (normalised), got dtype {jnp.result_type(images)}"
            )
        if shape[-1] != self.in_channels:
            hint = ""
            if shape[1] == self.in_channels:
                hint = "; it looks like NCHW, transpose to NHWC with images.transpose(0, 2, 3, 1)"
            raise ValueError(
                f"images must have {self.in_channels} channels in the last axis (NHWC), "
                f"got shape {shape}{hint}"
            )
        stride = self.tap_stride(LAYER_NAMES[depth])
        if shape[1] < stride or shape[2] < stride:
            raise ValueError(
                f"images of size {shape[1]}x{shape[2]} are smaller than the total stride {stride} "
                f"of {LAYER_NAMES[depth]!r}; use inputs of at least {stride}x{stride}"
            )

    # ---- forward (helpers run inside the compact __call__, so they may create submodules) -

    def _layer_factories(self, train: bool) -> tuple[Callable, Callable]:
        """``(conv, norm)``: ``nn.Conv`` / ``nn.BatchNorm`` partials with torch's settings."""
        conv = functools.partial(
            nn.Conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=_conv_init,
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.bn_axis_name,
        )
        return conv, norm

    def _stem(self, images, conv, norm) -> tuple[Array, Array]:
        """``(stem tap, max-pooled input of layer1)``."""
        if self.cifar_stem:
            x = conv(self.width, (3, 3), padding=_PAD1, name="conv1")(images)
        else:
            x = conv(self.width, (7, 7), strides=2, padding=((3, 3), (3, 3)), name="conv1")(images)
        stem = nn.relu(norm(name="bn1")(x))
        if self.cifar_stem:
            return stem, stem
        # torch MaxPool2d(3, 2, padding=1) pads with -inf; so does lax.reduce_window here.
        return stem, nn.max_pool(stem, (3, 3), strides=(2, 2), padding=_PAD1)

    def _stage(self, x, stage: int, in_channels: int, conv, norm) -> Array:
        """Stage ``stage`` (1..4): its first block strides (stages 2-4) and projects."""
        planes = self.width * 2 ** (stage - 1)
        out_channels = planes * self.expansion
        for index in range(int(self.stage_sizes[stage - 1])):
            stride = 2 if (stage > 1 and index == 0) else 1
            downsample = index == 0 and (stride != 1 or in_channels != out_channels)
            name = f"layer{stage}_{index}"
            if self.block == "bottleneck":
                inner = self.bottleneck_width(stage)
                x = _Bottleneck(planes, stride, downsample, inner, conv, norm, name=name)(x)
            else:
                x = _BasicBlock(planes, stride, downsample, conv, norm, name=name)(x)
            in_channels = out_channels
        return x

    def _head(self, features: Array) -> Array:
        """``fc``: ``torch.nn.Linear`` with its default initialisation."""
        return nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=_dense_kernel_init,
            bias_init=_dense_bias_init(features.shape[-1]),
            name="fc",
        )(features)

    @nn.compact
    def __call__(
        self,
        images: Float[Array, "b h w c"],
        train: bool = False,
        *,
        taps: Sequence[str] | None = None,
    ) -> dict[str, Array]:
        """Run the network up to the deepest requested tap.

        Args:
            images: NHWC float images ``(B, H, W, in_channels)``, already normalised; ``H, W``
                at least the stride of the deepest computed stage (32 for ``layer4``).
            train: ``False``: BatchNorm uses running statistics. ``True``: batch statistics,
                and ``batch_stats`` is updated (``apply(..., mutable=["batch_stats"])``).
            taps: names to return (module docstring); ``None`` = ``self.taps``, or
                ``default_taps`` when that is ``None`` too. Static.

        Returns:
            ``{name: activation}`` in the requested order: spatial taps ``(B, h, w, C)`` in
            ``dtype``, ``pooled*`` ``(B, C)`` float32, ``logits`` ``(B, num_classes)``.
            ``init`` runs every layer and the head, whatever taps are requested.

        Raises:
            ValueError: rank not 4, wrong channel count (with a hint for NCHW), images
                smaller than the stride of the deepest computed stage, unknown tap,
                ``logits`` without a head, bad configuration.
            TypeError: integer images; ``taps`` given as a single string.
        """
        self._check_config()
        if taps is None:
            taps = self.taps if self.taps is not None else self.default_taps
        taps = self._check_taps(taps)
        initializing = self.is_initializing()
        # init creates every parameter, whatever is requested
        depth = 4 if initializing else max(self._tap_depth(name) for name in taps)
        self._check_images(images, depth)

        conv, norm = self._layer_factories(train)
        acts = {}
        acts["stem"], x = self._stem(images, conv, norm)
        in_channels = self.width
        for stage in range(1, depth + 1):
            x = self._stage(x, stage, in_channels, conv, norm)
            in_channels = self.width * 2 ** (stage - 1) * self.expansion
            acts[f"layer{stage}"] = x

        out = {}
        for name in taps:
            if name == "pooled":
                out[name] = _pool(acts["layer4"])
            elif name.startswith("pooled_"):
                out[name] = _pool(acts[name.removeprefix("pooled_")])
            elif name != "logits":
                out[name] = acts[name]
        if self.num_classes is not None and ("logits" in taps or initializing):
            logits = self._head(_pool(acts["layer4"]))
            if "logits" in taps:
                out["logits"] = logits
        return {name: out[name] for name in taps}


# ---- constructors: one table, one generated function per row ---------------------------------


class _Arch(NamedTuple):
    """One standard architecture: torchvision's ``ResNet(block, layers, width_per_group)``."""

    block: str  # "basic" | "bottleneck"
    stage_sizes: tuple[int, int, int, int]
    width_per_group: int  # default bottleneck inner-width factor (128 = "wide")
    cifar_stem: bool
    summary: str  # first docstring line of the constructor


_ARCHS: dict[str, _Arch] = {
    "resnet18": _Arch(
        "basic", (2, 2, 2, 2), 64, False,
        "ResNet-18 (torchvision ``resnet18``): basic blocks (2, 2, 2, 2), 512-d ``pooled``.",
    ),
    "resnet34": _Arch(
        "basic", (3, 4, 6, 3), 64, False,
        "ResNet-34 (torchvision ``resnet34``): basic blocks (3, 4, 6, 3), 512-d ``pooled``.",
    ),
    "resnet50": _Arch(
        "bottleneck", (3, 4, 6, 3), 64, False,
        "ResNet-50 v1.5 (torchvision ``resnet50``): bottlenecks (3, 4, 6, 3), 2048-d ``pooled``.",
    ),
    "resnet101": _Arch(
        "bottleneck", (3, 4, 23, 3), 64, False,
        "ResNet-101 v1.5 (torchvision ``resnet101``): bottlenecks (3, 4, 23, 3), 2048-d "
        "``pooled``.",
    ),
    "wide_resnet50_2": _Arch(
        "bottleneck", (3, 4, 6, 3), 128, False,
        "WideResNet-50-2 (torchvision ``wide_resnet50_2``), the PatchCore / TailedCore "
        "backbone: at 224 px ``layer2`` (B, 28, 28, 512), ``layer3`` (B, 14, 14, 1024), "
        "``pooled`` (B, 2048).",
    ),
    "wide_resnet101_2": _Arch(
        "bottleneck", (3, 4, 23, 3), 128, False,
        "WideResNet-101-2 (torchvision ``wide_resnet101_2``): bottlenecks (3, 4, 23, 3) with "
        "2x inner width.",
    ),
    "resnet18_cifar": _Arch(
        "basic", (2, 2, 2, 2), 64, True,
        "CIFAR ResNet-18 of the OOD literature: ``resnet18`` with a 3x3/1 ``conv1`` (pad 1, "
        "weight ``(64, 3, 3, 3)``) and no max-pool; strides ``stem``/``layer1`` 1 .. "
        "``layer4`` 8.",
    ),
}

_ALLOWED_KWARGS = frozenset(
    {"taps", "param_dtype", "precision", "bn_momentum", "bn_axis_name", "in_channels", "name"}
)

_ARGS_DOC = """

Args:
    num_classes: head size; ``None`` = no head.
    width: base channels (64 in torchvision); smaller for test networks.{wpg}
    dtype: computation dtype.
    **kwargs: other :class:`ResNet` attributes: ``taps``, ``param_dtype``, ``precision``,
        ``bn_momentum``, ``bn_axis_name``, ``in_channels``, ``name``.

Raises:
    TypeError: an unknown keyword argument.
"""
_WPG_DOC = "\n    width_per_group: bottleneck inner width ``int(planes * width_per_group / 64)``."


def _build(
    block, stage_sizes, width_per_group, cifar_stem, /, *, num_classes, width, dtype, **kwargs
):
    unknown = set(kwargs) - _ALLOWED_KWARGS
    if unknown:
        raise TypeError(
            f"unexpected keyword arguments {sorted(unknown)}; allowed: "
            f"num_classes, width, dtype, {', '.join(sorted(_ALLOWED_KWARGS))} "
            "(and width_per_group for bottleneck networks)"
        )
    if kwargs.get("taps") is not None:
        kwargs["taps"] = tuple(kwargs["taps"])
    return ResNet(
        block=block,
        stage_sizes=tuple(stage_sizes),
        num_classes=num_classes,
        width=width,
        width_per_group=width_per_group,
        cifar_stem=cifar_stem,
        dtype=dtype,
        **kwargs,
    )


def _constructor(name: str, arch: _Arch) -> Callable[..., ResNet]:
    """The public constructor of one table row (keyword-only; bottlenecks also take
    ``width_per_group``, basic networks reject it)."""
    bottleneck = arch.block == "bottleneck"

    def build(
        *, num_classes: int | None = None, width: int = 64, dtype: Any = jnp.float32, **kwargs
    ) -> ResNet:
        width_per_group = arch.width_per_group
        if bottleneck:
            width_per_group = kwargs.pop("width_per_group", width_per_group)
        return _build(
            arch.block,
            arch.stage_sizes,
            width_per_group,
            arch.cifar_stem,
            num_classes=num_classes,
            width=width,
            dtype=dtype,
            **kwargs,
        )

    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("num_classes", keyword, default=None, annotation=int | None),
        inspect.Parameter("width", keyword, default=64, annotation=int),
    ]
    if bottleneck:
        params.append(
            inspect.Parameter(
                "width_per_group", keyword, default=arch.width_per_group, annotation=int
            )
        )
    params += [
        inspect.Parameter("dtype", keyword, default=jnp.float32, annotation=Any),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
    build.__signature__ = inspect.Signature(params, return_annotation=ResNet)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = arch.summary + _ARGS_DOC.format(wpg=_WPG_DOC if bottleneck else "")
    return build


#: Architecture name -> constructor, generated from the ``_ARCHS`` table.
ARCHITECTURES: dict[str, Callable[..., ResNet]] = {
    name: _constructor(name, arch) for name, arch in _ARCHS.items()
}
resnet18 = ARCHITECTURES["resnet18"]
resnet34 = ARCHITECTURES["resnet34"]
resnet50 = ARCHITECTURES["resnet50"]
resnet101 = ARCHITECTURES["resnet101"]
wide_resnet50_2 = ARCHITECTURES["wide_resnet50_2"]
wide_resnet101_2 = ARCHITECTURES["wide_resnet101_2"]
resnet18_cifar = ARCHITECTURES["resnet18_cifar"]
