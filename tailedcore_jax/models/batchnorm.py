"""BatchNorm recalibration: replace running statistics by averages over a data set.

A randomly initialised backbone has BatchNorm running statistics of 0 / 1, which makes its
deeper features nearly constant. Recalibrating them on the training images (PyTorch's
``momentum=None`` "cumulative average" mode) is what makes random ResNet features usable
for the offline default (``synthetic-default.md``).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["recalibrate_batch_norm"]


def recalibrate_batch_norm(model, variables, images: np.ndarray | Iterable, *, batch_size: int = 32):
    """Running BN statistics = the average of per-batch statistics over ``images``.

    Each batch runs in training mode with ``bn_momentum=0`` so the updated ``batch_stats``
    are exactly that batch's mean and (biased) variance; the results are averaged with the
    batch sizes as weights (PyTorch's ``momentum=None`` averages per-batch statistics with
    equal weights; the two agree when batches have equal size). Parameters are untouched.

    Args:
        model: a :class:`~tailedcore_jax.models.resnet.ResNet` (needs ``bn_momentum``).
        variables: ``{"params", "batch_stats"}``.
        images: ``(N, H, W, C)`` normalised float images, or an iterable of such batches.
        batch_size: images per forward pass when ``images`` is an array.

    Returns:
        new variables with recalibrated ``batch_stats``.

    Raises:
        ValueError: no images.
    """
    if not hasattr(model, "bn_momentum"):
        raise TypeError("recalibrate_batch_norm needs a model with a `bn_momentum` attribute")
    probe = model.clone(bn_momentum=0.0)

    @jax.jit
    def batch_stats(v, x):
        _, upd = probe.apply(v, x, train=True, mutable=["batch_stats"])
        return upd["batch_stats"]

    if isinstance(images, np.ndarray) or hasattr(images, "shape"):
        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[0] == 0:
            raise ValueError(f"images must be a non-empty (N, H, W, C) array, got {arr.shape}")
        batches = (arr[i:i + batch_size] for i in range(0, arr.shape[0], batch_size))
    else:
        batches = iter(images)
    total = None
    count = 0
    for x in batches:
        x = jnp.asarray(x)
        stats = batch_stats(variables, x)
        n = x.shape[0]
        weighted = jax.tree_util.tree_map(lambda s: s * n, stats)
        total = weighted if total is None else jax.tree_util.tree_map(jnp.add, total, weighted)
        count += n
    if total is None:
        raise ValueError("recalibrate_batch_norm got no images")
    new_stats = jax.tree_util.tree_map(lambda s: s / count, total)
    return {**variables, "batch_stats": new_stats}
