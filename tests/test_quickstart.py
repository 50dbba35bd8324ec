"""Smoke test of examples/quickstart.py: a reduced run writes the PNG and tilts the fine-tuned
flow toward the favoured mode."""

import functools
import pathlib

import jax
import optax
from helpers import load_script


_ADAM = optax.adam
_OPTIMISED = {"xla_backend_optimization_level": 2}
SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def _load_quickstart():
    # examples/ is not a package: load the script from its path.
    return load_script(SCRIPT, "qam_examples_quickstart")


def _adam_with_standard_promotion(learning_rate):
    """optax's Adam mixes a Python float with its int32 step count, which strict dtype promotion
    rejects inside optax; relax the promotion for the optimiser update only, so the rest of the
    example still runs under the suite's strict mode."""
    inner = _ADAM(learning_rate)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return inner.update(updates, state, params)

    return optax.GradientTransformation(inner.init, update)


def test_quickstart_tilts_toward_favoured_mode(tmp_path, monkeypatch):
    quickstart = _load_quickstart()
    monkeypatch.setattr(optax, "adam", _adam_with_standard_promotion)
    # The suite compiles at XLA's backend optimisation level 0 (tests/conftest.py); this run's
    # two training scans take 1,800 steps, where the optimised code saves more than it costs.
    monkeypatch.setattr(jax, "jit", functools.partial(jax.jit, compiler_options=_OPTIMISED))
    out = tmp_path / "quickstart.png"
    argv = ["--seed", "0", "--bc-steps", "1500", "--steps", "300", "--samples", "2000"]
    results = quickstart.main([*argv, "--out", str(out)])

    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["quickstart.png"]  # no temporary left over
    base = results["base flow (ODE)"]["weights"]
    fine = results["fine-tuned flow (achieved)"]["weights"]
    analytic = results["analytic tilt (predicted)"]["weights"]
    # Mode weights from 2,000 samples have standard errors <= 0.011, so the margins below
    # (>= 0.05) are the training's tolerances, not sampling noise (fixed seed).
    favoured = int(analytic.argmax())  # the mode at larger Q: mode 2, at a = (+0.5, 0)
    assert favoured == 1
    assert abs(base[favoured] - 0.5) < 0.1  # the fitted base flow keeps the modes balanced
    assert fine[favoured] > base[favoured] + 0.15  # a clear tilt toward the larger Q ...
    assert fine[favoured] < analytic[favoured] + 0.05  # ... that does not overshoot (K = 10)
