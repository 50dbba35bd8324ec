"""RLPD's training regime in `qam.train`: no offline phase, balanced batches (half offline
chunks, half from a buffer of online rows only), a random warm-up of single uniform actions with
no updates, bit-exact resume in that mode, clear errors, and `--agent rlpd` through the example
end to end."""

import dataclasses
import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_ENV, load_script, release_memory, tiny_run

import qam.train as train
from qam.agents import AGENTS
from qam.train import Trainer


pytestmark = pytest.mark.standard_promotion

H, B, ONLINE, WARMUP, SEEDS = 5, 8, 24, 10, (0,)
CONFIG = AGENTS["rlpd"].config(actor_hidden=(16,), critic_hidden=(16,), num_qs=2, horizon=H)
SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "offline_to_online.py"


def _run(dataset_dir, out_dir, **kw):
    """The RLPD regime on the tiny run: 24 online steps, 10 of them random warm-up, a train
    log row after every update, checkpoints every 8 steps, one evaluation at the end."""
    settings = dict(
        agent="rlpd", offline_steps=0, online_steps=ONLINE, balanced_sampling=True,
        random_warmup=True, start_training=WARMUP, log_interval=1, batch_size=B, seeds=SEEDS,
        eval_interval=ONLINE,
    )  # fmt: skip
    return tiny_run(dataset_dir, out_dir, **{**settings, **kw})


def _host_leaves(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(trainer.states, eqx.is_array))]


@pytest.fixture(scope="module")
def full(tiny_dataset_dir, tmp_path_factory):
    """One uninterrupted run: its logs, final states and buffers, its dataset, and what each
    call of the online update step was given (buffer fill, the dataset or None)."""
    logs: list = []
    calls: list = []
    out_dir = tmp_path_factory.mktemp("full")
    real = train._online_updates

    def recording(states, buffers, keys, **kw):
        calls.append((np.asarray(buffers.size).tolist(), kw.get("dataset")))
        return real(states, buffers, keys, **kw)

    train._online_updates = recording
    try:
        trainer = Trainer(_run(tiny_dataset_dir, out_dir), CONFIG,
                          log=lambda s, m, p: logs.append((p, s, m)))  # fmt: skip
        result = trainer.train()
    finally:
        train._online_updates = real
    _, buffers = trainer.load_checkpoint()
    out = dict(logs=logs, result=result, leaves=_host_leaves(trainer), buffers=buffers,
               dataset=trainer.dataset, states=trainer.states, calls=calls,
               out_dir=out_dir)  # fmt: skip
    trainer.close()
    del trainer
    release_memory()
    return out


def _chunk_starts(obs, actions, table_obs, table_actions, last_start):
    """Every start row `j <= last_start` of the table whose chunk `(s_j, a_j..a_{j+H-1})`
    equals `(obs, actions)`."""
    rows = np.flatnonzero(np.all(table_obs[: last_start + 1] == obs, axis=1))
    return [j for j in rows if np.array_equal(table_actions[j : j + H], actions)]


def _batch_of(state, batch, *, key):
    """An "update" that returns the batch it was given."""
    return state, {"obs": batch.observations, "actions": batch.actions}


