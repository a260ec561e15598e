"""tailedcore_jax.lof against scikit-learn's LocalOutlierFactor, a NumPy port and numpy.quantile."""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tailedcore_jax.lof as lof_module
from tailedcore_jax.lof import local_outlier_factor, lof_filter_mask, patchwise_lof
from tests.reference.lof import lof_filter_mask_numpy, lof_numpy, patchwise_lof_numpy

sklearn_neighbors = pytest.importorskip("sklearn.neighbors")

RTOL = 1e-5


def sklearn_lof(x, k):
    """The official call, on float64 copies of the float32 data (the exact-arithmetic oracle)."""
    with warnings.catch_warnings():
        # "Duplicate values are leading to incorrect results": expected in the duplicate tests.
        warnings.simplefilter("ignore", UserWarning)
        est = sklearn_neighbors.LocalOutlierFactor(n_neighbors=k).fit(np.asarray(x, np.float64))
    return -est.negative_outlier_factor_


def with_duplicates(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[5:13] = x[4]  # 9 copies: more than k for k <= 8, so lrd = 1e10 inside the group
    x[20:23] = x[19]  # 4 copies
    x[30] = x[31]  # a pair
    x[13] = x[4] + 0.05  # next to the big group: its LOF is ~1e10 * distance (huge)
    return x


def near_tie_problems():
    """8-point sets whose row 0 has its 3rd and 4th nearest neighbours closer than float32 sees.

    Row 0 sits at the origin, rows 1-2 at distance 1, row 3 = (2, 0, 0, 0) at squared distance
    exactly 4 and row 4 = (a, b, 0, 0) at ``a**2 + b**2 = 4 + eps`` with ``0 < |eps| < 1e-7``
    (float32 resolution at 4 is 4.8e-7). Rows 5-7 are a tight cluster next to row 3 (farther
    from the origin than 2), so rows 3 and 4 have very different lrd and picking the wrong one
    changes row 0's LOF by a large factor. Rows 1-2 see the same tie at their 3rd/4th place.
    Returns ``[(eps, x)]`` with both signs of eps.
    """
    problems = []
    for b in np.linspace(0.2, 0.8, 25):
        b32 = np.float32(b)
        a_mid = np.float32(np.sqrt(4.0 - float(b32) ** 2))
        for a in (np.nextafter(a_mid, np.float32(0)), a_mid, np.nextafter(a_mid, np.float32(9))):
            eps = float(a) ** 2 + float(b32) ** 2 - 4.0
            if 0 < abs(eps) < 1e-7:
                x = np.zeros((8, 4), np.float32)
                x[1, 2] = x[2, 3] = 1.0
                x[3, 0] = 2.0
                x[4, :2] = a, b32
                x[5:, :2] = [[2.05, 0.03], [2.05, -0.03], [2.08, 0.0]]
                problems.append((eps, x))
    return problems


def test_near_ties_resolved_like_float64(monkeypatch):
    """Neighbour sets match sklearn's float64 computation even below float32 resolution."""
    problems = near_tie_problems()
    signs = [np.sign(eps) for eps, _ in problems]
    assert signs.count(-1) >= 3 and signs.count(1) >= 3
    f = jax.jit(functools.partial(local_outlier_factor, k=3))
    for _, x in problems:
        want = sklearn_lof(x, 3)
        np.testing.assert_allclose(np.asarray(f(x)), want, rtol=RTOL)
        np.testing.assert_allclose(np.asarray(f(x)), lof_numpy(x, 3), rtol=RTOL)

    # The same pipeline without the float-float boundary check gets some of them wrong, so the
    # data really are below float32 resolution (this test can fail).
    monkeypatch.setattr(
        lof_module,
        "_refine_boundaries",
        lambda xf, sq, idx, *, k, budget=None: (sq[..., :k], idx[..., :k]),
    )
    wrong = 0
    for _, x in problems:
        plain = np.asarray(
            lof_module._lof_batch(jnp.asarray(x)[None], jnp.ones((1, 8), bool), k=3)[0]
        )
        wrong += not np.allclose(plain, sklearn_lof(x, 3), rtol=RTOL)
    assert wrong >= 3


@pytest.mark.parametrize("budget", [None, 1, 4, 30, 10_000])
def test_refine_compacted_and_fallback_branches_agree(rng, budget):
    """The compacted buffer and the every-row fallback give sklearn's answer (jit and vmap)."""
    problems = [x for _, x in near_tie_problems()][:6]
    noise = [rng.normal(size=(8, 4)).astype(np.float32) for _ in range(4)]
    xs = np.stack(problems + noise)  # 10 problems x 8 rows: ~18 ambiguous rows, 80 in all
    masks = np.ones(xs.shape[:2], bool)
    k = 3

    @jax.jit
    def run(x, m):
        xf, sq, idx = jax.vmap(functools.partial(lof_module._neighbors, k=k))(x, m)
        sq, idx = lof_module._refine_boundaries(xf, sq, idx, k=k, budget=budget)
        return jax.vmap(functools.partial(lof_module._lof_from_neighbors, k=k))(sq, idx, m)

    got = np.asarray(run(xs, masks))
    for i, x in enumerate(xs):
        np.testing.assert_allclose(got[i], sklearn_lof(x, k), rtol=RTOL)
    # vmap over a leading axis turns the lax.cond into a select: same answer.
    stacked = np.stack([xs, xs[::-1]])
    got_v = np.asarray(jax.vmap(run)(stacked, np.stack([masks, masks])))
    np.testing.assert_allclose(got_v[0], got, rtol=1e-6)
    np.testing.assert_allclose(got_v[1], got[::-1], rtol=1e-6)


def test_patchwise_near_ties_and_duplicates():
    """Both refine branches inside `patchwise_lof`: chunk 1 holds 12 near-tie positions (36
    ambiguous rows, under the 64-row buffer), chunk 2 holds 12 positions of 3 points repeated
    3, 3 and 2 times (every row's 3rd and 4th neighbours are copies of one point, so all 96
    rows are ambiguous: over 64, so every row is re-compared)."""
    problems = [x for _, x in near_tie_problems()]
    rng = np.random.default_rng(3)
    near = [problems[j % len(problems)] for j in range(12)]
    dups = []
    for _ in range(12):
        base = rng.normal(size=(3, 4)).astype(np.float32)
        dups.append(base[np.array([0, 0, 0, 1, 1, 1, 2, 2])][rng.permutation(8)])
    feats = np.stack(near + dups, axis=1)  # (8 images, 24 positions, 4)
    got = np.asarray(patchwise_lof(feats, k=3, position_chunk=12))
    want = np.stack([sklearn_lof(feats[:, j], 3) for j in range(24)], axis=1)
    np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.parametrize("k", list(range(1, 11)))
@pytest.mark.parametrize("d", [3, 24])  # sklearn's auto picks kd_tree for d <= 15, brute above
def test_matches_sklearn_random(rng, k, d):
    x = (rng.normal(size=(50, d)) * rng.uniform(0.5, 2.0, size=(1, d)) + 3.0).astype(np.float32)
    got = np.asarray(jax.jit(functools.partial(local_outlier_factor, k=k))(x))
    np.testing.assert_allclose(got, sklearn_lof(x, k), rtol=RTOL)
    np.testing.assert_allclose(got, lof_numpy(x, k), rtol=RTOL)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8, 10])
