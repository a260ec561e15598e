"""Tests for tailedcore_jax.data.longtail: class counts, noise counts, splits, manifests."""

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tailedcore_jax.data.longtail import (
    MVTEC_TRAIN_SIZES,
    VISA_TRAIN_SIZES,
    apply_manifest,
    build_longtail_split,
    build_pareto_split,
    build_step_split,
    class_ids,
    longtail_split,
    manifest_class_counts,
    manifest_dir,
    nlt_train_records,
    pareto_class_sizes,
    pareto_noise_counts,
    pareto_pmf,
    read_manifest,
    redistribute_class_sizes,
    step_class_sizes,
    step_noise_counts,
)
from tailedcore_jax.data.mvtec import DatasetError, ImageRecord, mvtec_records

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "manifests_small"


def _shared_manifests():
    for base in (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")):
        p = base / "data" / "tailedcore-manifests"
        if (p / "mvtecad-nlt").is_dir():
            return p
    return None


SHARED = _shared_manifests()

# MVTec AD test anomalies per class (defect images over all defect types)
MVTEC_ANOMALIES = {
    "bottle": 63,
    "cable": 92,
    "capsule": 109,
    "carpet": 89,
    "grid": 57,
    "hazelnut": 70,
    "leather": 92,
    "metal_nut": 93,
    "pill": 141,
    "screw": 119,
    "tile": 84,
    "toothbrush": 30,
    "transistor": 40,
    "wood": 60,
    "zipper": 119,
}


def _fake_records(train_sizes, anomalies, defects=("crack", "scratch_deep", "scratch")):
    """Records without files (the split builders only look at the metadata)."""
    train, test = [], []
    for c in sorted(train_sizes):
        for i in range(train_sizes[c]):
            k = f"{c}/train/good/{i:03d}.png"
            train.append(ImageRecord(f"/d/{k}", c, 0, "good", None, "train", k))
        for i in range(5):
            k = f"{c}/test/good/{i:03d}.png"
            test.append(ImageRecord(f"/d/{k}", c, 0, "good", None, "test", k))
        for i in range(anomalies.get(c, 0)):
            d = defects[i % len(defects)]
            k = f"{c}/test/{d}/{i:03d}.png"
            test.append(
                ImageRecord(
                    f"/d/{k}", c, 1, d, f"/d/{c}/ground_truth/{d}/{i:03d}_mask.png", "test", k
                )
            )
    return train, test


# --------------------------------------------------------------------------------------------
# Class sizes
# --------------------------------------------------------------------------------------------


def test_pareto_pmf_matches_scipy_definition():
    stats = pytest.importorskip("scipy.stats")
    for n in (10, 12, 15):
        x = np.linspace(stats.pareto.ppf(0.01, 6.0), stats.pareto.ppf(0.99, 6.0), n + 1)
        cdf = stats.pareto.cdf(x, 6.0)
        want = (cdf - np.concatenate([[0], cdf])[:-1])[1:]
        np.testing.assert_allclose(pareto_pmf(n, alpha=6.0), want, rtol=1e-12, atol=1e-15)
    assert np.all(np.diff(pareto_pmf(15)) < 0)


def test_pareto_counts_for_a_given_class_order_released_example():
    # the released MVTec Pareto seed01 manifest: kept normal images per class
    order = [
        "grid",
        "carpet",
        "transistor",
        "tile",
        "pill",
        "leather",
        "metal_nut",
        "toothbrush",
        "screw",
        "zipper",
        "bottle",
        "cable",
        "capsule",
        "hazelnut",
        "wood",
    ]
    want = {
        "grid": 264,
        "carpet": 160,
        "transistor": 100,
        "tile": 65,
        "pill": 43,
        "leather": 29,
        "metal_nut": 20,
        "toothbrush": 14,
        "screw": 10,
        "zipper": 7,
        "bottle": 5,
        "cable": 5,
        "capsule": 5,
        "hazelnut": 5,
        "wood": 5,
    }
    assert pareto_class_sizes(MVTEC_TRAIN_SIZES, class_order=order) == want


def test_pareto_counts_fixed_seed():
    got = pareto_class_sizes(MVTEC_TRAIN_SIZES, seed=0)
    assert got == {
        "bottle": 100,
        "cable": 5,
        "capsule": 65,
        "carpet": 5,
        "grid": 264,
        "hazelnut": 43,
        "leather": 14,
        "metal_nut": 29,
        "pill": 5,
        "screw": 5,
        "tile": 20,
        "toothbrush": 7,
        "transistor": 5,
        "wood": 10,
        "zipper": 160,
    }
    assert got == pareto_class_sizes(MVTEC_TRAIN_SIZES, rng=np.random.default_rng(0))
    # the largest-pmf class keeps all its images; everything is in [5, original]
    assert all(5 <= got[c] <= MVTEC_TRAIN_SIZES[c] for c in got)
    assert any(got[c] == MVTEC_TRAIN_SIZES[c] and got[c] == max(got.values()) for c in got)
    # best-of-n keeps the largest total
    best = pareto_class_sizes(MVTEC_TRAIN_SIZES, seed=0, n_iter=50)
    assert sum(best.values()) >= sum(got.values())


def test_redistribute_rules():
    assert redistribute_class_sizes([100, 100, 100], [0.5, 0.3, 0.01]) == [100, 60, 5]
    assert redistribute_class_sizes([100, 40, 100], [0.5, 0.3, 0.2]) == [100, 40, 40]
    assert redistribute_class_sizes([10, 100], [0.5, 0.25]) == [10, 5]  # np.round(5.0) = 5
    with pytest.raises(ValueError, match="min_count"):
        redistribute_class_sizes([5, 100], [0.5, 0.5])


@pytest.mark.parametrize("sizes,n_tail", [(MVTEC_TRAIN_SIZES, 9), (VISA_TRAIN_SIZES, 7)])
@pytest.mark.parametrize("k", [1, 4])
def test_step_counts(sizes, n_tail, k):
    kept, tail = step_class_sizes(sizes, k=k, seed=3)
    assert len(tail) == n_tail == round(len(sizes) * 0.6)
    assert all(kept[c] == k for c in tail)
    assert all(kept[c] == sizes[c] for c in sizes if c not in tail)
    assert step_class_sizes(sizes, k=k, seed=3) == (kept, tail)


def test_step_counts_fixed_seed():
    kept, tail = step_class_sizes(MVTEC_TRAIN_SIZES, k=4, seed=0)
    assert tail == (
        "bottle",
        "capsule",
        "carpet",
        "grid",
        "hazelnut",
        "metal_nut",
        "transistor",
        "wood",
        "zipper",
    )
    assert sum(kept.values()) == 9 * 4 + 224 + 245 + 267 + 320 + 230 + 60
    kept10, tail10 = step_class_sizes({f"c{i}": 40 for i in range(10)}, k=1, seed=0)
    assert len(tail10) == 6 and sum(kept10.values()) == 6 + 4 * 40
    kept_fixed, tail_fixed = step_class_sizes(
        MVTEC_TRAIN_SIZES, k=1, tail_classes=["wood", "bottle"]
    )
    assert (
        tail_fixed == ("bottle", "wood") and kept_fixed["wood"] == 1 and kept_fixed["cable"] == 224
    )


def test_noise_counts():
    head = ["carpet", "hazelnut", "leather", "toothbrush", "transistor"]
    got = step_noise_counts(MVTEC_TRAIN_SIZES, MVTEC_ANOMALIES, head, noise_ratio=0.1)
    # round(28.0), round(39.1), round(24.5) = 24 (ties to even), round(6.0), round(21.3)
    assert got == {"carpet": 28, "hazelnut": 39, "leather": 24, "toothbrush": 6, "transistor": 21}
    capped = step_noise_counts(MVTEC_TRAIN_SIZES, MVTEC_ANOMALIES, head, noise_ratio=0.4)
    assert capped["toothbrush"] == 24 and capped["transistor"] == 40  # capped by 40 anomalies
    visa = step_noise_counts(
        VISA_TRAIN_SIZES, {c: 100 for c in VISA_TRAIN_SIZES}, ["pcb1", "fryum"], noise_ratio=0.05
    )
    assert visa == {"fryum": 22, "pcb1": 45}  # round(22.5) = 22, round(45.2) = 45

    kept = {
        "grid": 264,
        "carpet": 160,
        "transistor": 100,
        "tile": 65,
        "pill": 43,
        "leather": 29,
        "metal_nut": 20,
        "toothbrush": 14,
        "screw": 10,
        "zipper": 7,
        "bottle": 5,
        "cable": 5,
        "capsule": 5,
        "hazelnut": 5,
        "wood": 5,
    }
    noise = pareto_noise_counts(kept, noise_ratio=0.1, seed=0)
    assert sum(noise.values()) == round(0.1 * 737) == 74
    assert set(noise) <= {c for c, n in kept.items() if n >= 20}
    assert noise == {
        "carpet": 24,
        "grid": 25,
        "leather": 6,
        "metal_nut": 1,
        "pill": 2,
        "tile": 8,
        "transistor": 8,
    }
    capped = pareto_noise_counts(
        kept, noise_ratio=0.1, seed=0, anomaly_counts={"grid": 3, "carpet": 200}
    )
    assert capped == {"carpet": 71, "grid": 3}  # classes without anomalies get none


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4])
def test_build_step_split(k):
    train, test = _fake_records(MVTEC_TRAIN_SIZES, MVTEC_ANOMALIES)
    split = build_step_split(train, test, k=k, seed=5)
    kept, tail = step_class_sizes(MVTEC_TRAIN_SIZES, k=k, rng=np.random.default_rng(5))
    assert split.tail_classes == tail and split.class_sizes == kept
    head = [c for c in MVTEC_TRAIN_SIZES if c not in tail]
    assert split.head_classes == tuple(sorted(head))
    assert split.noise_counts == step_noise_counts(
        MVTEC_TRAIN_SIZES, MVTEC_ANOMALIES, head, noise_ratio=0.1
    )
    counts = Counter((r.class_name, r.is_noise) for r in split.train)
    for c in MVTEC_TRAIN_SIZES:
        assert counts[(c, False)] == kept[c]
        assert counts[(c, True)] == split.noise_counts.get(c, 0)
    assert len(split.train) == sum(kept.values()) + sum(split.noise_counts.values())
    # injected images are real test defects of the same class, and stay in the test set
    test_paths = {r.path: r for r in test}
    for r in split.train:
        if r.is_noise:
            src = test_paths[r.path]
            assert (
                src.label == 1
                and src.class_name == r.class_name
                and src.defect_type == r.defect_type
            )
            assert r.key == f"{r.class_name}/train/good/{r.defect_type}_{src.key.rsplit('/', 1)[1]}"
            assert r.noise_mask_path == src.mask_path
    # official loader order: class, then train/good file names
    assert [(r.class_name, r.key.rsplit("/", 1)[1]) for r in split.train] == sorted(
        (r.class_name, r.key.rsplit("/", 1)[1]) for r in split.train
    )
    assert len({r.path for r in split.train}) == len(split.train)
    # deterministic; another seed gives another split
    again = build_step_split(train, test, k=k, seed=5)
    assert again.train == split.train
    assert build_step_split(train, test, k=k, seed=6).train != split.train
    assert longtail_split(train, test, f"step_k{k}", seed=5).train == split.train


