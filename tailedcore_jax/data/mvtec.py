"""MVTec AD and VisA folder datasets: records, torchvision-exact preprocessing, batches.

Host-side module (NumPy + PIL only; nothing here is traced by JAX).

* **Records.** :func:`mvtec_records` lists an MVTec-layout folder
  (``<root>/<class>/{train,test}/<defect>/*``, masks in
  ``<root>/<class>/ground_truth/<defect>/<stem>_mask.png``); :func:`visa_records` reads VisA
  in its original layout through its split CSV (``split_csv/1cls.csv``). VisA converted to
  MVTec layout by the official ``convert_visa_to_mvtec_format.py`` (normal -> ``good``,
  anomaly -> ``bad``) is read by :func:`mvtec_records`. Both follow the order of the official
  ``MVTecDataset.get_image_data``: classes, defect folders and file names sorted.
* **Preprocessing.** Port of ``MVTecDataset.transform_img`` / ``transform_mask`` in
  jungyg/TailedCore ``src/datasets/mvtec.py``: torchvision ``Resize(resize)`` (shorter side,
  PIL bilinear), ``CenterCrop(crop)``, ``ToTensor``, ImageNet ``Normalize``; NHWC float32.
  Masks take the same resize and crop and are binarised as the official ``main.py`` does
  (``uint8`` cast of the ``[0, 1]`` mask) or, optionally, with ``> 0.5``.
* **Batches.** :func:`load_batch` (all in memory) and :func:`iterate_batches` (a prefetching
  thread with a bounded queue).

What is checked in the files, and what is converted:

* **Decoding.** A file is read into memory and decoded completely inside one ``try``; PNG
  chunk CRCs are checked (``Image.verify``) and a PNG without its ``IEND`` chunk counts as
  truncated. Reading refuses to run while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is True
  (PIL would then return truncated files partially decoded). JPEG, BMP and TIFF carry no
  checksum: corrupted bytes that still decode cannot be detected.
* **Image modes -> RGB** (:func:`read_image`, and PIL images given to
  :func:`preprocess_image`): ``L`` -> R = G = B = the grey value (``1`` gives 0 / 255; PIL
  scales 1/2/4-bit grey PNGs to 0..255); ``P`` -> the palette colours; ``RGBA``, ``LA``,
  ``PA``, ``RGBX`` -> the fourth / second channel is **dropped** (colours kept as stored,
  not composited), as the official ``Image.convert("RGB")`` does; 16-bit grey (``I;16``,
  ``I;16B``, ``I;16L``, ``I;16N``, and ``I`` holding values in [0, 65535]) -> ``v >> 8``,
  then replicated (PIL's ``convert`` would clip at 255; PIL itself reads 16-bit RGB, RGBA
  and LA PNGs by the same ``>> 8``). Any other mode (``CMYK``, ``YCbCr``, ``F``, ...) raises.
* **Mask modes** (:func:`read_mask`): ``1`` -> 0 / 255; ``L`` and ``P`` -> the stored values
  (for ``P`` the palette *indices*, which is what the official loader reads, not colours);
  ``LA``, ``PA``, ``RGBA``, ``RGBX`` -> the extra channel is dropped; ``RGB`` -> with
  ``mask_values="binary"`` the channels must be equal (grey stored as colour), with
  ``"nonzero"`` a pixel with any nonzero channel is a defect; 16-bit (``I;16*``, ``I``) ->
  with ``"binary"`` only 0 and 65535 are allowed (read as 0 / 255), with ``"nonzero"`` any
  nonzero value is a defect. With ``"binary"`` (default) any value other than 0 / full
  scale raises; ``"nonzero"`` (VisA, whose masks hold small labels) maps nonzero to 255.
* **Consistency.** A mask whose size differs from its image's, a defect image without a
  mask, a class without images in ``train/good`` (or without any test image), and a VisA CSV
  row with an unknown split or label raise.

Errors: every problem raises :class:`DatasetError` (a ``ValueError``) whose message names the
offending path; missing files and folders raise :class:`DatasetFileNotFoundError`, which is
both a ``DatasetError`` and a ``FileNotFoundError``, so a driver can catch ``DatasetError``
alone. With ``on_error="skip"``, a problem with one image (unreadable, missing or bad mask,
size mismatch, missing ground-truth folder) is logged (logger ``tailedcore_jax.data.mvtec``,
WARNING) and the item left out (``Batch.indices`` keeps the original positions); missing or
empty dataset folders and malformed CSV rows always raise.

References:
    Jung et al., "TailedCore: Few-Shot Sampling for Unsupervised Long-Tail Noisy Anomaly
    Detection", CVPR 2025; official code jungyg/TailedCore (``src/datasets/mvtec.py``,
    ``convert_visa_to_mvtec_format.py``). Bergmann et al., "MVTec AD", CVPR 2019. Zou et al.,
    "SPot-the-Difference ... (VisA)", ECCV 2022.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, ImageFile

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "Batch",
    "DatasetError",
    "DatasetFileNotFoundError",
    "ImageRecord",
    "center_crop_offsets",
    "find_mask",
    "iterate_batches",
    "list_classes",
    "load_batch",
    "load_image",
    "require_images",
    "load_mask",
    "mvtec_records",
    "preprocess_image",
    "preprocess_images",
    "preprocess_mask",
    "preprocess_masks",
    "read_image",
    "read_mask",
    "resized_size",
    "visa_records",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MEAN32 = np.asarray(IMAGENET_MEAN, np.float32)
_STD32 = np.asarray(IMAGENET_STD, np.float32)

OnError = Literal["raise", "skip"]
Binarize = Literal["truncate", "threshold"]
MaskValues = Literal["binary", "nonzero"]


class DatasetError(ValueError):
    """A dataset file, folder or list is unusable; the message names the path and the problem."""


class DatasetFileNotFoundError(DatasetError, FileNotFoundError):
    """A dataset file or folder does not exist (both a DatasetError and a FileNotFoundError)."""


class ImageRecord(NamedTuple):
    """One image of a folder dataset.

    Attributes:
        path: absolute (or root-joined) path of the image file.
        class_name: product class (folder name / VisA ``object``).
        label: 0 for good, 1 for defect.
        defect_type: ``"good"`` or the defect folder name (VisA original layout: ``"bad"``).
        mask_path: ground-truth mask file, ``None`` for good images.
        split: ``"train"`` or ``"test"``.
        key: the image's path relative to the dataset root in MVTec layout,
            ``"<class>/<split>/<defect_type>/<file name>"`` (the form the official long-tail
            manifests use).
    """

    path: str
    class_name: str
    label: int
    defect_type: str
    mask_path: str | None
    split: str
    key: str


class Batch(NamedTuple):
    """A batch of preprocessed images (NHWC).

    Attributes:
        images: ``(B, crop, crop, 3)`` float32, normalised.
        masks: ``(B, crop, crop)`` uint8 in {0, 1} (all zero for good images), or ``None``
            when masks were not requested.
        labels: ``(B,)`` int32, 0 good / 1 defect (``record.label``; 0 if absent).
        indices: ``(B,)`` int64 positions of the items in the record sequence given.
        valid: ``(B,)`` bool; False only for padding rows (``pad_last=True``).
    """

    images: np.ndarray
    masks: np.ndarray | None
    labels: np.ndarray
    indices: np.ndarray
    valid: np.ndarray


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _problem(message: str, on_error: str, exc_type=DatasetError) -> None:
    """Raise ``exc_type(message)``, or with ``on_error="skip"`` log it as a warning."""
    if on_error == "raise":
        raise exc_type(message)
    logger.warning("skipping: %s", message)


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_images(folder: Path) -> list[str]:
    """Sorted image file names in ``folder``; other non-hidden files are logged and ignored."""
    names = sorted(os.listdir(folder))
    ignored = [f for f in names if not _is_image_file(f) and not f.startswith(".")]
    ignored = [f for f in ignored if (folder / f).is_file()]
    if ignored:
        logger.warning(
            "ignoring %d file(s) without an image extension %s in %s (e.g. %s)",
            len(ignored),
            IMAGE_EXTENSIONS,
            folder,
            ignored[:3],
        )
    return [f for f in names if _is_image_file(f)]


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetFileNotFoundError(f"{what} not found: {path}")


def _no_images(folder: Path, what: str) -> DatasetError:
    return DatasetError(f"no images in {what} {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")


def require_images(folder: Path, what: str) -> list[str]:
    """Image names of ``folder``; the folder must exist and hold at least one image."""
    _require_dir(folder, what)
    files = _list_images(folder)
    if not files:
        raise _no_images(folder, what)
    return files


def list_classes(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class folders of an MVTec-layout dataset.

    A class folder is a sub-folder of ``root`` that contains ``train`` or ``test``.

    Raises:
        DatasetFileNotFoundError: ``root`` does not exist or holds no class folder.
    """
    root = Path(root)
    _require_dir(root, "dataset root")
    names = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir())
    )
    if not names:
        raise DatasetFileNotFoundError(f"no class folders (with train/ or test/) under {root}")
    return names


