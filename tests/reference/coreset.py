"""Plain-numpy greedy k-center coreset, written from the official sampler's description.

The official loop (jungyg/TailedCore ``GreedyCoresetSampler._brute_compute_greedy_coreset_indices``):

    d = +inf
    repeat n - 1 times:
        d = min(d, ||P - P[last]||_2)
        last = argmax(d)            # first maximum on ties

computed here in float64 with the difference form ``sqrt(sum((P - c)^2))`` (the torch
``torch.norm(features - features[last], dim=1)``), independent of the library's
norm-expansion arithmetic.
"""

import numpy as np


def project(features, projection):
    """``features @ projection`` in float64 (``projection`` None: no projection)."""
    x = np.asarray(features, np.float64)
    if projection is None:
        return x
    return x @ np.asarray(projection, np.float64)


def greedy_coreset(points, num_samples, start, *, mask=None, exclude_selected=True):
    """Greedy k-center indices on already projected ``points`` (n, p).

    Args:
        points: (n, p) array (used in float64).
        num_samples: number of indices to return (start included).
        start: first index.
        mask: optional (n,) bool; False rows are never selected (min distance -inf).
        exclude_selected: True (the library's rule) sets the min distance of selected rows
            to -inf, so a row is never selected twice; False is the official loop, which
            can re-select the first zero-distance row once every valid row is covered.

    Returns:
        (num_samples,) int64 indices in selection order.
    """
    x = np.asarray(points, np.float64)
    n = x.shape[0]
    d = np.full(n, np.inf)
    if mask is not None:
        d[~np.asarray(mask, bool)] = -np.inf
    out = [int(start)]
    if exclude_selected:
        d[start] = -np.inf
    for _ in range(1, num_samples):
        last = out[-1]
        dist = np.sqrt(np.sum((x - x[last]) ** 2, axis=1))
        d = np.minimum(d, dist)
        nxt = int(np.argmax(d))  # numpy argmax: first maximum
        out.append(nxt)
        if exclude_selected:
            d[nxt] = -np.inf
    return np.asarray(out, np.int64)


def covering_radius(points, selected, *, mask=None):
    """max over valid rows of the Euclidean distance to the nearest selected row."""
    x = np.asarray(points, np.float64)
    c = x[np.asarray(selected)]
    dist = np.sqrt(((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)).min(1)
    if mask is not None:
        dist = dist[np.asarray(mask, bool)]
    return float(dist.max())


def ratio_count(num_valid_rows, ratio):
    """Official coreset size ``int(len(features) * percentage)``, at least 1 (the start)."""
    return max(1, int(num_valid_rows * ratio)) if num_valid_rows > 0 else 0
