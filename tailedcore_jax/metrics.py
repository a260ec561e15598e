"""Evaluation metrics: AUROC, AUPR (average precision), FPR@TPR, pixel AUROC, AUPRO, F1-max.

All but :func:`aupro` / :func:`pro_curve` (host functions: numpy + ``scipy.ndimage.label``,
like the MVTec AD reference code) are jit- and vmap-able, O(n log n) integer-key sorts and
binary searches, with sklearn's tie handling (one ROC/PR point per distinct score).

Degenerate input never yields a silent number (the official TailedCore code reports 0.0 from
a bare ``try/except``). Static checks (shape, rank, dtype, empty input) always raise, also at
trace time. Value checks (NaN/inf scores, labels other than 0/1, one class only, no valid
element) raise on concrete arrays; under ``jit``/``vmap`` the result is ``NaN`` instead
(``inf`` scores are then ranked normally). Scores are compared as float32 (float64 with
``jax_enable_x64``); XLA:CPU flushes denormals (``|s| < 1.2e-38``) to 0. ``mask`` (``True`` =
valid) gives the metric of the valid entries alone, so padded test sets share one compilation.
"""

import bisect
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from tailedcore_jax._validation import check_floating, check_rank, is_concrete

__all__ = [
    "aupr",
    "aupro",
    "auroc",
    "f1_max",
    "fpr_at_tpr",
    "minmax_normalize",
    "pixel_auroc",
    "pro_curve",
]


# ----------------------------------------------------------------------------- validation


def _check_labels_dtype(name, labels):
    dt = jnp.result_type(labels)
    if not (dt == jnp.bool_ or jnp.issubdtype(dt, jnp.integer) or jnp.issubdtype(dt, jnp.floating)):
        raise TypeError(f"{name} must be bool, integer or floating (0/1 values), got dtype {dt}")


def _check_pair(scores, labels, mask, *, score_name="scores", label_name="labels"):
    """Static checks plus concrete value checks for a (scores, labels[, mask]) triple."""
    check_rank(score_name, scores, 1)
    check_floating(score_name, scores)
    _check_labels_dtype(label_name, labels)
    if jnp.shape(labels) != jnp.shape(scores):
        raise ValueError(
            f"{score_name} and {label_name} must have the same shape, "
            f"got {jnp.shape(scores)} and {jnp.shape(labels)}"
        )
    n = jnp.shape(scores)[0]
    if n == 0:
        raise ValueError(f"{score_name} is empty")
    if mask is not None:
        if jnp.shape(mask) != (n,):
            raise ValueError(f"mask must have shape ({n},), got {jnp.shape(mask)}")
        if jnp.result_type(mask) != jnp.bool_:
            raise TypeError(f"mask must be boolean, got dtype {jnp.result_type(mask)}")
    if all(is_concrete(a) for a in (scores, labels) + (() if mask is None else (mask,))):
        s = np.asarray(scores)
        y = np.asarray(labels)
        m = np.ones(n, bool) if mask is None else np.asarray(mask)
        s, y = s[m], y[m]
        if s.size == 0:
            raise ValueError("mask selects no element")
        if not np.all(np.isfinite(s)):
            raise ValueError(
                f"{score_name} contains non-finite values "
                f"({int(np.isnan(s).sum())} NaN, {int(np.isinf(s).sum())} inf)"
            )
        if not np.all((y == 0) | (y == 1)):
            bad = np.unique(y[(y != 0) & (y != 1)])[:5]
            raise ValueError(f"{label_name} must be binary (0/1 or bool), found values {bad}")
        n_pos = int(np.sum(y == 1))
        if n_pos == 0 or n_pos == y.size:
            only = "negative (0)" if n_pos == 0 else "positive (1)"
            raise ValueError(
                f"{label_name} contain only {only} entries: the metric is undefined "
                "with one class only"
            )


