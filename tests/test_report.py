"""`qam.report`: the evaluation curve, the learning-curve plot and the run summary, and the
paper's curves they are compared with (`qam.reference`)."""

import json
import os

import numpy as np
import pytest

from qam import logging as qlog, reference, report


TASK = "cube-double-play-singletask-task2-v0"


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
    info = report.plot_learning_curve(path, out, task=task, method="qam-edit",
                                      offline_steps=offline_steps)  # fmt: skip
    assert info == {"path": os.fspath(out), "panels": panels, "paper": paper}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_from_trainer_rows(tmp_path):
    evals = [{"step": 1000, "success": [0.1, 0.3]}, {"step": 2000, "success": [0.5, 0.7]}]
    curve = report.read_eval_curve(evals)
    np.testing.assert_allclose(curve["mean"], [0.2, 0.6])
    np.testing.assert_allclose(curve["per_seed"], [[0.1, 0.3], [0.5, 0.7]])
    out = tmp_path / "c.png"
    report.plot_learning_curve(evals, out, task=TASK, method="qam", offline_steps=1000)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_summary(tmp_path):
    path = _eval_log(tmp_path, 3000, [1000, 2000, 3000, 4000, 5000])
    text = report.summary(
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
    text = report.summary(tmp_path, task="no-such-task-v0", method="qam", seeds=[3, 4],
                          evals=evals, offline_steps=10, online_steps=0, write=False)  # fmt: skip
    assert "50.0 ± 50.0%" in text and "paper: no curve" in text
    assert not (tmp_path / "summary.txt").exists()
