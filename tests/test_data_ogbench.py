"""OGBench files: local generation, loading, relabelling, and the errors for missing, corrupt
and unknown inputs. Everything runs offline: the network is blocked for the whole module."""

import importlib.metadata
import json
import os
import pathlib
import socket
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from qam.data import (
    DatasetFileError,
    DatasetNotFoundError,
    UnknownEnvironmentError,
    generate_dataset,
    iter_ogbench_shards,
    load_ogbench,
    parse_env_name,
)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:glfw")

STEPS = 30  # tiny episodes: 2 train + 1 val episode of 30 steps each


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("qam.data tried to use the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import ogbench.utils

    monkeypatch.setattr(ogbench.utils, "download_datasets", refuse)


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ogbench")
    kw = dict(num_episodes=2, num_val_episodes=1, out_dir=d, seed=0, max_episode_steps=STEPS)
    play = generate_dataset("cube-double-v0", "play", progress=False, **kw)
    noisy = generate_dataset("cube-double-v0", "noisy", progress=False, **kw)
    puzzle = generate_dataset("puzzle-3x3-v0", "play", progress=False, **kw)
    return d, play, noisy, puzzle


def test_generated_files_in_ogbench_format(gen_dir):
    import ogbench

    d, play, _, puzzle = gen_dir
    assert os.path.basename(play.train_path) == "cube-double-play-v0.npz"
    assert os.path.basename(play.val_path) == "cube-double-play-v0-val.npz"
    raw = np.load(play.train_path)
    assert set(raw.files) == {"observations", "actions", "terminals", "qpos", "qvel"}
    assert raw["terminals"].dtype == np.bool_ and raw["observations"].dtype == np.float32
    assert raw["observations"].shape == (2 * STEPS, 37) and raw["actions"].shape == (2 * STEPS, 5)
    np.testing.assert_array_equal(np.flatnonzero(raw["terminals"]), [STEPS - 1, 2 * STEPS - 1])
    assert np.abs(raw["actions"]).max() <= 1.0
    assert np.load(puzzle.train_path)["button_states"].dtype == np.int64

    data = ogbench.load_dataset(play.train_path)
    assert set(data) == {"observations", "actions", "terminals", "next_observations"}
    assert data["observations"].shape == (2 * (STEPS - 1), 37)
    env, train, val = ogbench.make_env_and_datasets(
        "cube-double-play-singletask-task2-v0", dataset_path=play.train_path
    )
    assert set(train) >= {"observations", "actions", "rewards", "masks", "terminals"}
    assert val["observations"].shape == (STEPS - 1, 37)
    # No stray temporary files; a metadata sidecar per file.
    names = sorted(os.listdir(d))
    assert not [n for n in names if n.endswith(".tmp")]
    meta = json.loads(pathlib.Path(play.train_path.replace(".npz", ".meta.json")).read_text())
    assert meta["oracle"] == "plan" and meta["seed"] == 0


def test_generated_rewards_match_environment_replay(gen_dir):
    """Replaying the stored actions from each episode's stored initial state in the
    single-task environment gives the rewards OGBench's relabelling assigns to the file."""
    import ogbench

    _, play, _, _ = gen_dir
    env, train, _ = ogbench.make_env_and_datasets(
        "cube-double-play-singletask-task2-v0", dataset_path=play.train_path, add_info=True
    )
    ends = np.flatnonzero(train["terminals"])
    start = 0
    for end in ends:
        env.reset()
        env.unwrapped.set_state(train["qpos"][start], train["qvel"][start])
        for t in range(start, end + 1):
            qpos = env.unwrapped._data.qpos.copy()
            np.testing.assert_allclose(qpos, train["qpos"][t], atol=1e-4)
            _, reward, _, _, _ = env.step(train["actions"][t])
            assert reward == train["rewards"][t]
        start = end + 1

    # Ours: same relabelling, on the device.
    out = load_ogbench(
        "cube-double-play-singletask-task2-v0",
        dataset_dir=os.path.dirname(play.train_path),
        make_env=False,
    )
    np.testing.assert_array_equal(np.asarray(out.train.rewards), train["rewards"])
    np.testing.assert_array_equal(np.asarray(out.train.masks), train["masks"])


def test_load_ogbench_transforms_and_metadata(gen_dir):
    import ogbench

    d, _, _, puzzle = gen_dir
    name = "puzzle-3x3-play-singletask-task1-v0"
    _, ref, _ = ogbench.make_env_and_datasets(name, dataset_path=puzzle.train_path)
    dense = load_ogbench(name, dataset_dir=d, sparse=False, action_clip_eps=None, make_env=False)
    np.testing.assert_array_equal(np.asarray(dense.train.rewards), ref["rewards"])
    np.testing.assert_array_equal(np.asarray(dense.train.actions), ref["actions"])
    assert dense.env is None

    out = load_ogbench(name, dataset_dir=d)  # paper defaults: sparse for puzzle, clip 1e-5
    expected = np.where(ref["rewards"] != 0, -1.0, 0.0)
    np.testing.assert_array_equal(np.asarray(out.train.rewards), expected)
    assert float(np.abs(np.asarray(out.train.actions)).max()) <= 1 - 1e-5
    assert out.train.size == 2 * (STEPS - 1) and out.val.size == STEPS - 1
    info = out.info.to_dict()
    json.dumps(info)
    assert info["ogbench_version"] == importlib.metadata.version("ogbench")
    assert info["sparse"] is True and info["action_clip_eps"] == 1e-5
    assert "r <- -1 if r != 0 else 0" in info["reward"]
    assert [os.path.basename(f["path"]) for f in info["files"]] == [
        "puzzle-3x3-play-v0.npz",
        "puzzle-3x3-play-v0-val.npz",
    ]
    assert info["files"][0]["generated"]["oracle"] == "plan"
    assert out.env.unwrapped._reward_task_id == 1
    # Cube defaults to dense rewards.
    cube = load_ogbench("cube-double-play-singletask-task2-v0", dataset_dir=d, make_env=False)
    assert cube.info.sparse is False


def test_dataset_dir_from_environment(gen_dir, monkeypatch):
    d, _, _, _ = gen_dir
    monkeypatch.setenv("QAM_DATASET_DIR", str(d))
    out = load_ogbench("cube-double-play-singletask-task2-v0", load_val=False, make_env=False)
    assert out.val is None and out.info.dataset_dir_source == "$QAM_DATASET_DIR"


def test_noisy_differs_from_play_as_specified(gen_dir):
    _, play, noisy, _ = gen_dir
    assert noisy.metadata["oracle"] == "markov" and play.metadata["oracle"] == "plan"
    assert noisy.metadata["p_random_action"] == 0.1 and play.metadata["p_random_action"] == 0.0
    a_play = np.load(play.train_path)["actions"]
    a_noisy = np.load(noisy.train_path)["actions"]
    assert a_play.shape == a_noisy.shape and not np.allclose(a_play, a_noisy)
    # Play actions follow a smoothed plan; noisy ones carry i.i.d. noise and random actions.
    rough_play = np.abs(np.diff(a_play, axis=0)).mean()
    rough_noisy = np.abs(np.diff(a_noisy, axis=0)).mean()
    assert rough_noisy > 2 * rough_play, (rough_noisy, rough_play)


def test_generation_is_deterministic(tmp_path, gen_dir):
    _, play, _, _ = gen_dir
    again = generate_dataset(
        "cube-double-v0",
        "play",
        num_episodes=2,
        num_val_episodes=1,
        out_dir=tmp_path,
        seed=0,
        max_episode_steps=STEPS,
        progress=False,
    )
    a, b = np.load(play.train_path), np.load(again.train_path)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    other = generate_dataset(
        "cube-double-v0",
        "play",
        num_episodes=1,
        num_val_episodes=1,
        out_dir=tmp_path / "s1",
        seed=1,
        max_episode_steps=STEPS,
        progress=False,
    )
    assert not np.array_equal(np.load(other.train_path)["qpos"][0], a["qpos"][0])


def test_generation_does_not_depend_on_workers(tmp_path):
    """Each episode is seeded from (seed, index, attempt): the files are the same whether the
    episodes run in this process or in blocks on spawned worker processes."""
    kw = dict(num_episodes=3, num_val_episodes=1, seed=5, max_episode_steps=STEPS, progress=False)
    np.random.seed(123)
    before = np.random.get_state()
    one = generate_dataset("scene-v0", "play", out_dir=tmp_path / "w1", workers=1, **kw)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1])  # restored
    two = generate_dataset("scene-v0", "play", out_dir=tmp_path / "w2", workers=2, **kw)
    for path_one, path_two in [(one.train_path, two.train_path), (one.val_path, two.val_path)]:
        a, b = np.load(path_one), np.load(path_two)
        assert sorted(a.files) == sorted(b.files) and "button_states" in a.files
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert one.num_train_steps == two.num_train_steps == 3 * STEPS
    retries = one.metadata["unhealthy_episode_retries"]
    assert two.metadata["unhealthy_episode_retries"] == retries
    assert (one.metadata["workers"], two.metadata["workers"]) == (1, 2)