def test_batches_are_half_offline_then_half_online(full):
    dataset, buffers = full["dataset"], full["buffers"]
    # The trainer's online updates got the offline dataset beside the buffer, from online
    # step start_training on, with the buffer holding the online rows written so far.
    assert [size for size, _ in full["calls"]] == [[t + 1] for t in range(WARMUP, ONLINE)]
    assert all(d is dataset for _, d in full["calls"])
    # The buffer holds online rows only: capacity online_steps, nothing offline in it.
    assert buffers.data.observations.shape[1] == ONLINE
    np.testing.assert_array_equal(np.asarray(buffers.size), [ONLINE] * len(SEEDS))
    # What that update step samples: rows 0..B/2-1 dataset chunks, rows B/2.. chunks of the
    # online rows written so far (here the buffer as it was after 12 and after 24 steps).
    d_obs, d_act = np.asarray(dataset.observations), np.asarray(dataset.actions)
    b_obs, b_act = np.asarray(buffers.data.observations[0]), np.asarray(buffers.data.actions[0])
    for written in (12, ONLINE):
        filled = eqx.tree_at(lambda b: (b.size, b.insert_index), buffers,
                             (jnp.full((1,), written, jnp.int32),
                              jnp.full((1,), written % ONLINE, jnp.int32)))  # fmt: skip
        for draw in range(3):
            keys = jax.random.split(jax.random.PRNGKey(draw), 1)
            _, batch = train._online_updates(
                full["states"], filled, keys, update=_batch_of, batch_size=B, utd_ratio=1,
                dataset=dataset,
            )  # fmt: skip
            obs, actions = np.asarray(batch["obs"][0]), np.asarray(batch["actions"][0])
            for r in range(B):
                offline = _chunk_starts(obs[r], actions[r], d_obs, d_act, dataset.size - H)
                online = _chunk_starts(obs[r], actions[r], b_obs, b_act, written - H)
                assert (bool(offline), bool(online)) == (r < B // 2, r >= B // 2), (written, r)


def test_warmup_is_single_uniform_actions_and_no_updates(full):
    # Online step t < start_training: the action is uniform(fold_in(fold_in(fold_in(
    # PRNGKey(seed), 5), t)), (A,), -1, 1): one draw per step from (seed, step) alone.
    actions = np.asarray(full["buffers"].data.actions)
    a = actions.shape[2]
    for i, seed in enumerate(SEEDS):
        base = jax.random.fold_in(jax.random.PRNGKey(seed), 5)
        expected = np.stack([
            np.asarray(jax.random.uniform(jax.random.fold_in(base, t), (a,), jnp.float32, -1, 1))
            for t in range(ONLINE)
        ])  # fmt: skip
        np.testing.assert_array_equal(actions[i, :WARMUP], expected[:WARMUP])
        # From start_training on the policy acts: none of its actions is the uniform draw.
        assert not np.any(np.all(actions[i, WARMUP:] == expected[WARMUP:], axis=1))
    warm = actions[:, :WARMUP].reshape(-1)
    assert np.all(np.abs(warm) <= 1) and warm.min() < -0.5 and warm.max() > 0.5
    # One update per env step from start_training on (utd 1), none before; no offline phase.
    np.testing.assert_array_equal(np.asarray(full["states"].step), [ONLINE - WARMUP] * len(SEEDS))
    rows = [s for p, s, _ in full["logs"] if p == "train"]
    assert rows == list(range(WARMUP + 1, ONLINE + 1))
    assert [e["step"] for e in full["result"]["evals"]] == [ONLINE]


class _Interrupt(Exception):
    pass


def test_interrupt_and_resume_is_bit_identical(full, tiny_dataset_dir, tmp_path):
    # Dies at the first train log after step 16 (the checkpoint of step 16: 16 online rows,
    # one episode of 12 done, 4 steps into the next, part of a chunk still queued).
    def dying_log(step, metrics, prefix):
        if step > 16 and prefix == "train":
            raise _Interrupt

    part = Trainer(_run(tiny_dataset_dir, tmp_path), CONFIG, log=dying_log)
    with pytest.raises(_Interrupt):
        part.train()
    part.close()
    del part
    release_memory()
    record = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert (record["step"], record["online_written"], record["phase_buffers"]) == (16, 16, True)
    logs: list = []
    resumed = Trainer(_run(tiny_dataset_dir, tmp_path), CONFIG,
                      log=lambda s, m, p: logs.append((p, s, m)))  # fmt: skip
    result = resumed.train()
    leaves = _host_leaves(resumed)
    _, buffers = resumed.load_checkpoint()
    resumed.close()
    del resumed
    release_memory()
    assert len(leaves) == len(full["leaves"]) > 0
    for x, y in zip(full["leaves"], leaves):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(full["buffers"]), jax.tree.leaves(buffers)):
        np.testing.assert_array_equal(x, y)
    assert result["evals"] == full["result"]["evals"]
    after = [(p, s, m) for p, s, m in full["logs"] if s > 16]
    assert [(p, s) for p, s, _ in after] == [(p, s) for p, s, _ in logs]
    for (_, _, m1), (_, _, m2) in zip(after, logs):
        for key in m1:
            np.testing.assert_array_equal(m1[key], m2[key])


