"""Tests for experiments.nan_ood.train and .evaluate: optimizer, schedule, augmentation,
training, resume, BatchNorm recalibration of raw images, OOD evaluation."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import roc_auc_score

from experiments.nan_ood import evaluate as E
from experiments.nan_ood import train as T
from tailedcore_jax.models.batchnorm import recalibrate_batch_norm
from tailedcore_jax.models.resnet import resnet18_cifar
from tests.reference import train as ref

# ---------------------------------------------------------------------------- optimizer


def _sgd_run(tx, params, grads_seq):
    state = tx.init(params)
    for g in grads_seq:
        upd, state = jax.jit(tx.update)(g, state, params)
        params = optax.apply_updates(params, upd)
    return params


@pytest.mark.parametrize("nesterov", [False, True])
def test_torch_sgd_matches_reference(rng, nesterov):
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(6)]
    sched = T.lr_schedule("multistep", base_lr=0.1, epochs=3, steps_per_epoch=2, milestones=(1, 2))
    tx = T.torch_sgd(sched, momentum=0.9, weight_decay=5e-2, nesterov=nesterov)
    got = _sgd_run(tx, jax.tree_util.tree_map(jnp.asarray, params), grads)
    lrs = [float(sched(s)) for s in range(6)]
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    want = ref.torch_sgd_steps(params, grads, lrs, momentum=0.9, weight_decay=5e-2, nesterov=nesterov)
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-6)


def test_torch_sgd_matches_torch(rng):
    torch = pytest.importorskip("torch")
    w0 = rng.normal(size=(5, 2)).astype(np.float32)
    grads = [rng.normal(size=w0.shape).astype(np.float32) for _ in range(5)]
    tw = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.SGD([tw], lr=0.05, momentum=0.9, weight_decay=5e-4)
    for g in grads:
        opt.zero_grad()
        tw.grad = torch.tensor(g)
        opt.step()
    got = _sgd_run(T.torch_sgd(0.05, momentum=0.9, weight_decay=5e-4), jnp.asarray(w0), grads)
    np.testing.assert_allclose(np.asarray(got), tw.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_lr_schedules():
    ms = T.lr_schedule("multistep", base_lr=0.1, epochs=100, steps_per_epoch=3)
    for epoch in (0, 49, 50, 74, 75, 89, 90, 99):
        for s in (0, 2):
            assert float(ms(epoch * 3 + s)) == pytest.approx(ref.multistep_lr(epoch, 0.1, (50, 75, 90), 0.1), rel=1e-6)
    cos = T.lr_schedule("cosine", base_lr=0.2, epochs=4, steps_per_epoch=5)
    for s in (0, 7, 19, 20):
        assert float(cos(s)) == pytest.approx(ref.cosine_lr(s, 0.2, 20), rel=1e-5, abs=1e-7)
    with pytest.raises(ValueError, match="unknown schedule"):
        T.lr_schedule("exp", epochs=1, steps_per_epoch=1)


# ---------------------------------------------------------------------------- augmentation


def test_crop_flip_matches_reference(rng):
    x = rng.integers(0, 256, (5, 8, 6, 3)).astype(np.uint8)
    off = rng.integers(0, 9, (5, 2))
    flips = np.array([True, False, True, False, True])
    got = jax.jit(T.crop_flip, static_argnames="padding")(jnp.asarray(x), jnp.asarray(off), jnp.asarray(flips),
                                                         padding=4)
    np.testing.assert_array_equal(np.asarray(got), ref.crop_flip(x, off, flips, 4))


def test_random_crop_flip_is_a_valid_crop(rng, key):
    x = rng.integers(1, 256, (6, 5, 5, 1)).astype(np.uint8)
    got = np.asarray(jax.jit(T.random_crop_flip, static_argnames="padding")(key, jnp.asarray(x), padding=2))
    seen_offsets, seen_flips = set(), set()
    for i in range(6):
        matches = [(t, l, f) for t in range(5) for l in range(5) for f in (False, True)
                   if np.array_equal(ref.crop_flip(x[i:i + 1], [(t, l)], [f], 2)[0], got[i])]
        assert matches, f"image {i} is not a padded crop/flip of the input"
        seen_offsets.add(matches[0][:2])
        seen_flips.add(matches[0][2])
    assert len(seen_offsets) > 1  # random, not a fixed window
    again = np.asarray(T.random_crop_flip(key, jnp.asarray(x), padding=2))
    np.testing.assert_array_equal(got, again)  # same key -> same augmentation


# ---------------------------------------------------------------------------- training


def _toy_data(rng, n=48, size=12, classes=3):
    """Class = dominant colour channel, plus noise: learnable in a few steps."""
    labels = np.arange(n) % classes
    x = rng.integers(0, 90, (n, size, size, 3))
    x[np.arange(n), :, :, labels] += 150
    return np.clip(x, 0, 255).astype(np.uint8), labels.astype(np.int32)


MODEL = resnet18_cifar(num_classes=3, width=4)
KW = {"batch_size": 16, "learning_rate": 0.05, "schedule": "cosine", "progress": False}


def _mean_ce(variables, images, labels, mean, std):
    out = T.predict(MODEL, variables, images, mean=mean, std=std, taps=("logits",), batch_size=48)
    return float(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(out["logits"]), labels).mean())


def test_train_lowers_loss_and_resume_is_exact(rng, key, tmp_path):
    images, labels = _toy_data(rng)
    mean, std = T.channel_stats(images)
    kw = dict(KW, epochs=4, mean=mean, std=std)
    full = T.train_classifier(key, MODEL, images, labels, checkpoint_dir=tmp_path / "a",
                              log_path=tmp_path / "a.jsonl", **kw)
    assert [r["epoch"] for r in full.history] == [1, 2, 3, 4]
    assert int(full.state.step) == 4 * 3
    lines = [json.loads(s) for s in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert lines == full.history and set(lines[0]) == {"epoch", "step", "loss", "acc", "lr", "time"}

    init = T.init_train_state(jax.random.split(key, 3)[0], MODEL, T.torch_sgd(0.1), images)
    assert _mean_ce(full.state.variables, images, labels, mean, std) < _mean_ce(
        init.variables, images, labels, mean, std) - 0.1
    assert full.history[-1]["loss"] < full.history[0]["loss"]

    # interrupted after epoch 2, then resumed by the same call
    part = T.train_classifier(key, MODEL, images, labels, checkpoint_dir=tmp_path / "b",
                              log_path=tmp_path / "b.jsonl", stop_after_epoch=2, **kw)
    assert len(part.history) == 2 and int(part.state.step) == 6
    resumed = T.train_classifier(key, MODEL, images, labels, checkpoint_dir=tmp_path / "b",
                                 log_path=tmp_path / "b.jsonl", **kw)
    assert resumed.resumed_from_epoch == 2
    assert int(resumed.state.step) == int(full.state.step)
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                                  full.state, resumed.state)
    assert all(jax.tree_util.tree_leaves(same)), "resumed run differs from the uninterrupted one"
    got_log = [json.loads(s) for s in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in got_log] == [r["loss"] for r in full.history]

    # a checkpoint of another configuration is refused, not silently reused
    with pytest.raises(ValueError, match="different run"):
        T.train_classifier(key, MODEL, images, labels, checkpoint_dir=tmp_path / "b", **dict(kw, epochs=5))


def test_bf16_compute_keeps_float32_params(rng, key):
    images, labels = _toy_data(rng, n=16)
    res = T.train_classifier(key, MODEL, images, labels, epochs=1, compute_dtype=jnp.bfloat16, **KW)
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(res.state.params)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert np.isfinite(res.history[0]["loss"])


def test_train_bad_input(rng, key):
    images, labels = _toy_data(rng, n=8)
    with pytest.raises(ValueError, match="empty"):
        T.train_classifier(key, MODEL, images[:0], labels[:0], epochs=1, **KW)
    with pytest.raises(ValueError, match="labels must be in"):
        T.train_classifier(key, MODEL, images, labels + 3, epochs=1, **KW)
    with pytest.raises(ValueError, match="labels must have shape"):
        T.train_classifier(key, MODEL, images, labels[:3], epochs=1, **KW)
    with pytest.raises(ValueError, match="epochs"):
        T.train_classifier(key, MODEL, images, labels, epochs=0, **KW)


def test_epoch_indices_cover_every_sample(key):
    idx = T.epoch_indices(key, 3, 10, 4)
    assert idx.shape == (3, 4)
    assert set(idx.reshape(-1).tolist()) == set(range(10))
    np.testing.assert_array_equal(idx, T.epoch_indices(key, 3, 10, 4))
    assert not np.array_equal(idx, T.epoch_indices(key, 4, 10, 4))


def test_recalibrate_raw_images_is_the_weighted_average_of_batch_statistics(rng, key):
    """The NAN experiment's label-free path: uint8 images normalised inside the forward,
    batches of unequal size (4, 4, 2) weighted by their size."""
    model = resnet18_cifar(num_classes=None, width=4)
    images = rng.integers(0, 256, (10, 8, 8, 3)).astype(np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    v = model.init(key, jnp.zeros((1, 8, 8, 3)))
    normalize = functools.partial(T.normalize_images, mean=mean, std=std)
    new = recalibrate_batch_norm(model, v, images, batch_size=4, preprocess=normalize)
    # independent computation of the first BN's input: conv1 on the normalised images
    x = (images.astype(np.float32) / 255.0 - np.float32(0.5)) / np.float32(0.25)
    k = np.asarray(v["params"]["conv1"]["kernel"])
    conv = np.asarray(jax.lax.conv_general_dilated(
        jnp.asarray(x), jnp.asarray(k), (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST))
    blocks = [conv[s:s + 4] for s in (0, 4, 8)]
    w = np.array([len(b) for b in blocks], np.float64)
    want_mean = sum(wi * b.mean((0, 1, 2)) for wi, b in zip(w, blocks)) / w.sum()
    want_var = sum(wi * b.var((0, 1, 2)) for wi, b in zip(w, blocks)) / w.sum()
    np.testing.assert_allclose(np.asarray(new["batch_stats"]["bn1"]["mean"]), want_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new["batch_stats"]["bn1"]["var"]), want_var, rtol=1e-4, atol=1e-5)
    # the same as normalising first and recalibrating the float images
    pre = recalibrate_batch_norm(model, v, np.asarray(normalize(images)), batch_size=4)
    for a, b in zip(jax.tree_util.tree_leaves(new["batch_stats"]),
                    jax.tree_util.tree_leaves(pre["batch_stats"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        recalibrate_batch_norm(model, v, images[:0], preprocess=normalize)


# ---------------------------------------------------------------------------- OOD evaluation


def _sets(rng, d=16, k=3):
    tr = np.maximum(rng.normal(0.5, 1.0, (40, d)), 0).astype(np.float32)
    idf = np.maximum(rng.normal(0.5, 1.0, (20, d)), 0).astype(np.float32)
    oodf = np.maximum(rng.normal(-0.3, 1.0, (25, d)), 0).astype(np.float32)
    oodf[0] = 0.0  # an all-inactive row: NAN 0, combinations at the lowest finite score
    lg = lambda n: rng.normal(size=(n, k)).astype(np.float32)
    return tr, {"ID": (idf, lg(20)), "far": (oodf, lg(25))}


def test_ood_method_scores_and_metrics(rng, key):
    tr, sets = _sets(rng)
    labels = np.arange(40) % 3
    scores = E.ood_method_scores(key, tr, sets, train_labels=labels, num_classes=3, knn_k=5)
    assert tuple(scores) == E.OOD_METHODS
    np.testing.assert_allclose(scores["NAN"]["far"], ref.nan_score(sets["far"][0]), rtol=1e-6)
    np.testing.assert_allclose(scores["FeatureNorm"]["ID"], np.abs(sets["ID"][0]).sum(1), rtol=1e-5)
    assert scores["NAN+KNN"]["far"][0] == -np.finfo(np.float32).max  # most OOD, still finite
    metrics = E.ood_metrics(scores, "ID")
    for m in E.OOD_METHODS:
        s_id, s_ood = scores[m]["ID"], np.where(np.isneginf(scores[m]["far"]), -1e30, scores[m]["far"])
        want = roc_auc_score(np.r_[np.ones(20), np.zeros(25)], np.r_[s_id, s_ood])
        assert metrics[m]["far"]["auroc"] == pytest.approx(100 * want, abs=1e-3)
        thr = np.sort(s_id)[::-1][int(np.ceil(0.95 * 20)) - 1]
        assert metrics[m]["far"]["fpr"] == pytest.approx(100 * np.mean(s_ood >= thr), abs=1e-3)
        assert metrics[m]["average"] == metrics[m]["far"]
    # label-free: only feature scores
    lf = E.ood_method_scores(key, tr, {n: (f, None) for n, (f, _) in sets.items()}, knn_k=5)
    assert tuple(lf) == E.LABEL_FREE_METHODS


def test_ood_eval_bad_input(rng, key):
    tr, sets = _sets(rng)
    bad = dict(sets, ID=(sets["ID"][0], np.full((20, 3), np.nan, np.float32)))
    with pytest.raises(ValueError, match="ID: logits contain NaN"):
        E.ood_method_scores(key, tr, bad)
    with pytest.raises(ValueError, match="far: features must be a non-empty"):
        E.ood_method_scores(key, tr, dict(sets, far=(sets["far"][0][:0], None)))
    with pytest.raises(ValueError, match="train_features must be a non-empty"):
        E.ood_method_scores(key, tr[:0], sets)
    with pytest.raises(ValueError, match="needs logits"):
        E.ood_method_scores(key, tr, {n: (f, None) for n, (f, _) in sets.items()}, methods=["MSP"])
    with pytest.raises(ValueError, match="unknown method"):
        E.ood_method_scores(key, tr, sets, methods=["ODIN"])
    scores = E.ood_method_scores(key, tr, sets, methods=["NAN"])
    with pytest.raises(ValueError, match="no OOD set"):
        E.ood_metrics({"NAN": {"ID": scores["NAN"]["ID"]}}, "ID")
    with pytest.raises(ValueError, match="no scores for the ID set"):
        E.ood_metrics(scores, "test")


def test_react_percentile_is_a_fraction(rng, key):
    tr, sets = _sets(rng)
    got = E.ood_method_scores(key, tr, sets, methods=["NAN+ReAct"], react_percentile=0.8)
    c = np.quantile(tr.reshape(-1), 0.8)
    np.testing.assert_allclose(got["NAN+ReAct"]["ID"], ref.nan_score(np.minimum(sets["ID"][0], c)),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="fraction"):
        E.ood_method_scores(key, tr, sets, methods=["NAN+ReAct"], react_percentile=90.0)
