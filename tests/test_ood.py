"""OOD scores against numpy/scipy oracles written from the papers' definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from tailedcore_jax import ood


def _np_nan(a, eps=None):
    l1 = np.abs(a).sum(1)
    cnt = (a > 0).sum(1)
    if eps is not None:
        return l1 / (cnt + eps)
    return np.where(cnt > 0, l1 / np.maximum(cnt, 1), 0.0)


@pytest.fixture
def feats(rng):
    a = np.maximum(rng.normal(size=(20, 16)), 0).astype(np.float32)
    a[3] = 0.0  # all units off
    a[5, :] = -0.1  # GELU-like negatives: off in the count, present in the l1
    a[5, 0] = 2.0
    return a


def test_negative_aware_norm_matches_definition(feats):
    got = jax.jit(ood.negative_aware_norm)(feats)
    np.testing.assert_allclose(got, _np_nan(feats), rtol=1e-6)
    assert float(got[3]) == 0.0
    np.testing.assert_allclose(got[5], (2.0 + 15 * 0.1) / 1, rtol=1e-6)
    got_eps = jax.jit(lambda a: ood.negative_aware_norm(a, eps=1e-6))(feats)
    np.testing.assert_allclose(got_eps, _np_nan(feats, 1e-6), rtol=1e-6)
    np.testing.assert_array_equal(ood.positive_count(feats), (feats > 0).sum(1))


def test_nan_under_vmap_over_classes(rng):
    a = np.maximum(rng.normal(size=(3, 7, 5)), 0).astype(np.float32)
    got = jax.vmap(ood.negative_aware_norm)(a)
    np.testing.assert_allclose(got, np.stack([_np_nan(x) for x in a]), rtol=1e-6)


def test_feature_norm_and_pool(feats, rng):
    np.testing.assert_allclose(jax.jit(ood.feature_norm)(feats), np.abs(feats).sum(1), rtol=1e-6)
    fm = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(ood.global_avg_pool(fm), fm.mean((1, 2)), rtol=1e-6)


def test_logit_scores(rng):
    z = (rng.normal(size=(9, 6)) * 3).astype(np.float32)
    np.testing.assert_allclose(jax.jit(ood.msp)(z), softmax(z, 1).max(1), rtol=1e-5)
    np.testing.assert_allclose(ood.energy(z), logsumexp(z, 1), rtol=1e-5)
    np.testing.assert_allclose(ood.energy(z, temperature=2.0), 2 * logsumexp(z / 2, 1), rtol=1e-5)
    np.testing.assert_allclose(ood.max_logit(z), z.max(1), rtol=1e-6)
    p = softmax(z, 1)
    kl = np.sum((1 / 6) * (np.log(1 / 6) - np.log(p)), 1)
    np.testing.assert_allclose(ood.kl_uniform(z), kl, rtol=1e-4, atol=1e-5)


def test_react(feats):
    c = ood.react_threshold(feats, percentile=0.9)  # a fraction: the 90th percentile
    np.testing.assert_allclose(c, np.percentile(feats.reshape(-1), 90), rtol=1e-6)
    # the same float32 value as the percent-based percentile it replaces
    assert float(c) == float(jnp.percentile(jnp.asarray(feats).reshape(-1), 90.0))
    np.testing.assert_allclose(ood.react_threshold(feats, percentile=1.0), feats.max(), rtol=1e-5)
    for bad in (0.0, 90.0, -0.1):
        with pytest.raises(ValueError, match="fraction in \\(0, 1\\]"):
            ood.react_threshold(feats, percentile=bad)
    np.testing.assert_allclose(ood.react_clip(feats, c), np.minimum(feats, float(c)))
    np.testing.assert_allclose(ood.nan_react_score(feats, c), _np_nan(np.minimum(feats, float(c))), rtol=1e-6)


def _np_knn_dist(q, b, k):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    d = np.sqrt(((qn[:, None, :].astype(np.float64) - bn[None]) ** 2).sum(-1))
    return np.sort(d, 1)[:, k - 1]


@pytest.mark.parametrize("k", [1, 5])
def test_knn_distance_and_combination(rng, k):
    bank = np.abs(rng.normal(size=(40, 8))).astype(np.float32)
    q = np.abs(rng.normal(size=(10, 8))).astype(np.float32)
    d = jax.jit(lambda a, b: ood.knn_ood_distance(a, b, k=k))(q, bank)
    np.testing.assert_allclose(d, _np_knn_dist(q, bank, k), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ood.knn_ood_score(q, bank, k=k), -np.asarray(d), rtol=1e-6)
    s = ood.nan_knn_score(q, bank, k=k)
    np.testing.assert_allclose(s, -_np_knn_dist(q, bank, k) / _np_nan(q), rtol=1e-4)


def test_combine_distance_nan_zero_nan_is_most_ood():
    s = ood.combine_distance_nan(jnp.array([1.0, 2.0]), jnp.array([2.0, 0.0]))
    assert float(s[0]) == -0.5 and float(s[1]) == -np.finfo(np.float32).max
    # still usable by the metrics (no infinities) and ranked as the most OOD
    from tailedcore_jax.metrics import auroc
    assert float(auroc(np.asarray(s), np.array([1, 0]))) == 1.0


def test_ssd_fit_on_separated_clusters(rng, key):
    centres = np.eye(4, 6, dtype=np.float32) * 10
    lab = np.repeat(np.arange(4), 50)
    x = centres[lab] + rng.normal(size=(200, 6)).astype(np.float32) * 0.3
    model = jax.jit(lambda k, a: ood.ssd_fit(k, a, num_clusters=4))(key, x)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    true_means = np.stack([xn[lab == c].mean(0) for c in range(4)])
    # every fitted centre is one of the true cluster means (order is arbitrary)
    dist = np.linalg.norm(np.asarray(model.centers)[:, None] - true_means[None], axis=-1)
    assert np.all(dist.min(1) < 1e-4) and len(set(dist.argmin(1))) == 4
    centred = xn - true_means[lab]
    cov = centred.T @ centred / len(xn)
    cov += 1e-6 * np.trace(cov) / 6 * np.eye(6)
    prec = np.linalg.pinv(cov)
    q = rng.normal(size=(7, 6)).astype(np.float32)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    m = np.einsum("bmd,de,bme->bm", qn[:, None] - true_means[None], prec, qn[:, None] - true_means[None])
    np.testing.assert_allclose(ood.ssd_distance(model, q), m.min(1), rtol=2e-3)
    np.testing.assert_allclose(
        ood.nan_ssd_score(model, np.abs(q)),
        -np.asarray(ood.ssd_distance(model, np.abs(q))) / _np_nan(np.abs(q)), rtol=1e-5)


def test_mahalanobis_matches_numpy(rng):
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = np.arange(60) % 3
    x[y == 1] += 3
    model = ood.mahalanobis_fit(x, y, num_classes=3)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    c = x - means[y]
    cov = c.T @ c / 60
    cov += 1e-6 * np.trace(cov) / 5 * np.eye(5)
    prec = np.linalg.inv(cov)
    q = rng.normal(size=(4, 5)).astype(np.float32)
    m = np.einsum("bmd,de,bme->bm", q[:, None] - means[None], prec, q[:, None] - means[None])
    np.testing.assert_allclose(ood.mahalanobis_score(model, q), -m.min(1), rtol=1e-3)
    with pytest.raises(ValueError, match="missing \\[3\\]"):
        ood.mahalanobis_fit(x, y, num_classes=4)


def test_activation_entropy(feats):
    p = (feats > 0).mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nan_to_num(p * np.log(p)) - np.nan_to_num((1 - p) * np.log(1 - p))
    np.testing.assert_allclose(jax.jit(ood.activation_entropy)(feats), h, rtol=1e-5, atol=1e-7)


def test_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        ood.msp(np.array([[0.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="pool 4-D maps"):
        ood.negative_aware_norm(np.ones((2, 3, 3, 4), np.float32))
    with pytest.raises(ValueError, match="empty"):
        ood.react_threshold(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="at least"):
        ood.ssd_fit(jax.random.key(0), np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="temperature"):
        ood.energy(np.ones((2, 3), np.float32), temperature=0.0)
