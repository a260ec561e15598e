"""Shared pytest configuration: CPU only, strict rank promotion, a PRNG key fixture."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Silent broadcasting is the classic bug in distance code: make it an error in tests.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def rng():
    """A numpy Generator for test data (tests only; the library never uses np.random)."""
    return np.random.default_rng(0)
