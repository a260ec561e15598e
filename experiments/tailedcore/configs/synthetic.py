"""Offline default: the embedded synthetic long-tail noisy set and a random ResNet-18.

10 product classes in MVTec layout, a Pareto tail of 60...1 training images per class, 10 %
of each head class replaced by injected defects. No pretrained weights exist offline, so the
backbone is a seeded random ResNet-18 whose BatchNorm statistics are recalibrated on the
training images. A functional check of the pipeline, not the paper's numbers.

The ``None`` fields follow the recipe rule of ``TailedCoreConfig.resolved``: here (no
weights) resnet18, 128 px crops of 146 px images, the pooled layer3 embedding, BatchNorm
recalibration on, ``rot30flip``; with ``--weights`` they switch to the paper's recipe, so
``--dataset mvtec --data-root ... --weights ...`` on this config runs the paper's protocol.
"""

from experiments.tailedcore.config import TailedCoreConfig


def get_config() -> TailedCoreConfig:
    return TailedCoreConfig(
        dataset="synthetic", setting="pareto", seed=0,
        noise_ratio=None, arch=None, image_size=None, resize=None,  # the recipe rule above
        embedding_layer=None, bn_recalibration=None, augmentation=None, model_seed=0,
        patch_layers=("layer2", "layer3"), batch_size=32,
        ratio=0.1, lof_k=6, lof_drop=0.15, tail_keep=0.85, tail_percentile=0.15, fit_seed=0,
    )
