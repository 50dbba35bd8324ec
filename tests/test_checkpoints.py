"""Replay-buffer sizing, checkpoints the size of the state, and the run records around them."""

import dataclasses
import json
import os
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_ENV, load_script, release_memory, tiny_agent_config, tiny_run

import qam.data as qd
from qam.data._sampling import _buffer_starts
from qam.train import Trainer


pytestmark = pytest.mark.standard_promotion

ENV = TINY_ENV
CONFIG = tiny_agent_config()
ONLINE = 24
SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "offline_to_online.py"


def _run(dataset_dir, out_dir, **kw):
    return tiny_run(dataset_dir, out_dir, **{"offline_steps": 8, "online_steps": ONLINE, **kw})


@pytest.fixture(scope="module")
def finished(tiny_dataset_dir, tmp_path_factory):
    """One finished offline + online run (default buffer sizing) and its logs."""
    out = tmp_path_factory.mktemp("run")
    logs: list = []
    trainer = Trainer(
        _run(tiny_dataset_dir, out), CONFIG, log=lambda s, m, p: logs.append((p, s, m))
    )
    result = trainer.train()
    trainer.close()  # its environments are not needed again
    return trainer, result, logs, out


@pytest.fixture(autouse=True)
def _free_trainers():
    """Trainers hold MuJoCo environments in reference cycles: collect them after each test."""
    yield
    release_memory()


def test_default_buffer_keeps_every_offline_row(finished):
    trainer, _, _, _ = finished
    meta, buffers = trainer.load_checkpoint()
    n = trainer.dataset.size
    assert trainer.buffer_capacity() == n + ONLINE
    np.testing.assert_array_equal(np.asarray(buffers.size), [n + ONLINE] * 2)
    for field in ("observations", "actions", "rewards", "masks", "terminals"):
        kept = np.asarray(getattr(buffers.data, field))[:, :n]
        original = np.asarray(getattr(trainer.dataset, field))
        for seed in range(2):
            np.testing.assert_array_equal(kept[seed], original, err_msg=field)
    # Chunk starts are uniform over the filled ring: after the online phase every offline row
    # still starts a chunk with probability 1 / (N + online - H + 1) (nothing was evicted).
    one = jax.tree.map(lambda x: x[0], buffers)
    draws = 200_000
    starts = np.asarray(_buffer_starts(one, jax.random.PRNGKey(0), draws, CONFIG.horizon))
    valid = n + ONLINE - CONFIG.horizon + 1
    counts = np.bincount(starts, minlength=n + ONLINE)
    p = 1.0 / valid
    se = np.sqrt(draws * p * (1 - p))
    assert np.all(counts[:n] > 0)
    assert np.max(np.abs(counts[:n] - draws * p)) < 5 * se
    assert np.all(counts[valid:] == 0)  # starts too close to the newest row are not drawn


def test_capped_buffer_evicts_the_oldest_offline_rows(tiny_dataset_dir, tmp_path):
    data = qd.load_ogbench(ENV, dataset_dir=tiny_dataset_dir, load_val=False)
    n = data.train.size
    cap = n + 10
    trainer = Trainer(_run(tiny_dataset_dir, tmp_path, buffer_size=cap), CONFIG,
                      log=lambda *a: None)  # fmt: skip
    trainer.train()
    _, buffers = trainer.load_checkpoint()
    assert trainer.buffer_capacity() == cap
    assert int(buffers.size[0]) == cap and int(buffers.insert_index[0]) == (n + ONLINE) % cap
    evicted = ONLINE - 10  # online rows 10..23 overwrote offline rows 0..13
    original = np.asarray(data.train.observations)
    kept = np.asarray(buffers.data.observations[0])
    np.testing.assert_array_equal(kept[evicted:n], original[evicted:n])
    assert not np.array_equal(kept[:evicted], original[:evicted])


def test_a_single_file_run_holds_no_dataset_environment(finished):
    """Training makes its own environments; the dataset's (a few hundred MB) is not built."""
    trainer, *_ = finished
    assert trainer.data.env is None and trainer.data.info.num_train == trainer.dataset.size


def test_checkpoint_holds_the_state_and_online_rows_only(finished):
    trainer, _, _, out = finished
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    path = out / "checkpoints" / latest["file"]
    states_only = out / "states-only.eqx"
    eqx.tree_serialise_leaves(states_only, (trainer.states, None))
    rows = latest["online_written"]
    assert rows == ONLINE
    obs_dim = trainer.dataset.observations.shape[1]
    action_dim = trainer.dataset.action_dim
    row_bytes = 4 * (2 * obs_dim + action_dim + 3)  # float32 obs, next obs, action, r, mask, term
    online_bytes = 2 * rows * row_bytes  # two seeds
    leaf_headers = 6 * 200  # one .npy header per field, generously
    size = path.stat().st_size
    assert states_only.stat().st_size + online_bytes <= size
    assert size <= states_only.stat().st_size + online_bytes + leaf_headers
    assert latest["dataset"]["rows"] == trainer.dataset.size
    assert latest["dataset"]["files"][0]["path"].endswith("cube-double-play-v0.npz")


