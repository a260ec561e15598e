"""Classifier training (optax SGD, on-device augmentation, resumable checkpoints) and the OOD
evaluation used by the NAN experiments.

Recipe (nan-spec section 2.7; the NAN paper's own recipe is in its unverified appendix C, so
the closest documented CIFAR ResNet-18 CE recipe is used, that of
``gist-ailab/block-selection-for-OOD-detection::train.py``): cross-entropy, SGD momentum 0.9,
weight decay 5e-4 **coupled as in ``torch.optim.SGD``** (``g <- g + wd * p`` before the
momentum buffer; :func:`torch_sgd`), learning rate 0.1, batch 128, random crop 32 with 4 px
zero padding + horizontal flip, and a multistep schedule (x0.1 at 50 %, 75 % and 90 % of the
epochs, i.e. epochs 50/75/90 of 100). ``schedule="cosine"`` gives a per-step cosine decay
instead. Weight decay applies to every parameter (BatchNorm and biases included), as torch
does with ``model.parameters()``.

Everything random derives from one key: ``key_init, key_data, key_aug = split(key, 3)``;
the sample order of epoch ``e`` is ``permutation(fold_in(key_data, e), N)`` and the
augmentation of step ``s`` uses ``fold_in(key_aug, s)`` (inside the jitted step). A run
resumed from its checkpoint therefore continues with exactly the same batches and crops, and
ends with bit-identical parameters (CPU; XLA is deterministic there).

Mixed precision: ``compute_dtype=jnp.bfloat16`` clones the model with ``dtype=bfloat16``
(convolutions and activations in bf16); parameters, optimizer state, BatchNorm statistics,
the loss and the pooled features stay float32.

Checkpoints (``checkpoint_dir``): after every epoch the state is written atomically with
:func:`tailedcore_jax.checkpoint.save` to ``<checkpoint_dir>/last`` (only the last one is
kept). Calling :func:`train_classifier` again with the same arguments resumes after the last
completed epoch. JSON log: one line per epoch ``{"epoch", "step", "loss", "acc", "lr",
"time"}`` (``loss``/``acc`` averaged over the epoch's training batches, ``lr`` the rate of the
epoch's last step, ``time`` seconds for the epoch).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tailedcore_jax import checkpoint as _ckpt
from tailedcore_jax import ood as _ood
from tailedcore_jax.features import extract_features
from tailedcore_jax.metrics import auroc, fpr_at_tpr

__all__ = [
    "TrainState",
    "TrainResult",
    "torch_sgd",
    "lr_schedule",
    "crop_flip",
    "random_crop_flip",
    "normalize_images",
    "channel_stats",
    "init_train_state",
    "make_train_step",
    "epoch_indices",
    "train_classifier",
    "make_predict_fn",
    "predict",
    "recalibrate_batch_stats",
    "OOD_METHODS",
    "LABEL_FREE_METHODS",
    "ood_method_scores",
    "ood_metrics",
]


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; checkpointed as is).

    Attributes:
        step: int32 scalar, optimizer steps done.
        params: model parameters (float32).
        batch_stats: BatchNorm running statistics.
        opt_state: optax state.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict:
        """``{"params", "batch_stats"}`` for ``model.apply``."""
        return {"params": self.params, "batch_stats": self.batch_stats}


class TrainResult(NamedTuple):
    """Output of :func:`train_classifier`: final state, per-epoch log records, epochs run now."""

    state: TrainState
    history: list
    resumed_from_epoch: int


# ----------------------------------------------------------------------------- optimizer


@functools.lru_cache(maxsize=64)
def lr_schedule(
    kind: str = "multistep",
    *,
    base_lr: float = 0.1,
    epochs: int,
    steps_per_epoch: int,
    milestones: tuple = (0.5, 0.75, 0.9),
    gamma: float = 0.1,
) -> optax.Schedule:
    """Learning-rate schedule as a function of the optimizer step.

    Args:
        kind: ``"multistep"`` (torch ``MultiStepLR`` stepped once per epoch: the rate is
            ``base_lr * gamma**j`` during epoch ``e`` when ``j`` milestones are ``<= e``),
            ``"cosine"`` (``optax.cosine_decay_schedule`` over all steps, to 0) or
            ``"constant"``.
        base_lr: initial rate.
        epochs, steps_per_epoch: training length.
        milestones: multistep boundaries as fractions of ``epochs`` (rounded to whole epochs;
            the default 0.5/0.75/0.9 gives 50/75/90 for 100 epochs) or as ints (epochs).
        gamma: multistep factor.

    Raises:
        ValueError: unknown kind, non-positive sizes.
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"epochs and steps_per_epoch must be >= 1, got {epochs}, {steps_per_epoch}")
    if kind == "constant":
        return optax.constant_schedule(base_lr)
    if kind == "cosine":
        return optax.cosine_decay_schedule(base_lr, decay_steps=epochs * steps_per_epoch)
    if kind == "multistep":
        bounds = {}
        for m in milestones:
            ep = int(m) if isinstance(m, (int, np.integer)) else int(round(float(m) * epochs))
            if 0 < ep < epochs:
                bounds[ep * steps_per_epoch] = bounds.get(ep * steps_per_epoch, 1.0) * gamma
        return optax.piecewise_constant_schedule(base_lr, bounds)
    raise ValueError(f"unknown schedule {kind!r}; use 'multistep', 'cosine' or 'constant'")


