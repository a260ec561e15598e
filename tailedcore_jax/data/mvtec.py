"""MVTec AD and VisA folder datasets: records, exact torchvision-style preprocessing, batches.

Host-side module (NumPy + PIL only; nothing here is traced by JAX).

* **Records.** :func:`mvtec_records` lists an MVTec-layout folder
  (``<root>/<class>/{train,test}/<defect>/*`` and ``<root>/<class>/ground_truth/<defect>/
  <stem>_mask.png``); :func:`visa_records` reads VisA in its original layout through its split
  CSV (``split_csv/1cls.csv``, columns ``object,split,label,image,mask``). VisA converted to
  MVTec layout (``convert_visa_to_mvtec_format.py``: normal -> ``good``, anomaly -> ``bad``)
  is read by :func:`mvtec_records`. Both give the same order as the official
  ``MVTecDataset.get_image_data``: classes sorted, defect folders sorted, file names sorted.
* **Preprocessing** (``MVTecDataset.transform_img`` / ``transform_mask`` in
  jungyg/TailedCore ``src/datasets/mvtec.py``): ``Resize(resize)`` -- the shorter side to
  ``resize`` with PIL bilinear (PIL antialiases when downscaling), the long side
  ``int(resize * long / short)`` as torchvision computes it; ``CenterCrop(crop)`` with
  torchvision's offsets ``int(round((H - crop) / 2.0))`` (zero padding when the image is
  smaller); ``ToTensor`` (``/ 255`` in float32); ImageNet ``Normalize``. Output is **NHWC**
  float32. Masks go through the same resize and crop and are then binarised the official way
  (``main.py`` casts the ``[0, 1]`` float mask to ``uint8``: only pixels that interpolate to
  exactly 255 stay positive) or, optionally, with ``> 0.5``.
* **Batches.** :func:`load_batch` loads records into memory; :func:`iterate_batches` yields
  :class:`Batch` es in record order from a background thread with a bounded queue (memory is
  bounded by ``(prefetch + 2) * batch_size`` images).

Errors: a missing folder raises :class:`FileNotFoundError`; an unreadable or truncated image,
a defect image without a mask and a mask with values other than 0/255 raise
:class:`DatasetError` (a :class:`ValueError`) naming the file. With ``on_error="skip"`` the
problem is logged (``logging.getLogger("tailedcore_jax.data.mvtec")``, level WARNING) and the
item is left out (batches then carry the original positions in ``Batch.indices``).

References:
    Jung et al., "TailedCore: Few-Shot Sampling for Unsupervised Long-Tail Noisy Anomaly
    Detection", CVPR 2025; official code jungyg/TailedCore (``src/datasets/mvtec.py``,
    ``convert_visa_to_mvtec_format.py``). Bergmann et al., "MVTec AD", CVPR 2019. Zou et al.,
    "SPot-the-Difference ... (VisA)", ECCV 2022.
"""

from __future__ import annotations

import csv
import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "Batch",
    "DatasetError",
    "ImageRecord",
    "center_crop_offsets",
    "iterate_batches",
    "list_classes",
    "load_batch",
    "load_image",
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
    """A dataset file is unreadable, truncated, missing its mask or has a non-binary mask."""


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


def _problem(message: str, on_error: str, exc_type=DatasetError) -> None:
    if on_error == "raise":
        raise exc_type(message)
    logger.warning("skipping: %s", message)


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")


