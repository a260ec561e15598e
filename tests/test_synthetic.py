"""Tests for tailedcore_jax.data.synthetic: determinism, classes, defect masks, splits, disk round trip."""

import hashlib
import time
from collections import Counter

import numpy as np
import pytest

from tailedcore_jax.data.longtail import nlt_train_records
from tailedcore_jax.data.mvtec import load_batch, mvtec_records, preprocess_images, preprocess_masks
from tailedcore_jax.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_DEFECTS,
    SYNTHETIC_OBJECTS,
    SYNTHETIC_TEXTURES,
    make_synthetic,
    synthetic_class_sizes,
    synthetic_image,
    write_synthetic,
)

SMALL = {
    "class_sizes": {"cap": 20, "stripes": 4, "gear": 1},
    "classes": ("cap", "stripes", "gear"),
    "n_test_good": 2,
    "n_test_per_defect": 1,
}


def _digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small():
    return make_synthetic(3, **SMALL)


def test_class_inventory():
    assert len(SYNTHETIC_CLASSES) >= 10
    assert set(SYNTHETIC_TEXTURES) | set(SYNTHETIC_OBJECTS) == set(SYNTHETIC_CLASSES)
    assert len(SYNTHETIC_TEXTURES) >= 5 and len(SYNTHETIC_OBJECTS) >= 5
    assert {"scratch", "hole", "stain", "missing_part", "contamination"} <= set(SYNTHETIC_DEFECTS)


def test_image_determinism_and_variation():
    a, ma = synthetic_image("gear", seed=1, index=4)
    b, mb = synthetic_image("gear", seed=1, index=4)
    assert a.dtype == np.uint8 and a.shape == (256, 256, 3) and ma.shape == (256, 256)
    assert _digest(a, ma) == _digest(b, mb)
    assert ma.max() == 0  # good image: empty mask
    others = [
        synthetic_image("gear", seed=2, index=4)[0],
        synthetic_image("gear", seed=1, index=5)[0],
        synthetic_image("gear", seed=1, index=4, split="test")[0],
    ]
    for o in others:
        assert not np.array_equal(a, o)
    # natural variation within a class stays far below the difference between classes
    same = [synthetic_image("stripes", seed=0, index=i)[0].reshape(-1, 3).mean(0) for i in range(4)]
    other = synthetic_image("checker", seed=0, index=0)[0].reshape(-1, 3).mean(0)
    spread = max(np.abs(s - same[0]).max() for s in same)
    assert 0 < spread < np.abs(other - same[0]).max()


def test_classes_are_distinct_in_colour():
    means = np.stack(
        [
            synthetic_image(c, seed=0, index=0)[0].reshape(-1, 3).astype(float).mean(0)
            for c in SYNTHETIC_CLASSES
        ]
    )
    d = np.abs(means[:, None] - means[None]).sum(-1) + np.eye(len(means)) * 1e9
    assert d.min() > 25  # every pair of classes differs in mean colour


@pytest.mark.parametrize("cls", SYNTHETIC_CLASSES)
def test_defect_masks_nonempty_and_aligned(cls):
    for defect in SYNTHETIC_DEFECTS:
        img, mask = synthetic_image(cls, seed=11, split="test", index=2, defect=defect)
        clean, _ = synthetic_image(cls, seed=11, split="test", index=2, variant=defect)
        m = mask > 0
        assert set(np.unique(mask)) == {0, 255}
        assert m.sum() >= 20, (cls, defect)
        diff = np.abs(img.astype(int) - clean.astype(int)).max(-1)
        # the defect changed nothing outside its mask, and most of the mask visibly
        assert not (diff > 0)[~m].any(), (cls, defect)
        assert (diff[m] > 8).mean() > 0.5, (cls, defect, (diff[m] > 8).mean())
        # inside the centre-crop window (256 -> 224 crop has a 16 px margin)
        ys, xs = np.nonzero(m)
        assert ys.min() >= 16 and xs.min() >= 16 and ys.max() < 240 and xs.max() < 240
        assert preprocess_masks(mask[None])[0].sum() > 0  # survives resize + crop + truncation


def test_setting_sizes():
    p = synthetic_class_sizes("pareto", seed=0)
    assert sorted(p.values(), reverse=True) == [60, 40, 30, 20, 12, 8, 5, 3, 2, 1]
    assert set(p) == set(SYNTHETIC_CLASSES)
    assert synthetic_class_sizes("pareto", seed=1) != p  # class order shuffled by the seed
    assert synthetic_class_sizes("pareto", seed=0) == p
    assert sorted(synthetic_class_sizes("step_k4", seed=0).values()) == [4] * 6 + [40] * 4
    assert sorted(synthetic_class_sizes("step_k1", seed=0).values()) == [1] * 6 + [40] * 4
    assert set(synthetic_class_sizes("balanced").values()) == {30}
    with pytest.raises(ValueError, match="setting"):
        synthetic_class_sizes("zipf")