def test_generation_rejects_bad_workers(tmp_path):
    for bad in [0, -1]:  # (non-ints are rejected by the runtime type checker in tests)
        with pytest.raises(ValueError, match=r"workers: expected an int >= 1"):
            generate_dataset(
                "cube-single-v0", "play", num_episodes=1, out_dir=tmp_path, workers=bad
            )
    assert not os.listdir(tmp_path)


def test_missing_file_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cube-double-play-v0.npz") as e:
        load_ogbench("cube-double-play-singletask-task2-v0", dataset_dir=tmp_path)
    msg = str(e.value)
    assert f"Directory searched: {tmp_path}" in msg
    assert "place the official files" in msg
    cmd = "python -m qam.data.generate --env cube-double-v0 --dataset-type play"
    assert cmd in msg and f"--dir {tmp_path}" in msg

    with pytest.raises(DatasetNotFoundError, match="locomotion datasets .* cannot be generated"):
        load_ogbench("antmaze-large-navigate-singletask-task1-v0", dataset_dir=tmp_path)

    # The train file present but not the validation file.
    generate_dataset(
        "cube-single-v0",
        "play",
        num_episodes=1,
        out_dir=tmp_path,
        max_episode_steps=5,
        progress=False,
    )
    os.remove(tmp_path / "cube-single-play-v0-val.npz")
    with pytest.raises(DatasetNotFoundError, match="cube-single-play-v0-val.npz"):
        load_ogbench("cube-single-play-singletask-v0", dataset_dir=tmp_path)
    out = load_ogbench(
        "cube-single-play-singletask-v0", dataset_dir=tmp_path, load_val=False, make_env=False
    )
    assert out.val is None and out.train.size == 4