def list_classes(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class folders of an MVTec-layout dataset.

    A class folder is a sub-folder of ``root`` that contains ``train`` or ``test``.

    Raises:
        FileNotFoundError: ``root`` does not exist or holds no class folder.
    """
    root = Path(root)
    _require_dir(root, "dataset root")
    names = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir())
    )
    if not names:
        raise FileNotFoundError(f"no class folders (with train/ or test/) under {root}")
    return names


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
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
    sorted -- ``MVTecDataset.get_image_data`` + ``ConcatDataset`` over sorted classes.
    Masks are paired by name: ``ground_truth/<defect>/<stem>_mask.png`` (MVTec, converted
    VisA), falling back to ``<stem>.png``.

    Args:
        root: dataset root.
        split: ``"train"`` or ``"test"``.
        classes: class names to use (default: all class folders, sorted).
        on_error: ``"raise"`` or ``"skip"`` (log a warning and leave the item out).
        check_files: also decode every image (and mask) now, to catch unreadable or
            truncated files and non-binary masks before any batch is built (slow: reads
            everything once).

    Returns:
        list of :class:`ImageRecord`.

    Raises:
        FileNotFoundError: missing root, class folder or split folder (always raised: a
            missing folder is never skipped), or a defect folder without its
            ``ground_truth`` folder when ``on_error="raise"``.
        DatasetError: a defect image has no mask; with ``check_files``, an unreadable or
            truncated image or a non-binary mask.
        ValueError: bad ``split`` / ``on_error``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _check_on_error(on_error)
    root = Path(root)
    _require_dir(root, "dataset root")
    class_names = list(classes) if classes is not None else list_classes(root)
    records: list[ImageRecord] = []
    for cls in sorted(class_names):
        split_dir = root / cls / split
        _require_dir(split_dir, f"split folder of class {cls!r}")
        for defect in sorted(p.name for p in split_dir.iterdir() if p.is_dir()):
            files = sorted(f for f in os.listdir(split_dir / defect) if _is_image_file(f))
            is_good = defect == "good"
            gt_dir = root / cls / "ground_truth" / defect
            if split == "test" and not is_good and not gt_dir.is_dir():
                if on_error == "raise":
                    raise FileNotFoundError(
                        f"ground-truth folder for defect {defect!r} of class {cls!r} not found: {gt_dir}"
                    )
                logger.warning(
                    "skipping %d images of %s: no ground-truth folder %s",
                    len(files),
                    split_dir / defect,
                    gt_dir,
                )
                continue
            for fname in files:
                img_path = split_dir / defect / fname
                mask_path = None
                if split == "test" and not is_good:
                    mp = _find_mask(gt_dir, os.path.splitext(fname)[0])
                    if mp is None:
                        _problem(
                            f"mask missing for defect image {img_path} "
                            f"(expected {gt_dir / (os.path.splitext(fname)[0] + '_mask.png')})",
                            on_error,
                        )
                        continue
                    mask_path = str(mp)
                records.append(
                    ImageRecord(
                        path=str(img_path),
                        class_name=cls,
                        label=0 if is_good else 1,
                        defect_type=defect,
                        mask_path=mask_path,
                        split=split,
                        key=f"{cls}/{split}/{defect}/{fname}",
                    )
                )
    if check_files:
        records = _check_record_files(records, on_error=on_error, mask_values="binary")
    return records


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
    ``object,split,label,image,mask`` with ``label`` in {``normal``, ``anomaly``} and paths
    relative to ``root``. Labels map as the official converter does: normal -> ``good``,
    anomaly -> ``bad``; records are ordered as :func:`mvtec_records` orders the converted
    folder (class, then ``bad`` before ``good``, then file name), so both layouts give the
    same sequence. ``key`` is ``"<object>/<split>/<good|bad>/<file name>"``.

    VisA masks are not 0/255 (they hold small nonzero values); load them with
    ``mask_values="nonzero"``.

    Raises:
        FileNotFoundError: missing root or CSV.
        DatasetError: malformed CSV (missing columns, unknown label), a listed image file
            that does not exist, an anomaly row without a mask (or whose mask file is
            missing); with ``check_files``, unreadable images.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _check_on_error(on_error)
    root = Path(root)
    _require_dir(root, "VisA root")
    csv_path = Path(csv_path) if csv_path is not None else root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"VisA split CSV not found: {csv_path}")
    wanted = set(classes) if classes is not None else None
    rows = []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        needed = {"object", "split", "label", "image", "mask"}
        if reader.fieldnames is None or not needed <= {c.strip() for c in reader.fieldnames}:
            raise DatasetError(
                f"{csv_path}: expected columns object,split,label,image,mask, got {reader.fieldnames}"
            )
        for line_no, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if row["split"] != split:
                continue
            if wanted is not None and row["object"] not in wanted:
                continue
            label = row["label"].lower()
            if label not in ("normal", "anomaly"):
                raise DatasetError(f"{csv_path}:{line_no}: unknown label {row['label']!r}")
            rows.append((row["object"], label, row["image"], row["mask"], line_no))
    records: list[ImageRecord] = []
    for obj, label, image_rel, mask_rel, line_no in rows:
        img_path = root / image_rel
        if not img_path.is_file():
            _problem(f"image listed in {csv_path}:{line_no} not found: {img_path}", on_error)
            continue
        is_good = label == "normal"
        mask_path = None
        if not is_good and split == "test":
            if not mask_rel:
                _problem(
                    f"mask missing for defect image {img_path} ({csv_path}:{line_no})", on_error
                )
                continue
            mp = root / mask_rel
            if not mp.is_file():
                _problem(f"mask missing for defect image {img_path}: {mp} not found", on_error)
                continue
            mask_path = str(mp)
        defect = "good" if is_good else "bad"
        records.append(
            ImageRecord(
                path=str(img_path),
                class_name=obj,
                label=0 if is_good else 1,
                defect_type=defect,
                mask_path=mask_path,
                split=split,
                key=f"{obj}/{split}/{defect}/{img_path.name}",
            )
        )
    records.sort(key=lambda r: (r.class_name, r.defect_type, os.path.basename(r.path)))
    if check_files:
        records = _check_record_files(records, on_error=on_error, mask_values="nonzero")
    return records


def _check_record_files(records, *, on_error, mask_values):
    kept = []
    for r in records:
        try:
            read_image(r.path)
            if r.mask_path is not None:
                read_mask(r.mask_path, mask_values=mask_values)
        except (DatasetError, FileNotFoundError) as e:
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


def _as_pil_rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"image array must be uint8, got dtype {arr.dtype}")
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array must have shape (H, W), (H, W, 1|3|4), got {arr.shape}")
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], "L").convert("RGB")
    if arr.shape[2] == 4:
        return Image.fromarray(np.ascontiguousarray(arr), "RGBA").convert("RGB")
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def preprocess_image(
    image, *, resize: int | None = 256, crop: int | None = 224, normalize: bool = True
) -> np.ndarray:
    """Resize (shorter side, PIL bilinear) -> centre crop -> /255 -> ImageNet normalisation.

    Equals ``Normalize(ToTensor(CenterCrop(crop)(Resize(resize)(img))))`` of torchvision,
    transposed to HWC (float32 arithmetic in the same order).

    Args:
        image: PIL image (converted to RGB) or uint8 array ``(H, W)``, ``(H, W, 1|3|4)``.
        resize: shorter-side size (``None``: no resize). Default 256; the 128-px recipe uses
            146 (= 128 * 256 / 224, rounded down).
        crop: centre-crop size (``None``: no crop). Default 224.
        normalize: apply ImageNet mean/std (otherwise return ``[0, 1]`` values).

    Returns:
        ``(crop, crop, 3)`` float32.

    Raises:
        TypeError: a non-uint8 array. ValueError: bad shape or sizes.
    """
    _check_sizes(resize, crop)
    img = _resize_pil(_as_pil_rgb(image), resize)
    arr = _center_crop_array(np.asarray(img, dtype=np.uint8), crop)
    x = arr.astype(np.float32) / np.float32(255.0)
    if normalize:
        x = (x - _MEAN32) / _STD32
    return np.ascontiguousarray(x, dtype=np.float32)


def _mask_to_uint8(mask, *, mask_values: str, name: str) -> np.ndarray:
    """Raw mask -> (H, W) uint8 with values {0, 255} (checked or made so)."""
    if mask_values not in ("binary", "nonzero"):
        raise ValueError(f"mask_values must be 'binary' or 'nonzero', got {mask_values!r}")
    if isinstance(mask, Image.Image):
        if mask.mode == "1":
            arr = np.asarray(mask, dtype=np.uint8) * np.uint8(255)
        elif mask.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "HSV", "LAB"):
            arr = np.asarray(mask.convert("L"))
        else:  # L, P (palette indices), I, I;16, F
            arr = np.asarray(mask)
    else:
        arr = np.asarray(mask)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise DatasetError(f"mask {name} must be single-channel (H, W), got shape {arr.shape}")
    if mask_values == "nonzero":
        return np.where(arr != 0, np.uint8(255), np.uint8(0))
    if arr.dtype == bool:
        return arr.astype(np.uint8) * np.uint8(255)
    bad = (arr != 0) & (arr != 255)
    if bad.any():
        vals = np.unique(arr[bad])[:8].tolist()
        raise DatasetError(
            f"mask {name} is not binary: it holds values other than 0/255 (e.g. {vals}); "
            "pass mask_values='nonzero' to treat every nonzero value as defect (VisA)"
        )
    return arr.astype(np.uint8)


def preprocess_mask(
    mask,
    *,
    resize: int | None = 256,
    crop: int | None = 224,
    binarize: Binarize = "truncate",
    mask_values: MaskValues = "binary",
) -> np.ndarray:
    """Ground-truth mask through the image's resize and crop, then binarised.

    ``Resize`` (PIL bilinear on the 0/255 'L' image) -> ``CenterCrop`` -> ``ToTensor`` and then:

    * ``binarize="truncate"`` (default, the official evaluation): ``.astype(np.uint8)`` of
      the ``[0, 1]`` floats, so only pixels that interpolate to exactly 255 are 1;
    * ``binarize="threshold"``: ``value / 255 > 0.5``.

    Args:
        mask: PIL image or array ``(H, W)``. With ``mask_values="binary"`` it must hold only
            0 and 255 (or be bool / mode '1'); ``"nonzero"`` maps every nonzero value to 255
            first (VisA masks).

    Returns:
        ``(crop, crop)`` uint8 in {0, 1}.

    Raises:
        DatasetError: non-binary values with ``mask_values="binary"``, or a multi-channel array.
    """
    _check_sizes(resize, crop)
    if binarize not in ("truncate", "threshold"):
        raise ValueError(f"binarize must be 'truncate' or 'threshold', got {binarize!r}")
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

_READ_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, EOFError)


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB (``PIL.Image.open(path).convert("RGB")``).

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: unreadable, truncated or corrupt file (names the file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except _READ_ERRORS as e:
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def read_mask(path: str | os.PathLike, *, mask_values: MaskValues = "binary") -> np.ndarray:
    """Read a mask file as (H, W) uint8 in {0, 255} (checked, or nonzero -> 255).

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: unreadable/truncated file, or values other than 0/255 with
            ``mask_values="binary"`` (names the file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return _mask_to_uint8(im, mask_values=mask_values, name=path)
    except DatasetError:
        raise
    except _READ_ERRORS as e:
        raise DatasetError(f"cannot read mask {path}: {type(e).__name__}: {e}") from e


def load_image(
    path: str | os.PathLike,
    *,
    resize: int | None = 256,
    crop: int | None = 224,
    normalize: bool = True,
) -> np.ndarray:
    """Read ``path`` and preprocess it: ``(crop, crop, 3)`` float32 (spec 10.1 row 1, NHWC)."""
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
    """Read a mask file and preprocess it: ``(crop, crop)`` uint8 in {0, 1} (spec 10.1 row 2).

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


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _load_item(rec, *, resize, crop, normalize, with_masks, binarize, mask_values):
    img = read_image(rec.path)
    x = preprocess_image(img, resize=resize, crop=crop, normalize=normalize)
    m = None
    if with_masks:
        mp = getattr(rec, "mask_path", None)
        if mp is None:
            m = np.zeros(x.shape[:2], np.uint8)
        else:
            m = load_mask(mp, resize=resize, crop=crop, binarize=binarize, mask_values=mask_values)
            if m.shape != x.shape[:2]:
                raise DatasetError(
                    f"mask {mp} gives shape {m.shape} after preprocessing but its image {rec.path} "
                    f"gives {x.shape[:2]} (image and mask sizes differ)"
                )
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
                f"image at position {i} has shape {x.shape[:2]} after preprocessing, expected {(h, w)}; "
                "set crop to get a fixed size"
            )
        images[j] = x
        if with_masks:
            masks[j] = m
        labels[j] = lab
        indices[j] = i
        valid[j] = True
    return Batch(images, masks, labels, indices, valid)


def _load_many(records, positions, *, on_error, executor, kw):
    def one(i):
        try:
            return i, _load_item(records[i], **kw), None
        except (DatasetError, FileNotFoundError) as e:
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
        FileNotFoundError / DatasetError: as :func:`read_image`, :func:`read_mask` (with
            ``on_error="raise"``), also for an image/mask size mismatch.
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


_SENTINEL = object()


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
    ``prefetch + 2`` batches. Breaking out of the loop stops the thread.

    Args:
        records: objects with ``.path`` (and optional ``.mask_path``, ``.label``).
        batch_size: images per batch; the last batch is smaller unless ``pad_last``.
        pad_last: pad the last batch with zero rows to ``batch_size`` (``valid`` False,
            ``indices`` -1) so a jitted consumer sees one shape. Skipped items are not
            replaced: with ``on_error="skip"`` any batch may hold fewer valid rows.
        num_threads: images decoded in parallel inside a batch (PIL releases the GIL).
        other args: see :func:`preprocess_image`, :func:`preprocess_mask`.

    Raises:
        FileNotFoundError / DatasetError: from the worker, re-raised in the caller at the
            batch that holds the bad file (``on_error="raise"``).
        ValueError: bad sizes; ``crop=None`` when images of different sizes meet in a batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    _check_on_error(on_error)
    _check_sizes(resize, crop)
    if binarize not in ("truncate", "threshold"):
        raise ValueError(f"binarize must be 'truncate' or 'threshold', got {binarize!r}")
    if mask_values not in ("binary", "nonzero"):
        raise ValueError(f"mask_values must be 'binary' or 'nonzero', got {mask_values!r}")
    kw = {
        "resize": resize,
        "crop": crop,
        "normalize": normalize,
        "with_masks": with_masks,
        "binarize": binarize,
        "mask_values": mask_values,
    }
    return _iterate(
        records,
        batch_size=batch_size,
        on_error=on_error,
        prefetch=prefetch,
        num_threads=num_threads,
        pad_last=pad_last,
        with_masks=with_masks,
        kw=kw,
    )


def _iterate(records, *, batch_size, on_error, prefetch, num_threads, pad_last, with_masks, kw):
    n = len(records)
    starts = list(range(0, n, batch_size))

    def produce(start, executor):
        positions = range(start, min(start + batch_size, n))
        ok = _load_many(records, positions, on_error=on_error, executor=executor, kw=kw)
        if not ok:
            return None
        out_hw = ok[0][1][0].shape[:2]
        items = [(i, int(getattr(records[i], "label", 0) or 0), x, m) for i, (x, m) in ok]
        return _make_batch(
            items, with_masks=with_masks, pad_to=batch_size if pad_last else None, out_hw=out_hw
        )

    executor = ThreadPoolExecutor(num_threads) if num_threads > 1 else None
    try:
        if prefetch == 0:
            for s in starts:
                b = produce(s, executor)
                if b is not None:
                    yield b
            return

        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def put(item):
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def worker():
            try:
                for s in starts:
                    if stop.is_set():
                        return
                    b = produce(s, executor)
                    if b is not None and not put(b):
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
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join(timeout=10.0)
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
