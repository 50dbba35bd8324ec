"""`examples/offline_to_online.py` end to end on a tiny generated dataset."""

import json
import pathlib

import pytest
from helpers import load_script, release_memory


pytestmark = pytest.mark.standard_promotion
SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "offline_to_online.py"


def _load():
    return load_script(SCRIPT, "offline_to_online")


TINY = [
    "--env", "cube-double-play-singletask-task1-v0", "--agent", "qam-fql",
    "--offline-steps", "8", "--online-steps", "8", "--eval-episodes", "1",
    "--eval-interval", "8", "--log-interval", "4", "--checkpoint-interval", "8",
    "--batch-size", "8", "--start-training", "2", "--max-episode-steps", "10",
    "--actor-hidden", "16", "--critic-hidden", "16", "--num-qs", "2", "--flow-steps", "3",
    "--no-progress",
]  # fmt: skip


def test_cli_runs_end_to_end_and_writes_every_file(tiny_dataset_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cli = _load()
    result = cli.main([*TINY, "--dataset-dir", tiny_dataset_dir, "--out", str(out)])
    for name in ("train.csv", "train.jsonl", "eval.csv", "eval.jsonl", "config.json",
                 "dataset.json", "learning_curve.png", "summary.txt", "summary.json",
                 "checkpoints/latest.json"):  # fmt: skip
        assert (out / name).exists(), name
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["agent"]["fql_alpha"] == 30.0 and config["agent"]["actor_hidden"] == [16]
    assert json.loads((out / "dataset.json").read_text())["ogbench_version"]
    assert [e["step"] for e in result["evals"]] == [8, 16]
    assert "success rate" in capsys.readouterr().out
    # Running again on the same directory resumes at the end: nothing is redone.
    before = (out / "eval.csv").read_text()
    release_memory()  # the first run's trainer and its environments (~1 GB) are garbage now
    cli.main([*TINY, "--dataset-dir", tiny_dataset_dir, "--out", str(out)])
    assert (out / "eval.csv").read_text() == before


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--offline-steps", "-1"], "offline_steps"),
        (["--eval-interval", "6"], "multiple of `log_interval`"),
        (["--flow-steps", "0"], "flow_steps"),  # K >= 1
        (["--env", "walker-run-v0"], "Unknown OGBench environment"),
        (["--preset", "paper", "--env", "cube-single-play-singletask-task1-v0"], "known domains"),
        (["--fql-alpha", "1", "--edit-scale", "0.1"], "exclusive"),
    ],
)
def test_bad_options_fail_clearly_before_work(argv, match, tiny_dataset_dir, tmp_path):
    cli = _load()
    args = [*TINY, "--dataset-dir", tiny_dataset_dir, "--out", str(tmp_path / "x"), *argv]
    with pytest.raises(SystemExit, match=match):
        cli.main(args)
    assert not (tmp_path / "x" / "train.csv").exists()


def test_missing_dataset_names_the_file_and_the_way_out(tmp_path):
    cli = _load()
    args = [*TINY, "--dataset-dir", str(tmp_path), "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit, match=r"cube-double-play-v0\.npz(.|\n)*qam\.data\.generate"):
        cli.main(args)


def test_demo_dataset_generated_once_into_its_own_directory(tmp_path, monkeypatch):
    """The embedded default generates its dataset (with the task mixture the demo relies on)
    into a cache directory named by its settings, once, and reuses it afterwards."""
    cli = _load()
    monkeypatch.setattr(cli, "DEFAULT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "DEMO_DATA", dict(cli.DEMO_DATA, episodes=2, max_episode_steps=30))
    monkeypatch.setenv("QAM_DATASET_DIR", str(tmp_path / "no-official-files"))
    args = cli._parser().parse_args([])
    directory = cli.ensure_demo_dataset(args)
    assert directory == cli.demo_dataset_dir(str(tmp_path / "cache"))
    assert "goal0.25" in directory and "start1.0" in directory
    path = pathlib.Path(directory) / "cube-single-play-v0.npz"
    meta = json.loads((pathlib.Path(directory) / "cube-single-play-v0.meta.json").read_text())
    assert (meta["task"], meta["task_goal_fraction"], meta["task_start_fraction"]) == (1, 0.25, 1.0)
    stamp = path.stat().st_mtime_ns
    assert cli.ensure_demo_dataset(cli._parser().parse_args([])) == directory
    assert path.stat().st_mtime_ns == stamp  # reused, not regenerated
    # Any explicit choice bypasses the demo dataset.
    explicit = cli._parser().parse_args(["--dataset-dir", str(tmp_path)])
    assert cli.ensure_demo_dataset(explicit) == str(tmp_path)
