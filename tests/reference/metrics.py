"""Plain-numpy oracles for tailedcore_jax.metrics, written from the definitions.

Deliberately brute force (pairwise comparisons, a threshold sweep over every distinct
score, a flood-fill labelling) so that they share no algorithm with the library.
"""

from collections import deque

import numpy as np


def auroc_pairwise(scores, labels) -> float:
    """P(score_pos > score_neg) + 0.5 P(equal), over all positive/negative pairs."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    pos, neg = s[y], s[~y]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def fpr_at_tpr_sweep(id_scores, ood_scores, tpr=0.95) -> float:
    """min FPR(t) over all thresholds t (every score, and +inf) with TPR(t) >= tpr.

    TPR(t) = mean(id >= t), FPR(t) = mean(ood >= t): ID positive, higher = more ID.
    """
    ids = np.asarray(id_scores, np.float64)
    oods = np.asarray(ood_scores, np.float64)
    best = np.inf
    for t in np.concatenate([ids, oods, [np.inf]]):
        if np.mean(ids >= t) >= tpr:
            best = min(best, float(np.mean(oods >= t)))
    return best


def label_8(mask2d) -> tuple[np.ndarray, int]:
    """Connected components of a 2-D boolean mask, 8-connectivity, by breadth-first search."""
    m = np.asarray(mask2d, bool)
    lab = np.zeros(m.shape, np.int64)
    n = 0
    for i0 in range(m.shape[0]):
        for j0 in range(m.shape[1]):
            if m[i0, j0] and lab[i0, j0] == 0:
                n += 1
                lab[i0, j0] = n
                q = deque([(i0, j0)])
                while q:
                    i, j = q.popleft()
                    for di in (-1, 0, 1):
                        for dj in (-1, 0, 1):
                            a, b = i + di, j + dj
                            if (
                                0 <= a < m.shape[0]
                                and 0 <= b < m.shape[1]
                                and m[a, b]
                                and lab[a, b] == 0
                            ):
                                lab[a, b] = n
                                q.append((a, b))
    return lab, n


def pro_curve_sweep(maps, masks):
    """(fprs, pros) at every distinct score, descending thresholds, preceded by (0, 0)."""
    maps = np.asarray(maps, np.float64)
    masks = np.asarray(masks).astype(bool)
    regions = []
    for i in range(maps.shape[0]):
        lab, n = label_8(masks[i])
        regions += [maps[i][lab == k] for k in range(1, n + 1)]
    ok_scores = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(float(np.mean(ok_scores >= t)))
        pros.append(float(np.mean([np.mean(r >= t) for r in regions])))
    return np.array(fprs), np.array(pros)


def aupro_sweep(maps, masks, fpr_limit=0.3) -> float:
    """Trapezoidal area of the PRO curve over FPR in [0, fpr_limit] / fpr_limit.

    The curve is cut at fpr_limit by linear interpolation between the last point with
    FPR <= limit and the first point with FPR > limit.
    """
    x, y = pro_curve_sweep(maps, masks)
    area = 0.0
    for k in range(1, len(x)):
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / fpr_limit