@pytest.mark.parametrize("d", [3, 24])
def test_matches_sklearn_with_duplicates(rng, k, d):
    x = with_duplicates(rng, 45, d)
    want = sklearn_lof(x, k)
    got = np.asarray(local_outlier_factor(x, k=k))
    if k <= 8:  # the 9-copy group makes huge (~1e10) scores: they must match too
        assert want.max() > 1e8
    np.testing.assert_allclose(got, want, rtol=RTOL)
    np.testing.assert_allclose(got, lof_numpy(x, k), rtol=RTOL)


def test_matches_sklearn_float32_input(rng):
    """sklearn on the float32 array itself (what the official code passes) agrees as well."""
    x = rng.normal(size=(80, 32)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        want = -sklearn_neighbors.LocalOutlierFactor(n_neighbors=6).fit(x).negative_outlier_factor_
    np.testing.assert_allclose(np.asarray(local_outlier_factor(x, k=6)), want, rtol=1e-4)


def test_outlier_scores_high(rng):
    x = rng.normal(size=(40, 4)).astype(np.float32)
    x[7] += 20.0
    s = np.asarray(local_outlier_factor(x, k=5))
    assert int(np.argmax(s)) == 7 and s[7] > 3.0


def test_mask_equals_valid_rows_only(rng):
    x = with_duplicates(rng, 45, 6)
    mask = np.ones(45, bool)
    mask[[0, 4, 10, 33, 44]] = False  # includes one member of the duplicate group
    padded = x.copy()
    padded[~mask] = np.nan  # padding content must not matter
    got = np.asarray(local_outlier_factor(padded, k=4, mask=jnp.asarray(mask)))
    want = sklearn_lof(x[mask], 4)
    np.testing.assert_allclose(got[mask], want, rtol=RTOL)
    assert np.all(got[~mask] == 0.0)


def test_no_retrace_for_padded_sizes_and_batching(rng):
    capacity, d, k = 30, 5, 3
    counts = [30, 21, 12]
    xs = rng.normal(size=(3, capacity, d)).astype(np.float32)
    masks = np.arange(capacity)[None, :] < np.array(counts)[:, None]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, m):
        return local_outlier_factor(x, k=k, mask=m)

    for x, m, c in zip(xs, masks, counts):
        got = np.asarray(f(x, jnp.asarray(m)))
        np.testing.assert_allclose(got[:c], sklearn_lof(x[:c], k), rtol=RTOL)
        assert np.all(got[c:] == 0)

    g = jax.jit(jax.vmap(functools.partial(local_outlier_factor, k=k)))
    batched = np.asarray(g(xs, mask=jnp.asarray(masks)))
    for i, c in enumerate(counts):
        np.testing.assert_allclose(batched[i, :c], sklearn_lof(xs[i, :c], k), rtol=RTOL)


