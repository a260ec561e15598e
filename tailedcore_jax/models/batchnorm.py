"""BatchNorm recalibration: replace running statistics by averages over a data set.

A randomly initialised backbone has BatchNorm running statistics of 0 / 1, which makes its
deeper features nearly constant. Recalibrating them on the training images (PyTorch's
``momentum=None`` "cumulative average" mode) makes random ResNet features usable, e.g. for
the offline anomaly-detection default and label-free NAN.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["recalibrate_batch_norm"]


def recalibrate_batch_norm(model, variables, images: np.ndarray | Iterable, *,
                           batch_size: int = 32,
                           preprocess: Callable[[jax.Array], jax.Array] | None = None):
    """Running BN statistics = the batch-size-weighted mean of per-batch statistics.

    ``mean_l = sum_b n_b * mu_l(b) / N`` and ``var_l = sum_b n_b * sigma_l^2(b) / N`` for
    every BatchNorm layer ``l``, with ``mu_l(b)``, ``sigma_l^2(b)`` the mean and biased
    variance of batch ``b`` (``n_b`` images, ``N`` in all), computed in training mode with
    ``bn_momentum=0``. With equal batch sizes this is PyTorch's ``momentum=None``
    recalibration. Parameters are untouched.

    Args:
        model: a :class:`~tailedcore_jax.models.resnet.ResNet` (needs ``bn_momentum``).
        variables: ``{"params", "batch_stats"}``.
        images: ``(N, H, W, C)`` array, or an iterable of ``(n_b, H, W, C)`` batches; float
            images already normalised, or raw ones (e.g. uint8) with ``preprocess``.
        batch_size: images per forward pass when ``images`` is an array.
        preprocess: applied to each batch inside the jitted forward (e.g. uint8 -> float
            ``(x / 255 - mean) / std``); None = the batches are the model input.

    Returns:
        new variables with recalibrated ``batch_stats``.

    Raises:
        TypeError: the model has no ``bn_momentum``.
        ValueError: no images.
    """
    if not hasattr(model, "bn_momentum"):
        raise TypeError("recalibrate_batch_norm needs a model with a `bn_momentum` attribute")
    probe = model.clone(bn_momentum=0.0)

    @jax.jit
    def batch_stats(v, x):
        if preprocess is not None:
            x = preprocess(x)
        _, upd = probe.apply(v, x, train=True, mutable=["batch_stats"])
        return upd["batch_stats"]

    if isinstance(images, np.ndarray) or hasattr(images, "shape"):
        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[0] == 0:
            raise ValueError(f"images must be a non-empty (N, H, W, C) array, got shape {arr.shape}")
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
