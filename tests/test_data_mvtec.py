"""Tests for tailedcore_jax.data.mvtec: records, exact preprocessing, batches, bad files."""

import csv
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tailedcore_jax.data import mvtec
from tailedcore_jax.data.mvtec import (
    DatasetError,
    center_crop_offsets,
    iterate_batches,
    load_batch,
    load_image,
    load_mask,
    mvtec_records,
    preprocess_image,
    preprocess_mask,
    resized_size,
    visa_records,
)
from tests.reference import data_mvtec as ref

# --------------------------------------------------------------------------------------------
# A tiny MVTec-layout folder with odd image sizes
# --------------------------------------------------------------------------------------------


def _rand_image(rng, w, h):
    # smooth-ish content so bilinear resizing matters, plus noise
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def _blob_mask(w, h, cx, cy, r):
    y, x = np.mgrid[0:h, 0:w]
    return np.where((x - cx) ** 2 + (y - cy) ** 2 <= r * r, 255, 0).astype(np.uint8)


def _write_mvtec(root, rng):
    """bottle: PNG 300x280 (W x H); zipper: JPEG 280x301 and a grey image."""
    layout = {
        "bottle": {
            "size": (300, 280),
            "ext": ".png",
            "defects": {"broken_large": 2, "contamination": 1},
        },
        "zipper": {"size": (281, 301), "ext": ".jpg", "defects": {"rough": 2}},
    }
    for cls, s in layout.items():
        w, h = s["size"]
        for split, folder, n in (("train", "good", 3), ("test", "good", 2)):
            d = root / cls / split / folder
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_rand_image(rng, w, h)).save(d / f"{i:03d}{s['ext']}")
        for defect, n in s["defects"].items():
            d = root / cls / "test" / defect
            g = root / cls / "ground_truth" / defect
            d.mkdir(parents=True)
            g.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_rand_image(rng, w, h)).save(d / f"{i:03d}{s['ext']}")
                m = _blob_mask(w, h, 100 + 30 * i, 120, 35 + 10 * i)
                Image.fromarray(m, "L").save(g / f"{i:03d}_mask.png")
    # a greyscale training image must be converted to RGB
    Image.fromarray(_rand_image(rng, 300, 280)[:, :, 0], "L").save(
        root / "bottle/train/good/003.png"
    )
    (root / "bottle" / "train" / "good" / ".DS_Store").write_bytes(b"junk")  # not an image: ignored
    return root


@pytest.fixture
def mvtec_root(tmp_path, rng):
    return _write_mvtec(tmp_path / "mvtec", rng)


# --------------------------------------------------------------------------------------------
# Geometry of Resize(int) and CenterCrop
# --------------------------------------------------------------------------------------------


def test_resized_size_and_crop_offsets_hand_values():
    # W x H = 300 x 280: short side 280 -> 256, long int(256 * 300 / 280) = int(274.28) = 274
    assert resized_size(300, 280, 256) == (274, 256)
    assert resized_size(280, 301, 256) == (256, 275)  # int(275.2)
    assert resized_size(281, 301, 256) == (256, 274)  # int(274.22)
    assert resized_size(256, 256, 256) == (256, 256)
    assert resized_size(1000, 500, 146) == (292, 146)
    # torchvision rounds (H - crop) / 2 with Python's round (ties to even)
    assert center_crop_offsets(256, 274, 224) == (16, 25)
    assert center_crop_offsets(256, 275, 224) == (16, 26)  # round(25.5) = 26
    assert center_crop_offsets(256, 273, 224) == (16, 24)  # round(24.5) = 24
    assert center_crop_offsets(146, 147, 128) == (9, 10)  # round(9.5) = 10