def _prepare(scores, labels, mask):
    """-> (scores with masked entries zeroed, pos (int32), neg (int32), ok (bool scalar))."""
    scores = jnp.asarray(scores)
    labels = jnp.asarray(labels)
    valid = jnp.ones(scores.shape, bool) if mask is None else jnp.asarray(mask)
    is_pos = labels == 1
    is_neg = labels == 0
    pos = (is_pos & valid).astype(jnp.int32)
    neg = (is_neg & valid).astype(jnp.int32)
    ok = (
        jnp.all(~valid | is_pos | is_neg)
        & jnp.all(~valid | ~jnp.isnan(scores))
        & (jnp.sum(pos) > 0)
        & (jnp.sum(neg) > 0)
    )
    s = jnp.where(valid, scores, jnp.zeros((), scores.dtype))
    return s, pos, neg, ok


# ----------------------------------------------------------------------------- kernels


def _accurate_sum(x):
    """Sum of a 1-D float32 array in blocks of 1024 (error ~ (1024 + #levels) ulp, not n ulp)."""
    block = 1024
    while x.shape[0] > block:
        pad = (-x.shape[0]) % block
        x = jnp.pad(x, (0, pad)).reshape(-1, block).sum(axis=1)
    return jnp.sum(x)


def _order_key(scores):
    """Unsigned integers with the same order (and ties) as the float scores.

    Sorting one integer array is faster on XLA:CPU than sorting floats or
    several operands together, so the kernels below sort integer keys of one class at a
    time and count with ``searchsorted``. ``-0.0`` is folded onto ``+0.0`` first (equal as
    floats). NaN keys land above ``+inf`` (NaN input yields NaN anyway).
    """
    if scores.dtype == jnp.float64:
        ut, bits = jnp.uint64, 64
    else:
        scores = scores.astype(jnp.float32)  # exact for float16 / bfloat16
        ut, bits = jnp.uint32, 32
    scores = jnp.where(scores == 0, jnp.zeros((), scores.dtype), scores)
    b = jax.lax.bitcast_convert_type(scores, ut)
    sign = jnp.asarray(1 << (bits - 1), ut)
    # Negative floats: flip all bits (reverses their order); others: set the sign bit.
    return jnp.where((b & sign) != 0, ~b, b | sign)


def _class_counts(keys, member, *, strict_only=False):
    """For each key q: #members with key < q and (unless strict_only) with key <= q."""
    top = jnp.asarray(jnp.iinfo(keys.dtype).max, keys.dtype)
    n_member = jnp.sum(member.astype(jnp.int32))
    # Non-members become the largest key, after every member; counts are clamped to the
    # number of members so that they never count (also for a query equal to that key).
    srt = jnp.sort(jnp.where(member, keys, top))
    below = jnp.minimum(jnp.searchsorted(srt, keys, side="left"), n_member)
    if strict_only:
        return below, n_member
    upto = jnp.minimum(jnp.searchsorted(srt, keys, side="right"), n_member)
    return below, upto, n_member


def _auroc_kernel(scores, pos, neg):
    # Mann-Whitney U with average ranks: each positive earns the fraction of negatives
    # scored below it plus half of those tied with it. This equals the trapezoidal area of
    # the ROC curve over distinct thresholds, i.e. sklearn's roc_auc_score.
    keys = _order_key(scores)
    below, upto, n_neg = _class_counts(keys, neg > 0)
    n_pos = jnp.sum(pos).astype(jnp.float32)
    frac = (below.astype(jnp.float32) + 0.5 * (upto - below).astype(jnp.float32)) / n_neg.astype(
        jnp.float32
    )
    return _accurate_sum(jnp.where(pos > 0, frac, 0.0)) / n_pos


def _tp_fp_at_or_above(scores, pos, neg):
    """For each element: #positives and #negatives with a score >= its score."""
    keys = _order_key(scores)
    pos_below, n_pos = _class_counts(keys, pos > 0, strict_only=True)
    neg_below, n_neg = _class_counts(keys, neg > 0, strict_only=True)
    return n_pos - pos_below, n_neg - neg_below, n_pos


def _aupr_kernel(scores, pos, neg):
    # AP = sum_k (R_k - R_{k-1}) P_k over distinct thresholds = mean over positives of the
    # precision at the threshold equal to their own score (>=).
    tp, fp, n_pos = _tp_fp_at_or_above(scores, pos, neg)
    prec = tp.astype(jnp.float32) / jnp.maximum(tp + fp, 1).astype(jnp.float32)
    return _accurate_sum(jnp.where(pos > 0, prec, 0.0)) / n_pos.astype(jnp.float32)


