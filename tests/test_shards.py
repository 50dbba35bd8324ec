"""Sharded datasets in training: the rotation schedule against a brute-force reference (each
update's batch traced back to its shard and row), `dataset_proportion`, resume mid-rotation
bit-identical to an uninterrupted run, and missing, corrupt or changed shards named.

The shards are the session's tiny generated cube-double dataset written four times with
observation 0 of raw row `r` of shard `k` replaced by the marker `10 (k + 1) + r / 1000`, so
the first observation of every sampled chunk says which shard and row it came from (online
rows have |observation 0| < 10, the validation file, which must never be read, 90). The
runs train ReBRAC with tiny networks: the shard mechanics do not depend on the method, and
its update compiles in half the time of QAM's."""

import json
import os
import shutil
import zipfile

import equinox as eqx
import jax
import numpy as np
import pytest
from helpers import release_memory, tiny_run

import qam.data as qd
from qam.agents import AGENTS
from qam.data._ogbench import inspect_ogbench_shards
from qam.train import RunConfig, Trainer


pytestmark = pytest.mark.standard_promotion

AGENT = "rebrac"
CONFIG = AGENTS[AGENT].config(actor_hidden=(16, 16), critic_hidden=(16, 16), num_qs=2)
NAMES = [f"cube-double-play-100m-v0-{k:03d}.npz" for k in range(4)]
OFFLINE, ONLINE, START, INTERVAL = 8, 8, 2, 3
TOTAL = OFFLINE + ONLINE
# The runs train on the first max(1, int(0.8 * 4)) = 3 shards, the first int(0.8 * 117) = 93
# of their 117 transitions each.
P, USED, KEPT = 0.8, 3, 93

# (update count, first observation 0 of each chunk) of every update, recorded from inside the
# compiled update (one record per seed); cleared by `_train`.
RECORDS: list[tuple[int, np.ndarray]] = []


def _record(step, markers):
    RECORDS.append((int(step), np.asarray(markers)))


def _recording_update(state, batch, *, key):
    """The agent's update, also reporting its update count and the batch's markers."""
    jax.debug.callback(_record, state.step, batch.observations[:, 0])
    return AGENTS[AGENT].update(state, batch, key=key)


def _trainer(run, log=lambda *a: None):
    trainer = Trainer(run, CONFIG, log=log)
    trainer.agent = trainer.agent._replace(update=_recording_update)
    return trainer


def _run(shard_dir, out_dir, **kw):
    settings = dict(
        shard_dir=str(shard_dir), dataset_replace_interval=INTERVAL,
        offline_steps=OFFLINE, online_steps=ONLINE, start_training=START, log_interval=2,
        checkpoint_interval=2, eval_interval=TOTAL, agent=AGENT, dataset_proportion=P,
    )  # fmt: skip
    return tiny_run(None, out_dir, **{**settings, **kw})


def _write_shards(directory, raw, count=4, rows=None):
    """`count` marked shards (the first `rows` raw rows each, all by default) and a validation
    file; returns the directory."""
    os.makedirs(directory, exist_ok=True)
    for k in range(count):
        arrays = {key: value[:rows] for key, value in raw.items()}
        obs = arrays["observations"].copy()
        obs[:, 0] = 10 * (k + 1) + 0.001 * np.arange(len(obs))
        np.savez_compressed(os.path.join(directory, NAMES[k]), **{**arrays, "observations": obs})
    val = dict(raw, observations=raw["observations"].copy())
    val["observations"][:, 0] = 90.0
    np.savez_compressed(os.path.join(directory, "cube-double-play-100m-v0-val.npz"), **val)
    return directory


