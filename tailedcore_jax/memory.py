"""Memory banks of PatchCore, SoftPatch and TailedCore as compositions of the paper's steps.

Paper steps (public, composable):

* :func:`lof_scores`: patch-position-wise LOF in a random projection (SoftPatch's noise score);
* :func:`coreset_rows`: greedy k-center coreset of masked rows, gathered;
* :func:`denoised_coreset`: LOF filter (drop the top ``lof_drop`` of the scores), then the
  coreset of the survivors: SoftPatch's memory and TailedCore's head branch;
* :func:`tail_rows`: the patches of the TailSampler's tail images plus their augmentations:
  the input of TailedCore's tail branch.

Models: ``fit_patchcore = coreset_rows(all patches)``; ``fit_softpatch = denoised_coreset`` with
per-row LOF weights; ``fit_tailedcore = coreset_rows(tail_rows) ++ denoised_coreset`` (tail rows
first). A fitted model is a :class:`MemoryBank` pytree of fixed capacity with a validity mask:
save it with :mod:`tailedcore_jax.checkpoint`, pass it to :func:`score`, fit or score per product
class under ``jax.vmap`` (classes padded to one image capacity: one compilation). ``mesh=`` runs
the coresets, the LOF and the kNN split over a device mesh with the same result (eager or
``jit``, not under ``vmap``).

Memory: the fit holds one copy of the patch features plus working memory bounded by the
projected ``(N P, 128)`` rows; ``(N, h, w, D)`` inputs are reshaped only inside ``jit`` (outside,
a reshape is a copy). The tail branch gathers its images' rows and concatenates the
augmentations.

References:
    Jung et al., "TailedCore", CVPR 2025 (arXiv 2504.02775): JAX ports of ``TailedCore``,
    ``SoftPatch`` and ``PatchCore`` in jungyg/TailedCore ``src/coreset_model.py``;
    Roth et al., PatchCore, CVPR 2022; Jiang et al., SoftPatch, NeurIPS 2022 (here as in the
    TailedCore repository: the raw LOF score of the matched row is the weight).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from tailedcore_jax import _validation as V
from tailedcore_jax.coreset import greedy_coreset_masked, random_projection
from tailedcore_jax.knn import nearest_neighbors
from tailedcore_jax.lof import lof_filter_mask, patchwise_lof
from tailedcore_jax.tailsampler import tail_sample_mask

__all__ = [
    "CoresetRows",
    "MemoryBank",
    "coreset_capacity",
    "coreset_rows",
    "denoised_coreset",
    "fit_patchcore",
    "fit_softpatch",
    "fit_tailedcore",
    "lof_scores",
    "nan_normalized_scores",
    "score",
    "tail_rows",
]


class MemoryBank(NamedTuple):
    """A fitted memory bank (a pytree).

    Attributes:
        features: ``(n_max, D)`` float32 rows; rows where ``mask`` is False are padding.
        mask: ``(n_max,)`` bool, True for valid rows.
        weights: ``(n_max,)`` float32 SoftPatch weights (each row's LOF score) multiplying the
            nearest-neighbour distance at scoring, or None.
        is_tail: ``(n_max,)`` bool, True for TailedCore's tail rows (first), or None.
    """

    features: Float[Array, "n_max D"]
    mask: Bool[Array, " n_max"]
    weights: Float[Array, " n_max"] | None = None
    is_tail: Bool[Array, " n_max"] | None = None


class CoresetRows(NamedTuple):
    """A coreset of rows: ``features (capacity, D)`` (invalid rows 0), ``valid (capacity,)``
    and the selected row ``indices (capacity,)`` into the flattened input rows."""

    features: Float[Array, "c D"]
    valid: Bool[Array, " c"]
    indices: Int[Array, " c"]


def coreset_capacity(num_rows: int, ratio: float) -> int:
    """Static capacity of a coreset of ``ratio`` over ``num_rows`` candidates: the official
    ``int(ratio * num_rows)`` (the largest count any mask can give), at least 1."""
    return max(1, V.ratio_count(ratio, num_rows))


# ------------------------------------------------------------------------------ input checks


def _dims(feats) -> tuple[int, int, int]:
    """``(N, P, D)`` of an ``(N, h, w, D)`` or ``(N, P, D)`` array."""
    return feats.shape[0], math.prod(feats.shape[1:-1]), feats.shape[-1]


def _checked_features(name: str, patch_features, mask):
    """``(features unchanged, image mask)``: rank 3 or 4, floating, non-empty, finite valid
    images (one fused device reduction), a boolean ``(N,)`` mask selecting some image."""
    feats = jnp.asarray(patch_features)
    if feats.ndim not in (3, 4):
        raise ValueError(f"{name} must have shape (N, h, w, D) or (N, P, D), got {feats.shape}")
    V.check_floating(name, feats)
    n, p, d = _dims(feats)
    if n == 0 or p == 0 or d == 0:
        raise ValueError(f"{name} is empty: shape {feats.shape}")
    if mask is None:
        V.check_finite_rows(name, feats)
        return feats, jnp.ones((n,), bool)
    mask = jnp.asarray(mask)
    V.check_mask("mask", mask, n)
    if V.concrete_count(mask, n) == 0:
        raise ValueError("mask selects no images: cannot fit a memory bank on an empty set")
    V.check_finite_rows(name, feats, mask)
    return feats, mask


def _check_fractions(**fractions) -> None:
    for name, value in fractions.items():
        if name == "lof_drop":
            V.unit_fraction(name, value, closed_low=True, closed_high=False)
        else:
            V.unit_fraction(name, value)


# ------------------------------------------------------------------------------ paper steps


def lof_scores(
    key: jax.Array | None,
    patch_features: Float[Array, "N ... D"],
    *,
    k: int = 6,
    mask: Bool[Array, " N"] | None = None,
    projection_dim: int | None = 128,
    projection: Float[Array, "D p"] | None = None,
    position_chunk: int | None = None,
    mesh: Mesh | None = None,
) -> Float[Array, "N P"]:
    """Patch-position-wise LOF of ``patch_features @ W`` (SoftPatch / TailedCore noise score).

    ``W`` is :func:`~tailedcore_jax.coreset.random_projection` drawn from ``key`` (the official
    random ``nn.Linear(D, 128)``), or ``projection``; no projection when ``projection_dim`` is
    None or ``D``. Port of ``LOFSampler._compute_patchwise_lof`` in jungyg/TailedCore.

    Args:
        key: PRNG key of the projection (unused, may be None, without a random projection).
        patch_features: ``(N, h, w, D)`` or ``(N, P, D)``.
        k: LOF neighbours (official 6). mask: ``(N,)`` valid images.
        projection_dim, projection: the projection (static dim, or an explicit ``(D, p)``).
        position_chunk, mesh: as :func:`~tailedcore_jax.lof.patchwise_lof`.

    Returns:
        ``(N, P)`` LOF scores (padded images 0).
    """
    feats, image_mask = _checked_features("patch_features", patch_features, mask)
    return _lof(key, feats, image_mask, k=k, projection_dim=projection_dim,
                projection=projection, position_chunk=position_chunk, mesh=mesh)


def _lof(key, feats, image_mask, *, k, projection_dim, projection, position_chunk, mesh):
    """:func:`lof_scores` on checked features."""
    n, p, d = _dims(feats)
    if projection is None and projection_dim is not None and projection_dim != d:
        projection = random_projection(key, d, projection_dim)
    if projection is not None:
        projection = jnp.asarray(projection, jnp.float32)
        if projection.ndim != 2 or projection.shape[0] != d:
            raise ValueError(f"the LOF projection must have shape ({d}, p), got {projection.shape}")
        proj = _project_grid(feats, projection)
    else:
        proj = feats.reshape(n, p, d)  # a copy for 4-D input
    return patchwise_lof(proj, k=k, mask=image_mask, position_chunk=position_chunk, mesh=mesh)


@jax.jit
def _project_grid(feats, w):
    """``(N, ..., D) @ (D, e) -> (N, P, e)`` (the reshape inside jit: no copy of the input)."""
    rows = feats.reshape(feats.shape[0], -1, feats.shape[-1])
    return jnp.einsum("npd,de->npe", rows, w, precision=jax.lax.Precision.HIGHEST)


def coreset_rows(
    key: jax.Array,
    rows: Float[Array, "... D"],
    row_mask: Bool[Array, " M"],
    *,
    ratio: float = 0.1,
    projection_dim: int | None = 128,
    projection: Float[Array, "D p"] | None = None,
    start_index: int | Int[Array, ""] | None = None,
    allow_empty: bool = False,
    mesh: Mesh | None = None,
) -> CoresetRows:
    """Greedy coreset of the valid rows (``int(ratio * count)``), gathered.

    Port of ``GreedyCoresetSampler.run`` (jungyg/TailedCore ``src/sampler.py``); the key's
    draws are those of :func:`~tailedcore_jax.coreset.greedy_coreset_masked`.

    Args:
        key: PRNG key (projection and start).
        rows: ``(M, D)`` or any ``(..., D)`` grid, flattened to ``M`` rows inside ``jit``.
        row_mask: ``(M,)`` bool, True = candidate row.
        ratio: coreset fraction in ``(0, 1]`` (static; official 0.1).
        projection_dim, projection, start_index: as the coreset.
        allow_empty: an empty ``row_mask`` gives an all-invalid coreset instead of an error
            (TailedCore's tail when no image is selected; the official code crashes there).
        mesh: optional device mesh (rows split over it; same result).

    Returns:
        :class:`CoresetRows` of capacity :func:`coreset_capacity` ``(M, ratio)``.

    Raises:
        ValueError: ``ratio`` outside ``(0, 1]``; a concrete empty ``row_mask`` unless
            ``allow_empty``.
    """
    V.unit_fraction("ratio", ratio)
    d = rows.shape[-1]
    num_rows = math.prod(rows.shape[:-1])
    row_mask = jnp.asarray(row_mask)
    V.check_mask("row_mask", row_mask, num_rows)
    if V.concrete_count(row_mask, num_rows) == 0:
        if not allow_empty:
            raise ValueError("mask selects no rows: cannot build a coreset of an empty set")
        cap = coreset_capacity(num_rows, ratio)
        return CoresetRows(jnp.zeros((cap, d), rows.dtype), jnp.zeros((cap,), bool),
                           jnp.zeros((cap,), jnp.int32))
    if start_index is not None and V.is_concrete(start_index) and V.is_concrete(row_mask):
        s = int(start_index)
        if not (0 <= s < num_rows and bool(row_mask[s])):
            raise ValueError(f"start_index {s} is not a candidate row (of {num_rows} rows, "
                             f"{int(jnp.sum(row_mask))} candidates)")
    projection = None if projection is None else jnp.asarray(projection)
    static = dict(ratio=ratio, projection_dim=projection_dim)
    if mesh is None:
        out = _coreset_rows(key, rows, row_mask, projection, start_index, **static)
    else:
        rows2d = rows.reshape(num_rows, d)  # a copy outside jit (mesh path only)
        idx, valid = greedy_coreset_masked(
            key, rows2d, coreset_capacity(num_rows, ratio), mask=row_mask, projection=projection,
            start_index=start_index, mesh=mesh, **static)
        out = CoresetRows(jnp.where(valid[:, None], rows2d[idx], 0.0), valid, idx)
    if allow_empty:  # under jit an empty set cannot be caught up front: invalidate it then
        out = out._replace(valid=out.valid & jnp.any(row_mask))
    return out


@functools.partial(jax.jit, static_argnames=("ratio", "projection_dim"))
def _coreset_rows(key, rows, row_mask, projection, start_index, *, ratio, projection_dim):
    rows = rows.reshape(-1, rows.shape[-1])
    idx, valid = greedy_coreset_masked(
        key, rows, coreset_capacity(rows.shape[0], ratio), mask=row_mask, ratio=ratio,
        projection_dim=projection_dim, projection=projection, start_index=start_index)
    return CoresetRows(jnp.where(valid[:, None], rows[idx], 0.0), valid, idx)


def denoised_coreset(
    lof_key: jax.Array | None,
    coreset_key: jax.Array,
    patch_features: Float[Array, "N ... D"],
    *,
    ratio: float = 0.1,
    lof_k: int = 6,
    lof_drop: float = 0.15,
    mask: Bool[Array, " N"] | None = None,
    projection_dim: int | None = 128,
    lof_projection_dim: int | None = 128,
    position_chunk: int | None = None,
    projection: Float[Array, "D p"] | None = None,
    lof_projection: Float[Array, "D q"] | None = None,
    start_index: int | Int[Array, ""] | None = None,
    mesh: Mesh | None = None,
) -> tuple[CoresetRows, Float[Array, "N P"]]:
    """LOF noise filter then greedy coreset: ``coreset_rows(patches[lof < quantile(lof, 1 -
    lof_drop)])``. SoftPatch's memory and TailedCore's head branch.

    Port of ``SoftPatch._get_filtered_coreset`` / ``TailedCore._get_coreset_head`` in
    jungyg/TailedCore (``LOFSampler.run`` then ``GreedyCoresetSampler.run``).

    Args:
        lof_key: key of the LOF projection (see :func:`lof_scores`).
        coreset_key: key of the coreset (see :func:`coreset_rows`).
        patch_features: ``(N, h, w, D)`` or ``(N, P, D)``.
        ratio, lof_k, lof_drop: coreset fraction, LOF neighbours, dropped fraction (0.1, 6,
            0.15 officially; ``lof_drop`` in ``[0, 1)``).
        mask, projection_dim, lof_projection_dim, position_chunk, projection, lof_projection,
            start_index, mesh: as :func:`lof_scores` and :func:`coreset_rows`.

    Returns:
        ``(CoresetRows, lof (N, P))``; the coreset indices are flattened patch indices.
    """
    _check_fractions(ratio=ratio, lof_drop=lof_drop)
    feats, image_mask = _checked_features("patch_features", patch_features, mask)
    return _denoise(lof_key, coreset_key, feats, image_mask, ratio=ratio, lof_k=lof_k,
                    lof_drop=lof_drop, projection_dim=projection_dim,
                    lof_projection_dim=lof_projection_dim, position_chunk=position_chunk,
                    projection=projection, lof_projection=lof_projection,
                    start_index=start_index, mesh=mesh)


def _denoise(lof_key, coreset_key, feats, image_mask, *, ratio, lof_k, lof_drop, projection_dim,
             lof_projection_dim, position_chunk, projection, lof_projection, start_index, mesh):
    """:func:`denoised_coreset` on checked features."""
    n, p, _ = _dims(feats)
    lof = _lof(lof_key, feats, image_mask, k=lof_k, projection_dim=lof_projection_dim,
               projection=lof_projection, position_chunk=position_chunk, mesh=mesh)
    keep = lof_filter_mask(lof, drop=lof_drop, mask=jnp.broadcast_to(image_mask[:, None], (n, p)))
    rows = coreset_rows(coreset_key, feats, keep.reshape(-1), ratio=ratio,
                        projection_dim=projection_dim, projection=projection,
                        start_index=start_index, mesh=mesh)
    return rows, lof


def tail_rows(
    patch_features: Float[Array, "N ... D"],
    tail_mask: Bool[Array, " N"],
    *,
    augmented_tail_features: Float[Array, "... D"] | None = None,
    augmented_mask: Bool[Array, "..."] | None = None,
    max_tail_images: int | None = None,
) -> tuple[Float[Array, "M D"], Bool[Array, " M"]]:
    """The tail branch's candidate rows: every patch of the tail images, then the augmented
    copies' patches (port of ``TailedCore._get_coreset_tail`` before its coreset).

    Args:
        patch_features: ``(N, h, w, D)`` or ``(N, P, D)``.
        tail_mask: ``(N,)`` bool, the tail images (e.g. :func:`tail_sample_mask`).
        augmented_tail_features: ``(M_aug, D)``, ``(A, P, D)`` or ``(A, h, w, D)`` extra rows.
        augmented_mask: bool over a prefix of its leading shape (True = valid).
        max_tail_images: static capacity of tail images; None: the concrete count, else ``N``.

    Returns:
        ``(rows (max_tail_images * P + M_aug, D), row_mask)``.

    Raises:
        ValueError: more concrete tail images than ``max_tail_images``, a feature dimension or
            mask shape that does not match, NaN/inf in the augmented rows (concrete).
    """
    feats = jnp.asarray(patch_features)
    n, p, d = _dims(feats)
    tail_mask = jnp.asarray(tail_mask)
    V.check_mask("tail_mask", tail_mask, n)
    count = V.concrete_count(tail_mask, n)
    if max_tail_images is None:
        max_tail_images = n if count is None else max(count, 1)
    if count is not None and count > max_tail_images:
        raise ValueError(f"{count} tail images selected but max_tail_images={max_tail_images}")
    (idx,) = jnp.nonzero(tail_mask, size=max_tail_images, fill_value=0)
    rows = feats[idx].reshape(max_tail_images * p, d)
    row_mask = jnp.repeat(jnp.arange(max_tail_images) < jnp.sum(tail_mask), p)
    if augmented_tail_features is None:
        return rows, row_mask
    aug = jnp.asarray(augmented_tail_features)
    if aug.shape[-1] != d:
        raise ValueError(f"augmented_tail_features has dimension {aug.shape[-1]}, expected {d}")
    V.check_finite_rows("augmented_tail_features", aug)
    lead = aug.shape[:-1]
    if augmented_mask is None:
        aug_mask = jnp.ones((math.prod(lead),), bool)
    else:
        augmented_mask = jnp.asarray(augmented_mask)
        if augmented_mask.shape != lead[:augmented_mask.ndim] or augmented_mask.dtype != bool:
            raise ValueError(f"augmented_mask must be bool with shape {lead} or a prefix of it, "
                             f"got {augmented_mask.dtype} {augmented_mask.shape}")
        extra = (1,) * (len(lead) - augmented_mask.ndim)
        aug_mask = jnp.broadcast_to(augmented_mask.reshape(augmented_mask.shape + extra),
                                    lead).reshape(-1)
    return (jnp.concatenate([rows, aug.reshape(-1, d).astype(rows.dtype)]),
            jnp.concatenate([row_mask, aug_mask]))


# ------------------------------------------------------------------------------ the models


def fit_patchcore(
    key: jax.Array,
    patch_features: Float[Array, "N ... D"],
    *,
    ratio: float = 0.1,
    mask: Bool[Array, " N"] | None = None,
    projection_dim: int | None = 128,
    projection: Float[Array, "D p"] | None = None,
    start_index: int | Int[Array, ""] | None = None,
    mesh: Mesh | None = None,
) -> MemoryBank:
    """PatchCore: a greedy coreset (``ratio``, in a 128-d random projection) of every patch.

    Port of ``PatchCore._get_coreset`` in jungyg/TailedCore ``src/coreset_model.py``.

    Args:
        key: PRNG key (coreset projection and start). patch_features: ``(N, h, w, D)`` or
            ``(N, P, D)``. mask: ``(N,)`` valid images (padding for per-class ``vmap``).
        ratio, projection_dim, projection, start_index, mesh: as :func:`coreset_rows`.

    Returns:
        :class:`MemoryBank` of capacity ``coreset_capacity(N * P, ratio)``.
    """
    _check_fractions(ratio=ratio)
    feats, image_mask = _checked_features("patch_features", patch_features, mask)
    _, p, _ = _dims(feats)
    rows = coreset_rows(key, feats, jnp.repeat(image_mask, p), ratio=ratio,
                        projection_dim=projection_dim, projection=projection,
                        start_index=start_index, mesh=mesh)
    return MemoryBank(rows.features, rows.valid)


def fit_softpatch(
    key: jax.Array,
    patch_features: Float[Array, "N ... D"],
    *,
    ratio: float = 0.1,
    lof_k: int = 6,
    lof_drop: float = 0.15,
    mask: Bool[Array, " N"] | None = None,
    projection_dim: int | None = 128,
    lof_projection_dim: int | None = 128,
    position_chunk: int | None = None,
    projection: Float[Array, "D p"] | None = None,
    lof_projection: Float[Array, "D q"] | None = None,
    start_index: int | Int[Array, ""] | None = None,
    mesh: Mesh | None = None,
) -> MemoryBank:
    """SoftPatch: :func:`denoised_coreset` (``lof_key, coreset_key = split(key)``), each row
    weighted by its LOF score at scoring. Port of ``SoftPatch`` in jungyg/TailedCore.

    Args: as :func:`denoised_coreset`.

    Returns:
        :class:`MemoryBank` with ``weights``.
    """
    key_lof, key_core = jax.random.split(key)
    rows, lof = denoised_coreset(
        key_lof, key_core, patch_features, ratio=ratio, lof_k=lof_k, lof_drop=lof_drop, mask=mask,
        projection_dim=projection_dim, lof_projection_dim=lof_projection_dim,
        position_chunk=position_chunk, projection=projection, lof_projection=lof_projection,
        start_index=start_index, mesh=mesh)
    weights = jnp.where(rows.valid, lof.reshape(-1)[rows.indices], 0.0).astype(jnp.float32)
    return MemoryBank(rows.features, rows.valid, weights)


def fit_tailedcore(
    key: jax.Array,
    patch_features: Float[Array, "N ... D"],
    embeddings: Float[Array, "N E"],
    *,
    ratio: float = 0.1,
    lof_k: int = 6,
    lof_drop: float = 0.15,
    mask: Bool[Array, " N"] | None = None,
    tail_mask: Bool[Array, " N"] | None = None,
    augmented_tail_features: Float[Array, "... D"] | None = None,
    augmented_mask: Bool[Array, "..."] | None = None,
    max_tail_images: int | None = None,
    tail_keep: float = 0.85,
    tail_percentile: float = 0.15,
    tail_similarity_rounding: str = "xla",
    projection_dim: int | None = 128,
    lof_projection_dim: int | None = 128,
    position_chunk: int | None = None,
    projection: Float[Array, "D p"] | None = None,
    lof_projection: Float[Array, "D q"] | None = None,
    start_index: int | Int[Array, ""] | None = None,
    tail_projection: Float[Array, "D p"] | None = None,
    tail_start_index: int | Int[Array, ""] | None = None,
    mesh: Mesh | None = None,
) -> MemoryBank:
    """TailedCore: ``coreset_rows(tail_rows(...)) ++ denoised_coreset(all patches)``.

    The tail images come from :func:`~tailedcore_jax.tailsampler.tail_sample_mask` on
    ``embeddings`` (``tail_keep``, ``tail_percentile``) unless ``tail_mask`` is given; their
    augmented copies' features need a backbone pass over the selected images, so the usual
    flow is ``tail, _ = tail_sample_mask(emb)``, extract ``tail_augmentations(images[tail])``,
    then ``fit_tailedcore(key, feats, emb, tail_mask=tail, augmented_tail_features=aug)``.
    Keys: ``lof_key, head_key, tail_key = split(key, 3)``. Port of ``TailedCore._get_coreset``
    in jungyg/TailedCore ``src/coreset_model.py`` (tail rows first, no noise filter on them).

    Args:
        key, patch_features, ratio, lof_k, lof_drop, mask, projection_dim,
            lof_projection_dim, position_chunk, lof_projection, mesh: as
            :func:`fit_softpatch`.
        projection, start_index: explicit head-coreset draws (``start_index`` is a row of the
            flattened ``(N P, D)`` patches, so it must survive the LOF filter).
        tail_projection, tail_start_index: explicit tail-coreset draws (a row of
            :func:`tail_rows`' output); ``tail_projection`` defaults to ``projection``.
            With every draw given (and ``tail_mask``) the fit uses no randomness of ``key``:
            the official run's draws can be injected (``docs/fidelity.md``).
        embeddings: ``(N, E)`` image embeddings for the TailSampler.
        tail_mask, augmented_tail_features, augmented_mask, max_tail_images: as
            :func:`tail_rows`.
        tail_keep, tail_percentile, tail_similarity_rounding: TailSampler trim and tail
            fractions (0.85, 0.15) and similarity rounding (see
            :func:`~tailedcore_jax.tailsampler.tail_sample_mask`).

    Returns:
        :class:`MemoryBank` with ``is_tail``; an empty tail gives all-invalid tail rows.
    """
    _check_fractions(ratio=ratio, lof_drop=lof_drop, tail_keep=tail_keep,
                     tail_percentile=tail_percentile)
    feats, image_mask = _checked_features("patch_features", patch_features, mask)
    embeddings = jnp.asarray(embeddings)
    V.check_rank("embeddings", embeddings, 2)
    if embeddings.shape[0] != feats.shape[0]:
        raise ValueError(f"embeddings has {embeddings.shape[0]} rows but patch_features has "
                         f"{feats.shape[0]} images")
    key_lof, key_head, key_tail = jax.random.split(key, 3)
    if tail_mask is None:
        tail_mask, _ = tail_sample_mask(embeddings, keep=tail_keep, percentile=tail_percentile,
                                        mask=image_mask,
                                        similarity_rounding=tail_similarity_rounding)
    tail_mask = jnp.asarray(tail_mask)
    V.check_mask("tail_mask", tail_mask, feats.shape[0])
    rows, row_mask = tail_rows(feats, tail_mask & image_mask,
                               augmented_tail_features=augmented_tail_features,
                               augmented_mask=augmented_mask, max_tail_images=max_tail_images)
    tail = coreset_rows(key_tail, rows, row_mask, ratio=ratio, projection_dim=projection_dim,
                        projection=projection if tail_projection is None else tail_projection,
                        start_index=tail_start_index, allow_empty=True, mesh=mesh)
    head, _ = _denoise(
        key_lof, key_head, feats, image_mask, ratio=ratio, lof_k=lof_k, lof_drop=lof_drop,
        projection_dim=projection_dim, lof_projection_dim=lof_projection_dim,
        position_chunk=position_chunk, projection=projection, lof_projection=lof_projection,
        start_index=start_index, mesh=mesh)
    return MemoryBank(jnp.concatenate([tail.features, head.features]),
                      jnp.concatenate([tail.valid, head.valid]), None,
                      jnp.concatenate([jnp.ones_like(tail.valid), jnp.zeros_like(head.valid)]))


# ------------------------------------------------------------------------------ scoring


def score(
    bank: MemoryBank,
    patch_features: Float[Array, "B ... D"],
    *,
    query_chunk: int | None = None,
    bank_chunk: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[Float[Array, " B"], Float[Array, "B ..."]]:
    """Patch score = squared L2 to the nearest valid memory row (faiss ``IndexFlatL2``, k = 1),
    times the matched row's weight for SoftPatch; image score = max over the patches.

    Port of ``TailedCore._get_scores`` / ``NearestNeighbourScorer`` in jungyg/TailedCore.

    Args:
        bank: a fitted :class:`MemoryBank`.
        patch_features: ``(B, h, w, D)`` or ``(B, P, D)`` test patch features.
        query_chunk, bank_chunk, mesh: as :func:`~tailedcore_jax.knn.nearest_neighbors`.

    Returns:
        ``(image_scores (B,), patch_scores (B, h, w) or (B, P))``.

    Raises:
        ValueError: bad shapes, a bank of another dimension, NaN/inf (concrete inputs).
    """
    feats = jnp.asarray(patch_features)
    if feats.ndim not in (3, 4):
        raise ValueError(f"patch_features must have shape (B, h, w, D) or (B, P, D), "
                         f"got {feats.shape}")
    V.check_floating("patch_features", feats)
    V.check_finite_rows("patch_features", feats)
    b, p, d = _dims(feats)
    if bank.features.ndim != 2 or bank.features.shape[1] != d:
        raise ValueError(f"bank features have shape {bank.features.shape}, expected (n, {d}) to "
                         f"match patch_features of dimension {d}")
    chunks = {name: v for name, v in (("query_chunk", query_chunk), ("bank_chunk", bank_chunk))
              if v is not None}
    sqd, idx = nearest_neighbors(feats.reshape(b * p, d), bank.features, k=1,
                                 bank_mask=bank.mask, mesh=mesh, **chunks)
    patch = sqd[:, 0]
    if bank.weights is not None:
        patch = patch * bank.weights[jnp.clip(idx[:, 0], 0, bank.weights.shape[0] - 1)]
    patch = patch.reshape(feats.shape[:-1])
    return jnp.max(patch.reshape(b, -1), axis=-1), patch


def nan_normalized_scores(image_scores: Float[Array, " B"], nan: Float[Array, " B"]
                          ) -> Float[Array, " B"]:
    """``image_scores / nan``: the kNN anomaly score divided by the negative-aware norm of the
    image's pooled embedding (beyond both papers: NAN's ``distance / NAN`` combination, Park et
    al., ICCV 2023, applied to anomaly detection). Higher is more anomalous; an image with
    NAN 0 gets the largest finite float32.

    Raises:
        ValueError: shapes differ or are not ``(B,)``.
    """
    image_scores = jnp.asarray(image_scores, jnp.float32)
    nan = jnp.asarray(nan, jnp.float32)
    if image_scores.shape != nan.shape or image_scores.ndim != 1:
        raise ValueError(f"image_scores {image_scores.shape} and nan {nan.shape} must both be (B,)")
    return jnp.where(nan > 0, image_scores / jnp.where(nan > 0, nan, 1.0),
                     jnp.finfo(jnp.float32).max)