def _f1_kernel(scores, pos, neg):
    # F1 = 2PR/(P+R) = 2 tp / (tp + fp + #positives). Thresholds at masked entries' scores
    # give the F1 of the next valid score above (or 0), so they never exceed the maximum.
    tp, fp, n_pos = _tp_fp_at_or_above(scores, pos, neg)
    f1 = 2.0 * tp.astype(jnp.float32) / (tp + fp + n_pos).astype(jnp.float32)
    return jnp.max(f1)


def _finish(value, ok):
    return jnp.where(ok, value, jnp.nan).astype(jnp.float32)


def _jitted_metric(kernel):
    # One compiled program per input shape, so eager calls do not dispatch op by op;
    # inside a user's jit/vmap this simply inlines.
    @jax.jit
    def run(scores, labels, mask):
        s, pos, neg, ok = _prepare(scores, labels, mask)
        return _finish(kernel(s, pos, neg), ok)

    return run


_auroc_jit = _jitted_metric(_auroc_kernel)
_aupr_jit = _jitted_metric(_aupr_kernel)
_f1_jit = _jitted_metric(_f1_kernel)


# ----------------------------------------------------------------------------- public


def auroc(
    scores: Float[Array, " n"],
    labels: Array,
    *,
    mask: Bool[Array, " n"] | None = None,
) -> Float[Array, ""]:
    """Area under the ROC curve, equal to ``sklearn.metrics.roc_auc_score(labels, scores)``.

    Positive class = ``labels == 1``; computed as the Mann-Whitney statistic with average
    ranks, which equals sklearn's trapezoidal area over distinct thresholds.

    Args:
        scores: ``(n,)`` floating scores.
        labels: ``(n,)`` binary labels (bool, or integer/float with values 0 and 1).
        mask: optional ``(n,)`` bool, ``True`` = valid; masked entries are ignored (their
            score and label may hold anything).

    Returns:
        Scalar float32 AUROC in ``[0, 1]``.

    Raises:
        ValueError: rank/shape mismatch or empty input; on concrete inputs also NaN/inf
            scores, non-binary labels, a single class, an all-False mask.
        TypeError: non-floating scores, unsupported label dtype, non-bool mask.

    Examples:
        >>> import jax.numpy as jnp
        >>> float(auroc(jnp.array([0.1, 0.4, 0.35, 0.8]), jnp.array([0, 0, 1, 1])))
        0.75

    References:
        Hanley & McNeil, "The meaning and use of the area under a ROC curve", Radiology 1982.
    """
    _check_pair(scores, labels, mask)
    return _auroc_jit(scores, labels, mask)


def aupr(
    scores: Float[Array, " n"],
    labels: Array,
    *,
    mask: Bool[Array, " n"] | None = None,
) -> Float[Array, ""]:
    """Area under the precision-recall curve as *average precision*.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds (positive when
    ``score >= t``), the step-wise area of ``sklearn.metrics.average_precision_score``. For
    OOD "AUPR-In"/"AUPR-Out" label the class of interest 1 and let it score higher.

    Args:
        scores: ``(n,)`` floating scores.
        labels: ``(n,)`` binary labels.
        mask: optional ``(n,)`` bool validity mask.

    Returns:
        Scalar float32 average precision in ``[0, 1]``.

    Raises:
        ValueError / TypeError: as :func:`auroc`.

    References:
        sklearn ``average_precision_score``; Zhu, "Recall, precision and average precision",
        2004.
    """
    _check_pair(scores, labels, mask)
    return _aupr_jit(scores, labels, mask)


def f1_max(
    scores: Float[Array, " n"],
    labels: Array,
    *,
    mask: Bool[Array, " n"] | None = None,
) -> Float[Array, ""]:
    """Maximum F1 score over all thresholds (anomalib ``F1Max``).

    ``max_t 2 P(t) R(t) / (P(t) + R(t))`` over the distinct thresholds (positive when
    ``score >= t``), without anomalib's ``1e-10`` in the denominator.

    Args:
        scores: ``(n,)`` floating scores.
        labels: ``(n,)`` binary labels.
        mask: optional ``(n,)`` bool validity mask.

    Returns:
        Scalar float32 F1-max in ``(0, 1]``.

    Raises:
        ValueError / TypeError: as :func:`auroc`.

    References:
        anomalib ``anomalib/metrics/f1_max.py`` (openvinotoolkit/anomalib).
    """
    _check_pair(scores, labels, mask)
    return _f1_jit(scores, labels, mask)


