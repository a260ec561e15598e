"""TailSampler: tail (few-shot) image selection from image embeddings.

JAX port of ``sampler.AdaptiveTailSampler(th_type='trim_min', vote_type='mode')`` of
TailedCore (CVPR 2025), i.e. ``adaptive_class_size.adaptively_sample_few_shot`` in
jungyg/TailedCore, the configuration ``tail_th_type: ada_trim_min-mode`` used for all of
the paper's results. Written from the specification (tailedcore-spec.md section 3), not
copied; the statistics live in :mod:`tailedcore_jax.class_size`.

For ``N`` image embeddings (WRN50 ``avgpool``, 2048-d, in TailedCore):

1. cosine self-similarity ``S`` (float32);
2. per-image trim-min thresholds on the ``1/N`` grid (half-angle of the quantised minimum,
   strict ``>``, keep the top 85 %);
3. class size of every image = mode of the neighbour counts of the images that select it;
4. greedy pseudo-class grouping of the class sizes;
5. ``K* = min(elbow(groups), max_k_within_percentile(groups, 0.15))``;
6. tail = images with class size ``<= K*``.

The official ``run`` returns ``(E[idx], idx, class_sizes)`` with
``idx = torch.where(class_sizes <= K*)``; here the selection is a boolean mask
(``jnp.nonzero(tail_mask)`` gives the same indices, in the same order).

References:
    Y. G. Jung et al., "TailedCore: Few-Shot Sampling for Unsupervised Long-Tail Noisy
    Anomaly Detection", CVPR 2025 (arXiv:2504.02775). Official code: jungyg/TailedCore.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from tailedcore_jax import _validation as V
from tailedcore_jax import class_size as C

__all__ = ["TailSamplerStatistics", "tail_sample_mask", "tail_sampler_statistics"]


class TailSamplerStatistics(NamedTuple):
    """Every intermediate of the TailSampler (a pytree; fields in pipeline order).

    Attributes:
        similarity: ``(N, N)`` float32 cosine self-similarity.
        thresholds: ``(N,)`` float32 trim-min thresholds (``+inf`` for padded images).
        class_sizes: ``(N,)`` float32 predicted class size per image (NaN where no image
            selects it, 0 for padded images).
        groups: ``(N,)`` int32 pseudo-class sizes, descending, zero-padded.
        group_mask: ``(N,)`` bool, True for the valid entries of ``groups``.
        elbow: int32 scalar, elbow of the groups.
        k_percentile: int32 scalar, the percentile rule's group size.
        k_star: int32 scalar, the tail cut-off ``K*``.
        tail_mask: ``(N,)`` bool, True for the selected tail images.
    """

    similarity: Float[Array, "n n"]
    thresholds: Float[Array, " n"]
    class_sizes: Float[Array, " n"]
    groups: Int[Array, " n"]
    group_mask: Bool[Array, " n"]
    elbow: Int[Array, ""]
    k_percentile: Int[Array, ""]
    k_star: Int[Array, ""]
    tail_mask: Bool[Array, " n"]


def tail_sampler_statistics(
    embeddings: Float[Array, "n d"],
    *,
    keep: float = 0.85,
    percentile: float = 0.15,
    mask: Bool[Array, " n"] | None = None,
) -> TailSamplerStatistics:
    """Run the TailSampler and return every intermediate (see :func:`tail_sample_mask`).

    Args:
        embeddings: ``(N, D)`` floating-point image embeddings.
        keep: trim keep-ratio in ``(0, 1]`` (static).
        percentile: tail percentile in ``(0, 1]`` (static).
        mask: optional ``(N,)`` bool, True for valid images.

    Raises:
        ValueError, TypeError: as :func:`tail_sample_mask`.

    Returns:
        :class:`TailSamplerStatistics`.
    """
    keep, percentile = _validate(embeddings, keep, percentile, mask)
    x = jnp.asarray(embeddings, jnp.float32)
    if mask is None:
        return _statistics(
            x, jnp.ones((x.shape[0],), bool), keep=keep, percentile=percentile, masked=False
        )
    return _statistics(x, mask, keep=keep, percentile=percentile, masked=True)


def tail_sample_mask(
    embeddings: Float[Array, "n d"],
    *,
    keep: float = 0.85,
    percentile: float = 0.15,
    mask: Bool[Array, " n"] | None = None,
) -> tuple[Bool[Array, " n"], Float[Array, " n"]]:
    """Tail (few-shot) images predicted by the TailSampler (``ada_trim_min-mode``).

    Selects exactly the images that the official
    ``AdaptiveTailSampler('trim_min', 'mode').run(E)`` selects, given the same float32
    similarity matrix (the thresholds, votes, groups and cut-off are bit-exact; see
    :mod:`tailedcore_jax.class_size` for the two documented corner cases). The similarity
    itself is an XLA float32 matmul, equal to torch's to a few ulps; an image pair whose
    similarity sits within that rounding of a ``1/N`` grid point can in principle flip.

    Jit-compatible end to end (``keep``/``percentile`` are static), vmap-compatible with
    ``mask``, and compiled once per ``(N, D)``.

    Args:
        embeddings: ``(N, D)`` floating-point image embeddings (computed in float32).
        keep: trim keep-ratio in ``(0, 1]`` (static; official 0.85).
        percentile: tail percentile in ``(0, 1]`` (static; official 0.15). At 1 the
            percentile rule is skipped (``K* = elbow``), as in the official code.
        mask: optional ``(N,)`` bool, True for valid images. The result on the valid rows
            equals the result on the valid rows alone (given the same similarities: the
            matmul of a padded batch may round differently in the last bit); padded images
            are never selected and get class size 0.

    Returns:
        ``(tail_mask, class_sizes)``: ``(N,)`` bool and ``(N,)`` float32 (integer-valued
        predicted class sizes; NaN for an image no row selects, see
        :func:`~tailedcore_jax.class_size.predict_class_sizes`).

    Raises:
        ValueError: ``embeddings`` not rank 2, ``N < 2`` (or fewer than 2 valid images in a
            concrete mask), ``N > MAX_IMAGES``, ``keep``/``percentile`` outside ``(0, 1]``;
            on concrete inputs: NaN/inf, or an all-zero valid embedding row (the official
            code raises ``IndexError`` on it). Under ``jit``, an all-zero row is a zero
            vector (``F.normalize``), its threshold falls back to its row minimum and it
            votes for every image; validate such data beforehand.
        TypeError: non-floating ``embeddings``, non-bool ``mask``, non-real
            ``keep``/``percentile`` (e.g. passed as traced arguments to ``jax.jit``; mark
            them static).

    Example:
        >>> tail, sizes = tail_sample_mask(embeddings)          # doctest: +SKIP
        >>> tail_idx = jnp.nonzero(tail)[0]                     # official tail_indices
    """
    stats = tail_sampler_statistics(embeddings, keep=keep, percentile=percentile, mask=mask)
    return stats.tail_mask, stats.class_sizes


def _validate(embeddings, keep, percentile, mask):
    keep = C._check_unit_fraction("keep", keep)
    percentile = C._check_unit_fraction("percentile", percentile)
    V.check_rank("embeddings", embeddings, 2)
    V.check_floating("embeddings", embeddings)
    n = jnp.shape(embeddings)[0]
    C._check_num_images("embeddings", n)
    V.check_mask("mask", mask, n)
    C._check_valid_count("embeddings", mask, n)
    V.check_finite("embeddings", embeddings)
    if V.is_concrete(embeddings) and (mask is None or V.is_concrete(mask)):
        e = np.asarray(embeddings, np.float32)
        norms = np.sqrt(np.sum(e.astype(np.float64) ** 2, axis=1))
        bad = norms <= C.NORMALIZE_EPS
        if mask is not None:
            bad &= np.asarray(mask)
        if np.any(bad):
            rows = np.nonzero(bad)[0]
            raise ValueError(
                f"embeddings has {rows.size} all-zero row(s) (first: {rows[:5].tolist()}); "
                "their cosine similarity is undefined and the official TailSampler fails "
                "on them"
            )
    return keep, percentile


@functools.partial(jax.jit, static_argnames=("keep", "percentile", "masked"))
def _statistics(x, valid, *, keep, percentile, masked):
    s = C._cosine_similarity(x)
    n = s.shape[0]
    if masked:
        t = C._thresholds_impl(s, valid, keep=keep, n_lo=2, n_hi=n)
    else:
        t = C._thresholds_impl(s, None, keep=keep, n_lo=n, n_hi=n)
    sizes = C._class_sizes_impl(s, t, valid)
    groups, group_mask = C._group_impl(sizes, valid)
    g, k = C._sorted_desc(groups, group_mask)
    k_star, e, p = C._k_star_sorted(g, k, percentile)
    tail = valid & (sizes <= k_star.astype(jnp.float32))
    return TailSamplerStatistics(s, t, sizes, groups, group_mask, e, p, k_star, tail)
