"""Out-of-distribution scores: the negative-aware norm (NAN), its baselines and combinations.

Convention: **every score is higher for in-distribution** inputs. Distances (KNN, SSD,
Mahalanobis) are returned as distances by the ``*_distance`` functions and negated by the
``*_score`` functions. Features are ``(B, D)`` pooled last-hidden-layer activations, logits
``(B, K)``; scores are ``(B,)``. Inputs are checked for rank, a floating dtype and (when
concrete) finite values; every function also runs under ``jit`` and ``vmap``.

References:
    - NAN: J. Park, J. C. L. Chai, J. Yoon, A. B. J. Teoh, "Understanding the Feature Norm for
      Out-of-Distribution Detection", ICCV 2023 (arXiv 2310.05316), Eq. 9-10 (NAN), Eq. 7
      (activation entropy), Sec. 6.2 (combinations). No official code exists.
    - Energy: Liu et al., NeurIPS 2020. MSP: Hendrycks & Gimpel, ICLR 2017. MaxLogit:
      Hendrycks et al., ICML 2022. ReAct: Sun et al., NeurIPS 2021. KNN: Sun et al., ICML
      2022. SSD: Sehwag et al., ICLR 2021. Mahalanobis: Lee et al., NeurIPS 2018.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tailedcore_jax import _validation as V
from tailedcore_jax.knn import nearest_neighbors

__all__ = [
    "negative_aware_norm",
    "feature_norm",
    "positive_count",
    "global_avg_pool",
    "msp",
    "energy",
    "max_logit",
    "kl_uniform",
    "react_threshold",
    "react_clip",
    "knn_ood_distance",
    "knn_ood_score",
    "SSDModel",
    "ssd_fit",
    "ssd_distance",
    "ssd_score",
    "MahalanobisModel",
    "mahalanobis_fit",
    "mahalanobis_score",
    "combine_distance_nan",
    "nan_knn_score",
    "nan_ssd_score",
    "nan_react_score",
    "nan_react_knn_score",
    "nan_react_ssd_score",
    "activation_entropy",
]

_HI = jax.lax.Precision.HIGHEST


def _features_2d(name: str, x) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be (B, D) pooled features, got shape {x.shape}; pool 4-D maps "
            "with global_avg_pool first (NAN is defined on the pooled last hidden layer)"
        )
    V.check_floating(name, x)
    V.check_finite(name, x)
    return x


def _logits(x) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[-1] < 1:
        raise ValueError(f"logits must have shape (B, K) with K >= 1, got {x.shape}")
    V.check_floating("logits", x)
    V.check_finite("logits", x)
    return x


def positive_count(features) -> jax.Array:
    """``#(a > 0)`` per row, ``(B, D) -> (B,)`` int (Eq. 9: strictly positive units)."""
    return jnp.sum(_features_2d("features", features) > 0, axis=-1)


def negative_aware_norm(features, *, eps: float | None = None) -> jax.Array:
    """NAN ``||a||_1 / #(a > 0)`` of pooled last-hidden-layer activations (Park et al., Eq. 10).

    Args:
        features: ``(B, D)`` post-activation pooled features ``a^(L)`` (float32 recommended:
            the positive count is sensitive to tiny values).
        eps: None: a row with no positive unit scores 0. A float: ``l1 / (count + eps)``.

    Returns:
        ``(B,)`` float32, higher = more in-distribution.

    Raises:
        ValueError: features not 2-D, or (concrete input) NaN/inf.
    """
    a = _features_2d("features", features).astype(jnp.float32)
    l1 = jnp.sum(jnp.abs(a), axis=-1)
    count = jnp.sum(a > 0, axis=-1).astype(jnp.float32)
    if eps is not None:
        return l1 / (count + eps)
    return jnp.where(count > 0, l1 / jnp.maximum(count, 1.0), 0.0)


def feature_norm(features, *, ord: int | float = 1) -> jax.Array:
    """Feature-norm baseline ``||a||_ord``, ``(B, D) -> (B,)`` (ord=1: NAN without its count)."""
    a = _features_2d("features", features).astype(jnp.float32)
    return jnp.linalg.norm(a, ord=ord, axis=-1)


def global_avg_pool(feature_map) -> jax.Array:
    """``(B, H, W, C) -> (B, C)`` mean over space (apply before NAN for CNNs)."""
    fm = jnp.asarray(feature_map)
    if fm.ndim != 4:
        raise ValueError(f"feature_map must be (B, H, W, C), got {fm.shape}")
    return jnp.mean(fm, axis=(1, 2))


def msp(logits) -> jax.Array:
    """MSP ``max_k softmax(z)_k``, ``(B, K) -> (B,)`` (Hendrycks & Gimpel, ICLR 2017)."""
    return jnp.max(jax.nn.softmax(_logits(logits), axis=-1), axis=-1)


