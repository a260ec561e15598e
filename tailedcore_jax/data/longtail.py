"""Long-tail noisy training sets (step / Pareto tails, injected test defects) as record lists.

Host-side module (NumPy only). Nothing is copied on disk: a split is a list of
:class:`TrainRecord` pointing at the pristine files (an injected defect points at its test
image, which also stays in the test set: the "overlap" protocol of the paper).

Two ways to get a split:

* **The paper's exact splits** from the official manifests
  (``manifest/{mvtecad-nlt,visa-nlt}/{step_k1,step_k4,pareto}/seed0{1..5}/`` with
  ``prune_good.txt`` and ``inject_defects.txt`` in jungyg/TailedCore):
  :func:`read_manifest` + :func:`apply_manifest` (= ``make_mvtecad_nlt.py`` without copying).
  :func:`nlt_train_records` reads a folder that was already built that way.
* **New splits from a seed** with the generator logic of
  ``roomo7time/tailedcore:make_tailed_noisy_mvtec.py``:
  :func:`build_step_split` (round(0.6 C) tail classes keep K images; each head class gets
  ``min(#test anomalies, round(noise_ratio * #train))`` defects), :func:`build_pareto_split`
  (discrete Pareto alpha = 6, min 5, the largest-pmf class keeps all its images, a random
  class permutation of the pmf; ``round(noise_ratio * total)`` defects spread by
  walking a shuffled per-image list over the classes with >= 20 kept images) and the generic
  :func:`build_longtail_split` for explicit per-class counts.

Randomness: this host-side module draws from ``np.random.default_rng(seed)`` (the official
generator used Python's ``random``/NumPy global state with seeds 101-105, so the same seed
here gives a different -- equally distributed -- split; use the manifests for the paper's
splits). One generator per call, consumed in this order: (1) class sizes (step: the tail
classes; Pareto: ``n_iter`` permutations), (2) for each shrunk class in sorted order, the
kept images, (3) Pareto only: the per-image walk that sets the noise counts, (4) for each
noisy class in sorted order, the injected defect images.

The ground-truth class of every training image (``TrainRecord.class_name``) and its noise
flag are kept for evaluating TailSampler and the noise filter; they are never model inputs.

Errors: problems with manifests and folders raise
:class:`~tailedcore_jax.data.mvtec.DatasetError` (missing files and folders its subclass
``DatasetFileNotFoundError``, also a ``FileNotFoundError``); a message about a manifest line
starts with ``<manifest file>:<line number>:``.

References:
    Jung et al., "TailedCore: Few-Shot Sampling for Unsupervised Long-Tail Noisy Anomaly
    Detection", CVPR 2025. Official code: jungyg/TailedCore (``make_mvtecad_nlt.py``,
    ``manifest/``); roomo7time/tailedcore (``make_tailed_noisy_mvtec.py``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tailedcore_jax.data.mvtec import (
    DatasetError,
    DatasetFileNotFoundError,
    ImageRecord,
    find_mask,
    require_images,
    list_classes,
)

__all__ = [
    "MANIFEST_DATASETS",
    "MANIFEST_SETTINGS",
    "MVTEC_TRAIN_SIZES",
    "VISA_TRAIN_SIZES",
    "LongTailSplit",
    "Manifest",
    "TrainRecord",
    "apply_manifest",
    "build_longtail_split",
    "build_pareto_split",
    "build_step_split",
    "class_ids",
    "longtail_split",
    "manifest_class_counts",
    "manifest_dir",
    "nlt_train_records",
    "pareto_class_sizes",
    "pareto_noise_counts",
    "pareto_pmf",
    "read_manifest",
    "redistribute_class_sizes",
    "step_class_sizes",
    "step_noise_counts",
]

logger = logging.getLogger(__name__)

#: Pristine ``train/good`` sizes of MVTec AD (``NUM_TRAIN_SAMPLES_MVTEC`` in the generator).
MVTEC_TRAIN_SIZES: dict[str, int] = {
    "bottle": 209,
    "cable": 224,
    "capsule": 219,
    "carpet": 280,
    "grid": 264,
    "hazelnut": 391,
    "leather": 245,
    "metal_nut": 220,
    "pill": 267,
    "screw": 320,
    "tile": 230,
    "toothbrush": 60,
    "transistor": 213,
    "wood": 247,
    "zipper": 240,
}
#: Pristine ``train/good`` sizes of VisA with ``split_csv/1cls.csv`` (with them, the released
#: VisA manifests give the training-set sizes checked in ``tests/test_longtail.py``).
VISA_TRAIN_SIZES: dict[str, int] = {
    "candle": 900,
    "capsules": 542,
    "cashew": 450,
    "chewinggum": 453,
    "fryum": 450,
    "macaroni1": 900,
    "macaroni2": 900,
    "pcb1": 904,
    "pcb2": 901,
    "pcb3": 905,
    "pcb4": 904,
    "pipe_fryum": 450,
}
MANIFEST_DATASETS = ("mvtecad-nlt", "visa-nlt")
MANIFEST_SETTINGS = ("step_k1", "step_k4", "pareto")


class TrainRecord(NamedTuple):
    """One image of a long-tail noisy training set.

    Attributes:
        path: the file to read (for an injected defect: its pristine test image).
        class_name: ground-truth product class (evaluation only, never a model input).
        is_noise: True for an injected test defect (evaluation only).
        defect_type: ``"good"``, or the defect type of an injected image.
        key: path in the built NLT layout, ``"<class>/train/good/<file>"`` for normal images
            and ``"<class>/train/good/<defect>_<file>"`` for injected ones (manifest form).
        noise_mask_path: the ground-truth mask of an injected defect (analysis only; named so
            that batch loaders never pick it up as a training mask), else None.
    """

    path: str
    class_name: str
    is_noise: bool
    defect_type: str
    key: str
    noise_mask_path: str | None = None


class LongTailSplit(NamedTuple):
    """A long-tail noisy training set.

    Attributes:
        train: :class:`TrainRecord` s in the official loader's order (classes sorted, then
            ``train/good`` file names sorted, injected ``<defect>_<file>`` names among them).
        class_sizes: normal (non-noise) training images kept per class.
        noise_counts: injected defects per class (classes without noise absent).
        tail_classes / head_classes: sorted class names. Step: tail = classes cut to K.
            Pareto: tail = classes with fewer than ``head_min`` (20) kept images, i.e. the
            classes that receive no noise.
        setting: ``"step_k1"``, ``"step_k4"``, ``"pareto"`` or ``"custom"``.
        seed: the seed it was built from (None for manifests without one).
    """

    train: list
    class_sizes: dict
    noise_counts: dict
    tail_classes: tuple
    head_classes: tuple
    setting: str
    seed: int | None


class Manifest(NamedTuple):
    """The two official manifest files of one setting and seed.

    Attributes:
        prune: ``"<class>/train/good/<file>"`` normal images removed from the pristine set.
        inject: ``"<class>/train/good/<defect>_<file>"`` entries, each a copy of
            ``<class>/test/<defect>/<file>``.
        dataset / setting / seed: from the directory name when known, else None.
        prune_lines / inject_lines: the line number of every entry in its file (empty when
            the manifest was not read from files); used in error messages.
        directory: the directory the files were read from, else None.
    """

    prune: tuple
    inject: tuple
    dataset: str | None = None
    setting: str | None = None
    seed: int | None = None
    prune_lines: tuple = ()
    inject_lines: tuple = ()
    directory: str | None = None


# --------------------------------------------------------------------------------------------
# Class sizes and noise counts
# --------------------------------------------------------------------------------------------


def _rng(seed, rng):
    if rng is not None:
        if seed is not None:
            raise ValueError("give seed or rng, not both")
        return rng
    if seed is None:
        raise ValueError("a seed (or an np.random.Generator) is required")
    return np.random.default_rng(seed)


def _check_sizes_mapping(class_sizes: Mapping[str, int], name="class_sizes") -> dict:
    if not class_sizes:
        raise ValueError(f"{name} is empty")
    out = {}
    for c, n in class_sizes.items():
        if int(n) != n or n < 0:
            raise ValueError(f"{name}[{c!r}] must be a non-negative int, got {n!r}")
        out[c] = int(n)
    return out


def pareto_pmf(num_classes: int, *, alpha: float = 6.0, eps: float = 0.01) -> np.ndarray:
    """Discrete Pareto pmf over ``num_classes`` bins (``get_discrete_pareto_pmf``).

    CDF differences of a Pareto(alpha, scale 1) on ``num_classes + 1`` equally spaced points
    between its ``eps`` and ``1 - eps`` quantiles. Returns ``(num_classes,)`` float64,
    decreasing (it does not sum to 1).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    lo = (1.0 - eps) ** (-1.0 / alpha)  # ppf(eps)
    hi = eps ** (-1.0 / alpha)  # ppf(1 - eps)
    x = np.linspace(lo, hi, num_classes + 1)
    cdf = 1.0 - x ** (-alpha)
    return np.diff(cdf)