def find_mask(gt_dir: Path, stem: str) -> Path | None:
    """The ground-truth mask of image ``stem`` in ``gt_dir`` (``<stem>_mask.png`` as in MVTec AD,
    or ``<stem>.png``), or None."""
    for cand in (f"{stem}_mask.png", f"{stem}.png"):
        p = gt_dir / cand
        if p.is_file():
            return p
    return None


def mvtec_records(
    root: str | os.PathLike,
    split: Literal["train", "test"],
    *,
    classes: Sequence[str] | None = None,
    on_error: OnError = "raise",
    check_files: bool = False,
) -> list[ImageRecord]:
    """Records of an MVTec-layout folder, in the official loader's order.

    Order: classes sorted, then defect folders sorted (``good`` among them), then file names
    sorted (``MVTecDataset.get_image_data`` + ``ConcatDataset`` over sorted classes in
    jungyg/TailedCore). Masks are paired by name: ``ground_truth/<defect>/<stem>_mask.png``
    (MVTec, converted VisA), falling back to ``<stem>.png``.

    Args:
        root: dataset root.
        split: ``"train"`` or ``"test"``.
        classes: class names to use (default: all class folders, sorted).
        on_error: ``"raise"`` or ``"skip"`` (log a warning and leave the item out).
        check_files: also decode every image and mask now (slow: reads everything once), to
            catch unreadable files, bad masks and image/mask size mismatches before any
            batch is built.

    Returns:
        list of :class:`ImageRecord`.

    Raises:
        DatasetFileNotFoundError: missing root, class, split or ``train/good`` folder
            (always), a defect folder without its ``ground_truth`` folder, a defect image
            without its mask (these two only with ``on_error="raise"``).
        DatasetError: a ``train/good`` folder, or a class's whole ``test`` folder, without
            images (always); with ``check_files``, what :func:`read_image` and
            :func:`read_mask` raise, and an image/mask size mismatch.
        ValueError: bad ``split`` / ``on_error``.
    """
    _check_split(split)
    _check_on_error(on_error)
    root = Path(root)
    _require_dir(root, "dataset root")
    class_names = list(classes) if classes is not None else list_classes(root)
    records: list[ImageRecord] = []
    for cls in sorted(class_names):
        records.extend(_class_records(root, cls, split, on_error))
    if check_files:
        records = _check_record_files(records, on_error=on_error, mask_values="binary")
    return records


