"""Memory banks (PatchCore / SoftPatch / TailedCore) and scoring, against numpy pipelines."""

import importlib.util
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tailedcore_jax import checkpoint, memory
from tailedcore_jax.tailsampler import tail_sample_mask
from tests.reference import coreset as ref_coreset
from tests.reference import lof as ref_lof


def _np_score(bank_f, bank_m, q, weights=None):
    d = ((q[:, :, None, :].astype(np.float64) - bank_f[None, None].astype(np.float64)) ** 2).sum(-1)
    d[:, :, ~bank_m] = np.inf
    best = d.min(-1)
    if weights is not None:
        best = best * weights[d.argmin(-1)]
    return best.max(-1), best


def _feats(rng, n=10, p=6, d=8):
    return rng.normal(size=(n, p, d)).astype(np.float32)


def _oracle_coreset_rows(rows, row_mask, projection, bank_features, bank_valid, ratio):
    """Numpy greedy from the bank's own start row, in the same projection."""
    selected = np.asarray(bank_features)[np.asarray(bank_valid)]
    start = int(np.nonzero(np.all(rows == selected[0], axis=1) & row_mask)[0][0])
    count = ref_coreset.ratio_count(int(row_mask.sum()), ratio)
    idx = ref_coreset.greedy_coreset(ref_coreset.project(rows, projection), count, start, mask=row_mask)
    return rows[idx]


