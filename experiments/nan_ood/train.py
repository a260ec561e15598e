"""Classifier training for the NAN experiment: optax SGD, on-device crop/flip, resumable
checkpoints, batched prediction.

Recipe: the closest documented CIFAR ResNet-18 cross-entropy recipe (the NAN paper does not
publish its own), that of ``gist-ailab/block-selection-for-OOD-detection::train.py``: SGD
momentum 0.9, weight decay 5e-4 **coupled as in ``torch.optim.SGD``** (``g <- g + wd * p``
before the momentum buffer; :func:`torch_sgd`), learning rate 0.1, batch 128, random crop 32
with 4 px zero padding + horizontal flip, and a multistep schedule (x0.1 at 50 %, 75 % and
90 % of the epochs). ``schedule="cosine"`` gives a per-step cosine decay instead. Weight
decay applies to every parameter (BatchNorm and biases included), as torch does with
``model.parameters()``.

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

``python -m experiments.nan_ood.train`` trains alone (see :mod:`experiments.nan_ood.main`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tailedcore_jax import checkpoint as _ckpt
from tailedcore_jax.features import extract_features

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
    """Output of :func:`train_classifier`: final state, per-epoch log records (all epochs
    when a ``log_path`` is kept), and the epoch the run resumed after (0 = fresh)."""

    state: TrainState
    history: list
    resumed_from_epoch: int

    @property
    def epochs_done(self) -> int:
        """Completed epochs, resumed ones included."""
        return int(self.history[-1]["epoch"]) if self.history else self.resumed_from_epoch


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
    ckpt_path = Path(checkpoint_dir) / "last" if checkpoint_dir is not None else None
    state, start_epoch = _resume(ckpt_path, state, meta, key_bits)
    log_file = Path(log_path) if log_path is not None else None
    history = _restart_log(log_file, start_epoch)

    last = epochs if stop_after_epoch is None else max(min(int(stop_after_epoch), epochs), start_epoch)
    for epoch in range(start_epoch, last):
        t0 = time.perf_counter()
        order = epoch_indices(key_data, epoch, n, batch_size)
        state, mets = _run_epoch(step_fn, state, images, labels, order, key_aug,
                                 desc=f"epoch {epoch + 1}/{epochs}" if progress else None)
        step_now = int(state.step)
        record = {
            "epoch": epoch + 1,
            "step": step_now,
            "loss": float(np.mean(mets["loss"])),
            "acc": float(np.mean(mets["acc"])),
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


def _resume(ckpt_path: Path | None, state: TrainState, meta, key_bits) -> tuple[TrainState, int]:
    """(state, completed epochs) from ``ckpt_path`` when it holds a checkpoint of this run."""
    if ckpt_path is None or not _ckpt.exists(ckpt_path):
        return state, 0
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
    return jax.tree_util.tree_map(jnp.asarray, saved["state"]), int(saved["epoch"])


def _restart_log(log_file: Path | None, start_epoch: int) -> list:
    """The log records of the completed epochs; the file is rewritten to hold just those."""
    history = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        if log_file.exists() and start_epoch > 0:
            history = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
            history = [r for r in history if r.get("epoch", 0) <= start_epoch]
        _write_log(log_file, history)
    return history


def _run_epoch(step_fn, state, images, labels, order, key_aug, *, desc: str | None):
    """One pass over ``order`` (``(steps, batch)`` indices); the stacked step metrics on the
    host. ``desc``: tqdm bar title (None = no bar)."""
    bar = None
    if desc is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc=desc, leave=False)
    metrics = []
    for idx in order:
        state, mets = step_fn(state, images[idx], labels[idx], key_aug)
        metrics.append(mets)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return state, jax.device_get(jax.tree_util.tree_map(lambda *v: jnp.stack(v), *metrics))


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



if __name__ == "__main__":
    from experiments.nan_ood.main import train_main

    train_main()