def _class_records(root: Path, cls: str, split: str, on_error: str) -> list[ImageRecord]:
    """Records of one class and split; checks that the folders exist and hold images."""
    split_dir = root / cls / split
    _require_dir(split_dir, f"split folder of class {cls!r}")
    defects = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    listed = {d: _list_images(split_dir / d) for d in defects}
    if split == "train" and not listed.get("good"):
        what = f"train/good folder of class {cls!r}"
        _require_dir(split_dir / "good", what)
        raise _no_images(split_dir / "good", what)
    if not any(listed.values()):
        raise _no_images(split_dir, f"test folder of class {cls!r} (and its sub-folders)")
    records: list[ImageRecord] = []
    for defect, files in listed.items():
        if not files:
            logger.warning("no images in %s (class %r)", split_dir / defect, cls)
        records.extend(_defect_records(root, cls, split, defect, files, on_error))
    return records


def _defect_records(root, cls, split, defect, files, on_error) -> list[ImageRecord]:
    """Records of the images ``files`` of ``<root>/<cls>/<split>/<defect>``, masks paired."""
    folder = root / cls / split / defect
    needs_mask = split == "test" and defect != "good"
    gt_dir = root / cls / "ground_truth" / defect
    if needs_mask and not gt_dir.is_dir():
        _problem(
            f"ground-truth folder for defect {defect!r} of class {cls!r} not found: {gt_dir} "
            f"(needed by the {len(files)} images in {folder})",
            on_error,
            DatasetFileNotFoundError,
        )
        return []
    records = []
    for fname in files:
        img_path = folder / fname
        mask_path = None
        if needs_mask:
            stem = os.path.splitext(fname)[0]
            mask_path = find_mask(gt_dir, stem)
            if mask_path is None:
                _problem(
                    f"mask missing for defect image {img_path}: expected "
                    f"{gt_dir / (stem + '_mask.png')} (or {stem}.png)",
                    on_error,
                    DatasetFileNotFoundError,
                )
                continue
        records.append(
            ImageRecord(
                path=str(img_path),
                class_name=cls,
                label=0 if defect == "good" else 1,
                defect_type=defect,
                mask_path=None if mask_path is None else str(mask_path),
                split=split,
                key=f"{cls}/{split}/{defect}/{fname}",
            )
        )
    return records


# --------------------------------------------------------------------------------------------
# VisA split CSV
# --------------------------------------------------------------------------------------------

_VISA_COLUMNS = ("object", "split", "label", "image", "mask")


class _VisaRow(NamedTuple):
    object: str
    split: str  # "train" | "test"
    label: str  # "normal" | "anomaly"
    image: str
    mask: str
    line: int


def visa_records(
    root: str | os.PathLike,
    split: Literal["train", "test"],
    *,
    csv_path: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    on_error: OnError = "raise",
    check_files: bool = False,
) -> list[ImageRecord]:
    """Records of VisA in its original layout, from its split CSV.

    The CSV (default ``<root>/split_csv/1cls.csv``) has the columns
    ``object,split,label,image,mask`` with paths relative to ``root``. Every row is checked
    when the CSV is read (see :func:`_parse_visa_row`). Labels map as the official converter
    does: normal -> ``good``, anomaly -> ``bad``; records are ordered as :func:`mvtec_records`
    orders the converted folder (class, then ``bad`` before ``good``, then file name), so both
    layouts give the same sequence. ``key`` is ``"<object>/<split>/<good|bad>/<file name>"``.

    VisA masks are not 0/255 (they hold small nonzero values); load them with
    ``mask_values="nonzero"``.

    Raises:
        DatasetFileNotFoundError: missing root or CSV (always); a listed image or mask file
            that does not exist, or a test anomaly row without a mask path (these only with
            ``on_error="raise"``).
        DatasetError: an unreadable CSV, missing columns, or a row with an unknown split or
            label, an empty field, a mask on a row that is not a test anomaly, or an image
            listed twice (always; the message names the CSV and the line); with
            ``check_files``, what :func:`read_image` / :func:`read_mask` raise.
    """
    _check_split(split)
    _check_on_error(on_error)
    root = Path(root)
    _require_dir(root, "VisA root")
    csv_path = Path(csv_path) if csv_path is not None else root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DatasetFileNotFoundError(f"VisA split CSV not found: {csv_path}")
    wanted = set(classes) if classes is not None else None
    records: list[ImageRecord] = []
    for row in _read_visa_csv(csv_path):
        if row.split != split or (wanted is not None and row.object not in wanted):
            continue
        rec = _visa_record(root, csv_path, row, on_error)
        if rec is not None:
            records.append(rec)
    records.sort(key=lambda r: (r.class_name, r.defect_type, os.path.basename(r.path)))
    if check_files:
        records = _check_record_files(records, on_error=on_error, mask_values="nonzero")
    return records


