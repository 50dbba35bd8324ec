"""`examples/offline_to_online.py` end to end on a tiny generated dataset, and the command lines
of it and of `python -m qam.data.generate` (flags, `--help`, errors)."""

import dataclasses
import json
import os
import pathlib
import re
import sys

import pytest
from helpers import load_script, release_memory


pytestmark = pytest.mark.standard_promotion
SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "offline_to_online.py"


def _load():
    cli = load_script(SCRIPT, "offline_to_online")
    # tyro reads the help text from the source of the classes, found through `sys.modules`.
    sys.modules["offline_to_online"] = cli
    return cli


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
        (["--fql-alpha", "1", "--edit-scale", "0.1"], "only qam-edit has an edit policy"),
        (["--agent", "nonexistent"], "not a registered agent"),
    ],
)
def test_bad_options_fail_clearly_before_work(argv, match, tiny_dataset_dir, tmp_path, capsys):
    cli = _load()
    args = [*TINY, "--dataset-dir", tiny_dataset_dir, "--out", str(tmp_path / "x"), *argv]
    with pytest.raises(SystemExit, match=match) as exc:
        cli.main(args)
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [str(exc.value)]  # one line, no traceback
    assert not (tmp_path / "x").exists()


def test_missing_dataset_names_the_file_and_the_way_out(tmp_path):
    cli = _load()
    args = [*TINY, "--dataset-dir", str(tmp_path), "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit, match=r"cube-double-play-v0\.npz(.|\n)*qam\.data\.generate"):
        cli.main(args)


def test_demo_dataset_generated_once_into_its_own_directory(tmp_path, monkeypatch):
    """The embedded default generates its dataset (OGBench's play format, or with
    `--demo-data task-mixture` the task mixture) into a cache directory named by its settings,
    once, and reuses it afterwards."""
    cli = _load()
    monkeypatch.setattr(cli, "DEFAULT_CACHE", str(tmp_path / "cache"))
    small = {k: dict(d, episodes=2, max_episode_steps=30) for k, d in cli.DEMO_DATASETS.items()}
    monkeypatch.setattr(cli, "DEMO_DATASETS", small)
    monkeypatch.setenv("QAM_DATASET_DIR", str(tmp_path / "no-official-files"))
    job, _ = cli.parse_args([])
    directory = cli.ensure_demo_dataset(job)
    assert directory == cli.demo_dataset_dir(str(tmp_path / "cache"), "play")
    assert os.path.basename(directory) == "cube-single-play-ep2x30-seed0"
    path = pathlib.Path(directory) / "cube-single-play-v0.npz"
    meta = json.loads((pathlib.Path(directory) / "cube-single-play-v0.meta.json").read_text())
    assert (meta["task"], meta["task_goal_fraction"], meta["num_episodes"]) == (None, 0.0, 2)
    stamp = path.stat().st_mtime_ns
    assert cli.ensure_demo_dataset(cli.parse_args([])[0]) == directory
    assert path.stat().st_mtime_ns == stamp  # reused, not regenerated
    mixture = cli.ensure_demo_dataset(cli.parse_args(["--demo-data", "task-mixture"])[0])
    assert mixture == cli.demo_dataset_dir(str(tmp_path / "cache"), "task-mixture") != directory
    assert "task1-goal0.25-start1.0" in mixture
    meta = json.loads((pathlib.Path(mixture) / "cube-single-play-v0.meta.json").read_text())
    assert (meta["task"], meta["task_goal_fraction"], meta["task_start_fraction"]) == (1, 0.25, 1.0)
    # Any explicit choice bypasses the demo dataset.
    explicit, _ = cli.parse_args(["--dataset-dir", str(tmp_path)])
    assert cli.ensure_demo_dataset(explicit) == str(tmp_path)


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "v7"),  # the embedded default: the play demo with the dense reward v7
        (["--demo-data", "task-mixture"], None),
        (["--dataset-dir", "/d"], None),  # the user's data: the task's own reward
        (["--env", "cube-double-play-singletask-task2-v0"], None),
        (["--env", "puzzle-3x3-play-singletask-task1-v0"], None),
        (["--dense-reward-version", "none"], None),
        (["--dataset-dir", "/d", "--dense-reward-version", "v2"], "v2"),
    ],
)
def test_auto_dense_reward_is_the_embedded_default_s_only(argv, expected):
    cli = _load()
    run, _ = cli.build_configs(*cli.parse_args(argv))
    assert run.dense_reward_version == expected


