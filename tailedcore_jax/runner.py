"""The long-tail noisy anomaly-detection benchmark, end to end (host-side orchestration).

This is the library side of ``python -m experiments.tailedcore``: load a long-tail noisy
training set (the synthetic default, or MVTec AD / VisA with an official manifest or a seeded
split), build a backbone (random ResNet with BatchNorm recalibration, or torchvision /
timm weights from a file), extract PatchCore patch features and image embeddings, fit
PatchCore, SoftPatch and TailedCore (one memory bank over all classes, as the official code),
score the test set, and evaluate image AUROC, pixel AUROC and AUPRO per class plus the
C_t / C_h / all means of the paper (TailedCore, CVPR 2025, Tables 1-4).

Features and memory banks are cached with :mod:`tailedcore_jax.checkpoint` under
``<out>/cache`` keyed by the configuration, so an interrupted run resumes without
recomputing them. Host-side module: numpy, file I/O, progress bars; the numeric core never
imports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tailedcore_jax import augment, checkpoint, memory, metrics
from tailedcore_jax.anomaly_map import anomaly_maps
from tailedcore_jax.features import make_feature_extractor
from tailedcore_jax.ood import negative_aware_norm
from tailedcore_jax.tailsampler import tail_sample_mask

__all__ = ["TailedCoreConfig", "DataSplit", "load_split", "build_backbone", "run"]

METHODS = ("patchcore", "softpatch", "tailedcore")
DATASETS = ("synthetic", "mvtec", "visa")
SETTINGS = ("pareto", "step_k4", "step_k1")


@dataclasses.dataclass(frozen=True)
class TailedCoreConfig:
    """Everything that defines one benchmark run (also the cache key).

    ``None`` fields take the recipe default: with ``weights`` the paper's (WideResNet-50-2,
    224 px from 256, layer4 pooled embedding, no BN recalibration, ``rot30flip`` for Pareto,
    ``rot15flip`` for step, ``rotflip`` for VisA); without weights the offline recipe of
    ``synthetic-default.md`` (random ResNet-18, 128 px from 146, layer3 pooled embedding, BN
    recalibration on the training images).

    ``nan_normalise`` additionally reports every method with its image scores divided by
    the negative-aware norm (NAN, ICCV 2023) of the test image's pooled embedding
    (``<method>/nan`` rows): the paper's distance / NAN combination applied to anomaly
    detection (see the README for what it measured).
    """

    dataset: str = "synthetic"
    data_root: str | None = None
    setting: str = "pareto"
    noise_ratio: float | None = None
    seed: int = 0
    manifest_dir: str | None = None
    weights: str | None = None
    arch: str | None = None
    image_size: int | None = None
    resize: int | None = None
    patch_layers: tuple[str, ...] = ("layer2", "layer3")
    embedding_layer: str | None = None
    bn_recalibration: bool | None = None
    augmentation: str | None = None
    methods: tuple[str, ...] = METHODS
    nan_normalise: bool = False
    ratio: float = 0.1
    lof_k: int = 6
    drop: float = 0.15
    batch_size: int = 32
    model_seed: int = 0

    def resolved(self) -> TailedCoreConfig:
        """A copy with every ``None`` recipe field filled in and the inputs validated."""
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods}")
        if self.dataset != "synthetic" and not self.data_root:
            raise ValueError(f"--data-root is required for dataset {self.dataset!r}")
        real = self.weights is not None
        image_size = self.image_size or (224 if real else 128)
        aug = self.augmentation
        if aug is None:
            if self.dataset == "visa":
                aug = "rotflip"
            else:
                aug = "rot30flip" if self.setting == "pareto" else "rot15flip"
        if aug not in ("none", "rotflip", "rot15flip", "rot30flip", "rot45flip"):
            raise ValueError(f"unknown augmentation {aug!r}")
        noise = self.noise_ratio
        if noise is None:
            noise = 0.05 if self.dataset == "visa" else 0.1
        return dataclasses.replace(
            self,
            noise_ratio=noise,
            arch=self.arch or ("wide_resnet50_2" if real else "resnet18"),
            image_size=image_size,
            resize=self.resize or int(round(image_size * 256 / 224)),
            embedding_layer=self.embedding_layer or ("pooled" if real else "layer3"),
            bn_recalibration=(not real) if self.bn_recalibration is None else self.bn_recalibration,
            augmentation=aug,
            methods=tuple(self.methods),
            patch_layers=tuple(self.patch_layers),
        )

    def cache_key(self, *fields: str) -> str:
        d = dataclasses.asdict(self)
        if fields:
            d = {k: d[k] for k in fields}
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


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


def _real_split(cfg: TailedCoreConfig) -> DataSplit:
    from tailedcore_jax.data import longtail, mvtec

    root = Path(cfg.data_root)
    if cfg.dataset == "visa" and (root / "split_csv").is_dir():
        train = mvtec.visa_records(root, "train")
        test = mvtec.visa_records(root, "test")
        mask_values = "nonzero"
    else:
        train = mvtec.mvtec_records(root, "train")
        test = mvtec.mvtec_records(root, "test")
        mask_values = "nonzero" if cfg.dataset == "visa" else "binary"
    if cfg.manifest_dir:
        name = "visa-nlt" if cfg.dataset == "visa" else "mvtecad-nlt"
        man = longtail.read_manifest(cfg.manifest_dir, name, cfg.setting, cfg.seed)
        split = longtail.apply_manifest(man, train, test)
        how = f"official manifest {name}/{cfg.setting}/seed{cfg.seed:02d}"
    else:
        split = longtail.longtail_split(train, test, cfg.setting, seed=cfg.seed,
                                        noise_ratio=cfg.noise_ratio)
        how = f"seeded split ({cfg.setting}, seed {cfg.seed}, noise {cfg.noise_ratio})"
    names, train_cls = longtail.class_ids(split.train)
    name_to_id = {n: i for i, n in enumerate(names)}
    test_cls = np.array([name_to_id[r.class_name] for r in test])
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
        test_class=test_cls,
        test_labels=np.array([r.label for r in test]),
        tail_classes=tuple(split.tail_classes),
        load_train=load_train,
        load_test=load_test,
        description=f"{cfg.dataset} at {root}, {how}",
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


def _cached(path: Path, compute: Callable[[], Any], like: Callable[[Any], Any] | None = None,
            log=print):
    """Restore ``path`` if it holds a complete checkpoint, else compute and save."""
    if checkpoint.exists(path):
        log(f"  resumed from cache {path}")
        return checkpoint.restore(path) if like is None else checkpoint.restore(path, like=like)
    value = compute()
    checkpoint.save(path, value, overwrite=True)
    return value


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _class_metrics(scores, maps, labels, masks, *, with_pixels: bool) -> dict[str, float]:
    res = {"image_auroc": float("nan"), "pixel_auroc": float("nan"), "aupro": float("nan")}
    if 0 < labels.sum() < len(labels):
        res["image_auroc"] = 100 * float(metrics.auroc(scores, labels))
    if with_pixels and masks.any() and not masks.all():
        res["pixel_auroc"] = 100 * float(metrics.pixel_auroc(maps, masks))
        res["aupro"] = 100 * float(metrics.aupro(maps, masks))
    return res


def _summary(per_class: dict[str, dict], is_tail: dict[str, bool]) -> dict[str, dict]:
    out = {}
    for group, members in (("C_t", [c for c in per_class if is_tail[c]]),
                           ("C_h", [c for c in per_class if not is_tail[c]]),
                           ("all", list(per_class))):
        out[group] = {
            k: (float(np.nanmean([per_class[c][k] for c in members])) if members else float("nan"))
            for k in ("image_auroc", "pixel_auroc", "aupro")
        }
    return out


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


def run(cfg: TailedCoreConfig, out: str | Path, *, log=print, with_pixels: bool = True,
        keep_maps: int = 3) -> dict:
    """Run the benchmark; returns the results dict (also written to ``out/results.json``).

    Args:
        cfg: the configuration (``None`` fields are resolved by :meth:`TailedCoreConfig.resolved`).
        out: output directory (created). ``out/cache`` holds resumable features and banks.
        log: a print-like function for progress messages.
        with_pixels: compute anomaly maps, pixel AUROC and AUPRO.
        keep_maps: anomaly maps kept per class and method for the figures.
    """
    cfg = cfg.resolved()
    out = Path(out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    log(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    t = time.perf_counter()
    split = load_split(cfg)
    n_train, n_test = len(split.train_class), len(split.test_class)
    log(f"data: {split.description}: {len(split.class_names)} classes, {n_train} train "
        f"({int(split.train_is_noise.sum())} injected defects), {n_test} test; tail classes "
        f"{list(split.tail_classes)}")
    timings["data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model, variables = build_backbone(cfg, split, log=log)
    extractor = make_feature_extractor(model, variables, cfg.patch_layers,
                                       embedding_layer=cfg.embedding_layer)
    timings["backbone_s"] = time.perf_counter() - t

    feat_key = cfg.cache_key("dataset", "data_root", "setting", "noise_ratio", "seed",
                             "manifest_dir", "weights", "arch", "image_size", "resize",
                             "patch_layers", "embedding_layer", "bn_recalibration", "model_seed")
    t = time.perf_counter()
    train = _cached(cache / f"train_features_{feat_key}", lambda: _extract(
        extractor, lambda i: split.load_train(i, True), n_train, cfg.batch_size, "train features"),
        log=log)
    test_masks: list[np.ndarray] = []

    def test_features():
        feats = _extract(extractor, lambda i: split.load_test(i)[0], n_test, cfg.batch_size,
                         "test features")
        return {"patches": feats["patches"], "embedding": feats["embedding"]}

    test = _cached(cache / f"test_features_{feat_key}", test_features, log=log)
    timings["features_s"] = time.perf_counter() - t
    patches, emb = np.asarray(train["patches"]), np.asarray(train["embedding"])
    log(f"features: train {patches.shape}, embeddings {emb.shape}, test {test['patches'].shape}")

    # --- TailSampler --------------------------------------------------------------------
    t = time.perf_counter()
    tail, sizes = tail_sample_mask(jnp.asarray(emb))
    tail, sizes = np.asarray(tail), np.asarray(sizes)
    timings["tailsampler_s"] = time.perf_counter() - t
    quality = tailsampler_quality(split, tail, sizes)
    log(f"TailSampler: {quality['selected']} images selected; missed tail "
        f"{quality['missed_tail_pct']:.1f} %, anomalies among selected "
        f"{quality['selected_anomalies_pct']:.1f} %, class-size error "
        f"{quality['class_size_rel_error_pct']:.1f} %")

    # --- fit -------------------------------------------------------------------------------
    key = jax.random.key(cfg.seed)
    banks: dict[str, memory.MemoryBank] = {}
    for m_i, method in enumerate(cfg.methods):
        t = time.perf_counter()
        bank_key = cfg.cache_key() + f"_{method}"
        k = jax.random.fold_in(key, m_i)

        def fit(method=method, k=k):
            if method == "patchcore":
                return memory.fit_patchcore(k, patches, ratio=cfg.ratio)
            if method == "softpatch":
                return memory.fit_softpatch(k, patches, ratio=cfg.ratio, lof_k=cfg.lof_k,
                                            lof_drop=cfg.drop)
            aug = None
            if cfg.augmentation != "none" and tail.any():
                aug = _tail_augmented_features(cfg, split, extractor, np.nonzero(tail)[0])
            return memory.fit_tailedcore(k, patches, emb, ratio=cfg.ratio, lof_k=cfg.lof_k,
                                         lof_drop=cfg.drop, tail_mask=tail,
                                         augmented_tail_features=aug)

        path = cache / f"bank_{bank_key}"
        if checkpoint.exists(path):
            raw = checkpoint.restore(path)
            banks[method] = memory.MemoryBank(**{f: raw.get(f) for f in memory.MemoryBank._fields})
            log(f"  {method}: memory bank resumed from {path}")
        else:
            banks[method] = jax.block_until_ready(fit())
            checkpoint.save(path, banks[method], overwrite=True)
        timings[f"fit_{method}_s"] = time.perf_counter() - t
        log(f"{method}: memory bank {int(np.asarray(banks[method].mask).sum())} rows "
            f"({timings[f'fit_{method}_s']:.1f} s)")

    # --- score and evaluate ----------------------------------------------------------------
    score_fn = jax.jit(memory.score)
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "tailsampler": quality,
                               "methods": {}, "classes": list(split.class_names),
                               "tail_classes": list(split.tail_classes)}
    is_tail = {c: c in split.tail_classes for c in split.class_names}
    figures: dict[str, dict] = {}
    for method in cfg.methods:
        t = time.perf_counter()
        img_scores = np.zeros(n_test, np.float32)
        patch_scores = []
        for idx in tqdm(list(_batches(n_test, cfg.batch_size)), desc=f"score {method}", leave=False):
            q = _padded(np.asarray(test["patches"][idx]), cfg.batch_size)
            s, p = score_fn(banks[method], jnp.asarray(q))
            img_scores[idx] = np.asarray(s)[: len(idx)]
            patch_scores.append(np.asarray(p)[: len(idx)])
        patch_scores = np.concatenate(patch_scores)
        timings[f"score_{method}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        per_class = {}
        figures[method] = {}
        for c, name in enumerate(split.class_names):
            sel = np.nonzero(split.test_class == c)[0]
            maps = masks = None
            if with_pixels:
                maps = np.asarray(anomaly_maps(jnp.asarray(patch_scores[sel]), cfg.image_size))
                masks = split.load_test(sel)[1].astype(bool)
            per_class[name] = _class_metrics(img_scores[sel], maps, split.test_labels[sel], masks,
                                             with_pixels=with_pixels)
            if with_pixels and keep_maps:
                pick = np.concatenate([sel[split.test_labels[sel] == 1][:keep_maps - 1],
                                       sel[split.test_labels[sel] == 0][:1]])
                figures[method][name] = {"indices": pick.tolist(),
                                         "maps": maps[np.searchsorted(sel, pick)]}
        timings[f"evaluate_{method}_s"] = time.perf_counter() - t
        results["methods"][method] = {"per_class": per_class, "summary": _summary(per_class, is_tail),
                                      "memory_rows": int(np.asarray(banks[method].mask).sum())}
        if cfg.nan_normalise:
            nan = np.asarray(negative_aware_norm(jnp.asarray(test["embedding"])))
            divided = memory.nan_normalized_scores(img_scores, nan)
            per_class_nan = {}
            for c, name in enumerate(split.class_names):
                sel = split.test_class == c
                # image scores only: the per-image division is not a pixel-level method
                entry = {"pixel_auroc": float("nan"), "aupro": float("nan")}
                entry["image_auroc"] = _class_metrics(divided[sel], None, split.test_labels[sel],
                                                      None, with_pixels=False)["image_auroc"]
                per_class_nan[name] = entry
            results["methods"][f"{method}/nan"] = {
                "per_class": per_class_nan, "summary": _summary(per_class_nan, is_tail),
                "memory_rows": results["methods"][method]["memory_rows"]}
    results["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    results["figures"] = figures
    results["split"] = split
    return results


def _tail_augmented_features(cfg: TailedCoreConfig, split: DataSplit, extractor,
                             tail_idx: np.ndarray) -> np.ndarray:
    """Patch features of every rotated/flipped copy of the tail images (spec 5.2)."""
    kind = cfg.augmentation
    copies = len(augment.tail_augmentation_params(kind))
    out = []
    for idx in _batches(len(tail_idx), max(1, cfg.batch_size // 8)):
        if kind == "rotflip":
            imgs = split.load_train(tail_idx[idx], True)  # the 90-degree variant uses the crop
        else:
            imgs = split.load_train(tail_idx[idx], False)  # resized, not cropped
        aug = np.asarray(augment.tail_augmentations(jnp.asarray(imgs), kind, crop=cfg.image_size))
        for j in range(0, aug.shape[0], cfg.batch_size):
            chunk = aug[j:j + cfg.batch_size]
            res = extractor(jnp.asarray(_padded(chunk, cfg.batch_size)))
            out.append(np.asarray(res["patches"])[: chunk.shape[0]])
    feats = np.concatenate(out)
    d = feats.shape[-1]
    assert feats.shape[0] == copies * len(tail_idx)
    return feats.reshape(-1, d)


def format_table(results: dict) -> str:
    """Markdown tables: per class and C_t / C_h / all, image AUROC / pixel AUROC / AUPRO."""
    methods = list(results["methods"])
    lines = ["| class | tail | " + " | ".join(f"{m} img / pix / pro" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]

    def fmt(d):
        return " / ".join("—" if np.isnan(d[k]) else f"{d[k]:.1f}"
                          for k in ("image_auroc", "pixel_auroc", "aupro"))

    for c in results["classes"]:
        row = [c, "yes" if c in results["tail_classes"] else ""]
        row += [fmt(results["methods"][m]["per_class"][c]) for m in methods]
        lines.append("| " + " | ".join(row) + " |")
    for g in ("C_t", "C_h", "all"):
        row = [f"**{g}**", ""] + [fmt(results["methods"][m]["summary"][g]) for m in methods]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
