import csv
import dataclasses
import io
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from qam import logging as qlog, reference


TASK = "cube-double-play-singletask-task2-v0"


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _csv_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- conversion
def test_to_python():
    @dataclasses.dataclass
    class Config:
        lr: float = 3e-4
        sizes: tuple = (256, 256)

    value = {
        "a": np.float32(0.1),
        "b": jnp.asarray(3, jnp.int32),
        "c": np.bool_(True),
        "d": jnp.asarray([1.5, 2.5]),
        "e": (1, np.int64(2)),
        "f": Config(),
        "g": None,
        1: "x",
    }
    out = qlog.to_python(value)
    assert out == {
        "a": 0.1,
        "b": 3,
        "c": True,
        "d": [1.5, 2.5],
        "e": [1, 2],
        "f": {"lr": 3e-4, "sizes": [256, 256]},
        "g": None,
        "1": "x",
    }
    assert type(out["a"]) is float and type(out["b"]) is int and type(out["c"]) is bool
    json.dumps(out)  # plain Python throughout


# ----------------------------------------------------------------------------- logger
def test_log_scalars_numpy_jax_and_seed_arrays(tmp_path):
    with qlog.Logger(tmp_path) as logger:
        row = logger.log(
            1000,
            {
                "loss": 0.5,
                "np_loss": np.float32(0.25),
                "jax_loss": jnp.asarray(1.5, jnp.float32),
                "count": np.int64(7),
                "success": np.array([0.2, 0.4, 0.9], np.float32),
                "ret": jnp.asarray([-1.0, -3.0]),
                "flag": np.bool_(False),
                "phase": "offline",
            },
            prefix="train",
        )
    expected = {
        "step": 1000,
        "loss": 0.5,
        "np_loss": 0.25,
        "jax_loss": 1.5,
        "count": 7,
        "success": 0.5,
        "success/seed0": 0.2,
        "success/seed1": 0.4,
        "success/seed2": 0.9,
        "ret": -2.0,
        "ret/seed0": -1.0,
        "ret/seed1": -3.0,
        "flag": False,
        "phase": "offline",
    }
    assert row == expected
    assert _jsonl(tmp_path / "train.jsonl") == [expected]
    assert _read(tmp_path / "train.csv") == (
        "step,loss,np_loss,jax_loss,count,success,success/seed0,success/seed1,success/seed2,"
        "ret,ret/seed0,ret/seed1,flag,phase\n"
        "1000,0.5,0.25,1.5,7,0.5,0.2,0.4,0.9,-2.0,-1.0,-3.0,False,offline\n"
    )


def test_one_seed_and_trailing_axes(tmp_path):
    with qlog.Logger(tmp_path) as logger:
        row = logger.log(5, {"x": np.array([3.0]), "y": np.array([[1.0, 3.0], [5.0, 7.0]])},
                         prefix="eval")  # fmt: skip
    assert row == {"step": 5, "x": 3.0, "x/seed0": 3.0, "y": 4.0, "y/seed0": 2.0, "y/seed1": 6.0}


def test_new_key_rewrites_header(tmp_path):
    with qlog.Logger(tmp_path) as logger:
        logger.log(1, {"a": 1.0}, prefix="train")
        logger.log(2, {"a": 2.0, "b": np.array([1, 3])}, prefix="train")
        logger.log(3, {"b": np.array([5, 7])}, prefix="train")
    assert _read(tmp_path / "train.csv") == (
        "step,a,b,b/seed0,b/seed1\n1,1.0,,,\n2,2.0,2.0,1,3\n3,,6.0,5,7\n"
    )
    assert [r["step"] for r in _jsonl(tmp_path / "train.jsonl")] == [1, 2, 3]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _run(logger, steps, *, new_key_at=7):
    """A deterministic fake training loop: train rows every step, eval rows every 2 steps."""
    for step in steps:
        metrics = {"loss": np.float32(1.0 / step), "q": jnp.asarray([step, 2.0 * step])}
        if step >= new_key_at:
            metrics["online_return"] = np.array([step * 0.5, -1.0])
        logger.log(step, metrics, prefix="train")
        if step % 2 == 0:
            logger.log(step, {"success": np.array([step / 10, step / 20])}, prefix="eval")