def test_corrupt_and_truncated_files(tmp_path, gen_dir):
    _, play, _, _ = gen_dir
    name = "cube-double-play-singletask-task2-v0"
    blob = pathlib.Path(play.train_path).read_bytes()
    for case, content in {
        "truncated": blob[: len(blob) // 2],
        "garbage": b"not a numpy file at all" * 10,
        "empty": b"",
    }.items():
        d = tmp_path / case
        d.mkdir()
        (d / "cube-double-play-v0.npz").write_bytes(content)
        (d / "cube-double-play-v0-val.npz").write_bytes(pathlib.Path(play.val_path).read_bytes())
        with pytest.raises(DatasetFileError, match=r"cube-double-play-v0\.npz: it looks corrupt"):
            load_ogbench(name, dataset_dir=d, make_env=False)
    d = tmp_path / "wrongkeys"
    d.mkdir()
    np.savez(d / "cube-double-play-v0.npz", foo=np.zeros(3))
    (d / "cube-double-play-v0-val.npz").write_bytes(pathlib.Path(play.val_path).read_bytes())
    with pytest.raises(DatasetFileError, match="missing array"):
        load_ogbench(name, dataset_dir=d, make_env=False)


def test_files_that_do_not_fit_the_environment(tmp_path, gen_dir):
    _, play, _, _ = gen_dir
    # A cube-double file (37-dim observations) under cube-single's name (28).
    d = tmp_path / "renamed"
    d.mkdir()
    (d / "cube-single-play-v0.npz").write_bytes(pathlib.Path(play.train_path).read_bytes())
    with pytest.raises(DatasetFileError, match=r"cube-single-play-v0\.npz does not match "
                       r"cube-single-play-singletask-task1-v0: its observations have shape "
                       r"\(37,\) per row, the environment's are \(28,\)"):  # fmt: skip
        load_ogbench("cube-single-play-singletask-task1-v0", dataset_dir=d, load_val=False,
                     make_env=False)  # fmt: skip
    # The right file with a NaN observation row.
    d = tmp_path / "nan"
    d.mkdir()
    with np.load(play.train_path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["observations"] = arrays["observations"].copy()
    arrays["observations"][3, 0] = np.nan
    np.savez(d / "cube-double-play-v0.npz", **arrays)
    with pytest.raises(DatasetFileError, match="non-finite observations in 1 rows"):
        load_ogbench("cube-double-play-singletask-task2-v0", dataset_dir=d, load_val=False,
                     make_env=False)  # fmt: skip
    # Integer actions (cast silently by the reader) and no episode ends.
    for case, change, message in (
        ("int", {"actions": arrays["actions"].astype(np.int64)}, "actions are int64, expected "
         "floating-point"),
        ("noends", {"terminals": np.zeros_like(arrays["terminals"])}, "marks 0 episode ends"),
    ):  # fmt: skip
        d = tmp_path / case
        d.mkdir()
        np.savez(d / "cube-double-play-v0.npz", **{**arrays, **change})
        with pytest.raises(DatasetFileError, match=message):
            load_ogbench("cube-double-play-singletask-task2-v0", dataset_dir=d, load_val=False,
                         make_env=False)  # fmt: skip


def test_unknown_environment_names():
    for bad in [
        "cube-double-play-v0",
        "cube-sextuple-play-singletask-task1-v0",
        "cube-double-navigate-singletask-task1-v0",
        "antmaze-large-play-singletask-v0",
        "cube-double-play-singletask-task9-v0",
        "",
    ]:
        with pytest.raises(UnknownEnvironmentError, match="Known domains"):
            parse_env_name(bad)
    with pytest.raises(UnknownEnvironmentError, match="puzzle-3x3 .play/noisy."):
        load_ogbench("cube-sextuple-play-singletask-task1-v0")
    p = parse_env_name("antmaze-large-navigate-singletask-task1-v0")
    assert p.env_id == "antmaze-large-singletask-task1-v0"
    assert p.dataset_name == "antmaze-large-navigate-v0" and not p.is_manipulation
    p = parse_env_name("cube-double-play-singletask-v0")
    assert p.task_id is None and p.env_id == "cube-double-singletask-v0"
    with pytest.raises(ValueError, match="Locomotion datasets need OGBench's expert policies"):
        generate_dataset("antmaze-large-v0", "play", num_episodes=1, out_dir="/nonexistent")


def test_shards_stream_one_at_a_time(tmp_path, gen_dir):
    _, play, _, _ = gen_dir
    shard_dir = tmp_path / "cube-double-play-100m-v0"
    shard_dir.mkdir()
    blob = pathlib.Path(play.train_path).read_bytes()
    for i in range(3):
        (shard_dir / f"cube-double-play-100m-v0-{i:03d}.npz").write_bytes(blob)
    (shard_dir / "cube-double-play-100m-v0-val.npz").write_bytes(blob)
    it = iter_ogbench_shards("cube-double-play-singletask-task2-v0", shard_dir)
    seen = []
    for ds, info in it:
        seen.append((info.shard_index, info.num_shards, ds.size))
    assert seen == [(0, 3, 2 * (STEPS - 1)), (1, 3, 2 * (STEPS - 1)), (2, 3, 2 * (STEPS - 1))]
    with pytest.raises(DatasetNotFoundError, match="No OGBench dataset shards"):
        iter_ogbench_shards("cube-double-play-singletask-task2-v0", tmp_path / "nope")


def test_cli_help_and_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run(
        [sys.executable, "-m", "qam.data.generate", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "--dataset-type" in out.stdout and "--max-episode-steps" in out.stdout
    assert "--workers" in out.stdout
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qam.data.generate",
            "--env",
            "puzzle-3x3-v0",
            "--dataset-type",
            "noisy",
            "--episodes",
            "1",
            "--max-episode-steps",
            "5",
            "--dir",
            str(tmp_path),
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "puzzle-3x3-noisy-v0.npz").exists()
    assert (tmp_path / "puzzle-3x3-noisy-v0-val.npz").exists()


def test_task_mixture_moves_targets_to_the_task_goal():
    """`_maybe_task_target` with probability 1 puts the oracle's target on the task's goal;
    with probability 0 it draws nothing and changes nothing."""
    import gymnasium

    from qam.data._generate import _maybe_task_start, _maybe_task_target, _task_xyzs

    env = gymnasium.make("cube-double-v0", terminate_at_goal=False, mode="data_collection")
    try:
        inits, goals = _task_xyzs(env, 2)
        assert inits.shape == goals.shape == (2, 3)
        np.testing.assert_allclose(goals[:, 2], 0.02)  # on the table
        ob, info = env.reset(seed=0)
        ob, info = _maybe_task_start(env, ob, info, inits, 1.0, 0.0)
        for i in range(2):  # the task's start, jittered by at most 1 cm in x and y
            pos = info[f"privileged/block_{i}_pos"]
            assert np.all(np.abs(pos[:2] - inits[i, :2]) <= 0.01 + 1e-6), (pos, inits[i])
        np.random.seed(0)
        state = np.random.get_state()
        same_ob, same_info = _maybe_task_target(env, ob, info, goals, 0.0)
        assert same_ob is ob and same_info is info
        assert np.array_equal(np.random.get_state()[1], state[1])  # no draw at p = 0
        for _ in range(3):
            ob, info = env.unwrapped.set_new_target(p_stack=0.0)
            block = int(info["privileged/target_block"])
            new_ob, new_info = _maybe_task_target(env, ob, info, goals, 1.0)
            np.testing.assert_allclose(new_info["privileged/target_block_pos"], goals[block])
            assert int(new_info["privileged/target_block"]) == block
        with pytest.raises(ValueError, match=r"task: expected an int in 1\.\.5, got 6"):
            _task_xyzs(env, 6)
    finally:
        env.close()


def test_task_mixture_dataset(tmp_path, gen_dir):
    """A fraction of 0 reproduces OGBench's dataset bit for bit; a fraction of 1 makes every
    placement a success of the task, so the relabelled rewards show many more successes."""
    kw = dict(num_episodes=2, num_val_episodes=1, seed=0, max_episode_steps=150, progress=False)
    plain = generate_dataset("cube-single-v0", "play", out_dir=tmp_path / "plain", **kw)
    zero = generate_dataset(
        "cube-single-v0", "play", out_dir=tmp_path / "zero", task=None, task_goal_fraction=0.0,
        **kw,
    )  # fmt: skip
    a, b = np.load(plain.train_path), np.load(zero.train_path)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    mixed = generate_dataset(
        "cube-single-v0", "play", out_dir=tmp_path / "mixed", task=1, task_goal_fraction=1.0,
        **kw,
    )  # fmt: skip
    assert mixed.metadata["task"] == 1 and mixed.metadata["task_goal_fraction"] == 1.0
    name = "cube-single-play-singletask-task1-v0"
    success = {}
    for which in ("plain", "mixed"):
        data = load_ogbench(name, dataset_dir=str(tmp_path / which), load_val=False)
        success[which] = float(np.mean(data.train.rewards == 0))
    assert success["mixed"] > 0.1 and success["mixed"] > 5 * success["plain"], success


def test_task_mixture_rejects_bad_settings(tmp_path):
    kw = dict(num_episodes=1, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"task_goal_fraction: expected a float in \[0, 1\]"):
        generate_dataset("cube-single-v0", "play", task=1, task_goal_fraction=1.5, **kw)
    with pytest.raises(ValueError, match=r"task_start_fraction: expected a float in \[0, 1\]"):
        generate_dataset("cube-single-v0", "play", task=1, task_start_fraction=-0.1, **kw)
    with pytest.raises(ValueError, match=r"task: expected an int in 1\.\.5 .*got None"):
        generate_dataset("cube-single-v0", "play", task_goal_fraction=0.5, **kw)
    with pytest.raises(ValueError, match=r"supported for cube-\* only"):
        generate_dataset("scene-v0", "play", task=1, task_start_fraction=0.5, **kw)
    with pytest.raises(ValueError, match=r"task: only meaningful with task_goal_fraction or"):
        generate_dataset("cube-single-v0", "play", task=1, **kw)
    assert not os.listdir(tmp_path)


def test_noisy_generation_with_random_actions_is_deterministic(tmp_path):
    """Random actions come from an action space seeded per episode (OGBench's `action_space`
    property builds a fresh unseeded one on each access, which made noisy datasets differ
    from run to run)."""
    kw = dict(num_episodes=1, num_val_episodes=1, seed=3, max_episode_steps=20, progress=False,
              p_random_action=0.5)  # fmt: skip
    one = generate_dataset("cube-single-v0", "noisy", out_dir=tmp_path / "a", **kw)
    two = generate_dataset("cube-single-v0", "noisy", out_dir=tmp_path / "b", **kw)
    for path_one, path_two in [(one.train_path, two.train_path), (one.val_path, two.val_path)]:
        a, b = np.load(path_one), np.load(path_two)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