def redistribute_class_sizes(
    sizes: Sequence[int], pmf: Sequence[float], *, min_count: int = 5
) -> list[int]:
    """Scale a pmf to class sizes (``redistribute_num_class_samples``).

    The class with the largest pmf keeps all its images; the others get
    ``np.round(pmf * factor)`` clipped to ``[min_count, original size]``.

    Raises:
        ValueError: a class has ``<= min_count`` images (the official code asserts this), or
            lengths differ.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    pmf = np.asarray(pmf, dtype=np.float64)
    if sizes.shape != pmf.shape:
        raise ValueError(f"sizes {sizes.shape} and pmf {pmf.shape} differ in length")
    if not (sizes > min_count).all():
        raise ValueError(
            f"every class needs more than min_count={min_count} images, got {sizes.tolist()}"
        )
    i = int(np.argmax(pmf))
    desired = np.round(pmf * (sizes[i] / pmf[i])).astype(np.int64)
    return np.maximum(np.minimum(sizes, desired), min_count).astype(int).tolist()


def pareto_class_sizes(
    class_sizes: Mapping[str, int],
    *,
    seed: int | None = None,
    rng: np.random.Generator | None = None,
    alpha: float = 6.0,
    min_count: int = 5,
    class_order: Sequence[str] | None = None,
    n_iter: int = 1,
) -> dict[str, int]:
    """Pareto long-tail class sizes (``_make_class_info_pareto_tail``).

    With ``class_order`` the i-th class of it gets the i-th largest pmf value (no
    randomness). Otherwise the pmf is randomly permuted over the classes (sorted by name).
    ``n_iter > 1`` draws that many permutations and keeps the one with the largest total
    (first on ties), as one version of the dev-repo generator does; the released manifests
    were not made that way (e.g. MVTec Pareto seed01 keeps all 264 ``grid`` images, where
    maximising the total would give ``hazelnut``'s 391 the largest share), so the default
    is a single permutation. Every released Pareto manifest (MVTec and VisA, 5 seeds) equals
    this function with ``class_order`` = its classes sorted by kept count.

    Returns:
        ``{class: kept count}`` in sorted class order.
    """
    sizes = _check_sizes_mapping(class_sizes)
    names = sorted(sizes)
    orig = [sizes[c] for c in names]
    pmf = pareto_pmf(len(names), alpha=alpha)
    if class_order is not None:
        if sorted(class_order) != names:
            raise ValueError(f"class_order {list(class_order)} must be a permutation of {names}")
        desc = np.sort(pmf)[::-1]
        dist = np.empty_like(pmf)
        for rank, c in enumerate(class_order):
            dist[names.index(c)] = desc[rank]
        best = redistribute_class_sizes(orig, dist, min_count=min_count)
    else:
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        g = _rng(seed, rng)
        best, best_total = None, -1
        dist = pmf.copy()
        for _ in range(n_iter):
            dist = g.permutation(dist)
            cand = redistribute_class_sizes(orig, dist, min_count=min_count)
            if sum(cand) > best_total:
                best, best_total = cand, sum(cand)
    return dict(zip(names, best))


def step_class_sizes(
    class_sizes: Mapping[str, int],
    *,
    k: int,
    tail_ratio: float = 0.6,
    seed: int | None = None,
    rng: np.random.Generator | None = None,
    tail_classes: Sequence[str] | None = None,
) -> tuple[dict[str, int], tuple[str, ...]]:
    """Step long-tail class sizes (``_make_class_info_step_tail``).

    ``round(C * tail_ratio)`` classes (drawn without replacement from the sorted class list
    unless ``tail_classes`` is given) keep ``min(k, size)`` images; the others keep all.

    Returns:
        ``({class: kept count}, sorted tail classes)``.
    """
    sizes = _check_sizes_mapping(class_sizes)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    names = sorted(sizes)
    n_tail = round(len(names) * tail_ratio)
    if tail_classes is None:
        g = _rng(seed, rng)
        idx = g.choice(len(names), size=n_tail, replace=False)
        tail = tuple(sorted(names[i] for i in idx))
    else:
        tail = tuple(sorted(tail_classes))
        unknown = set(tail) - set(names)
        if unknown:
            raise ValueError(f"tail_classes not in the dataset: {sorted(unknown)}")
        if len(set(tail)) != len(tail):
            raise ValueError(f"tail_classes has duplicates: {list(tail_classes)}")
    kept = {c: (min(k, sizes[c]) if c in tail else sizes[c]) for c in names}
    return kept, tail


def step_noise_counts(
    class_sizes: Mapping[str, int],
    anomaly_counts: Mapping[str, int],
    head_classes: Sequence[str],
    *,
    noise_ratio: float,
) -> dict[str, int]:
    """Noise per head class for step tails: ``min(#anomalies, round(noise_ratio * size))``.

    ``class_sizes`` are the pristine (= kept, for head classes) training sizes; Python
    ``round`` as in the official code. Classes with 0 noise are left out.
    """
    if not 0 <= noise_ratio <= 1:
        raise ValueError(f"noise_ratio must be in [0, 1], got {noise_ratio}")
    out = {}
    for c in sorted(head_classes):
        n = min(int(anomaly_counts.get(c, 0)), round(class_sizes[c] * noise_ratio))
        if n > 0:
            out[c] = n
    return out


def pareto_noise_counts(
    kept_sizes: Mapping[str, int],
    *,
    noise_ratio: float,
    head_min: int = 20,
    anomaly_counts: Mapping[str, int] | None = None,
    seed: int | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, int]:
    """Noise per class for Pareto tails (``sample_name2size``).

    The total is ``round(noise_ratio * sum(kept))``; it is spread by walking a random
    permutation of the per-image class list and counting only classes with ``>= head_min``
    kept images, so it is roughly proportional to class size. If ``anomaly_counts`` is given,
    a class stops receiving noise when its test anomalies are used up (the official code
    would fail there); the total can then be smaller.
    """
    sizes = _check_sizes_mapping(kept_sizes, "kept_sizes")
    if not 0 <= noise_ratio <= 1:
        raise ValueError(f"noise_ratio must be in [0, 1], got {noise_ratio}")
    names = sorted(sizes)
    total = round(sum(sizes.values()) * noise_ratio)
    flat = np.repeat(np.arange(len(names)), [sizes[c] for c in names])
    g = _rng(seed, rng)
    order = g.permutation(flat)
    counts = Counter()
    given = 0
    if total > 0:
        for ci in order:
            c = names[int(ci)]
            if sizes[c] < head_min:
                continue
            if anomaly_counts is not None and counts[c] >= int(anomaly_counts.get(c, 0)):
                continue
            counts[c] += 1
            given += 1
            if given == total:
                break
    return {c: counts[c] for c in names if counts[c] > 0}


# --------------------------------------------------------------------------------------------
# Splits from counts
# --------------------------------------------------------------------------------------------


def _sort_key(rec: TrainRecord):
    return (rec.class_name, rec.key.rsplit("/", 1)[-1])


def _group(records, *, want_label: int | None):
    out: dict[str, list] = {}
    for r in records:
        if want_label is not None and int(getattr(r, "label", 0)) != want_label:
            continue
        out.setdefault(r.class_name, []).append(r)
    return out


def _train_record(r: ImageRecord) -> TrainRecord:
    name = r.key.rsplit("/", 1)[-1] if getattr(r, "key", None) else os.path.basename(r.path)
    return TrainRecord(
        path=r.path,
        class_name=r.class_name,
        is_noise=False,
        defect_type="good",
        key=f"{r.class_name}/train/good/{name}",
    )


def _noise_record(r: ImageRecord) -> TrainRecord:
    name = r.key.rsplit("/", 1)[-1] if getattr(r, "key", None) else os.path.basename(r.path)
    return TrainRecord(
        path=r.path,
        class_name=r.class_name,
        is_noise=True,
        defect_type=r.defect_type,
        key=f"{r.class_name}/train/good/{r.defect_type}_{name}",
        noise_mask_path=getattr(r, "mask_path", None),
    )


def build_longtail_split(
    train_records: Sequence[ImageRecord],
    test_records: Sequence[ImageRecord],
    class_sizes: Mapping[str, int],
    noise_counts: Mapping[str, int],
    *,
    seed: int | None = None,
    rng: np.random.Generator | None = None,
    tail_classes: Sequence[str] | None = None,
    head_min: int = 20,
    setting: str = "custom",
) -> LongTailSplit:
    """Training set with the given kept counts and injected defects, picked at random.

    For every class in sorted order whose kept count is below its pristine count, the kept
    images are drawn without replacement; then for every noisy class in sorted order, the
    injected defects are drawn without replacement from its test defect images (uniform
    over all defect types). Test records are not changed (overlap protocol).

    Args:
        train_records: pristine training records (``label`` 0, e.g. ``mvtec_records(root,
            "train")``).
        test_records: test records; those with ``label == 1`` are the noise pool.
        class_sizes: kept normal images per class (classes not listed keep all).
        noise_counts: injected defects per class.
        tail_classes: default: classes with fewer than ``head_min`` kept images.

    Raises:
        ValueError: a count larger than what is available, or an unknown class.
    """
    g = _rng(seed, rng)
    train_by = _group(train_records, want_label=None)
    anom_by = _group(test_records, want_label=1)
    unknown = (set(class_sizes) | set(noise_counts)) - set(train_by)
    if unknown:
        raise ValueError(f"classes without training records: {sorted(unknown)}")
    kept_sizes = {}
    out: list[TrainRecord] = []
    for c in sorted(train_by):
        recs = train_by[c]
        n = int(class_sizes.get(c, len(recs)))
        if not 0 <= n <= len(recs):
            raise ValueError(f"class {c!r}: asked to keep {n} of {len(recs)} training images")
        if n < len(recs):
            idx = np.sort(g.choice(len(recs), size=n, replace=False))
            recs = [recs[i] for i in idx]
        kept_sizes[c] = n
        out.extend(_train_record(r) for r in recs)
    noise = {}
    for c in sorted(noise_counts):
        n = int(noise_counts[c])
        if n <= 0:
            continue
        pool = anom_by.get(c, [])
        if n > len(pool):
            raise ValueError(f"class {c!r}: {n} noise images asked, only {len(pool)} test defects")
        idx = np.sort(g.choice(len(pool), size=n, replace=False))
        out.extend(_noise_record(pool[i]) for i in idx)
        noise[c] = n
    out.sort(key=_sort_key)
    if tail_classes is None:
        tail = tuple(sorted(c for c, n in kept_sizes.items() if n < head_min))
    else:
        tail = tuple(sorted(tail_classes))
    head = tuple(sorted(c for c in kept_sizes if c not in tail))
    return LongTailSplit(out, kept_sizes, noise, tail, head, setting, seed)


def _anomaly_counts(test_records) -> dict[str, int]:
    return {c: len(v) for c, v in _group(test_records, want_label=1).items()}


def _train_sizes(train_records) -> dict[str, int]:
    return {c: len(v) for c, v in _group(train_records, want_label=None).items()}


def build_step_split(
    train_records: Sequence[ImageRecord],
    test_records: Sequence[ImageRecord],
    *,
    k: int,
    seed: int,
    tail_ratio: float = 0.6,
    noise_ratio: float = 0.1,
    tail_classes: Sequence[str] | None = None,
) -> LongTailSplit:
    """Step long-tail noisy split (K = 1 or 4 in the paper; MVTec noise 0.10, VisA 0.05).

    ``round(C * tail_ratio)`` tail classes keep ``k`` images; each head class receives
    ``min(#test anomalies, round(noise_ratio * #train))`` test defects (no noise on tails).
    """
    g = np.random.default_rng(seed)
    sizes = _train_sizes(train_records)
    kept, tail = step_class_sizes(
        sizes, k=k, tail_ratio=tail_ratio, rng=g, tail_classes=tail_classes
    )
    head = [c for c in sorted(sizes) if c not in tail]
    noise = step_noise_counts(sizes, _anomaly_counts(test_records), head, noise_ratio=noise_ratio)
    # kept images first (all shrunk classes), then the noise, from the same generator
    return build_longtail_split(
        train_records, test_records, kept, noise, rng=g, tail_classes=tail, setting=f"step_k{k}"
    )._replace(seed=seed)


def build_pareto_split(
    train_records: Sequence[ImageRecord],
    test_records: Sequence[ImageRecord],
    *,
    seed: int,
    alpha: float = 6.0,
    min_count: int = 5,
    noise_ratio: float = 0.1,
    head_min: int = 20,
    class_order: Sequence[str] | None = None,
    n_iter: int = 1,
) -> LongTailSplit:
    """Pareto long-tail noisy split (alpha = 6, min 5; noise on classes with >= 20 kept).

    Tail classes: those with fewer than ``head_min`` kept images.
    """
    g = np.random.default_rng(seed)
    sizes = _train_sizes(train_records)
    if class_order is not None:
        kept = pareto_class_sizes(sizes, alpha=alpha, min_count=min_count, class_order=class_order)
    else:
        kept = pareto_class_sizes(sizes, rng=g, alpha=alpha, min_count=min_count, n_iter=n_iter)
    # the kept images are drawn before the noise walk, as documented in the module docstring
    train_by = _group(train_records, want_label=None)
    chosen = []
    for c in sorted(train_by):
        recs = train_by[c]
        if kept[c] < len(recs):
            idx = np.sort(g.choice(len(recs), size=kept[c], replace=False))
            recs = [recs[i] for i in idx]
        chosen.extend(recs)
    noise = pareto_noise_counts(
        kept,
        noise_ratio=noise_ratio,
        head_min=head_min,
        anomaly_counts=_anomaly_counts(test_records),
        rng=g,
    )
    tail = tuple(sorted(c for c, n in kept.items() if n < head_min))
    return build_longtail_split(
        chosen,
        test_records,
        kept,
        noise,
        rng=g,
        tail_classes=tail,
        head_min=head_min,
        setting="pareto",
    )._replace(seed=seed)


def longtail_split(
    train_records: Sequence[ImageRecord],
    test_records: Sequence[ImageRecord],
    setting: str,
    *,
    seed: int,
    noise_ratio: float = 0.1,
    **kwargs,
) -> LongTailSplit:
    """Dispatch on ``setting``: ``"step_k<K>"`` (K = 1, 4 in the paper) or ``"pareto"``."""
    if setting == "pareto":
        return build_pareto_split(
            train_records, test_records, seed=seed, noise_ratio=noise_ratio, **kwargs
        )
    if setting.startswith("step_k") and setting[6:].isdigit():
        return build_step_split(
            train_records,
            test_records,
            k=int(setting[6:]),
            seed=seed,
            noise_ratio=noise_ratio,
            **kwargs,
        )
    raise ValueError(f"unknown setting {setting!r}; expected 'step_k1', 'step_k4' or 'pareto'")


# --------------------------------------------------------------------------------------------
# Official manifests
# --------------------------------------------------------------------------------------------

_MANIFEST_FILES = {"prune": "prune_good.txt", "inject": "inject_defects.txt"}


def manifest_dir(root: str | os.PathLike, dataset: str, setting: str, seed: int) -> Path:
    """``<root>/<dataset>/<setting>/seedNN`` (e.g. ``mvtecad-nlt/step_k4/seed03``)."""
    if dataset not in MANIFEST_DATASETS:
        raise ValueError(f"dataset must be one of {MANIFEST_DATASETS}, got {dataset!r}")
    if setting not in MANIFEST_SETTINGS:
        raise ValueError(f"setting must be one of {MANIFEST_SETTINGS}, got {setting!r}")
    return Path(root) / dataset / setting / f"seed{int(seed):02d}"


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` of the non-empty lines (a UTF-8 BOM is ignored)."""
    if not path.is_file():
        raise DatasetFileNotFoundError(f"manifest file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [(i, s) for i, line in enumerate(f, start=1) if (s := line.strip())]
    except UnicodeDecodeError as e:
        raise DatasetError(f"cannot read manifest file {path}: {e}") from e


def _check_entry(path: Path, line_no: int, entry: str) -> str:
    parts = entry.split("/")
    if len(parts) != 4 or parts[1:3] != ["train", "good"] or not parts[0] or not parts[3]:
        raise DatasetError(
            f"{path}:{line_no}: malformed entry {entry!r} (expected <class>/train/good/<file>)"
        )
    return entry


def _read_manifest_file(path: Path) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Entries of one manifest file and their line numbers; malformed and repeated lines raise."""
    entries, lines, first = [], [], {}
    for i, e in _read_lines(path):
        _check_entry(path, i, e)
        if e in first:
            raise DatasetError(f"{path}:{i}: duplicate entry {e!r} (first on line {first[e]})")
        first[e] = i
        entries.append(e)
        lines.append(i)
    return tuple(entries), tuple(lines)


def read_manifest(
    path: str | os.PathLike,
    dataset: str | None = None,
    setting: str | None = None,
    seed: int | None = None,
) -> Manifest:
    """Read ``prune_good.txt`` and ``inject_defects.txt`` (with the line of every entry).

    ``path`` is either the seed directory itself, or the manifest root when ``dataset``,
    ``setting`` and ``seed`` are given (then :func:`manifest_dir` is used). When ``path``
    ends in ``<dataset>/<setting>/seedNN`` those fields are filled from it. Each line must
    be ``<class>/train/good/<file>``; blank lines are ignored.

    Raises:
        DatasetFileNotFoundError: a missing directory or file.
        DatasetError: a malformed or repeated line (names the file and the line).
    """
    if dataset is not None or setting is not None or seed is not None:
        if dataset is None or setting is None or seed is None:
            raise ValueError("give all of dataset, setting and seed, or none")
        d = manifest_dir(path, dataset, setting, seed)
    else:
        d = Path(path)
        parts = d.resolve().parts
        if len(parts) >= 3 and parts[-1].startswith("seed") and parts[-1][4:].isdigit():
            seed = int(parts[-1][4:])
            setting = parts[-2]
            dataset = parts[-3]
    if not d.is_dir():
        raise DatasetFileNotFoundError(f"manifest directory not found: {d}")
    prune, prune_lines = _read_manifest_file(d / _MANIFEST_FILES["prune"])
    inject, inject_lines = _read_manifest_file(d / _MANIFEST_FILES["inject"])
    return Manifest(prune, inject, dataset, setting, seed, prune_lines, inject_lines, str(d))


def manifest_class_counts(
    manifest: Manifest, pristine_sizes: Mapping[str, int]
) -> tuple[dict[str, int], dict[str, int]]:
    """Kept normal images and injected defects per class, from the manifest alone.

    Args:
        pristine_sizes: pristine training sizes, e.g. :data:`MVTEC_TRAIN_SIZES`.

    Returns:
        ``(kept sizes, noise counts)``; ``sum(kept) + sum(noise)`` is the training-set size.

    Raises:
        ValueError: a manifest class missing from ``pristine_sizes`` or pruned below zero.
    """
    pruned = Counter(e.split("/", 1)[0] for e in manifest.prune)
    injected = Counter(e.split("/", 1)[0] for e in manifest.inject)
    unknown = (set(pruned) | set(injected)) - set(pristine_sizes)
    if unknown:
        raise ValueError(f"manifest classes not in pristine_sizes: {sorted(unknown)}")
    kept = {}
    for c in sorted(pristine_sizes):
        n = int(pristine_sizes[c]) - pruned.get(c, 0)
        if n < 0:
            raise ValueError(f"class {c!r}: {pruned[c]} pruned of {pristine_sizes[c]}")
        kept[c] = n
    return kept, {c: injected[c] for c in sorted(injected)}


def _resolve_defect(name: str, defect_types: Sequence[str]) -> str | None:
    # longest defect names first, as make_mvtecad_nlt.gather_defect_dirs does
    for d in sorted(sorted(defect_types), key=len, reverse=True):
        if name.startswith(f"{d}_"):
            return d
    return None


def _entry_location(manifest: Manifest, which: str, i: int) -> str:
    """``"<manifest file>:<line>"`` of entry ``i`` of ``manifest.<which>`` (or its number)."""
    lines = manifest.prune_lines if which == "prune" else manifest.inject_lines
    if manifest.directory is None or i >= len(lines):
        return f"manifest {which} entry #{i + 1}"
    return f"{Path(manifest.directory) / _MANIFEST_FILES[which]}:{lines[i]}"


def _dataset_root(records: Sequence) -> str | None:
    """The dataset root the records' paths start with (``path`` = root + ``key``), if any."""
    for r in records:
        path, key = Path(r.path).as_posix(), getattr(r, "key", None)
        if key and path.endswith(key):
            return path[: len(path) - len(key)]
    return None


def _missing(root: str | None, key: str) -> tuple[str, bool]:
    """``(path of key under root, whether that file is absent)``."""
    if root is None:
        return key, True
    path = root + key
    return path, not os.path.exists(path)


class _Reporter:
    """Raise (``on_error="raise"``) or log-and-skip (``"skip"``) one manifest problem."""

    def __init__(self, on_error: str):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error

    def __call__(self, message: str, exc_type=DatasetError) -> None:
        if self.on_error == "raise":
            raise exc_type(message)
        logger.warning("skipping: %s", message)


def _pruned_keys(manifest: Manifest, by_key: Mapping, problem: _Reporter) -> set[str]:
    """The prune entries that name pristine training records (the others are problems)."""
    root = _dataset_root(list(by_key.values()))
    prune = set()
    for i, e in enumerate(manifest.prune):
        if e in by_key:
            prune.add(e)
            continue
        path, absent = _missing(root, e)
        problem(
            f"{_entry_location(manifest, 'prune', i)}: prune entry {e!r} is not a training "
            "image of the pristine dataset ("
            + (f"{path}: no such file)" if absent else f"{path} is not among the given records)"),
            DatasetFileNotFoundError if absent else DatasetError,
        )
    return prune


def _injected_records(manifest: Manifest, test_records: Sequence, problem: _Reporter) -> list:
    """:class:`TrainRecord` s of the inject entries, from their source test records."""
    test_by_key = {r.key: r for r in test_records}
    root = _dataset_root(test_records)
    defects_by_class: dict[str, set] = {}
    for r in test_records:
        if int(r.label) == 1:
            defects_by_class.setdefault(r.class_name, set()).add(r.defect_type)
    out = []
    for i, e in enumerate(manifest.inject):
        loc = _entry_location(manifest, "inject", i)
        cls, _, _, fname = e.split("/")
        d = _resolve_defect(fname, defects_by_class.get(cls, ()))
        if d is None:
            problem(
                f"{loc}: cannot determine the defect type of inject entry {e!r} "
                f"(test defect folders of {cls!r}: {sorted(defects_by_class.get(cls, ()))})"
            )
            continue
        src_key = f"{cls}/test/{d}/{fname[len(d) + 1 :]}"
        src = test_by_key.get(src_key)
        if src is None:
            path, absent = _missing(root, src_key)
            reason = "no such file" if absent else "not among the given test records"
            problem(
                f"{loc}: inject entry {e!r} copies {src_key!r}, which is not in the test set "
                f"({path}: {reason})",
                DatasetFileNotFoundError if absent else DatasetError,
            )
            continue
        out.append(_noise_record(src))
    return out


def apply_manifest(
    manifest: Manifest,
    train_records: Sequence[ImageRecord],
    test_records: Sequence[ImageRecord],
    *,
    setting: str | None = None,
    head_min: int = 20,
    on_error: str = "raise",
) -> LongTailSplit:
    """The paper's training set from an official manifest, without copying files.

    Equivalent to ``make_mvtecad_nlt.py`` in jungyg/TailedCore: drop every ``prune`` entry
    from the pristine training records (matched on ``record.key``); add, for every ``inject``
    entry ``<class>/train/good/<defect>_<file>``, the test record
    ``<class>/test/<defect>/<file>`` (the defect is the longest test defect folder name that
    prefixes the file name).

    Tail classes: for ``step_*`` settings the pruned classes; otherwise the classes with
    fewer than ``head_min`` kept images. ``setting`` defaults to ``manifest.setting``.

    Raises:
        DatasetError: a prune entry that is not a pristine training record, an inject entry
            whose defect type or source test record cannot be found; the message starts with
            ``<manifest file>:<line>:`` and gives the expected path
            (:class:`DatasetFileNotFoundError` when that file does not exist). With
            ``on_error="skip"`` these are logged and the entry ignored.
    """
    problem = _Reporter(on_error)
    setting = setting if setting is not None else (manifest.setting or "custom")
    by_key = {r.key: r for r in train_records}
    prune = _pruned_keys(manifest, by_key, problem)
    out = [_train_record(r) for k, r in by_key.items() if k not in prune]
    out.extend(_injected_records(manifest, test_records, problem))
    out.sort(key=_sort_key)
    kept = Counter(r.class_name for r in out if not r.is_noise)
    classes = sorted({r.class_name for r in train_records})
    kept_sizes = {c: kept.get(c, 0) for c in classes}
    noise = dict(sorted(Counter(r.class_name for r in out if r.is_noise).items()))
    if setting.startswith("step"):
        tail = tuple(sorted({by_key[e].class_name for e in prune}))
    else:
        tail = tuple(sorted(c for c, n in kept_sizes.items() if n < head_min))
    head = tuple(c for c in classes if c not in tail)
    return LongTailSplit(out, kept_sizes, noise, tail, head, setting, manifest.seed)


def nlt_train_records(
    root: str | os.PathLike, *, classes: Sequence[str] | None = None
) -> list[TrainRecord]:
    """Training records of an already built long-tail noisy folder (MVTec layout).

    Every file in ``<class>/train/good`` whose name starts with ``<defect>_`` for a defect
    folder of ``<class>/test`` (longest name first) is an injected defect (``is_noise``);
    its mask is looked up in ``ground_truth/<defect>/``. Normal MVTec/VisA file names are
    numeric, so they never match.

    Raises:
        DatasetFileNotFoundError: missing root, class or ``train/good`` folder.
        DatasetError: a ``train/good`` folder without images.
    """
    root = Path(root)
    names = sorted(classes) if classes is not None else list_classes(root)
    out = []
    for c in names:
        out.extend(_nlt_class_records(root, c))
    return out


def _nlt_class_records(root: Path, c: str) -> list[TrainRecord]:
    good = root / c / "train" / "good"
    files = require_images(good, f"train/good folder of class {c!r}")
    test = root / c / "test"
    defects = (
        [p.name for p in test.iterdir() if p.is_dir() and p.name != "good"]
        if test.is_dir()
        else []
    )
    out = []
    for f in files:
        key = f"{c}/train/good/{f}"
        d = _resolve_defect(f, defects)
        if d is None:
            out.append(TrainRecord(str(good / f), c, False, "good", key))
            continue
        orig = f[len(d) + 1 :]
        mp = find_mask(root / c / "ground_truth" / d, os.path.splitext(orig)[0])
        out.append(TrainRecord(str(good / f), c, True, d, key, None if mp is None else str(mp)))
    return out


def class_ids(records: Sequence) -> tuple[tuple[str, ...], np.ndarray]:
    """Ground-truth class of every record as ids: ``(sorted class names, (N,) int32 ids)``."""
    names = tuple(sorted({r.class_name for r in records}))
    lut = {c: i for i, c in enumerate(names)}
    return names, np.asarray([lut[r.class_name] for r in records], dtype=np.int32)
