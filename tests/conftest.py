import jax
import pytest


# Catch the classic RL broadcasting bug ((B,) against (B, 1) -> (B, B)) everywhere.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _dtype_promotion(request):
    """Strict dtype promotion (as equinox and diffrax test with), except in tests marked
    `standard_promotion`: optax's Adam mixes a Python float with an int32 step count, which
    strict mode rejects inside optax itself."""
    mode = "standard" if request.node.get_closest_marker("standard_promotion") else "strict"
    with jax.numpy_dtype_promotion(mode):
        yield


@pytest.fixture
def getkey():
    """A fresh, deterministic PRNG key per call within a test."""
    counter = iter(range(10_000))

    def _getkey():
        return jax.random.PRNGKey(next(counter))

    return _getkey


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory):
    """A tiny cube-double `play` dataset generated with OGBench's oracles (3 short episodes)."""
    import qam.data as qd

    directory = tmp_path_factory.mktemp("data")
    qd.generate_dataset(
        "cube-double-v0", "play", num_episodes=3, out_dir=directory, seed=0,
        max_episode_steps=40, progress=False,
    )  # fmt: skip
    return str(directory)
