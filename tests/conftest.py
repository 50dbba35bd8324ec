import os
import time


# Compile with XLA's backend (LLVM) optimisation level 0 unless XLA_FLAGS names a level: the
# suite's programs are small and each runs a few times, so LLVM's optimisation passes (most of
# XLA's compile time) cost far more than they save: about half of the compile time. Results
# are the same up to rounding, which no test depends on. Must be set before XLA starts.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import release_memory  # noqa: E402


# Catch the classic RL broadcasting bug ((B,) against (B, 1) -> (B, B)) everywhere.
jax.config.update("jax_numpy_rank_promotion", "raise")


def _cache_group(module) -> str:
    """Modules that set `JAX_CACHE_GROUP = "name"` build the same programs (e.g. the tiny
    trainer of `helpers.tiny_run`): they run one after another and keep each other's compiled
    code. Every other module is a group of its own."""
    return getattr(module, "JAX_CACHE_GROUP", module.__name__)


def pytest_collection_modifyitems(items):
    """Run the modules of one cache group one after another, where its first module stands
    (a stable reordering: everything else keeps pytest's order)."""
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        first.setdefault(_cache_group(item.module), index)
    items.sort(key=lambda item: first[_cache_group(item.module)])


_previous_group: list[str] = []


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code_between_modules(request):
    """Drop every compiled function and cached trace when a new cache group starts (groups
    share none: their networks, shapes and configs differ) and hand the freed memory back, so
    the suite's peak memory is that of its largest group rather than the sum of all of them."""
    group = _cache_group(request.module)
    if _previous_group and _previous_group[-1] != group:
        jax.clear_caches()
        release_memory()
    _previous_group[:] = [group]
    yield


@pytest.fixture(autouse=True)
def _release_memory_between_tests():
    """After a long test (> 2 s: those that build trainers, environments or many programs),
    free what it left in reference cycles (MuJoCo environments, ~250 MB each, sit in them)
    before the next starts; a full collection costs ~0.3 s, too much after every short test."""
    start = time.perf_counter()
    yield
    if time.perf_counter() - start > 2.0:
        release_memory()


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


@pytest.fixture
def x64():
    """Run the test in float64 (arrays and networks created inside it default to float64).

    For comparisons of two evaluation orders of the same mathematics (fused vs composed,
    batched vs vmapped, jit vs eager, closed-form recursions): in float32 such pairs differ by
    reduction-order rounding of ~1e-6 relative, which says nothing about correctness; in float64
    they agree to ~1e-14, so a tight tolerance (~1e-10) still catches any real defect."""
    with jax.enable_x64(True):
        yield