def _min_count_table(n_max: int, tpr: float) -> np.ndarray:
    """k[c] = smallest integer k with k / c >= tpr, for c = 0..n_max (k[0] = 0)."""
    c = np.arange(n_max + 1)
    k = np.ceil(tpr * c).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Correct float rounding of tpr * c in both directions, comparing as k / c >= tpr.
        lower = (k >= 1) & ((k - 1) / np.maximum(c, 1) >= tpr)
        k = np.where(lower, k - 1, k)
        higher = (c > 0) & (k / np.maximum(c, 1) < tpr)
        k = np.where(higher, k + 1, k)
    k[0] = 0
    return np.minimum(k, c).astype(np.int32)


def _check_id_ood_masks_and_values(id_scores, ood_scores, id_mask, ood_mask) -> None:
    """Mask shapes/dtypes (always), then finite values (concrete inputs only)."""
    n, m = jnp.shape(id_scores)[0], jnp.shape(ood_scores)[0]
    for name, mk, size in (("id_mask", id_mask, n), ("ood_mask", ood_mask, m)):
        if mk is not None:
            if jnp.shape(mk) != (size,):
                raise ValueError(f"{name} must have shape ({size},), got {jnp.shape(mk)}")
            if jnp.result_type(mk) != jnp.bool_:
                raise TypeError(f"{name} must be boolean, got dtype {jnp.result_type(mk)}")
    for name, sc, mk in (("id_scores", id_scores, id_mask), ("ood_scores", ood_scores, ood_mask)):
        if is_concrete(sc) and (mk is None or is_concrete(mk)):
            v = np.asarray(sc)
            if mk is not None:
                v = v[np.asarray(mk)]
            if v.size == 0:
                raise ValueError(f"{name}: the mask selects no element")
            if not np.all(np.isfinite(v)):
                raise ValueError(
                    f"{name} contains non-finite values "
                    f"({int(np.isnan(v).sum())} NaN, {int(np.isinf(v).sum())} inf)"
                )


def fpr_at_tpr(
    id_scores: Float[Array, " n"],
    ood_scores: Float[Array, " m"],
    tpr: float = 0.95,
    *,
    id_mask: Bool[Array, " n"] | None = None,
    ood_mask: Bool[Array, " m"] | None = None,
) -> Float[Array, ""]:
    """False-positive rate on OOD samples at a given true-positive rate on ID samples (FPR95).

    ``min { FPR(t) : TPR(t) >= tpr }`` with ``TPR(t) = #{id >= t} / n_id``, ``FPR(t) =
    #{ood >= t} / n_ood``: ID is positive and scores higher (the NAN paper's convention).
    ``t`` is the ``k``-th largest ID score, ``k`` the smallest integer with ``k / n_id >=
    tpr`` (no interpolation); scores tied with ``t`` count as detected / false positives.
    Equals ``min(fpr[tpr >= 0.95])`` of ``sklearn.metrics.roc_curve(...,
    drop_intermediate=False)`` with ID positive (not OpenOOD's OOD-positive variant, nor
    ``fpr_and_fdr_at_recall``'s nearest point).

    Args:
        id_scores: ``(n,)`` in-distribution scores.
        ood_scores: ``(m,)`` out-of-distribution scores.
        tpr: target true-positive rate in ``(0, 1]``; a Python float (static).
        id_mask: optional ``(n,)`` bool validity mask for ``id_scores``.
        ood_mask: optional ``(m,)`` bool validity mask for ``ood_scores``.

    Returns:
        Scalar float32 FPR in ``[0, 1]`` (multiply by 100 for the paper's tables).

    Raises:
        ValueError: wrong rank, empty input, ``tpr`` outside ``(0, 1]``, mask shape; on
            concrete inputs also NaN/inf scores or an all-False mask.
        TypeError: non-floating scores, non-bool masks, a traced ``tpr``.
    """
    check_rank("id_scores", id_scores, 1)
    check_rank("ood_scores", ood_scores, 1)
    check_floating("id_scores", id_scores)
    check_floating("ood_scores", ood_scores)
    if isinstance(tpr, jax.core.Tracer):
        raise TypeError("tpr must be a static Python float (bind it with functools.partial)")
    tpr = float(tpr)
    if not (0.0 < tpr <= 1.0):
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    n, m = jnp.shape(id_scores)[0], jnp.shape(ood_scores)[0]
    if n == 0 or m == 0:
        raise ValueError(f"id_scores and ood_scores must be non-empty, got sizes {n} and {m}")
    _check_id_ood_masks_and_values(id_scores, ood_scores, id_mask, ood_mask)

    return _fpr_at_tpr_jit(id_scores, ood_scores, id_mask, ood_mask, tpr=tpr)