@pytest.mark.parametrize(
    "wh", [(300, 280), (280, 301), (281, 301), (275, 256), (256, 256), (500, 333)]
)
@pytest.mark.parametrize("sizes", [(256, 224), (146, 128)])
def test_preprocess_image_matches_pil_numpy_reference(tmp_path, rng, wh, sizes):
    resize, crop = sizes
    p = tmp_path / "x.png"
    Image.fromarray(_rand_image(rng, *wh)).save(p)
    got = load_image(p, resize=resize, crop=crop)
    want = ref.image(p, resize, crop)
    assert got.shape == (crop, crop, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    # in-memory arrays give the same result as files (PNG is lossless)
    np.testing.assert_array_equal(
        preprocess_image(np.asarray(Image.open(p)), resize=resize, crop=crop), got
    )


def test_preprocess_image_normalisation_values():
    img = np.full((300, 280, 3), 128, np.uint8)
    x = preprocess_image(img)
    want = (np.float32(128) / np.float32(255) - ref.MEAN) / ref.STD
    np.testing.assert_array_equal(x[5, 7], want)
    raw = preprocess_image(img, normalize=False)
    np.testing.assert_array_equal(raw, np.float32(128) / np.float32(255))


def test_center_crop_pads_like_torchvision_when_image_is_small():
    img = np.full((280, 300, 3), 255, np.uint8)  # H=280 < crop=300 <= W
    x = preprocess_image(img, resize=None, crop=300, normalize=False)
    assert x.shape == (300, 300, 3)
    # pad top (300-280)//2 = 10 rows, bottom 10 rows, with zeros; width cropped at offset 0
    assert (x[:10] == 0).all() and (x[-10:] == 0).all() and (x[10:290] == 1).all()
    img2 = np.full((281, 300, 3), 255, np.uint8)
    x2 = preprocess_image(img2, resize=None, crop=300, normalize=False)
    assert (x2[:9] == 0).all() and (x2[9:290] == 1).all() and (x2[290:] == 0).all()


def test_torchvision_parity_when_available(tmp_path, rng):
    try:
        import torch
        from torchvision import transforms
    except Exception:  # noqa: BLE001 - not installed, or a torch/torchvision version mismatch
        pytest.skip("torchvision not importable")
    p = tmp_path / "x.png"
    Image.fromarray(_rand_image(rng, 300, 281)).save(p)
    t = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=ref.MEAN.tolist(), std=ref.STD.tolist()),
        ]
    )
    want = t(Image.open(p).convert("RGB")).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(load_image(p), want, rtol=0, atol=1e-6)
    del torch


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wh", [(300, 280), (281, 301)])
def test_mask_truncation_and_threshold_match_reference(tmp_path, wh):
    w, h = wh
    p = tmp_path / "m.png"
    Image.fromarray(_blob_mask(w, h, 140, 150, 47.3), "L").save(p)
    trunc = load_mask(p)
    thr = load_mask(p, binarize="threshold")
    np.testing.assert_array_equal(trunc, ref.mask(p))
    np.testing.assert_array_equal(thr, ref.mask(p, threshold=True))
    assert trunc.dtype == np.uint8 and set(np.unique(trunc)) <= {0, 1}
    # soft edges are dropped by truncation only: strictly fewer positives, all inside
    assert 0 < trunc.sum() < thr.sum()
    assert not (trunc.astype(bool) & ~thr.astype(bool)).any()
    np.testing.assert_array_equal(load_mask(p, resize=146, crop=128), ref.mask(p, 146, 128))


def test_mask_none_gives_zeros_and_bool_input():
    assert load_mask(None).shape == (224, 224) and load_mask(None).sum() == 0
    m = np.zeros((280, 300), bool)
    m[100:200, 100:200] = True
    a = preprocess_mask(m)
    b = preprocess_mask(m.astype(np.uint8) * 255)
    np.testing.assert_array_equal(a, b)


def test_non_binary_mask_raises_naming_file(tmp_path):
    p = tmp_path / "soft_mask.png"
    m = _blob_mask(64, 64, 30, 30, 10)
    m[0, 0] = 128
    Image.fromarray(m, "L").save(p)
    with pytest.raises(DatasetError, match="soft_mask.png.*not binary"):
        load_mask(p)
    # nonzero mode (VisA) accepts it
    assert load_mask(p, mask_values="nonzero", resize=64, crop=64)[0, 0] == 1


