"""The configuration of one long-tail noisy anomaly-detection run (a frozen dataclass)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from experiments.common import option

__all__ = ["TailedCoreConfig", "METHODS", "DATASETS", "SETTINGS", "AUGMENTATIONS"]

METHODS = ("patchcore", "softpatch", "tailedcore")
DATASETS = ("synthetic", "mvtec", "visa")
SETTINGS = ("pareto", "step_k4", "step_k1")
AUGMENTATIONS = ("none", "rotflip", "rot15flip", "rot30flip", "rot45flip")

#: Fields that determine the extracted features (their cache key).
FEATURE_FIELDS = ("dataset", "data_root", "setting", "noise_ratio", "seed", "manifest_dir",
                  "weights", "arch", "image_size", "resize", "patch_layers", "embedding_layer",
                  "bn_recalibration", "model_seed")
#: Fields that additionally determine the memory banks.
BANK_FIELDS = FEATURE_FIELDS + ("augmentation", "methods", "ratio", "lof_k", "lof_drop",
                                "tail_keep", "tail_percentile", "tail_similarity_rounding", "fit_seed",
                                "batch_size")


@dataclasses.dataclass(frozen=True)
class TailedCoreConfig:
    """Everything that defines one benchmark run.

    ``None`` fields take the recipe default in :meth:`resolved`. With ``weights`` that is
    the paper's recipe: WideResNet-50-2, 224 px crops of 256 px images, the pooled layer4
    embedding, no BatchNorm recalibration, ``rot30flip`` for Pareto, ``rot15flip`` for step
    and ``rotflip`` for VisA. Without weights it is the offline recipe: a random ResNet-18,
    128 px crops of 146 px images, the pooled layer3 embedding, and BatchNorm statistics
    recalibrated on the training images.

    ``nan_normalize`` also reports every method with its image scores divided by the
    negative-aware norm (NAN, ICCV 2023) of the test image's pooled embedding
    (``<method>/nan`` rows).
    """

    dataset: str = option("synthetic", "data set", choices=DATASETS)
    data_root: str | None = option(None, "MVTec AD / VisA root folder")
    setting: str = option("pareto", "long-tail setting", choices=SETTINGS)
    noise_ratio: float | None = option(
        None, "injected defects per head class, a fraction (none: 0.1, VisA 0.05)")
    seed: int = option(0, "dataset / split seed (the manifest's seedNN)")
    manifest_dir: str | None = option(None, "root of the official split manifests")
    weights: str | None = option(
        None, "torchvision/timm backbone weights (.pth/.safetensors/.npz)")
    arch: str | None = option(None, "backbone (none: wide_resnet50_2 with weights, else resnet18)")
    image_size: int | None = option(None, "crop size (none: 224 with weights, else 128)")
    resize: int | None = option(None, "resize before the crop (none: image_size * 256 / 224)")
    patch_layers: tuple[str, ...] = option(("layer2", "layer3"), "PatchCore feature layers")
    embedding_layer: str | None = option(
        None, "TailSampler embedding: pooled (layer4) or layer3 (none: pooled with weights)")
    bn_recalibration: bool | None = option(
        None, "recalibrate BatchNorm statistics on the training images (none: without weights)")
    augmentation: str | None = option(
        None, "tail augmentation (auto: rot30flip Pareto, rot15flip step, rotflip VisA)",
        choices=AUGMENTATIONS)
    methods: tuple[str, ...] = option(METHODS, "methods to fit and score", choices=METHODS)
    nan_normalize: bool = option(False, "also report image scores divided by the test NAN")
    ratio: float = option(0.1, "coreset ratio, a fraction")
    lof_k: int = option(6, "LOF neighbours (SoftPatch / TailedCore noise filter)")
    lof_drop: float = option(0.15, "fraction of patches the LOF filter drops")
    tail_keep: float = option(0.85, "TailSampler keep fraction")
    tail_percentile: float = option(0.15, "TailSampler percentile, a fraction")
    tail_similarity_rounding: str = option(
        "xla", "TailSampler similarity rounding: xla, or torch_cpu (the official CPU run's)",
        choices=("xla", "torch_cpu"))
    fit_seed: int = option(0, "seed of the memory-bank fits (projections, coreset starts)")
    batch_size: int = option(32, "images per forward pass")
    model_seed: int = option(0, "seed of the random backbone initialisation")
    pixels: bool = option(True, "compute anomaly maps, pixel AUROC and AUPRO")
    keep_maps: int = option(3, "anomaly maps kept per class and method for the figures")

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
        if aug not in AUGMENTATIONS:
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
        """12 hex digits of a hash of ``fields`` (all fields when none are named)."""
        d = dataclasses.asdict(self)
        if fields:
            d = {k: d[k] for k in fields}
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]
