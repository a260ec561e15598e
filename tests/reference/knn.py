"""Plain-NumPy brute-force oracle for ``tailedcore_jax.knn``.

Float64, direct differences (no norm expansion), full distance matrix, stable argsort:
the definition of exact k-nearest-neighbour search, independent of the library code.
"""

import numpy as np


def sq_distance_matrix(queries, bank):
    """``(m, n)`` float64 matrix of ``sum((q_i - b_j)**2)``, by direct differences."""
    q = np.asarray(queries, np.float64)
    b = np.asarray(bank, np.float64)
    diff = q[:, None, :] - b[None, :, :]
    return np.einsum("mnd,mnd->mn", diff, diff)


def knn(queries, bank, k, bank_mask=None):
    """Brute-force k nearest neighbours.

    Returns ``(sq_distances (m, k) float64, indices (m, k) int64, full (m, n) float64)``;
    masked rows get distance ``inf`` in ``full`` and are never selected while enough valid
    rows exist. Ties go to the lower index (stable sort).
    """
    full = sq_distance_matrix(queries, bank)
    ranked = full.copy()
    if bank_mask is not None:
        ranked[:, ~np.asarray(bank_mask, bool)] = np.inf
    order = np.argsort(ranked, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ranked, order, axis=1), order, ranked