def test_build_pareto_split():
    train, test = _fake_records(MVTEC_TRAIN_SIZES, MVTEC_ANOMALIES)
    split = build_pareto_split(train, test, seed=0)
    assert split.class_sizes == pareto_class_sizes(MVTEC_TRAIN_SIZES, seed=0)
    total = sum(split.class_sizes.values())
    assert sum(split.noise_counts.values()) == round(0.1 * total)
    assert set(split.noise_counts) <= set(split.head_classes)
    assert split.head_classes == tuple(sorted(c for c, n in split.class_sizes.items() if n >= 20))
    assert split.tail_classes == tuple(sorted(c for c, n in split.class_sizes.items() if n < 20))
    counts = Counter((r.class_name, r.is_noise) for r in split.train)
    assert all(counts[(c, False)] == n for c, n in split.class_sizes.items())
    assert build_pareto_split(train, test, seed=0).train == split.train
    assert longtail_split(train, test, "pareto", seed=0).train == split.train
    with pytest.raises(ValueError, match="unknown setting"):
        longtail_split(train, test, "zipf", seed=0)


def test_build_longtail_split_explicit_counts_and_errors():
    train, test = _fake_records({"a": 10, "b": 3}, {"a": 4, "b": 4})
    split = build_longtail_split(train, test, {"a": 6}, {"a": 2}, seed=1, head_min=5)
    assert split.class_sizes == {"a": 6, "b": 3} and split.noise_counts == {"a": 2}
    assert split.tail_classes == ("b",) and split.head_classes == ("a",)
    names, ids = class_ids(split.train)
    assert names == ("a", "b")
    np.testing.assert_array_equal(ids, [0] * 8 + [1] * 3)
    with pytest.raises(ValueError, match="only 4 test defects"):
        build_longtail_split(train, test, {}, {"a": 5}, seed=1)
    with pytest.raises(ValueError, match="keep 11 of 10"):
        build_longtail_split(train, test, {"a": 11}, {}, seed=1)
    with pytest.raises(ValueError, match="seed"):
        build_longtail_split(train, test, {}, {})


