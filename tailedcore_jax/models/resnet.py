"""Flax (linen) ResNets in torchvision's exact layout, returning named activations ("taps").

JAX port of ``torchvision/models/resnet.py::ResNet`` (pytorch/vision), ResNet v1.5: the
stride of a bottleneck block sits on its 3x3 convolution. Everything is NHWC. The layout is
chosen so that torchvision / timm weights load one-to-one (see
:mod:`tailedcore_jax.models.convert`) and give the same activations:

* every stride-2 3x3 convolution and the stem max-pool use explicit ``(1, 1)`` padding, as
  torch does. Never ``'SAME'``: on even inputs ``'SAME'`` pads ``(0, 1)`` and shifts every
  feature by half a pixel (peers-and-performance.md 1.6);
* the stem is ``7x7/2 conv (pad 3) -> BN -> ReLU -> 3x3/2 max-pool (pad 1)``;
* bottleneck inner width is ``int(planes * width_per_group / 64)``, so WideResNet-50-2 /
  101-2 (``width_per_group=128``) have inner widths ``128 * 2**i`` and outputs ``256 * 2**i``;
* BatchNorm: ``momentum=0.9`` (torch's 0.1), ``eps=1e-5``; ``train=False`` uses the running
  statistics.

Taps (keys of the returned dict, all NHWC unless noted):

========================  ===================================================================
``stem``                  after ``conv1 -> bn1 -> relu``, **before** the max-pool
                          (stride 2; stride 1 for the CIFAR variant, which has no max-pool)
``layer1`` .. ``layer4``  output of the last block of each stage (post-ReLU), strides
                          4/8/16/32 (CIFAR: 1/2/4/8)
``pooled``                global average of ``layer4``, shape ``(B, C)``, float32
``pooled_<name>``         global average of ``stem`` / ``layer1`` .. ``layer4``, ``(B, C)``,
                          float32 (``pooled_layer3`` is the random-backbone embedding of
                          synthetic-default.md; ``pooled_layer4`` equals ``pooled``)
``logits``                ``fc(pooled)``, ``(B, num_classes)``; only when the model has a head
========================  ===================================================================

The forward pass stops after the deepest stage any requested tap needs, so asking for
``("layer2", "layer3")`` never runs ``layer4``; ``pooled`` and ``logits`` imply ``layer4``.
The dict is built in the requested order, but a dict leaving ``jax.jit`` has sorted keys
(pytree flattening): index it by name.

Initialisation follows torchvision (kaiming-normal fan-out convs, BN scale 1 / bias 0,
``torch.nn.Linear``'s uniform head) and always creates every variable, whatever taps are
requested. Note: on CPU, ``jax.jit(model.init)`` with a default (threefry) key compiles
slowly, one random kernel per parameter; a ``jax.random.key(seed, impl="rbg")`` key, or
``jax.threefry_partitionable(False)``, compiles several times faster.

Example::

    model = resnet18(width=16)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    out = model.apply(variables, images, taps=("layer2", "layer3", "pooled_layer3"))
    # BN recalibration / training: batch statistics, updated running averages
    out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])

References:
    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
    torchvision ``models/resnet.py`` (pytorch/vision) for the exact layout.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

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
    architectures; build ``ResNet`` directly only for non-standard depths (tests).

    Attributes:
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50/101, WRN).
        stage_sizes: blocks per stage, 4 ints (torchvision ``layers``).
        num_classes: size of the ``fc`` head; ``None`` = no head (no ``logits`` tap).
        width: base channels (torchvision fixes 64): stem output and stage-1 ``planes``;
            stage ``i`` has ``planes = width * 2**i``. Reduce it for small test networks.
        width_per_group: bottleneck inner width is ``int(planes * width_per_group / 64)``
            (torchvision's formula; 128 = "wide"). Ignored by basic blocks.
        cifar_stem: 3x3 stride-1 stem conv and no max-pool (CIFAR ResNet of the OOD
            literature, 32x32 inputs).
        in_channels: input channels the stem expects.
        taps: default taps to return (``None`` = all of ``available_taps``); overridden by
            the ``taps=`` argument of ``__call__``.
        dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
            ``pooled*`` taps are always averaged in float32.
        param_dtype: parameter dtype.
        precision: ``jax.lax.Precision`` of convolutions and the head (``None`` = backend
            default; on GPU that may be TF32 for float32).
        bn_momentum: Flax BatchNorm momentum (running = m * running + (1 - m) * batch);
            torch's ``momentum=0.1`` is Flax 0.9. Set 0.0 to read one batch's statistics
            from the updated ``batch_stats`` (e.g. to average them yourself). Flax stores
            the biased batch variance in ``var`` (torch's ``running_var`` uses the unbiased
            one); normalisation in ``train=True`` uses the biased one in both.
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

    # ---- forward ----------------------------------------------------------------------------

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
            images: NHWC float images ``(B, H, W, in_channels)``, already normalised
                (e.g. ImageNet mean/std); ``H, W`` at least the stride of the deepest
                computed stage (32 for ``layer4`` / ``pooled``, 8 for CIFAR).
            train: ``False``: BatchNorm uses running statistics. ``True``: batch statistics,
                and ``batch_stats`` is updated (call ``apply(..., mutable=["batch_stats"])``).
            taps: names to return (see the module docstring); ``None`` = ``self.taps``, or
                ``default_taps`` when that is ``None`` too. Static.

        Returns:
            ``{name: activation}`` in the order requested: spatial taps ``(B, h, w, C)`` in
            ``dtype``, ``pooled*`` ``(B, C)`` float32, ``logits`` ``(B, num_classes)``.
            During ``init`` every layer (and the head) runs, so the variables are complete
            whatever taps are requested.

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
        depth = max(self._tap_depth(name) for name in taps)
        initializing = self.is_initializing()
        if initializing:
            depth = 4  # create every parameter, whatever is requested
        self._check_images(images, depth)

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

        acts = {}
        if self.cifar_stem:
            x = conv(self.width, (3, 3), padding=_PAD1, name="conv1")(images)
        else:
            x = conv(self.width, (7, 7), strides=2, padding=((3, 3), (3, 3)), name="conv1")(images)
        x = nn.relu(norm(name="bn1")(x))
        acts["stem"] = x
        if not self.cifar_stem:
            # torch MaxPool2d(3, 2, padding=1) pads with -inf; so does lax.reduce_window here.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD1)

        in_channels = self.width
        for stage in range(1, depth + 1):
            planes = self.width * 2 ** (stage - 1)
            out_channels = planes * self.expansion
            for index in range(int(self.stage_sizes[stage - 1])):
                stride = 2 if (stage > 1 and index == 0) else 1
                downsample = index == 0 and (stride != 1 or in_channels != out_channels)
                name = f"layer{stage}_{index}"
                if self.block == "bottleneck":
                    x = _Bottleneck(
                        planes,
                        stride,
                        downsample,
                        self.bottleneck_width(stage),
                        conv,
                        norm,
                        name=name,
                    )(x)
                else:
                    x = _BasicBlock(planes, stride, downsample, conv, norm, name=name)(x)
                in_channels = out_channels
            acts[f"layer{stage}"] = x

        def pool(a):
            # float32 mean whatever the compute dtype (NAN counts exact zeros; nan-spec 2.3)
            return jnp.mean(a.astype(jnp.float32), axis=(1, 2))

        out = {}
        for name in taps:
            if name == "pooled":
                out[name] = pool(acts["layer4"])
            elif name.startswith("pooled_"):
                out[name] = pool(acts[name[len("pooled_") :]])
            elif name != "logits":
                out[name] = acts[name]
        if self.num_classes is not None and ("logits" in taps or initializing):
            fan_in = acts["layer4"].shape[-1]
            logits = nn.Dense(
                self.num_classes,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                kernel_init=_dense_kernel_init,
                bias_init=_dense_bias_init(fan_in),
                name="fc",
            )(pool(acts["layer4"]))
            if "logits" in taps:
                out["logits"] = logits
        return {name: out[name] for name in taps}


# ---- constructors ---------------------------------------------------------------------------

_ALLOWED_KWARGS = frozenset(
    {"taps", "param_dtype", "precision", "bn_momentum", "bn_axis_name", "in_channels", "name"}
)


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


def resnet18(
    *, num_classes: int | None = None, width: int = 64, dtype: Any = jnp.float32, **kwargs
) -> ResNet:
    """ResNet-18 (torchvision ``resnet18``): basic blocks (2, 2, 2, 2), 512-d ``pooled``.

    Args:
        num_classes: head size; ``None`` = no head.
        width: base channels (64 in torchvision); smaller for test networks.
        dtype: computation dtype.
        **kwargs: other :class:`ResNet` attributes: ``taps``, ``param_dtype``,
            ``precision``, ``bn_momentum``, ``bn_axis_name``, ``in_channels``.

    Raises:
        TypeError: an unknown keyword argument.
    """
    return _build(
        "basic",
        (2, 2, 2, 2),
        64,
        False,
        num_classes=num_classes,
        width=width,
        dtype=dtype,
        **kwargs,
    )


def resnet34(
    *, num_classes: int | None = None, width: int = 64, dtype: Any = jnp.float32, **kwargs
) -> ResNet:
    """ResNet-34 (torchvision ``resnet34``): basic blocks (3, 4, 6, 3), 512-d ``pooled``.

    Arguments as :func:`resnet18`.
    """
    return _build(
        "basic",
        (3, 4, 6, 3),
        64,
        False,
        num_classes=num_classes,
        width=width,
        dtype=dtype,
        **kwargs,
    )


def resnet50(
    *,
    num_classes: int | None = None,
    width: int = 64,
    width_per_group: int = 64,
    dtype: Any = jnp.float32,
    **kwargs,
) -> ResNet:
    """ResNet-50 v1.5 (torchvision ``resnet50``): bottlenecks (3, 4, 6, 3), 2048-d ``pooled``.

    Arguments as :func:`resnet18`, plus ``width_per_group`` (bottleneck inner width is
    ``int(planes * width_per_group / 64)``).
    """
    return _build(
        "bottleneck",
        (3, 4, 6, 3),
        width_per_group,
        False,
        num_classes=num_classes,
        width=width,
        dtype=dtype,
        **kwargs,
    )


def resnet101(
    *,
    num_classes: int | None = None,
    width: int = 64,
    width_per_group: int = 64,
    dtype: Any = jnp.float32,
    **kwargs,
) -> ResNet:
    """ResNet-101 v1.5 (torchvision ``resnet101``): bottlenecks (3, 4, 23, 3), 2048-d ``pooled``.

    Arguments as :func:`resnet50`.
    """
    return _build(
        "bottleneck",
        (3, 4, 23, 3),
        width_per_group,
        False,
        num_classes=num_classes,
        width=width,
        dtype=dtype,
        **kwargs,
    )


def wide_resnet50_2(
    *,
    num_classes: int | None = None,
    width: int = 64,
    width_per_group: int = 128,
    dtype: Any = jnp.float32,
    **kwargs,
) -> ResNet:
    """WideResNet-50-2 (torchvision ``wide_resnet50_2``): ResNet-50 with 2x inner width.

    The PatchCore / TailedCore backbone: ``layer2`` (B, 28, 28, 512), ``layer3``
    (B, 14, 14, 1024), ``pooled`` (B, 2048) at 224 px. Arguments as :func:`resnet50`.
    """
    return _build(
        "bottleneck",
        (3, 4, 6, 3),
        width_per_group,
        False,
        num_classes=num_classes,
        width=width,
        dtype=dtype,
        **kwargs,
    )


def wide_resnet101_2(
    *,
    num_classes: int | None = None,
    width: int = 64,
    width_per_group: int = 128,
    dtype: Any = jnp.float32,
    **kwargs,
) -> ResNet:
    """WideResNet-101-2 (torchvision ``wide_resnet101_2``). Arguments as :func:`resnet50`."""
    return _build(
        "bottleneck",
        (3, 4, 23, 3),
        width_per_group,
        False,
        num_classes=num_classes,
        width=width,
        dtype=dtype,
        **kwargs,
    )


def resnet18_cifar(
    *, num_classes: int | None = None, width: int = 64, dtype: Any = jnp.float32, **kwargs
) -> ResNet:
    """CIFAR ResNet-18 of the OOD literature: torchvision ``resnet18`` with ``conv1``
    replaced by a 3x3 stride-1 conv (padding 1) and no max-pool.

    Strides: ``stem``/``layer1`` 1, ``layer2`` 2, ``layer3`` 4, ``layer4`` 8 (4x4 at 32 px);
    same parameter names as ``resnet18`` (``conv1.weight`` is ``(64, 3, 3, 3)``).
    Arguments as :func:`resnet18`.
    """
    return _build(
        "basic", (2, 2, 2, 2), 64, True, num_classes=num_classes, width=width, dtype=dtype, **kwargs
    )


#: Architecture name -> constructor (keyword arguments as documented on each).
ARCHITECTURES: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "wide_resnet50_2": wide_resnet50_2,
    "wide_resnet101_2": wide_resnet101_2,
    "resnet18_cifar": resnet18_cifar,
}
