"""tailedcore_jax: TailedCore and NAN as pure, jit-compiled JAX functions.

Every public function is re-exported here, one name per line.
"""

__version__ = "0.1.0"
