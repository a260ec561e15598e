"""Image classification and OOD datasets for the NAN experiments (host side, NumPy + PIL).

Two sources:

* **tensorflow-datasets** through ``tfds.data_source`` (random access to ArrayRecord files,
  no TensorFlow needed): CIFAR-10/100, SVHN, DTD (textures), Places365 and LSUN. Nothing is
  downloaded (``download=False``); a dataset not prepared in ``data_dir`` raises
  :class:`DatasetNotPreparedError` with the command that prepares it, once, on a machine with
  network access: ``tfds build cifar10 --data_dir DIR --file_format array_record``
  (``tfds.data_source`` cannot read the TFRecord default).
* **the offline default**, generated from a seed: the synthetic product images of
  :mod:`tailedcore_jax.data.synthetic` as an in-distribution classification set (label =
  product class), the held-out classes as a near-OOD set (``synthetic_heldout``), and
  procedural far-OOD sets ``gaussian_noise``, ``uniform_noise``, ``blobs``, ``gratings``.

Every loader returns ``uint8`` NHWC arrays at the in-distribution resolution
(:func:`resize_center_crop`: torchvision ``Resize(size)`` + ``CenterCrop`` on PIL images).
Subsets and generated images come from ``np.random.SeedSequence(seed, spawn_key=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from tailedcore_jax.data.mvtec import center_crop_offsets, resized_size
from tailedcore_jax.data.synthetic import SYNTHETIC_CLASSES, synthetic_image

__all__ = [
    "TFDS_DATASETS",
    "PROCEDURAL_OOD_SETS",
    "SYNTHETIC_ID_CLASSES",
    "SYNTHETIC_HELDOUT_CLASSES",
    "ID_DATASETS",
    "KNOWN_OOD_SETS",
    "DEFAULT_OOD_SETS",
    "DatasetNotPreparedError",
    "ClassificationData",
    "resize_center_crop",
    "tfds_data_source",
    "load_tfds_images",
    "synthetic_classification",
    "synthetic_heldout",
    "procedural_ood",
    "load_id_dataset",
    "load_ood_sets",
]


class _TfdsSpec(NamedTuple):
    tfds_name: str
    id_split: str | None  # training split when usable as ID (None: OOD only)
    eval_split: str  # split used as ID test set / OOD set
    num_classes: int | None


#: Short name -> TFDS builder, splits and classes. ``lsun`` is the LSUN scene dataset of TFDS
#: (category ``classroom``; ``lsun/<category>`` picks another), not the LSUN-crop/resize OOD
#: images of ODIN, which are not in TFDS.
TFDS_DATASETS: dict[str, _TfdsSpec] = {
    "cifar10": _TfdsSpec("cifar10", "train", "test", 10),
    "cifar100": _TfdsSpec("cifar100", "train", "test", 100),
    "svhn": _TfdsSpec("svhn_cropped", None, "test", 10),
    "dtd": _TfdsSpec("dtd", None, "test", 47),
    "textures": _TfdsSpec("dtd", None, "test", 47),
    "places365": _TfdsSpec("places365_small", None, "validation", 365),
    "lsun": _TfdsSpec("lsun/classroom", None, "validation", None),
}

PROCEDURAL_OOD_SETS = ("gaussian_noise", "uniform_noise", "blobs", "gratings")
#: In-distribution product classes of the synthetic default (textures and objects mixed) and
#: the held-out classes that form the near-OOD set ``synthetic_heldout``.
SYNTHETIC_ID_CLASSES = ("checker", "dots", "gear", "mesh", "ring", "screw")
SYNTHETIC_HELDOUT_CLASSES = tuple(c for c in SYNTHETIC_CLASSES if c not in SYNTHETIC_ID_CLASSES)

ID_DATASETS = ("synthetic", "cifar10", "cifar100")
KNOWN_OOD_SETS = ("synthetic_heldout",) + PROCEDURAL_OOD_SETS + tuple(TFDS_DATASETS)
#: OOD sets used when none are named, per ID dataset (for CIFAR the usual OOD benchmark sets
#: that TFDS has: SVHN, Textures, Places365, LSUN and the other CIFAR).
DEFAULT_OOD_SETS = {
    "synthetic": ("synthetic_heldout",) + PROCEDURAL_OOD_SETS,
    "cifar10": ("cifar100", "svhn", "dtd", "places365", "lsun"),
    "cifar100": ("cifar10", "svhn", "dtd", "places365", "lsun"),
}


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS dataset is not prepared (in a readable file format) under ``data_dir``."""