def energy(logits, *, temperature: float = 1.0) -> jax.Array:
    """Negative free energy ``T * logsumexp(z / T)``, ``(B, K) -> (B,)`` (Liu et al., NeurIPS
    2020). Raises ValueError unless ``temperature > 0``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _logits(logits)
    return temperature * jax.nn.logsumexp(z / temperature, axis=-1)


def max_logit(logits) -> jax.Array:
    """MaxLogit ``max_k z_k``, ``(B, K) -> (B,)`` (Hendrycks et al., ICML 2022)."""
    return jnp.max(_logits(logits), axis=-1)


def kl_uniform(logits) -> jax.Array:
    """``KL(uniform || softmax(z)) = logsumexp(z) - mean(z) - log K``, ``(B, K) -> (B,)``."""
    z = _logits(logits)
    return jax.nn.logsumexp(z, axis=-1) - jnp.mean(z, axis=-1) - math.log(z.shape[-1])


def react_threshold(id_features, *, percentile: float = 0.9) -> jax.Array:
    """ReAct clip value ``c``: the ``percentile`` quantile of all ID activations (Sun et al.,
    NeurIPS 2021), linear interpolation.

    Args:
        id_features: ``(N, D)`` ID (training or validation) features.
        percentile: a fraction in ``(0, 1]``: 0.9 is the 90th percentile.

    Returns:
        scalar ``c``.

    Raises:
        ValueError: empty or non-2-D features, ``percentile`` outside ``(0, 1]``.
    """
    a = _features_2d("id_features", id_features)
    if a.size == 0:
        raise ValueError("id_features is empty")
    if not 0.0 < percentile <= 1.0:
        raise ValueError(
            f"percentile is a fraction in (0, 1] (0.9 = the 90th percentile), got {percentile}")
    # jnp.percentile of the percent, not jnp.quantile: the two can differ in the last float32
    # digit, and this keeps the value of the earlier percent-valued argument (90.0) exactly
    return jnp.percentile(a.reshape(-1), 100.0 * percentile)


def react_clip(features, threshold) -> jax.Array:
    """ReAct rectification ``min(a, c)``, ``(B, D) -> (B, D)``."""
    return jnp.minimum(_features_2d("features", features), threshold)


def _l2_normalise(x: jax.Array) -> jax.Array:
    # OpenOOD's normaliser adds 1e-10 after dividing; a guarded divide gives the same
    # result for non-zero rows and 0 (not NaN) for all-zero rows.
    n = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(n, 1e-12)


def knn_ood_distance(queries, bank, *, k: int = 50, bank_mask=None, **chunks) -> jax.Array:
    """KNN distance ``||q/|q| - b_(k)/|b_(k)|||_2`` to the ``k``-th nearest L2-normalised bank
    row (Sun et al., ICML 2022).

    Args:
        queries: ``(B, D)`` test features. bank: ``(N, D)`` ID training features.
        k: neighbour rank (OpenOOD default 50). bank_mask: ``(N,)`` valid bank rows.
        **chunks: ``query_chunk`` / ``bank_chunk`` for :func:`nearest_neighbors`.

    Returns:
        ``(B,)`` distances (higher = more OOD); see :func:`knn_ood_score`.
    """
    q = _l2_normalise(_features_2d("queries", queries))
    b = _l2_normalise(_features_2d("bank", bank))
    sqd, _ = nearest_neighbors(q, b, k=k, bank_mask=bank_mask, **chunks)
    return jnp.sqrt(jnp.maximum(sqd[:, k - 1], 0.0))


def knn_ood_score(queries, bank, *, k: int = 50, bank_mask=None, **chunks) -> jax.Array:
    """``-knn_ood_distance`` (higher = ID)."""
    return -knn_ood_distance(queries, bank, k=k, bank_mask=bank_mask, **chunks)


class SSDModel(NamedTuple):
    """SSD statistics: k-means centres ``(M, D)`` and the shared precision ``(D, D)``."""

    centers: jax.Array
    precision: jax.Array


def _kmeans(key, x: jax.Array, num_clusters: int, iters: int) -> tuple[jax.Array, jax.Array]:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007); (centres, labels)."""
    n = x.shape[0]
    key0, key_rest = jax.random.split(key)
    first = jax.random.randint(key0, (), 0, n)
    centers0 = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(x[first])
    d2 = jnp.sum((x - x[first][None, :]) ** 2, axis=-1)

    def seed(i, carry):
        c, d2 = carry
        # Sample the next centre with probability proportional to the squared distance.
        logits = jnp.where(d2 > 0, jnp.log(jnp.where(d2 > 0, d2, 1.0)), -jnp.inf)
        logits = jnp.where(jnp.all(d2 <= 0), 0.0, logits)  # all points covered: uniform
        j = jax.random.categorical(jax.random.fold_in(key_rest, i), logits)
        c = c.at[i].set(x[j])
        return c, jnp.minimum(d2, jnp.sum((x - x[j][None, :]) ** 2, axis=-1))

    centers0, _ = jax.lax.fori_loop(1, num_clusters, seed, (centers0, d2))

    def assign(c):
        d = (jnp.sum(x * x, -1)[:, None] - 2 * jnp.dot(x, c.T, precision=_HI)
             + jnp.sum(c * c, -1)[None, :])
        return jnp.argmin(d, axis=-1)

    def step(_, c):
        lab = assign(c)
        onehot = jax.nn.one_hot(lab, num_clusters, dtype=x.dtype)
        counts = onehot.sum(0)
        sums = jnp.dot(onehot.T, x, precision=_HI)
        # An emptied cluster keeps its previous centre.
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], c)

    centers = jax.lax.fori_loop(0, iters, step, centers0)
    return centers, assign(centers)