@pytest.mark.parametrize("weighted", [False, True])
def test_score_matches_numpy(rng, weighted):
    bank_f = rng.normal(size=(30, 8)).astype(np.float32)
    bank_m = np.arange(30) % 4 != 0
    w = rng.uniform(0.5, 2.0, size=30).astype(np.float32) if weighted else None
    bank = memory.MemoryBank(jnp.asarray(bank_f), jnp.asarray(bank_m), None if w is None else jnp.asarray(w))
    q = rng.normal(size=(3, 4, 5, 8)).astype(np.float32)
    img, patch = jax.jit(memory.score)(bank, q)
    ref_img, ref_patch = _np_score(bank_f, bank_m, q.reshape(3, 20, 8), w)
    assert patch.shape == (3, 4, 5)
    np.testing.assert_allclose(patch.reshape(3, 20), ref_patch, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(img, ref_img, rtol=1e-4, atol=1e-4)


def test_fit_patchcore_matches_numpy_greedy(rng, key):
    f = _feats(rng)
    proj = rng.normal(size=(8, 4)).astype(np.float32)
    bank = jax.jit(lambda k, x: memory.fit_patchcore(k, x, ratio=0.25, projection=proj))(key, f)
    rows = f.reshape(-1, 8)
    assert int(bank.mask.sum()) == int(0.25 * rows.shape[0])
    want = _oracle_coreset_rows(rows, np.ones(len(rows), bool), proj, bank.features, bank.mask, 0.25)
    np.testing.assert_array_equal(np.asarray(bank.features)[np.asarray(bank.mask)], want)


def _oracle_lof_keep(f, lof_proj, mask_images=None):
    projected = np.einsum("npd,de->npe", f.astype(np.float64), lof_proj)
    scores = ref_lof.patchwise_lof_numpy(projected, 6)
    keep = ref_lof.lof_filter_mask_numpy(scores, 0.85)
    return scores, keep


def test_fit_softpatch_matches_numpy_pipeline(rng, key):
    f = _feats(rng, n=14)
    proj = rng.normal(size=(8, 4)).astype(np.float32)
    lproj = rng.normal(size=(8, 5)).astype(np.float32)
    bank = jax.jit(lambda k, x: memory.fit_softpatch(k, x, ratio=0.2, projection=proj,
                                                    lof_projection=lproj))(key, f)
    scores, keep = _oracle_lof_keep(f, lproj)
    rows = f.reshape(-1, 8)
    want = _oracle_coreset_rows(rows, keep.reshape(-1), proj, bank.features, bank.mask, 0.2)
    got = np.asarray(bank.features)[np.asarray(bank.mask)]
    np.testing.assert_array_equal(got, want)
    # each row's weight is its own LOF score
    flat_scores = scores.reshape(-1)
    for row, weight in zip(got, np.asarray(bank.weights)[np.asarray(bank.mask)]):
        i = np.nonzero(np.all(rows == row, axis=1))[0][0]
        np.testing.assert_allclose(weight, flat_scores[i], rtol=1e-4)


def test_fit_tailedcore_layout_and_branches(rng, key):
    f = _feats(rng, n=14)
    proj = rng.normal(size=(8, 4)).astype(np.float32)
    lproj = rng.normal(size=(8, 5)).astype(np.float32)
    tail = np.zeros(14, bool)
    tail[[3, 9]] = True
    aug = rng.normal(size=(4, 6, 8)).astype(np.float32)
    emb = rng.normal(size=(14, 16)).astype(np.float32)
    bank = memory.fit_tailedcore(key, f, emb, ratio=0.2, tail_mask=tail, augmented_tail_features=aug,
                                 projection=proj, lof_projection=lproj)
    is_tail = np.asarray(bank.is_tail)
    assert is_tail[: is_tail.sum()].all() and not is_tail[is_tail.sum():].any()  # tail rows first
    valid = np.asarray(bank.mask)
    tail_rows = np.concatenate([f[tail].reshape(-1, 8), aug.reshape(-1, 8)])
    want_tail = _oracle_coreset_rows(tail_rows, np.ones(len(tail_rows), bool), proj,
                                     np.asarray(bank.features)[is_tail], valid[is_tail], 0.2)
    np.testing.assert_array_equal(np.asarray(bank.features)[is_tail & valid], want_tail)
    _, keep = _oracle_lof_keep(f, lproj)
    want_head = _oracle_coreset_rows(f.reshape(-1, 8), keep.reshape(-1), proj,
                                     np.asarray(bank.features)[~is_tail], valid[~is_tail], 0.2)
    np.testing.assert_array_equal(np.asarray(bank.features)[~is_tail & valid], want_head)


def test_fit_tailedcore_runs_tailsampler_itself(rng, key):
    centres = rng.normal(size=(4, 32))
    cls = np.repeat(np.arange(4), [12, 12, 12, 1])
    emb = (centres[cls] + 0.05 * rng.normal(size=(37, 32))).astype(np.float32)
    f = _feats(rng, n=37, p=4)
    tail, _ = tail_sample_mask(emb)
    a = memory.fit_tailedcore(key, f, emb)
    b = memory.fit_tailedcore(key, f, emb, tail_mask=tail)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert bool(np.asarray(tail)[36])  # the single-image class is a tail class


def test_empty_tail_gives_no_tail_rows(rng, key):
    f = _feats(rng, n=12)
    bank = memory.fit_tailedcore(key, f, rng.normal(size=(12, 5)).astype(np.float32),
                                 tail_mask=np.zeros(12, bool))
    assert not np.asarray(bank.mask)[np.asarray(bank.is_tail)].any()
    assert np.asarray(bank.mask).sum() > 0


@pytest.mark.parametrize("method", ["patchcore", "softpatch"])
def test_vmap_over_padded_classes_equals_per_class(rng, key, method):
    counts = [12, 9]
    n_max, p, d = 12, 5, 6
    feats = np.zeros((2, n_max, p, d), np.float32)
    masks = np.zeros((2, n_max), bool)
    per_class = []
    for c, n in enumerate(counts):
        x = rng.normal(size=(n, p, d)).astype(np.float32)
        feats[c, :n] = x
        masks[c, :n] = True
        per_class.append(x)
    fit = {"patchcore": memory.fit_patchcore, "softpatch": memory.fit_softpatch}[method]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(2))
    chex.clear_trace_counter()  # the counter is keyed by name across parametrisations

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fit_all(keys, feats, masks):
        return jax.vmap(lambda k, x, m: fit(k, x, ratio=0.2, mask=m))(keys, feats, masks)

    banks = fit_all(keys, feats, masks)
    fit_all(keys, feats[::-1], masks[::-1])  # other padding pattern: no retrace
    for c, x in enumerate(per_class):
        single = fit(jax.random.fold_in(key, c), x, ratio=0.2)
        np.testing.assert_array_equal(
            np.asarray(banks.features[c])[np.asarray(banks.mask[c])],
            np.asarray(single.features)[np.asarray(single.mask)])
        q = rng.normal(size=(3, p, d)).astype(np.float32)
        bank_c = jax.tree_util.tree_map(lambda a: a[c], banks)
        np.testing.assert_allclose(memory.score(bank_c, q)[0], memory.score(single, q)[0], rtol=1e-5)


def test_memory_bank_checkpoint_round_trip(rng, key, tmp_path):
    bank = memory.fit_softpatch(key, _feats(rng))
    checkpoint.save(tmp_path / "bank", bank)
    back = checkpoint.restore(tmp_path / "bank", like=bank)
    assert isinstance(back, memory.MemoryBank) and back.is_tail is None
    q = rng.normal(size=(2, 6, 8)).astype(np.float32)
    np.testing.assert_array_equal(memory.score(back, q)[0], memory.score(bank, q)[0])