def _read_visa_csv(csv_path: Path) -> list[_VisaRow]:
    """All rows of a VisA split CSV, each checked by :func:`_parse_visa_row`."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in reader.fieldnames or ()]
            if not set(_VISA_COLUMNS) <= set(fields):
                raise DatasetError(
                    f"{csv_path}: expected columns {','.join(_VISA_COLUMNS)}, "
                    f"got {reader.fieldnames}"
                )
            seen: dict[str, int] = {}
            return [_parse_visa_row(csv_path, reader.line_num, row, seen) for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"cannot read VisA split CSV {csv_path}: {type(e).__name__}: {e}") from e


def _parse_visa_row(csv_path: Path, line: int, row: dict, seen: dict[str, int]) -> _VisaRow:
    """Check one CSV row; ``split`` and ``label`` are compared case-insensitively.

    Raises :class:`DatasetError` (``"<csv>:<line>: ..."``) for a split other than
    train/test, a label other than normal/anomaly, an empty object or image field, a mask
    on a row that is not a test anomaly (the official converter asserts this) and an image
    already listed on an earlier line (``seen`` maps image paths to lines).
    """
    r = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
    where = f"{csv_path}:{line}"
    split, label = r["split"].lower(), r["label"].lower()
    if split not in ("train", "test"):
        raise DatasetError(f"{where}: unknown split {r['split']!r} (expected 'train' or 'test')")
    if label not in ("normal", "anomaly"):
        raise DatasetError(
            f"{where}: unknown label {r['label']!r} (expected 'normal' or 'anomaly')"
        )
    for col in ("object", "image"):
        if not r[col]:
            raise DatasetError(f"{where}: empty {col!r} field")
    if r["mask"] and not (split == "test" and label == "anomaly"):
        raise DatasetError(
            f"{where}: mask {r['mask']!r} given for a {split} {label} image "
            "(only test anomalies have masks)"
        )
    if r["image"] in seen:
        raise DatasetError(
            f"{where}: image {r['image']!r} is listed twice (first on line {seen[r['image']]})"
        )
    seen[r["image"]] = line
    return _VisaRow(r["object"], split, label, r["image"], r["mask"], line)


def _visa_record(root: Path, csv_path: Path, row: _VisaRow, on_error: str) -> ImageRecord | None:
    """The record of one CSV row, or None when its files are missing and ``on_error="skip"``."""
    where = f"{csv_path}:{row.line}"
    img_path = root / row.image
    if not img_path.is_file():
        msg = f"image listed in {where} not found: {img_path}"
        _problem(msg, on_error, DatasetFileNotFoundError)
        return None
    is_good = row.label == "normal"
    mask_path = None
    if not is_good and row.split == "test":
        mp = root / row.mask if row.mask else None
        if mp is None or not mp.is_file():
            detail = f"expected {mp}" if mp is not None else "the row gives no mask path"
            _problem(
                f"mask missing for defect image {img_path}: {detail} ({where})",
                on_error,
                DatasetFileNotFoundError,
            )
            return None
        mask_path = str(mp)
    defect = "good" if is_good else "bad"
    return ImageRecord(
        path=str(img_path),
        class_name=row.object,
        label=0 if is_good else 1,
        defect_type=defect,
        mask_path=mask_path,
        split=row.split,
        key=f"{row.object}/{row.split}/{defect}/{img_path.name}",
    )


def _check_record_files(records, *, on_error, mask_values):
    """Decode every image and mask of ``records`` (sizes compared); keep the good ones."""
    kept = []
    for r in records:
        try:
            _read_pair(r, with_mask=True, mask_values=mask_values)
        except DatasetError as e:
            if on_error == "raise":
                raise
            logger.warning("skipping: %s", e)
            continue
        kept.append(r)
    return kept


# --------------------------------------------------------------------------------------------
# Preprocessing (torchvision-equivalent, PIL based)
# --------------------------------------------------------------------------------------------


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Output ``(width, height)`` of torchvision ``Resize(size)`` (int: shorter side).

    torchvision ``_compute_resized_output_size``: the shorter side becomes ``size`` and the
    longer ``int(size * long / short)``.
    """
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    """torchvision ``CenterCrop`` offsets ``(top, left)``: ``int(round((H - crop) / 2.0))``.

    Python's ``round`` (ties to even), as torchvision uses. Only meaningful when the image is
    at least ``crop`` in both sides (otherwise it is zero-padded first, see
    :func:`preprocess_image`).
    """
    return round((height - crop) / 2.0), round((width - crop) / 2.0)


def _resize_pil(img: Image.Image, resize: int | None) -> Image.Image:
    if resize is None:
        return img
    w, h = img.size
    new = resized_size(w, h, resize)
    if new == (w, h):
        return img
    return img.resize(new, Image.BILINEAR)


def _center_crop_array(arr: np.ndarray, crop: int | None) -> np.ndarray:
    """torchvision ``CenterCrop(crop)`` on an (H, W[, C]) array, zero padding like it does."""
    if crop is None:
        return arr
    h, w = arr.shape[:2]
    if crop > h or crop > w:
        pad_t = (crop - h) // 2 if crop > h else 0
        pad_b = (crop - h + 1) // 2 if crop > h else 0
        pad_l = (crop - w) // 2 if crop > w else 0
        pad_r = (crop - w + 1) // 2 if crop > w else 0
        pads = [(pad_t, pad_b), (pad_l, pad_r)] + [(0, 0)] * (arr.ndim - 2)
        arr = np.pad(arr, pads)
        h, w = arr.shape[:2]
        if h == crop and w == crop:
            return arr
    top, left = center_crop_offsets(h, w, crop)
    return arr[top : top + crop, left : left + crop]


