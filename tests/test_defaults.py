"""Every default value of the papers, pinned: by signature and through the numpy oracles.

TailedCore (official configs and classes): coreset ratio 0.1 in a 128-d random projection,
LOF k = 6 in a 128-d projection dropping the top 15 %, TailSampler trim keep 0.85 and
percentile 0.15, kNN k = 1, anomaly-map Gaussian sigma 4 (truncate 4), 3 x 3 patches pooled
to 1024-d, tail augmentations of 47 / 23 / 7 copies. A changed default fails here without
torch.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

import tailedcore_jax as tc
from experiments.tailedcore.config import TailedCoreConfig
from tests.reference import coreset as ref_coreset
from tests.reference import lof as ref_lof
from tests.reference import tailsampler as ref_ts


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


@pytest.mark.parametrize("fn,name,value", [
    (tc.fit_patchcore, "ratio", 0.1), (tc.fit_patchcore, "projection_dim", 128),
    (tc.fit_softpatch, "ratio", 0.1), (tc.fit_softpatch, "projection_dim", 128),
    (tc.fit_softpatch, "lof_k", 6), (tc.fit_softpatch, "lof_drop", 0.15),
    (tc.fit_softpatch, "lof_projection_dim", 128),
    (tc.fit_tailedcore, "ratio", 0.1), (tc.fit_tailedcore, "projection_dim", 128),
    (tc.fit_tailedcore, "lof_k", 6), (tc.fit_tailedcore, "lof_drop", 0.15),
    (tc.fit_tailedcore, "lof_projection_dim", 128), (tc.fit_tailedcore, "tail_keep", 0.85),
    (tc.fit_tailedcore, "tail_percentile", 0.15),
    (tc.denoised_coreset, "ratio", 0.1), (tc.denoised_coreset, "lof_k", 6),
    (tc.denoised_coreset, "lof_drop", 0.15), (tc.coreset_rows, "ratio", 0.1),
    (tc.lof_scores, "k", 6), (tc.lof_scores, "projection_dim", 128),
    (tc.greedy_coreset, "projection_dim", 128), (tc.greedy_coreset_masked, "projection_dim", 128),
    (tc.patchwise_lof, "k", 6), (tc.local_outlier_factor, "k", 6),
    (tc.lof_filter_mask, "drop", 0.15),
    (tc.tail_sample_mask, "keep", 0.85), (tc.tail_sample_mask, "percentile", 0.15),
    (tc.tail_sampler_statistics, "keep", 0.85), (tc.trim_min_thresholds, "keep", 0.85),
    (tc.max_k_within_percentile, "percentile", 0.15), (tc.few_shot_threshold, "percentile", 0.15),
    (tc.nearest_neighbors, "k", 1), (tc.anomaly_maps, "sigma", 4.0),
    (tc.anomaly_maps, "truncate", 4.0), (tc.patchcore_features, "patch_size", 3),
])
def test_signature_defaults(fn, name, value):
    assert _default(fn, name) == value


def test_experiment_defaults_are_the_papers():
    cfg = TailedCoreConfig()
    assert (cfg.ratio, cfg.lof_k, cfg.lof_drop, cfg.tail_keep, cfg.tail_percentile) == (
        0.1, 6, 0.15, 0.85, 0.15)
    real = TailedCoreConfig(dataset="mvtec", data_root="/x", weights="w.pth").resolved()
    assert (real.arch, real.image_size, real.resize, real.embedding_layer) == (
        "wide_resnet50_2", 224, 256, "pooled")
    assert real.patch_layers == ("layer2", "layer3") and real.noise_ratio == 0.1
    assert real.augmentation == "rot30flip"  # Pareto
    assert TailedCoreConfig(dataset="mvtec", data_root="/x", weights="w", setting="step_k4"
                            ).resolved().augmentation == "rot15flip"
    visa = TailedCoreConfig(dataset="visa", data_root="/x", weights="w").resolved()
    assert (visa.augmentation, visa.noise_ratio) == ("rotflip", 0.05)


def test_augmentation_copy_counts():
    counts = {k: len(tc.tail_augmentation_params(k)) for k in
              ("rot15flip", "rot30flip", "rot45flip", "rotflip")}
    assert counts == {"rot15flip": 47, "rot30flip": 23, "rot45flip": 15, "rotflip": 7}
    assert tc.padding_for_rotation(224, 224) == (47, 47)


def test_anomaly_map_default_is_scipy_gaussian_sigma_4(rng):
    # The maps of a point score are the upsampled point blurred by scipy's sigma-4 Gaussian.
    scores = np.zeros((1, 28, 28), np.float32)
    scores[0, 11, 17] = 1.0
    got = np.asarray(tc.anomaly_maps(jnp.asarray(scores), 224))[0]
    up = np.asarray(tc.anomaly_maps(jnp.asarray(scores), 224, sigma=None))[0]
    want = scipy.ndimage.gaussian_filter(up.astype(np.float64), sigma=4)  # reflect, truncate 4
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got, scipy.ndimage.gaussian_filter(up.astype(np.float64), sigma=2),
                           atol=1e-4)


def test_patch_features_default_dimension(rng):
    l2 = jnp.asarray(rng.normal(size=(1, 8, 8, 16)).astype(np.float32))
    l3 = jnp.asarray(rng.normal(size=(1, 4, 4, 32)).astype(np.float32))
    assert tc.patchcore_features(l2, l3).shape == (1, 8, 8, 1024)


def _feats(rng, n, p=9, d=160):  # d > 128: the 128-d projections matter
    return rng.normal(size=(n, p, d)).astype(np.float32)


def test_fit_patchcore_defaults_through_oracle(rng, key):
    f = _feats(rng, 12)
    bank = tc.fit_patchcore(key, f)
    rows = f.reshape(-1, 160)
    w = np.asarray(tc.random_projection(jax.random.split(key)[0], 160, 128))
    got = np.asarray(bank.features)[np.asarray(bank.mask)]
    start = int(np.nonzero(np.all(rows == got[0], axis=1))[0][0])
    want = ref_coreset.greedy_coreset(ref_coreset.project(rows, w), int(0.1 * len(rows)), start)
    np.testing.assert_array_equal(got, rows[want])


def test_fit_softpatch_defaults_through_oracle(rng, key):
    f = _feats(rng, 14)
    bank = tc.fit_softpatch(key, f)
    key_lof, key_core = jax.random.split(key)
    lof_w = np.asarray(tc.random_projection(key_lof, 160, 128), np.float64)
    scores = ref_lof.patchwise_lof_numpy(np.einsum("npd,de->npe", f.astype(np.float64), lof_w), 6)
    keep = ref_lof.lof_filter_mask_numpy(scores, 0.85).reshape(-1)
    rows = f.reshape(-1, 160)
    w = np.asarray(tc.random_projection(jax.random.split(key_core)[0], 160, 128))
    got = np.asarray(bank.features)[np.asarray(bank.mask)]
    start = int(np.nonzero(np.all(rows == got[0], axis=1))[0][0])
    want = ref_coreset.greedy_coreset(ref_coreset.project(rows, w), int(0.1 * keep.sum()), start,
                                      mask=keep)
    np.testing.assert_array_equal(got, rows[want])


def test_tail_sampler_defaults_through_oracle(rng):
    emb, _ = ref_ts.long_tail_mixture(rng, [40, 40, 30, 6, 3, 2, 1], dim=64, noise=0.4)
    stats = tc.tail_sampler_statistics(jnp.asarray(emb))
    want = ref_ts.tail_sampler(similarity=np.asarray(stats.similarity), keep=0.85,
                               percentile=0.15)
    np.testing.assert_array_equal(np.asarray(stats.thresholds), want["thresholds"])
    np.testing.assert_array_equal(np.asarray(stats.class_sizes), want["class_sizes"])
    np.testing.assert_array_equal(np.asarray(stats.tail_mask), want["tail_mask"])