@functools.partial(jax.jit, static_argnames=("tpr",))
def _fpr_at_tpr_jit(ids, oods, id_mask, ood_mask, *, tpr):
    n, m = ids.shape[0], oods.shape[0]
    id_valid = jnp.ones((n,), bool) if id_mask is None else jnp.asarray(id_mask)
    ood_valid = jnp.ones((m,), bool) if ood_mask is None else jnp.asarray(ood_mask)
    n_id = jnp.sum(id_valid.astype(jnp.int32))
    n_ood = jnp.sum(ood_valid.astype(jnp.int32))
    dt = jnp.promote_types(ids.dtype, oods.dtype)
    id_keys = _order_key(ids.astype(dt))
    ood_keys = _order_key(oods.astype(dt))
    # Valid ID keys ascending, masked ones (largest key) after them.
    top = jnp.asarray(jnp.iinfo(id_keys.dtype).max, id_keys.dtype)
    id_sorted = jnp.sort(jnp.where(id_valid, id_keys, top))
    k = jnp.asarray(_min_count_table(n, tpr))[n_id]
    thr = id_sorted[jnp.clip(n_id - k, 0, n - 1)]  # the k-th largest valid ID score
    fp = jnp.sum((ood_valid & (ood_keys >= thr)).astype(jnp.int32))
    fpr = fp.astype(jnp.float32) / n_ood.astype(jnp.float32)
    ok = (
        (n_id > 0)
        & (n_ood > 0)
        & jnp.all(~id_valid | ~jnp.isnan(ids))
        & jnp.all(~ood_valid | ~jnp.isnan(oods))
    )
    return _finish(fpr, ok)


def pixel_auroc(
    maps: Float[Array, "b h w"],
    masks: Array,
    *,
    mask: Bool[Array, " b"] | None = None,
) -> Float[Array, ""]:
    """Pixel-level AUROC: :func:`auroc` over all pixels of all images, flattened.

    Equals ``roc_auc_score(masks.ravel(), maps.ravel())`` of patchcore-inspection /
    TailedCore; works in a few ``B*H*W`` 32-bit arrays.

    Args:
        maps: ``(B, H, W)`` anomaly maps.
        masks: ``(B, H, W)`` binary ground-truth masks (1 = defect).
        mask: optional ``(B,)`` bool, ``True`` = valid image (padded test sets).

    Returns:
        Scalar float32 AUROC.

    Raises:
        ValueError: ranks/shapes differ (``(B, 1, H, W)`` masks must be squeezed first);
            otherwise as :func:`auroc` (e.g. no defect pixel at all).
        TypeError: as :func:`auroc`.
    """
    check_rank("maps", maps, 3)
    if jnp.shape(masks) != jnp.shape(maps):
        raise ValueError(
            f"maps and masks must have the same shape, got {jnp.shape(maps)} and {jnp.shape(masks)}"
        )
    b, h, w = jnp.shape(maps)
    flat_mask = None
    if mask is not None:
        if jnp.shape(mask) != (b,):
            raise ValueError(f"mask must have shape ({b},), got {jnp.shape(mask)}")
        if jnp.result_type(mask) != jnp.bool_:
            raise TypeError(f"mask must be boolean, got dtype {jnp.result_type(mask)}")
        flat_mask = jnp.repeat(jnp.asarray(mask), h * w, total_repeat_length=b * h * w)
    return auroc(
        jnp.reshape(maps, (-1,)),
        jnp.reshape(masks, (-1,)),
        mask=flat_mask,
    )