def _check_sizes(resize, crop):
    for name, v in (("resize", resize), ("crop", crop)):
        if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")


def _check_mask_args(binarize: str, mask_values: str) -> None:
    if binarize not in ("truncate", "threshold"):
        raise ValueError(f"binarize must be 'truncate' or 'threshold', got {binarize!r}")
    if mask_values not in ("binary", "nonzero"):
        raise ValueError(f"mask_values must be 'binary' or 'nonzero', got {mask_values!r}")


#: Modes that PIL's ``convert("RGB")`` maps as documented (grey replicated, palette looked up,
#: alpha / padding channel dropped).
_PIL_RGB_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX")
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_MASK_MODES = ("1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBX", "I") + _16BIT_MODES


def _16bit_to_8bit(arr: np.ndarray, mode: str, name: str) -> np.ndarray:
    """16-bit grey values -> uint8 by ``v >> 8``; mode ``I`` must hold values in [0, 65535]."""
    if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise DatasetError(
            f"image {name} has mode 'I' with values outside the 16-bit range [0, 65535] "
            f"(min {arr.min()}, max {arr.max()}); convert it to 8 or 16 bits first"
        )
    return (arr.astype(np.uint32) >> 8).astype(np.uint8)


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """A PIL image as RGB by the rules of the module docstring (``name`` for messages)."""
    if img.mode == "RGB":
        return img
    if img.mode in _PIL_RGB_MODES:
        return img.convert("RGB")
    if img.mode in _16BIT_MODES or img.mode == "I":
        grey = _16bit_to_8bit(np.asarray(img), img.mode, name)
        return Image.fromarray(grey, "L").convert("RGB")
    raise DatasetError(
        f"image {name} has unsupported mode {img.mode!r} (supported: "
        f"{', '.join(_PIL_RGB_MODES + _16BIT_MODES + ('I',))}); convert it to RGB first"
    )


def _as_pil_rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return _to_rgb(image, getattr(image, "filename", "") or "<PIL image>")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"image array must be uint8, got dtype {arr.dtype}")
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array must have shape (H, W), (H, W, 1|3|4), got {arr.shape}")
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], "L").convert("RGB")
    if arr.shape[2] == 4:  # alpha dropped
        return Image.fromarray(np.ascontiguousarray(arr), "RGBA").convert("RGB")
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def preprocess_image(
    image, *, resize: int | None = 256, crop: int | None = 224, normalize: bool = True
) -> np.ndarray:
    """Resize (shorter side, PIL bilinear) -> centre crop -> /255 -> ImageNet normalisation.

    Port of ``MVTecDataset.transform_img`` in jungyg/TailedCore ``src/datasets/mvtec.py``:
    equals ``Normalize(ToTensor(CenterCrop(crop)(Resize(resize)(img))))`` of torchvision,
    transposed to HWC (float32 arithmetic in the same order).

    Args:
        image: PIL image (converted to RGB as the module docstring says) or uint8 array
            ``(H, W)``, ``(H, W, 1|3|4)`` (grey replicated, alpha dropped).
        resize: shorter-side size (``None``: no resize). Default 256; the 128-px recipe uses
            146 (= 128 * 256 / 224, rounded down).
        crop: centre-crop size (``None``: no crop). Default 224.
        normalize: apply ImageNet mean/std (otherwise return ``[0, 1]`` values).

    Returns:
        ``(crop, crop, 3)`` float32.

    Raises:
        TypeError: a non-uint8 array. ValueError: bad shape or sizes. DatasetError: a PIL
        image of an unsupported mode.
    """
    _check_sizes(resize, crop)
    img = _resize_pil(_as_pil_rgb(image), resize)
    arr = _center_crop_array(np.asarray(img, dtype=np.uint8), crop)
    x = arr.astype(np.float32) / np.float32(255.0)
    if normalize:
        x = (x - _MEAN32) / _STD32
    return np.ascontiguousarray(x, dtype=np.float32)


def _pil_mask_values(mask: Image.Image, name: str) -> tuple[np.ndarray, int]:
    """Raw values of a PIL mask (alpha / padding dropped) and the value that means defect."""
    mode = mask.mode
    if mode not in _MASK_MODES:
        raise DatasetError(
            f"mask {name} has unsupported mode {mode!r} (supported: {', '.join(_MASK_MODES)})"
        )
    arr = np.asarray(mask)
    if mode == "1":
        return arr.astype(np.uint8) * np.uint8(255), 255
    if mode in ("LA", "PA"):
        return arr[..., 0], 255
    if mode in ("RGB", "RGBA", "RGBX"):
        return arr[..., :3], 255
    if mode in _16BIT_MODES or mode == "I":
        return arr, 65535
    return arr, 255  # L, P (palette indices)


