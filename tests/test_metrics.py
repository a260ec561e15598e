"""Tests for tailedcore_jax.metrics against sklearn and brute-force numpy oracles."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from tailedcore_jax import metrics as M
from tests.reference import metrics as R


def _tied_data(rng, n, levels, p_pos=0.4):
    """Scores on a few quantised levels (heavy ties), labels with both classes."""
    s = rng.integers(0, levels, size=n).astype(np.float32) / levels
    y = (rng.random(n) < p_pos).astype(np.int32)
    y[0], y[1] = 0, 1
    return s, y


def _f1max_sklearn(y, s):
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return float(f.max())


# ------------------------------------------------------------------ auroc / aupr / f1


@pytest.mark.parametrize("n,levels", [(7, 3), (60, 4), (500, 10), (3000, 1000), (257, 10**6)])
def test_against_sklearn_under_jit(rng, n, levels):
    for _ in range(3):
        s, y = _tied_data(rng, n, levels)
        np.testing.assert_allclose(
            jax.jit(M.auroc)(s, y), roc_auc_score(y, s), rtol=2e-6, atol=1e-7
        )
        np.testing.assert_allclose(
            jax.jit(M.aupr)(s, y), average_precision_score(y, s), rtol=2e-6, atol=1e-7
        )
        np.testing.assert_allclose(jax.jit(M.f1_max)(s, y), _f1max_sklearn(y, s), rtol=2e-6)


def test_negative_scores_and_signed_zero(rng):
    # the integer order key must order negative floats and fold -0.0 onto +0.0
    s = (rng.integers(-6, 7, size=400) / 4).astype(np.float32)
    s[s == 0] = np.where(rng.random(int((s == 0).sum())) < 0.5, -0.0, 0.0)
    assert np.signbit(s[s == 0]).any() and (~np.signbit(s[s == 0])).any()
    s[:3] = [-1e30, 1e30, -1e-30]
    y = (rng.random(400) < 0.5).astype(np.int32)
    np.testing.assert_allclose(jax.jit(M.auroc)(s, y), roc_auc_score(y, s), rtol=2e-6)
    np.testing.assert_allclose(jax.jit(M.aupr)(s, y), average_precision_score(y, s), rtol=2e-6)
    np.testing.assert_allclose(jax.jit(M.f1_max)(s, y), _f1max_sklearn(y, s), rtol=2e-6)
    for fn in (M.auroc, M.aupr, M.f1_max):  # bfloat16 / float16 scores are accepted too
        h = s[3:].astype(np.float16)  # (1e30 would overflow float16)
        np.testing.assert_allclose(fn(jnp.asarray(h), y[3:]), fn(h.astype(np.float32), y[3:]))


def test_auroc_pairwise_oracle_and_label_dtypes(rng):
    s, y = _tied_data(rng, 300, 7)
    ref = R.auroc_pairwise(s, y)
    for labels in (y, y.astype(bool), y.astype(np.float32)):
        np.testing.assert_allclose(jax.jit(M.auroc)(s, labels), ref, rtol=2e-6)


def test_hand_cases():
    # sklearn docs example
    assert float(M.auroc(jnp.array([0.1, 0.4, 0.35, 0.8]), jnp.array([0, 0, 1, 1]))) == 0.75
    np.testing.assert_allclose(
        M.aupr(jnp.array([0.1, 0.4, 0.35, 0.8]), jnp.array([0, 0, 1, 1])), 0.8333333, rtol=1e-6
    )
    # all scores tied -> AUROC 0.5, AP = prevalence, F1 = 2p/(1+p)
    s = jnp.zeros(4)
    y = jnp.array([1, 0, 0, 0])
    assert float(M.auroc(s, y)) == 0.5
    assert float(M.aupr(s, y)) == 0.25
    np.testing.assert_allclose(M.f1_max(s, y), 0.4, rtol=1e-6)
    # perfect / inverted ranking
    assert float(M.auroc(jnp.array([0.0, 1.0]), jnp.array([0, 1]))) == 1.0
    assert float(M.auroc(jnp.array([1.0, 0.0]), jnp.array([0, 1]))) == 0.0
    assert float(M.f1_max(jnp.array([0.0, 1.0, 2.0]), jnp.array([0, 1, 1]))) == 1.0


def test_vmap_over_classes_with_padding(rng):
    chex.clear_trace_counter()
    n_max = 80
    sizes = [80, 33, 57]
    s = np.zeros((3, n_max), np.float32)
    y = np.zeros((3, n_max), np.int32)
    mask = np.zeros((3, n_max), bool)
    for c, n in enumerate(sizes):
        sc, yc = _tied_data(rng, n, 5)
        s[c, :n], y[c, :n], mask[c, :n] = sc, yc, True
        s[c, n:] = np.nan  # garbage in padded slots must not matter
        y[c, n:] = 7

    for fn, ref in (
        (M.auroc, lambda yy, ss: roc_auc_score(yy, ss)),
        (M.aupr, average_precision_score),
        (M.f1_max, _f1max_sklearn),
    ):

        @jax.jit
        @chex.assert_max_traces(n=1)
        def batched(s, y, m, fn=fn):
            return jax.vmap(lambda a, b, v: fn(a, b, mask=v))(s, y, m)

        out = batched(s, y, mask)
        out2 = batched(s[::-1].copy(), y[::-1].copy(), mask[::-1].copy())  # no retrace
        chex.clear_trace_counter()  # the next fn reuses this code object
        for c, n in enumerate(sizes):
            r = ref(y[c, :n], s[c, :n])
            np.testing.assert_allclose(out[c], r, rtol=2e-6)
            np.testing.assert_allclose(out2[2 - c], r, rtol=2e-6)


def test_mask_equals_valid_rows(rng):
    s, y = _tied_data(rng, 100, 6)
    m = rng.random(100) < 0.6
    m[:2] = True
    for fn in (M.auroc, M.aupr, M.f1_max):
        np.testing.assert_allclose(
            jax.jit(fn)(s, y, mask=jnp.asarray(m)), fn(s[m], y[m]), rtol=1e-6
        )


def test_large_input_accuracy(rng):
    # 6e5 elements (two levels of blocks): blocked float32 summation keeps the error far below 1e-5.
    n = 600_000
    s = rng.integers(0, 5000, size=n).astype(np.float32)
    y = (rng.random(n) < 0.3 + 0.1 * (s > 2500)).astype(np.int8)
    np.testing.assert_allclose(jax.jit(M.auroc)(s, y), roc_auc_score(y, s), rtol=1e-6)


# ------------------------------------------------------------------ fpr_at_tpr


def test_fpr_at_tpr_hand_cases():
    ids = jnp.arange(1.0, 21.0)  # n = 20 -> 19 of 20 needed (0.95 * 20 is exactly 19)
    # threshold = 2; OOD scores equal to the threshold count as false positives
    assert float(M.fpr_at_tpr(ids, jnp.array([2.0, 2.0, 1.5, 3.0, 0.0]))) == pytest.approx(
        0.6, abs=1e-7
    )
    # n = 10: 9.5 -> all 10 ID needed, threshold = the minimum ID score
    ids = jnp.array([1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    assert float(M.fpr_at_tpr(ids, jnp.array([1.0, 0.5]))) == pytest.approx(0.5, abs=1e-7)
    assert float(M.fpr_at_tpr(ids, jnp.array([0.9, 0.5]))) == pytest.approx(0.0, abs=1e-7)
    # tpr = 0.7: 7 of 10 needed; t = 5 (the tie block) gives TPR exactly 0.7
    assert float(M.fpr_at_tpr(ids, jnp.array([5.0, 4.9]), 0.7)) == pytest.approx(0.5, abs=1e-7)
    # tpr = 0.75: needs 8 -> t = 1 (ties in ID make TPR jump to 1.0)
    assert float(M.fpr_at_tpr(ids, jnp.array([5.0, 4.9, 1.0, 0.0]), 0.75)) == pytest.approx(
        0.75, abs=1e-7
    )
    # tpr = 1.0
    assert float(M.fpr_at_tpr(ids, jnp.array([1.0, 0.99]), 1.0)) == pytest.approx(0.5, abs=1e-7)
    # perfect separation
    assert float(M.fpr_at_tpr(jnp.array([3.0, 4.0]), jnp.array([1.0, 2.0]))) == pytest.approx(
        0.0, abs=1e-7
    )


@pytest.mark.parametrize("tpr", [0.95, 0.9, 0.5, 1.0, 0.3])
def test_fpr_at_tpr_against_sweep_and_roc_curve(rng, tpr):
    f = jax.jit(functools.partial(M.fpr_at_tpr, tpr=tpr))
    for n_id, n_ood in [(20, 7), (100, 100), (37, 251), (1, 3)]:
        ids = rng.integers(0, 8, n_id).astype(np.float32)
        oods = rng.integers(0, 8, n_ood).astype(np.float32) - 2
        ref = R.fpr_at_tpr_sweep(ids, oods, tpr)
        np.testing.assert_allclose(f(ids, oods), ref, rtol=1e-6)
        y = np.r_[np.ones(n_id), np.zeros(n_ood)]
        fpr, tp, _ = roc_curve(y, np.r_[ids, oods], drop_intermediate=False)
        np.testing.assert_allclose(f(ids, oods), fpr[tp >= tpr].min(), rtol=1e-6)


def test_fpr_at_tpr_masked_batched(rng):  # (no 'vmap.' in the name: chex pattern-matches it)
    n_max, m_max = 40, 30
    ids = rng.normal(size=(3, n_max)).astype(np.float32).round(1)
    oods = (rng.normal(size=(3, m_max)) - 1).astype(np.float32).round(1)
    n_valid, m_valid = [40, 20, 13], [30, 9, 21]
    im = np.arange(n_max)[None] < np.array(n_valid)[:, None]
    om = np.arange(m_max)[None] < np.array(m_valid)[:, None]
    ids[~im] = 100.0  # padded garbage
    oods[~om] = 100.0

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(a, b, c, d):
        return jax.vmap(lambda a, b, c, d: M.fpr_at_tpr(a, b, id_mask=c, ood_mask=d))(a, b, c, d)

    out = f(ids, oods, im, om)
    for c in range(3):
        ref = R.fpr_at_tpr_sweep(ids[c, : n_valid[c]], oods[c, : m_valid[c]], 0.95)
        np.testing.assert_allclose(out[c], ref, rtol=1e-6)
    f(ids[::-1].copy(), oods, im[::-1].copy(), om)


def test_min_count_table_is_exact():
    for tpr in (0.95, 0.9, 0.7, 0.3, 1.0, 0.1):
        k = M._min_count_table(500, tpr)
        for c in range(1, 501):
            # smallest k with k / c >= tpr (float division, as TPR is computed)
            assert k[c] / c >= tpr and (k[c] == 0 or (k[c] - 1) / c < tpr)


# ------------------------------------------------------------------ pixel AUROC


def test_pixel_auroc(rng):
    maps = rng.integers(0, 20, size=(4, 9, 7)).astype(np.float32)
    masks = (rng.random((4, 9, 7)) < 0.2).astype(np.uint8)
    masks[0, 0, 0] = 1
    ref = roc_auc_score(masks.ravel(), maps.ravel())
    np.testing.assert_allclose(jax.jit(M.pixel_auroc)(maps, masks), ref, rtol=2e-6)
    np.testing.assert_allclose(M.pixel_auroc(maps, masks.astype(bool)), ref, rtol=2e-6)
    img_mask = np.array([True, False, True, True])
    np.testing.assert_allclose(
        jax.jit(M.pixel_auroc)(maps, masks, mask=jnp.asarray(img_mask)),
        roc_auc_score(masks[img_mask].ravel(), maps[img_mask].ravel()),
        rtol=2e-6,
    )


# ------------------------------------------------------------------ AUPRO


def test_aupro_hand_region_never_reached():
    # two single-pixel regions; one is scored below every defect-free pixel
    maps = np.array([[[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.1]]], np.float32)
    masks = np.array([[[1, 0, 0, 0], [0, 0, 0, 1]]], np.uint8)
    assert M.aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    assert R.aupro_sweep(maps, masks) == pytest.approx(0.5, abs=1e-12)
    # add a defect-free image with one high false positive: FPR jumps to 1/14 with PRO 0
    ok_img = np.full((1, 2, 4), 0.05, np.float32)
    ok_img[0, 0, 0] = 0.95
    maps2 = np.concatenate([maps, ok_img])
    masks2 = np.concatenate([masks, np.zeros((1, 2, 4), np.uint8)])
    assert M.aupro(maps2, masks2) == pytest.approx(8 / 21, abs=1e-12)
    assert R.aupro_sweep(maps2, masks2) == pytest.approx(8 / 21, abs=1e-12)
    # up to FPR 1 the missed region comes back at the very end: 0.5 * 1 (+ nothing)
    assert M.aupro(maps2, masks2, fpr_limit=1.0) == pytest.approx(
        R.aupro_sweep(maps2, masks2, 1.0), abs=1e-12
    )


def test_aupro_hand_eight_connectivity():
    # (0,0) and (1,1) touch diagonally: one region of 2 pixels (8-connectivity), plus a
    # one-pixel region that is never reached. PRO = mean(1/2, 0) = 0.25 (4-conn: 1/3).
    masks = np.array([[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]], bool)
    maps = np.array(
        [[[0.9, 0.8, 0.7, 0.6], [0.5, 0.1, 0.4, 0.3], [0.2, 0.15, 0.25, 0.05]]], np.float32
    )
    assert M.aupro(maps, masks) == pytest.approx(0.25, abs=1e-12)
    fprs, pros = M.pro_curve(maps, masks)
    assert fprs[0] == 0 and pros[0] == 0 and fprs[-1] == 1 and pros[-1] == 1
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(pros) >= 0)


def test_aupro_perfect_and_worst():
    masks = np.zeros((2, 6, 6), np.uint8)
    masks[0, 1:3, 1:4] = 1
    masks[1, 4:, 4:] = 1
    assert M.aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
    assert M.aupro(-masks.astype(np.float32), masks) == pytest.approx(0.0)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0, 0.5])
def test_aupro_against_sweep_oracle(rng, fpr_limit):
    for _ in range(3):
        maps = rng.integers(0, 12, size=(4, 8, 9)).astype(np.float32)
        masks = np.zeros((4, 8, 9), np.uint8)
        for b in range(3):  # image 3 has no defect
            for _ in range(rng.integers(1, 4)):
                i, j = rng.integers(0, 7), rng.integers(0, 8)
                masks[b, i : i + rng.integers(1, 3), j : j + rng.integers(1, 4)] = 1
        maps += 3 * masks  # some signal
        got = M.aupro(maps, masks, fpr_limit=fpr_limit)
        assert got == pytest.approx(R.aupro_sweep(maps, masks, fpr_limit), abs=1e-10)
        fx, px = M.pro_curve(maps, masks)
        fr, pr = R.pro_curve_sweep(maps, masks)
        np.testing.assert_allclose(fx, fr, atol=1e-12)
        np.testing.assert_allclose(px, pr, atol=1e-12)


def test_aupro_num_thresholds(rng):
    maps = rng.integers(0, 10, size=(3, 8, 8)).astype(np.float32)
    masks = (rng.random((3, 8, 8)) < 0.2).astype(np.uint8)
    maps += 2 * masks
    exact = M.aupro(maps, masks)
    # evenly spaced levels: a grid over [min, max] with step 1 hits every distinct score
    n_levels = int(maps.max() - maps.min()) + 1
    assert M.aupro(maps, masks, num_thresholds=n_levels) == pytest.approx(exact, abs=1e-12)
    coarse = M.aupro(maps, masks, num_thresholds=3)
    assert 0.0 <= coarse <= 1.0 and coarse != pytest.approx(exact, abs=1e-6)


def test_aupro_accepts_jax_arrays(rng):
    maps = rng.random((2, 5, 5)).astype(np.float32)
    masks = np.zeros((2, 5, 5), bool)
    masks[0, 1:3, 1:3] = True
    assert M.aupro(jnp.asarray(maps), jnp.asarray(masks)) == pytest.approx(
        R.aupro_sweep(maps, masks), abs=1e-10
    )


# ------------------------------------------------------------------ minmax


def test_minmax_normalize(rng):
    x = rng.normal(size=(3, 4, 5)).astype(np.float32)
    out = jax.jit(M.minmax_normalize)(x)
    np.testing.assert_allclose(out, (x - x.min()) / (x.max() - x.min() + 1e-5), rtol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        M.minmax_normalize(np.zeros((0,), np.float32))


# ------------------------------------------------------------------ degenerate input

_S = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
_Y = np.array([0, 1, 0, 1])


@pytest.mark.parametrize("fn", [M.auroc, M.aupr, M.f1_max])
@pytest.mark.parametrize(
    "scores,labels,kwargs,exc,match",
    [
        (_S, np.zeros(4, int), {}, ValueError, "only negative"),
        (_S, np.ones(4, int), {}, ValueError, "only positive"),
        (np.array([0.1, np.nan, 0.3, 0.4], np.float32), _Y, {}, ValueError, "1 NaN"),
        (np.array([0.1, np.inf, 0.3, 0.4], np.float32), _Y, {}, ValueError, "1 inf"),
        (np.zeros((0,), np.float32), np.zeros((0,), int), {}, ValueError, "empty"),
        (_S, _Y[:3], {}, ValueError, "same shape"),
        (_S, np.array([0, 1, 2, 1]), {}, ValueError, "binary"),
        (_S, np.array([0, 255, 0, 255]), {}, ValueError, "binary"),
        (_S[None], _Y[None], {}, ValueError, "rank 1"),
        (np.array([1, 2, 3, 4]), _Y, {}, TypeError, "floating"),
        (_S, _Y, {"mask": np.zeros(4, bool)}, ValueError, "no element"),
        (_S, _Y, {"mask": np.ones(3, bool)}, ValueError, "shape"),
        (_S, _Y, {"mask": np.ones(4, int)}, TypeError, "boolean"),
        (_S, _Y, {"mask": np.array([True, False, True, False])}, ValueError, "only negative"),
    ],
)
def test_degenerate_input_raises(fn, scores, labels, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(scores, labels, **kwargs)


@pytest.mark.parametrize("fn", [M.auroc, M.aupr, M.f1_max])
def test_degenerate_input_under_jit_is_nan(fn):
    f = jax.jit(fn)
    assert np.isnan(f(_S, np.zeros(4, np.int32)))
    assert np.isnan(f(np.array([0.1, np.nan, 0.3, 0.4], np.float32), _Y))
    assert np.isnan(f(_S, np.array([0, 1, 2, 1])))
    # static problems still raise at trace time
    with pytest.raises(ValueError, match="same shape"):
        f(_S, _Y[:3])


def test_fpr_at_tpr_bad_input():
    a = np.array([0.1, 0.2], np.float32)
    with pytest.raises(ValueError, match="non-empty"):
        M.fpr_at_tpr(a, np.zeros((0,), np.float32))
    with pytest.raises(ValueError, match="1 NaN"):
        M.fpr_at_tpr(a, np.array([np.nan], np.float32))
    with pytest.raises(ValueError, match="1 inf"):
        M.fpr_at_tpr(np.array([np.inf], np.float32), a)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="tpr"):
            M.fpr_at_tpr(a, a, bad)
    with pytest.raises(ValueError, match="rank 1"):
        M.fpr_at_tpr(a[None], a)
    with pytest.raises(TypeError, match="floating"):
        M.fpr_at_tpr(np.array([1, 2]), a)
    with pytest.raises(TypeError, match="static"):
        jax.jit(M.fpr_at_tpr)(a, a, 0.95)
    with pytest.raises(ValueError, match="selects no element"):
        M.fpr_at_tpr(a, a, id_mask=np.zeros(2, bool))
    assert np.isnan(jax.jit(M.fpr_at_tpr)(np.array([np.nan, 1.0], np.float32), a))
    assert np.isnan(jax.jit(lambda x, m: M.fpr_at_tpr(x, x, ood_mask=m))(a, np.zeros(2, bool)))


def test_pixel_auroc_bad_input():
    maps = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="same shape"):
        M.pixel_auroc(maps, np.zeros((2, 1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="only negative"):
        M.pixel_auroc(maps, np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="rank 3"):
        M.pixel_auroc(maps[0], np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize(
    "maps,masks,kwargs,exc,match",
    [
        (np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4)), {}, ValueError, "no defect pixel"),
        (np.zeros((2, 4, 4), np.float32), np.ones((2, 4, 4)), {}, ValueError, "no defect-free"),
        (np.zeros((2, 4, 4), np.float32), np.full((2, 4, 4), 255), {}, ValueError, "binary"),
        (
            np.full((2, 4, 4), np.nan, np.float32),
            np.eye(4)[None].repeat(2, 0),
            {},
            ValueError,
            "NaN",
        ),
        (np.zeros((4, 4), np.float32), np.eye(4), {}, ValueError, "rank 3"),
        (np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 5)), {}, ValueError, "same shape"),
        (np.zeros((0, 4, 4), np.float32), np.zeros((0, 4, 4)), {}, ValueError, "empty"),
        (np.zeros((1, 4, 4), int), np.eye(4)[None], {}, TypeError, "floating"),
        (
            np.zeros((1, 4, 4), np.float32),
            np.eye(4)[None],
            {"fpr_limit": 0.0},
            ValueError,
            "fpr_limit",
        ),
        (
            np.zeros((1, 4, 4), np.float32),
            np.eye(4)[None],
            {"fpr_limit": 1.2},
            ValueError,
            "fpr_limit",
        ),
        (
            np.zeros((1, 4, 4), np.float32),
            np.eye(4)[None],
            {"num_thresholds": 1},
            ValueError,
            "num_thresholds",
        ),
    ],
)
def test_aupro_bad_input(maps, masks, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        M.aupro(maps, masks, **kwargs)
