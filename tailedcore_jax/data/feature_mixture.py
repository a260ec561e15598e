"""A feature-level long-tail noisy benchmark: generated patch features, no backbone.

Every class has its own Gaussian patch distribution per patch position and a few defect
directions (``_Mixture``). Head classes have many training images, a ``noise_ratio`` of them
copies of the class's defective test images (the "overlap" protocol), so a memory that keeps
every training patch memorises the defects. Tail classes have a few clean images whose
patches are isolated, so a patch-level LOF filter removes them. This reproduces, small, the
trade-off of TailedCore (CVPR 2025) Table 1: PatchCore loses on noisy head classes, SoftPatch
on tail classes, TailedCore holds both. Host-side numpy (``np.random.default_rng(seed)``).
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


class _Mixture:
    """The generative model of one instance; every method draws from ``rng`` in call order.

    Class ``c``: normal patch ``p`` of an image is ``class_mean[c] + position_mean[c, p] +
    N(0, patch_noise^2 I)``; a defect adds ``defect_dirs[c, kind]`` (norm ``defect_strength *
    sqrt(dim) * patch_noise``) plus small noise to ``defect_patches`` random positions; the
    image embedding is ``emb_centres[c]`` (unit norm) plus ``N(0, embedding_noise^2 I)``.
    """

    def __init__(self, rng, num_classes, *, num_positions, dim, embedding_dim,
                 num_defect_types, patch_noise, defect_strength, embedding_noise):
        self.rng = rng
        self.num_positions, self.dim, self.embedding_dim = num_positions, dim, embedding_dim
        self.num_defect_types, self.patch_noise = num_defect_types, patch_noise
        self.embedding_noise = embedding_noise
        self.class_mean = rng.normal(size=(num_classes, 1, dim)) * 1.5
        self.position_mean = rng.normal(size=(num_classes, num_positions, dim)) * 0.8
        defect_dirs = rng.normal(size=(num_classes, num_defect_types, dim))
        defect_dirs *= defect_strength / np.linalg.norm(defect_dirs, axis=-1, keepdims=True)
        self.defect_dirs = defect_dirs * (np.sqrt(dim) * patch_noise)
        emb_centres = rng.normal(size=(num_classes, embedding_dim))
        self.emb_centres = emb_centres / np.linalg.norm(emb_centres, axis=-1, keepdims=True)

    def normal_images(self, c: int, n: int) -> np.ndarray:
        eps = self.rng.normal(size=(n, self.num_positions, self.dim)) * self.patch_noise
        return self.class_mean[c] + self.position_mean[c] + eps

    def defective(self, c: int, imgs: np.ndarray, defect_patches: int) -> np.ndarray:
        rng, imgs = self.rng, imgs.copy()
        for i in range(imgs.shape[0]):
            where = rng.choice(self.num_positions, size=defect_patches, replace=False)
            kind = rng.integers(self.num_defect_types)
            jitter = rng.normal(size=(defect_patches, self.dim)) * 0.2 * self.patch_noise
            imgs[i, where] += self.defect_dirs[c, kind] + jitter
        return imgs

    def embed(self, c: int, n: int, shift: float = 0.0) -> np.ndarray:
        noise = self.rng.normal(size=(n, self.embedding_dim)) * self.embedding_noise
        e = self.emb_centres[c] + noise
        if shift:
            e = e + self.rng.normal(size=(n, self.embedding_dim)) * shift
        return e


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
        noise_ratio: fraction in ``[0, 1)`` of injected defective images in head classes.
        test_good, test_defect: test images per class.
        defect_patches: anomalous patches per defective image.
        num_defect_types: defect directions per class (test defects share them, so a
            memorised training defect also hides its siblings).
        patch_noise: std of normal patch variation. defect_strength: norm of a defect
            direction relative to ``sqrt(dim)``. embedding_noise: per-image embedding jitter.

    Returns:
        :class:`FeatureBenchmark`, classes in the order ``head_sizes + tail_sizes``.

    Raises:
        ValueError: ``noise_ratio`` outside ``[0, 1)``, ``defect_patches > num_positions``.
    """
    if not 0.0 <= noise_ratio < 1.0:
        raise ValueError(f"noise_ratio must be in [0, 1), got {noise_ratio}")
    if defect_patches > num_positions:
        raise ValueError("defect_patches cannot exceed num_positions")
    sizes = list(head_sizes) + list(tail_sizes)
    is_tail = np.array([False] * len(head_sizes) + [True] * len(tail_sizes))
    gen = _Mixture(
        np.random.default_rng(seed), len(sizes), num_positions=num_positions, dim=dim,
        embedding_dim=embedding_dim, num_defect_types=num_defect_types, patch_noise=patch_noise,
        defect_strength=defect_strength, embedding_noise=embedding_noise,
    )
    tr_p, tr_e, tr_c, tr_noise = [], [], [], []
    te_p, te_y, te_c, counts = [], [], [], []
    for c, size in enumerate(sizes):
        good = gen.normal_images(c, size)
        test_g = gen.normal_images(c, test_good)
        test_d = gen.defective(c, gen.normal_images(c, test_defect), defect_patches)
        te_p += [test_g, test_d]
        te_y += [np.zeros(test_good, int), np.ones(test_defect, int)]
        te_c += [np.full(test_good + test_defect, c)]
        n_noise = 0 if is_tail[c] else int(round(noise_ratio * size))
        n_noise = min(n_noise, test_defect)
        tr_p += [good, test_d[:n_noise]]
        tr_e += [gen.embed(c, size), gen.embed(c, n_noise, shift=embedding_noise)]
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

    Each copy permutes the patch positions (one random permutation per copy, like one
    angle/flip pair) and adds Gaussian jitter.

    Args:
        patches: ``(T, P, D)`` patch features of the tail images.
        copies: augmented copies per image (23 for ``rot30flip``, 7 for ``rotflip``).
        seed: numpy seed. jitter: std of the added noise relative to the patch std.

    Returns:
        ``(copies * T, P, D)`` float32, copy-major (copy -> image) as the official order.
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