def ssd_fit(key, features, *, num_clusters: int = 1, iters: int = 50, normalise: bool = True,
            ridge: float = 1e-6) -> SSDModel:
    """Fit SSD (Sehwag et al., ICLR 2021): k-means centres ``mu_m`` of the L2-normalised ID
    features and the precision of one shared covariance
    ``Sigma = mean_i (x_i - mu_m(i)) (x_i - mu_m(i))^T + ridge * tr(Sigma) / D * I``.

    Args:
        key: PRNG key for the k-means++ initialisation.
        features: ``(N, D)`` ID training features, ``N >= max(num_clusters, 2)``.
        num_clusters: clusters (1 = a single Gaussian). iters: Lloyd iterations.
        normalise: L2-normalise the features first.
        ridge: relative diagonal loading before the (pseudo-)inversion.

    Returns:
        :class:`SSDModel` with ``centers (M, D)`` and ``precision (D, D)``.

    Raises:
        ValueError: too few features, features not 2-D or not finite.
    """
    x = _features_2d("features", features).astype(jnp.float32)
    if x.shape[0] < max(num_clusters, 2):
        raise ValueError(
            f"ssd_fit needs at least max(num_clusters, 2) = {max(num_clusters, 2)} features, "
            f"got {x.shape[0]}"
        )
    if normalise:
        x = _l2_normalise(x)
    centers, labels = _kmeans(key, x, num_clusters, iters)
    centred = x - centers[labels]
    cov = jnp.dot(centred.T, centred, precision=_HI) / x.shape[0]
    cov = cov + ridge * jnp.maximum(jnp.trace(cov) / cov.shape[0], 1e-12) * jnp.eye(cov.shape[0])
    return SSDModel(centers, jnp.linalg.pinv(cov, hermitian=True))


def _min_mahalanobis(x, centers, precision):
    diff = x[:, None, :] - centers[None, :, :]
    m = jnp.einsum("bmd,de,bme->bm", diff, precision, diff, precision=_HI)
    return jnp.min(m, axis=-1)


def ssd_distance(model: SSDModel, queries, *, normalise: bool = True) -> jax.Array:
    """``min_m (q - mu_m)^T Sigma^-1 (q - mu_m)``, ``(B, D) -> (B,)``: squared Mahalanobis
    distance to the nearest SSD centre (higher = OOD). Raises ValueError on a dimension
    mismatch."""
    q = _features_2d("queries", queries).astype(jnp.float32)
    if q.shape[-1] != model.centers.shape[-1]:
        raise ValueError(f"queries have dimension {q.shape[-1]}, model {model.centers.shape[-1]}")
    if normalise:
        q = _l2_normalise(q)
    return _min_mahalanobis(q, model.centers, model.precision)


def ssd_score(model: SSDModel, queries, *, normalise: bool = True) -> jax.Array:
    """``-ssd_distance`` (higher = ID)."""
    return -ssd_distance(model, queries, normalise=normalise)


class MahalanobisModel(NamedTuple):
    """Class means ``(K, D)`` and the shared (tied) precision ``(D, D)``."""

    means: jax.Array
    precision: jax.Array