def _label_components(mask2d: np.ndarray) -> tuple[np.ndarray, int]:
    try:
        from scipy import ndimage
    except ImportError as e:  # pragma: no cover - scipy is a test/bench dependency
        raise ImportError("aupro needs scipy (scipy.ndimage.label); pip install scipy") from e
    # 8-connectivity, as the MVTec AD reference (structure = 3x3 ones).
    return ndimage.label(mask2d, structure=np.ones((3, 3), dtype=int))


def _check_maps_masks(maps, masks):
    maps = np.asarray(maps)
    masks = np.asarray(masks)
    if maps.ndim != 3:
        raise ValueError(f"maps must have rank 3 (B, H, W), got shape {maps.shape}")
    if masks.shape != maps.shape:
        raise ValueError(
            f"maps and masks must have the same shape, got {maps.shape} and {masks.shape}"
        )
    if maps.size == 0:
        raise ValueError("maps is empty")
    if maps.dtype.kind != "f":
        raise TypeError(f"maps must be floating point, got dtype {maps.dtype}")
    if not np.all(np.isfinite(maps)):
        raise ValueError(
            f"maps contains non-finite values ({int(np.isnan(maps).sum())} NaN, "
            f"{int(np.isinf(maps).sum())} inf)"
        )
    if masks.dtype.kind not in "biuf" or not np.all((masks == 0) | (masks == 1)):
        raise ValueError(
            "masks must be binary (0/1 or bool); threshold or rescale 0/255 masks first"
        )
    return maps, masks.astype(bool)


