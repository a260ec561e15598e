"""The long-tail noisy anomaly-detection benchmark, stage by stage (host-side orchestration).

Load a long-tail noisy training set (the synthetic default, or MVTec AD / VisA with an
official manifest or a seeded split), build a backbone (random ResNet with BatchNorm
recalibration, or torchvision / timm weights from a file), extract PatchCore patch features
and image embeddings, select the tail images with TailSampler, fit PatchCore, SoftPatch and
TailedCore (one memory bank over all classes, as the official code), score the test set and
evaluate image AUROC, pixel AUROC and AUPRO per class plus the C_t / C_h / all means of the
paper (TailedCore, CVPR 2025, Tables 1-4).

Features and memory banks are cached under ``<out>/cache`` (:mod:`experiments.cache`): each
entry records the config fields, the library version and sources, the data files (size and
modification time) and the weights and manifests (content hash) it was computed from, so an
interrupted run resumes and a changed input is recomputed, with the reason logged.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from experiments.cache import cached, fingerprint
from experiments.common import jax_banner
from experiments.tailedcore.config import BANK_FIELDS, FEATURE_FIELDS, TailedCoreConfig
from tailedcore_jax import augment, memory, metrics
from tailedcore_jax.anomaly_map import anomaly_maps
from tailedcore_jax.features import make_feature_extractor
from tailedcore_jax.ood import negative_aware_norm
from tailedcore_jax.tailsampler import tail_sample_mask

__all__ = ["DataSplit", "load_split", "build_backbone", "extract_features", "run_tailsampler",
           "tailsampler_quality", "fit_banks", "score_bank", "evaluate_method", "nan_variant",
           "run"]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataSplit:
    """A long-tail noisy split, readable in batches of preprocessed images.

    ``load_train(idx, crop)`` / ``load_test(idx)`` return float32 NHWC images (normalised)
    for the given positions; ``crop=False`` gives the resized but uncropped image that the
    rotation augmentation needs. Ground truth (``train_class``, ``train_is_noise``) is for
    evaluation only and is never given to a model.
    """

    class_names: tuple[str, ...]
    train_class: np.ndarray
    train_is_noise: np.ndarray
    test_class: np.ndarray
    test_labels: np.ndarray
    tail_classes: tuple[str, ...]
    load_train: Callable[[np.ndarray, bool], np.ndarray]
    load_test: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    description: str
    files: tuple[str, ...] = ()
    manifest_files: tuple[str, ...] = ()

    @property
    def is_tail_class(self) -> np.ndarray:
        return np.array([c in self.tail_classes for c in self.class_names])


def _synthetic_split(cfg: TailedCoreConfig) -> DataSplit:
    from tailedcore_jax.data import mvtec, synthetic

    d = synthetic.make_synthetic(cfg.seed, setting=cfg.setting, noise_ratio=cfg.noise_ratio)

    def load_train(idx, crop=True):
        return mvtec.preprocess_images(d.train_images[idx], resize=cfg.resize,
                                       crop=cfg.image_size if crop else None)

    def load_test(idx):
        x = mvtec.preprocess_images(d.test_images[idx], resize=cfg.resize, crop=cfg.image_size)
        m = mvtec.preprocess_masks(d.test_masks[idx], resize=cfg.resize, crop=cfg.image_size)
        return x, m

    return DataSplit(
        class_names=tuple(d.class_names),
        train_class=np.asarray(d.train_class),
        train_is_noise=np.asarray(d.train_is_noise),
        test_class=np.asarray(d.test_class),
        test_labels=np.asarray(d.test_labels),
        tail_classes=tuple(d.tail_classes),
        load_train=load_train,
        load_test=load_test,
        description=f"synthetic (seed {cfg.seed}, {cfg.setting}, noise {cfg.noise_ratio})",
    )


def _real_records(cfg: TailedCoreConfig):
    """(split, test records, mask convention, description) of MVTec AD / VisA."""
    from tailedcore_jax.data import longtail, mvtec

    root = Path(cfg.data_root)
    if cfg.dataset == "visa" and (root / "split_csv").is_dir():
        train, test = mvtec.visa_records(root, "train"), mvtec.visa_records(root, "test")
        mask_values = "nonzero"
    else:
        train, test = mvtec.mvtec_records(root, "train"), mvtec.mvtec_records(root, "test")
        mask_values = "nonzero" if cfg.dataset == "visa" else "binary"
    manifest_files = ()
    if cfg.manifest_dir:
        name = "visa-nlt" if cfg.dataset == "visa" else "mvtecad-nlt"
        man = longtail.read_manifest(cfg.manifest_dir, name, cfg.setting, cfg.seed)
        split = longtail.apply_manifest(man, train, test)
        how = f"official manifest {name}/{cfg.setting}/seed{cfg.seed:02d}"
        d = longtail.manifest_dir(cfg.manifest_dir, name, cfg.setting, cfg.seed)
        manifest_files = tuple(str(d / f) for f in ("prune_good.txt", "inject_defects.txt"))
    else:
        split = longtail.longtail_split(train, test, cfg.setting, seed=cfg.seed,
                                        noise_ratio=cfg.noise_ratio)
        how = f"seeded split ({cfg.setting}, seed {cfg.seed}, noise {cfg.noise_ratio})"
    return split, test, mask_values, f"{cfg.dataset} at {root}, {how}", manifest_files


def _real_split(cfg: TailedCoreConfig) -> DataSplit:
    from tailedcore_jax.data import longtail, mvtec

    split, test, mask_values, description, manifest_files = _real_records(cfg)
    names, train_cls = longtail.class_ids(split.train)
    name_to_id = {n: i for i, n in enumerate(names)}
    train_records = list(split.train)

    def load_train(idx, crop=True):
        recs = [train_records[i] for i in np.asarray(idx)]
        return mvtec.load_batch(recs, resize=cfg.resize, crop=cfg.image_size if crop else None,
                                num_threads=2).images

    def load_test(idx):
        b = mvtec.load_batch([test[i] for i in np.asarray(idx)], resize=cfg.resize,
                             crop=cfg.image_size, with_masks=True, mask_values=mask_values,
                             num_threads=2)
        return b.images, b.masks

    return DataSplit(
        class_names=tuple(names),
        train_class=np.asarray(train_cls),
        train_is_noise=np.array([r.is_noise for r in train_records]),
        test_class=np.array([name_to_id[r.class_name] for r in test]),
        test_labels=np.array([r.label for r in test]),
        tail_classes=tuple(split.tail_classes),
        load_train=load_train,
        load_test=load_test,
        description=description,
        files=tuple(p for r in list(train_records) + list(test)
                    for p in (r.path, getattr(r, "mask_path", None)) if p is not None),
        manifest_files=manifest_files,
    )


def load_split(cfg: TailedCoreConfig) -> DataSplit:
    """The long-tail noisy split described by a resolved config."""
    return _synthetic_split(cfg) if cfg.dataset == "synthetic" else _real_split(cfg)


def _batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, n, batch_size):
        yield np.arange(i, min(i + batch_size, n))


def _padded(x: np.ndarray, batch_size: int) -> np.ndarray:
    """Pad a short last batch (repeating its last row) so every call has one shape."""
    if x.shape[0] == batch_size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], batch_size - x.shape[0], axis=0)])


# --------------------------------------------------------------------------------------------
# Backbone and features
# --------------------------------------------------------------------------------------------


def build_backbone(cfg: TailedCoreConfig, split: DataSplit, log=print):
    """(model, variables): converted weights from ``cfg.weights`` or a seeded random init,
    with BatchNorm statistics recalibrated on the training images when asked."""
    from tailedcore_jax.models import convert, resnet
    from tailedcore_jax.models.batchnorm import recalibrate_batch_norm

    if cfg.weights:
        sd = convert.load_state_dict(cfg.weights)
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        model, variables = convert.torchvision_to_flax(sd, cfg.arch)
        log(f"backbone: {cfg.arch} with weights from {cfg.weights}")
    else:
        ctor = getattr(resnet, cfg.arch, None)
        if ctor is None or cfg.arch not in resnet.ARCHITECTURES:
            raise ValueError(f"unknown arch {cfg.arch!r}; one of {resnet.ARCHITECTURES}")
        model = ctor()
        variables = jax.jit(model.init)(jax.random.key(cfg.model_seed, impl="rbg"),
                                        jnp.zeros((1, cfg.image_size, cfg.image_size, 3)))
        log("!" * 78)
        log(f"!! RANDOM-INITIALISED {cfg.arch} (seed {cfg.model_seed}): no pretrained weights.")
        log("!! Numbers are a functional check of the pipeline, not the paper's results.")
        log("!! Pass --weights wide_resnet50_2.pth (torchvision/timm) for the paper's recipe.")
        log("!" * 78)
    if cfg.bn_recalibration:
        n = len(split.train_class)
        batches = (split.load_train(idx, True) for idx in _batches(n, cfg.batch_size))
        variables = recalibrate_batch_norm(model, variables, batches)
        log(f"BatchNorm statistics recalibrated on {n} training images")
    return model, variables


def _extract(fn, load: Callable[[np.ndarray], np.ndarray], n: int, batch_size: int, desc: str):
    out: dict[str, list] = {}
    for idx in tqdm(list(_batches(n, batch_size)), desc=desc, leave=False):
        x = load(idx)
        res = fn(jnp.asarray(_padded(x, batch_size)))
        for k, v in res.items():
            out.setdefault(k, []).append(np.asarray(v)[: len(idx)])
    return {k: np.concatenate(v) for k, v in out.items()}


def _inputs(cfg: TailedCoreConfig, split: DataSplit, fields: tuple[str, ...]) -> dict:
    """What a cached value depends on: config fields, library, data files, weights, manifests."""
    hashed = {"weights": cfg.weights}
    hashed.update({f"manifest {Path(p).name}": p for p in split.manifest_files})
    return fingerprint({f: getattr(cfg, f) for f in fields}, data_files=split.files,
                       hashed_files=hashed)


def extract_features(cfg: TailedCoreConfig, split: DataSplit, extractor, cache: Path,
                     log=print) -> tuple[dict, dict]:
    """Train and test ``{"patches", "embedding"}`` features, cached under ``cache``."""
    key = cfg.cache_key(*FEATURE_FIELDS)
    inputs = _inputs(cfg, split, FEATURE_FIELDS)
    n_train, n_test = len(split.train_class), len(split.test_class)
    train = cached(cache / f"train_features_{key}", lambda: _extract(
        extractor, lambda i: split.load_train(i, True), n_train, cfg.batch_size, "train features"),
        inputs, log=log)

    def test_features():
        feats = _extract(extractor, lambda i: split.load_test(i)[0], n_test, cfg.batch_size,
                         "test features")
        return {"patches": feats["patches"], "embedding": feats["embedding"]}

    test = cached(cache / f"test_features_{key}", test_features, inputs, log=log)
    return train, test


# --------------------------------------------------------------------------------------------
# TailSampler and memory banks
# --------------------------------------------------------------------------------------------


def tailsampler_quality(split: DataSplit, tail: np.ndarray, class_sizes: np.ndarray) -> dict:
    """Missed tail images, anomalies included in the tail, class-size error (ground truth)."""
    is_tail_img = split.is_tail_class[split.train_class]
    true_sizes = np.bincount(split.train_class, minlength=len(split.class_names))[split.train_class]
    return {
        "selected": int(tail.sum()),
        "true_tail_images": int(is_tail_img.sum()),
        "missed_tail_pct": float(100 * (is_tail_img & ~tail).sum() / max(is_tail_img.sum(), 1)),
        "selected_anomalies_pct": float(100 * (tail & split.train_is_noise).sum() / max(tail.sum(), 1)),
        "selected_head_pct": float(100 * (tail & ~is_tail_img).sum() / max(tail.sum(), 1)),
        "class_size_rel_error_pct": float(100 * np.mean(np.abs(class_sizes - true_sizes) / true_sizes)),
        "predicted_class_sizes": class_sizes.tolist(),
        "true_class_sizes": true_sizes.tolist(),
    }


def run_tailsampler(cfg: TailedCoreConfig, split: DataSplit, embeddings: np.ndarray):
    """(tail mask, predicted class sizes, quality dict) of TailSampler on the embeddings."""
    tail, sizes = tail_sample_mask(jnp.asarray(embeddings), keep=cfg.tail_keep,
                                   percentile=cfg.tail_percentile,
                                   similarity_rounding=cfg.tail_similarity_rounding)
    tail, sizes = np.asarray(tail), np.asarray(sizes)
    return tail, sizes, tailsampler_quality(split, tail, sizes)


def _tail_augmented_features(cfg: TailedCoreConfig, split: DataSplit, extractor,
                             tail_idx: np.ndarray) -> np.ndarray:
    """Patch features of every rotated/flipped copy of the tail images, ``(M, D)``."""
    kind = cfg.augmentation
    copies = len(augment.tail_augmentation_params(kind))
    out = []
    for idx in _batches(len(tail_idx), max(1, cfg.batch_size // 8)):
        # the 90-degree variant rotates the crop; the others the resized, uncropped image
        imgs = split.load_train(tail_idx[idx], kind == "rotflip")
        aug = np.asarray(augment.tail_augmentations(jnp.asarray(imgs), kind, crop=cfg.image_size))
        for j in range(0, aug.shape[0], cfg.batch_size):
            chunk = aug[j:j + cfg.batch_size]
            res = extractor(jnp.asarray(_padded(chunk, cfg.batch_size)))
            out.append(np.asarray(res["patches"])[: chunk.shape[0]])
    feats = np.concatenate(out)
    assert feats.shape[0] == copies * len(tail_idx)
    return feats.reshape(-1, feats.shape[-1])


def _fit(method: str, key, cfg: TailedCoreConfig, patches, emb, tail, augmented):
    if method == "patchcore":
        return memory.fit_patchcore(key, patches, ratio=cfg.ratio)
    if method == "softpatch":
        return memory.fit_softpatch(key, patches, ratio=cfg.ratio, lof_k=cfg.lof_k,
                                    lof_drop=cfg.lof_drop)
    return memory.fit_tailedcore(key, patches, emb, ratio=cfg.ratio, lof_k=cfg.lof_k,
                                 lof_drop=cfg.lof_drop, tail_mask=tail,
                                 augmented_tail_features=augmented(), tail_keep=cfg.tail_keep,
                                 tail_percentile=cfg.tail_percentile)


def fit_banks(cfg: TailedCoreConfig, split: DataSplit, extractor, patches, emb, tail,
              cache: Path, *, log=print, timings: dict | None = None) -> dict:
    """``{method: MemoryBank}``, each fitted with ``fold_in(key(fit_seed), position)`` or
    resumed from ``cache``."""
    timings = {} if timings is None else timings
    key = jax.random.key(cfg.fit_seed)
    bank_key = cfg.cache_key(*BANK_FIELDS)
    inputs = _inputs(cfg, split, BANK_FIELDS)

    def augmented():
        if cfg.augmentation == "none" or not tail.any():
            return None
        return _tail_augmented_features(cfg, split, extractor, np.nonzero(tail)[0])

    banks: dict[str, memory.MemoryBank] = {}
    for m_i, method in enumerate(cfg.methods):
        t = time.perf_counter()
        k = jax.random.fold_in(key, m_i)
        raw = cached(cache / f"bank_{bank_key}_{method}", lambda: jax.block_until_ready(
            _fit(method, k, cfg, patches, emb, tail, augmented)), inputs, log=log)
        if not isinstance(raw, memory.MemoryBank):  # restored from a checkpoint: a mapping
            raw = memory.MemoryBank(**{f: raw.get(f) for f in memory.MemoryBank._fields})
        banks[method] = raw
        timings[f"fit_{method}_s"] = time.perf_counter() - t
        log(f"{method}: memory bank {int(np.asarray(banks[method].mask).sum())} rows "
            f"({timings[f'fit_{method}_s']:.1f} s)")
    return banks


# --------------------------------------------------------------------------------------------
# Scoring and evaluation
# --------------------------------------------------------------------------------------------

_score = jax.jit(memory.score)


def score_bank(bank, test_patches, batch_size: int, desc: str = "score"):
    """(image scores ``(n,)``, patch scores ``(n, h, w)``) of the test patches."""
    n = test_patches.shape[0]
    img_scores = np.zeros(n, np.float32)
    patch_scores = []
    for idx in tqdm(list(_batches(n, batch_size)), desc=desc, leave=False):
        q = _padded(np.asarray(test_patches[idx]), batch_size)
        s, p = _score(bank, jnp.asarray(q))
        img_scores[idx] = np.asarray(s)[: len(idx)]
        patch_scores.append(np.asarray(p)[: len(idx)])
    return img_scores, np.concatenate(patch_scores)


def _class_metrics(scores, maps, labels, masks, *, with_pixels: bool) -> dict[str, float]:
    res = {"image_auroc": float("nan"), "pixel_auroc": float("nan"), "aupro": float("nan")}
    if 0 < labels.sum() < len(labels):
        res["image_auroc"] = 100 * float(metrics.auroc(scores, labels))
    if with_pixels and masks.any() and not masks.all():
        res["pixel_auroc"] = 100 * float(metrics.pixel_auroc(maps, masks))
        res["aupro"] = 100 * float(metrics.aupro(maps, masks))
    return res


def summary(per_class: dict[str, dict], is_tail: dict[str, bool]) -> dict[str, dict]:
    """C_t (tail classes), C_h (head classes) and all: the nan-mean of each metric."""
    out = {}
    for group, members in (("C_t", [c for c in per_class if is_tail[c]]),
                           ("C_h", [c for c in per_class if not is_tail[c]]),
                           ("all", list(per_class))):
        out[group] = {
            k: (float(np.nanmean([per_class[c][k] for c in members])) if members else float("nan"))
            for k in ("image_auroc", "pixel_auroc", "aupro")
        }
    return out


def evaluate_method(cfg: TailedCoreConfig, split: DataSplit, img_scores, patch_scores):
    """(per-class metrics, figure data ``{class: {"indices", "maps"}}``) of one method."""
    per_class, figures = {}, {}
    for c, name in enumerate(split.class_names):
        sel = np.nonzero(split.test_class == c)[0]
        maps = masks = None
        if cfg.pixels:
            maps = np.asarray(anomaly_maps(jnp.asarray(patch_scores[sel]), cfg.image_size))
            masks = split.load_test(sel)[1].astype(bool)
        per_class[name] = _class_metrics(img_scores[sel], maps, split.test_labels[sel], masks,
                                         with_pixels=cfg.pixels)
        if cfg.pixels and cfg.keep_maps:
            pick = np.concatenate([sel[split.test_labels[sel] == 1][:cfg.keep_maps - 1],
                                   sel[split.test_labels[sel] == 0][:1]])
            figures[name] = {"indices": pick.tolist(), "maps": maps[np.searchsorted(sel, pick)]}
    return per_class, figures


def nan_variant(split: DataSplit, img_scores, nan) -> dict:
    """Per-class image AUROC of the image scores divided by the test images' NAN (image
    scores only: the per-image division is not a pixel-level method)."""
    divided = memory.nan_normalized_scores(img_scores, nan)
    per_class = {}
    for c, name in enumerate(split.class_names):
        sel = split.test_class == c
        entry = {"pixel_auroc": float("nan"), "aupro": float("nan")}
        entry["image_auroc"] = _class_metrics(divided[sel], None, split.test_labels[sel],
                                              None, with_pixels=False)["image_auroc"]
        per_class[name] = entry
    return per_class


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------


def _log_data(split: DataSplit, log) -> None:
    log(f"data: {split.description}: {len(split.class_names)} classes, {len(split.train_class)} "
        f"train ({int(split.train_is_noise.sum())} injected defects), {len(split.test_class)} "
        f"test; tail classes {list(split.tail_classes)}")


def _log_tailsampler(q: dict, log) -> None:
    log(f"TailSampler: {q['selected']} images selected; missed tail {q['missed_tail_pct']:.1f} %, "
        f"anomalies among selected {q['selected_anomalies_pct']:.1f} %, class-size error "
        f"{q['class_size_rel_error_pct']:.1f} %")


def run(cfg: TailedCoreConfig, out: str | Path, *, log=print) -> dict:
    """Run the benchmark; returns the results dict (written to disk by ``report``).

    Args:
        cfg: the configuration (``None`` fields are resolved by :meth:`TailedCoreConfig.resolved`).
        out: output directory (created). ``out/cache`` holds resumable features and banks.
        log: a print-like function for progress messages.
    """
    cfg = cfg.resolved()
    cache = Path(out) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        timings[name] = now - clock[0]
        clock[0] = now

    log(jax_banner())
    split = load_split(cfg)
    _log_data(split, log)
    lap("data_s")
    model, variables = build_backbone(cfg, split, log=log)
    extractor = make_feature_extractor(model, variables, cfg.patch_layers,
                                       embedding_layer=cfg.embedding_layer)
    lap("backbone_s")
    train, test = extract_features(cfg, split, extractor, cache, log=log)
    lap("features_s")
    patches, emb = np.asarray(train["patches"]), np.asarray(train["embedding"])
    log(f"features: train {patches.shape}, embeddings {emb.shape}, test {test['patches'].shape}")
    tail, _, quality = run_tailsampler(cfg, split, emb)
    lap("tailsampler_s")
    _log_tailsampler(quality, log)
    banks = fit_banks(cfg, split, extractor, patches, emb, tail, cache, log=log, timings=timings)

    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "tailsampler": quality,
                               "methods": {}, "classes": list(split.class_names),
                               "tail_classes": list(split.tail_classes)}
    is_tail = {c: c in split.tail_classes for c in split.class_names}
    nan = np.asarray(negative_aware_norm(jnp.asarray(test["embedding"]))) if cfg.nan_normalize else None
    figures: dict[str, dict] = {}
    for method in cfg.methods:
        clock[0] = time.perf_counter()
        img_scores, patch_scores = score_bank(banks[method], test["patches"], cfg.batch_size,
                                              f"score {method}")
        lap(f"score_{method}_s")
        per_class, figures[method] = evaluate_method(cfg, split, img_scores, patch_scores)
        lap(f"evaluate_{method}_s")
        rows = int(np.asarray(banks[method].mask).sum())
        results["methods"][method] = {"per_class": per_class,
                                      "summary": summary(per_class, is_tail), "memory_rows": rows}
        if nan is not None:
            per_class_nan = nan_variant(split, img_scores, nan)
            results["methods"][f"{method}/nan"] = {
                "per_class": per_class_nan, "summary": summary(per_class_nan, is_tail),
                "memory_rows": rows}
    results["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    results["figures"] = figures
    results["split"] = split
    return results
