"""Tests for tailedcore_jax.class_size and tailedcore_jax.tailsampler.

Oracle: tests/reference/tailsampler.py, a loop-based NumPy/scipy port of the official
``AdaptiveTailSampler('trim_min', 'mode')`` (jungyg/TailedCore). Intermediates are compared
bit for bit from the same float32 similarity matrix; end to end (from embeddings) the
comparison uses "dyadic" embeddings whose similarities are exact in float32, so that the
NumPy and XLA matmuls agree bit for bit.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailedcore_jax import tailsampler as C
from tailedcore_jax import tailsampler as T
from tests.reference import tailsampler as R

LT_SIZES = [200, 100, 60, 30, 10, 5, 4, 2, 1, 1]  # 413 images
DY_SIZES = [20, 12, 8, 5, 3, 2, 1, 1]  # 52 images


def _stats(emb, **kw):
    # Eager call: the pipeline is one internally jitted function, cached per shape.
    return T.tail_sampler_statistics(emb, **kw)


def _assert_same_as_reference(stats, ref, valid=None):
    n = len(ref["thresholds"])
    sl = slice(None) if valid is None else np.asarray(valid)
    np.testing.assert_array_equal(np.asarray(stats.thresholds)[sl], ref["thresholds"])
    np.testing.assert_array_equal(np.asarray(stats.class_sizes)[sl], ref["class_sizes"])
    ng = int(np.asarray(stats.group_mask).sum())
    np.testing.assert_array_equal(np.asarray(stats.groups)[:ng], ref["groups"])
    assert int(np.asarray(stats.groups)[ng:].sum()) == 0
    assert int(stats.elbow) == ref["elbow"]
    assert int(stats.k_percentile) == ref["k_percentile"]
    assert int(stats.k_star) == ref["k_star"]
    np.testing.assert_array_equal(np.asarray(stats.tail_mask)[sl], ref["tail_mask"])
    assert len(np.asarray(stats.tail_mask)[sl]) == n


@pytest.fixture(scope="module")
def lt_data():
    rng = np.random.default_rng(1234)
    # noise 0.5 / 0.3: well separated (intra-class cosine ~0.8 / ~0.92, inter ~0);
    # noise 0.8: intra-class cosine ~0.6 is below the half-angle of the minimum, so every
    # image is its own class (all groups equal -> everything is tail), still bit-exact.
    return [
        (*R.long_tail_mixture(rng, LT_SIZES, dim=2048, noise=noise), noise >= 0.8)
        for noise in (0.5, 0.3, 0.8)
    ]


@pytest.fixture(scope="module")
def dyadic():
    return R.dyadic_mixture(np.random.default_rng(7), DY_SIZES, dim=2048, ones=1024, flips=64)


# --------------------------------------------------------------------------------------
# similarity
# --------------------------------------------------------------------------------------


def test_cosine_similarity_matches_numpy(rng):
    x = rng.standard_normal((37, 64)).astype(np.float32) * 3
    x[5] = 0.0  # F.normalize: zero row -> zero similarities
    s = jax.jit(C.cosine_similarity_matrix)(x)
    assert s.dtype == jnp.float32 and s.shape == (37, 37)
    ref = R.cosine_similarity(x)
    np.testing.assert_allclose(np.asarray(s), ref, atol=2e-6)
    assert np.all(np.asarray(s)[5] == 0) and np.all(np.asarray(s)[:, 5] == 0)
    np.testing.assert_allclose(np.diag(np.asarray(s))[np.arange(37) != 5], 1.0, atol=2e-6)


def test_cosine_similarity_blocked_path_is_symmetric(rng):
    # >= 1024 rows: upper blocks of a 4 x 4 split, mirrored (uneven last block here)
    x = rng.standard_normal((1030, 16)).astype(np.float32)
    s = np.asarray(C.cosine_similarity_matrix(x))
    np.testing.assert_allclose(s, R.cosine_similarity(x), atol=2e-6)
    np.testing.assert_array_equal(s, s.T)


def test_dyadic_similarity_is_exact(dyadic):
    emb, _ = dyadic
    s = np.asarray(C.cosine_similarity_matrix(emb))
    np.testing.assert_array_equal(s, R.cosine_similarity(emb))
    np.testing.assert_array_equal(s * 1024, np.round(s * 1024))


# --------------------------------------------------------------------------------------
# half-angle boundary on the 1/n grid: every possible quantised minimum, ties included
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 8, 50, 97, 512, 1000, 4096, 5000])
def test_half_angle_boundary_static_equals_numpy(n):
    k0 = np.arange(-n, n + 1)
    want = R.half_angle_boundary(n, k0)  # the official NumPy float32 arithmetic, per k0
    got = jax.jit(lambda k: C._half_angle_boundary(jnp.int32(n), k, n_lo=n, n_hi=n, capacity=n))(
        jnp.asarray(k0, jnp.int32)
    )
    np.testing.assert_array_equal(np.asarray(got), want)
    # The exact-integer boundary differs from NumPy float32 only at grid points within
    # float32 rounding of the true half-angle (exact ties 2k^2 = n(n+k0) included).
    exact = C._exact_boundary_np(n, k0)
    assert np.all(np.abs(want - exact) <= 1)


def test_half_angle_exact_ties_are_numpy_decided():
    # n = 50, k0 = 14: m = 0.28 and h = cos(arccos(0.28)/2) = 0.8 = 40/50 exactly (in R).
    n = 50
    assert 2 * 40**2 == n * (n + 14)
    k0 = np.array([14])
    np_boundary = int(R.half_angle_boundary(n, k0)[0])
    assert np_boundary in (40, 41)  # NumPy's float32 rounding decides whether 0.8 > h
    got = C._half_angle_boundary(
        jnp.int32(n), jnp.asarray(k0, jnp.int32), n_lo=n, n_hi=n, capacity=n
    )
    assert int(got[0]) == np_boundary


def test_half_angle_boundary_masked_all_counts():
    cap = 120
    n_all = np.arange(2, cap + 1)

    def one(n):
        k0 = jnp.clip(jnp.arange(-cap, cap + 1, dtype=jnp.int32), -n, n)
        return C._half_angle_boundary(n, k0, n_lo=2, n_hi=cap, capacity=cap)

    got = np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(n_all, jnp.int32)))
    for row, n in zip(got, n_all):
        k0 = np.clip(np.arange(-cap, cap + 1), -n, n)
        np.testing.assert_array_equal(row, R.half_angle_boundary(int(n), k0))


# --------------------------------------------------------------------------------------
# thresholds and class sizes against the reference
# --------------------------------------------------------------------------------------


def _grid_similarity(rng, n, *, ties=True):
    """Symmetric similarity with values on the float32 1/n grid (and tie minima)."""
    k = rng.integers(0, n + 1, size=(n, n))
    k = np.triu(k) + np.triu(k, 1).T
    if ties:
        # Put the minimum of some rows at a k0 with an exact half-angle tie and fill
        # a few entries with the tied grid value k (2 k^2 = n (n + k0)).
        pairs = [
            (k0, kk)
            for kk in range(n + 1)
            for k0 in range(-n, n + 1)
            if 2 * kk * kk == n * (n + k0)
        ]
        for i, (k0, kk) in enumerate(pairs[: n // 2]):
            k[i, :] = np.maximum(k[i, :], k0)
            k[i, (i + 1) % n] = k0
            k[i, (i + 2) % n : (i + 6) % n] = kk
    s = (k.astype(np.float32) / np.float32(n)).astype(np.float32)
    np.fill_diagonal(s, 1.0)
    return s


@pytest.mark.parametrize("keep", [0.85, 0.5, 1.0, 0.05])
def test_thresholds_match_reference_on_grid_ties(rng, keep):
    s = _grid_similarity(rng, 50)
    got = C.trim_min_thresholds(s, keep=keep)
    np.testing.assert_array_equal(np.asarray(got), R.thresholds(s, keep))


def test_thresholds_and_votes_match_reference_on_mixture(lt_data):
    for emb, _, _ in lt_data[:2]:
        s = np.asarray(C.cosine_similarity_matrix(emb))
        t = C.trim_min_thresholds(s)
        np.testing.assert_array_equal(np.asarray(t), R.thresholds(s))
        cs = C.predict_class_sizes(s, t)
        np.testing.assert_array_equal(np.asarray(cs), R.class_sizes(s, np.asarray(t)))
        np.testing.assert_array_equal(np.asarray(cs), R.class_sizes_loop(s, np.asarray(t)))


def test_class_sizes_mode_ties_and_unselected_column(rng):
    n = 12
    s = rng.uniform(-0.2, 0.2, (n, n)).astype(np.float32)
    s = (s + s.T) / 2
    np.fill_diagonal(s, 1.0)
    t = np.full(n, 0.5, np.float32)
    # Column 0: selected by rows 1, 2 (count 3 each: diag + col 0 + col 3) and
    # rows 4, 5 (count 2 each) -> tie between 2 and 3 -> smallest (2).
    for i in (1, 2):
        s[i, 0] = s[i, 3] = 0.9
    for i in (4, 5):
        s[i, 0] = 0.9
    # Column 11: nobody selects it, not even itself -> NaN (official scipy mode).
    t[11] = 1.5
    got = np.asarray(C.predict_class_sizes(s, t))
    want = R.class_sizes(s, t)
    np.testing.assert_array_equal(got, want)
    assert got[0] == 2.0 and np.isnan(got[11])
    np.testing.assert_array_equal(got, R.class_sizes_loop(s, t))


# --------------------------------------------------------------------------------------
# grouping, elbow, percentile, K*
# --------------------------------------------------------------------------------------


def test_spec_toy_values():
    # The official toy run (classes of 30, 30 and 2 images): sizes 30 for 60 images, then 1, 2.
    cs = np.array([30.0] * 60 + [1.0, 2.0], np.float32)
    groups, gmask = C.group_class_sizes(cs)
    ng = int(gmask.sum())
    np.testing.assert_array_equal(np.asarray(groups)[:ng], [45, 16, 1])
    np.testing.assert_array_equal(R.group(cs), [45, 16, 1])
    assert int(C.elbow(groups, mask=gmask)) == 16
    assert int(C.max_k_within_percentile(groups, mask=gmask)) == 1
    k_star = int(C.few_shot_threshold(groups, mask=gmask))
    assert k_star == 1
    tail = np.nonzero(cs <= k_star)[0]
    np.testing.assert_array_equal(tail, [60])  # only one of the two tail images


def test_toy_like_similarity_with_exact_grid_ties():
    # Two head classes of 30 identical members (similarity exactly 1.0, on the grid) and
    # two tail images with S_AB = 0.9. Each head row keeps all 30 members (the 85 % trim
    # lands on the tied 1.0 values); each tail row keeps only itself. (The spec 10.3 sizes
    # 1 and 2 need a head image with no identical sibling, so they are checked above at
    # the class-size level.)
    n = 62
    s = np.zeros((n, n), np.float32)
    s[:30, :30] = 1.0
    s[30:60, 30:60] = 1.0
    s[60, 60] = s[61, 61] = 1.0
    s[60, 61] = s[61, 60] = 0.9
    s[30:60, 61] = s[61, 30:60] = 0.6
    s[30:60, 60] = s[60, 30:60] = 0.4
    assert np.linalg.eigvalsh(s.astype(np.float64)).min() > -1e-9  # a valid Gram matrix
    t = C.trim_min_thresholds(s)
    np.testing.assert_array_equal(np.asarray(t), R.thresholds(s))
    cs = C.predict_class_sizes(s, t)
    np.testing.assert_array_equal(np.asarray(cs), [30.0] * 60 + [1.0, 1.0])
    groups, gmask = C.group_class_sizes(cs)
    ref = R.tail_sampler(similarity=s)
    np.testing.assert_array_equal(np.asarray(groups)[: int(gmask.sum())], ref["groups"])
    np.testing.assert_array_equal(ref["groups"], [30, 30, 1, 1])
    k_star = int(C.few_shot_threshold(groups, mask=gmask))
    assert k_star == ref["k_star"] == 1
    np.testing.assert_array_equal(np.nonzero(np.asarray(cs) <= k_star)[0], [60, 61])


def test_group_matches_reference_random(rng):
    fn = jax.jit(C.group_class_sizes)
    for trial in range(60):
        n = 40
        kind = trial % 3
        if kind == 0:
            cs = rng.integers(1, n + 1, size=n).astype(np.float32)
        elif kind == 1:
            cs = rng.choice([1, 2, 3, 4, 8, 9, 17, 18], size=n).astype(np.float32)
        else:
            cs = rng.integers(1, 8, size=n).astype(np.float32)
            cs[rng.random(n) < 0.2] = np.nan  # unselected columns count as 1
        groups, gmask = fn(cs)
        want = R.group(cs)
        ng = int(gmask.sum())
        np.testing.assert_array_equal(np.asarray(groups)[:ng], want)
        assert np.asarray(groups).sum() == n
        # masked: padded entries are ignored
        pad = np.concatenate([cs, rng.integers(1, 40, size=8).astype(np.float32)])
        mask = np.arange(n + 8) < n
        g2, m2 = fn(jnp.asarray(pad), mask=jnp.asarray(mask))
        np.testing.assert_array_equal(np.asarray(g2)[: int(m2.sum())], want)


def test_group_rounds_half_to_even():
    cs = np.array([2.5, 2.5, 3.5, 3.5, 1.0, 1.0, 1.0], np.float32)
    groups, gmask = C.group_class_sizes(cs)
    np.testing.assert_array_equal(np.asarray(groups)[: int(gmask.sum())], R.group(cs))
    # Six sizes of 2.5: half to even (torch.round) gives 2 -> groups [2, 2, 2]; half up would
    # give 3 -> [3, 3].
    groups, gmask = C.group_class_sizes(np.full(6, 2.5, np.float32))
    np.testing.assert_array_equal(np.asarray(groups)[: int(gmask.sum())], [2, 2, 2])
    np.testing.assert_array_equal(R.group(np.full(6, 2.5, np.float32)), [2, 2, 2])


def test_elbow_percentile_kstar_match_reference(rng):
    e_fn = jax.jit(C.elbow)
    p_fn = jax.jit(C.max_k_within_percentile, static_argnames="percentile")
    k_fn = jax.jit(C.few_shot_threshold, static_argnames="percentile")
    checked = 0
    for _ in range(200):
        k = int(rng.integers(1, 12))
        g = np.sort(rng.integers(1, 200, size=k))[::-1]
        if rng.random() < 0.3:
            g = np.sort(np.concatenate([g, rng.integers(1, 4, size=5)]))[::-1]
        pad = np.zeros(16, np.int32)
        pad[: len(g)] = g
        mask = np.arange(16) < len(g)
        perm = rng.permutation(16)  # any order: sorted internally
        gp, mp = jnp.asarray(pad[perm]), jnp.asarray(mask[perm])
        for p in (0.15, 1.0):
            assert int(p_fn(gp, mask=mp, percentile=p)) == R.max_k_within_percentile(g, p)
        if R.collinear(g):
            assert int(e_fn(gp, mask=mp)) == R.elbow_exact(g) == int(g[0])
            continue
        checked += 1
        assert int(e_fn(gp, mask=mp)) == R.elbow(g)
        for p in (0.15, 1.0):
            assert int(k_fn(gp, mask=mp, percentile=p)) == R.few_shot_threshold(g, p)
    assert checked > 100


def test_elbow_edge_cases():
    # single group (official dx == 0 branch) and all equal (official NaN -> argmax 0)
    assert int(C.elbow(jnp.array([7]))) == 7 == R.elbow([7])
    assert int(C.elbow(jnp.array([4, 4, 4]))) == 4 == R.elbow([4, 4, 4])
    assert int(C.few_shot_threshold(jnp.array([7]))) == 7 == R.few_shot_threshold([7])
    assert int(C.few_shot_threshold(jnp.array([4, 4, 4]))) == 4
    # two groups: official elbow is float64 noise, but K* (percentile < 1) is the smaller
    for g in ([45, 17], [100, 1], [9, 8], [1000, 3]):
        assert int(C.elbow(jnp.array(g))) == g[0]
        assert int(C.few_shot_threshold(jnp.array(g))) == R.few_shot_threshold(g) == g[1]


def test_edge_case_all_groups_equal_and_empty_tail():
    # all groups equal -> K* = that size -> every image is tail
    cs = np.full(12, 4.0, np.float32)
    groups, gmask = C.group_class_sizes(cs)
    np.testing.assert_array_equal(np.asarray(groups)[: int(gmask.sum())], [4, 4, 4])
    k_star = int(C.few_shot_threshold(groups, mask=gmask))
    assert k_star == R.few_shot_threshold(R.group(cs)) == 4
    # every class size NaN (no column selected) -> groups of 1 -> K* = 1 -> empty tail
    cs = np.full(6, np.nan, np.float32)
    groups, gmask = C.group_class_sizes(cs)
    np.testing.assert_array_equal(np.asarray(groups)[: int(gmask.sum())], [1] * 6)
    k_star = C.few_shot_threshold(groups, mask=gmask)
    assert not np.any(np.asarray(cs) <= float(k_star))


# --------------------------------------------------------------------------------------
# the whole TailSampler
# --------------------------------------------------------------------------------------


def test_pipeline_matches_reference_on_long_tail_mixture(lt_data):
    for emb, labels, overlapping in lt_data:
        stats = _stats(emb)
        ref = R.tail_sampler(similarity=np.asarray(stats.similarity))
        _assert_same_as_reference(stats, ref)
        tail, sizes = T.tail_sample_mask(emb)
        np.testing.assert_array_equal(np.asarray(tail), ref["tail_mask"])
        np.testing.assert_array_equal(np.asarray(sizes), ref["class_sizes"])
        if overlapping:
            assert np.all(np.asarray(sizes) == 1.0) and np.asarray(tail).all()
            continue
        # quality on well-separated data: sizes within 25 % on average, no tail missed
        true = np.asarray(LT_SIZES)[labels]
        rel = np.mean(np.abs(np.asarray(sizes) - true) / true)
        assert rel < 0.25, rel
        assert np.all(np.asarray(tail)[true <= 5])
        assert not np.any(np.asarray(tail)[true >= 60])


def test_pipeline_end_to_end_dyadic_matches_reference(dyadic):
    emb, labels = dyadic
    ref = R.tail_sampler(emb)  # its own NumPy matmul: exact for dyadic embeddings
    stats = _stats(emb)
    np.testing.assert_array_equal(np.asarray(stats.similarity), ref["similarity"])
    _assert_same_as_reference(stats, ref)
    true = np.asarray(DY_SIZES)[labels]
    assert np.all(np.asarray(stats.tail_mask)[true <= 2])


def test_pipeline_balanced_and_single_class_match_reference():
    rng = np.random.default_rng(3)
    # Balanced classes still give a "tail" (spec 9.10). A single class has nothing to
    # contrast with: the half-angle of its own minimum is above its similarities, so every
    # image is a class of 1 (all groups equal) and everything is tail.
    for sizes in ([12, 12, 12, 12], [48]):
        emb, _ = R.long_tail_mixture(rng, sizes, dim=256, noise=0.5)
        stats = _stats(emb)
        ref = R.tail_sampler(similarity=np.asarray(stats.similarity))
        _assert_same_as_reference(stats, ref)
        assert np.asarray(stats.tail_mask).any()
        if len(sizes) > 1:
            assert not np.asarray(stats.tail_mask).all()
    assert np.all(np.asarray(stats.class_sizes) == 1.0)
    assert np.asarray(stats.tail_mask).all()


def test_identical_embeddings_defined_behaviour():
    # official: IndexError (U empty). Here: every image is a neighbour -> one class of N.
    emb = np.zeros((10, 2048), np.float32)
    emb[:, :1024] = 1.0  # exact similarity 1.0 everywhere
    stats = T.tail_sampler_statistics(emb)
    np.testing.assert_array_equal(np.asarray(stats.class_sizes), np.full(10, 10.0))
    assert int(stats.k_star) == 10 and np.asarray(stats.tail_mask).all()
    ref = R.tail_sampler(similarity=np.asarray(stats.similarity))
    _assert_same_as_reference(stats, ref)


# --------------------------------------------------------------------------------------
# masks, vmap, jit, no retrace
# --------------------------------------------------------------------------------------


def test_mask_equals_valid_rows_alone(dyadic, rng):
    emb, _ = dyadic
    n, d = emb.shape
    cap = n + 9
    order = rng.permutation(cap)
    pad = np.zeros((cap, d), np.float32)
    valid = np.zeros(cap, bool)
    pad[order[:n]] = emb
    valid[order[:n]] = True
    pad[order[n:]] = R.dyadic_mixture(rng, [9], dim=d)[0]  # junk rows
    want = _stats(emb)
    got = _stats(pad, mask=jnp.asarray(valid))
    rows = order[:n]
    np.testing.assert_array_equal(np.asarray(got.thresholds)[rows], np.asarray(want.thresholds))
    np.testing.assert_array_equal(np.asarray(got.class_sizes)[rows], np.asarray(want.class_sizes))
    np.testing.assert_array_equal(np.asarray(got.tail_mask)[rows], np.asarray(want.tail_mask))
    np.testing.assert_array_equal(
        np.asarray(got.groups), np.concatenate([np.asarray(want.groups), np.zeros(9, np.int32)])
    )
    assert int(got.k_star) == int(want.k_star)
    assert not np.asarray(got.tail_mask)[~valid].any()
    assert np.all(np.asarray(got.class_sizes)[~valid] == 0)


def test_mask_similarity_level_functions(lt_data, rng):
    emb = lt_data[0][0]
    s = np.asarray(C.cosine_similarity_matrix(emb[:150]))
    cap = 170
    idx = np.sort(rng.choice(cap, 150, replace=False))
    big = rng.uniform(-1, 1, (cap, cap)).astype(np.float32)
    big[np.ix_(idx, idx)] = s
    valid = np.zeros(cap, bool)
    valid[idx] = True
    t = C.trim_min_thresholds(big, mask=jnp.asarray(valid))
    t_ref = C.trim_min_thresholds(s)
    np.testing.assert_array_equal(np.asarray(t)[idx], np.asarray(t_ref))
    np.testing.assert_array_equal(np.asarray(t_ref), R.thresholds(s))
    assert np.all(np.isinf(np.asarray(t)[~valid]))
    cs = C.predict_class_sizes(big, t, mask=jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(cs)[idx], R.class_sizes(s, np.asarray(t_ref)))


def test_vmap_over_padded_sets(dyadic, rng):
    emb, _ = dyadic
    n, d = emb.shape
    other, _ = R.dyadic_mixture(rng, [15, 6, 2, 1], dim=d)
    cap = n
    batch = np.zeros((2, cap, d), np.float32)
    masks = np.zeros((2, cap), bool)
    batch[0] = emb
    masks[0] = True
    batch[1, : len(other)] = other
    batch[1, len(other) :] = 1.0
    masks[1, : len(other)] = True
    fn = jax.jit(jax.vmap(lambda x, m: T.tail_sample_mask(x, mask=m)))
    tails, sizes = fn(jnp.asarray(batch), jnp.asarray(masks))
    for b, e in ((0, emb), (1, other)):
        ref = R.tail_sampler(e)
        k = len(e)
        np.testing.assert_array_equal(np.asarray(tails[b, :k]), ref["tail_mask"])
        np.testing.assert_array_equal(np.asarray(sizes[b, :k]), ref["class_sizes"])
        assert not np.asarray(tails[b, k:]).any()


def test_jit_no_retrace(dyadic, rng):
    emb, _ = dyadic

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(x, m):
        return T.tail_sample_mask(x, mask=m)

    m1 = np.ones(len(emb), bool)
    m2 = m1.copy()
    m2[-5:] = False
    for x, m in ((emb, m1), (emb[::-1].copy(), m2), (emb * 2.0, m1)):
        tail, _ = run(jnp.asarray(x), jnp.asarray(m))
        want = R.tail_sampler(x[m])["tail_mask"]
        np.testing.assert_array_equal(np.asarray(tail)[m], want)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def test_bad_inputs(rng):
    x = rng.standard_normal((10, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="rank 2"):
        T.tail_sample_mask(x[0])
    with pytest.raises(ValueError, match="rank 2"):
        T.tail_sample_mask(x[None])
    with pytest.raises(ValueError, match="at least 2"):
        T.tail_sample_mask(x[:1])
    with pytest.raises(TypeError, match="floating"):
        T.tail_sample_mask(x.astype(np.int32))
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        T.tail_sample_mask(bad)
    zero = x.copy()
    zero[4] = 0.0
    with pytest.raises(ValueError, match="all-zero"):
        T.tail_sample_mask(zero)
    T.tail_sample_mask(zero, mask=jnp.arange(10) != 4)  # masked-out zero row is fine
    for kw in (
        {"keep": 0.0},
        {"keep": 1.5},
        {"percentile": 0.0},
        {"percentile": -0.1},
        {"percentile": 1.01},
    ):
        with pytest.raises(ValueError, match="in \\(0, 1\\]"):
            T.tail_sample_mask(x, **kw)
    with pytest.raises(TypeError, match="static"):
        jax.jit(T.tail_sample_mask)(x, keep=0.85)
    with pytest.raises(ValueError, match="shape"):
        T.tail_sample_mask(x, mask=jnp.ones(9, bool))
    with pytest.raises(TypeError, match="boolean"):
        T.tail_sample_mask(x, mask=jnp.ones(10, jnp.int32))
    with pytest.raises(ValueError, match="2 valid"):
        T.tail_sample_mask(x, mask=jnp.arange(10) < 1)
    s = np.asarray(C.cosine_similarity_matrix(x))
    with pytest.raises(ValueError, match="square"):
        C.trim_min_thresholds(s[:, :5])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        C.trim_min_thresholds(s * 3)
    with pytest.raises(ValueError, match="NaN"):
        C.predict_class_sizes(s, np.full(10, np.nan, np.float32))
    with pytest.raises(ValueError, match="shape"):
        C.predict_class_sizes(s, np.zeros(9, np.float32))
    with pytest.raises(ValueError, match="inf"):
        C.group_class_sizes(np.array([1.0, np.inf]))
    with pytest.raises(ValueError, match="at most"):
        C.group_class_sizes(np.array([1.0, 5.0]))
    with pytest.raises(TypeError, match="integer"):
        C.elbow(jnp.array([3.0, 1.0]))
    with pytest.raises(ValueError, match=">= 1"):
        C.elbow(jnp.array([3, 0]))
    with pytest.raises(ValueError, match="percentile"):
        C.few_shot_threshold(jnp.array([3, 1]), percentile=2.0)