def test_bad_input(rng, key):
    f = _feats(rng)
    with pytest.raises(ValueError, match="ratio"):
        memory.fit_patchcore(key, f, ratio=0.0)
    with pytest.raises(ValueError, match="drop"):
        memory.fit_softpatch(key, f, lof_drop=1.5)
    bad = f.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        memory.fit_patchcore(key, bad)
    with pytest.raises(ValueError, match="no images"):
        memory.fit_patchcore(key, f, mask=np.zeros(10, bool))
    with pytest.raises(ValueError, match="embeddings has 3 rows"):
        memory.fit_tailedcore(key, f, np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"\(N, h, w, D\) or \(N, P, D\)"):
        memory.fit_patchcore(key, f[0])
    bank = memory.fit_patchcore(key, f)
    with pytest.raises(ValueError, match="dimension 5"):
        memory.score(bank, np.ones((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match="augmented_tail_features has dimension"):
        memory.fit_tailedcore(key, f, np.ones((10, 4), np.float32), tail_mask=np.arange(10) < 2,
                              augmented_tail_features=np.ones((3, 7), np.float32))


def _bench_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tail_noise.py"
    spec = importlib.util.spec_from_file_location("bench_tail_noise", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tail_versus_noise_trade_off():
    """Paper Table 1 in miniature: PatchCore loses on noisy heads, SoftPatch on tails."""
    r = _bench_module().run_instance(0, head_sizes=(30, 30, 30), tail_sizes=(1, 2, 3, 4), copies=7)
    pc, sp, tc = r["patchcore"], r["softpatch"], r["tailedcore"]
    assert tc["auroc_all"] > max(pc["auroc_all"], sp["auroc_all"])
    assert pc["auroc_head"] < min(sp["auroc_head"], tc["auroc_head"])
    assert sp["auroc_tail"] < min(pc["auroc_tail"], tc["auroc_tail"])
    assert r["tailsampler"]["missed_tail_pct"] <= 10.0  # at most one of the 10 tail images


def test_nan_normalized_scores(rng):
    s = rng.uniform(1, 5, size=6).astype(np.float32)
    a = np.maximum(rng.normal(size=(6, 10)), 0).astype(np.float32)
    a[2] = 0.0
    from tailedcore_jax.ood import negative_aware_norm

    nan = np.asarray(negative_aware_norm(a))
    got = np.asarray(jax.jit(memory.nan_normalized_scores)(s, nan))
    l1, cnt = a.sum(1), (a > 0).sum(1)
    want = np.where(cnt > 0, s / np.where(cnt > 0, l1 / np.maximum(cnt, 1), 1), np.finfo(np.float32).max)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="must both be"):
        memory.nan_normalized_scores(s, nan[:3])


def test_fit_tailedcore_with_injected_draws_uses_no_key_randomness(rng):
    """Every draw given (LOF projection, head and tail projections and starts, tail mask): the
    key does not matter, and each branch is the numpy greedy from the injected start."""
    f = _feats(rng, n=14)
    emb = rng.normal(size=(14, 16)).astype(np.float32)
    tail = np.zeros(14, bool)
    tail[[2, 11]] = True
    aug = rng.normal(size=(3, 6, 8)).astype(np.float32)
    proj, tproj = (rng.normal(size=(8, 4)).astype(np.float32) for _ in range(2))
    lproj = rng.normal(size=(8, 5)).astype(np.float32)
    _, keep = _oracle_lof_keep(f, lproj)
    head_start = int(np.flatnonzero(keep.reshape(-1))[7])
    draws = dict(projection=proj, lof_projection=lproj, start_index=head_start,
                 tail_projection=tproj, tail_start_index=5, tail_mask=tail,
                 augmented_tail_features=aug, ratio=0.2)
    a = memory.fit_tailedcore(jax.random.key(1), f, emb, **draws)
    b = memory.fit_tailedcore(jax.random.key(2), f, emb, **draws)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    is_tail, valid, feats = (np.asarray(v) for v in (a.is_tail, a.mask, a.features))
    tail_rows = np.concatenate([f[tail].reshape(-1, 8), aug.reshape(-1, 8)])
    want = tail_rows[ref_coreset.greedy_coreset(ref_coreset.project(tail_rows, tproj),
                                                ref_coreset.ratio_count(len(tail_rows), 0.2), 5)]
    np.testing.assert_array_equal(feats[is_tail & valid], want)
    rows = f.reshape(-1, 8)
    head = ref_coreset.greedy_coreset(ref_coreset.project(rows, proj),
                                      ref_coreset.ratio_count(int(keep.sum()), 0.2), head_start,
                                      mask=keep.reshape(-1))
    np.testing.assert_array_equal(feats[~is_tail & valid], rows[head])
    with pytest.raises(ValueError, match="not a candidate row"):
        memory.fit_tailedcore(jax.random.key(1), f, emb, **dict(
            draws, start_index=int(np.flatnonzero(~keep.reshape(-1))[0])))
