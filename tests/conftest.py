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

# At most two glibc malloc arenas (the default is up to 8 per core, one per thread that
# allocates: XLA's compile and thread-pool threads each fragment their own): the suite's
# processes hold ~0.4 GB less after compiling a trainer's programs, at no measurable cost in
# time. This process before XLA starts its threads; its subprocesses through the variable.
os.environ.setdefault("MALLOC_ARENA_MAX", "2")
try:
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-8, int(os.environ["MALLOC_ARENA_MAX"]))  # M_ARENA_MAX
except (OSError, AttributeError, ValueError):  # not glibc
    pass

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import release_memory  # noqa: E402


# Catch the classic RL broadcasting bug ((B,) against (B, 1) -> (B, B)) everywhere.
jax.config.update("jax_numpy_rank_promotion", "raise")


# Modules that build the same programs (the tiny trainer of `helpers.tiny_run`): they run one
# after another and keep each other's compiled code. Every other module is a group of its own.
CACHE_GROUPS = {"test_checkpoints": "tiny-trainer", "test_train": "tiny-trainer"}

# Modules that build MuJoCo environments (150-450 MB each), trainers or subprocesses running
# JAX: 0.5-3 GB at their peak. They run first, and under pytest-xdist all on one worker.
MEMORY_HEAVY = {
    "test_checkpoints", "test_cli", "test_core_errors", "test_data_ogbench", "test_dense_rewards",
    "test_multidevice", "test_rlpd_training", "test_shards", "test_sweep", "test_train",
}  # fmt: skip


def _module_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _cache_group(module_name: str) -> str:
    return CACHE_GROUPS.get(module_name, module_name)


def _work_unit(module_name: str) -> str:
    """What one pytest-xdist worker runs as a whole: every memory-heavy module (one after
    another, so their peaks never add up), or one cache group."""
    return "memory-heavy" if module_name in MEMORY_HEAVY else _cache_group(module_name)


def pytest_collection_modifyitems(items):
    """The memory-heavy modules first, then the modules of one cache group one after another,
    where its first module stands (a stable reordering: everything else keeps pytest's order,
    including its grouping of parametrised module fixtures)."""
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        first.setdefault(_cache_group(_module_name(item.path)), index)
    items.sort(key=lambda item: (_module_name(item.path) not in MEMORY_HEAVY,
                                 first[_cache_group(_module_name(item.path))]))  # fmt: skip


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown without the plugin
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (the default `addopts`: `-n 2 --dist loadfile`) with the work units
    of `_work_unit` instead of single files, handed out in collection order (memory-heavy
    first): one worker starts on the memory-heavy modules while the other takes the rest,
    unit by unit; whichever is free takes the next. Other `--dist` modes are xdist's own.
    (Not `--dist loadgroup` with `xdist_group` marks: pytest-xdist 3.8 renames the items'
    `_nodeid`, which pytest 9 no longer reads, so the marks are silently ignored.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class WorkUnitScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(_module_name(nodeid.split("::", 1)[0]))

    config.option.loadscopereorder = False  # keep collection order, not largest unit first
    return WorkUnitScheduling(config, log)


_previous_group: list[str] = []


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code_between_modules(request):
    """Drop every compiled function and cached trace when a new cache group starts (groups
    share none: their networks, shapes and configs differ) and hand the freed memory back, so
    the suite's peak memory is that of its largest group rather than the sum of all of them."""
    group = _cache_group(_module_name(request.module.__file__))
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