# --------------------------------------------------------------------------------------------
# Manifests: the small hand-made fixture
# --------------------------------------------------------------------------------------------


def _small_dataset():
    return _fake_small(with_files=None)


def _fake_small(with_files):
    """alpha: 6 train, test good 2 / broken 2 / broken_small 1; beta: 4 train, good 1, crack 2."""
    layout = {
        "alpha": (6, {"good": 2, "broken": 2, "broken_small": 1}),
        "beta": (4, {"good": 1, "crack": 2}),
    }
    train, test = [], []
    for c, (n_train, tests) in layout.items():
        for i in range(n_train):
            k = f"{c}/train/good/{i:03d}.png"
            train.append(ImageRecord(f"/d/{k}", c, 0, "good", None, "train", k))
        for d in sorted(tests):
            for i in range(tests[d]):
                k = f"{c}/test/{d}/{i:03d}.png"
                mp = None if d == "good" else f"/d/{c}/ground_truth/{d}/{i:03d}_mask.png"
                test.append(ImageRecord(f"/d/{k}", c, int(d != "good"), d, mp, "test", k))
    if with_files is not None:
        root = Path(with_files)
        for r in train + test:
            p = root / r.key
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), len(r.key), np.uint8)).save(p)
            if r.mask_path:
                m = root / r.class_name / "ground_truth" / r.defect_type / (p.stem + "_mask.png")
                m.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((8, 8), 255, np.uint8), "L").save(m)
    return train, test