# --------------------------------------------------------------------------------------------
# Records and batches
# --------------------------------------------------------------------------------------------


def test_mvtec_records_order_labels_and_masks(mvtec_root):
    train = mvtec_records(mvtec_root, "train")
    assert [r.key for r in train] == [
        "bottle/train/good/000.png",
        "bottle/train/good/001.png",
        "bottle/train/good/002.png",
        "bottle/train/good/003.png",
        "zipper/train/good/000.jpg",
        "zipper/train/good/001.jpg",
        "zipper/train/good/002.jpg",
    ]
    assert all(r.label == 0 and r.mask_path is None and r.defect_type == "good" for r in train)
    test = mvtec_records(mvtec_root, "test")
    assert [(r.class_name, r.defect_type) for r in test] == (
        [("bottle", "broken_large")] * 2
        + [("bottle", "contamination")]
        + [("bottle", "good")] * 2
        + [("zipper", "good")] * 2
        + [("zipper", "rough")] * 2
    )
    for r in test:
        assert r.label == int(r.defect_type != "good")
        if r.label:
            stem = r.key.rsplit("/", 1)[-1].split(".")[0]
            assert r.mask_path.endswith(f"ground_truth/{r.defect_type}/{stem}_mask.png")
        else:
            assert r.mask_path is None
    assert mvtec.list_classes(mvtec_root) == ["bottle", "zipper"]
    assert [r.class_name for r in mvtec_records(mvtec_root, "test", classes=["zipper"])] == [
        "zipper"
    ] * 4


def test_load_batch_equals_reference(mvtec_root):
    test = mvtec_records(mvtec_root, "test")
    b = load_batch(test, with_masks=True)
    assert b.images.shape == (len(test), 224, 224, 3) and b.images.dtype == np.float32
    assert b.masks.shape == (len(test), 224, 224) and b.masks.dtype == np.uint8
    np.testing.assert_array_equal(b.labels, [r.label for r in test])
    np.testing.assert_array_equal(b.indices, np.arange(len(test)))
    for i, r in enumerate(test):
        np.testing.assert_array_equal(b.images[i], ref.image(r.path))
        if r.mask_path is None:
            assert b.masks[i].sum() == 0
        else:
            np.testing.assert_array_equal(b.masks[i], ref.mask(r.mask_path))
            assert b.masks[i].sum() > 0


@pytest.mark.parametrize("prefetch,threads", [(0, 1), (2, 1), (1, 2)])
def test_iterate_batches_order_sizes_and_padding(mvtec_root, prefetch, threads):
    recs = mvtec_records(mvtec_root, "test")
    full = load_batch(recs, resize=146, crop=128, with_masks=True)
    batches = list(
        iterate_batches(
            recs,
            batch_size=4,
            resize=146,
            crop=128,
            with_masks=True,
            prefetch=prefetch,
            num_threads=threads,
        )
    )
    assert [len(b.labels) for b in batches] == [4, 4, 1]
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), full.images)
    np.testing.assert_array_equal(np.concatenate([b.masks for b in batches]), full.masks)
    np.testing.assert_array_equal(
        np.concatenate([b.indices for b in batches]), np.arange(len(recs))
    )
    padded = list(
        iterate_batches(recs, batch_size=4, resize=146, crop=128, pad_last=True, prefetch=prefetch)
    )
    assert all(b.images.shape == (4, 128, 128, 3) for b in padded)
    last = padded[-1]
    np.testing.assert_array_equal(last.valid, [True, False, False, False])
    np.testing.assert_array_equal(last.indices, [8, -1, -1, -1])
    assert (last.images[1:] == 0).all()
    assert last.masks is None


def test_iterate_batches_early_break_stops_thread(mvtec_root):
    recs = mvtec_records(mvtec_root, "train") * 4
    it = iterate_batches(recs, batch_size=2, prefetch=1, resize=64, crop=56)
    first = next(it)
    assert first.images.shape == (2, 56, 56, 3)
    it.close()
    assert not any(t.name == "tailedcore-prefetch" and t.is_alive() for t in threading.enumerate())


