"""The configuration of one NAN out-of-distribution run (a frozen dataclass)."""

from __future__ import annotations

import dataclasses

from experiments.common import option
from tailedcore_jax.data.ood import ID_DATASETS, KNOWN_OOD_SETS
from tailedcore_jax.models.resnet import ARCHITECTURES

__all__ = ["NanOodConfig", "SCHEDULES"]

SCHEDULES = ("multistep", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class NanOodConfig:
    """Data, classifier training and OOD scoring of one run.

    Training uses :func:`experiments.nan_ood.train.train_classifier` (SGD as torch, crop and
    flip on device); the scores are :data:`experiments.nan_ood.evaluate.OOD_METHODS`, or
    :data:`~experiments.nan_ood.evaluate.LABEL_FREE_METHODS` with ``label_free``.
    """

    dataset: str = option("synthetic", "in-distribution data set", choices=ID_DATASETS)
    ood_sets: tuple[str, ...] | None = option(
        None, "OOD sets, comma-separated (auto: per dataset; known: "
        + ", ".join(KNOWN_OOD_SETS) + ")")
    data_dir: str | None = option(None, "TFDS data directory (CIFAR/SVHN/DTD/Places/LSUN)")
    arch: str = option("resnet18_cifar", "classifier backbone", choices=tuple(sorted(ARCHITECTURES)))
    width: int = option(32, "base width (64 = standard ResNet-18)")
    image_size: int = option(32, "image side in pixels")
    epochs: int = option(12, "training epochs")
    batch_size: int = option(64, "training batch size")
    lr: float = option(0.1, "initial learning rate")
    schedule: str = option("cosine", "learning-rate schedule", choices=SCHEDULES)
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "L2 weight decay, coupled as in torch.optim.SGD")
    augment: bool = option(True, "random crop (4 px padding) + horizontal flip")
    bf16: bool = option(False, "bfloat16 compute, float32 parameters")
    n_train: int = option(100, "synthetic: training images per class")
    n_test: int = option(50, "synthetic: ID test images per class")
    recolour: bool = option(
        False, "synthetic: random channel permutation/gain per image (colour no longer gives the class)")
    n_ood: int | None = option(300, "images per OOD set (TFDS: random subset; none: whole split)")
    max_train: int | None = option(None, "TFDS: subset of the training split")
    max_test: int | None = option(None, "TFDS: subset of the test split")
    knn_k: int = option(10, "KNN neighbour rank (OpenOOD: 50 on CIFAR)")
    ssd_clusters: int = option(1, "SSD k-means clusters")
    react_percentile: float = option(
        0.9, "ReAct clip quantile of the ID training activations, a fraction in (0, 1]")
    label_free: bool = option(
        False, "no labels, no head: random-init backbone (or --checkpoint's) with BN recalibration")
    seed: int = option(0, "seed of data, initialisation, sample order and augmentation")
    checkpoint: str | None = option(None, "classifier variables to load instead of training")
    stop_after_epoch: int | None = option(
        None, "stop training once this many epochs are done (rerun to resume)")
    progress: bool = option(True, "tqdm bars over the training steps")
