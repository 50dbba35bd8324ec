"""The sweep report on synthetic run directories: scores, means and IQMs by hand, intervals
against rliable called directly, the paper's numbers and the overlap flag, the files written."""

import csv
import io
import json
import os
import pathlib

import numpy as np
import pytest
from helpers import load_script

from qam import reference, studies


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # arch, inside rliable
ROOT = pathlib.Path(__file__).resolve().parents[1]
OFFLINE, ONLINE = 100, 50
STEPS = (50, 100, 150)
CD1, CD2 = "cube-double-play-singletask-task1-v0", "cube-double-play-singletask-task2-v0"
SCENE = "scene-play-singletask-task2-v0"


def _program(out, method, label, task, seeds, values, *, name=None, config="c"):
    """A finished program: its record, config.json, eval.csv (`values[seed][step]`, fractions)
    and summary.json, as the sweep and the main job write them."""
    base = out / method / task / (name or f"s{'-'.join(map(str, seeds))}-{label}")
    base.mkdir(parents=True)
    record = {
        "study": "main",
        "method": method,
        "label": label,
        "task": task,
        "seeds": list(seeds),
        "members": {str(s): f"{config}-{label}-{task}-{s}" for s in seeds},
    }
    pathlib.Path(str(base) + ".json").write_text(json.dumps(record))
    (base / "config.json").write_text(json.dumps(
        {"run": {"offline_steps": OFFLINE, "online_steps": ONLINE}}))  # fmt: skip
    rows = ["step,success," + ",".join(f"success/seed{i}" for i in range(len(seeds)))]
    for step in STEPS:
        per = [values[s][step] for s in seeds]
        rows.append(f"{step},{np.mean(per)}," + ",".join(repr(v) for v in per))
    (base / "eval.csv").write_text("\n".join(rows) + "\n")
    (base / "summary.json").write_text("{}")
    return base


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """QAM and FQL on two cube-double tasks and one scene task, seeds 1-3 (1 and 2 in one
    program, 3 alone); FQL lacks seed 3 on task 2. QAM's scene scores are the paper's mean at
    the offline end; FQL's are 0 there (outside the paper's interval)."""
    out = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    scores = {}
    paper_qam = reference.paper_curve(SCENE, "QAM")
    paper_fql = reference.paper_curve(SCENE, "FQL")
    assert paper_qam is not None and paper_fql is not None
    at_1m = lambda c: float(c["mean"][list(c["steps"]).index(1_000_000)])  # noqa: E731
    for method, label in (("qam", "QAM"), ("fql", "FQL")):
        for task in (CD1, CD2, SCENE):
            values = {s: {step: float(rng.integers(0, 11)) / 10 for step in STEPS}
                      for s in (1, 2, 3)}  # fmt: skip
            if task == SCENE:
                for s in values:
                    values[s][OFFLINE] = at_1m(paper_qam) / 100 if label == "QAM" else 0.0
            seeds = (1, 2, 3) if not (label == "FQL" and task == CD2) else (1, 2)
            _program(out, method, label, task, seeds[:2], values)
            if len(seeds) == 3:
                _program(out, method, label, task, (3,), values)
            scores[label, task] = {s: values[s] for s in seeds}
    # The same seed-runs again in another grouping of seeds: counted once.
    _program(out, "qam", "QAM", CD1, (1,), scores["QAM", CD1], name="s1-regrouped")
    # An older configuration of one seed-run (another id), finished earlier: superseded.
    old = _program(out, "qam", "QAM", CD1, (1,), {1: {s: 1.0 for s in STEPS}}, name="s1-old",
                   config="old")  # fmt: skip
    os.utime(old / "summary.json", (1e9, 1e9))
    # An unfinished program is not read.
    unfinished = _program(out, "qam", "QAM", CD2, (7,), {7: {s: 1.0 for s in STEPS}})
    (unfinished / "summary.json").unlink()
    assert float(paper_fql["ci_low"][list(paper_fql["steps"]).index(1_000_000)]) > 0
    return out, scores