def test_bad_settings_are_refused(tiny_dataset_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"`batch_size` must be even .*balanced_sampling"):
        _run(tiny_dataset_dir, tmp_path, batch_size=7)
    _run(tiny_dataset_dir, tmp_path, batch_size=7, balanced_sampling=False)  # fine unbalanced
    with pytest.raises(ValueError, match=r"capacity .* must be >= .*`horizon=5`; got 3"):
        Trainer(_run(tiny_dataset_dir, tmp_path, online_steps=3, start_training=1), CONFIG,
                log=lambda *a: None)  # fmt: skip
    real = train.qd.load_ogbench

    def empty(*args, **kwargs):
        data = real(*args, **kwargs)
        return data._replace(train=jax.tree.map(lambda x: x[:0], data.train))

    monkeypatch.setattr(train.qd, "load_ogbench", empty)
    with pytest.raises(ValueError, match=r"`balanced_sampling=True` .* dataset is empty"):
        Trainer(_run(tiny_dataset_dir, tmp_path), CONFIG, log=lambda *a: None)


def test_the_example_applies_the_regime_unless_flags_say_otherwise(monkeypatch):
    cli = load_script(SCRIPT, "offline_to_online")
    job, _ = cli.parse_args(["--agent", "rlpd"])
    assert (job.offline_steps, job.balanced_sampling, job.random_warmup) == (0, True, True)
    job, config = cli.parse_args(["--agent", "rlpd", "--preset", "paper", "--env", TINY_ENV])
    assert (job.offline_steps, job.online_steps, job.start_training) == (0, 500_000, 5_000)
    assert (job.balanced_sampling, job.random_warmup, config.bc_alpha) == (True, True, 0.0)
    argv = ["--agent", "rlpd", "--offline-steps", "5", "--no-random-warmup", "--bc-alpha", "0.1"]
    job, config = cli.parse_args(argv)
    assert (job.offline_steps, job.balanced_sampling, job.random_warmup) == (5, True, False)
    assert config.bc_alpha == 0.1
    job, _ = cli.parse_args(["--agent", "fql"])  # other agents keep the plain regime
    assert (job.offline_steps, job.balanced_sampling, job.random_warmup) == (9_000, False, False)


def test_agent_rlpd_end_to_end_through_the_example(full, tiny_dataset_dir, tmp_path, capsys):
    # The full run's settings as flags, without the regime's (they come from the agent's
    # run_defaults): the same run, so the same final checkpoint, byte for byte. In process
    # (a subprocess would compile everything again).
    out = tmp_path / "run"
    argv = [
        "--env", TINY_ENV, "--agent", "rlpd", "--dataset-dir", tiny_dataset_dir,
        "--out", str(out), "--seeds", "0", "--online-steps", str(ONLINE),
        "--start-training", str(WARMUP), "--eval-episodes", "1", "--eval-interval", str(ONLINE),
        "--log-interval", "1", "--checkpoint-interval", "8", "--batch-size", str(B),
        "--max-episode-steps", "12", "--actor-hidden", "16", "--critic-hidden", "16",
        "--num-qs", "2", "--no-progress",
    ]  # fmt: skip
    result = load_script(SCRIPT, "offline_to_online").main(argv)
    config = json.loads((out / "config.json").read_text())
    run = config["run"]
    assert (run["agent"], run["offline_steps"], run["online_steps"]) == ("rlpd", 0, ONLINE)
    assert run["balanced_sampling"] and run["random_warmup"]
    assert config["agent"] == json.loads(json.dumps(dataclasses.asdict(CONFIG)))
    record = json.loads((out / "checkpoints" / "latest.json").read_text())
    expected = json.loads((full["out_dir"] / "checkpoints" / "latest.json").read_text())
    assert (record["step"], record["online_written"]) == (ONLINE, ONLINE)
    assert record["file_sha256"] == expected["file_sha256"]
    assert result["evals"] == full["result"]["evals"] and result["bc"] is None
    assert "success rate" in capsys.readouterr().out
