"""Memory banks of PatchCore, SoftPatch and TailedCore, and kNN scoring against them.

Every fit function is a pure function of a PRNG key and feature arrays and returns a
:class:`MemoryBank` pytree of fixed capacity with a validity mask, so a fitted model can be
saved with :mod:`tailedcore_jax.checkpoint`, passed to :func:`score`, and fitted or scored
per product class under ``jax.vmap`` (classes padded to one image capacity, one compilation).

Multi-device: every fit function and :func:`score` take an optional ``mesh``
(:class:`jax.sharding.Mesh`); with it, the greedy coresets, the patch-wise LOF and the kNN
search run through :mod:`tailedcore_jax.sharding` (points / positions / bank rows split over
the devices) and return the same bank and scores as without it. ``mesh`` is for eager or
``jit`` calls, not under ``vmap``.

Memory (paper scale, e.g. 640k patches x 1024 = 2.6 GB): the fit path holds one copy of the
patch features plus working memory bounded by the projected ``(N * P, 128)`` matrices: the
``(N, h, w, D)`` / ``(N, P, D)`` input is never reshaped eagerly (a reshape of a JAX array
outside ``jit`` is a full copy), the finiteness check is a fused reduction (no ``N*P*D``
boolean temporary), and the coreset runs on the flattened rows inside ``jit`` so that no
host-side copy of the valid rows is made. Pass a ``jax.Array``: a NumPy input is copied to
the device once. Remaining copies, bounded by the tail branch: the tail images' rows are
gathered, and concatenated with ``augmented_tail_features`` when given.

References:
    - TailedCore: Jung et al., "TailedCore: Few-Shot Sampling for Unsupervised Long-Tail
      Noisy Anomaly Detection", CVPR 2025 (arXiv 2504.02775); official code
      ``jungyg/TailedCore`` ``src/coreset_model.py`` (``TailedCore``, ``SoftPatch``,
      ``PatchCore``).
    - PatchCore: Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.
    - SoftPatch: Jiang et al., "SoftPatch: Unsupervised Anomaly Detection with Noisy Data",
      NeurIPS 2022 (here in the TailedCore repository's re-implementation: raw LOF score of
      the matched coreset row as the weight).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tailedcore_jax import _validation as V
from tailedcore_jax.coreset import greedy_coreset_masked, random_projection
from tailedcore_jax.knn import nearest_neighbors
from tailedcore_jax.lof import lof_filter_mask, patchwise_lof
from tailedcore_jax.sharding import (
    sharded_greedy_coreset_masked,
    sharded_nearest_neighbors,
    sharded_patchwise_lof,
)
from tailedcore_jax.tailsampler import tail_sample_mask

__all__ = [
    "MemoryBank",
    "fit_patchcore",
    "fit_softpatch",
    "fit_tailedcore",
    "score",
    "coreset_capacity",
    "num_valid",
    "nan_normalised_scores",
]


class MemoryBank(NamedTuple):
    """A fitted memory bank (a pytree).

    Attributes:
        features: ``(n_max, D)`` float32 memory rows; rows where ``mask`` is False are padding.
        mask: ``(n_max,)`` bool, True for valid rows.
        weights: ``(n_max,)`` float32 SoftPatch weights (the LOF score of each row) that
            multiply the nearest-neighbour distance at scoring, or ``None`` (no weighting).
        is_tail: ``(n_max,)`` bool, True for rows of TailedCore's tail branch (they come
            first), or ``None`` for models without a tail branch.
    """

    features: jax.Array
    mask: jax.Array
    weights: jax.Array | None = None
    is_tail: jax.Array | None = None


def num_valid(bank: MemoryBank) -> jax.Array:
    """Number of valid memory rows (works under vmap: one count per class)."""
    return jnp.sum(bank.mask, axis=-1)


def coreset_capacity(num_rows: int, ratio: float) -> int:
    """Static row capacity of a coreset of ``ratio`` over ``num_rows`` candidate rows.

    The official sampler keeps ``int(ratio * M)`` rows of ``M`` candidates (the random start
    included); this is the same count for ``M = num_rows``, and at least 1.
    """
    return max(1, int(math.floor(ratio * num_rows + 1e-9)))


def _check_ratio(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _as_grid(name: str, patch_features) -> tuple[jax.Array, tuple[int, ...]]:
    """Checks an (N, h, w, D) or (N, P, D) array; returns it *unchanged* plus the spatial shape.

    The array is not reshaped here: outside ``jit`` a reshape is a full copy. Use
    :func:`_dims` for ``(N, P, D)`` and reshape inside jitted code.
    """
    patch_features = jnp.asarray(patch_features)
    if patch_features.ndim == 4:
        return patch_features, tuple(patch_features.shape[1:3])
    if patch_features.ndim == 3:
        return patch_features, (patch_features.shape[1],)
    raise ValueError(
        f"{name} must have shape (N, h, w, D) or (N, P, D), got {patch_features.shape}"
    )


def _dims(feats) -> tuple[int, int, int]:
    """(N, P, D) of an (N, h, w, D) or (N, P, D) array."""
    return feats.shape[0], math.prod(feats.shape[1:-1]), feats.shape[-1]


@jax.jit
def _all_finite(x):
    # x * 0 is 0 for finite x and NaN for NaN/inf, and a sum propagates NaN: one fused
    # sum-reduction. (jnp.all(jnp.isfinite(x)) materialised an x-sized bool temporary on
    # XLA:CPU, and its max-reduction does not propagate NaN.)
    return jnp.sum(x * 0.0) == 0.0


def _check_finite_large(name: str, x) -> None:
    """``V.check_finite`` without the full-size boolean temporary (concrete inputs only)."""
    if not V.is_concrete(x):
        return
    ok = _all_finite(x)
    if V.is_concrete(ok) and not bool(ok):  # inside an outer trace ok is a tracer
        V.check_finite(name, x)  # builds the detailed message
        raise ValueError(f"{name} contains non-finite values")


def _check_features(name: str, feats: jax.Array, image_mask) -> jax.Array:
    V.check_floating(name, feats)
    _check_finite_large(name, feats)
    n, p, d = _dims(feats)
    if n == 0 or p == 0 or d == 0:
        raise ValueError(f"{name} is empty: shape {feats.shape}")
    if image_mask is None:
        return jnp.ones((n,), bool)
    image_mask = jnp.asarray(image_mask)
    V.check_mask("mask", image_mask, n)
    count = V.concrete_count(image_mask, n)
    if count == 0:
        raise ValueError("mask selects no images: cannot fit a memory bank on an empty set")
    return image_mask


def _coreset_rows(key, rows, row_mask, *, ratio, projection_dim, projection=None, mesh=None):
    """Greedy coreset over masked rows: gathered features, validity, selected indices.

    ``rows`` may be ``(M, D)`` or any ``(..., D)`` grid (flattened to rows). Without a mesh
    the coreset runs inside ``jit`` (reshape free, no host copy of the valid rows); its
    value checks were done by the callers (finite features) or are done here (empty mask).
    """
    d = rows.shape[-1]
    num_rows = math.prod(rows.shape[:-1])
    row_mask = jnp.asarray(row_mask)
    if V.concrete_count(row_mask, num_rows) == 0:
        raise ValueError("mask selects no rows: cannot build a coreset of an empty set")
    if projection is not None:
        projection = jnp.asarray(projection)
    if mesh is None:
        return _coreset_rows_jit(key, rows, row_mask, projection, ratio=ratio,
                                 projection_dim=projection_dim)
    rows = rows.reshape(num_rows, d)  # a copy outside jit (mesh path only)
    capacity = coreset_capacity(num_rows, ratio)
    idx, valid = sharded_greedy_coreset_masked(
        key, rows, capacity, mesh=mesh, mask=row_mask, ratio=ratio,
        projection_dim=projection_dim, projection=projection,
    )
    return jnp.where(valid[:, None], rows[idx], 0.0), valid, idx


@functools.partial(jax.jit, static_argnames=("ratio", "projection_dim"))
def _coreset_rows_jit(key, rows, row_mask, projection, *, ratio, projection_dim):
    d = rows.shape[-1]
    rows = rows.reshape(-1, d)
    capacity = coreset_capacity(rows.shape[0], ratio)
    idx, valid = greedy_coreset_masked(
        key, rows, capacity, mask=row_mask, ratio=ratio, projection_dim=projection_dim,
        projection=projection,
    )
    feats = jnp.where(valid[:, None], rows[idx], 0.0)
    return feats, valid, idx


def _lof_scores(key, feats, image_mask, *, lof_k, lof_projection_dim, position_chunk,
                lof_projection=None, mesh=None):
    """Patch-position-wise LOF in a random projection (TailedCore/SoftPatch ``LOFSampler``)."""
    n, p, d = _dims(feats)
    if lof_projection is not None or (lof_projection_dim is not None and lof_projection_dim != d):
        w = lof_projection if lof_projection is not None else random_projection(key, d, lof_projection_dim)
        w = jnp.asarray(w, jnp.float32)
        if w.ndim != 2 or w.shape[0] != d:
            raise ValueError(f"lof_projection must have shape ({d}, p), got {w.shape}")
        proj = _project_grid(feats, w)
    elif feats.ndim == 3:
        proj = feats
    else:
        proj = feats.reshape(n, p, d)  # no projection of 4-D input: one copy
    kwargs = {} if position_chunk is None else {"position_chunk": position_chunk}
    if mesh is not None:
        return sharded_patchwise_lof(proj, k=lof_k, mask=image_mask, mesh=mesh, **kwargs)
    return patchwise_lof(proj, k=lof_k, mask=image_mask, **kwargs)


@jax.jit
def _project_grid(feats, w):
    """``(N, ..., D) @ (D, e) -> (N, P, e)`` (reshape inside jit: no copy of the input)."""
    n, d = feats.shape[0], feats.shape[-1]
    rows = feats.reshape(n, -1, d)
    return jnp.einsum("npd,de->npe", rows, w, precision=jax.lax.Precision.HIGHEST)


def fit_patchcore(
    key,
    patch_features,
    *,
    ratio: float = 0.1,
    mask=None,
    projection_dim: int | None = 128,
    projection=None,
    mesh=None,
) -> MemoryBank:
    """PatchCore memory: a greedy k-center coreset of all training patches.

    JAX port of ``PatchCore._get_coreset`` in jungyg/TailedCore ``src/coreset_model.py``.

    Args:
        key: PRNG key (coreset projection and random start).
        patch_features: ``(N, h, w, D)`` or ``(N, P, D)`` training patch features.
        ratio: coreset fraction; ``int(ratio * valid_patches)`` rows are kept.
        mask: ``(N,)`` bool, valid images (padding for per-class vmap); None = all.
        projection_dim: random-projection dimension of the greedy search (None = none).
        projection: an explicit ``(D, p)`` greedy projection matrix instead of a random one
            drawn from ``key`` (the random start is still drawn from ``key``).
        mesh: optional :class:`jax.sharding.Mesh`; the coreset (and LOF) then run split over
            its devices (:mod:`tailedcore_jax.sharding`), with the same result.

    Returns:
        ``MemoryBank`` with capacity ``coreset_capacity(N * P, ratio)``.
    """
    _check_ratio("ratio", ratio)
    feats, _ = _as_grid("patch_features", patch_features)
    image_mask = _check_features("patch_features", feats, mask)
    _, p, _ = _dims(feats)
    row_mask = jnp.repeat(image_mask, p)
    f, valid, _ = _coreset_rows(key, feats, row_mask, ratio=ratio, projection_dim=projection_dim,
                                projection=projection, mesh=mesh)
    return MemoryBank(f, valid)


def fit_softpatch(
    key,
    patch_features,
    *,
    ratio: float = 0.1,
    lof_k: int = 6,
    drop: float = 0.15,
    mask=None,
    projection_dim: int | None = 128,
    lof_projection_dim: int | None = 128,
    position_chunk: int | None = None,
    projection=None,
    lof_projection=None,
    mesh=None,
) -> MemoryBank:
    """SoftPatch memory: patch-level LOF filter, coreset, and per-row LOF weights.

    JAX port of ``SoftPatch._get_filtered_coreset`` in jungyg/TailedCore: LOF per patch
    position across images (k=``lof_k``, in a random ``lof_projection_dim`` projection), drop
    the patches whose LOF is not strictly below the ``1 - drop`` quantile, greedy coreset of
    the rest; each kept row stores its LOF score, which multiplies the nearest-neighbour
    distance in :func:`score`.

    Args:
        key: PRNG key (LOF projection, coreset projection and start).
        patch_features: ``(N, h, w, D)`` or ``(N, P, D)``.
        ratio, mask, projection_dim: as in :func:`fit_patchcore`.
        lof_k: LOF neighbours. drop: fraction of patches removed as noise, in (0, 1).
        lof_projection_dim: projection dimension for LOF (None = raw features).
        position_chunk: patch positions per LOF chunk (memory bound; None = lof default).
        projection, lof_projection: explicit ``(D, p)`` matrices for the greedy search and
            the LOF instead of random ones drawn from ``key`` (for parity tests).
        mesh: optional :class:`jax.sharding.Mesh`; the coreset (and LOF) then run split over
            its devices (:mod:`tailedcore_jax.sharding`), with the same result.
    """
    _check_ratio("ratio", ratio)
    _check_ratio("drop", drop)
    feats, _ = _as_grid("patch_features", patch_features)
    image_mask = _check_features("patch_features", feats, mask)
    n, p, _ = _dims(feats)
    key_lof, key_core = jax.random.split(key)
    lof = _lof_scores(key_lof, feats, image_mask, lof_k=lof_k,
                      lof_projection_dim=lof_projection_dim, position_chunk=position_chunk,
                      lof_projection=lof_projection, mesh=mesh)
    keep = lof_filter_mask(lof, keep=1.0 - drop, mask=jnp.broadcast_to(image_mask[:, None], (n, p)))
    f, valid, idx = _coreset_rows(key_core, feats, keep.reshape(-1), ratio=ratio,
                                  projection_dim=projection_dim, projection=projection, mesh=mesh)
    weights = jnp.where(valid, lof.reshape(-1)[idx], 0.0).astype(jnp.float32)
    return MemoryBank(f, valid, weights)


def fit_tailedcore(
    key,
    patch_features,
    embeddings,
    *,
    ratio: float = 0.1,
    lof_k: int = 6,
    drop: float = 0.15,
    mask=None,
    tail_mask=None,
    augmented_tail_features=None,
    augmented_mask=None,
    max_tail_images: int | None = None,
    keep: float = 0.85,
    percentile: float = 0.15,
    projection_dim: int | None = 128,
    lof_projection_dim: int | None = 128,
    position_chunk: int | None = None,
    projection=None,
    lof_projection=None,
    mesh=None,
) -> MemoryBank:
    """TailedCore memory: tail coreset (TailSampler images + augmentations) then head coreset.

    JAX port of ``TailedCore._get_coreset`` in jungyg/TailedCore ``src/coreset_model.py``:

    - head: LOF noise filter over all training patches (as SoftPatch), then greedy coreset
      at ``ratio`` of the kept patches;
    - tail: the images that :func:`tail_sample_mask` selects from ``embeddings`` (or the
      given ``tail_mask``), all their patches plus ``augmented_tail_features`` (the patch
      features of their rotated/flipped copies), greedy coreset at ``ratio``, no noise filter;
    - memory = tail rows first, then head rows (``MemoryBank.is_tail`` marks them).

    The tail selection depends on the data, while the augmented features need a backbone
    forward of the selected images, so the usual flow is two calls::

        tail, sizes = tail_sample_mask(embeddings)           # which images are tail
        aug = extract(tail_augmentations(images[tail], kind))  # their augmented patches
        bank = fit_tailedcore(key, feats, embeddings, tail_mask=tail,
                              augmented_tail_features=aug)

    With ``augmented_tail_features=None`` the tail branch uses the base patches only.

    Args:
        key: PRNG key (LOF projection; head and tail coreset projections and starts).
        patch_features: ``(N, h, w, D)`` or ``(N, P, D)``.
        embeddings: ``(N, E)`` image embeddings for TailSampler.
        ratio, lof_k, drop, mask, projection_dim, lof_projection_dim, position_chunk: as in
            :func:`fit_softpatch`.
        tail_mask: ``(N,)`` bool tail images; None = computed by :func:`tail_sample_mask`.
        augmented_tail_features: ``(M_aug, D)``, ``(A, P, D)`` or ``(A, h, w, D)`` extra tail
            rows; ``augmented_mask`` (same leading shape, bool) marks valid ones.
        max_tail_images: static capacity of tail images in the tail branch. None: the exact
            count when ``tail_mask`` is concrete, else ``N``. Smaller capacities make the tail
            coreset cheaper under ``jit``/``vmap``; tail images beyond it are dropped (a
            concrete check raises instead).
        keep, percentile: TailSampler parameters.
        projection, lof_projection: explicit matrices as in :func:`fit_softpatch` (the same
            greedy projection then serves both branches).
        mesh: optional :class:`jax.sharding.Mesh`; the coreset (and LOF) then run split over
            its devices (:mod:`tailedcore_jax.sharding`), with the same result.

    Returns:
        ``MemoryBank`` of capacity ``tail_capacity + head_capacity`` with ``is_tail`` set.
        An empty tail (no image selected) gives a bank whose tail rows are all invalid.
    """
    for name, val in (("ratio", ratio), ("drop", drop), ("keep", keep), ("percentile", percentile)):
        _check_ratio(name, val)
    feats, _ = _as_grid("patch_features", patch_features)
    image_mask = _check_features("patch_features", feats, mask)
    n, p, d = _dims(feats)
    embeddings = jnp.asarray(embeddings)
    V.check_rank("embeddings", embeddings, 2)
    if embeddings.shape[0] != n:
        raise ValueError(
            f"embeddings has {embeddings.shape[0]} rows but patch_features has {n} images"
        )
    key_lof, key_head, key_tail = jax.random.split(key, 3)

    # --- tail selection -------------------------------------------------------------
    if tail_mask is None:
        tail_mask, _ = tail_sample_mask(embeddings, keep=keep, percentile=percentile,
                                        mask=image_mask)
    tail_mask = jnp.asarray(tail_mask)
    V.check_mask("tail_mask", tail_mask, n)
    tail_mask = tail_mask & image_mask
    concrete_tail = V.concrete_count(tail_mask, n)
    if max_tail_images is None:
        max_tail_images = n if concrete_tail is None else max(concrete_tail, 1)
    if concrete_tail is not None and concrete_tail > max_tail_images:
        raise ValueError(
            f"{concrete_tail} tail images selected but max_tail_images={max_tail_images}"
        )
    (tail_idx,) = jnp.nonzero(tail_mask, size=max_tail_images, fill_value=0)
    tail_slot_valid = jnp.arange(max_tail_images) < jnp.sum(tail_mask)
    tail_rows = feats[tail_idx].reshape(max_tail_images * p, d)
    tail_row_mask = jnp.repeat(tail_slot_valid, p)
    if augmented_tail_features is not None:
        aug = jnp.asarray(augmented_tail_features)
        lead = aug.shape[:-1]
        if aug.shape[-1] != d:
            raise ValueError(
                f"augmented_tail_features has dimension {aug.shape[-1]}, expected {d}"
            )
        _check_finite_large("augmented_tail_features", aug)
        aug_rows = aug.reshape(-1, d)
        if augmented_mask is None:
            aug_mask = jnp.ones((aug_rows.shape[0],), bool)
        else:
            augmented_mask = jnp.asarray(augmented_mask)
            if augmented_mask.shape != lead[: augmented_mask.ndim] or augmented_mask.dtype != bool:
                raise ValueError(
                    f"augmented_mask must be bool with shape {lead} or a prefix of it, "
                    f"got {augmented_mask.dtype} {augmented_mask.shape}"
                )
            aug_mask = jnp.broadcast_to(
                augmented_mask.reshape(augmented_mask.shape + (1,) * (len(lead) - augmented_mask.ndim)),
                lead,
            ).reshape(-1)
        tail_rows = jnp.concatenate([tail_rows, aug_rows.astype(tail_rows.dtype)])
        tail_row_mask = jnp.concatenate([tail_row_mask, aug_mask])
    if V.concrete_count(tail_row_mask, tail_row_mask.shape[0]) == 0:
        # Empty tail (concrete): no coreset to run; all tail rows are padding. (The official
        # code crashes here on ``torch.cat`` of an empty list.)
        cap = coreset_capacity(tail_rows.shape[0], ratio)
        tail_f = jnp.zeros((cap, d), tail_rows.dtype)
        tail_valid = jnp.zeros((cap,), bool)
    else:
        tail_f, tail_valid, _ = _coreset_rows(key_tail, tail_rows, tail_row_mask, ratio=ratio,
                                              projection_dim=projection_dim, projection=projection,
                                              mesh=mesh)
        # Under jit an empty tail cannot be detected up front: invalidate every row then.
        tail_valid = tail_valid & jnp.any(tail_row_mask)

    # --- head branch: LOF filter then coreset --------------------------------------------
    lof = _lof_scores(key_lof, feats, image_mask, lof_k=lof_k,
                      lof_projection_dim=lof_projection_dim, position_chunk=position_chunk,
                      lof_projection=lof_projection, mesh=mesh)
    keep_mask = lof_filter_mask(lof, keep=1.0 - drop,
                                mask=jnp.broadcast_to(image_mask[:, None], (n, p)))
    head_f, head_valid, _ = _coreset_rows(key_head, feats, keep_mask.reshape(-1), ratio=ratio,
                                          projection_dim=projection_dim, projection=projection,
                                          mesh=mesh)

    features = jnp.concatenate([tail_f, head_f])
    valid = jnp.concatenate([tail_valid, head_valid])
    is_tail = jnp.concatenate([jnp.ones_like(tail_valid), jnp.zeros_like(head_valid)])
    return MemoryBank(features, valid, None, is_tail)


def score(
    bank: MemoryBank,
    patch_features,
    *,
    query_chunk: int | None = None,
    bank_chunk: int | None = None,
    mesh=None,
) -> tuple[jax.Array, jax.Array]:
    """Anomaly scores of test images against a memory bank.

    Patch score = squared L2 distance to the nearest valid memory row (faiss ``IndexFlatL2``
    semantics of the official scorer), multiplied by the matched row's weight when the bank
    has SoftPatch weights; image score = max over the image's patches.

    Args:
        bank: a fitted :class:`MemoryBank`.
        patch_features: ``(B, h, w, D)`` or ``(B, P, D)`` test patch features.
        query_chunk, bank_chunk: chunk sizes passed to :func:`nearest_neighbors`.
        mesh: optional :class:`jax.sharding.Mesh`; the bank rows are then split over its
            devices (:func:`~tailedcore_jax.sharding.sharded_nearest_neighbors`), same scores.

    Returns:
        ``(image_scores (B,), patch_scores)`` with ``patch_scores`` shaped ``(B, h, w)`` (or
        ``(B, P)`` for flattened input).
    """
    feats, spatial = _as_grid("patch_features", patch_features)
    V.check_floating("patch_features", feats)
    _check_finite_large("patch_features", feats)
    b, p, d = _dims(feats)
    if bank.features.ndim != 2 or bank.features.shape[1] != d:
        raise ValueError(
            f"bank features have shape {bank.features.shape}, expected (n, {d}) to match "
            f"patch_features of dimension {d}"
        )
    kwargs = {}
    if query_chunk is not None:
        kwargs["query_chunk"] = query_chunk
    if bank_chunk is not None:
        kwargs["bank_chunk"] = bank_chunk
    knn = nearest_neighbors if mesh is None else functools.partial(sharded_nearest_neighbors,
                                                                    mesh=mesh)
    sqd, idx = knn(feats.reshape(b * p, d), bank.features, k=1, bank_mask=bank.mask, **kwargs)
    patch = sqd[:, 0]
    if bank.weights is not None:
        patch = patch * bank.weights[jnp.clip(idx[:, 0], 0, bank.weights.shape[0] - 1)]
    patch = patch.reshape((b,) + spatial)
    image = jnp.max(patch.reshape(b, -1), axis=-1)
    return image, patch


def nan_normalised_scores(image_scores, nan) -> jax.Array:
    """Image anomaly scores divided by the negative-aware norm of the image's activations.

    Beyond both papers: NAN (Park et al., ICCV 2023, Sec. 6.2) combines a distance score
    with the NAN of the last hidden layer as ``d / NAN`` (NAN is large for in-distribution
    inputs). Applied to anomaly detection, ``d`` is the kNN image score of :func:`score` and
    NAN is :func:`tailedcore_jax.ood.negative_aware_norm` of the image's pooled backbone
    embedding. Higher still means more anomalous.

    Args:
        image_scores: ``(B,)`` from :func:`score`.
        nan: ``(B,)`` NAN of the same images.

    Returns:
        ``(B,)`` ``image_scores / nan``; an image whose NAN is 0 (no active unit) gets the
        largest finite float32 (the most anomalous score that still ranks).

    Raises:
        ValueError: shapes differ.
    """
    image_scores = jnp.asarray(image_scores, jnp.float32)
    nan = jnp.asarray(nan, jnp.float32)
    if image_scores.shape != nan.shape or image_scores.ndim != 1:
        raise ValueError(
            f"image_scores {image_scores.shape} and nan {nan.shape} must both be (B,)"
        )
    safe = jnp.where(nan > 0, nan, 1.0)
    return jnp.where(nan > 0, image_scores / safe, jnp.finfo(jnp.float32).max)