def test_resume_truncates_and_matches_uninterrupted(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    with qlog.Logger(full) as logger:
        _run(logger, range(1, 11))
    # Interrupted after step 8 (past the new key at 7), with a torn last line; resumed from a
    # checkpoint at step 5.
    with qlog.Logger(resumed) as logger:
        _run(logger, range(1, 9))
    with open(resumed / "train.jsonl", "a") as f:
        f.write('{"step": 9, "lo')
    with qlog.Logger(resumed, resume_step=5) as logger:
        assert max(r["step"] for r in _jsonl(resumed / "train.jsonl")) == 5
        assert "online_return" not in _read(resumed / "train.csv")  # header rebuilt
        _run(logger, range(6, 11))
    for name in ("train.csv", "train.jsonl", "eval.csv", "eval.jsonl"):
        assert _read(resumed / name) == _read(full / name), name


def test_fresh_run_replaces_old_logs(tmp_path):
    with qlog.Logger(tmp_path) as logger:
        logger.log(1, {"a": 1}, prefix="train")
        logger.log(1, {"b": 1}, prefix="old")
    with qlog.Logger(tmp_path) as logger:
        logger.log(1, {"c": 2}, prefix="train")
    assert _read(tmp_path / "train.csv") == "step,c\n1,2\n"
    assert not (tmp_path / "old.csv").exists() and not (tmp_path / "old.jsonl").exists()


def test_log_rejects_bad_input(tmp_path):
    with qlog.Logger(tmp_path) as logger:
        with pytest.raises(ValueError, match="step"):
            logger.log(1, {"step": 3}, prefix="train")
        with pytest.raises(ValueError, match="prefix"):
            logger.log(1, {"a": 1}, prefix="../x")
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(2, {"a": 1}, prefix="train")


@pytest.mark.parametrize(
    "kwargs, blocked, package",
    [
        ({"tensorboard": True}, ("tensorboardX", "torch"), "pip install tensorboardX"),
        ({"wandb": True}, ("wandb",), "pip install wandb"),
    ],
)
def test_missing_optional_backend_is_a_clear_error(tmp_path, monkeypatch, kwargs, blocked, package):
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    with pytest.raises(ImportError, match=package):
        qlog.Logger(tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()  # failed before touching anything


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_write(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    qlog.atomic_write_text(path, "one\n")
    qlog.atomic_write_bytes(path, b"two\n")
    assert path.read_bytes() == b"two\n"
    assert os.listdir(tmp_path / "sub") == ["f.txt"]
    assert os.stat(path).st_mode & 0o044  # not mkstemp's private 0o600


# ----------------------------------------------------------------------------- progress bar
def test_progress_bar_plain_printer():
    out = io.StringIO()
    bar = qlog.ProgressBar(100, initial=20, use_tqdm=False, mininterval=0.0, file=out)
    bar.update(30, success=np.float32(0.25), critic=1.23456)
    bar.update(50)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("50/100 steps") and "steps/s" in lines[0]
    assert "success=25.0%" in lines[1] and "critic=1.235" in lines[1]  # kept across updates
    assert lines[1].startswith("100/100")


def test_progress_bar_quiet_when_disabled_or_not_due():
    out = io.StringIO()
    with qlog.ProgressBar(100, disable=True, use_tqdm=False, file=out) as bar:
        bar.update(100, success=1.0)
    assert out.getvalue() == ""
    out = io.StringIO()  # not a TTY: one line a minute by default, plus the final one
    with qlog.ProgressBar(1000, use_tqdm=False, file=out) as bar:
        for _ in range(9):
            bar.update(100)
    assert len(out.getvalue().splitlines()) == 1


def test_progress_bar_tqdm():
    pytest.importorskip("tqdm")
    out = io.StringIO()
    with qlog.ProgressBar(10, file=out, mininterval=0.0) as bar:
        bar.update(10, success=0.5)
    assert "success=50.0%" in out.getvalue() and "step" in out.getvalue()


# ----------------------------------------------------------------------------- reference data
def test_paper_curve_known_row():
    curve = reference.paper_curve(TASK, "qam-edit")
    assert curve is not None and curve["method"] == "QAM-E" and curve["seeds"] == 12
    i = int(np.nonzero(curve["steps"] == 1_000_000)[0][0])
    assert (curve["mean"][i], curve["ci_low"][i], curve["ci_high"][i]) == (76.83, 70.67, 83.0)
    assert curve["steps"][0] == 50_000 and curve["steps"][-1] == 1_500_000
    assert len(curve["steps"]) == 30 and np.all(np.diff(curve["steps"]) == 50_000)
    # Table 1 of the paper: QAM-E's offline mean over all 50 tasks.
    everything = reference.paper_curve("all", "QAM-E")
    assert everything["mean"][everything["steps"] == 1_000_000][0] == pytest.approx(45.7, abs=0.1)


def test_paper_curve_names_and_absent():
    assert reference.paper_curve(TASK, "qam")["method"] == "QAM"
    assert reference.paper_curve(TASK, "qam-fql")["method"] == "QAM-F"
    assert reference.paper_curve(TASK, "rebrac")["method"] == "ReBRAC"
    assert reference.paper_curve(TASK, "FQL")["method"] == "FQL"
    assert reference.paper_curve("cube-double-play", "qam-edit") is not None  # a domain
    assert reference.paper_curve("antmaze-large-stitch", "qam-edit") is not None  # quality file
    rlpd = reference.paper_curve(TASK, "rlpd")
    assert rlpd["steps"][0] == 1_050_000  # online only
    assert reference.paper_curve("no-such-task-v0", "qam") is None
    assert reference.paper_curve(TASK, "no-such-method") is None
    assert reference.paper_curve("antmaze-large-stitch", "CGQL") is None  # not in that study
    assert {"QAM", "QAM-E", "QAM-F", "FQL", "ReBRAC", "RLPD"} <= set(reference.available_methods())
    assert TASK in reference.available_tasks() and "all" in reference.available_tasks("qam")


# ----------------------------------------------------------------------------- plot, summary
def _eval_log(run_dir, offline_steps, steps):
    with qlog.Logger(run_dir) as logger:
        for step in steps:
            logger.log(step, {"success": np.array([step / 1e4, step / 2e4]),
                              "return": np.array([-1.0, -2.0])}, prefix="eval")  # fmt: skip
            if step == offline_steps:
                logger.log(step, {"bc_success": np.array([0.1, 0.3])}, prefix="eval")
    return run_dir / "eval.csv"


@pytest.mark.parametrize(
    "task, offline_steps, panels, paper",
    [(TASK, 3000, 2, True), (TASK, 1_000_000, 1, True), ("no-such-task-v0", 3000, 1, False)],
)
def test_plot_learning_curve(tmp_path, task, offline_steps, panels, paper):
    steps = [1000, 2000, 3000, 4000] if offline_steps == 3000 else [500_000, 1_000_000]
    path = _eval_log(tmp_path, offline_steps, steps)
    out = tmp_path / "curve.png"
    info = qlog.plot_learning_curve(path, out, task=task, method="qam-edit",
                                    offline_steps=offline_steps)  # fmt: skip
    assert info == {"path": os.fspath(out), "panels": panels, "paper": paper}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_from_trainer_rows(tmp_path):
    evals = [{"step": 1000, "success": [0.1, 0.3]}, {"step": 2000, "success": [0.5, 0.7]}]
    curve = qlog.read_eval_curve(evals)
    np.testing.assert_allclose(curve["mean"], [0.2, 0.6])
    np.testing.assert_allclose(curve["per_seed"], [[0.1, 0.3], [0.5, 0.7]])
    out = tmp_path / "c.png"
    qlog.plot_learning_curve(evals, out, task=TASK, method="qam", offline_steps=1000)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_summary(tmp_path):
    path = _eval_log(tmp_path, 3000, [1000, 2000, 3000, 4000, 5000])
    text = qlog.summary(
        tmp_path, task=TASK, method="qam-edit", seeds=[0, 1], evals=path, offline_steps=3000,
        online_steps=2000, bc_success=[0.1, 0.3], wall_time=3725.0,
    )  # fmt: skip
    assert text == (tmp_path / "summary.txt").read_text()
    assert len(text.splitlines()) <= 25  # one screen
    assert "qam-edit (paper: QAM-E)" in text and TASK in text
    assert "22.5 ± 7.5%" in text  # offline end: 30% and 15%
    assert "37.5 ± 12.5%" in text  # final (= best): 50% and 25%
    assert "20.0 ± 10.0%" in text  # BC
    assert "76.8%   [70.7, 83.0]" in text  # the paper at its offline end
    assert "1:02:05" in text and "eval.csv" in text and "summary.json" in text
    record = json.loads((tmp_path / "summary.json").read_text())
    assert record["final"] == {"step": 5000, "mean": 37.5, "std": 12.5, "per_seed": [50.0, 25.0]}
    assert record["offline_end"]["step"] == 3000 and record["best"]["step"] == 5000
    assert record["paper"]["offline_end"] == {"step": 1_000_000, "mean": 76.83,
                                              "ci95": [70.67, 83.0]}  # fmt: skip
    assert record["paper"]["method"] == "QAM-E"


def test_summary_from_trainer_evals_without_paper(tmp_path):
    evals = [{"step": 10, "success": [0.0, 1.0], "return": [0.0, 1.0]}]
    text = qlog.summary(tmp_path, task="no-such-task-v0", method="qam", seeds=[3, 4],
                        evals=evals, offline_steps=10, online_steps=0, write=False)  # fmt: skip
    assert "50.0 ± 50.0%" in text and "paper: no curve" in text
    assert not (tmp_path / "summary.txt").exists()