def _array_mask_values(mask, name: str) -> tuple[np.ndarray, int]:
    """Values of an array mask ``(H, W)`` / ``(H, W, 1)`` (bool -> 0 / 255); defect is 255."""
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise DatasetError(f"mask {name} must be single-channel (H, W), got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * np.uint8(255)
    return arr, 255


def _grey_from_colour_mask(arr: np.ndarray, mask_values: str, name: str) -> np.ndarray:
    """(H, W, 3) -> (H, W): any nonzero channel (``"nonzero"``), or the grey value (binary)."""
    if mask_values == "nonzero":
        return arr.max(axis=-1)
    differ = (arr != arr[..., :1]).any(axis=-1)
    if differ.any():
        r, c = (int(v) for v in np.argwhere(differ)[0])
        raise DatasetError(
            f"mask {name} is a colour image: its R, G, B channels differ at "
            f"{int(differ.sum())} pixels (first at row {r}, column {c}: "
            f"{tuple(int(v) for v in arr[r, c])}); a binary mask must be grey, or pass "
            "mask_values='nonzero' to count any nonzero channel as defect"
        )
    return arr[..., 0]


def _mask_to_uint8(mask, *, mask_values: str, name: str) -> np.ndarray:
    """Raw mask (PIL image or array) -> (H, W) uint8 in {0, 255}, checked or made so.

    Mode rules in the module docstring. ``"binary"``: only 0 and the full-scale value (255,
    or 65535 for 16-bit modes) are allowed, anything else raises :class:`DatasetError`;
    ``"nonzero"``: every nonzero value is a defect.
    """
    if mask_values not in ("binary", "nonzero"):
        raise ValueError(f"mask_values must be 'binary' or 'nonzero', got {mask_values!r}")
    if isinstance(mask, Image.Image):
        arr, full = _pil_mask_values(mask, name)
    else:
        arr, full = _array_mask_values(mask, name)
    if arr.ndim == 3:
        arr = _grey_from_colour_mask(arr, mask_values, name)
    if mask_values == "nonzero":
        return np.where(arr != 0, np.uint8(255), np.uint8(0))
    bad = (arr != 0) & (arr != full)
    if bad.any():
        vals = np.unique(arr[bad])[:8].tolist()
        what = " (a 16-bit mask marks defects with 65535)" if full != 255 else ""
        raise DatasetError(
            f"mask {name} is not binary: it holds values other than 0/{full}{what} "
            f"(e.g. {vals}); pass mask_values='nonzero' to treat every nonzero value as "
            "defect (VisA)"
        )
    return np.where(arr == full, np.uint8(255), np.uint8(0))


def preprocess_mask(
    mask,
    *,
    resize: int | None = 256,
    crop: int | None = 224,
    binarize: Binarize = "truncate",
    mask_values: MaskValues = "binary",
) -> np.ndarray:
    """Ground-truth mask through the image's resize and crop, then binarised.

    Port of ``MVTecDataset.transform_mask`` in jungyg/TailedCore ``src/datasets/mvtec.py``
    (``Resize`` with PIL bilinear on the 0/255 'L' image -> ``CenterCrop`` -> ``ToTensor``),
    then:

    * ``binarize="truncate"`` (default, the official evaluation): ``.astype(np.uint8)`` of
      the ``[0, 1]`` floats, so only pixels that interpolate to exactly 255 are 1;
    * ``binarize="threshold"``: ``value / 255 > 0.5``.

    Args:
        mask: PIL image (mode rules in the module docstring) or array ``(H, W)`` /
            ``(H, W, 1)``. With ``mask_values="binary"`` it must hold only 0 and 255 (or be
            bool / mode '1'); ``"nonzero"`` maps every nonzero value to 255 first (VisA).

    Returns:
        ``(crop, crop)`` uint8 in {0, 1}.

    Raises:
        DatasetError: non-binary values with ``mask_values="binary"``, a multi-channel array,
            an unsupported PIL mode.
    """
    _check_sizes(resize, crop)
    _check_mask_args(binarize, mask_values)
    arr = _mask_to_uint8(
        mask, mask_values=mask_values, name=getattr(mask, "filename", "") or "<array>"
    )
    img = _resize_pil(Image.fromarray(arr, "L"), resize)
    out = _center_crop_array(np.asarray(img, dtype=np.uint8), crop)
    if binarize == "truncate":
        return (out == 255).astype(np.uint8)
    return (out > 127).astype(np.uint8)  # v / 255 > 0.5  <=>  v >= 128 for uint8 v


def preprocess_images(
    images, *, resize: int | None = 256, crop: int | None = 224, normalize: bool = True
) -> np.ndarray:
    """:func:`preprocess_image` over a uint8 stack ``(N, H, W, 3)`` -> ``(N, crop, crop, 3)``."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W, C), got {images.shape}")
    out = [preprocess_image(im, resize=resize, crop=crop, normalize=normalize) for im in images]
    if not out:
        c = crop if crop is not None else images.shape[1]
        return np.zeros((0, c, c, 3), np.float32)
    return np.stack(out)


def preprocess_masks(
    masks,
    *,
    resize: int | None = 256,
    crop: int | None = 224,
    binarize: Binarize = "truncate",
    mask_values: MaskValues = "binary",
) -> np.ndarray:
    """:func:`preprocess_mask` over a stack ``(N, H, W)`` -> ``(N, crop, crop)`` uint8."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {masks.shape}")
    out = [
        preprocess_mask(m, resize=resize, crop=crop, binarize=binarize, mask_values=mask_values)
        for m in masks
    ]
    if not out:
        c = crop if crop is not None else masks.shape[1]
        return np.zeros((0, c, c), np.uint8)
    return np.stack(out)


# --------------------------------------------------------------------------------------------
# File reading
# --------------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the (always empty) IEND chunk with its CRC


