"""Tests for tailedcore_jax.knn against a float64 NumPy brute-force oracle."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailedcore_jax.knn import nearest_neighbors, pairwise_sq_distances, sq_norms
from tests.reference import knn as ref

RTOL = 1e-5


def _atol(queries, bank):
    # The norm expansion loses ~eps_f32 * (|q|^2 + |b|^2) in absolute terms.
    scale = np.max(np.sum(np.square(queries), 1)) + np.max(np.sum(np.square(bank), 1))
    return 4e-6 * scale


def _knn_jit(**kwargs):
    return jax.jit(functools.partial(nearest_neighbors, **kwargs))


def _assert_tie_equivalent(idx, dist, full, want_dist, atol):
    """Returned indices point at rows whose oracle distance is the wanted k-th distance."""
    idx = np.asarray(idx)
    assert idx.min() >= 0 and idx.max() < full.shape[1]
    # no row returned twice for the same query
    assert all(len(set(row)) == len(row) for row in idx.tolist())
    np.testing.assert_allclose(np.take_along_axis(full, idx, 1), want_dist, rtol=RTOL, atol=atol)
    np.testing.assert_allclose(np.asarray(dist), want_dist, rtol=RTOL, atol=atol)


# (m, n, d, k, query_chunk, bank_chunk)
SHAPES = [
    (37, 53, 8, 1, 10, 7),  # neither chunk divides; several query and bank blocks
    (37, 53, 8, 5, 10, 7),
    (64, 128, 16, 9, 16, 32),  # chunks divide exactly
    (50, 300, 32, 9, 17, 64),
    (23, 40, 4, 5, 64, 3),  # bank_chunk < k (merge without a per-block top-k)
    (20, 40, 4, 3, 1000, 1000),  # chunks larger than inputs: single block
    (5, 6, 3, 6, 2, 4),  # k == n
    (1, 9, 5, 1, 1, 1),  # one query, one-row bank blocks
]


@pytest.mark.parametrize("m,n,d,k,qc,bc", SHAPES)
def test_matches_bruteforce(rng, m, n, d, k, qc, bc):
    queries = rng.standard_normal((m, d)).astype(np.float32)
    bank = rng.standard_normal((n, d)).astype(np.float32)
    dist, idx = _knn_jit(k=k, query_chunk=qc, bank_chunk=bc)(queries, bank)
    assert dist.shape == (m, k) and idx.shape == (m, k)
    assert dist.dtype == jnp.float32 and idx.dtype == jnp.int32
    want_d, want_i, full = ref.knn(queries, bank, k)
    atol = _atol(queries, bank)
    np.testing.assert_allclose(np.asarray(dist), want_d, rtol=RTOL, atol=atol)
    # continuous random data in general position: the order is unique
    np.testing.assert_array_equal(np.asarray(idx), want_i)
    _assert_tie_equivalent(idx, dist, full, want_d, atol)
    assert np.all(np.diff(np.asarray(dist), axis=1) >= 0)


@pytest.mark.parametrize("k", [1, 9])
def test_chunking_does_not_change_result(rng, k):
    queries = rng.standard_normal((41, 12)).astype(np.float32)
    bank = rng.standard_normal((97, 12)).astype(np.float32)
    d0, i0 = _knn_jit(k=k, query_chunk=1000, bank_chunk=1000)(queries, bank)
    d1, i1 = _knn_jit(k=k, query_chunk=6, bank_chunk=11)(queries, bank)
    np.testing.assert_array_equal(np.asarray(i0), np.asarray(i1))
    np.testing.assert_allclose(np.asarray(d0), np.asarray(d1), rtol=1e-6, atol=1e-5)


def test_offset_data_precision(rng):
    # Large common offset: distances small next to the norms (the normal-patch regime).
    bank = (10.0 + 0.1 * rng.standard_normal((200, 64))).astype(np.float32)
    queries = (bank[:30] + 0.01 * rng.standard_normal((30, 64))).astype(np.float32)
    dist, idx = _knn_jit(k=3, bank_chunk=64)(queries, bank)
    want_d, _, full = ref.knn(queries, bank, 3)
    np.testing.assert_array_equal(np.asarray(idx)[:, 0], np.arange(30))
    # The distance of every returned row, relative to the distance itself (~0.0065 for the
    # first neighbour, against norms of ~6400): the norm expansion alone is off by up to 60 %.
    np.testing.assert_allclose(np.asarray(dist), np.take_along_axis(full, np.asarray(idx), 1),
                               rtol=1e-5, atol=0)
    np.testing.assert_allclose(np.asarray(dist)[:, 0], want_d[:, 0], rtol=1e-5, atol=0)
    # Which rows rank 2nd / 3rd is decided by the expansion: right up to its rounding.
    np.testing.assert_allclose(np.asarray(dist), want_d, rtol=0, atol=_atol(queries, bank))


@pytest.mark.parametrize("k", [1, 4])
def test_mask_equals_valid_rows(rng, k):
    n, d = 60, 6
    bank = rng.standard_normal((n, d)).astype(np.float32)
    queries = rng.standard_normal((25, d)).astype(np.float32)
    mask = rng.random(n) < 0.5
    # Masked rows sit right on the queries: selecting one would be the obvious bug.
    bank[np.flatnonzero(~mask)[:25]] = queries[: min(25, (~mask).sum())]
    dist, idx = _knn_jit(k=k, query_chunk=7, bank_chunk=9)(queries, bank, bank_mask=mask)
    idx = np.asarray(idx)
    assert mask[idx].all(), "a masked bank row was returned"
    sub_d, sub_i, _ = ref.knn(queries, bank[mask], k)
    np.testing.assert_array_equal(idx, np.flatnonzero(mask)[sub_i])
    np.testing.assert_allclose(np.asarray(dist), sub_d, rtol=RTOL, atol=_atol(queries, bank))


def test_masked_rows_may_hold_nan(rng):
    bank = rng.standard_normal((20, 4)).astype(np.float32)
    queries = rng.standard_normal((6, 4)).astype(np.float32)
    mask = np.ones(20, bool)
    mask[[3, 11]] = False
    bank_nan = bank.copy()
    bank_nan[[3, 11]] = np.nan
    want = nearest_neighbors(queries, bank, k=2, bank_mask=mask)
    got = nearest_neighbors(queries, bank_nan, k=2, bank_mask=mask, bank_chunk=8)
    np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
    np.testing.assert_allclose(
        np.asarray(got.sq_distances), np.asarray(want.sq_distances), rtol=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("k,bc", [(1, 4), (1, 1000), (3, 4), (7, 5), (7, 1000)])
def test_exact_ties_lowest_index_first(rng, k, bc):
    # Small integer coordinates: every product and sum is exact in float32, so tied rows
    # get bit-identical keys and the documented order (lowest index first) must hold,
    # also across bank-block boundaries.
    base = rng.integers(0, 3, size=(6, 4)).astype(np.float32)
    bank = np.concatenate([base, base, base[::-1], base])  # many exact duplicates
    queries = np.concatenate([base[:3], rng.integers(0, 3, size=(9, 4)).astype(np.float32)])
    dist, idx = _knn_jit(k=k, query_chunk=5, bank_chunk=bc)(queries, bank)
    want_d, want_i, _ = ref.knn(queries, bank, k)
    np.testing.assert_array_equal(np.asarray(dist), want_d)  # exact: small integers
    np.testing.assert_array_equal(np.asarray(idx), want_i)


def test_duplicates_float32(rng):
    # Duplicated continuous rows: distances must match; the duplicate returned may be
    # either copy (keys can differ in the last bit), but only tie-equivalent rows.
    base = rng.standard_normal((40, 16)).astype(np.float32)
    bank = np.concatenate([base, base[::-1]])
    queries = np.concatenate([base[:10], rng.standard_normal((10, 16)).astype(np.float32)])
    dist, idx = _knn_jit(k=4, query_chunk=8, bank_chunk=24)(queries, bank)
    want_d, _, full = ref.knn(queries, bank, 4)
    atol = _atol(queries, bank)
    _assert_tie_equivalent(idx, dist, full, want_d, atol)
    np.testing.assert_allclose(np.asarray(dist)[:10, :2], 0.0, atol=atol)


def test_bank_sq_norms_argument(rng):
    bank = rng.standard_normal((50, 8)).astype(np.float32)
    queries = rng.standard_normal((13, 8)).astype(np.float32)
    f = _knn_jit(k=3, bank_chunk=16)
    d0, i0 = f(queries, bank)
    d1, i1 = f(queries, bank, bank_sq_norms=sq_norms(bank))
    np.testing.assert_array_equal(np.asarray(i0), np.asarray(i1))
    np.testing.assert_allclose(np.asarray(d0), np.asarray(d1), rtol=1e-6, atol=1e-6)
    # the argument is really used: wrong norms change the ranking
    _, i2 = f(queries, bank, bank_sq_norms=sq_norms(bank) + 1e3 * (np.arange(50) != 7))
    assert np.all(np.asarray(i2)[:, 0] == 7)


def _padded_classes(rng, counts, n_max, m, d):
    banks = np.zeros((len(counts), n_max, d), np.float32)
    masks = np.zeros((len(counts), n_max), bool)
    raw = []
    for c, cnt in enumerate(counts):
        rows = rng.standard_normal((cnt, d)).astype(np.float32) + c
        raw.append(rows)
        banks[c, :cnt] = rows
        banks[c, cnt:] = 0.5  # padding values near the data: must not be picked
        masks[c, :cnt] = True
    queries = rng.standard_normal((len(counts), m, d)) + np.arange(len(counts))[:, None, None]
    return queries.astype(np.float32), banks, masks, raw


@pytest.mark.parametrize("k", [1, 5])
def test_vmap_over_padded_classes(rng, k):
    counts, n_max, m, d = [30, 17, 45], 48, 20, 8
    queries, banks, masks, raw = _padded_classes(rng, counts, n_max, m, d)
    f = functools.partial(nearest_neighbors, k=k, query_chunk=8, bank_chunk=16)
    dist, idx = jax.jit(jax.vmap(f))(queries, banks, bank_mask=masks)
    assert dist.shape == (3, m, k)
    for c in range(3):
        # per-class run on the unpadded data: the oracle, and (once) the library itself
        want_d, want_i, _ = ref.knn(queries[c], raw[c], k)
        np.testing.assert_array_equal(np.asarray(idx[c]), want_i)
        np.testing.assert_allclose(
            np.asarray(dist[c]), want_d, rtol=RTOL, atol=_atol(queries[c], raw[c])
        )
    d_c, i_c = jax.jit(f)(queries[1], raw[1])
    np.testing.assert_array_equal(np.asarray(idx[1]), np.asarray(i_c))
    np.testing.assert_allclose(np.asarray(dist[1]), np.asarray(d_c), rtol=1e-6, atol=1e-5)


def test_vmap_with_shared_norms(rng):
    counts = [10, 25]
    queries, banks, masks, raw = _padded_classes(rng, counts, 32, 9, 4)
    f = functools.partial(nearest_neighbors, k=2, bank_chunk=8)
    dist, idx = jax.jit(jax.vmap(f))(queries, banks, bank_mask=masks, bank_sq_norms=sq_norms(banks))
    for c in range(2):
        want_d, want_i, _ = ref.knn(queries[c], raw[c], 2)
        np.testing.assert_array_equal(np.asarray(idx[c]), want_i)
        np.testing.assert_allclose(
            np.asarray(dist[c]), want_d, rtol=RTOL, atol=_atol(queries[c], raw[c])
        )


def test_no_retrace_for_another_padded_class(rng):
    counts = [12, 29]
    queries, banks, masks, raw = _padded_classes(rng, counts, 32, 10, 6)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def score(q, b, mask):
        return nearest_neighbors(q, b, k=3, bank_mask=mask, query_chunk=4, bank_chunk=8)

    for c in range(2):
        dist, idx = score(queries[c], banks[c], masks[c])
        want_d, want_i, _ = ref.knn(queries[c], raw[c], 3)
        np.testing.assert_array_equal(np.asarray(idx), want_i)
        np.testing.assert_allclose(
            np.asarray(dist), want_d, rtol=RTOL, atol=_atol(queries[c], raw[c])
        )


@pytest.mark.parametrize("k", [1, 4])
def test_fewer_valid_rows_than_k_under_jit(rng, k):
    bank = rng.standard_normal((12, 3)).astype(np.float32)
    queries = rng.standard_normal((5, 3)).astype(np.float32)
    mask = np.zeros(12, bool)
    mask[[2, 9]] = True
    dist, idx = _knn_jit(k=k, bank_chunk=5)(queries, bank, bank_mask=jnp.asarray(mask))
    n_found = min(k, 2)
    want_d, want_i, _ = ref.knn(queries, bank, n_found, mask)
    np.testing.assert_array_equal(np.asarray(idx)[:, :n_found], want_i)
    np.testing.assert_allclose(np.asarray(dist)[:, :n_found], want_d, rtol=RTOL, atol=1e-4)
    assert np.all(np.asarray(idx)[:, n_found:] == -1)
    assert np.all(np.isinf(np.asarray(dist)[:, n_found:]))
    # no valid row at all
    dist, idx = _knn_jit(k=k, bank_chunk=5)(queries, bank, bank_mask=jnp.zeros(12, bool))
    assert np.all(np.asarray(idx) == -1) and np.all(np.isinf(np.asarray(dist)))


def test_empty_queries(rng):
    dist, idx = nearest_neighbors(np.zeros((0, 4), np.float32), np.ones((6, 4), np.float32), k=2)
    assert dist.shape == (0, 2) and idx.shape == (0, 2)


def test_pairwise_sq_distances(rng):
    x = rng.standard_normal((17, 9)).astype(np.float32)
    y = rng.standard_normal((23, 9)).astype(np.float32)
    got = jax.jit(pairwise_sq_distances)(x, y)
    want = ref.sq_distance_matrix(x, y)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=_atol(x, y))
    self_d = np.asarray(jax.jit(pairwise_sq_distances)(x))
    np.testing.assert_allclose(self_d, ref.sq_distance_matrix(x, x), rtol=RTOL, atol=_atol(x, x))
    assert np.all(np.diag(self_d) == 0.0)
    np.testing.assert_array_equal(self_d, self_d.T)
    assert np.all(self_d >= 0)
    with pytest.raises(ValueError, match="feature dimension"):
        pairwise_sq_distances(x, y[:, :4])
    with pytest.raises(ValueError, match="rank 2"):
        pairwise_sq_distances(x[0], y)


def test_sq_norms(rng):
    x = rng.standard_normal((3, 7, 5)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(jax.jit(sq_norms)(x)), (x.astype(np.float64) ** 2).sum(-1), rtol=1e-6
    )
    with pytest.raises(TypeError, match="floating"):
        sq_norms(np.ones((3, 2), np.int32))


def test_clamped_non_negative():
    # identical query and bank row with large norm: the expansion may go below 0
    row = np.full((1, 33), 1234.567, np.float32)
    dist, _ = nearest_neighbors(row, np.concatenate([row, row + 1]), k=2)
    assert np.all(np.asarray(dist) >= 0)


# ---- bad input ------------------------------------------------------------------------

Q = np.zeros((4, 3), np.float32)
B = np.ones((10, 3), np.float32)


@pytest.mark.parametrize(
    "queries,bank,kwargs,exc,match",
    [
        (Q[0], B, {}, ValueError, "queries must have rank 2"),
        (Q, B[None], {}, ValueError, "bank must have rank 2"),
        (Q, B[:, :2], {}, ValueError, "same feature dimension"),
        (Q, B, {"k": 0}, ValueError, "k must be >= 1"),
        (Q, B, {"k": 11}, ValueError, "larger than the number of bank rows"),
        (Q, B, {"k": 2.0}, TypeError, "k must be a Python int"),
        (Q, B, {"k": True}, TypeError, "k must be a Python int"),
        (Q, B, {"query_chunk": 0}, ValueError, "query_chunk must be >= 1"),
        (Q, B, {"bank_chunk": -3}, ValueError, "bank_chunk must be >= 1"),
        (Q, B[:0], {}, ValueError, "bank is empty"),
        (Q.astype(np.int32), B, {}, TypeError, "queries must be a floating"),
        (Q, B.astype(np.int32), {}, TypeError, "bank must be a floating"),
        (Q, B, {"bank_mask": np.ones(10, np.int32)}, TypeError, "bank_mask must be boolean"),
        (Q, B, {"bank_mask": np.ones(9, bool)}, ValueError, r"bank_mask must have shape \(10,\)"),
        (Q, B, {"k": 3, "bank_mask": np.arange(10) < 2}, ValueError, "valid bank rows"),
        (np.full((4, 3), np.nan, np.float32), B, {}, ValueError, "queries contains non-finite"),
        (Q, np.full((10, 3), np.inf, np.float32), {}, ValueError, "bank .valid rows. contains"),
        (Q, B, {"bank_sq_norms": np.ones(9, np.float32)}, ValueError, "bank_sq_norms must have"),
        (
            Q,
            B,
            {"bank_sq_norms": np.full(10, np.nan, np.float32)},
            ValueError,
            "bank_sq_norms contains non-finite",
        ),
    ],
)
def test_bad_input(queries, bank, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        nearest_neighbors(queries, bank, **kwargs)


def test_bad_static_input_raises_under_jit():
    # shape/rank/k checks are trace-time, so they also fire inside jit
    with pytest.raises(ValueError, match="larger than the number of bank rows"):
        jax.jit(functools.partial(nearest_neighbors, k=20))(Q, B)
    with pytest.raises(ValueError, match="same feature dimension"):
        jax.jit(nearest_neighbors)(Q, B[:, :2])