def _pro_weights(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-pixel weights of the PRO curve: ``(fp_w, pro_w, num_regions)``.

    ``fp_w`` is 1 on defect-free pixels, ``pro_w`` is ``1 / |region|`` on the pixels of each
    8-connected ground-truth region, so cumulative sums over pixels sorted by score give the
    false positives and the summed per-region overlaps.
    """
    fp_w = np.zeros(masks.shape, np.float64)
    pro_w = np.zeros(masks.shape, np.float64)
    num_regions = 0
    for i in range(masks.shape[0]):
        labeled, n_comp = _label_components(masks[i])
        fp_w[i] = labeled == 0
        if n_comp:
            sizes = np.bincount(labeled.ravel(), minlength=n_comp + 1).astype(np.float64)
            inv = np.where(labeled > 0, 1.0 / sizes[labeled], 0.0)
            pro_w[i] = inv
        num_regions += n_comp
    return fp_w, pro_w, num_regions


def pro_curve(
    maps: Float[Array, "b h w"],
    masks: Array,
    *,
    num_thresholds: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap (PRO) curve of the MVTec AD evaluation (host function, numpy).

    Reimplementation of ``compute_pro`` of the MVTec AD evaluation code (``generic_util.py``).
    With pixels predicted defective when ``score >= t``: ``FPR(t)`` = fraction of defect-free
    pixels predicted defective, ``PRO(t)`` = mean over ground-truth regions (8-connected
    components per image) of the fraction of the region predicted defective. The exact curve
    has one point per distinct score; ``num_thresholds`` evaluates it at evenly spaced
    thresholds instead (anomalib's binned approximation). Both start with ``(0, 0)``.

    Args:
        maps: ``(B, H, W)`` anomaly maps (numpy or JAX, concrete).
        masks: ``(B, H, W)`` binary ground-truth masks.
        num_thresholds: ``None`` (exact) or an int >= 2.

    Returns:
        ``(fprs, pros)``: float64 arrays, FPR non-decreasing from 0 to 1.

    Raises:
        ValueError: rank/shape mismatch, empty or non-finite maps, non-binary masks, no
            defect pixel or no defect-free pixel, bad ``num_thresholds``.
        TypeError: non-floating maps.
    """
    maps, masks = _check_maps_masks(maps, masks)
    if num_thresholds is not None and (
        not isinstance(num_thresholds, (int, np.integer)) or num_thresholds < 2
    ):
        raise ValueError(f"num_thresholds must be None or an int >= 2, got {num_thresholds!r}")
    fp_w, pro_w, num_regions = _pro_weights(masks)
    num_ok = fp_w.sum()
    if num_regions == 0:
        raise ValueError("masks contain no defect pixel: the PRO curve is undefined")
    if num_ok == 0:
        raise ValueError("masks contain no defect-free pixel: the FPR is undefined")

    s = maps.ravel()
    order = np.argsort(s, kind="stable")[::-1]  # descending
    s = s[order]
    fprs = np.cumsum(fp_w.ravel()[order]) / num_ok
    pros = np.cumsum(pro_w.ravel()[order]) / num_regions
    np.clip(fprs, 0.0, 1.0, out=fprs)
    np.clip(pros, 0.0, 1.0, out=pros)
    if num_thresholds is None:
        # Keep the last element of each tie group: the point for threshold t = that score.
        keep = np.append(s[1:] != s[:-1], True)
        fprs, pros = fprs[keep], pros[keep]
    else:
        thr = np.linspace(s[-1], s[0], int(num_thresholds))[::-1]  # descending
        # #pixels with score >= t in the descending array s.
        count = np.searchsorted(-s, -thr, side="right")
        # Float rounding of linspace's end points: make sure the lowest threshold takes all.
        count[-1] = s.size
        has = count > 0
        fprs = np.where(has, fprs[np.maximum(count - 1, 0)], 0.0)
        pros = np.where(has, pros[np.maximum(count - 1, 0)], 0.0)
    return np.concatenate([[0.0], fprs]), np.concatenate([[0.0], pros])


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under (x, y) for x in [0, x_max], the curve interpolated at x_max."""
    n_in = bisect.bisect_right(x.tolist(), x_max)  # x is sorted: x[:n_in] <= x_max
    xs, ys = x[:n_in], y[:n_in]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if xs[-1] < x_max and n_in < x.size:
        x0, x1, y0, y1 = x[n_in - 1], x[n_in], y[n_in - 1], y[n_in]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def aupro(
    maps: Float[Array, "b h w"],
    masks: Array,
    *,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD "AU-PRO").

    ``(1 / fpr_limit) * integral_0^fpr_limit PRO d FPR`` (trapezoidal, the curve linearly
    interpolated at ``fpr_limit``): ``calculate_au_pro`` of the MVTec AD evaluation code. A
    perfect detector scores 1.0. Host function, not jit-able.

    Args:
        maps: ``(B, H, W)`` anomaly maps (higher = more anomalous).
        masks: ``(B, H, W)`` binary ground-truth masks (defect-free images allowed).
        fpr_limit: integration limit in ``(0, 1]``; 0.3 as in MVTec AD.
        num_thresholds: ``None`` (default, exact) or the number of evenly spaced thresholds
            of an approximate curve.

    Returns:
        Python float in ``[0, 1]``.

    Raises:
        ValueError: as :func:`pro_curve`, and ``fpr_limit`` outside ``(0, 1]``.
        TypeError: non-floating maps.

    References:
        Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021
        (https://doi.org/10.1007/s11263-020-01400-4); evaluation code from
        https://www.mvtec.com/company/research/datasets/mvtec-ad.
    """
    fpr_limit = float(fpr_limit)
    if not (0.0 < fpr_limit <= 1.0) or math.isnan(fpr_limit):
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fprs, pros = pro_curve(maps, masks, num_thresholds=num_thresholds)
    return _trapezoid_to(fprs, pros, fpr_limit) / fpr_limit


def minmax_normalize(x: Array, *, eps: float = 1e-5) -> Array:
    """``(x - min) / (max - min + eps)`` over all entries of ``x`` (TailedCore's normalisation).

    JAX port of ``utils.minmax_normalize_image_scores`` / ``minmax_normalize_score_masks`` in
    jungyg/TailedCore (image scores ``(N,)`` or all maps ``(B, H, W)`` of a class).

    Args:
        x: floating array of any shape (non-empty).
        eps: added to the range; static.

    Returns:
        Array like ``x``.

    Raises:
        ValueError: empty ``x``.
        TypeError: non-floating ``x``.
    """
    check_floating("x", x)
    if jnp.size(x) == 0:
        raise ValueError("x is empty")
    x = jnp.asarray(x)
    lo, hi = jnp.min(x), jnp.max(x)
    return (x - lo) / (hi - lo + eps)
