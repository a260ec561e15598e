"""Plain-NumPy oracle for ``tailedcore_jax.tailsampler``.

A straightforward, loop-based port of the official TailSampler
(``AdaptiveTailSampler('trim_min', 'mode')`` in jungyg/TailedCore: ``_compute_th_trim_min``,
``predict_adaptive_class_sizes``, ``predict_num_samples_per_class``, ``elbow``, the
percentile rule), written with the official dtypes:

* the similarity, quantisation and thresholds in NumPy float32 (one row at a time, the
  half-angle ``np.cos(np.arccos(m) / 2)`` on a NumPy float32 scalar, as the official code);
* the mode vote with ``scipy.stats.mode(..., nan_policy='omit')`` on the NaN-ed count map;
* the grouping as a Python ``while`` loop with float32 means and round-half-to-even;
* the elbow with the official float64 slope / perpendicular-slope algebra, cast to float32
  before the argmax (NaN counts as the maximum, like ``torch.argmax``);
* the percentile rule with torch's float32 ``sum * p``.

Only where the official code raises (empty ``U`` in the threshold, an empty group list)
does this oracle follow the behaviour documented by the library (``t_i = min_j S_ij`` and
one group, respectively). ``elbow_exact`` is the library's documented elbow (exact
integer argmax, first point for collinear groups), for the cases where the official
float64 noise decides.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.stats


def cosine_similarity(embeddings):
    """``F.normalize`` (eps 1e-12) then a float32 matmul."""
    x = np.asarray(embeddings, np.float32)
    norms = np.sqrt(np.sum(x * x, axis=1, keepdims=True, dtype=np.float32))
    x = x / np.maximum(norms, np.float32(1e-12))
    return (x @ x.T).astype(np.float32)


def torch_cpu_similarity(embeddings, kc=192):
    """The official ``compute_self_sim`` as torch-CPU / MKL round it, in plain NumPy loops:
    ``|x|`` summed in 8 lanes of float32 squares (lanes added in order, then the ``D % 8``
    tail), IEEE division, then ``x @ x.T`` as float32 FMA chains (emulated exactly in
    float64) inside MKL's K-blocks of ``kc``, the block sums added in order (N >= 12)."""
    e = np.asarray(embeddings, np.float32)
    n, d = e.shape
    full = d // 8 * 8
    acc = np.zeros((n, 8), np.float32)
    for k in range(0, full, 8):
        acc = acc + e[:, k:k + 8] * e[:, k:k + 8]
    s = acc[:, 0].copy()
    for lane in range(1, 8):
        s = s + acc[:, lane]
    for k in range(full, d):
        s = s + e[:, k] * e[:, k]
    x = e / np.maximum(np.sqrt(s), np.float32(1e-12))[:, None]
    if d <= kc:
        blocks = [d]
    elif d <= 2 * kc:
        blocks = [d // 2, d // 2] + ([1] if d % 2 else [])
    else:
        blocks = [kc] * (d // kc) + ([d % kc] if d % kc else [])
    x64 = x.astype(np.float64)
    total, k0 = None, 0
    for b in blocks:
        block = np.zeros((n, n), np.float32)
        for k in range(k0, k0 + b):  # a float32 FMA: exact product, one rounding
            block = (block.astype(np.float64) + np.outer(x64[:, k], x64[:, k])).astype(np.float32)
        total = block if total is None else total + block
        k0 += b
    return total


def half_angle_boundary(n, k0):
    """First grid index ``k`` in ``-n..n`` with ``f32(k) / n > cos(arccos(f32(k0) / n) / 2)``,
    evaluated as the official code does (NumPy float32 scalars), one ``k0`` at a time;
    ``n + 1`` when no grid value exceeds the half angle."""
    grid = np.array([np.float32(j) / np.float32(n) for j in range(-n, n + 1)], np.float32)
    out = []
    for k in np.atleast_1d(k0):
        m = np.float32(k) / np.float32(n)
        with np.errstate(invalid="ignore"):
            h = np.cos(np.arccos(m) / np.float32(2))
        above = grid > h
        out.append(int(np.argmax(above)) - n if above.any() else n + 1)
    return np.array(out, np.int64)


def threshold_row(row, keep=0.85):
    """Official ``_compute_th_trim_min`` on one float32 row (+ documented empty-U rule)."""
    row = np.asarray(row, np.float32)
    n = len(row)
    q = np.sort((n * row).astype(np.int64)).astype(np.float32) / n
    m = q.min()
    with np.errstate(invalid="ignore"):
        h = np.cos(np.arccos(m) / 2)
    upper = q[q > h]
    if len(upper) == 0:
        return np.float32(row.min())  # official: IndexError; library: row minimum
    return np.float32(upper[-int(len(upper) * keep)])


def thresholds(similarity, keep=0.85):
    s = np.asarray(similarity, np.float32)
    return np.array([threshold_row(s[i], keep) for i in range(len(s))], np.float32)


def class_sizes(similarity, ths):
    """Mode vote through scipy, exactly as the official count map."""
    s = np.asarray(similarity, np.float32)
    sel = s >= np.asarray(ths, np.float32)[:, None]
    count_map = sel * sel.sum(axis=1, keepdims=True)
    naned = np.where(count_map == 0, np.nan, count_map.astype(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mode = scipy.stats.mode(naned, axis=0, nan_policy="omit").mode
    return np.asarray(mode, np.float32)


def class_sizes_loop(similarity, ths):
    """The same vote with explicit loops (no scipy): smallest among the most frequent."""
    s = np.asarray(similarity, np.float32)
    sel = s >= np.asarray(ths, np.float32)[:, None]
    counts = sel.sum(axis=1)
    out = np.full(len(s), np.nan, np.float32)
    for j in range(len(s)):
        votes = counts[sel[:, j]]
        if votes.size:
            values, freq = np.unique(votes, return_counts=True)
            out[j] = values[np.argmax(freq)]  # np.unique sorts: first max = smallest
    return out


def group(class_sizes_, warn=False):
    """Official ``predict_num_samples_per_class`` (descending int64 groups)."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = np.round(np.asarray(class_sizes_, np.float32)).astype(np.int64)
    r = np.maximum(np.sort(r), 1)  # NaN -> int64 min -> 1, like torch
    groups = []
    while len(r) > 0:
        if len(r) < r[0]:
            if groups:
                groups[-1] += len(r)
            else:  # official: IndexError; library: one group
                groups.append(len(r))
            break
        c = int(r[0])
        mean = np.float32(np.float32(r[:c].sum()) / np.float32(c))
        g = min(int(np.round(mean)), len(r))
        groups.append(g)
        r = r[g:]
    return np.sort(np.array(groups, np.int64))[::-1]


def elbow(groups):
    """Official ``elbow`` (float64 slope algebra -> float32 -> argmax, NaN first)."""
    g = np.sort(np.asarray(groups, np.int64))[::-1]
    k = len(g)
    pts = np.stack([np.arange(k, dtype=np.int64), g], axis=1)
    (x1, y1), (x2, y2) = pts[0], pts[-1]
    dx, dy = x2 - x1, y2 - y1
    if dx == 0:
        dist = np.abs(pts[:, 0] - x1).astype(np.float32)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            m = dy / dx
            c = y1 - m * x1
            m_perp = -1 / m
            dist = []
            for x, y in pts:
                c_perp = y - m_perp * x
                xi = (c_perp - c) / (m - m_perp)
                yi = m * xi + c
                dist.append(np.sqrt((xi - x) ** 2 + (yi - y) ** 2))
        dist = np.array(dist, np.float32)
    if np.isnan(dist).any():
        return int(g[np.argmax(np.isnan(dist))])
    return int(g[np.argmax(dist)])


def elbow_exact(groups):
    """Exact point-to-chord argmax (first maximum; collinear -> first point)."""
    g = np.sort(np.asarray(groups, np.int64))[::-1]
    k = len(g)
    best, best_i = -1, 0
    for i in range(k):
        num = abs((g[-1] - g[0]) * i - (k - 1) * (g[i] - g[0]))
        if num > best:
            best, best_i = num, i
    return int(g[best_i])


def collinear(groups):
    g = np.sort(np.asarray(groups, np.int64))[::-1]
    k = len(g)
    return all((g[-1] - g[0]) * i == (k - 1) * (g[i] - g[0]) for i in range(k))


def max_k_within_percentile(groups, p=0.15):
    g = np.sort(np.asarray(groups, np.int64))[::-1]
    n = int(np.float32(g.sum()) * np.float32(p))
    k = 0
    for c in np.cumsum(g[::-1]):
        if c > n:
            break
        k += 1
    idx = min(len(g) - k, len(g) - 1)
    return int(g[idx])


def few_shot_threshold(groups, p=0.15, elbow_fn=elbow):
    e = elbow_fn(groups)
    if p < 1:
        return min(e, max_k_within_percentile(groups, p))
    return e


def tail_sampler(
    embeddings=None, keep=0.85, percentile=0.15, similarity=None, elbow_fn=elbow, vote="scipy"
):
    """Every intermediate of the official pipeline, as a dict."""
    s = cosine_similarity(embeddings) if similarity is None else np.asarray(similarity, np.float32)
    t = thresholds(s, keep)
    cs = class_sizes(s, t) if vote == "scipy" else class_sizes_loop(s, t)
    g = group(cs)
    e = elbow_fn(g)
    p = max_k_within_percentile(g, percentile)
    k_star = min(e, p) if percentile < 1 else e
    with np.errstate(invalid="ignore"):
        tail = cs <= k_star
    return {
        "similarity": s,
        "thresholds": t,
        "class_sizes": cs,
        "groups": g,
        "elbow": e,
        "k_percentile": p,
        "k_star": k_star,
        "tail_mask": tail,
    }


def long_tail_mixture(rng, sizes, dim=2048, noise=0.3, nonneg=False):
    """Class centres uniform on the sphere plus isotropic noise; returns (E, labels).

    ``noise`` is the per-coordinate noise std relative to ``1/sqrt(dim)`` (so the noise
    norm is about ``noise`` times the unit centre norm).
    """
    sizes = list(sizes)
    centres = rng.standard_normal((len(sizes), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[labels] + rng.standard_normal((len(labels), dim)) * noise / np.sqrt(dim)
    if nonneg:
        x = np.abs(x)
    return x.astype(np.float32), labels


def dyadic_mixture(rng, sizes, dim=2048, ones=1024, flips=64):
    """Binary embeddings with exactly ``ones`` ones per row (norm 32 for 1024 ones).

    After normalisation every entry is 0 or 1/32, so every cosine similarity is a multiple
    of 1/1024 computed exactly in float32 whatever the summation order: the similarity
    matrix is bit-identical across NumPy/torch/XLA, and grid ties are frequent. Members of
    a class share a random support and move ``flips`` of their ones elsewhere.
    """
    rows, labels = [], []
    for c, size in enumerate(sizes):
        base = rng.choice(dim, ones, replace=False)
        for _ in range(size):
            support = set(base.tolist())
            out = rng.choice(sorted(support), flips, replace=False)
            free = np.setdiff1d(np.arange(dim), base)
            inn = rng.choice(free, flips, replace=False)
            support.difference_update(out.tolist())
            support.update(inn.tolist())
            row = np.zeros(dim, np.float32)
            row[sorted(support)] = 1.0
            rows.append(row)
            labels.append(c)
    return np.stack(rows), np.array(labels)
