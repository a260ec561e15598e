"""OOD evaluation of the NAN experiment: every score of the NAN paper's tables on several
sets, and their AUROC / FPR95 (ID positive).

Built on :mod:`tailedcore_jax.ood` (every score is higher for in-distribution inputs) and
:mod:`tailedcore_jax.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tailedcore_jax import ood as _ood
from tailedcore_jax.metrics import auroc, fpr_at_tpr

__all__ = ["OOD_METHODS", "LABEL_FREE_METHODS", "ood_method_scores", "ood_metrics"]

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
    react_percentile: float = 0.9,
) -> dict[str, dict[str, np.ndarray]]:
    """Every OOD score of :data:`OOD_METHODS` on several sets (higher = in-distribution).

    Built on :mod:`tailedcore_jax.ood`. The bank / statistics are fitted on the ID training
    features: KNN bank (all training features), SSD (``ssd_clusters``-means, shared
    covariance), Mahalanobis (class means, tied covariance; needs ``train_labels``) and the
    ReAct clip value (the ``react_percentile`` quantile of the training activations; OpenOOD
    uses an ID validation split). ``NAN+ReAct+KNN/SSD`` divide the unclipped distance by NAN
    of the clipped features (the paper gives no recipe; this is its most plausible reading).
    Combination scores are the lowest finite float32 for rows with no active unit
    (:func:`tailedcore_jax.ood.combine_distance_nan`).

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
        ssd_clusters: SSD clusters.
        react_percentile: ReAct clip quantile, a fraction in (0, 1] (0.9 = 90th percentile).

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
    """Replace -inf scores by a value below every finite score: the ranking, hence AUROC and
    FPR, is unchanged, and the metrics accept it."""
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
    """AUROC and FPR@``tpr`` (ID test images are the positives) of every method on every OOD set.

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