def test_read_small_manifest_fixture():
    m = read_manifest(FIXTURES, "mvtecad-nlt", "step_k1", 1)
    assert m.prune == (
        "beta/train/good/000.png",
        "beta/train/good/001.png",
        "beta/train/good/003.png",
    )
    assert m.inject == ("alpha/train/good/broken_small_000.png", "alpha/train/good/broken_001.png")
    assert (m.dataset, m.setting, m.seed) == ("mvtecad-nlt", "step_k1", 1)
    m2 = read_manifest(FIXTURES / "mvtecad-nlt" / "step_k1" / "seed01")
    assert m2 == m
    assert manifest_dir(FIXTURES, "mvtecad-nlt", "step_k1", 1).name == "seed01"


def test_apply_small_manifest_fixture():
    train, test = _small_dataset()
    m = read_manifest(FIXTURES / "mvtecad-nlt" / "step_k1" / "seed01")
    split = apply_manifest(m, train, test)
    assert [r.key for r in split.train] == [
        "alpha/train/good/000.png",
        "alpha/train/good/001.png",
        "alpha/train/good/002.png",
        "alpha/train/good/003.png",
        "alpha/train/good/004.png",
        "alpha/train/good/005.png",
        "alpha/train/good/broken_001.png",
        "alpha/train/good/broken_small_000.png",
        "beta/train/good/002.png",
    ]
    noise = {r.key: r for r in split.train if r.is_noise}
    # the longest defect prefix wins: broken_small_000 comes from test/broken_small, not test/broken
    assert (
        noise["alpha/train/good/broken_small_000.png"].path == "/d/alpha/test/broken_small/000.png"
    )
    assert noise["alpha/train/good/broken_small_000.png"].defect_type == "broken_small"
    assert noise["alpha/train/good/broken_001.png"].path == "/d/alpha/test/broken/001.png"
    assert split.class_sizes == {"alpha": 6, "beta": 1}
    assert split.noise_counts == {"alpha": 2}
    assert split.tail_classes == ("beta",) and split.head_classes == ("alpha",)
    assert (split.setting, split.seed) == ("step_k1", 1)
    assert manifest_class_counts(m, {"alpha": 6, "beta": 4}) == (
        {"alpha": 6, "beta": 1},
        {"alpha": 2},
    )


