"""Seeds sharded over several devices give the single-device run's results.

One subprocess with four CPU devices (`--xla_force_host_platform_device_count=4`, which must
be set before XLA starts, hence the subprocess) trains the same tiny 2-seed offline + online
ReBRAC run twice, with `multi_device=True` (one seed per device, on the first two) and
`False` (both on device 0), and checks which devices are chosen for other seed counts.

Not bit for bit: the per-seed computation is the same, but XLA compiles the per-device
program for a batch of 1 seed instead of 2 and lowers its dots differently
(unit batch dimensions dropped, other blockings; the gradient of `tanh(x @ w)` already
differs in its last bit), so float32 sums are accumulated in another order. The runs
therefore agree to rounding: every array of the final agent states within `2**7` float32
ulps of its largest magnitude (`|a - b| <= 128 * eps * max|b|`; measured: at most 2.5 with
these 2 seeds, 34 with 4 seeds on 4 devices), every
logged metric likewise, and the evaluations (success, and returns that are sums of integer
rewards) exactly."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest


pytestmark = pytest.mark.standard_promotion

EPS = float(np.finfo(np.float32).eps)
TOLERANCE_ULPS = 128
SEEDS = (0, 5)  # on 2 of the 4 devices: two trainings of 2 seeds hold half the memory
DEVICES = 4


def _child(dataset_dir: str, out: str) -> None:
    """Runs in the subprocess: both trainings, their results written under `out`."""
    import warnings

    import equinox as eqx
    import jax
    from helpers import release_memory, tiny_run
    from jax.sharding import PartitionSpec

    from qam.agents import AGENTS
    from qam.train import Trainer, _seed_mesh

    config = AGENTS["rebrac"].config(actor_hidden=(16, 16), critic_hidden=(16, 16), num_qs=2)

    assert len(jax.local_devices()) == DEVICES, jax.local_devices()
    summary: dict = {}
    for multi in (True, False):
        logs: list = []

        def log(step, metrics, prefix, logs=logs):
            logs.append([prefix, step, {k: v.tolist() for k, v in metrics.items()}])

        run = tiny_run(dataset_dir, os.path.join(out, str(multi)), seeds=SEEDS, agent="rebrac",
                       multi_device=multi, offline_steps=8, online_steps=8, log_interval=4,
                       eval_interval=8, checkpoint_interval=8, start_training=2)  # fmt: skip
        trainer = Trainer(run, config, log=log)
        result = trainer.train()
        leaves = [x for x in jax.tree.leaves(eqx.filter(trainer.states, eqx.is_array))]
        shardings = sorted({(str(getattr(x.sharding, "spec", None)), len(x.sharding.device_set))
                            for x in leaves})  # fmt: skip
        np.savez(os.path.join(out, f"leaves-{multi}.npz"), *[np.asarray(x) for x in leaves])
        summary[str(multi)] = dict(
            evals=result["evals"], bc=result["bc"], logs=logs, shardings=shardings,
            devices=[d.id for d in trainer.devices],
        )  # fmt: skip
        trainer.close()
        del trainer
        jax.clear_caches()  # the second training compiles its own programs
        release_memory()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = {n: _seed_mesh(True, n) for n in (1, 2, 3, 6, 8)}
    summary["mesh"] = {str(n): 1 if m is None else m.devices.size for n, m in chosen.items()}
    summary["warnings"] = [str(w.message) for w in caught]
    summary["off"] = _seed_mesh(False, 4) is None
    summary["spec"] = str(PartitionSpec("seeds"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f)


def test_sharded_seeds_equal_the_single_device_run(tiny_dataset_dir, tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        [env.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={DEVICES}"]
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    here = pathlib.Path(__file__).resolve()
    done = subprocess.run([sys.executable, str(here), tiny_dataset_dir, str(tmp_path)],
                          env=env, cwd=here.parents[1], capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    sharded, single = summary["True"], summary["False"]
    # Where the seeds ran: one per device, every array sharded along its seed axis.
    assert sharded["devices"] == [0, 1] and single["devices"] == [0]
    assert sharded["shardings"] == [[summary["spec"], len(SEEDS)]]
    assert [count for _, count in single["shardings"]] == [1]
    # The same results, to float32 rounding (see the module docstring).
    with np.load(tmp_path / "leaves-True.npz") as a, np.load(tmp_path / "leaves-False.npz") as b:
        assert len(a.files) == len(b.files) > 0
        for name in a.files:
            _assert_close(a[name], b[name], name)
    assert sharded["evals"] == single["evals"] and sharded["bc"] == single["bc"]
    assert [e["step"] for e in sharded["evals"]] == [8, 16]
    assert [row[:2] for row in sharded["logs"]] == [row[:2] for row in single["logs"]]
    for (prefix, step, got), (_, _, want) in zip(sharded["logs"], single["logs"]):
        assert set(got) == set(want)
        for key in want:
            _assert_close(np.asarray(got[key]), np.asarray(want[key]), f"{prefix} {step} {key}")
    # Other seed counts: the largest number of devices dividing the count; a warning when
    # that leaves devices idle with at least as many seeds as devices.
    assert summary["mesh"] == {"1": 1, "2": 2, "3": 3, "6": 3, "8": 4}
    assert summary["warnings"] == [
        "6 seeds run on 3 of the 4 local devices (each device holds the same number of seeds, "
        "so the count must divide evenly); train a multiple of 4 seeds to use them all, or set "
        "`multi_device=False` (`--no-multi-device`) for one device."
    ]
    assert summary["off"]


def _assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Equal for integer arrays; else within `TOLERANCE_ULPS` float32 ulps of `want`'s
    largest magnitude."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    if not np.issubdtype(want.dtype, np.floating):
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    scale = float(np.max(np.abs(want), initial=0.0))
    atol = TOLERANCE_ULPS * EPS * scale
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=what)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