def mahalanobis_fit(features, labels, *, num_classes: int, ridge: float = 1e-6) -> MahalanobisModel:
    """Supervised Mahalanobis baseline (Lee et al., NeurIPS 2018): class means ``mu_k`` and
    the precision of the tied covariance of ``x_i - mu_(y_i)`` (diagonal loading ``ridge``).

    Args:
        features: ``(N, D)`` ID training features. labels: ``(N,)`` ints in
            ``[0, num_classes)``.

    Returns:
        :class:`MahalanobisModel` with ``means (K, D)`` and ``precision (D, D)``.

    Raises:
        ValueError: a class has no sample (concrete labels), shapes disagree.
    """
    x = _features_2d("features", features).astype(jnp.float32)
    labels = jnp.asarray(labels)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")
    if V.is_concrete(labels):
        present = np.unique(np.asarray(labels))
        missing = sorted(set(range(num_classes)) - set(present.tolist()))
        if missing or present.min() < 0 or present.max() >= num_classes:
            raise ValueError(
                f"labels must cover classes 0..{num_classes - 1}; missing {missing}, "
                f"range [{present.min()}, {present.max()}]"
            )
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    means = jnp.dot(onehot.T, x, precision=_HI) / jnp.maximum(onehot.sum(0), 1)[:, None]
    centred = x - means[labels]
    cov = jnp.dot(centred.T, centred, precision=_HI) / x.shape[0]
    cov = cov + ridge * jnp.maximum(jnp.trace(cov) / cov.shape[0], 1e-12) * jnp.eye(cov.shape[0])
    return MahalanobisModel(means, jnp.linalg.pinv(cov, hermitian=True))


def mahalanobis_score(model: MahalanobisModel, queries) -> jax.Array:
    """``-min_k (q - mu_k)^T Sigma^-1 (q - mu_k)``, ``(B, D) -> (B,)`` (higher = ID)."""
    q = _features_2d("queries", queries).astype(jnp.float32)
    return -_min_mahalanobis(q, model.means, model.precision)


def combine_distance_nan(distance, nan) -> jax.Array:
    """``S = -d / NAN`` (Park et al., Sec. 6.2), ``(B,), (B,) -> (B,)`` float32, higher = ID.

    A row whose NAN is 0 (no active unit) gets ``-finfo(float32).max``: the most OOD score
    that still ranks (the metrics reject infinities). Raises ValueError if shapes differ.
    """
    distance = jnp.asarray(distance)
    nan = jnp.asarray(nan)
    if distance.shape != nan.shape:
        raise ValueError(f"distance {distance.shape} and nan {nan.shape} shapes differ")
    lowest = -jnp.finfo(jnp.float32).max
    return jnp.where(nan > 0, -distance / jnp.where(nan > 0, nan, 1.0), lowest).astype(jnp.float32)


def nan_knn_score(queries, bank, *, k: int = 50, bank_mask=None, **chunks) -> jax.Array:
    """NAN+KNN: ``-d_k(x) / NAN(x)``."""
    d = knn_ood_distance(queries, bank, k=k, bank_mask=bank_mask, **chunks)
    return combine_distance_nan(d, negative_aware_norm(queries))


def nan_ssd_score(model: SSDModel, queries) -> jax.Array:
    """NAN+SSD: ``-d_SSD(x) / NAN(x)``."""
    return combine_distance_nan(ssd_distance(model, queries), negative_aware_norm(queries))


def nan_react_score(features, threshold) -> jax.Array:
    """NAN+ReAct: ``NAN(min(a, c))``, the NAN of the ReAct-rectified features, ``(B,)``.

    The paper gives no exact recipe for this combination; this is its most plausible reading.
    """
    return negative_aware_norm(react_clip(features, threshold))


def nan_react_knn_score(queries, bank, threshold, *, k: int = 50, clip_distance: bool = False,
                        bank_mask=None, **chunks) -> jax.Array:
    """NAN+ReAct+KNN: ``-d_k / NAN(min(a, c))``; ``clip_distance`` also clips both features for d."""
    q = react_clip(queries, threshold) if clip_distance else queries
    b = react_clip(bank, threshold) if clip_distance else bank
    d = knn_ood_distance(q, b, k=k, bank_mask=bank_mask, **chunks)
    return combine_distance_nan(d, nan_react_score(queries, threshold))


def nan_react_ssd_score(model: SSDModel, queries, threshold) -> jax.Array:
    """NAN+ReAct+SSD: ``-d_SSD / NAN(min(a, c))``."""
    return combine_distance_nan(ssd_distance(model, queries), nan_react_score(queries, threshold))


def activation_entropy(features) -> jax.Array:
    """Binary activation entropy per unit (Park et al., Eq. 7), natural log: ``(N, D) -> (D,)``,
    ``H(p_j) = -p_j log p_j - (1 - p_j) log(1 - p_j)`` with ``p_j`` the fraction of rows where
    unit ``j`` is positive."""
    a = _features_2d("features", features)
    p = jnp.mean(a > 0, axis=0)

    def h(q):
        return jnp.where(q > 0, -q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0)

    return h(p) + h(1.0 - p)
