"""The training loop: resume is bit-identical, bad settings fail early, non-finite stops."""

import equinox as eqx
import jax
import numpy as np
import pytest
from helpers import release_memory, tiny_agent_config, tiny_run

from qam.train import Trainer


pytestmark = pytest.mark.standard_promotion

CONFIG = tiny_agent_config()


@pytest.fixture
def dataset_dir(tiny_dataset_dir):
    return tiny_dataset_dir


class _Interrupt(Exception):
    pass


def _host_leaves(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(trainer.states, eqx.is_array))]


def test_resume_is_bit_identical_to_uninterrupted_run(dataset_dir, tmp_path):
    logs_full: list = []
    full = Trainer(tiny_run(dataset_dir, tmp_path / "full"), CONFIG,
                   log=lambda s, m, p: logs_full.append((p, s, m)))  # fmt: skip
    result_full = full.train()
    # Keep only host copies: each Trainer holds ~1 GB of MuJoCo environments, so the three
    # runs are not kept alive at once.
    full_leaves = _host_leaves(full)
    del full
    release_memory()

    # Interrupted run: dies while logging step 40... no: at online step 32 + 4, i.e. after the
    # checkpoint at step 32 (episode 1, 4 steps in, one action of a chunk still pending).
    def dying_log(step, metrics, prefix):
        if step > 32 and prefix == "train":
            raise _Interrupt
        logs_part.append((prefix, step, metrics))

    logs_part: list = []
    part = Trainer(tiny_run(dataset_dir, tmp_path / "part"), CONFIG, log=dying_log)
    with pytest.raises(_Interrupt):
        part.train()
    del part
    release_memory()
    resumed_logs: list = []
    resumed = Trainer(tiny_run(dataset_dir, tmp_path / "part"), CONFIG,
                      log=lambda s, m, p: resumed_logs.append((p, s, m)))  # fmt: skip
    result_resumed = resumed.train()
    resumed_leaves = _host_leaves(resumed)
    del resumed
    release_memory()

    assert len(full_leaves) == len(resumed_leaves) > 0
    for a, b in zip(full_leaves, resumed_leaves):
        np.testing.assert_array_equal(a, b)
    assert result_full["evals"] == result_resumed["evals"]
    assert result_full["bc"] == result_resumed["bc"]
    # The resumed run redid exactly the steps after its checkpoint, with the same metrics.
    after = [(p, s, m) for p, s, m in logs_full if s > 32]
    assert [(p, s) for p, s, _ in after] == [(p, s) for p, s, _ in resumed_logs]
    for (_, _, m1), (_, _, m2) in zip(after, resumed_logs):
        for key in m1:
            np.testing.assert_array_equal(m1[key], m2[key])


def test_checkpoint_from_another_configuration_is_refused(dataset_dir, tmp_path):
    run = tiny_run(dataset_dir, tmp_path, online_steps=0)
    Trainer(run, CONFIG, log=lambda *a: None).train()
    with pytest.raises(ValueError, match="different configuration"):
        Trainer(tiny_run(dataset_dir, tmp_path, online_steps=0, batch_size=4), CONFIG,
                log=lambda *a: None).train()  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(agent="sac"), "not one of"),
        (dict(offline_steps=-1), "offline_steps"),
        (dict(eval_interval=12), "multiple of `log_interval`"),
        (dict(seeds=()), "seeds"),
        (dict(seeds=(1, 1)), "seeds"),
    ],
)
def test_bad_run_settings_fail_before_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_run("/nonexistent", "/nonexistent", **kwargs)


def test_missing_dataset_fails_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match="cube-double-play-v0.npz"):
        Trainer(tiny_run(str(tmp_path), tmp_path / "out"), CONFIG, log=lambda *a: None)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(dataset_dir, tmp_path, monkeypatch):
    import json

    import jax.numpy as jnp

    import qam.train as train

    real = train._offline_chunk
    calls = []

    def poisoned(states, keys, dataset, n, **kw):
        states, metrics = real(states, keys, dataset, n, **kw)
        calls.append(n)
        if len(calls) == 2:
            metrics = dict(metrics, critic_loss=jnp.full_like(metrics["critic_loss"], jnp.nan))
        return states, metrics

    monkeypatch.setattr(train, "_offline_chunk", poisoned)
    run = tiny_run(dataset_dir, tmp_path, online_steps=0)
    with pytest.raises(FloatingPointError, match="non-finite critic_loss at step 16; the run "
                       "stopped and the checkpoint of step 8 is kept"):  # fmt: skip
        Trainer(run, CONFIG, log=lambda *a: None).train()
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 8