def torch_sgd(
    learning_rate: float | optax.Schedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformation:
    """``torch.optim.SGD(lr, momentum, weight_decay, dampening=0, nesterov)`` in optax.

    torch computes ``g <- g + wd * p``; ``buf <- momentum * buf + g`` (``buf = g`` at the
    first step, the same thing from a zero buffer); ``p <- p - lr_t * buf`` (nesterov:
    ``p <- p - lr_t * (g + momentum * buf)``). That is exactly
    ``chain(add_decayed_weights(wd), trace(momentum, nesterov), scale_by_learning_rate(lr))``:
    *coupled* L2 weight decay that goes through the momentum buffer (not AdamW-style
    decoupled decay). Tested against ``torch.optim.SGD``.

    Args:
        learning_rate: float or schedule (a function of the step count).
        momentum: momentum factor (0 = plain SGD).
        weight_decay: L2 coefficient.
        nesterov: Nesterov momentum.
        weight_decay_mask: optional pytree of bools / callable (optax mask) selecting the
            decayed parameters; ``None`` decays all (torch's default for ``model.parameters()``).
    """
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
    if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


@functools.lru_cache(maxsize=64)
def _cached_tx(schedule, momentum, weight_decay, nesterov):
    # Same hyper-parameters -> same transformation object -> the jitted step is reused.
    return torch_sgd(schedule, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


# ----------------------------------------------------------------------------- augmentation


def crop_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array, *, padding: int = 4) -> jax.Array:
    """Deterministic crop + flip: zero-pad by ``padding``, cut the window at ``offsets``, mirror.

    torchvision ``RandomCrop(size, padding)`` (constant 0 fill, on the unnormalised image)
    followed by ``RandomHorizontalFlip``, with the random draws given explicitly.

    Args:
        images: ``(B, H, W, C)`` (any dtype; padding is 0 in that dtype).
        offsets: ``(B, 2)`` int, ``(top, left)`` in ``[0, 2 * padding]``.
        flips: ``(B,)`` bool, mirror horizontally after cropping.
        padding: pad width (static).

    Returns:
        ``(B, H, W, C)``, same dtype.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
    b, h, w, c = images.shape
    if offsets.shape != (b, 2) or flips.shape != (b,):
        raise ValueError(f"offsets must be ({b}, 2) and flips ({b},), got {offsets.shape}, {flips.shape}")
    p = int(padding)
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))

    def one(img, off, flip):
        out = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jnp.where(flip, out[:, ::-1], out)

    return jax.vmap(one)(padded, offsets.astype(jnp.int32), flips)


def random_crop_flip(key: jax.Array, images: jax.Array, *, padding: int = 4) -> jax.Array:
    """Random crop (zero padding ``padding``) and horizontal flip (p = 0.5), per image, jit-able.

    Args:
        key: PRNG key.
        images: ``(B, H, W, C)`` unnormalised images (the pad value is 0 = black).
        padding: pad width (static).

    Returns:
        ``(B, H, W, C)`` augmented images.
    """
    key_off, key_flip = jax.random.split(key)
    b = images.shape[0]
    offsets = jax.random.randint(key_off, (b, 2), 0, 2 * int(padding) + 1)
    flips = jax.random.bernoulli(key_flip, 0.5, (b,))
    return crop_flip(images, offsets, flips, padding=padding)


def normalize_images(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """uint8 (or [0, 255] float) images -> float32 ``(x / 255 - mean) / std`` per channel."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    mean = jnp.asarray(mean, jnp.float32).reshape(1, 1, 1, -1)
    std = jnp.asarray(std, jnp.float32).reshape(1, 1, 1, -1)
    return (x - mean) / std


def channel_stats(images: np.ndarray) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale (host side, float64)."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array, got shape {x.shape}")
    x = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    std = np.maximum(x.std(0), 1e-3)
    return tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in std)


