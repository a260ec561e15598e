"""A feature-level long-tail noisy benchmark: generated patch features, no backbone.

Each product class ``c`` has its own normal patch distribution, one mean per patch position
(``class_mean[c] + position_mean[c, p]`` plus isotropic noise), and a few defect directions.
A defective image replaces a few random patches with ``normal + defect_direction``.

- Head classes have many training images; a ``noise_ratio`` of them are copies of the
  class's defective *test* images (the paper's "overlap" protocol: the injected defects stay
  in the test set), so a memory that keeps every training patch memorises the defects.
- Tail classes have 1-5 clean training images. Their patches are isolated at every patch
  position, so a patch-level LOF filter removes them.

This reproduces, at a size that runs in seconds, the trade-off of TailedCore (CVPR 2025)
Table 1: PatchCore loses on noisy head classes, SoftPatch on tail classes, TailedCore holds
both. Host-side numpy (``np.random.default_rng(seed)``), used by
``benchmarks/bench_tail_noise.py`` and the tests.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["FeatureBenchmark", "long_tail_noisy_features", "augment_patches"]


class FeatureBenchmark(NamedTuple):
    """Arrays of one generated benchmark instance.

    Attributes:
        train_patches: ``(N, P, D)`` float32 training patch features.
        train_embeddings: ``(N, E)`` float32 image embeddings (TailSampler input).
        train_class: ``(N,)`` int class of every training image (ground truth only).
        train_is_noise: ``(N,)`` bool, True for injected defective images.
        test_patches: ``(T, P, D)`` float32. test_labels: ``(T,)`` int 0 good / 1 defect.
        test_class: ``(T,)`` int class of every test image.
        class_sizes: ``(C,)`` int training images per class (noise included).
        is_tail_class: ``(C,)`` bool.
    """

    train_patches: np.ndarray
    train_embeddings: np.ndarray
    train_class: np.ndarray
    train_is_noise: np.ndarray
    test_patches: np.ndarray
    test_labels: np.ndarray
    test_class: np.ndarray
    class_sizes: np.ndarray
    is_tail_class: np.ndarray


def long_tail_noisy_features(
    seed: int = 0,
    *,
    head_sizes: tuple[int, ...] = (40, 40, 40),
    tail_sizes: tuple[int, ...] = (1, 2, 3, 4),
    num_positions: int = 16,
    dim: int = 32,
    embedding_dim: int = 64,
    noise_ratio: float = 0.1,
    test_good: int = 6,
    test_defect: int = 8,
    defect_patches: int = 3,
    num_defect_types: int = 2,
    patch_noise: float = 0.35,
    defect_strength: float = 2.5,
    embedding_noise: float = 0.05,
) -> FeatureBenchmark:
    """Generate one long-tail noisy feature benchmark (see the module docstring).

    Args:
        seed: numpy seed of the instance.
        head_sizes: clean training images of each head class (noise is added on top:
            ``round(noise_ratio * size)`` defective test images are copied into training).
        tail_sizes: training images of each tail class (never noisy).
        num_positions: patch positions per image ``P``. dim: patch feature dimension ``D``.
        embedding_dim: image embedding dimension ``E``.
        noise_ratio: fraction of injected defective images in head classes.
        test_good, test_defect: test images per class.
        defect_patches: anomalous patches per defective image.
        num_defect_types: defect directions per class (test defects share them, so a
            memorised training defect also hides its siblings).
        patch_noise: std of normal patch variation. defect_strength: norm of a defect
            direction relative to ``sqrt(dim)``. embedding_noise: per-image embedding jitter.
    """
    if not 0.0 <= noise_ratio < 1.0:
        raise ValueError(f"noise_ratio must be in [0, 1), got {noise_ratio}")
    if defect_patches > num_positions:
        raise ValueError("defect_patches cannot exceed num_positions")
    rng = np.random.default_rng(seed)
    sizes = list(head_sizes) + list(tail_sizes)
    num_classes = len(sizes)
    is_tail = np.array([False] * len(head_sizes) + [True] * len(tail_sizes))
    class_mean = rng.normal(size=(num_classes, 1, dim)) * 1.5
    position_mean = rng.normal(size=(num_classes, num_positions, dim)) * 0.8
    defect_dirs = rng.normal(size=(num_classes, num_defect_types, dim))
    defect_dirs *= defect_strength / np.linalg.norm(defect_dirs, axis=-1, keepdims=True)
    defect_dirs *= np.sqrt(dim) * patch_noise
    emb_centres = rng.normal(size=(num_classes, embedding_dim))
    emb_centres /= np.linalg.norm(emb_centres, axis=-1, keepdims=True)

    def normal_images(c: int, n: int) -> np.ndarray:
        eps = rng.normal(size=(n, num_positions, dim)) * patch_noise
        return class_mean[c] + position_mean[c] + eps

    def defective(c: int, imgs: np.ndarray) -> np.ndarray:
        imgs = imgs.copy()
        for i in range(imgs.shape[0]):
            where = rng.choice(num_positions, size=defect_patches, replace=False)
            kind = rng.integers(num_defect_types)
            imgs[i, where] += defect_dirs[c, kind] + rng.normal(size=(defect_patches, dim)) * 0.2 * patch_noise
        return imgs

    def embed(c: int, n: int, shift: float = 0.0) -> np.ndarray:
        e = emb_centres[c] + rng.normal(size=(n, embedding_dim)) * embedding_noise
        if shift:
            e = e + rng.normal(size=(n, embedding_dim)) * shift
        return e

    tr_p, tr_e, tr_c, tr_noise = [], [], [], []
    te_p, te_y, te_c = [], [], []
    counts = []
    for c, size in enumerate(sizes):
        good = normal_images(c, size)
        test_g = normal_images(c, test_good)
        test_d = defective(c, normal_images(c, test_defect))
        te_p += [test_g, test_d]
        te_y += [np.zeros(test_good, int), np.ones(test_defect, int)]
        te_c += [np.full(test_good + test_defect, c)]
        n_noise = 0 if is_tail[c] else int(round(noise_ratio * size))
        n_noise = min(n_noise, test_defect)
        tr_p += [good, test_d[:n_noise]]
        tr_e += [embed(c, size), embed(c, n_noise, shift=embedding_noise)]
        tr_c += [np.full(size + n_noise, c)]
        tr_noise += [np.zeros(size, bool), np.ones(n_noise, bool)]
        counts.append(size + n_noise)
    f32 = np.float32
    return FeatureBenchmark(
        train_patches=np.concatenate(tr_p).astype(f32),
        train_embeddings=np.concatenate(tr_e).astype(f32),
        train_class=np.concatenate(tr_c),
        train_is_noise=np.concatenate(tr_noise),
        test_patches=np.concatenate(te_p).astype(f32),
        test_labels=np.concatenate(te_y),
        test_class=np.concatenate(te_c),
        class_sizes=np.array(counts),
        is_tail_class=is_tail,
    )


def augment_patches(patches: np.ndarray, copies: int, *, seed: int = 0, jitter: float = 0.15) -> np.ndarray:
    """Feature-level stand-in for TailedCore's rotate/flip tail augmentation.

    A rotated or flipped copy of an image moves its patches to other positions and slightly
    changes them; here each copy applies one random permutation of the patch positions (shared
    by all images of that copy, like one angle/flip pair) and adds small Gaussian jitter.

    Args:
        patches: ``(T, P, D)`` patch features of the tail images.
        copies: augmented copies per image (23 for ``rot30flip``, 7 for ``rotflip``).
        seed: numpy seed. jitter: std of the added noise relative to the patch std.

    Returns:
        ``(copies * T, P, D)`` float32, ordered copy-major (copy -> image), as the official
        batch -> angle -> flip -> image order within one batch.
    """
    patches = np.asarray(patches, np.float32)
    if patches.ndim != 3:
        raise ValueError(f"patches must be (T, P, D), got {patches.shape}")
    if patches.shape[0] == 0:
        raise ValueError("no tail images to augment (empty tail selection)")
    rng = np.random.default_rng(seed)
    scale = jitter * float(patches.std())
    out = []
    for _ in range(copies):
        perm = rng.permutation(patches.shape[1])
        out.append(patches[:, perm] + rng.normal(size=patches.shape) * scale)
    return np.concatenate(out).astype(np.float32)