def test_too_few_valid_under_jit_gives_nan(rng):
    x = rng.normal(size=(10, 3)).astype(np.float32)
    m = jnp.arange(10) < 3
    got = np.asarray(jax.jit(functools.partial(local_outlier_factor, k=3))(x, mask=m))
    assert np.all(np.isnan(got[:3])) and np.all(got[3:] == 0)


@pytest.mark.parametrize("position_chunk", [None, 1, 3, 100])
def test_patchwise_matches_sklearn_loop(rng, position_chunk):
    n, p, d, k = 24, 7, 6, 4
    feats = rng.normal(size=(n, p, d)).astype(np.float32)
    feats[3, 2] = feats[9, 2]  # a duplicate at one position
    got = np.asarray(patchwise_lof(feats, k=k, position_chunk=position_chunk))
    want = np.stack([sklearn_lof(feats[:, j], k) for j in range(p)], axis=1)
    assert got.shape == (n, p)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    np.testing.assert_allclose(got, patchwise_lof_numpy(feats, k), rtol=RTOL)


@pytest.mark.parametrize("shape", [(20, 13, 8), (300, 6, 128)])
def test_patchwise_bit_identical_for_every_chunk(rng, shape):
    """Fixed-order sums: the chunking (and so the sharded version) cannot change a single bit."""
    x = rng.normal(size=shape).astype(np.float32)
    mask = np.arange(shape[0]) != 3
    outs = [np.asarray(patchwise_lof(x, mask=mask, position_chunk=c)) for c in (1, 2, 4, None)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_patchwise_mask_jit_vmap_no_retrace(rng):
    capacity, p, d, k = 20, 5, 4, 3
    counts = [20, 13]
    feats = rng.normal(size=(2, capacity, p, d)).astype(np.float32)
    masks = np.arange(capacity)[None, :] < np.array(counts)[:, None]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, m):
        return patchwise_lof(x, k=k, mask=m, position_chunk=2)

    for x, m, c in zip(feats, masks, counts):
        got = np.asarray(f(x, jnp.asarray(m)))
        np.testing.assert_allclose(got[:c], patchwise_lof_numpy(x[:c], k), rtol=RTOL)
        assert np.all(got[c:] == 0)
    g = jax.vmap(functools.partial(patchwise_lof, k=k, position_chunk=2))
    batched = np.asarray(g(feats, mask=jnp.asarray(masks)))
    for i, c in enumerate(counts):
        np.testing.assert_allclose(batched[i, :c], patchwise_lof_numpy(feats[i, :c], k), rtol=RTOL)


