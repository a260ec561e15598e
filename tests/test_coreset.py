"""Tests for tailedcore_jax.coreset (random projection, greedy k-center coreset)."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailedcore_jax import coreset as coreset_mod
from tailedcore_jax.coreset import (
    CoresetSelection,
    greedy_coreset,
    greedy_coreset_masked,
    random_projection,
)
from tests.reference import coreset as ref


def _proj_key(key):
    # Documented key split: key_proj, key_start = jax.random.split(key).
    return jax.random.split(key)[0]


def _w(key, in_dim, out_dim):
    """The projection matrix greedy_coreset draws from ``key``, through the library's
    cached jitted draw (eager random_projection compiles slowly on CPU); its equality with
    ``random_projection(_proj_key(key), ...)`` is checked in test_documented_key_split."""
    return coreset_mod._split_and_draw(key, in_dim=in_dim, out_dim=out_dim)[1]


def _coreset(num_samples, **kw):
    # The public functions run jitted pieces (cached per static configuration); the tests
    # that need an outer jax.jit / jax.vmap build one explicitly.
    return lambda k, x, s: greedy_coreset(k, x, num_samples, start_index=s, **kw)


# ----------------------------------------------------------------------------- projection


def test_random_projection_matches_torch_linear_init(key):
    w = random_projection(key, 400, 64)
    assert w.shape == (400, 64) and w.dtype == jnp.float32
    w = np.asarray(w)
    bound = 1 / np.sqrt(400)
    assert np.abs(w).max() <= bound
    # U(-b, b): mean 0, variance b^2 / 3 (25600 draws).
    np.testing.assert_allclose(w.mean(), 0.0, atol=0.01 * bound)
    np.testing.assert_allclose(w.var(), bound**2 / 3, rtol=0.03)
    np.testing.assert_array_equal(w, np.asarray(random_projection(key, 400, 64)))
    assert not np.array_equal(w, np.asarray(random_projection(jax.random.key(1), 400, 64)))
    # Same distribution as torch.nn.Linear(in, out, bias=False).weight.T.
    torch = pytest.importorskip("torch")
    lin = torch.nn.Linear(400, 64, bias=False)
    wt = lin.weight.detach().numpy().T
    assert wt.shape == w.shape
    assert np.abs(wt).max() <= bound and np.abs(wt).max() > 0.99 * bound
    np.testing.assert_allclose(wt.var(), w.var(), rtol=0.06)


def test_random_projection_gaussian(key):
    w = np.asarray(random_projection(key, 300, 100, kind="gaussian"))
    np.testing.assert_allclose(w.std(), 1 / np.sqrt(100), rtol=0.03)
    # JL: squared norms are preserved in expectation.
    x = np.random.default_rng(0).standard_normal((200, 300))
    ratio = ((x @ w) ** 2).sum(1) / (x**2).sum(1)
    np.testing.assert_allclose(ratio.mean(), 1.0, atol=0.05)


@pytest.mark.parametrize(
    "args, kw, exc",
    [
        ((0, 4), {}, ValueError),
        ((4, -1), {}, ValueError),
        ((4.0, 4), {}, ValueError),
        ((4, 4), {"kind": "sparse"}, ValueError),
    ],
)
def test_random_projection_bad_input(key, args, kw, exc):
    with pytest.raises(exc):
        random_projection(key, *args, **kw)


# ------------------------------------------------------------------------ oracle equality


@pytest.mark.parametrize(
    "n, dim, proj_dim, k",
    [
        (60, 16, 8, 20),  # projected
        (150, 32, None, 40),  # no projection (projection_dim=None)
        (97, 12, 12, 97),  # projection_dim == D -> no projection; select every row
        (5000, 6, None, 25),  # two-level argmax path, 5000 not a multiple of the block
    ],
)
@pytest.mark.parametrize("distance", ["expansion", "difference"])
def test_matches_numpy_reference(key, rng, n, dim, proj_dim, k, distance):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    start = int(rng.integers(n))
    got = _coreset(k, projection_dim=proj_dim, distance=distance)(key, x, start)
    assert got.shape == (k,) and got.dtype == jnp.int32
    w = None
    if proj_dim is not None and proj_dim != dim:
        w = _w(key, dim, proj_dim)
    want = ref.greedy_coreset(ref.project(x, w), k, start)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_documented_key_split(key):
    np.testing.assert_array_equal(
        np.asarray(_w(key, 16, 8)), np.asarray(random_projection(_proj_key(key), 16, 8))
    )


def test_random_start_and_explicit_projection(key, rng):
    x = rng.standard_normal((80, 16)).astype(np.float32)
    got = greedy_coreset(key, x, 15, projection_dim=8)
    w = _w(key, 16, 8)
    want = ref.greedy_coreset(ref.project(x, w), 15, int(got[0]))
    np.testing.assert_array_equal(np.asarray(got), want)
    # An explicit matrix gives the same result as the key-drawn one.
    got2 = greedy_coreset(key, x, 15, projection=w)
    np.testing.assert_array_equal(np.asarray(got2), np.asarray(got))
    # Start drawn uniformly over the rows from the second half of the key split.
    starts = {int(greedy_coreset(jax.random.key(s), x, 15, projection_dim=8)[0])
              for s in range(40)}
    assert len(starts) > 20 and all(0 <= s < 80 for s in starts)


@pytest.mark.parametrize("n, k", [(64, 30), (5000, 40)])
def test_integer_lattice_ties_and_duplicates(key, rng, n, k):
    """Exact ties everywhere (small-integer points: every formula is exact in float32):
    the first maximum must win, as numpy.argmax / torch.argmax."""
    distinct = rng.integers(-3, 4, size=(n // 4, 3)).astype(np.float32)
    x = distinct[rng.integers(0, len(distinct), size=n)]  # many exact duplicates
    n_distinct = len(np.unique(x, axis=0))
    k = min(k, n_distinct)
    for distance in ("expansion", "difference"):
        f = _coreset(k, projection_dim=None, distance=distance)
        for start in (0, int(rng.integers(n))):
            got = np.asarray(f(key, x, start))
            np.testing.assert_array_equal(got, ref.greedy_coreset(x, k, start))
            # ...and the official rule (no explicit exclusion) gives the same indices while
            # fewer samples than distinct points are requested.
            np.testing.assert_array_equal(
                got, ref.greedy_coreset(x, k, start, exclude_selected=False)
            )


def test_more_samples_than_distinct_points(key):
    """Past the distinct points every row is at distance 0: indices stay unique (first
    not-yet-selected row), where the official loop repeats the first zero row."""
    x = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 0.0], [5.0, 0.0], [1.0, 1.0]], np.float32)
    got = np.asarray(greedy_coreset(key, x, 5, projection_dim=None, start_index=0))
    np.testing.assert_array_equal(got, ref.greedy_coreset(x, 5, 0))
    np.testing.assert_array_equal(got, [0, 1, 4, 2, 3])
    official = ref.greedy_coreset(x, 5, 0, exclude_selected=False)
    np.testing.assert_array_equal(official, [0, 1, 4, 0, 0])
    assert ref.covering_radius(x, got) == ref.covering_radius(x, official[:3]) == 0.0


def test_properties_on_near_ties(key, rng):
    """Data built for float32 near-ties (points on a fine grid plus noise at rounding
    level): index equality with any other formula is not guaranteed, but the selection
    is unique, valid, deterministic and has the reference covering radius."""
    base = rng.standard_normal((40, 8)).astype(np.float32)
    x = (base[rng.integers(0, 40, 600)] + 1e-6 * rng.standard_normal((600, 8))).astype(
        np.float32
    )
    mask = rng.random(600) < 0.8
    k = 30
    f = jax.jit(lambda k_, x_, m_: greedy_coreset(k_, x_, k, mask=m_, projection_dim=None))
    got = np.asarray(f(key, x, mask))
    assert len(np.unique(got)) == k
    assert mask[got].all()
    np.testing.assert_array_equal(got, np.asarray(f(key, x, mask)))  # deterministic
    want = ref.greedy_coreset(x, k, int(got[0]), mask=mask)
    np.testing.assert_allclose(
        ref.covering_radius(x, got, mask=mask),
        ref.covering_radius(x, want, mask=mask),
        rtol=1e-4,
        atol=1e-5,
    )
    # The covering radius is non-increasing in the number of samples.
    radii = [ref.covering_radius(x, got[:j], mask=mask) for j in (5, 10, 20, 30)]
    assert all(a >= b for a, b in itertools.pairwise(radii))
    # A different key moves the start.
    other = {int(f(jax.random.key(s), x, mask)[0]) for s in range(1, 6)}
    assert len(other | {int(got[0])}) > 1


def test_covering_radius_on_random_data_equals_reference(rng):
    """Projected random data under a random start: same covering radius as the oracle."""
    x = rng.standard_normal((300, 16)).astype(np.float32)
    for seed in range(3):
        key = jax.random.key(seed)
        got = np.asarray(greedy_coreset(key, x, 25, projection_dim=8))
        p = ref.project(x, _w(key, 16, 8))
        want = ref.greedy_coreset(p, 25, int(got[0]))
        assert len(np.unique(got)) == 25
        np.testing.assert_allclose(
            ref.covering_radius(p, got), ref.covering_radius(p, want), rtol=1e-5
        )


def test_bfloat16_storage_is_opt_in_and_exact_on_representable_points(key, rng):
    x = rng.standard_normal((120, 16)).astype(jnp.bfloat16).astype(np.float32)
    want = ref.greedy_coreset(x, 30, 7)
    for dt in (jnp.bfloat16, jnp.float16):
        got = _coreset(30, projection_dim=None, storage_dtype=dt)(key, x, 7)
        np.testing.assert_array_equal(np.asarray(got), want)


# ------------------------------------------------------------------------------- masks


def test_mask_equals_running_on_valid_rows(key, rng):
    n = 200
    x = rng.standard_normal((n, 16)).astype(np.float32)
    mask = rng.random(n) < 0.6
    x_pad = x.copy()
    x_pad[~mask] = np.nan  # padded rows may hold anything
    rows = np.flatnonzero(mask)
    k = 25
    f = jax.jit(lambda k_, x_, m_: greedy_coreset(k_, x_, k, mask=m_, projection_dim=8))
    got = np.asarray(f(key, x_pad, mask))
    alone = np.asarray(greedy_coreset(key, x[mask], k, projection_dim=8))
    np.testing.assert_array_equal(got, rows[alone])
    sel = greedy_coreset_masked(key, x_pad, k, mask=mask, num_valid=k, projection_dim=8)
    np.testing.assert_array_equal(np.asarray(sel.indices), got)
    assert bool(sel.valid.all())


def test_masked_companion_ratio_count(key, rng):
    n, cap = 300, 30
    x = rng.standard_normal((n, 10)).astype(np.float32)
    f = jax.jit(lambda k_, x_, m_: greedy_coreset_masked(k_, x_, cap, mask=m_, ratio=0.1,
                                                         projection_dim=None))
    for m_count in (300, 299, 159, 10, 9, 1):
        mask = np.zeros(n, bool)
        mask[rng.permutation(n)[:m_count]] = True
        sel = f(key, x, mask)
        assert isinstance(sel, CoresetSelection)
        count = ref.ratio_count(m_count, 0.1)
        np.testing.assert_array_equal(np.asarray(sel.valid), np.arange(cap) < count)
        idx = np.asarray(sel.indices)
        assert mask[idx[0]]
        want = ref.greedy_coreset(x, count, idx[0], mask=mask)
        np.testing.assert_array_equal(idx[:count], want)
        assert (idx[count:] == idx[0]).all()  # documented filler: the start index
    # Default ratio is 0.1.
    g = jax.jit(lambda k_, x_, m_: greedy_coreset_masked(k_, x_, cap, mask=m_,
                                                         projection_dim=None))
    sel_default = g(key, x, mask)
    np.testing.assert_array_equal(np.asarray(sel_default.valid), np.arange(cap) < 1)


def test_vmap_over_padded_classes_equals_per_class_runs(key, rng):
    n_max, dim, cap = 160, 16, 16
    counts = [160, 95, 31, 0]
    feats = rng.standard_normal((len(counts), n_max, dim)).astype(np.float32)
    masks = np.zeros((len(counts), n_max), bool)
    for c, m in enumerate(counts):
        masks[c, rng.permutation(n_max)[:m]] = True
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(len(counts)))

    nv = jnp.array([5, 16, 3, 0], jnp.int32)  # dynamic per-class counts (num_valid)

    def both(k_, x_, m_, v_):
        by_ratio = greedy_coreset_masked(k_, x_, cap, mask=m_, ratio=0.1, projection_dim=8)
        by_count = greedy_coreset_masked(k_, x_, cap, mask=m_, num_valid=v_, projection_dim=8)
        return by_ratio, by_count

    sel, sel2 = jax.jit(jax.vmap(both))(keys, feats, masks, nv)
    assert sel.indices.shape == (len(counts), cap) and sel.valid.shape == (len(counts), cap)
    for c, m in enumerate(counts):
        count = ref.ratio_count(m, 0.1)
        np.testing.assert_array_equal(np.asarray(sel.valid[c]), np.arange(cap) < count)
        v = int(nv[c])
        np.testing.assert_array_equal(np.asarray(sel2.valid[c]), np.arange(cap) < v)
        if m == 0:
            np.testing.assert_array_equal(np.asarray(sel.indices[c]), 0)
            continue
        # Documented start: the r-th valid row, r = randint(split(key)[1], 0, M).
        r = int(jax.random.randint(jax.random.split(keys[c])[1], (), 0, jnp.int32(m)))
        start = int(np.flatnonzero(masks[c])[r])
        p = ref.project(feats[c], _w(keys[c], dim, 8))
        want = ref.greedy_coreset(p, max(count, v), start, mask=masks[c])
        np.testing.assert_array_equal(np.asarray(sel.indices[c][:count]), want[:count])
        np.testing.assert_array_equal(np.asarray(sel2.indices[c][:v]), want[:v])


def test_no_retrace_for_a_second_padded_class(key, rng):
    n_max, cap = 128, 12

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fit(k_, x_, m_):
        sel = greedy_coreset_masked(k_, x_, cap, mask=m_, ratio=0.1, projection_dim=8)
        return jnp.where(sel.valid[:, None], x_[sel.indices], 0.0), sel.valid

    x = rng.standard_normal((n_max, 16)).astype(np.float32)
    for m in (128, 70, 13):
        mask = np.zeros(n_max, bool)
        mask[:m] = True
        rows, valid = fit(jax.random.fold_in(key, m), x, mask)
        assert int(valid.sum()) == ref.ratio_count(m, 0.1)
        assert np.isin(np.asarray(rows)[np.asarray(valid)], x[:m]).all()


def test_traced_start_index(key, rng):
    x = rng.standard_normal((50, 6)).astype(np.float32)
    f = jax.jit(lambda s: greedy_coreset(key, x, 10, projection_dim=None, start_index=s))
    for s in (0, 17, 49):
        np.testing.assert_array_equal(np.asarray(f(s)), ref.greedy_coreset(x, 10, s))


# --------------------------------------------------------------------------- bad input


def _x(n=20, d=4):
    return np.random.default_rng(1).standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda k: greedy_coreset(k, _x()[0], 3), ValueError, "rank 2"),
        (lambda k: greedy_coreset(k, _x().astype(np.int32), 3), TypeError, "floating"),
        (lambda k: greedy_coreset(k, _x()[:0], 1), ValueError, "empty"),
        (lambda k: greedy_coreset(k, _x(), 0), ValueError, ">= 1"),
        (lambda k: greedy_coreset(k, _x(), 3.0), TypeError, "int"),
        (lambda k: greedy_coreset(k, _x(), 21), ValueError, "exceeds the number of rows"),
        (lambda k: greedy_coreset(k, _x(), 6, mask=np.arange(20) < 5), ValueError,
         "valid rows 5"),
        (lambda k: greedy_coreset(k, np.where(np.eye(20, 4) > 0, np.nan, _x()), 3),
         ValueError, "non-finite"),
        (lambda k: greedy_coreset(k, np.where(np.eye(20, 4) > 0, np.inf, _x()), 3),
         ValueError, "non-finite"),
        (lambda k: greedy_coreset(k, _x(), 3, mask=np.ones(19, bool)), ValueError, "shape"),
        (lambda k: greedy_coreset(k, _x(), 3, mask=np.ones(20, np.int32)), TypeError,
         "boolean"),
        (lambda k: greedy_coreset(k, _x(), 3, start_index=20), ValueError, "out of range"),
        (lambda k: greedy_coreset(k, _x(), 3, start_index=-1), ValueError, "out of range"),
        (lambda k: greedy_coreset(k, _x(), 3, start_index=0, mask=np.arange(20) > 0),
         ValueError, "masked"),
        (lambda k: greedy_coreset(k, _x(), 3, start_index=1.0), TypeError, "integer"),
        (lambda k: greedy_coreset(k, _x(), 3, start_index=np.array([1])), ValueError,
         "scalar"),
        (lambda k: greedy_coreset(k, _x(), 3, projection_dim=0), ValueError, "projection_dim"),
        (lambda k: greedy_coreset(k, _x(), 3, projection=np.ones((5, 2), np.float32)),
         ValueError, "projection"),
        (lambda k: greedy_coreset(k, _x(), 3, storage_dtype=jnp.int8), TypeError,
         "storage_dtype"),
        (lambda k: greedy_coreset(k, _x(), 3, distance="cosine"), ValueError, "distance"),
        (lambda k: greedy_coreset_masked(k, _x(), 3, mask=None), ValueError, "needs a mask"),
        (lambda k: greedy_coreset_masked(k, _x(), 3, mask=np.zeros(20, bool)), ValueError,
         "no rows"),
        (lambda k: greedy_coreset_masked(k, _x(), 3, mask=np.ones(20, bool), ratio=0.1,
                                         num_valid=2), ValueError, "not both"),
        (lambda k: greedy_coreset_masked(k, _x(), 3, mask=np.ones(20, bool), ratio=1.5),
         ValueError, r"\(0, 1\]"),
        (lambda k: greedy_coreset_masked(k, _x(), 3, mask=np.ones(20, bool),
                                         ratio=0.123456789), ValueError, "fraction"),
        (lambda k: greedy_coreset_masked(k, _x(), 1, mask=np.ones(20, bool), ratio=0.5),
         ValueError, "capacity"),
        (lambda k: greedy_coreset_masked(k, _x(), 3, mask=np.ones(20, bool), num_valid=4),
         ValueError, "capacity"),
        (lambda k: greedy_coreset_masked(k, _x(), 5, mask=np.arange(20) < 3, num_valid=4),
         ValueError, "valid rows 3"),
        (lambda k: greedy_coreset_masked(k, _x(), 3, mask=np.ones(20, bool), num_valid=-1),
         ValueError, ">= 0"),
        (lambda k: greedy_coreset_masked(k, _x(), 3, mask=np.ones(20, bool), num_valid=1.0),
         TypeError, "integer"),
        (lambda k: greedy_coreset_masked(k, _x(), 21, mask=np.ones(20, bool)), ValueError,
         "exceeds"),
    ],
)
def test_bad_input(key, call, exc, match):
    with pytest.raises(exc, match=match):
        call(key)


def test_masked_rows_may_hold_nan_but_valid_rows_may_not(key):
    x = _x()
    x[3] = np.nan
    mask = np.arange(20) != 3
    idx = greedy_coreset(key, x, 5, mask=mask)
    assert 3 not in np.asarray(idx)
    with pytest.raises(ValueError, match="non-finite"):
        greedy_coreset(key, x, 5, mask=np.ones(20, bool))


def test_checks_run_at_trace_time_where_possible(key):
    """Shape/dtype checks raise under jit; value checks are documented as concrete-only."""
    with pytest.raises(ValueError, match="rank 2"):
        jax.jit(lambda x: greedy_coreset(key, x, 2))(jnp.zeros((3,)))
    with pytest.raises(TypeError, match="boolean"):
        jax.jit(lambda m: greedy_coreset(key, jnp.ones((4, 2)), 2, mask=m))(jnp.ones(4))
    # NaN in traced features is not detected (documented): no exception here.
    jax.jit(functools.partial(greedy_coreset, num_samples=2, projection_dim=None))(
        key, jnp.full((4, 2), jnp.nan)
    )
