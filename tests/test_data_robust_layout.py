"""Robust dataset layouts: mask/image size mismatch, defect images without masks, empty class
folders, manifest lines naming missing files, malformed VisA CSV rows (exact messages)."""

import csv
import logging
import re

import numpy as np
import pytest
from PIL import Image

from tailedcore_jax.data.longtail import apply_manifest, nlt_train_records, read_manifest
from tailedcore_jax.data.mvtec import (
    DatasetError,
    DatasetFileNotFoundError,
    load_batch,
    mvtec_records,
    visa_records,
)


def _img(path, w=32, h=24, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path


def _mask(path, w=32, h=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((h, w), np.uint8)
    m[4:12, 4:12] = 255
    Image.fromarray(m, "L").save(path)
    return path


@pytest.fixture
def root(tmp_path):
    """alpha: train/good 000-002, test/good 000, test/crack 000-001 with masks."""
    r = tmp_path / "mvtec"
    for i in range(3):
        _img(r / f"alpha/train/good/{i:03d}.png")
    _img(r / "alpha/test/good/000.png")
    for i in range(2):
        _img(r / f"alpha/test/crack/{i:03d}.png")
        _mask(r / f"alpha/ground_truth/crack/{i:03d}_mask.png")
    return r


def _esc(*parts):
    return ".*".join(re.escape(str(p)) for p in parts)


# --------------------------------------------------------------------------------------------
# 3. mask size differs from its image
# --------------------------------------------------------------------------------------------


def test_mask_size_mismatch_names_both_files_and_sizes(root, caplog):
    mask = _mask(root / "alpha/ground_truth/crack/001_mask.png", w=31, h=24)
    image = root / "alpha/test/crack/001.png"
    want = (
        f"mask {mask} is 31x24 pixels but its image {image} is 32x24 (width x height); "
        "a mask must have the size of its image"
    )
    recs = mvtec_records(root, "test")
    # same size after resize + crop, so only the raw sizes reveal it
    with pytest.raises(DatasetError, match=re.escape(want)):
        load_batch(recs, with_masks=True, resize=16, crop=16)
    with pytest.raises(DatasetError, match=re.escape(want)):
        mvtec_records(root, "test", check_files=True)
    with caplog.at_level(logging.WARNING, logger="tailedcore_jax.data.mvtec"):
        b = load_batch(recs, with_masks=True, resize=16, crop=16, on_error="skip")
    assert b.indices.tolist() == [0, 2]
    assert any(want in m for m in caplog.messages)
    # without masks the mask is not read
    assert len(load_batch(recs, resize=16, crop=16).indices) == 3


# --------------------------------------------------------------------------------------------
# 4. defect image without a mask
# --------------------------------------------------------------------------------------------


def test_defect_image_without_mask_names_image_and_expected_mask(root):
    (root / "alpha/ground_truth/crack/001_mask.png").unlink()
    want = (
        f"mask missing for defect image {root / 'alpha/test/crack/001.png'}: expected "
        f"{root / 'alpha/ground_truth/crack/001_mask.png'} (or 001.png)"
    )
    with pytest.raises(DatasetFileNotFoundError, match=re.escape(want)):
        mvtec_records(root, "test")
    assert len(mvtec_records(root, "test", on_error="skip")) == 2
    # good images never need a mask
    assert [r.mask_path for r in mvtec_records(root, "train")] == [None] * 3


def test_missing_ground_truth_folder_is_a_dataset_error(root):
    import shutil

    shutil.rmtree(root / "alpha/ground_truth/crack")
    gt = root / "alpha/ground_truth/crack"
    with pytest.raises(DatasetError, match=_esc("ground-truth folder", gt)):
        mvtec_records(root, "test")


# --------------------------------------------------------------------------------------------
# 5. empty class folders
# --------------------------------------------------------------------------------------------


def test_empty_train_good_folder_raises_naming_it(root, caplog):
    good = root / "alpha/train/good"
    for p in good.iterdir():
        p.unlink()
    (good / ".DS_Store").write_bytes(b"x")
    (good / "notes.txt").write_text("not an image")
    want = f"no images in train/good folder of class 'alpha' {good} (looked for .png"
    with caplog.at_level(logging.WARNING, logger="tailedcore_jax.data.mvtec"):
        with pytest.raises(DatasetError, match=re.escape(want)):
            mvtec_records(root, "train")
    assert sum("notes.txt" in m and str(good) in m for m in caplog.messages) == 1
    with pytest.raises(DatasetError, match=re.escape(want)):
        mvtec_records(root, "train", on_error="skip")  # folder problems are never skipped
    with pytest.raises(DatasetError, match=re.escape(want)):
        nlt_train_records(root)
    good.rename(root / "alpha/train/other")
    want = f"train/good folder of class 'alpha' not found: {good}"
    with pytest.raises(DatasetFileNotFoundError, match=re.escape(want)):
        mvtec_records(root, "train")


def test_empty_test_folder_raises_and_empty_defect_folder_warns(root, caplog):
    (root / "alpha/test/scratch").mkdir()
    (root / "alpha/ground_truth/scratch").mkdir()
    with caplog.at_level(logging.WARNING, logger="tailedcore_jax.data.mvtec"):
        assert len(mvtec_records(root, "test")) == 3
    assert any(f"no images in {root / 'alpha/test/scratch'}" in m for m in caplog.messages)
    for p in sorted((root / "alpha/test").rglob("*.png")):
        p.unlink()
    want = f"no images in test folder of class 'alpha' (and its sub-folders) {root / 'alpha/test'}"
    with pytest.raises(DatasetError, match=re.escape(want)):
        mvtec_records(root, "test")


# --------------------------------------------------------------------------------------------
# 6. manifest lines naming missing files
# --------------------------------------------------------------------------------------------


def _manifest(tmp_path, prune, inject):
    d = tmp_path / "manifest" / "mvtecad-nlt" / "step_k1" / "seed01"
    d.mkdir(parents=True)
    (d / "prune_good.txt").write_text("".join(f"{e}\n" for e in prune))
    (d / "inject_defects.txt").write_text("".join(f"{e}\n" for e in inject))
    return d


def test_manifest_prune_line_naming_a_missing_file(tmp_path, root):
    d = _manifest(tmp_path, ["alpha/train/good/000.png", "", "alpha/train/good/007.png"], [])
    m = read_manifest(d)
    assert m.prune_lines == (1, 3) and m.directory == str(d)
    want = (
        f"{d / 'prune_good.txt'}:3: prune entry 'alpha/train/good/007.png' is not a training "
        f"image of the pristine dataset ({root / 'alpha/train/good/007.png'}: no such file)"
    )
    train, test = mvtec_records(root, "train"), mvtec_records(root, "test")
    with pytest.raises(DatasetFileNotFoundError, match=re.escape(want)):
        apply_manifest(m, train, test)
    assert len(apply_manifest(m, train, test, on_error="skip").train) == 2


def test_manifest_prune_line_naming_a_file_outside_the_records(tmp_path, root):
    d = _manifest(tmp_path, ["alpha/train/good/002.png"], [])
    train = mvtec_records(root, "train")[:2]  # the file exists but was not loaded
    want = (
        f"{d / 'prune_good.txt'}:1: prune entry 'alpha/train/good/002.png' is not a training "
        f"image of the pristine dataset ({root / 'alpha/train/good/002.png'} is not among "
        "the given records)"
    )
    with pytest.raises(DatasetError, match=re.escape(want)) as e:
        apply_manifest(read_manifest(d), train, mvtec_records(root, "test"))
    assert not isinstance(e.value, FileNotFoundError)


def test_manifest_inject_line_naming_a_missing_file(tmp_path, root):
    inject = ["alpha/train/good/crack_000.png", "alpha/train/good/crack_009.png"]
    d = _manifest(tmp_path, [], inject)
    want = (
        f"{d / 'inject_defects.txt'}:2: inject entry 'alpha/train/good/crack_009.png' copies "
        f"'alpha/test/crack/009.png', which is not in the test set "
        f"({root / 'alpha/test/crack/009.png'}: no such file)"
    )
    train, test = mvtec_records(root, "train"), mvtec_records(root, "test")
    with pytest.raises(DatasetFileNotFoundError, match=re.escape(want)):
        apply_manifest(read_manifest(d), train, test)
    d2 = _manifest(tmp_path / "b", [], ["alpha/train/good/scratch_000.png"])
    with pytest.raises(
        DatasetError,
        match=re.escape(f"{d2 / 'inject_defects.txt'}:1: cannot determine the defect type"),
    ):
        apply_manifest(read_manifest(d2), train, test)


def test_manifest_duplicates_name_both_lines_and_bom_is_ignored(tmp_path):
    d = _manifest(tmp_path, ["a/train/good/x.png", "a/train/good/y.png", "a/train/good/x.png"], [])
    with pytest.raises(
        DatasetError,
        match=re.escape(
            f"{d / 'prune_good.txt'}:3: duplicate entry 'a/train/good/x.png' (first on line 1)"
        ),
    ):
        read_manifest(d)
    (d / "prune_good.txt").write_bytes("\ufeffa/train/good/x.png\r\n".encode())
    assert read_manifest(d).prune == ("a/train/good/x.png",)


# --------------------------------------------------------------------------------------------
# 7. VisA CSV rows
# --------------------------------------------------------------------------------------------


def _visa(tmp_path, rows, encoding="utf-8"):
    r = tmp_path / "visa"
    for obj, split, label, image, mask in rows:
        if image and not image.startswith("missing"):
            _img(r / image)
        if mask and not mask.startswith("missing"):
            _mask(r / mask)
    (r / "split_csv").mkdir(parents=True)
    with open(r / "split_csv" / "1cls.csv", "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return r, r / "split_csv" / "1cls.csv"


GOOD_ROWS = [
    ["pcb1", "train", "normal", "pcb1/Normal/000.JPG", ""],
    ["pcb1", "test", "normal", "pcb1/Normal/001.JPG", ""],
    ["pcb1", "test", "anomaly", "pcb1/Anomaly/000.JPG", "pcb1/Masks/000.png"],
]


@pytest.mark.parametrize(
    "row,message",
    [
        (
            ["pcb1", "val", "normal", "pcb1/Normal/009.JPG", ""],
            "unknown split 'val' (expected 'train' or 'test')",
        ),
        (
            ["pcb1", "test", "defect", "pcb1/Anomaly/009.JPG", ""],
            "unknown label 'defect' (expected 'normal' or 'anomaly')",
        ),
        (["pcb1", "train", "normal", "", ""], "empty 'image' field"),
        (
            ["pcb1", "train", "normal", "pcb1/Normal/009.JPG", "pcb1/Masks/009.png"],
            "mask 'pcb1/Masks/009.png' given for a train normal image "
            "(only test anomalies have masks)",
        ),
        (
            ["pcb1", "test", "normal", "pcb1/Normal/000.JPG", ""],
            "image 'pcb1/Normal/000.JPG' is listed twice (first on line 2)",
        ),
    ],
)
def test_visa_bad_row_names_csv_line_and_value(tmp_path, row, message):
    r, csv_path = _visa(tmp_path, GOOD_ROWS + [row])
    # rows are checked whatever split is asked for
    for split in ("train", "test"):
        with pytest.raises(DatasetError, match=re.escape(f"{csv_path}:5: {message}")):
            visa_records(r, split)


def test_visa_split_and_label_are_case_insensitive_and_bom_is_ignored(tmp_path):
    rows = [[o, s.upper(), lab.capitalize(), i, m] for o, s, lab, i, m in GOOD_ROWS]
    r, _ = _visa(tmp_path, rows, encoding="utf-8-sig")
    assert [x.key for x in visa_records(r, "train")] == ["pcb1/train/good/000.JPG"]
    assert [(x.defect_type, x.label) for x in visa_records(r, "test")] == [("bad", 1), ("good", 0)]


def test_visa_missing_files_name_csv_line_and_path(tmp_path):
    rows = GOOD_ROWS + [
        ["pcb1", "test", "anomaly", "pcb1/Anomaly/001.JPG", ""],
        ["pcb1", "test", "anomaly", "pcb1/Anomaly/002.JPG", "missing/002.png"],
        ["pcb1", "test", "normal", "missing/003.JPG", ""],
    ]
    r, csv_path = _visa(tmp_path, rows)
    img1 = r / "pcb1/Anomaly/001.JPG"
    with pytest.raises(
        DatasetFileNotFoundError,
        match=re.escape(
            f"mask missing for defect image {img1}: the row gives no mask path ({csv_path}:5)"
        ),
    ):
        visa_records(r, "test")
    kept = visa_records(r, "test", on_error="skip")  # the three bad rows left out
    want = [str(r / p) for p in ("pcb1/Anomaly/000.JPG", "pcb1/Normal/001.JPG")]
    assert [x.path for x in kept] == want
    # each problem alone
    r2, csv2 = _visa(tmp_path / "b", GOOD_ROWS + [rows[4]])
    with pytest.raises(
        DatasetFileNotFoundError,
        match=re.escape(
            f"mask missing for defect image {r2 / 'pcb1/Anomaly/002.JPG'}: expected "
            f"{r2 / 'missing/002.png'} ({csv2}:5)"
        ),
    ):
        visa_records(r2, "test")
    r3, csv3 = _visa(tmp_path / "c", GOOD_ROWS + [rows[5]])
    with pytest.raises(
        DatasetFileNotFoundError,
        match=re.escape(f"image listed in {csv3}:5 not found: {r3 / 'missing/003.JPG'}"),
    ):
        visa_records(r3, "test")


def test_visa_undecodable_csv(tmp_path):
    r, csv_path = _visa(tmp_path, GOOD_ROWS)
    csv_path.write_bytes(b"object,split,label,image,mask\npcb1,train,normal,\xff\xfe.JPG,\n")
    with pytest.raises(DatasetError, match=re.escape(f"cannot read VisA split CSV {csv_path}")):
        visa_records(r, "train")
