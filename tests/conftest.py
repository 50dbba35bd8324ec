import jax
import pytest


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """A fresh, deterministic PRNG key per call within a test."""
    counter = iter(range(10_000))

    def _getkey():
        return jax.random.PRNGKey(next(counter))

    return _getkey