def test_iterate_batches_bad_arguments(mvtec_root):
    recs = mvtec_records(mvtec_root, "train")
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(recs, batch_size=0)
    with pytest.raises(ValueError, match="on_error"):
        iterate_batches(recs, on_error="ignore")
    with pytest.raises(ValueError, match="crop"):
        iterate_batches(recs, crop=0)


# --------------------------------------------------------------------------------------------
# VisA
# --------------------------------------------------------------------------------------------


def _write_visa(root, rng):
    rows = []
    for obj in ("pcb1", "candle"):
        for split in ("train", "test"):
            for i in range(3 if split == "train" else 2):
                rel = f"{obj}/Data/Images/Normal/{split[:2]}{i:03d}.JPG"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_rand_image(rng, 320, 300)).save(root / rel, format="JPEG")
                rows.append([obj, split, "normal", rel, ""])
        for i in range(2):
            rel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / mrel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_rand_image(rng, 320, 300)).save(root / rel, format="JPEG")
            m = (_blob_mask(320, 300, 150, 140, 40) > 0).astype(np.uint8) * (
                i + 1
            )  # VisA: small labels
            Image.fromarray(m, "L").save(root / mrel)
            rows.append([obj, "test", "anomaly", rel, mrel])
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows[::-1])  # CSV order must not matter
    return root


def test_visa_csv_layout(tmp_path, rng):
    root = _write_visa(tmp_path / "visa", rng)
    train = visa_records(root, "train")
    assert [r.key for r in train] == [f"candle/train/good/tr{i:03d}.JPG" for i in range(3)] + [
        f"pcb1/train/good/tr{i:03d}.JPG" for i in range(3)
    ]
    test = visa_records(root, "test")
    assert [(r.class_name, r.defect_type, r.label) for r in test] == (
        [("candle", "bad", 1)] * 2
        + [("candle", "good", 0)] * 2
        + [("pcb1", "bad", 1)] * 2
        + [("pcb1", "good", 0)] * 2
    )
    assert test[0].mask_path.endswith("candle/Data/Masks/Anomaly/000.png")
    # VisA masks hold small labels: 'binary' refuses them with a hint, 'nonzero' reads them
    with pytest.raises(DatasetError, match="nonzero"):
        load_batch(test, with_masks=True)
    b = load_batch(test, with_masks=True, mask_values="nonzero")
    for i, r in enumerate(test):
        np.testing.assert_array_equal(b.images[i], ref.image(r.path))
        if r.label:
            bin_path = tmp_path / "bin.png"
            m = np.asarray(Image.open(r.mask_path))
            Image.fromarray(np.where(m > 0, 255, 0).astype(np.uint8), "L").save(bin_path)
            np.testing.assert_array_equal(b.masks[i], ref.mask(bin_path))
            assert b.masks[i].sum() > 0
    assert [r.class_name for r in visa_records(root, "test", classes=["pcb1"])] == ["pcb1"] * 4


def test_visa_converted_layout_same_order(tmp_path, rng):
    root = _write_visa(tmp_path / "visa", rng)
    conv = tmp_path / "visa_mvtec"
    for split in ("train", "test"):
        for r in visa_records(root, split):
            dst = conv / r.key
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(Path(r.path).read_bytes())
            if r.mask_path:
                m = conv / r.class_name / "ground_truth" / "bad" / (dst.stem + "_mask.png")
                m.parent.mkdir(parents=True, exist_ok=True)
                m.write_bytes(Path(r.mask_path).read_bytes())
    for split in ("train", "test"):
        a = [r.key for r in visa_records(root, split)]
        b = [r.key for r in mvtec_records(conv, split)]
        assert a == b


def test_visa_bad_csv(tmp_path):
    root = tmp_path / "v"
    (root / "split_csv").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="1cls.csv"):
        visa_records(root, "train", csv_path=root / "split_csv" / "1cls.csv")
    (root / "split_csv" / "1cls.csv").write_text("object,split,image\nx,train,a.JPG\n")
    with pytest.raises(DatasetError, match="columns"):
        visa_records(root, "train")