def test_nlt_folder_matches_apply_manifest(tmp_path):
    """Build the folder as make_mvtecad_nlt.py does (copy, prune, inject) and read it back."""
    pristine = tmp_path / "pristine"
    _fake_small(with_files=pristine)
    dest = tmp_path / "nlt"
    shutil.copytree(pristine, dest)
    m = read_manifest(FIXTURES / "mvtecad-nlt" / "step_k1" / "seed01")
    for e in m.prune:
        (dest / e).unlink()
    train_d = mvtec_records(pristine, "train")
    test_d = mvtec_records(pristine, "test")
    split = apply_manifest(m, train_d, test_d)
    for r in split.train:
        if r.is_noise:
            shutil.copy(r.path, dest / r.key)
    got = nlt_train_records(dest)
    assert [(r.key, r.is_noise, r.defect_type, r.class_name) for r in got] == [
        (r.key, r.is_noise, r.defect_type, r.class_name) for r in split.train
    ]
    for a, b in zip(got, split.train):
        assert Path(a.path).read_bytes() == Path(b.path).read_bytes()
        if a.is_noise:
            assert Path(a.noise_mask_path).name == Path(b.noise_mask_path).name


def test_manifest_errors(tmp_path):
    train, test = _small_dataset()
    d = tmp_path / "m"
    d.mkdir()
    (d / "prune_good.txt").write_text("alpha/train/good/000.png\nalpha/test/good/000.png\n")
    (d / "inject_defects.txt").write_text("")
    with pytest.raises(DatasetError, match=r"prune_good.txt:2: malformed"):
        read_manifest(d)
    (d / "prune_good.txt").write_text("alpha/train/good/999.png\n")
    m = read_manifest(d)
    with pytest.raises(DatasetError, match="999.png.*not a training image"):
        apply_manifest(m, train, test)
    assert len(apply_manifest(m, train, test, on_error="skip").train) == 10
    (d / "prune_good.txt").write_text("")
    (d / "inject_defects.txt").write_text("beta/train/good/scratch_000.png\n")
    with pytest.raises(DatasetError, match="defect type.*scratch_000"):
        apply_manifest(read_manifest(d), train, test)
    (d / "inject_defects.txt").write_text("beta/train/good/crack_007.png\n")
    with pytest.raises(DatasetError, match="beta/test/crack/007.png"):
        apply_manifest(read_manifest(d), train, test)
    (d / "inject_defects.txt").write_text("a/train/good/x.png\na/train/good/x.png\n")
    with pytest.raises(DatasetError, match="duplicate"):
        read_manifest(d)
    (d / "inject_defects.txt").unlink()
    with pytest.raises(FileNotFoundError, match="inject_defects.txt"):
        read_manifest(d)
    with pytest.raises(FileNotFoundError, match="manifest directory"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(ValueError, match="setting"):
        manifest_dir(tmp_path, "mvtecad-nlt", "step_k2", 1)


# --------------------------------------------------------------------------------------------
# Manifests: the released ones (skipped when ../shared is absent)
# --------------------------------------------------------------------------------------------

# N_train (kept normal + injected images) of every released manifest, seeds 01-05, recorded
# independently of the manifest files
RELEASED_N_TRAIN = {
    ("mvtecad-nlt", "step_k1"): (1885, 1639, 1443, 1492, 1862),
    ("mvtecad-nlt", "step_k4"): (1624, 1526, 1666, 1912, 1797),
    ("mvtecad-nlt", "pareto"): (811, 659, 648, 979, 860),
    ("visa-nlt", "step_k1"): (4269, 4264, 3411, 4273, 3419),
    ("visa-nlt", "step_k4"): (4290, 3808, 4294, 3342, 3815),
    ("visa-nlt", "pareto"): (2175, 1117, 1109, 2183, 2175),
}


@pytest.mark.skipif(SHARED is None, reason="shared manifests not present")
@pytest.mark.parametrize("dataset,setting", sorted(RELEASED_N_TRAIN))
def test_released_manifests(dataset, setting):
    sizes = MVTEC_TRAIN_SIZES if dataset == "mvtecad-nlt" else VISA_TRAIN_SIZES
    ratio = 0.1 if dataset == "mvtecad-nlt" else 0.05
    n_tail = 9 if dataset == "mvtecad-nlt" else 7
    for seed in range(1, 6):
        m = read_manifest(SHARED, dataset, setting, seed)
        assert (m.dataset, m.setting, m.seed) == (dataset, setting, seed)
        kept, noise = manifest_class_counts(m, sizes)
        n_train = sum(kept.values()) + sum(noise.values())
        assert n_train == RELEASED_N_TRAIN[(dataset, setting)][seed - 1]
        if setting.startswith("step"):
            k = int(setting[-1])
            tail = [c for c in sizes if kept[c] < sizes[c]]
            assert len(tail) == n_tail and all(kept[c] == k for c in tail)
            head = [c for c in sizes if c not in tail]
            assert noise == step_noise_counts(
                sizes, {c: 10**6 for c in sizes}, head, noise_ratio=ratio
            )
        else:
            order = sorted(kept, key=lambda c: -kept[c])
            assert kept == pareto_class_sizes(sizes, class_order=order)
            assert sum(noise.values()) == round(ratio * sum(kept.values()))
            assert all(kept[c] >= 20 for c in noise)


@pytest.mark.skipif(SHARED is None, reason="shared manifests not present")
def test_released_manifest_pareto_seed01_apply():
    m = read_manifest(SHARED / "mvtecad-nlt" / "pareto" / "seed01")
    # fake pristine MVTec with the real file names of the pruned / injected entries
    train, test = [], []
    for c, n in MVTEC_TRAIN_SIZES.items():
        for i in range(n):
            k = f"{c}/train/good/{i:03d}.png"
            train.append(ImageRecord(k, c, 0, "good", None, "train", k))
    for e in m.inject:
        c, _, _, f = e.split("/")
        d, num = f.rsplit("_", 1)
        k = f"{c}/test/{d}/{num}"
        test.append(ImageRecord(k, c, 1, d, k + ".mask", "test", k))
    split = apply_manifest(m, train, test)
    assert split.class_sizes == {
        "grid": 264,
        "carpet": 160,
        "transistor": 100,
        "tile": 65,
        "pill": 43,
        "leather": 29,
        "metal_nut": 20,
        "toothbrush": 14,
        "screw": 10,
        "zipper": 7,
        "bottle": 5,
        "cable": 5,
        "capsule": 5,
        "hazelnut": 5,
        "wood": 5,
    }
    assert split.noise_counts == {
        "carpet": 20,
        "grid": 33,
        "leather": 2,
        "metal_nut": 2,
        "pill": 3,
        "tile": 4,
        "transistor": 10,
    }
    assert len(split.train) == 811
    assert split.head_classes == (
        "carpet",
        "grid",
        "leather",
        "metal_nut",
        "pill",
        "tile",
        "transistor",
    )