def test_resume_from_a_finished_run_restores_the_buffer_exactly(finished, tiny_dataset_dir):
    trainer, result, _, out = finished
    _, buffers = trainer.load_checkpoint()
    again = Trainer(_run(tiny_dataset_dir, out), CONFIG, log=lambda *a: None)
    _, restored = again.load_checkpoint()
    for a, b in zip(jax.tree.leaves(buffers), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(a, b)
    # A rerun of a finished run redoes nothing, and its wall time is the accumulated one.
    rerun = again.train()
    assert rerun["evals"] == result["evals"]
    assert (
        rerun["wall_time_s"]
        >= json.loads((out / "checkpoints" / "latest.json").read_text())["wall_time_s"]
    )


def test_a_changed_dataset_is_refused_on_resume(tiny_dataset_dir, tmp_path):
    Trainer(_run(tiny_dataset_dir, tmp_path / "run", online_steps=0), CONFIG,
            log=lambda *a: None).train()  # fmt: skip
    other = tmp_path / "other"
    qd.generate_dataset(
        "cube-double-v0", "play", num_episodes=3, out_dir=other, seed=1,
        max_episode_steps=40, progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="offline dataset changed"):
        Trainer(_run(str(other), tmp_path / "run", online_steps=0), CONFIG, log=lambda *a: None)


def test_one_eval_row_per_step_with_the_bc_policy_beside(finished):
    _, result, logs, _ = finished
    eval_steps = [s for p, s, _ in logs if p == "eval"]
    assert eval_steps == sorted(set(eval_steps)) == [8, 16, 24, 32]
    offline_end = next(m for p, s, m in logs if p == "eval" and s == 8)
    assert {"success", "return", "bc_success", "bc_return"} <= set(offline_end)
    assert result["bc"] == np.asarray(offline_end["bc_success"]).tolist()


def test_num_val_counts_the_validation_file_when_not_loaded(tiny_dataset_dir):
    unloaded = qd.load_ogbench(ENV, dataset_dir=tiny_dataset_dir, load_val=False, make_env=False)
    loaded = qd.load_ogbench(ENV, dataset_dir=tiny_dataset_dir, load_val=True, make_env=False)
    assert loaded.val is not None
    assert unloaded.info.num_val == loaded.info.num_val == loaded.val.size > 0


def test_cli_failed_start_leaves_no_run_directory(tmp_path, capsys):
    cli = load_script(SCRIPT, "offline_to_online")
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--env", ENV, "--dataset-dir", str(tmp_path / "missing"), "--out", str(out),
                  "--no-progress"])  # fmt: skip
    message = str(exc.value)
    assert message.startswith("error: OGBench dataset file not found")
    assert "--dataset-dir" in message and "dataset_dir=" not in message
    assert not os.path.exists(out)


def test_environments_do_not_warn_about_float32_casts(tiny_dataset_dir):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = qd.load_ogbench(ENV, dataset_dir=tiny_dataset_dir, load_val=False)
        env = data.env
        env.reset(seed=0)
        env.step(jnp.zeros(data.train.action_dim).tolist())


def test_cli_refuses_a_fresh_run_over_foreign_files(tmp_path):
    cli = load_script(SCRIPT, "offline_to_online")
    out = tmp_path / "x"
    out.mkdir()
    (out / "experiments.jsonl").write_text('{"step": 1}\n')
    (out / "experiments.csv").write_text("step\n1\n")
    with pytest.raises(SystemExit, match="not this job's run files"):
        cli.main(["--env", ENV, "--dataset-dir", str(tmp_path / "missing"), "--out", str(out),
                  "--no-progress"])  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["experiments.csv", "experiments.jsonl"]
    assert (out / "experiments.jsonl").read_text() == '{"step": 1}\n'


