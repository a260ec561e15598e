"""The paper's MVTec AD benchmark: Pareto long tail (alpha 6, at least 5 images), 10 % noise.

TailedCore, CVPR 2025, Table 1, image AUROC over all classes, mean of manifest seeds 1-5:
TailedCore 96.12, PatchCore 89.18, SoftPatch 87.71. Data, manifests and weights are paths
on your machine, given as flags::

    python -m experiments.tailedcore --config mvtec_pareto \\
        --data-root /data/mvtec_anomaly_detection --manifest-dir /data/tailedcore-manifests \\
        --weights /weights/wide_resnet50_2-95faca4d.pth --seed 1 --out runs/mvtec_pareto_s1

The other real-data recipes change a few fields of this one.
"""

from experiments.tailedcore.config import TailedCoreConfig


def get_config() -> TailedCoreConfig:
    return TailedCoreConfig(
        dataset="mvtec", setting="pareto", noise_ratio=0.1,
        seed=1,  # manifest seed01; the paper averages seeds 1-5
        # the paper's backbone: WideResNet-50-2, 224 px of 256 px, pooled layer4 embedding
        arch="wide_resnet50_2", image_size=224, resize=256, embedding_layer="pooled",
        bn_recalibration=False, patch_layers=("layer2", "layer3"), augmentation="rot30flip",
        ratio=0.1, lof_k=6, lof_drop=0.15, tail_keep=0.85, tail_percentile=0.15,
    )
