"""Small numerical building blocks shared by the kernels."""

import jax.numpy as jnp
from jaxtyping import Array, Float


def pairwise_sum(v: Float[Array, "... d"]) -> Float[Array, "..."]:
    """Sum over the last axis in a fixed pairwise order (zero-padded to a power of two).

    ``jnp.sum`` lets XLA pick the association order per shape, so the same row can round
    differently in a batch of 4 and in a batch of 1; a fixed order makes results independent of
    chunk sizes and of how a mesh splits the work (bit for bit), and its error grows like
    ``log2(d)`` rather than ``d``.
    """
    d = v.shape[-1]
    width = 1 << max(0, (d - 1).bit_length())
    if width != d:
        v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, width - d)])
    while v.shape[-1] > 1:
        half = v.shape[-1] // 2
        v = v[..., :half] + v[..., half:]
    return v[..., 0]