@pytest.mark.parametrize("drop", [0.15, 0.5, 0.877, 0.0])
def test_filter_mask_matches_numpy_quantile(rng, drop):
    scores = rng.gamma(2.0, size=(37, 11)).astype(np.float32)
    scores[0, :5] = scores[1, 0]  # ties
    got = np.asarray(jax.jit(functools.partial(lof_filter_mask, drop=drop))(scores))
    want = lof_filter_mask_numpy(scores, 1.0 - drop)
    np.testing.assert_array_equal(got, want)
    assert got.shape == scores.shape


def test_filter_mask_with_mask_equals_valid_only(rng):
    scores = rng.gamma(2.0, size=(30, 8)).astype(np.float32)
    mask = rng.uniform(size=scores.shape) < 0.7
    padded = np.where(mask, scores, np.float32(-5.0))  # would change the quantile if used
    got = np.asarray(lof_filter_mask(padded, drop=0.15, mask=jnp.asarray(mask)))
    np.testing.assert_array_equal(got, lof_filter_mask_numpy(scores, 0.85, mask))
    assert not np.any(got[~mask])


def test_filter_mask_no_retrace_and_batching(rng):
    scores = rng.gamma(2.0, size=(3, 40)).astype(np.float32)
    masks = np.arange(40)[None, :] < np.array([40, 25, 9])[:, None]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(s, m):
        return lof_filter_mask(s, drop=0.15, mask=m)

    for s, m in zip(scores, masks):
        np.testing.assert_array_equal(
            np.asarray(f(s, jnp.asarray(m))), lof_filter_mask_numpy(s, 0.85, m)
        )
    batched = np.asarray(
        jax.vmap(functools.partial(lof_filter_mask, drop=0.15))(scores, mask=jnp.asarray(masks))
    )
    for i in range(3):
        np.testing.assert_array_equal(batched[i], lof_filter_mask_numpy(scores[i], 0.85, masks[i]))


def test_filter_mask_matches_torch_quantile_large():
    """At N*P ~ 3e5 the float32 rank of torch.quantile is what the official code uses."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    scores = (1.0 + rng.gamma(1.5, 0.2, size=(401, 784))).astype(np.float32)
    t = torch.from_numpy(scores.reshape(-1))
    thr = torch.quantile(t, 0.85).item()
    want = scores < np.float32(thr)
    got = np.asarray(lof_filter_mask(scores, drop=0.15))
    np.testing.assert_array_equal(got, want)
    assert abs(got.mean() - 0.85) < 1e-3


def test_bad_input(rng):
    x = rng.normal(size=(10, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="rank 2"):
        local_outlier_factor(x[0], k=3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        local_outlier_factor(x, k=0)
    with pytest.raises(TypeError, match="k must be"):
        local_outlier_factor(x, k=2.5)
    with pytest.raises(ValueError, match="at least k \\+ 1"):
        local_outlier_factor(x, k=10)
    with pytest.raises(ValueError, match="valid points"):
        local_outlier_factor(x, k=3, mask=jnp.arange(10) < 3)
    with pytest.raises(TypeError, match="floating"):
        local_outlier_factor(x.astype(np.int32), k=3)
    with pytest.raises(TypeError, match="boolean"):
        local_outlier_factor(x, k=3, mask=jnp.ones(10, jnp.int32))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        local_outlier_factor(bad, k=3)
    with pytest.raises(ValueError, match="non-finite"):
        patchwise_lof(bad[:, None], k=3)
    with pytest.raises(ValueError, match="rank 3"):
        patchwise_lof(x, k=3)
    with pytest.raises(ValueError, match="position_chunk"):
        patchwise_lof(x[:, None], k=3, position_chunk=0)
    with pytest.raises(ValueError, match="images"):
        patchwise_lof(x[:4, None], k=6)
    s = np.abs(x)
    for drop in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="drop"):
            lof_filter_mask(s, drop=drop)
    with pytest.raises(ValueError, match="no valid"):
        lof_filter_mask(s, mask=jnp.zeros(s.shape, bool))
    with pytest.raises(ValueError, match="shape"):
        lof_filter_mask(s, mask=jnp.ones((3,), bool))
    s[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        lof_filter_mask(s)