def test_a_requested_stop_checkpoints_and_resumes_bit_identically(
    finished, tiny_dataset_dir, tmp_path, monkeypatch
):
    """`request_stop` (what SIGINT / SIGTERM do in the main job) in the middle of the online
    phase, between two regular checkpoints: the resumed run ends exactly as the uninterrupted
    one."""
    import qam.train as train

    reference, result, logs, _ = finished
    trainer = Trainer(_run(tiny_dataset_dir, tmp_path), CONFIG, log=lambda *a: None)
    real, calls = train._add_all, []

    def add_and_maybe_stop(buffers, transitions):
        calls.append(1)
        if len(calls) == 11:  # online step 19: not a multiple of checkpoint_interval
            trainer.request_stop()
        return real(buffers, transitions)

    monkeypatch.setattr(train, "_add_all", add_and_maybe_stop)
    with pytest.raises(train.TrainingInterrupted) as stopped:
        trainer.train()
    assert stopped.value.step == 19
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 19
    monkeypatch.setattr(train, "_add_all", real)
    trainer.close()
    release_memory()
    resumed_logs: list = []
    resumed = Trainer(_run(tiny_dataset_dir, tmp_path), CONFIG,
                      log=lambda s, m, p: resumed_logs.append((p, s, m)))  # fmt: skip
    again = resumed.train()
    assert again["evals"] == result["evals"] and again["bc"] == result["bc"]
    for a, b in zip(jax.tree.leaves(eqx.filter(reference.states, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(resumed.states, eqx.is_array))):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    after = [(p, s) for p, s, _ in logs if s > 19]
    assert after == [(p, s) for p, s, _ in resumed_logs]


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst / "checkpoints"


def _same_states(a, b):
    for x, y in zip(jax.tree.leaves(eqx.filter(a, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(b, eqx.is_array))):  # fmt: skip
        np.testing.assert_array_equal(x, y)


def test_two_checkpoints_are_kept_and_a_damaged_newest_falls_back(
    finished, tiny_dataset_dir, tmp_path
):
    import qam.train as train

    reference, result, _, out = finished
    directory = _copy_run(out, tmp_path)
    names = sorted(os.listdir(directory))
    assert names == ["ckpt-000000024.eqx", "ckpt-000000024.json", "ckpt-000000032.eqx",
                     "ckpt-000000032.json", "latest.json"]  # fmt: skip
    newest = directory / "ckpt-000000032.eqx"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated, as by a full disk
    with pytest.warns(UserWarning, match="ckpt-000000032.eqx has"):
        assert train.latest_checkpoint_step(str(tmp_path)) == 24
    with pytest.warns(UserWarning, match="skipped a damaged checkpoint"):
        trainer = Trainer(_run(tiny_dataset_dir, tmp_path), CONFIG, log=lambda *a: None)
        again = trainer.train()  # resumes from step 24 and redoes 25..32
    assert again["evals"] == result["evals"]
    _same_states(reference.states, trainer.states)
    trainer.close()


def test_an_unreadable_latest_json_is_named_and_skipped(finished, tmp_path):
    import qam.train as train

    directory = _copy_run(finished[3], tmp_path)
    (directory / "latest.json").write_text('{"step": 3')  # truncated mid-write
    with pytest.warns(UserWarning, match=r"latest.json is unreadable \(JSONDecodeError"):
        assert train.latest_checkpoint_step(str(tmp_path)) == 32
    for name in ("ckpt-000000024.eqx", "ckpt-000000032.eqx"):
        (directory / name).write_bytes(b"")
    with pytest.raises(ValueError, match="no usable checkpoint") as error:
        train.latest_checkpoint_step(str(tmp_path))
    assert "ckpt-000000024.eqx has 0 bytes" in str(error.value)
    assert "ckpt-000000032.eqx has 0 bytes" in str(error.value)


def test_a_failed_evaluation_loses_no_training(finished, tiny_dataset_dir, tmp_path, monkeypatch):
    """The checkpoint of a step is written before its evaluation; a run whose evaluation dies
    resumes at that step, evaluates it, and ends as the uninterrupted run."""
    reference, result, _, _ = finished
    trainer = Trainer(_run(tiny_dataset_dir, tmp_path), CONFIG, log=lambda *a: None)
    real = Trainer.evaluate

    def failing(self, states, step, *, bc=False):
        if step == 16:
            raise RuntimeError("simulated evaluation failure")
        return real(self, states, step, bc=bc)

    monkeypatch.setattr(Trainer, "evaluate", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train()
    trainer.close()
    import qam.train as train

    assert train.latest_checkpoint_step(str(tmp_path)) == 16
    monkeypatch.setattr(Trainer, "evaluate", real)
    resumed = Trainer(_run(tiny_dataset_dir, tmp_path), CONFIG, log=lambda *a: None)
    again = resumed.train()
    assert again["evals"] == result["evals"] and again["bc"] == result["bc"]
    _same_states(reference.states, resumed.states)
    resumed.close()


def test_one_run_per_output_directory(tiny_dataset_dir, tmp_path):
    from qam.train import RunDirectoryBusy

    first = Trainer(_run(tiny_dataset_dir, tmp_path), CONFIG, log=lambda *a: None)
    second = Trainer(_run(tiny_dataset_dir, tmp_path), CONFIG, log=lambda *a: None)
    first.lock()
    with pytest.raises(RunDirectoryBusy, match=rf"another run \(pid {os.getpid()}\) is using"):
        second.lock()
    first.close()  # releases the lock
    second.lock()
    second.close()


@pytest.mark.parametrize(
    "field, value, message",
    [("seeds", (0, 2**32), r"\[0, 2\*\*32\)"), ("max_episode_steps", 0, "max_episode_steps")],
)
def test_run_config_refuses_impossible_settings(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_run(None, tmp_path, **{field: value})


def test_a_horizon_longer_than_every_episode_is_refused(tiny_dataset_dir, tmp_path):
    config = dataclasses.replace(CONFIG, horizon=41)  # the tiny dataset's episodes: 40 steps
    with pytest.raises(ValueError, match=r"shorter than the action chunk length `horizon=41`"):
        Trainer(_run(tiny_dataset_dir, tmp_path), config, log=lambda *a: None)


def test_cli_refuses_a_second_run_on_the_same_out(tiny_dataset_dir, tmp_path):
    holder = Trainer(_run(tiny_dataset_dir, tmp_path), CONFIG, log=lambda *a: None)
    holder.lock()
    cli = load_script(SCRIPT, "offline_to_online")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit, match=rf"another run \(pid {os.getpid()}\) is using"):
        cli.main(["--env", ENV, "--dataset-dir", tiny_dataset_dir, "--out", str(tmp_path),
                  "--no-progress", "--actor-hidden", "8", "--critic-hidden", "8"])  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == before
    holder.close()


@pytest.mark.parametrize("case", ["out-is-a-file", "out-under-a-file", "tensorboard-missing"])
def test_cli_refuses_an_unusable_out_or_backend_in_one_line(case, tiny_dataset_dir, tmp_path,
                                                           monkeypatch):  # fmt: skip
    import qam.logging as qlog

    blocker = tmp_path / "file"
    blocker.write_text("x")
    out, extra, message = {
        "out-is-a-file": (blocker, [], "cannot use --out .*file: File exists"),
        "out-under-a-file": (blocker / "run", [], "cannot use --out .*run: Not a directory"),
        "tensorboard-missing": (tmp_path / "tb", ["--tensorboard"], "needs the `tensorboardX`"),
    }[case]
    if case == "tensorboard-missing":

        def missing():
            raise ImportError("`tensorboard=True` needs the `tensorboardX` package (or PyTorch)")

        monkeypatch.setattr(qlog, "_import_tensorboard", missing)
    cli = load_script(SCRIPT, "offline_to_online")
    with pytest.raises(SystemExit, match=message):
        cli.main(["--env", ENV, "--dataset-dir", tiny_dataset_dir, "--out", str(out),
                  "--no-progress", "--actor-hidden", "8", "--critic-hidden", "8",
                  *extra])  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert blocker.read_text() == "x"


def test_cli_full_disk_during_a_checkpoint_leaves_a_resumable_run(tiny_dataset_dir, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    import errno

    import qam._io
    import qam.train as train

    real, calls = train.atomic_write_with, []

    def full_disk_on_second(path, write):
        calls.append(path)
        if len(calls) == 2:  # the checkpoint of step 16: the disk fills up mid-write
            qam._io.atomic_write_with(path, lambda f: (f.write(b"partial"), _raise_enospc()))
        return real(path, write)

    def _raise_enospc():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train, "atomic_write_with", full_disk_on_second)
    cli = load_script(SCRIPT, "offline_to_online")
    argv = ["--env", ENV, "--dataset-dir", tiny_dataset_dir, "--out", str(tmp_path / "run"),
            "--no-progress", "--actor-hidden", "8", "--critic-hidden", "8", "--num-qs", "2",
            "--offline-steps", "24", "--online-steps", "0", "--eval-interval", "8",
            "--log-interval", "8", "--checkpoint-interval", "8", "--eval-episodes", "1",
            "--batch-size", "8", "--max-episode-steps", "5"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"no space left on device writing .*ckpt-000000016.eqx"
                       r".*last checkpoint is at step 8"):  # fmt: skip
        cli.main(argv)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not [p for p in os.listdir(checkpoints) if p.endswith(".tmp")]
    assert train.latest_checkpoint_step(str(tmp_path / "run")) == 8
    monkeypatch.setattr(train, "atomic_write_with", real)
    result = cli.main(argv)  # resumes from step 8 and finishes
    assert [e["step"] for e in result["evals"]] == [8, 16, 24]
