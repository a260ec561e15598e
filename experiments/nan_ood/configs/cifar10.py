"""The paper's CIFAR-10 setting (NAN, ICCV 2023, Table 3): ResNet-18, CIFAR-10 as ID.

Standard-width CIFAR ResNet-18, 100 epochs of SGD (lr 0.1, momentum 0.9, weight decay 5e-4,
batch 128, x0.1 at epochs 50/75/90), crop + flip. OOD sets: CIFAR-100, SVHN, Textures (DTD),
Places365 and LSUN, 10,000 images each; KNN with k = 50 as OpenOOD. Needs the TFDS sets,
prepared once with ``tfds build <name> --data_dir DIR --file_format array_record``, and a GPU::

    python -m experiments.nan_ood --config cifar10 --data-dir DIR --out runs/nan_cifar10
"""

from experiments.nan_ood.config import NanOodConfig


def get_config() -> NanOodConfig:
    return NanOodConfig(
        dataset="cifar10", ood_sets=("cifar100", "svhn", "dtd", "places365", "lsun"),
        n_ood=10000, image_size=32,
        arch="resnet18_cifar", width=64, epochs=100, batch_size=128, schedule="multistep",
        lr=0.1, momentum=0.9, weight_decay=5e-4,
        knn_k=50, ssd_clusters=1, react_percentile=0.9, seed=0,
    )