# --- the command lines: `--help` and usage errors ---------------------------------------------


def _help_entries(text: str) -> dict[str, str]:
    """`--flag` -> its help text (doc line, then `(default: ...)`), from tyro's boxed help."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        line = line.rstrip(" │").removeprefix("│")  # boxes on a terminal, plain text otherwise
        indent = len(line) - len(line.lstrip())
        line = line.strip()
        if not line or line.startswith(("╭", "╰")) or set(line) <= {"─", "-"}:
            flag = None  # a group's end, title or description
            continue
        if line.startswith("--") and indent <= 3:  # `--flag[, --no-flag] [METAVAR]  help...`
            flag, _, rest = line.partition("  ")
            flag = flag.split()[0].rstrip(",")
            entries[flag] = rest
        elif flag is not None:
            entries[flag] += " " + line
    return {k: " ".join(v.split()) for k, v in entries.items()}


def _help(capsys, monkeypatch, main, argv) -> dict[str, str]:
    monkeypatch.setenv("COLUMNS", "100")  # one column
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code in (0, None)
    return _help_entries(capsys.readouterr().out)


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


RUN_FLAGS = {
    "--env": "cube-single-play-singletask-task1-v0", "--agent": "qam-edit", "--preset": "small",
    "--dataset-dir": "None", "--out": "None", "--seeds": "0", "--sparse": "auto",
    "--offline-steps": "9000", "--online-steps": "3000", "--eval-episodes": "20",
    "--eval-interval": "3000", "--log-interval": "500", "--checkpoint-interval": "3000",
    "--batch-size": "128", "--start-training": "250", "--utd": "1", "--buffer-size": "None",
    "--max-episode-steps": "None", "--tensorboard": "False", "--wandb": "False",
    "--progress": "True", "--dense-reward-version": "auto", "--cube-success-threshold": "0.04",
    "--balanced-sampling": "False", "--random-warmup": "False", "--shard-dir": "None",
    "--dataset-replace-interval": "1000", "--dataset-proportion": "1.0", "--multi-device": "True",
    "--demo-data": "play",
}  # fmt: skip


def _other_agent() -> str:
    """A registered agent with its own config class (the QAM family shares one), if any."""
    from qam.agents import AGENTS, QAMConfig

    others = [name for name, a in AGENTS.items() if a.config_class is not QAMConfig]
    return others[0] if others else "qam-fql"


@pytest.mark.parametrize("agent", ["qam-edit", _other_agent()])
def test_help_lists_the_run_and_the_agents_fields_with_the_small_presets_defaults(
    agent, capsys, monkeypatch
):
    cli = _load()
    entries = _help(capsys, monkeypatch, cli.main, ["--agent", agent])
    for flag, default in RUN_FLAGS.items():
        assert f"(default: {default})" in entries[flag], (flag, entries[flag])
        assert entries[flag].index("(default:") > 0, f"{flag} has no doc line"
    config = cli.AGENTS[agent].config_class
    _, expected = cli.preset_defaults(agent, "small", cli.DEFAULT_ENV)
    assert set(entries) == set(RUN_FLAGS) | {
        "--" + f.name.replace("_", "-") for f in dataclasses.fields(config)
    }
    for field in dataclasses.fields(config):
        entry = entries["--" + field.name.replace("_", "-")]
        assert f"(default: {_shown(getattr(expected, field.name))})" in entry, entry
        assert entry.index("(default:") > 0, f"{field.name} has no doc line"
    assert "(default: 256 256)" in entries["--actor-hidden"]
    assert "(default: 4)" in entries["--num-qs"] and "critic ensemble size" in entries["--num-qs"]
    if agent == "qam-edit":
        assert entries["--edit-scale"].startswith("qam-edit: edit magnitude")
        assert "(default: 0.1)" in entries["--edit-scale"]
        assert "(default: 1.0)" in entries["--inv-temp"]
        assert "(default: 10)" in entries["--flow-steps"]
    else:  # a baseline: its tuned value for cube-double, where the method has one
        tuned = cli.METHOD_PRESETS.get(agent, {}).get(cli.DEMO_DOMAIN, {})
        for name, value in tuned.items():
            assert getattr(expected, name) == value
            assert f"(default: {_shown(value)})" in entries["--" + name.replace("_", "-")]


def test_help_shows_the_paper_presets_values(capsys, monkeypatch):
    cli = _load()
    env = "cube-triple-play-singletask-task2-v0"
    entries = _help(capsys, monkeypatch, cli.main, ["--preset", "paper", "--env", env,
                                                    "--agent", "qam-edit"])  # fmt: skip
    for flag, default in [
        ("--inv-temp", "3.0"), ("--edit-scale", "0.1"), ("--actor-hidden", "512 512 512 512"),
        ("--num-qs", "10"), ("--horizon", "5"), ("--offline-steps", "1000000"),
        ("--online-steps", "500000"), ("--batch-size", "256"), ("--preset", "paper"),
    ]:  # fmt: skip
        assert f"(default: {default})" in entries[flag], (flag, entries[flag])


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--agent", "nonexistent"], r"^error: --agent 'nonexistent' is not a registered agent"),
        (["--num-qs", "0"], r"^error: `QAMConfig\(num_qs=\.\.\.\)` must be >= 1; got 0\.$"),
        (["--preset", "paper"], r"^error: --preset paper: .*known domains"),
    ],
)
def test_bad_input_is_one_error_line_with_status_2(argv, match, capsys, tmp_path):
    cli = _load()
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--out", str(tmp_path / "x"), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(match, err.strip()), err
    if "nonexistent" in argv:
        assert all(name in err for name in cli.AGENTS)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "argv", [["--bogus"], ["--num-qs", "x"], ["--preset", "huge"], ["--sparse", "maybe"]]
)
def test_unknown_flags_and_malformed_values_are_tyros_usage_errors(argv, capsys, tmp_path):
    cli = _load()
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert argv[-1] in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


GENERATE_FLAGS = {
    "--env": "(required)", "--dataset-type": "(required)", "--episodes": "(required)",
    "--dir": "(required)", "--seed": "(default: 0)", "--max-episode-steps": "(default: None)",
    "--val-episodes": "(default: None)", "--noise": "(default: 0.1)",
    "--noise-smoothing": "(default: 0.5)", "--min-norm": "(default: 0.4)",
    "--p-random-action": "(default: None)", "--task": "(default: None)",
    "--task-goal-fraction": "(default: 0.0)", "--task-start-fraction": "(default: 0.0)",
    "--workers": "(default: 1)", "--progress": "(default: True)",
}  # fmt: skip


def test_generator_help_documents_every_option(capsys, monkeypatch):
    from qam.data import generate

    entries = _help(capsys, monkeypatch, generate.main, [])
    assert set(entries) == set(GENERATE_FLAGS)
    for flag, default in GENERATE_FLAGS.items():
        assert entries[flag].endswith(default), (flag, entries[flag])
        assert entries[flag].index(default) > 0, f"{flag} has no doc line"
    assert "puzzle-3x3-v0" in entries["--env"] and "play" in entries["--dataset-type"]


def test_generator_bad_values_fail_with_status_2(tmp_path, capsys):
    from qam.data import generate

    args = ["--env", "cube-single-v0", "--dataset-type", "play", "--dir", str(tmp_path / "d")]
    assert generate.main([*args, "--episodes", "0"]) == 2  # the library's check
    assert capsys.readouterr().err == "error: num_episodes: expected an int >= 1, got 0.\n"
    for bad in (["--episodes", "x"], ["--episodes", "1", "--dataset-type", "clean"]):
        with pytest.raises(SystemExit) as exc:  # tyro's usage error
            generate.main([*args, *bad])
        assert exc.value.code == 2 and bad[-1] in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