# ----------------------------------------------------------------------------- train step


def _check_images_labels(images, labels, num_classes=None):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("the training set is empty")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    return images, labels.astype(np.int32)


def init_train_state(key: jax.Array, model, tx: optax.GradientTransformation, sample_images) -> TrainState:
    """Initialise parameters (``model.init`` on ``sample_images[:1]``) and the optimizer state."""
    x = jnp.zeros((1,) + tuple(np.shape(sample_images)[1:]), jnp.float32)
    variables = model.init(key, x, train=False)
    params = variables["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, variables.get("batch_stats", {}), tx.init(params))


@functools.lru_cache(maxsize=16)
def make_train_step(model, tx, *, mean: tuple, std: tuple, augment: bool = True, padding: int = 4):
    """One jitted SGD step ``(state, images_u8, labels, key_aug) -> (state, metrics)``.

    Inside: augmentation with ``fold_in(key_aug, state.step)`` (when ``augment``), normalisation,
    forward in training mode (batch statistics; running statistics updated), mean softmax
    cross-entropy in float32, gradient, optax update. ``metrics`` = ``{"loss", "acc", "lr"}``
    is not fetched to the host by the step. Memoised on its (hashable) arguments, so equal
    configurations share one compilation.
    """
    def loss_fn(params, batch_stats, x, labels):
        out, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True,
            mutable=["batch_stats"], taps=("logits",),
        )
        logits = out["logits"].astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return loss, (updates["batch_stats"], acc)

    @jax.jit
    def step(state: TrainState, images, labels, key_aug):
        x = images
        if augment:
            x = random_crop_flip(jax.random.fold_in(key_aug, state.step), x, padding=padding)
        x = normalize_images(x, mean, std)
        (loss, (new_bs, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, x, labels
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, new_bs, opt_state), {"loss": loss, "acc": acc}

    return step


def epoch_indices(key_data: jax.Array, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """Sample order of one epoch as ``(steps, batch_size)`` indices.

    ``permutation(fold_in(key_data, epoch), n)``; when ``n`` is not a multiple of
    ``batch_size`` the last batch is completed with the first indices of the same
    permutation (every sample is seen at least once per epoch and all batches have one
    shape, so the step compiles once). ``steps = ceil(n / batch_size)``.
    """
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key_data, epoch), n))
    steps = -(-n // batch_size)
    extra = steps * batch_size - n
    if extra:
        perm = np.concatenate([perm, perm[:extra]])
    return perm.reshape(steps, batch_size)


def _write_log(path: Path, records: list) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def train_classifier(
    key: jax.Array,
    model,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 128,
    learning_rate: float = 0.1,
    schedule: str = "multistep",
    milestones: tuple = (0.5, 0.75, 0.9),
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    augment: bool = True,
    padding: int = 4,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    compute_dtype: Any = None,
    checkpoint_dir: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
    stop_after_epoch: int | None = None,
    progress: bool = True,
    log_fn: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train a classifier with cross-entropy and :func:`torch_sgd`; resumable.

    Args:
        key: PRNG key (parameter init, sample order, augmentation; see the module docstring).
        model: Flax module with a head, ``apply(v, x, train, taps=("logits",))`` (e.g.
            ``resnet18_cifar(num_classes=K)``); use ``mutable=["batch_stats"]`` semantics.
        images: ``(N, H, W, C)`` uint8 training images (kept on the host; one batch at a
            time is sent to the device).
        labels: ``(N,)`` int labels in ``[0, num_classes)``.
        epochs: total epochs (the schedule depends on it).
        batch_size: batch size (``min(batch_size, N)`` is used).
        learning_rate, schedule, milestones: see :func:`lr_schedule`.
        momentum, weight_decay, nesterov: see :func:`torch_sgd`.
        augment, padding: random crop (zero padding) + horizontal flip on device.
        mean, std: per-channel normalisation on the [0, 1] scale (default: :func:`channel_stats`
            of ``images``).
        compute_dtype: e.g. ``jnp.bfloat16`` for mixed precision (parameters stay float32).
        checkpoint_dir: where ``last`` is written after each epoch and resumed from.
        log_path: JSON-lines log (rewritten on resume to the completed epochs, then appended).
        stop_after_epoch: stop (checkpoint written) once this many epochs are complete, e.g. to
            split a long run into several jobs; ``None`` = run to ``epochs``.
        progress: tqdm bar over the steps of each epoch.
        log_fn: called with each epoch's record (e.g. ``print``).

    Returns:
        :class:`TrainResult` (``state.variables`` are the model variables).

    Raises:
        ValueError: empty or inconsistent data, bad sizes, or a checkpoint written with a
            different key / epochs / batch size / data size.
    """
    images, labels = _check_images_labels(images, labels, getattr(model, "num_classes", None))
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = images.shape[0]
    batch_size = min(int(batch_size), n)
    steps_per_epoch = -(-n // batch_size)
    if mean is None or std is None:
        m, s = channel_stats(images)
        mean = m if mean is None else mean
        std = s if std is None else std
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if compute_dtype is not None:
        model = model.clone(dtype=compute_dtype)

    sched = lr_schedule(schedule, base_lr=float(learning_rate), epochs=int(epochs),
                        steps_per_epoch=steps_per_epoch, milestones=tuple(milestones))
    tx = _cached_tx(sched, float(momentum), float(weight_decay), bool(nesterov))
    key_init, key_data, key_aug = jax.random.split(key, 3)
    state = init_train_state(key_init, model, tx, images[:1])
    step_fn = make_train_step(model, tx, mean=mean, std=std, augment=bool(augment), padding=int(padding))

    meta = np.asarray([epochs, batch_size, n], np.int32)
    key_bits = np.asarray(jax.random.key_data(key), np.uint32)
    start_epoch, history = 0, []
    ckpt_path = Path(checkpoint_dir) / "last" if checkpoint_dir is not None else None
    if ckpt_path is not None and _ckpt.exists(ckpt_path):
        like = {"state": state, "epoch": np.int32(0), "meta": meta, "key": key_bits}
        saved = _ckpt.restore(ckpt_path, like=like)
        if not np.array_equal(np.asarray(saved["meta"]), meta) or not np.array_equal(
            np.asarray(saved["key"]), key_bits
        ):
            raise ValueError(
                f"checkpoint {ckpt_path} was written by a different run (epochs, batch_size, "
                f"N = {np.asarray(saved['meta']).tolist()} vs {meta.tolist()}, or another key); "
                "use a fresh checkpoint_dir"
            )
        state = jax.tree_util.tree_map(jnp.asarray, saved["state"])
        start_epoch = int(saved["epoch"])
    log_file = Path(log_path) if log_path is not None else None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        if log_file.exists() and start_epoch > 0:
            history = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
            history = [r for r in history if r.get("epoch", 0) <= start_epoch]
        _write_log(log_file, history)

    last = epochs if stop_after_epoch is None else max(min(int(stop_after_epoch), epochs), start_epoch)
    for epoch in range(start_epoch, last):
        t0 = time.perf_counter()
        order = epoch_indices(key_data, epoch, n, batch_size)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        metrics = []
        for idx in order:
            state, mets = step_fn(state, images[idx], labels[idx], key_aug)
            metrics.append(mets)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        stacked = jax.device_get(jax.tree_util.tree_map(lambda *v: jnp.stack(v), *metrics))
        step_now = int(state.step)
        record = {
            "epoch": epoch + 1,
            "step": step_now,
            "loss": float(np.mean(stacked["loss"])),
            "acc": float(np.mean(stacked["acc"])),
            "lr": float(sched(step_now - 1)),
            "time": round(time.perf_counter() - t0, 3),
        }
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1}: loss {record['loss']}")
        history.append(record)
        if ckpt_path is not None:
            _ckpt.save(ckpt_path, {"state": state, "epoch": np.int32(epoch + 1), "meta": meta,
                                   "key": key_bits}, overwrite=True)
        if log_file is not None:
            with log_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if log_fn is not None:
            log_fn(record)
    return TrainResult(state, history, start_epoch)


# ----------------------------------------------------------------------------- inference


@functools.lru_cache(maxsize=16)
def make_predict_fn(model, *, mean: tuple, std: tuple, taps: tuple = ("pooled", "logits")):
    """Jitted ``(variables, images_u8) -> {tap: array}`` in inference mode (running BN stats)."""

    @jax.jit
    def fn(variables, images):
        return model.apply(variables, normalize_images(images, mean, std), train=False, taps=taps)

    return fn


def predict(model, variables, images, *, mean, std, taps=("pooled", "logits"), batch_size: int = 256):
    """Run the model over ``(N, H, W, C)`` uint8 images in fixed-size batches; numpy outputs.

    Raises:
        ValueError: no images.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array, got shape {images.shape}")
    fn = make_predict_fn(model, mean=tuple(map(float, mean)), std=tuple(map(float, std)), taps=tuple(taps))
    bs = min(int(batch_size), images.shape[0])
    return extract_features(lambda x: fn(variables, x), images, batch_size=bs)


def recalibrate_batch_stats(model, variables, images, *, mean, std, batch_size: int = 128) -> dict:
    """BatchNorm recalibration (synthetic-default.md): running statistics := the cumulative
    average of the per-batch statistics over ``images`` (all batches weighted by size).

    Used for label-free NAN on a random-init backbone. Returns new variables (params
    unchanged). Flax stores the biased batch variance.

    Raises:
        ValueError: no images.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array, got shape {images.shape}")
    mom0 = model.clone(bn_momentum=0.0)
    mean_t, std_t = tuple(map(float, mean)), tuple(map(float, std))

    @jax.jit
    def batch_stats(v, x):
        _, upd = mom0.apply(v, normalize_images(x, mean_t, std_t), train=True,
                            mutable=["batch_stats"], taps=("pooled",))
        return upd["batch_stats"]

    total, acc = 0, None
    for s in range(0, images.shape[0], batch_size):
        x = images[s : s + batch_size]
        bs = batch_stats(variables, x)
        w = x.shape[0]
        acc = jax.tree_util.tree_map(lambda a: a * w, bs) if acc is None else jax.tree_util.tree_map(
            lambda a, b: a + b * w, acc, bs)
        total += w
    new_stats = jax.tree_util.tree_map(lambda a: a / total, acc)
    return {**variables, "batch_stats": new_stats}


# ----------------------------------------------------------------------------- OOD evaluation

#: Methods of the NAN paper's Tables 1-3 (supervised), in table order.
OOD_METHODS = (
    "MSP", "Energy", "MaxLogit", "KL", "Mahalanobis", "FeatureNorm", "NAN", "KNN", "SSD",
    "NAN+KNN", "NAN+SSD", "NAN+ReAct", "NAN+ReAct+KNN", "NAN+ReAct+SSD",
)
#: Methods that need no labels and no classifier head (label-free setting, paper section 4).
LABEL_FREE_METHODS = (
    "FeatureNorm", "NAN", "KNN", "SSD", "NAN+KNN", "NAN+SSD", "NAN+ReAct", "NAN+ReAct+KNN",
    "NAN+ReAct+SSD",
)


def _check_set(name, feats, logits, dim):
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(f"{name}: features must be a non-empty (n, D) array, got shape {feats.shape}")
    if feats.shape[1] != dim:
        raise ValueError(f"{name}: features have dimension {feats.shape[1]}, expected {dim}")
    if not np.all(np.isfinite(feats)):
        raise ValueError(f"{name}: features contain NaN or inf")
    if logits is not None:
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[0] != feats.shape[0]:
            raise ValueError(f"{name}: logits must be ({feats.shape[0]}, K), got shape {logits.shape}")
        if not np.all(np.isfinite(logits)):
            raise ValueError(f"{name}: logits contain NaN or inf (a diverged model?)")
    return feats.astype(np.float32), None if logits is None else logits.astype(np.float32)


def ood_method_scores(
    key: jax.Array,
    train_features,
    eval_sets: Mapping[str, tuple],
    *,
    train_labels=None,
    num_classes: int | None = None,
    methods: Sequence[str] | None = None,
    knn_k: int = 50,
    ssd_clusters: int = 1,
    react_percentile: float = 90.0,
) -> dict[str, dict[str, np.ndarray]]:
    """Every OOD score of :data:`OOD_METHODS` on several sets (higher = in-distribution).

    Built on :mod:`tailedcore_jax.ood`. The bank / statistics are fitted on the ID training
    features: KNN bank (all training features), SSD (``ssd_clusters``-means, shared
    covariance), Mahalanobis (class means, tied covariance; needs ``train_labels``) and the
    ReAct clip value (``react_percentile`` of the training activations; OpenOOD uses an ID
    validation split). ``NAN+ReAct+KNN/SSD`` divide the unclipped distance by NAN of the
    clipped features (nan-spec 2.5, most plausible reading). Combination scores are ``-inf``
    for rows with no active unit (:func:`tailedcore_jax.ood.combine_distance_nan`).

    Args:
        key: PRNG key (SSD's k-means initialisation).
        train_features: ``(N, D)`` pooled ID training features.
        eval_sets: ``{name: (features (n, D), logits (n, K) or None)}``; the ID test set is
            one of them.
        train_labels: ``(N,)`` labels (Mahalanobis only).
        num_classes: classes (Mahalanobis only).
        methods: subset of :data:`OOD_METHODS`; default all that the inputs allow
            (logit scores need logits in every set, Mahalanobis needs labels).
        knn_k: KNN neighbour rank, clipped to ``N`` (OpenOOD / Sun et al. default 50).
        ssd_clusters: SSD clusters. react_percentile: ReAct percentile.

    Returns:
        ``{method: {set name: (n,) float32 scores}}``.

    Raises:
        ValueError: empty sets, NaN/inf features or logits, inconsistent shapes, an unknown
            method, a method whose inputs are missing.
    """
    tr = np.asarray(train_features)
    if tr.ndim != 2 or tr.shape[0] == 0:
        raise ValueError(f"train_features must be a non-empty (N, D) array, got shape {tr.shape}")
    if not np.all(np.isfinite(tr)):
        raise ValueError("train_features contain NaN or inf")
    if not eval_sets:
        raise ValueError("eval_sets is empty")
    dim = tr.shape[1]
    sets = {name: _check_set(name, f, lg, dim) for name, (f, lg) in eval_sets.items()}
    has_logits = all(lg is not None for _, lg in sets.values())
    has_labels = train_labels is not None and num_classes is not None
    if methods is None:
        methods = [m for m in OOD_METHODS
                   if (m in LABEL_FREE_METHODS or has_logits) and (m != "Mahalanobis" or has_labels)]
    for m in methods:
        if m not in OOD_METHODS:
            raise ValueError(f"unknown method {m!r}; known: {', '.join(OOD_METHODS)}")
        if m not in LABEL_FREE_METHODS and m != "Mahalanobis" and not has_logits:
            raise ValueError(f"method {m} needs logits for every set")
        if m == "Mahalanobis" and not has_labels:
            raise ValueError("method Mahalanobis needs train_labels and num_classes")
    tr = jnp.asarray(tr, jnp.float32)
    k = max(1, min(int(knn_k), tr.shape[0]))
    need = set(methods)
    ssd = _ood.ssd_fit(key, tr, num_clusters=ssd_clusters) if need & {"SSD", "NAN+SSD", "NAN+ReAct+SSD"} else None
    maha = (_ood.mahalanobis_fit(tr, jnp.asarray(train_labels), num_classes=int(num_classes))
            if "Mahalanobis" in need else None)
    react_c = _ood.react_threshold(tr, percentile=react_percentile) if any("ReAct" in m for m in need) else None

    out: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods}
    for name, (f, lg) in sets.items():
        per_set = _set_scores(methods, jnp.asarray(f), lg, tr, k=k, ssd=ssd, maha=maha, react_c=react_c)
        for m in methods:
            out[m][name] = per_set[m]
    return out


def _set_scores(methods, f, lg, bank, *, k, ssd, maha, react_c) -> dict[str, np.ndarray]:
    """Scores of one evaluation set; KNN/SSD distances and NAN computed once and shared."""
    cache = {}

    def get(name, fn):
        if name not in cache:
            cache[name] = fn()
        return cache[name]

    def knn_d():
        return get("knn", lambda: _ood.knn_ood_distance(f, bank, k=k))

    def ssd_d():
        return get("ssd", lambda: _ood.ssd_distance(ssd, f))

    def nan():
        return get("nan", lambda: _ood.negative_aware_norm(f))

    def nan_react():
        return get("nan_react", lambda: _ood.nan_react_score(f, react_c))

    fns = {
        "MSP": lambda: _ood.msp(lg),
        "Energy": lambda: _ood.energy(lg),
        "MaxLogit": lambda: _ood.max_logit(lg),
        "KL": lambda: _ood.kl_uniform(lg),
        "Mahalanobis": lambda: _ood.mahalanobis_score(maha, f),
        "FeatureNorm": lambda: _ood.feature_norm(f, ord=1),
        "NAN": nan,
        "KNN": lambda: -knn_d(),
        "SSD": lambda: -ssd_d(),
        "NAN+KNN": lambda: _ood.combine_distance_nan(knn_d(), nan()),
        "NAN+SSD": lambda: _ood.combine_distance_nan(ssd_d(), nan()),
        "NAN+ReAct": nan_react,
        "NAN+ReAct+KNN": lambda: _ood.combine_distance_nan(knn_d(), nan_react()),
        "NAN+ReAct+SSD": lambda: _ood.combine_distance_nan(ssd_d(), nan_react()),
    }
    return {m: np.asarray(fns[m](), np.float32) for m in methods}


def _rank_safe(id_s: np.ndarray, ood_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace -inf (combination scores of all-inactive rows) by a value below every finite
    score: the ranking, hence AUROC and FPR, is unchanged, and the metrics accept it."""
    both = np.concatenate([id_s, ood_s])
    if np.isnan(both).any():
        raise ValueError("scores contain NaN")
    if np.isposinf(both).any():
        raise ValueError("scores contain +inf")
    if np.isneginf(both).any():
        finite = both[np.isfinite(both)]
        low = (finite.min() - 1.0) if finite.size else 0.0
        id_s = np.where(np.isneginf(id_s), low, id_s)
        ood_s = np.where(np.isneginf(ood_s), low, ood_s)
    return id_s.astype(np.float32), ood_s.astype(np.float32)


def ood_metrics(
    scores: Mapping[str, Mapping[str, np.ndarray]], id_name: str, *, tpr: float = 0.95
) -> dict[str, dict[str, dict[str, float]]]:
    """AUROC and FPR@``tpr`` (ID positive, nan-spec section 5) of every method on every OOD set.

    Args:
        scores: output of :func:`ood_method_scores`.
        id_name: the key of the ID test set in each ``scores[method]``.
        tpr: ID true-positive rate of the FPR (0.95 = FPR95).

    Returns:
        ``{method: {ood set | "average": {"auroc": %, "fpr": %}}}`` in percent; ``average``
        is the plain mean over the OOD sets (as in the paper's tables).

    Raises:
        ValueError: ``id_name`` missing, no OOD set, NaN/+inf scores.
    """
    out = {}
    for method, per_set in scores.items():
        if id_name not in per_set:
            raise ValueError(f"method {method}: no scores for the ID set {id_name!r}")
        ood_names = [n for n in per_set if n != id_name]
        if not ood_names:
            raise ValueError("no OOD set to evaluate")
        rows = {}
        for n in ood_names:
            i_s, o_s = _rank_safe(np.asarray(per_set[id_name]), np.asarray(per_set[n]))
            labels = np.concatenate([np.ones(i_s.size, np.int32), np.zeros(o_s.size, np.int32)])
            a = float(auroc(jnp.asarray(np.concatenate([i_s, o_s])), jnp.asarray(labels)))
            f = float(fpr_at_tpr(jnp.asarray(i_s), jnp.asarray(o_s), tpr))
            rows[n] = {"auroc": 100.0 * a, "fpr": 100.0 * f}
        rows["average"] = {
            "auroc": float(np.mean([rows[n]["auroc"] for n in ood_names])),
            "fpr": float(np.mean([rows[n]["fpr"] for n in ood_names])),
        }
        out[method] = rows
    return out