class ClassificationData(NamedTuple):
    """An in-distribution classification set.

    Attributes:
        train_images: ``(N, S, S, 3)`` uint8. train_labels: ``(N,)`` int32 in ``[0, K)``.
        test_images: ``(M, S, S, 3)`` uint8. test_labels: ``(M,)`` int32.
        class_names: ``K`` names (label ``i`` is ``class_names[i]``).
        name: dataset name.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ------------------------------------------------------------------------------ helpers


def _check_size(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop(size)(Resize(size)(img))`` on a uint8 image.

    The shorter side becomes ``size`` (PIL bilinear, antialiased when shrinking, as
    torchvision does for PIL images), then the centre ``size x size`` window is cut. Images
    already ``size x size`` are returned unchanged. Grey and RGBA images become RGB.

    Args:
        image: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8.
        size: output side.

    Returns:
        ``(size, size, 3)`` uint8.

    Raises:
        TypeError: not uint8. ValueError: bad shape or size.
    """
    size = _check_size("size", size)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
        raise ValueError(f"image must have shape (H, W[, 1|3|4]), got {np.shape(image)}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(arr)
    new_w, new_h = resized_size(w, h, size)
    if (new_w, new_h) != (w, h):
        arr = np.asarray(Image.fromarray(np.ascontiguousarray(arr), "RGB").resize((new_w, new_h), Image.BILINEAR))
    top, left = center_crop_offsets(new_h, new_w, size)
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def _subset(n_total: int, max_examples: int | None, seed: int, tag: str) -> np.ndarray:
    """Indices of a deterministic random subset (sorted), or all when it fits."""
    if max_examples is None or max_examples >= n_total:
        return np.arange(n_total)
    code = int.from_bytes(tag.encode()[:8].ljust(8, b"\0"), "little")
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(code,)))
    return np.sort(rng.choice(n_total, size=max_examples, replace=False))


# ------------------------------------------------------------------------------ TFDS


def _resolve_tfds(name: str) -> tuple[_TfdsSpec, str]:
    if name in TFDS_DATASETS:
        return TFDS_DATASETS[name], name
    if name.startswith("lsun/") and len(name) > 5:
        return _TfdsSpec(name, None, "validation", None), name
    raise ValueError(
        f"unknown dataset {name!r}; known TFDS datasets: {', '.join(TFDS_DATASETS)} "
        f"(and lsun/<category>); generated sets: {', '.join(('synthetic', 'synthetic_heldout') + PROCEDURAL_OOD_SETS)}"
    )