# --------------------------------------------------------------------------------------------
# Corrupt inputs
# --------------------------------------------------------------------------------------------


def test_missing_folders(tmp_path, mvtec_root):
    with pytest.raises(FileNotFoundError, match="dataset root"):
        mvtec_records(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match="split folder.*cable"):
        mvtec_records(mvtec_root, "train", classes=["cable"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        mvtec_records(empty, "test")
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image(tmp_path / "missing.png")


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_image_raises_naming_file(tmp_path, rng, ext):
    p = tmp_path / f"broken{ext}"
    Image.fromarray(_rand_image(rng, 120, 100)).save(p)
    _truncate(p)
    with pytest.raises(DatasetError, match=f"broken\\{ext}"):
        load_image(p)
    q = tmp_path / f"garbage{ext}"
    q.write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="garbage"):
        load_image(q)


def test_truncated_image_in_batches_raise_and_skip(mvtec_root, caplog):
    recs = mvtec_records(mvtec_root, "test")
    bad = next(i for i, r in enumerate(recs) if r.key == "bottle/test/good/001.png")
    _truncate(mvtec_root / recs[bad].key)
    with pytest.raises(DatasetError, match="bottle/test/good/001.png"):
        list(iterate_batches(recs, batch_size=4, prefetch=2))
    with pytest.raises(DatasetError, match="bottle/test/good/001.png"):
        mvtec_records(mvtec_root, "test", check_files=True)
    with caplog.at_level(logging.WARNING, logger="tailedcore_jax.data.mvtec"):
        batches = list(
            iterate_batches(recs, batch_size=4, prefetch=2, on_error="skip", with_masks=True)
        )
        checked = mvtec_records(mvtec_root, "test", check_files=True, on_error="skip")
    idx = np.concatenate([b.indices for b in batches])
    np.testing.assert_array_equal(idx, [i for i in range(len(recs)) if i != bad])
    assert [r.key for r in checked] == [r.key for i, r in enumerate(recs) if i != bad]
    assert sum("bottle/test/good/001.png" in m for m in caplog.messages) >= 2


def test_missing_mask_raise_and_skip(mvtec_root, caplog):
    (mvtec_root / "bottle/ground_truth/broken_large/001_mask.png").unlink()
    with pytest.raises(DatasetError, match="mask missing.*broken_large/001.png"):
        mvtec_records(mvtec_root, "test")
    with caplog.at_level(logging.WARNING, logger="tailedcore_jax.data.mvtec"):
        recs = mvtec_records(mvtec_root, "test", on_error="skip")
    assert "bottle/test/broken_large/001.png" not in [r.key for r in recs]
    assert len(recs) == 8
    assert any("broken_large/001.png" in m for m in caplog.messages)
    # a whole ground_truth folder missing
    import shutil

    shutil.rmtree(mvtec_root / "zipper/ground_truth/rough")
    with pytest.raises(FileNotFoundError, match="ground-truth folder.*rough"):
        mvtec_records(mvtec_root, "test", classes=["zipper"])


def test_non_binary_mask_file_in_dataset(mvtec_root, caplog):
    mp = mvtec_root / "bottle/ground_truth/contamination/000_mask.png"
    m = np.asarray(Image.open(mp)).copy()
    m[m == 255] = 200
    Image.fromarray(m, "L").save(mp)
    recs = mvtec_records(mvtec_root, "test")
    with pytest.raises(DatasetError, match="contamination/000_mask.png.*not binary"):
        load_batch(recs, with_masks=True)
    with caplog.at_level(logging.WARNING, logger="tailedcore_jax.data.mvtec"):
        b = load_batch(recs, with_masks=True, on_error="skip")
    bad = [r.key for r in recs].index("bottle/test/contamination/000.png")
    assert bad not in b.indices.tolist() and len(b.indices) == len(recs) - 1
    assert any("000_mask.png" in m for m in caplog.messages)