def test_make_synthetic_small_split(small):
    d = small
    assert d.class_names == ("cap", "gear", "stripes")
    assert d.class_sizes == {"cap": 20, "gear": 1, "stripes": 4}
    assert d.noise_counts == {"cap": 2}  # round(0.1 * 20); only classes with >= 20 images
    assert d.head_classes == ("cap",) and d.tail_classes == ("gear", "stripes")
    n_train = 20 + 2 + 1 + 4
    assert d.train_images.shape == (n_train, 256, 256, 3) and d.train_images.dtype == np.uint8
    assert d.train_is_noise.sum() == 2
    counts = Counter(d.class_names[i] for i in d.train_class)
    assert counts == {"cap": 22, "gear": 1, "stripes": 4}
    for key, cid in zip(d.train_keys, d.train_class):
        assert key.split("/")[0] == d.class_names[cid]
    # order: class, then sorted file names (normal NNN.png first, injected <defect>_NNN.png after)
    assert list(d.train_keys) == sorted(d.train_keys)
    assert (
        d.train_keys[20].startswith("cap/train/good/") and "_" in d.train_keys[20].rsplit("/", 1)[1]
    )
    # test set: 2 good + 1 per defect type per class; masks only on defects
    assert d.test_images.shape == (3 * 7, 256, 256, 3)
    assert (d.test_labels == np.array([t != "good" for t in d.test_defect_types])).all()
    assert all(
        (d.test_masks[i] > 0).any() == bool(d.test_labels[i]) for i in range(len(d.test_labels))
    )
    # overlap protocol: each injected image is one of the class's test defects, unchanged
    test_by_key = dict(zip(d.test_keys, d.test_images))
    for key, img, noisy in zip(d.train_keys, d.train_images, d.train_is_noise):
        if noisy:
            cls, _, _, fname = key.split("/")
            defect, num = fname.rsplit("_", 1)
            np.testing.assert_array_equal(img, test_by_key[f"{cls}/test/{defect}/{num}"])


def test_make_synthetic_deterministic(small):
    again = make_synthetic(3, **SMALL)
    assert _digest(small.train_images, small.test_images, small.test_masks) == _digest(
        again.train_images, again.test_images, again.test_masks
    )
    assert again.train_keys == small.train_keys
    # per-image seeding: a class generated alone gives the same arrays
    alone = make_synthetic(
        3, class_sizes={"stripes": 4}, classes=("stripes",), n_test_good=2, n_test_per_defect=1
    )
    sel = np.asarray([k.startswith("stripes/") for k in small.train_keys])
    np.testing.assert_array_equal(alone.train_images, small.train_images[sel])
    other = make_synthetic(4, **SMALL)
    assert not np.array_equal(other.test_images, small.test_images)


def test_write_and_read_back(tmp_path, small):
    root = write_synthetic(tmp_path / "syn", small)
    test = mvtec_records(root, "test")
    assert tuple(r.key for r in test) == small.test_keys
    b = load_batch(test, resize=146, crop=128, with_masks=True)
    np.testing.assert_array_equal(
        b.images, preprocess_images(small.test_images, resize=146, crop=128)
    )
    np.testing.assert_array_equal(b.masks, preprocess_masks(small.test_masks, resize=146, crop=128))
    np.testing.assert_array_equal(b.labels, small.test_labels)
    train = nlt_train_records(root)
    assert tuple(r.key for r in train) == small.train_keys
    assert [r.is_noise for r in train] == small.train_is_noise.tolist()
    assert [small.class_names.index(r.class_name) for r in train] == small.train_class.tolist()
    tb = load_batch(train, resize=None, crop=None, normalize=False)
    np.testing.assert_array_equal(np.rint(tb.images * 255).astype(np.uint8), small.train_images)
    assert (tb.labels == 0).all()  # the training loader never sees the noise flag


def test_full_default_dataset():
    t0 = time.perf_counter()
    d = make_synthetic(0)
    elapsed = time.perf_counter() - t0
    assert len(d.class_names) == 10
    assert sorted(d.class_sizes.values(), reverse=True) == [60, 40, 30, 20, 12, 8, 5, 3, 2, 1]
    assert sorted(d.noise_counts.values(), reverse=True) == [6, 4, 3, 2]
    assert len(d.train_images) == 181 + 15 and int(d.train_is_noise.sum()) == 15
    assert len(d.test_images) == 10 * (12 + 3 * 5) == 270
    assert set(d.tail_classes) == {c for c, n in d.class_sizes.items() if n < 20}
    print(
        f"make_synthetic(0): {elapsed:.1f} s for {len(d.train_images) + len(d.test_images)} arrays"
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown class"):
        synthetic_image("teapot", seed=0)
    with pytest.raises(ValueError, match="unknown defect"):
        synthetic_image("cap", seed=0, defect="dent")
    with pytest.raises(ValueError, match="classes"):
        make_synthetic(0, classes=("teapot",))
    with pytest.raises(ValueError, match="noise_ratio"):
        make_synthetic(0, noise_ratio=1.5)