def _default_data_dir(data_dir) -> str:
    if data_dir is not None:
        return os.fspath(data_dir)
    return os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def tfds_data_source(name: str, *, split: str | None = None, data_dir: str | os.PathLike | None = None):
    """Random-access TFDS source of one split (``tfds.data_source``, never downloads).

    Args:
        name: a key of :data:`TFDS_DATASETS` (``cifar10``, ``cifar100``, ``svhn``, ``dtd`` /
            ``textures``, ``places365``, ``lsun``) or ``lsun/<category>``.
        split: TFDS split string (default: the dataset's evaluation split, e.g. ``test``).
        data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

    Returns:
        A sequence-like source; ``source[i]`` is a dict of NumPy values (``image``, ``label``).

    Raises:
        ValueError: unknown name (lists the known ones).
        DatasetNotPreparedError: the dataset is not prepared as array_record/parquet in
            ``data_dir`` (the message gives the command that prepares it).
    """
    spec, _ = _resolve_tfds(name)
    split = split or spec.eval_split
    data_dir = _default_data_dir(data_dir)
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # noqa: BLE001 - tfds raises several types (NotImplementedError, AssertionError, ...)
        raise DatasetNotPreparedError(
            f"dataset {name!r} (TFDS {spec.tfds_name!r}, split {split!r}) could not be opened in "
            f"data_dir={data_dir!r}: it is probably not prepared there, or was prepared in the "
            "TFRecord format, which tfds.data_source cannot read. Prepare it once on a machine "
            f"with network access:\n    tfds build {spec.tfds_name} --data_dir {data_dir} "
            "--file_format array_record\n(nothing is downloaded at run time). "
            f"Original error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def load_tfds_images(
    name: str,
    *,
    split: str | None = None,
    data_dir: str | os.PathLike | None = None,
    image_size: int = 32,
    max_examples: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a TFDS split into memory at ``image_size`` (resize + centre crop when needed).

    Args:
        name, split, data_dir: as :func:`tfds_data_source`.
        image_size: output side (the ID resolution).
        max_examples: keep a deterministic random subset of this many records (e.g. the usual
            10,000 Places images); ``None`` = all.
        seed: seed of the subset.

    Returns:
        ``(images (N, S, S, 3) uint8, labels (N,) int32)``; labels are -1 for sets without a
        ``label`` feature.

    Raises:
        ValueError: unknown name, bad sizes, an empty split.
        DatasetNotPreparedError: see :func:`tfds_data_source`.
    """
    image_size = _check_size("image_size", image_size)
    if max_examples is not None:
        max_examples = _check_size("max_examples", max_examples)
    source = tfds_data_source(name, split=split, data_dir=data_dir)
    n = len(source)
    if n == 0:
        raise ValueError(f"dataset {name!r} split {split!r} is empty")
    idx = _subset(n, max_examples, seed, name)
    images = np.empty((len(idx), image_size, image_size, 3), np.uint8)
    labels = np.full((len(idx),), -1, np.int32)
    for j, i in enumerate(idx):
        rec = source[int(i)]
        images[j] = resize_center_crop(np.asarray(rec["image"]), image_size)
        if "label" in rec:
            labels[j] = int(rec["label"])
    return images, labels


# ------------------------------------------------------------------------------ synthetic


def _recolour(img: np.ndarray, seed: int, class_index: int, split: str, index: int) -> np.ndarray:
    """Random channel permutation and per-channel gain (0.6-1.4): colour stops identifying
    the class, so a classifier has to learn the structure (stripes, dots, gear teeth...)."""
    ss = np.random.SeedSequence(int(seed), spawn_key=(2000 + class_index, 0 if split == "train" else 1, index))
    rng = np.random.default_rng(ss)
    out = img[..., rng.permutation(3)].astype(np.float32) * rng.uniform(0.6, 1.4, 3).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _render_classes(classes, *, n_per_class, split, seed, image_size, render_size, recolour=False):
    images, labels = [], []
    for ci, c in enumerate(classes):
        for i in range(n_per_class):
            img, _ = synthetic_image(c, seed=seed, split=split, index=i, size=render_size)
            if recolour:
                img = _recolour(img, seed, SYNTHETIC_CLASSES.index(c), split, i)
            images.append(resize_center_crop(img, image_size))
            labels.append(ci)
    if not images:
        return np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros((0,), np.int32)
    return np.stack(images), np.asarray(labels, np.int32)


def _check_classes(classes) -> tuple:
    classes = tuple(classes)
    bad = [c for c in classes if c not in SYNTHETIC_CLASSES]
    if bad or not classes or len(set(classes)) != len(classes):
        raise ValueError(
            f"classes must be distinct names from {SYNTHETIC_CLASSES}, got {list(classes)}"
        )
    return classes


def synthetic_classification(
    seed: int = 0,
    *,
    classes: Sequence[str] = SYNTHETIC_ID_CLASSES,
    n_train_per_class: int = 100,
    n_test_per_class: int = 50,
    image_size: int = 32,
    render_size: int = 96,
    recolour: bool = False,
) -> ClassificationData:
    """The synthetic product images as an in-distribution classification set.

    Good images of :func:`~tailedcore_jax.data.synthetic.synthetic_image` (train / test from
    its ``train`` / ``test`` split), rendered at ``render_size``, resized to ``image_size``;
    label ``i`` = ``classes[i]``.

    Args:
        seed: generator seed.
        classes: distinct names from :data:`~tailedcore_jax.data.synthetic.SYNTHETIC_CLASSES`.
        n_train_per_class, n_test_per_class: images per class and split (>= 1).
        image_size: side of the returned images.
        render_size: side the images are rendered at (>= 96) before resizing.
        recolour: a random channel permutation and per-channel gain (0.6-1.4) per image, so
            color alone does not give the class away. Off by default: a classifier trained
            on the recolored task responds more to the noise sets than to ID images, and every
            OOD score, NAN included, falls below chance there.

    Returns:
        :class:`ClassificationData` named ``"synthetic"``.

    Raises:
        ValueError: unknown/duplicate classes, sizes < 1.
    """
    classes = _check_classes(classes)
    n_train = _check_size("n_train_per_class", n_train_per_class)
    n_test = _check_size("n_test_per_class", n_test_per_class)
    image_size = _check_size("image_size", image_size)
    render_size = _check_size("render_size", render_size, 96)
    kw = dict(seed=seed, image_size=image_size, render_size=render_size, recolour=recolour)
    tr_x, tr_y = _render_classes(classes, n_per_class=n_train, split="train", **kw)
    te_x, te_y = _render_classes(classes, n_per_class=n_test, split="test", **kw)
    return ClassificationData(tr_x, tr_y, te_x, te_y, classes, "synthetic")


def synthetic_heldout(
    num: int,
    *,
    seed: int = 0,
    classes: Sequence[str] = SYNTHETIC_HELDOUT_CLASSES,
    image_size: int = 32,
    render_size: int = 96,
    recolour: bool = False,
) -> np.ndarray:
    """Near-OOD set: ``num`` test images of product classes not used as ID (round robin),
    recoloured like :func:`synthetic_classification` (``recolour``).

    Returns:
        ``(num, S, S, 3)`` uint8.
    """
    classes = _check_classes(classes)
    num = _check_size("num", num)
    per = -(-num // len(classes))
    images, _ = _render_classes(classes, n_per_class=per, split="test", seed=seed,
                                image_size=image_size, render_size=render_size, recolour=recolour)
    # interleave classes so that any prefix is balanced
    order = np.arange(len(images)).reshape(len(classes), per).T.reshape(-1)
    return np.ascontiguousarray(images[order[:num]])


def _blobs(rng, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.broadcast_to(rng.uniform(0, 255, 3).astype(np.float32), (size, size, 3)).copy()
    for _ in range(int(rng.integers(3, 9))):
        cy, cx = rng.uniform(0, 1, 2)
        sy, sx = rng.uniform(0.05, 0.3, 2)
        a = np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))[..., None]
        img = img * (1 - a) + a * rng.uniform(0, 255, 3).astype(np.float32)
    return img


def _gratings(rng, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ang = rng.uniform(0, np.pi)
    freq = rng.uniform(2.0, 8.0)
    phase = rng.uniform(0, 2 * np.pi)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(ang) * xx + np.sin(ang) * yy) + phase)
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def procedural_ood(kind: str, num: int, *, seed: int = 0, image_size: int = 32) -> np.ndarray:
    """Procedural far-OOD images, deterministic from ``seed`` (image ``i`` does not depend on ``num``).

    Kinds: ``gaussian_noise`` (i.i.d. N(128, 64^2) pixels, clipped), ``uniform_noise`` (i.i.d.
    U{0..255}), ``blobs`` (3-8 smooth Gaussian colour blobs on a flat random colour),
    ``gratings`` (sinusoidal two-colour stripes, random orientation, 2-8 periods per image).

    Returns:
        ``(num, image_size, image_size, 3)`` uint8.

    Raises:
        ValueError: unknown kind (lists the known ones), sizes < 1.
    """
    if kind not in PROCEDURAL_OOD_SETS:
        raise ValueError(f"unknown procedural OOD set {kind!r}; known: {', '.join(PROCEDURAL_OOD_SETS)}")
    num = _check_size("num", num)
    size = _check_size("image_size", image_size)
    code = PROCEDURAL_OOD_SETS.index(kind)
    out = np.empty((num, size, size, 3), np.uint8)
    for i in range(num):
        rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(1000 + code, i)))
        if kind == "gaussian_noise":
            img = rng.normal(128.0, 64.0, (size, size, 3))
        elif kind == "uniform_noise":
            img = rng.integers(0, 256, (size, size, 3))
        elif kind == "blobs":
            img = _blobs(rng, size)
        else:
            img = _gratings(rng, size)
        out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


# ------------------------------------------------------------------------------ front doors


def load_id_dataset(
    name: str = "synthetic",
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int = 32,
    seed: int = 0,
    n_train_per_class: int = 100,
    n_test_per_class: int = 50,
    max_train: int | None = None,
    max_test: int | None = None,
    recolour: bool = False,
) -> ClassificationData:
    """In-distribution classification data: ``synthetic`` (default, offline) or ``cifar10`` /
    ``cifar100`` (TFDS ``train`` / ``test``).

    Args:
        name: one of :data:`ID_DATASETS`.
        data_dir: TFDS data directory (TFDS sets only).
        image_size: side of the returned images (CIFAR is native 32).
        seed: generator seed (synthetic) / subset seed (TFDS with ``max_*``).
        n_train_per_class, n_test_per_class: synthetic set sizes.
        max_train, max_test: TFDS subset sizes (``None`` = the whole split).
        recolour: synthetic only, see :func:`synthetic_classification`.

    Raises:
        ValueError: unknown name (lists the known ones).
        DatasetNotPreparedError: a TFDS set is not prepared in ``data_dir``.
    """
    if name not in ID_DATASETS:
        raise ValueError(f"unknown in-distribution dataset {name!r}; known: {', '.join(ID_DATASETS)}")
    if name == "synthetic":
        return synthetic_classification(
            seed, n_train_per_class=n_train_per_class, n_test_per_class=n_test_per_class,
            image_size=image_size, recolour=recolour,
        )
    spec = TFDS_DATASETS[name]
    tr_x, tr_y = load_tfds_images(name, split=spec.id_split, data_dir=data_dir, image_size=image_size,
                                  max_examples=max_train, seed=seed)
    te_x, te_y = load_tfds_images(name, split=spec.eval_split, data_dir=data_dir,
                                  image_size=image_size, max_examples=max_test, seed=seed)
    names = tuple(str(i) for i in range(spec.num_classes))
    return ClassificationData(tr_x, tr_y, te_x, te_y, names, name)


def load_ood_sets(
    names: Iterable[str],
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int = 32,
    num: int | None = 500,
    seed: int = 0,
    recolour: bool = False,
) -> dict[str, np.ndarray]:
    """Load OOD image sets by name (generated or TFDS), all at ``image_size``.

    Args:
        names: from :data:`KNOWN_OOD_SETS` (or ``lsun/<category>``).
        data_dir: TFDS data directory.
        image_size: the ID resolution.
        num: images per set (generated sets: exactly ``num``; TFDS sets: a deterministic
            random subset of at most ``num``; ``None`` = the whole TFDS split, and 500 for
            generated sets).
        seed: generator / subset seed.
        recolour: recolour ``synthetic_heldout`` (match the ID set's ``recolour``).

    Returns:
        ``{name: (n, S, S, 3) uint8}`` in the order given.

    Raises:
        ValueError: no names, duplicate or unknown names (lists the known ones).
        DatasetNotPreparedError: a TFDS set is not prepared in ``data_dir``.
    """
    names = list(names)
    if not names:
        raise ValueError("no OOD sets named")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate OOD set names in {names}")
    for n in names:
        if n not in KNOWN_OOD_SETS and not n.startswith("lsun/"):
            raise ValueError(f"unknown OOD set {n!r}; known: {', '.join(KNOWN_OOD_SETS)} (and lsun/<category>)")
    out = {}
    gen_num = 500 if num is None else num
    for n in names:
        if n == "synthetic_heldout":
            out[n] = synthetic_heldout(gen_num, seed=seed, image_size=image_size, recolour=recolour)
        elif n in PROCEDURAL_OOD_SETS:
            out[n] = procedural_ood(n, gen_num, seed=seed, image_size=image_size)
        else:
            out[n], _ = load_tfds_images(n, data_dir=data_dir, image_size=image_size, max_examples=num, seed=seed)
    return out