def _must(x):
    assert x is not None
    return x


def _matrix(scores, label, tasks, step):
    seeds = sorted(set.intersection(*(set(scores[label, t]) for t in tasks)))
    return 100 * np.array([[scores[label, t][s][step] for t in tasks] for s in seeds])


def _iqm(x):
    v = np.sort(np.asarray(x, np.float64).reshape(-1))
    k = int(0.25 * v.size)  # scipy's trim_mean(x, 0.25) cuts int(0.25 n) from each end
    return float(v[k : v.size - k].mean())


def test_collect_reads_each_finished_seed_run_once(sweep):
    out, _ = sweep
    curves, counts = studies.collect(str(out))
    assert counts["runs"] == len(curves) == 2 * 3 * 3 - 1 and counts["superseded"] == 1
    assert counts["finished"] == counts["programs"] - 1
    assert len({(c.label, c.task, c.seed) for c in curves}) == len(curves)
    c = next(c for c in curves if (c.label, c.task, c.seed) == ("FQL", SCENE, 3))
    assert c.score("offline") == 0.0 and c.domain == "scene-play"


def test_cells_against_hand_computed_means_iqms_and_rliable(sweep):
    from rliable import library as rly, metrics

    out, scores = sweep
    curves, _ = studies.collect(str(out))
    cells = {(c.phase, c.label, c.column): c for c in studies.table(curves, reps=200, seed=3)}
    assert len(cells) == 2 * 2 * 3  # phases x methods x (cube-double-play, scene-play, all)
    for (phase, label, column), cell in cells.items():
        tasks = {"cube-double-play": [CD1, CD2], "scene-play": [SCENE], "all": [CD1, CD2, SCENE]}
        x = _matrix(
            scores, label, tasks[column], OFFLINE if phase == "offline" else OFFLINE + ONLINE
        )
        assert cell.seeds == ((1, 2) if label == "FQL" and column != "scene-play" else (1, 2, 3))
        assert cell.step == (OFFLINE if phase == "offline" else OFFLINE + ONLINE)
        np.testing.assert_allclose(cell.mean, x.mean(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(cell.iqm, _iqm(x), rtol=0, atol=1e-12)
        # rliable called directly, on the mean alone: the same resamples, the same interval.
        # (rliable 1.2 resamples with NumPy's global generator, whatever random_state says.)
        np.random.seed(3)
        mean = lambda s: np.array([metrics.aggregate_mean(s)])  # noqa: E731
        _, ci = rly.get_interval_estimates({"x": x}, mean, reps=200)
        np.testing.assert_allclose(cell.ci, ci["x"][:, 0], rtol=0, atol=1e-12)
        np.random.seed(3)
        _, ci = rly.get_interval_estimates({"x": x}, lambda s: np.array([metrics.aggregate_iqm(s)]),
                                           reps=200)  # fmt: skip
        np.testing.assert_allclose(cell.iqm_ci, ci["x"][:, 0], rtol=0, atol=1e-12)
        assert cell.ci[0] <= cell.mean <= cell.ci[1]
    # The paper's numbers where the column's tasks are one of its curves (one task here).
    qam = cells["offline", "QAM", "scene-play"]
    assert qam.paper == (SCENE, 98.33, 96.5, 99.67) and qam.overlap is True
    assert qam.ci == pytest.approx((98.33, 98.33), abs=1e-9)  # every seed at the paper's mean
    fql = cells["offline", "FQL", "scene-play"]
    assert fql.paper == (SCENE, 71.0, 65.0, 76.33) and fql.overlap is False and fql.ci == (0, 0)
    online = cells["online", "QAM", "scene-play"].paper
    assert online is not None and online[0] == SCENE
    assert online[1] == _must(reference.paper_curve(SCENE, "QAM"))["mean"][-1]
    assert cells["offline", "QAM", "cube-double-play"].paper is None  # 2 of 5 tasks: no curve
    assert cells["offline", "QAM", "all"].paper is None


def test_vectorised_bootstrap_agrees_with_rliable(sweep):
    """The learning curves' vectorised stratified bootstrap estimates the same interval as
    rliable's (different random streams: agreement within Monte Carlo error)."""
    from rliable import library as rly, metrics

    out, scores = sweep
    x = _matrix(scores, "QAM", [CD1, CD2, SCENE], 150)
    reps = 20_000
    ours = studies.stratified_bootstrap(x, reps=reps, seed=1)
    np.random.seed(1)
    _, ci = rly.get_interval_estimates({"x": x}, lambda s: np.array([metrics.aggregate_mean(s)]),
                                       reps=reps)  # fmt: skip
    # Percentile endpoints of 20k resamples: standard error a few % of the bootstrap spread.
    spread = ci["x"][1, 0] - ci["x"][0, 0]
    assert spread > 5
    np.testing.assert_allclose(ours, ci["x"][:, 0], atol=0.05 * spread)
    assert ours[0] < x.mean() < ours[1]


def test_report_command_writes_markdown_csv_and_pngs(sweep, capsys):
    out, _ = sweep
    cli = load_script(ROOT / "examples" / "report.py", "report_cli")
    assert cli.main([str(out), "--reps", "200"]) == 0
    text = capsys.readouterr().out
    assert "## offline end (step 100)" in text and "## after online (step 150)" in text
    fql_row = next(
        line for line in text.splitlines() if line.startswith("| FQL | ") and "†" in line
    )
    assert fql_row.endswith("| scene-play |")  # the column naming where the CIs do not overlap
    assert "| QAM | " in text and "Compared by phase" in text
    report = out / "report"
    rows = list(csv.DictReader(io.StringIO((report / "table.csv").read_text())))
    assert len(rows) == 12 and set(rows[0]) == set(studies._results.CSV_FIELDS)
    flags = {(r["phase"], r["method"], r["column"]): r["ci_overlaps_paper"] for r in rows}
    assert flags["offline", "FQL", "scene-play"] == "no"
    assert flags["offline", "QAM", "scene-play"] == "yes"
    assert flags["offline", "QAM", "cube-double-play"] == ""
    for column in ("cube-double-play", "scene-play", "all"):
        assert (report / f"curves-{column}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report / "table.md").read_text() == text[: text.index("\nwrote ")]
    assert cli.main([str(out / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_paper_numbers_of_the_sensitivity_study_and_curve_bands(sweep):
    assert studies.paper_point("QAM-E (T=3)", studies.SENSITIVITY_TASKS, "offline") == (
        "all-rep", 12.88, 10.73, 14.97)  # fmt: skip
    assert studies.paper_point("QAM-E (T=3)", studies.SENSITIVITY_TASKS, "online") == (
        "all-rep", 32.12, 29.0, 34.88)  # fmt: skip
    assert studies.paper_point("QAM-E (T=3)", [CD2], "offline") == (CD2, 0.0, 0.0, 0.0)
    main = studies.paper_point("QAM", studies.MAIN_TASKS, "offline")
    assert main is not None and main[0] == "all"
    cd = [f"cube-double-play-singletask-task{i}-v0" for i in range(1, 6)]
    assert _must(studies.paper_point("QAM", cd, "offline"))[0] == "cube-double-play"
    out, scores = sweep
    curves, _ = studies.collect(str(out))
    band = _must(studies._results.curve_band(curves, "FQL", [CD1, CD2], reps=300))
    assert list(band["steps"]) == list(STEPS)
    for i, step in enumerate(STEPS):
        x = _matrix(scores, "FQL", [CD1, CD2], step)
        np.testing.assert_allclose(band["mean"][i], x.mean(), atol=1e-12)
        assert band["low"][i] <= band["mean"][i] <= band["high"][i]