@pytest.fixture(scope="module")
def raw(tiny_dataset_dir):
    with np.load(os.path.join(tiny_dataset_dir, "cube-double-play-v0.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def shard_dir(raw, tmp_path_factory):
    return _write_shards(tmp_path_factory.mktemp("shards") / "cube-double-play-100m-v0", raw)


def _transition_rows(raw) -> np.ndarray:
    """Raw row of each transition of the loaded dataset (OGBench's regular format keeps the
    rows that are not an episode's last)."""
    return np.flatnonzero(raw["terminals"] == 0)


def _decode(markers: np.ndarray) -> list[tuple[int, int]]:
    """(shard index, raw row) of every offline marker (> 9.5) of a batch."""
    offline = markers[markers > 9.5]
    shard = np.floor(offline / 10).astype(int) - 1
    row = np.rint((offline - 10 * (shard + 1)) * 1000).astype(int)
    return list(zip(shard.tolist(), row.tolist()))


def _global_step(update: int, offline_steps: int, start_training: int) -> int:
    """The run's step of the update with count `update` (online updates start at online step
    `start_training`, one per step)."""
    return update if update < offline_steps else update + start_training


def _train(trainer):
    RECORDS.clear()
    result = trainer.train()
    return result, list(RECORDS)


def _host_leaves(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(trainer.states, eqx.is_array))]


@pytest.fixture(scope="module")
def full(shard_dir, tmp_path_factory):
    """An uninterrupted offline + online run over the three shards: its final agent leaves,
    result, logs, update records and latest checkpoint record."""
    out = tmp_path_factory.mktemp("full")
    logs: list = []
    trainer = _trainer(_run(shard_dir, out), log=lambda s, m, p: logs.append((p, s, m)))
    result, records = _train(trainer)
    leaves = _host_leaves(trainer)
    trainer.close()
    del trainer
    release_memory()
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    return dict(leaves=leaves, result=result, logs=logs, records=records, latest=latest)


def test_each_batch_comes_from_the_scheduled_shard(full, raw):
    """Brute force: the update of step g samples only shard (g // interval) % 3 of the first
    three, offline and (from the replay buffer's offline rows) online, and only rows among
    the first 93 transitions."""
    rows = set(_transition_rows(raw)[:KEPT].tolist())
    by_step: dict[int, int] = {}
    for update, markers in full["records"]:
        g = _global_step(update, OFFLINE, START)
        by_step[g] = by_step.get(g, 0) + 1
        decoded = _decode(markers)
        assert decoded, f"no offline row in the batch of step {g}"  # the check is not vacuous
        assert {s for s, _ in decoded} == {(g // INTERVAL) % USED}, (g, decoded)
        assert {r for _, r in decoded} <= rows
        assert not np.any(markers > 80)  # never the validation file
    updates = [*range(OFFLINE), *range(OFFLINE + START, TOTAL)]
    assert by_step == {g: 2 for g in updates}  # every update of both seeds, once
    # The record: every shard by name and size, the resident one at the end.
    ref = full["latest"]["dataset"]
    assert [s["name"] for s in ref["shards"]] == NAMES and ref["used"] == USED
    assert {s["transitions"] for s in ref["shards"]} == {len(_transition_rows(raw))}
    assert ref["position"] == {"index": ((TOTAL - 1) // INTERVAL) % USED, "name": NAMES[2]}
    assert ref["rows"] == KEPT and ref["proportion"] == P


class _Die(Exception):
    pass


def test_resume_mid_rotation_is_bit_identical(full, shard_dir, tmp_path):
    """Killed after the offline checkpoint of step 4 (shard 1, one step into it) and again
    after the online one of step 14 (shard 1 again, two steps in): the resumed run ends as the
    uninterrupted one, every log row after each checkpoint repeated exactly."""
    logs: list = []

    def dying(after):
        def log(step, metrics, prefix):
            if prefix == "train" and step > after:
                raise _Die
            logs.append((prefix, step, metrics))

        return log

    for after in (4, 14):
        trainer = _trainer(_run(shard_dir, tmp_path), log=dying(after))
        with pytest.raises(_Die):
            trainer.train()
        record = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
        assert record["step"] == after
        assert record["dataset"]["position"] == {"index": 1, "name": NAMES[1]}
        trainer.close()
        del trainer
        release_memory()
    trainer = _trainer(_run(shard_dir, tmp_path), log=lambda s, m, p: logs.append((p, s, m)))
    result = trainer.train()
    leaves = _host_leaves(trainer)
    assert trainer.shard_index == 2 and trainer.dataset.size == full["latest"]["dataset"]["rows"]
    trainer.close()
    del trainer
    release_memory()
    assert len(leaves) == len(full["leaves"]) > 0
    for a, b in zip(full["leaves"], leaves):
        np.testing.assert_array_equal(a, b)
    assert result["evals"] == full["result"]["evals"] and result["bc"] == full["result"]["bc"]
    # Each session redid the steps after its checkpoint: the last values logged per step agree.
    last = {(p, s): m for p, s, m in logs}
    expected = {(p, s): m for p, s, m in full["logs"]}
    assert set(last) == set(expected)
    for key, metrics in expected.items():
        for name, value in metrics.items():
            np.testing.assert_array_equal(last[key][name], value, err_msg=f"{key} {name}")


def test_balanced_batches_take_their_offline_half_from_the_resident_shard(raw, shard_dir, tmp_path):
    """The resident shard is cut to its first 93 transitions, the last marked as an episode
    end; balanced online batches take their first half from it, their second from the online
    rows (from the shard too while the buffer holds less than a chunk)."""
    offline, online = 4, 6
    run = _run(shard_dir, tmp_path, balanced_sampling=True, offline_steps=offline,
               online_steps=online, eval_interval=offline + online,
               checkpoint_interval=offline + online)  # fmt: skip
    trainer = _trainer(run)
    rows = _transition_rows(raw)
    kept = KEPT
    assert [h.name for h in trainer.shards or []] == NAMES[:USED]
    assert trainer.dataset.size == kept
    terminals = np.asarray(trainer.dataset.terminals)
    assert terminals[-1] == 1.0
    full_terminals = raw["terminals"][rows[:kept] + 1]  # the terminal flag of each transition
    np.testing.assert_array_equal(terminals[:-1], full_terminals[:-1].astype(np.float32))
    _, records = _train(trainer)
    trainer.close()
    del trainer
    release_memory()
    allowed = set(rows[:kept].tolist())
    half = 8 // 2  # tiny_run's batch_size is 8
    steps = set()
    for update, markers in records:
        g = _global_step(update, offline, START)
        steps.add(g)
        # The second half is online rows once the buffer holds a chunk (t + 1 >= H
        # transitions), drawn from the dataset before.
        from_dataset = 8 if g - offline + 1 < CONFIG.horizon else half
        decoded = _decode(markers)
        assert len(decoded) == from_dataset == len(_decode(markers[:from_dataset])), g
        assert {s for s, _ in decoded} == {(g // INTERVAL) % USED}, (g, decoded)
        assert {r for _, r in decoded} <= allowed
    assert steps == {*range(offline), *range(offline + START, offline + online)}


def test_dataset_proportion_of_a_single_file(tiny_dataset_dir, tmp_path):
    data = qd.load_ogbench(TINY := "cube-double-play-singletask-task1-v0",
                           dataset_dir=tiny_dataset_dir, load_val=False)  # fmt: skip
    run = tiny_run(tiny_dataset_dir, tmp_path, env_name=TINY, agent=AGENT, dataset_proportion=0.5)
    trainer = Trainer(run, CONFIG, log=lambda *a: None)
    n = int(0.5 * data.train.size)
    assert trainer.dataset.size == n
    for field in ("observations", "actions", "rewards", "masks", "next_observations"):
        np.testing.assert_array_equal(
            np.asarray(getattr(trainer.dataset, field)), np.asarray(getattr(data.train, field))[:n]
        )
    terminals = np.asarray(data.train.terminals)[:n].copy()
    terminals[-1] = 1.0
    np.testing.assert_array_equal(np.asarray(trainer.dataset.terminals), terminals)
    trainer.close()
    data.env.close()


# --- errors ------------------------------------------------------------------------------------


ENV = "cube-double-play-singletask-task1-v0"


def test_header_checks_name_the_shard(raw, tmp_path):
    """Start-up checks read only headers and `terminals`, and name the failing shard."""
    env = qd.make_env(ENV)
    try:
        with pytest.raises(qd.DatasetNotFoundError, match="No OGBench dataset shards"):
            inspect_ogbench_shards(ENV, tmp_path / "none", env=env)
        base = _write_shards(tmp_path / "good", raw)
        headers = inspect_ogbench_shards(ENV, base, env=env)
        assert [h.name for h in headers] == NAMES
        assert {h.transitions for h in headers} == {len(_transition_rows(raw))}
        assert {h.rows for h in headers} == {len(raw["terminals"])}
        assert len({h.fingerprint for h in headers}) == len(NAMES)  # the markers differ
        cases = {
            "truncated": (lambda path: _truncate(path), "is not a readable .npz archive"),
            "no-qpos": (lambda path: _rewrite(path, drop="qpos"), "has no qpos array"),
            "width": (lambda path: _rewrite(path, observations=np.zeros((120, 30), np.float32)),
                      r"does not fit the environment: its observations have shape \(30,\)"),
            "ends": (lambda path: _rewrite(path, terminals=np.zeros(120, bool)),
                     "has `terminals` marking 0 episode ends"),
        }  # fmt: skip
        for case, (damage, message) in cases.items():
            directory = _write_shards(tmp_path / case, raw)
            damage(os.path.join(directory, NAMES[1]))
            with pytest.raises(qd.DatasetFileError, match=f"{NAMES[1]} {message}"):
                inspect_ogbench_shards(ENV, directory, env=env)
    finally:
        env.close()


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _rewrite(path, drop=None, **replace):
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files if k != drop}
    np.savez_compressed(path, **{**arrays, **replace})


def test_trainer_refuses_bad_shards_before_work(raw, tmp_path):
    directory = _write_shards(tmp_path / "bad", raw)
    _truncate(os.path.join(directory, NAMES[2]))
    out = tmp_path / "out"
    with pytest.raises(qd.DatasetFileError, match=NAMES[2]):
        Trainer(_run(directory, out, dataset_proportion=1.0), CONFIG, log=lambda *a: None)
    # Shards of different sizes cannot share the replay buffer's offline rows.
    uneven = _write_shards(tmp_path / "uneven", raw)
    _write_shards(tmp_path / "short", raw, rows=80)
    os.replace(tmp_path / "short" / NAMES[0], os.path.join(uneven, NAMES[0]))
    with pytest.raises(ValueError, match=f"different numbers of transitions .*{NAMES[0]}: 78"):
        Trainer(_run(uneven, out, dataset_proportion=1.0), CONFIG, log=lambda *a: None)
    even = _write_shards(tmp_path / "even", raw)
    with pytest.raises(ValueError, match=r"`buffer_size` must be None or >= 117 \+ online_steps"):
        Trainer(_run(even, out, buffer_size=100, dataset_proportion=1.0), CONFIG,
                log=lambda *a: None)  # fmt: skip
    assert not out.exists()


def _corrupt_member(path, member):
    """Flip a byte in the middle of one member's compressed data (its header stays intact)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
        start = info.header_offset + 30 + int(name_len) + int(extra_len)
        f.seek(start + info.compress_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_shard_fails_when_loaded_naming_it(raw, tmp_path):
    """Damaged array bytes pass the cheap start-up check and fail at the rotation onto the
    shard, naming it (the run keeps its checkpoints)."""
    directory = _write_shards(tmp_path / "shards", raw)
    _corrupt_member(os.path.join(directory, NAMES[1]), "observations.npy")
    run = _run(directory, tmp_path / "out", online_steps=0, offline_steps=4)
    trainer = _trainer(run)
    with pytest.raises(qd.DatasetFileError, match=f"{NAMES[1]}: it looks corrupt"):
        trainer.train()
    trainer.close()


def test_changed_shard_set_is_refused_on_resume(raw, tmp_path):
    directory = _write_shards(tmp_path / "shards", raw)
    out = tmp_path / "out"
    run = _run(directory, out, online_steps=0, offline_steps=2, eval_interval=2)
    trainer = _trainer(run)
    trainer.train()
    trainer.close()
    del trainer
    release_memory()
    moved = tmp_path / "moved"
    os.rename(directory, moved)  # the same shards elsewhere: accepted
    Trainer(_run(moved, out, online_steps=0, offline_steps=2, eval_interval=2), CONFIG,
            log=lambda *a: None).close()  # fmt: skip
    os.rename(moved, directory)
    changes = [
        (lambda: os.remove(os.path.join(directory, NAMES[2])),
         f"shard\\(s\\) {NAMES[2]} are missing"),
        (lambda: shutil.copy(os.path.join(directory, NAMES[2]), directory / "z-extra.npz"),
         "shard\\(s\\) z-extra.npz are new"),
        (lambda: _rewrite(os.path.join(directory, NAMES[1]), actions=raw["actions"] * 0.5),
         f"shard {NAMES[1]} changed \\(.*fingerprint"),
    ]  # fmt: skip
    backup = tmp_path / "backup"
    for change, message in changes:
        shutil.copytree(directory, backup)
        change()
        with pytest.raises(ValueError, match=f"offline dataset changed .*{message}"):
            Trainer(run, CONFIG, log=lambda *a: None)
        shutil.rmtree(directory)
        os.rename(backup, directory)
    # Back to the original set: resumes (at its end, nothing left to do).
    Trainer(run, CONFIG, log=lambda *a: None).close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(dataset_replace_interval=0), "`dataset_replace_interval` must be an int >= 1"),
        (dict(dataset_replace_interval=True), "`dataset_replace_interval` must be an int >= 1"),
        (dict(dataset_proportion=0.0), r"`dataset_proportion` must be a number in \(0, 1\]"),
        (dict(dataset_proportion=1.5), r"`dataset_proportion` must be a number in \(0, 1\]"),
        (dict(shard_dir="/s"), "`shard_dir` .* and `dataset_dir` .* name two datasets"),
    ],
)
def test_bad_shard_settings_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(env_name=ENV, dataset_dir="/d", **kwargs)
