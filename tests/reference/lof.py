"""Plain-NumPy oracles for tailedcore_jax.lof (written from the LOF definition and sklearn's docs).

`lof_numpy` follows scikit-learn's `LocalOutlierFactor.fit` semantics: Euclidean distances in
float64, each point's k nearest *other* points, reach_dist(a, b) = max(d(a, b), k_distance(b)),
lrd = 1 / (mean reach_dist + 1e-10), lof = mean over neighbours of lrd(b) / lrd(a).
"""

import numpy as np


def lof_numpy(x: np.ndarray, k: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    diff = x[:, None, :] - x[None, :, :]
    dist = np.sqrt(np.sum(diff * diff, axis=-1))
    np.fill_diagonal(dist, np.inf)
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
    nd = np.take_along_axis(dist, idx, axis=1)
    k_distance = nd[:, k - 1]
    reach = np.maximum(nd, k_distance[idx])
    lrd = 1.0 / (reach.mean(axis=1) + 1e-10)
    return np.mean(lrd[idx] / lrd[:, None], axis=1)


def patchwise_lof_numpy(features: np.ndarray, k: int) -> np.ndarray:
    """(N, P, d) -> (N, P): `lof_numpy` at each position (the official loop)."""
    return np.stack([lof_numpy(features[:, p], k) for p in range(features.shape[1])], axis=1)


def lof_filter_mask_numpy(scores: np.ndarray, keep: float, mask=None) -> np.ndarray:
    """Keep mask: score < numpy.quantile(valid scores, keep) ('linear'); masked never kept."""
    scores = np.asarray(scores)
    if mask is None:
        mask = np.ones(scores.shape, bool)
    thr = np.quantile(scores[mask], keep)
    return mask & (scores < thr)