def _decode_file(path: str, what: str) -> Image.Image:
    """Read ``path`` into memory and decode it completely; ``what`` is "image" or "mask".

    Checks, in this order: the file exists; ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is
    False; ``Image.verify`` passes (PNG: every chunk's CRC); a PNG holds its ``IEND`` chunk;
    ``Image.load`` decodes every pixel. Any failure raises an error naming the file.
    """
    if not os.path.isfile(path):
        raise DatasetFileNotFoundError(f"{what} file not found: {path}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise DatasetError(
            f"cannot read {what} {path}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set "
            "elsewhere in this process), so a truncated file would be decoded partially "
            "without an error; set it back to False"
        )
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        if data.startswith(_PNG_SIGNATURE) and _PNG_IEND not in data:
            raise DatasetError(f"cannot read {what} {path}: truncated PNG (no IEND chunk)")
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except (DatasetError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt files
        raise DatasetError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB (mode rules in the module docstring).

    Raises:
        DatasetFileNotFoundError: the file does not exist.
        DatasetError: unreadable, truncated or corrupt file, or an unsupported mode (names
            the file).
    """
    path = os.fspath(path)
    return _to_rgb(_decode_file(path, "image"), path)


def read_mask(path: str | os.PathLike, *, mask_values: MaskValues = "binary") -> np.ndarray:
    """Read a mask file as ``(H, W)`` uint8 in {0, 255} (mode rules in the module docstring).

    Raises:
        DatasetFileNotFoundError: the file does not exist.
        DatasetError: unreadable/truncated file, unsupported mode, or values other than
            0/full scale with ``mask_values="binary"`` (names the file).
    """
    path = os.fspath(path)
    return _mask_to_uint8(_decode_file(path, "mask"), mask_values=mask_values, name=path)


def load_image(
    path: str | os.PathLike,
    *,
    resize: int | None = 256,
    crop: int | None = 224,
    normalize: bool = True,
) -> np.ndarray:
    """Read ``path`` and preprocess it (:func:`preprocess_image`): ``(crop, crop, 3)`` float32."""
    return preprocess_image(read_image(path), resize=resize, crop=crop, normalize=normalize)


def load_mask(
    path: str | os.PathLike | None,
    *,
    resize: int | None = 256,
    crop: int | None = 224,
    binarize: Binarize = "truncate",
    mask_values: MaskValues = "binary",
    like_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read a mask file and preprocess it (:func:`preprocess_mask`): ``(crop, crop)`` uint8.

    ``path=None`` (a good image) gives zeros of size ``crop`` (``like_size`` ``(H, W)`` is
    needed only when ``crop`` is None).
    """
    if path is None:
        if crop is not None:
            return np.zeros((crop, crop), np.uint8)
        if like_size is None:
            raise ValueError("load_mask(None, crop=None) needs like_size")
        return np.zeros(like_size, np.uint8)
    return preprocess_mask(
        read_mask(path, mask_values=mask_values),
        resize=resize,
        crop=crop,
        binarize=binarize,
        mask_values="binary",
    )


def _read_pair(rec, *, with_mask: bool, mask_values: str):
    """``(RGB PIL image, (H, W) uint8 mask or None)`` of a record; checks the mask's size."""
    img = read_image(rec.path)
    mask_path = getattr(rec, "mask_path", None) if with_mask else None
    if mask_path is None:
        return img, None
    mask = read_mask(mask_path, mask_values=mask_values)
    (mh, mw), (iw, ih) = mask.shape, img.size
    if (mw, mh) != (iw, ih):
        raise DatasetError(
            f"mask {mask_path} is {mw}x{mh} pixels but its image {rec.path} is {iw}x{ih} "
            "(width x height); a mask must have the size of its image"
        )
    return img, mask


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _load_item(rec, *, resize, crop, normalize, with_masks, binarize, mask_values):
    img, raw_mask = _read_pair(rec, with_mask=with_masks, mask_values=mask_values)
    x = preprocess_image(img, resize=resize, crop=crop, normalize=normalize)
    if not with_masks:
        return x, None
    if raw_mask is None:
        return x, np.zeros(x.shape[:2], np.uint8)
    m = preprocess_mask(raw_mask, resize=resize, crop=crop, binarize=binarize)
    return x, m


def _make_batch(items, *, with_masks, pad_to, out_hw):
    """items: list of (position, label, image (h, w, 3), mask (h, w) or None)."""
    n = len(items)
    b = max(n, pad_to or 0)
    h, w = out_hw
    images = np.zeros((b, h, w, 3), np.float32)
    masks = np.zeros((b, h, w), np.uint8) if with_masks else None
    labels = np.zeros((b,), np.int32)
    indices = np.full((b,), -1, np.int64)
    valid = np.zeros((b,), bool)
    for j, (i, lab, x, m) in enumerate(items):
        if x.shape[:2] != (h, w):
            raise DatasetError(
                f"image at position {i} has shape {x.shape[:2]} after preprocessing, expected "
                f"{(h, w)}; set crop to get a fixed size"
            )
        images[j] = x
        if with_masks:
            masks[j] = m
        labels[j] = lab
        indices[j] = i
        valid[j] = True
    return Batch(images, masks, labels, indices, valid)


def _load_many(records, positions, *, on_error, executor, kw):
    """``[(position, (image, mask))]`` of the loadable records (raise or skip the others)."""

    def one(i):
        try:
            return i, _load_item(records[i], **kw), None
        except DatasetError as e:
            return i, None, e

    results = executor.map(one, positions) if executor is not None else map(one, positions)
    ok = []
    for i, res, err in results:
        if err is not None:
            if on_error == "raise":
                raise err
            logger.warning("skipping: %s", err)
            continue
        ok.append((i, res))
    return ok


def load_batch(
    records: Sequence,
    *,
    resize: int | None = 256,
    crop: int | None = 224,
    normalize: bool = True,
    with_masks: bool = False,
    binarize: Binarize = "truncate",
    mask_values: MaskValues = "binary",
    on_error: OnError = "raise",
    num_threads: int = 1,
) -> Batch:
    """Load all ``records`` into one in-memory :class:`Batch` (order kept).

    ``records`` are any objects with ``.path`` and optionally ``.mask_path`` and ``.label``
    (:class:`ImageRecord`, ``longtail.TrainRecord``). Skipped items are absent and
    ``Batch.indices`` gives the positions of the kept ones.

    Raises:
        DatasetError: as :func:`read_image`, :func:`read_mask` (with ``on_error="raise"``),
            also for a mask whose size differs from its image's.
    """
    batches = list(
        iterate_batches(
            records,
            batch_size=max(len(records), 1),
            resize=resize,
            crop=crop,
            normalize=normalize,
            with_masks=with_masks,
            binarize=binarize,
            mask_values=mask_values,
            on_error=on_error,
            prefetch=0,
            num_threads=num_threads,
        )
    )
    if batches:
        return batches[0]
    c = crop or 0
    return Batch(
        np.zeros((0, c, c, 3), np.float32),
        np.zeros((0, c, c), np.uint8) if with_masks else None,
        np.zeros((0,), np.int32),
        np.zeros((0,), np.int64),
        np.zeros((0,), bool),
    )


def iterate_batches(
    records: Sequence,
    *,
    batch_size: int = 32,
    resize: int | None = 256,
    crop: int | None = 224,
    normalize: bool = True,
    with_masks: bool = False,
    binarize: Binarize = "truncate",
    mask_values: MaskValues = "binary",
    on_error: OnError = "raise",
    prefetch: int = 2,
    num_threads: int = 1,
    pad_last: bool = False,
) -> Iterator[Batch]:
    """Yield :class:`Batch` es of ``batch_size`` records, in order, prefetched in a thread.

    A background thread decodes and preprocesses up to ``prefetch`` batches ahead into a
    bounded queue (``prefetch=0``: no thread, load on demand). Memory held is at most
    ``prefetch + 2`` batches. Breaking out of the loop stops the thread. Arguments are
    checked at the call; files when their batch is built.

    Args:
        records: objects with ``.path`` (and optional ``.mask_path``, ``.label``).
        batch_size: images per batch; the last batch is smaller unless ``pad_last``.
        pad_last: pad the last batch with zero rows to ``batch_size`` (``valid`` False,
            ``indices`` -1) so a jitted consumer sees one shape. Skipped items are not
            replaced: with ``on_error="skip"`` any batch may hold fewer valid rows.
        num_threads: images decoded in parallel inside a batch (PIL releases the GIL).
        other args: see :func:`preprocess_image`, :func:`preprocess_mask`.

    Raises:
        DatasetError: from the worker, re-raised in the caller at the batch that holds the
            bad file (``on_error="raise"``).
        ValueError: bad sizes; ``crop=None`` when images of different sizes meet in a batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    _check_on_error(on_error)
    _check_sizes(resize, crop)
    _check_mask_args(binarize, mask_values)
    kw = {
        "resize": resize,
        "crop": crop,
        "normalize": normalize,
        "with_masks": with_masks,
        "binarize": binarize,
        "mask_values": mask_values,
    }

    def produce(start, executor):
        positions = range(start, min(start + batch_size, len(records)))
        ok = _load_many(records, positions, on_error=on_error, executor=executor, kw=kw)
        if not ok:
            return None
        items = [(i, int(getattr(records[i], "label", 0) or 0), x, m) for i, (x, m) in ok]
        pad_to = batch_size if pad_last else None
        out_hw = ok[0][1][0].shape[:2]
        return _make_batch(items, with_masks=with_masks, pad_to=pad_to, out_hw=out_hw)

    return _iterate(produce, range(0, len(records), batch_size), prefetch, num_threads)


_SENTINEL = object()


def _iterate(produce, starts, prefetch, num_threads) -> Iterator[Batch]:
    """Yield ``produce(s, executor)`` for every batch start (Nones dropped), in order."""
    executor = ThreadPoolExecutor(num_threads) if num_threads > 1 else None
    if prefetch == 0:
        source = (produce(s, executor) for s in starts)
    else:
        source = _prefetch(lambda s: produce(s, executor), starts, prefetch)
    try:
        for b in source:
            if b is not None:
                yield b
    finally:
        source.close()  # stops the prefetch thread before the executor goes
        if executor is not None:
            executor.shutdown(wait=True)


def _prefetch(fn, items, depth: int) -> Iterator:
    """Yield ``fn(item)`` for every item, computed in a background thread ``depth`` ahead.

    A worker exception is re-raised here, at its position; closing the generator stops the
    thread (it is joined for up to 10 s).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker():
        try:
            for it in items:
                if stop.is_set() or not put(fn(it)):
                    return
            put(_SENTINEL)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)

    t = threading.Thread(target=worker, name="tailedcore-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _SENTINEL:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=10.0)
