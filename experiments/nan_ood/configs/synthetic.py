"""Offline default: a small CIFAR-style ResNet-18 trained on generated product images.

6 classes of 32 px images, 100 training / 50 test images per class; OOD sets are held-out
product classes and procedural far-OOD sets (Gaussian / uniform noise, blobs, gratings),
300 images each. Width 32, 12 epochs, cosine schedule: about 3-4 minutes on 2 CPU cores.
"""

from experiments.nan_ood.config import NanOodConfig


def get_config() -> NanOodConfig:
    return NanOodConfig(
        dataset="synthetic", ood_sets=None,  # None: synthetic_heldout and the procedural sets
        n_train=100, n_test=50, n_ood=300, image_size=32,
        arch="resnet18_cifar", width=32, epochs=12, batch_size=64, lr=0.1, schedule="cosine",
        knn_k=10, ssd_clusters=1, react_percentile=0.9, seed=0,
    )
