"""A sweep's results: per-seed curves read from its run directories, the paper's Table 1 layout
with stratified-bootstrap confidence intervals (rliable), learning curves beside the released
ones, written as markdown, CSV and PNG.

Scores. A seed-run's score at a phase is its success rate in percent: **offline**, the
evaluation at the run's last offline step (`offline_steps`; runs without an offline phase have
none); **online**, the evaluation at its last step (offline + online steps). A cell of the table
(a method and a column: one domain, or `all` the sweep's tasks) holds the scores `X[n, m]` of
the seeds `n` present on every task `m` of the column. Its value is the mean over seeds and
tasks; its 95% interval is rliable's stratified bootstrap (seeds resampled with replacement
within each task, `reps` times, percentile interval); the IQM is the mean of the middle 50% of
all `X` (scipy's `trim_mean(X, 0.25)`), with its interval from the same bootstrap.

The paper's number for a cell (mean and 95% bootstrap interval over its 12 seeds, from
`qam.reference` and the sensitivity curves shipped here) is read at step 1,000,000 (offline) and
at its last step, 1,500,000 (online). It exists where the column covers the same tasks as one of
the paper's curves: a single task, a domain's 5 tasks, the main study's 50 (`all`) or the
sensitivity study's 10 (`all-rep`). `overlap` says whether our interval and the paper's
intersect; with another schedule than the paper's (1M offline + 500K online) the comparison is
by phase, not by step.
"""

import csv
import dataclasses
import functools
import gzip
import importlib.resources
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import reference as _reference
from .._io import atomic_write_bytes, atomic_write_text
from ._launch import read_records, require
from ._study import MAIN_DOMAINS, MAIN_TASKS, PAPER_METHODS, PAPER_NAMES, SENSITIVITY_TASKS, domain


__all__ = ["Cell", "SeedCurve", "collect", "paper_point", "stratified_bootstrap", "table"]

PHASES = ("offline", "online")


@dataclasses.dataclass(frozen=True)
class SeedCurve:
    """One seed of one finished program: success in percent at each evaluated step."""

    label: str
    method: str
    task: str
    seed: int
    offline_steps: int
    online_steps: int
    steps: np.ndarray
    success: np.ndarray

    @property
    def domain(self) -> str:
        return domain(self.task)

    def score(self, phase: str) -> float | None:
        """Success (%) at the offline end or the final step; `None` where not evaluated."""
        if phase == "offline":
            if self.offline_steps == 0:
                return None
            step = self.offline_steps
        else:
            step = self.offline_steps + self.online_steps
        hits = np.flatnonzero(self.steps == step)
        if hits.size == 0 or not math.isfinite(self.success[hits[-1]]):
            return None
        return float(self.success[hits[-1]])


def collect(sweep_dir: str) -> tuple[list[SeedCurve], dict[str, int]]:
    """Every finished seed-run under `sweep_dir`, and counts: `programs` recorded, `finished`
    programs, `runs` read and `superseded`. A seed-run finished twice (in two groupings of
    seeds: the same id) is read once. Where two *different* configurations of one (label,
    task, seed) finished (a setting or the library changed between two sweeps into the same
    directory), the newest (by its `summary.json`) is read and the other counted as
    superseded."""
    from ..report import read_eval_curve

    chosen: dict[tuple[str, str, int], tuple[float, str, SeedCurve]] = {}
    records = read_records(sweep_dir)
    finished = [r for r in records if r["finished"]]
    superseded = 0
    for record in finished:
        run_dir = record["run_dir"]
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            run = json.load(f)["run"]
        curve = read_eval_curve(os.path.join(run_dir, "eval.csv"))
        stamp = os.path.getmtime(os.path.join(run_dir, "summary.json"))
        label = record.get("label") or record["method"]
        for i, seed in enumerate(record["seeds"]):
            if i >= curve["per_seed"].shape[1]:
                continue
            member = record["members"].get(int(seed))
            key = (label, record["task"], int(seed))
            old = chosen.get(key)
            if old is not None and old[1] == member:
                continue  # the same seed-run in another grouping
            if old is not None:
                superseded += 1
                if old[0] >= stamp:
                    continue
            chosen[key] = (stamp, member, SeedCurve(
                label, record["method"], record["task"], int(seed), int(run["offline_steps"]),
                int(run["online_steps"]), curve["steps"].copy(), 100.0 * curve["per_seed"][:, i],
            ))  # fmt: skip
    curves = [c for _, _, c in chosen.values()]
    return curves, {"programs": len(records), "finished": len(finished), "runs": len(curves),
                    "superseded": superseded}  # fmt: skip


# ------------------------------------------------------------------------- statistics
def _rliable() -> tuple[Any, Any]:
    require("rliable", "report", "the report")
    from rliable import library, metrics

    return library, metrics


def rliable_estimates(
    scores: np.ndarray, *, reps: int, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """`mean` and `iqm` of a `(seeds, tasks)` score matrix, each `(value, low, high)` with
    rliable's 95% stratified-bootstrap percentile interval (`reps` resamples, NumPy's global
    generator seeded with `seed` for them and restored after)."""
    rly, metrics = _rliable()

    def func(x: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_mean(x), metrics.aggregate_iqm(x)])

    # rliable (1.2) draws its resamples from NumPy's global generator whatever `random_state`
    # says: seed that for reproducible intervals, and put its state back afterwards.
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        with warnings.catch_warnings():  # arch deprecates the RandomState rliable passes it
            warnings.simplefilter("ignore", FutureWarning)
            point, interval = rly.get_interval_estimates(
                {"x": scores}, func, reps=reps, random_state=np.random.RandomState(seed)
            )
    finally:
        np.random.set_state(state)
    p, ci = point["x"], interval["x"]
    return {"mean": (float(p[0]), float(ci[0, 0]), float(ci[1, 0])),
            "iqm": (float(p[1]), float(ci[0, 1]), float(ci[1, 1]))}  # fmt: skip


def stratified_bootstrap(
    scores: np.ndarray, *, reps: int = 2000, seed: int = 0, size: float = 0.95
) -> tuple[float, float]:
    """The percentile interval of the mean of a `(seeds, tasks)` matrix under the stratified
    bootstrap (seeds resampled within each task), vectorised for the learning curves (one
    interval per evaluation step); the same estimator as rliable's `StratifiedBootstrap`."""
    x = np.asarray(scores, np.float64)
    n, m = x.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(reps, n, m))
    means = x[idx, np.arange(m)].mean(axis=(1, 2))
    tail = 100 * (1 - size) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


# ------------------------------------------------------------------------- the paper
@functools.lru_cache(maxsize=1)
def _sensitivity_table() -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], list[tuple[int, float, float, float]]] = {}
    root = importlib.resources.files(__name__.rpartition(".")[0])
    with root.joinpath("paper_sensitivity_curves.csv.gz").open("rb") as raw, \
            gzip.open(raw, "rt", newline="") as f:  # fmt: skip
        for row in csv.DictReader(f):
            out.setdefault((row["task"], row["method"]), []).append((
                int(row["step"]), float(row["success_mean_pct"]), float(row["ci95_low_pct"]),
                float(row["ci95_high_pct"]),
            ))  # fmt: skip
    table = {}
    for key, rows in out.items():
        rows.sort()
        a = np.asarray(rows, np.float64)
        table[key] = {"steps": a[:, 0].astype(np.int64), "mean": a[:, 1], "ci_low": a[:, 2],
                      "ci_high": a[:, 3]}  # fmt: skip
    return table


def paper_curve(task: str, label: str) -> dict[str, Any] | None:
    """The released curve of `label` (a paper method name or agent name, or a sensitivity
    variant such as `QAM-E (T=3)`) on `task` (a task, a domain, `all` or `all-rep`)."""
    curve = _reference.paper_curve(task, PAPER_NAMES.get(label, label))
    if curve is not None:
        return curve
    return _sensitivity_table().get((task, label))


def paper_key(tasks: Sequence[str]) -> str | None:
    """The paper's curve name covering exactly `tasks`, or `None`."""
    ts = set(tasks)
    if len(ts) == 1:
        return next(iter(ts))
    domains = {domain(t) for t in ts}
    if len(domains) == 1:
        d = next(iter(domains))
        if ts == {f"{d}-singletask-task{i}-v0" for i in range(1, 6)}:
            return d
    if ts == set(MAIN_TASKS):
        return "all"
    if ts == set(SENSITIVITY_TASKS):
        return "all-rep"
    return None


def paper_point(
    label: str, tasks: Sequence[str], phase: str
) -> tuple[str, float, float, float] | None:
    """`(curve, mean, low, high)` of the paper for `label` on `tasks` at `phase`'s step."""
    key = paper_key(tasks)
    if key is None:
        return None
    curve = paper_curve(key, label)
    if curve is None:
        return None
    step = _reference.PAPER_OFFLINE_STEPS if phase == "offline" else int(curve["steps"].max())
    hits = np.flatnonzero(curve["steps"] == step)
    if hits.size == 0:
        return None
    i = int(hits[0])
    return key, float(curve["mean"][i]), float(curve["ci_low"][i]), float(curve["ci_high"][i])


# ------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Cell:
    """One (phase, method, column) of the table; scores in percent."""

    phase: str
    label: str
    column: str
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    step: int | None
    mean: float
    ci: tuple[float, float]
    iqm: float
    iqm_ci: tuple[float, float]
    paper: tuple[str, float, float, float] | None

    @property
    def overlap(self) -> bool | None:
        """Whether our 95% interval and the paper's intersect (`None`: no paper number)."""
        if self.paper is None:
            return None
        return not (self.ci[1] < self.paper[2] or self.paper[3] < self.ci[0])


def _order(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(values))
    rank = {v: i for i, v in enumerate(preferred)}
    return sorted(seen, key=lambda v: (rank.get(v, len(rank)), seen.index(v)))


def labels_and_columns(curves: Sequence[SeedCurve]) -> tuple[list[str], list[str]]:
    """Rows (paper's method order first) and columns (Table 1's domain order, then `all`)."""
    labels = _order([c.label for c in curves], [PAPER_NAMES[m] for m in PAPER_METHODS])
    columns = _order([c.domain for c in curves], MAIN_DOMAINS)
    return labels, [*columns, "all"]


def score_matrix(
    curves: Sequence[SeedCurve], label: str, tasks: Sequence[str], phase: str
) -> tuple[np.ndarray, tuple[int, ...], tuple[str, ...]]:
    """`X[n, m]`: the scores of the seeds present on every one of `tasks` that has a score."""
    by_task: dict[str, dict[int, float]] = {}
    for c in curves:
        if c.label == label and c.task in tasks:
            value = c.score(phase)
            if value is not None:
                by_task.setdefault(c.task, {})[c.seed] = value
    used = tuple(t for t in tasks if t in by_task)
    if not used:
        return np.zeros((0, 0)), (), ()
    seeds = tuple(sorted(set.intersection(*(set(by_task[t]) for t in used))))
    x = np.array([[by_task[t][s] for t in used] for s in seeds], np.float64).reshape(
        len(seeds), len(used)
    )
    return x, seeds, used


def table(curves: Sequence[SeedCurve], *, reps: int = 2000, seed: int = 0) -> list[Cell]:
    """Every cell of both phases (see the module docstring); cells without scores are left
    out."""
    labels, columns = labels_and_columns(curves)
    tasks_of = {col: tuple(dict.fromkeys(c.task for c in curves
                                         if col == "all" or c.domain == col))
                for col in columns}  # fmt: skip
    cells = []
    for phase in PHASES:
        for label in labels:
            for col in columns:
                x, seeds, used = score_matrix(curves, label, tasks_of[col], phase)
                if x.size == 0:
                    continue
                est = rliable_estimates(x, reps=reps, seed=seed)
                steps = {c.offline_steps + (c.online_steps if phase == "online" else 0)
                         for c in curves if c.label == label and c.task in used}  # fmt: skip
                cells.append(Cell(
                    phase, label, col, used, seeds, steps.pop() if len(steps) == 1 else None,
                    est["mean"][0], est["mean"][1:], est["iqm"][0], est["iqm"][1:],
                    paper_point(label, used, phase),
                ))  # fmt: skip
    return cells


# ------------------------------------------------------------------------- output
CSV_FIELDS = (
    "phase", "method", "column", "num_tasks", "num_seeds", "step", "mean", "ci95_low",
    "ci95_high", "iqm", "iqm_ci95_low", "iqm_ci95_high", "paper_curve", "paper_mean",
    "paper_ci95_low", "paper_ci95_high", "ci_overlaps_paper",
)  # fmt: skip


def cells_csv(cells: Sequence[Cell]) -> str:
    """The cells as CSV (one row each, `CSV_FIELDS`)."""
    buffer = io.StringIO()
    w = csv.writer(buffer, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for c in cells:
        p = c.paper
        w.writerow([
            c.phase, c.label, c.column, len(c.tasks), len(c.seeds),
            "" if c.step is None else c.step,
            f"{c.mean:.4f}", f"{c.ci[0]:.4f}", f"{c.ci[1]:.4f}", f"{c.iqm:.4f}",
            f"{c.iqm_ci[0]:.4f}", f"{c.iqm_ci[1]:.4f}", *(("", "", "", "") if p is None else
            (p[0], f"{p[1]:.2f}", f"{p[2]:.2f}", f"{p[3]:.2f}")),
            "" if c.overlap is None else ("yes" if c.overlap else "no"),
        ])  # fmt: skip
    return buffer.getvalue()


def markdown(cells: Sequence[Cell], *, title: str, notes: Sequence[str] = (), reps: int) -> str:
    """Table 1's layout for each phase: methods x domains (+ `all` and its IQM), `mean [95%
    CI]`, `†` where our interval and the paper's do not overlap, then the paper's numbers."""
    lines = [f"# {title}", "", *notes]
    for phase in PHASES:
        these = [c for c in cells if c.phase == phase]
        if not these:
            continue
        labels = list(dict.fromkeys(c.label for c in these))
        columns = list(dict.fromkeys(c.column for c in these))
        at = {(c.label, c.column): c for c in these}
        steps = sorted({c.step for c in these if c.step is not None})
        where = "offline end" if phase == "offline" else "after online"
        lines += ["", f"## {where} (step {', '.join(f'{s:,}' for s in steps)}): mean success %, "
                  f"95% stratified-bootstrap CI ({reps} resamples)", ""]  # fmt: skip
        lines.append("| method | " + " | ".join(columns) + " | IQM (all) | differs from paper |")
        lines.append("|---" * (len(columns) + 3) + "|")
        for label in labels:
            row, differs = [], []
            for col in columns:
                c = at.get((label, col))
                if c is None:
                    row.append("")
                    continue
                mark = "†" if c.overlap is False else ""
                row.append(f"{c.mean:.1f} [{c.ci[0]:.1f}, {c.ci[1]:.1f}]{mark}")
                if c.overlap is False:
                    differs.append(col)
            a = at.get((label, "all"))
            iqm = "" if a is None else f"{a.iqm:.1f} [{a.iqm_ci[0]:.1f}, {a.iqm_ci[1]:.1f}]"
            lines.append(f"| {label} | " + " | ".join(row) + f" | {iqm} | "
                         f"{', '.join(differs) or '—'} |")  # fmt: skip
        if any(c.paper is not None for c in these):
            lines += ["", f"Paper, {where} (12 seeds, mean [95% bootstrap CI]):", ""]
            lines.append("| method | " + " | ".join(columns) + " |")
            lines.append("|---" * (len(columns) + 1) + "|")
            for label in labels:
                row = []
                for col in columns:
                    p = at[(label, col)].paper if (label, col) in at else None
                    row.append("" if p is None else f"{p[1]:.1f} [{p[2]:.1f}, {p[3]:.1f}]")
                lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += ["", "† our 95% CI and the paper's do not overlap."]
    return "\n".join(lines) + "\n"


def curve_band(
    curves: Sequence[SeedCurve], label: str, tasks: Sequence[str], *, reps: int, seed: int = 0
) -> dict[str, np.ndarray] | None:
    """Mean success (%) over seeds and tasks at each step evaluated by every run of `label` on
    `tasks`, with the stratified-bootstrap 95% band."""
    runs = [c for c in curves if c.label == label and c.task in tasks]
    if not runs:
        return None
    common = functools.reduce(np.intersect1d, [c.steps for c in runs])
    means, lows, highs = [], [], []
    for step in common:
        x, _, _ = _matrix_at(runs, tasks, int(step))
        means.append(float(x.mean()))
        lo, hi = stratified_bootstrap(x, reps=reps, seed=seed)
        lows.append(lo)
        highs.append(hi)
    return {"steps": common.astype(np.int64), "mean": np.array(means), "low": np.array(lows),
            "high": np.array(highs)}  # fmt: skip


def _matrix_at(runs: Sequence[SeedCurve], tasks: Sequence[str], step: int):
    by_task: dict[str, dict[int, float]] = {}
    for c in runs:
        i = int(np.flatnonzero(c.steps == step)[-1])
        by_task.setdefault(c.task, {})[c.seed] = float(c.success[i])
    used = [t for t in tasks if t in by_task]
    seeds = sorted(set.intersection(*(set(by_task[t]) for t in used)))
    return np.array([[by_task[t][s] for t in used] for s in seeds]), seeds, used


def plot_curves(
    curves: Sequence[SeedCurve], column: str, out_path: str, *, reps: int = 1000, dpi: int = 110
) -> dict[str, Any]:
    """One column's learning curves: each method's mean with its 95% band, and the paper's
    released curve with its band (on the same axis when our schedule is the paper's, else in a
    second panel on its own axis, as `qam.report.plot_learning_curve` does). A PNG."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    labels, _ = labels_and_columns(curves)
    tasks = tuple(dict.fromkeys(c.task for c in curves if column == "all" or c.domain == column))
    offline = sorted({c.offline_steps for c in curves if c.task in tasks})
    shared = offline == [_reference.PAPER_OFFLINE_STEPS]
    bands = {lab: curve_band(curves, lab, tasks, reps=reps) for lab in labels}
    key = paper_key(tasks)
    papers = {lab: paper_curve(key, lab) for lab in labels} if key else {}
    papers = {k: v for k, v in papers.items() if v is not None}
    panels = 2 if papers and not shared else 1
    fig = Figure(figsize=(6.4 * panels, 4.2), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False, sharey=True)[0]
    for i, lab in enumerate(labels):
        band = bands[lab]
        if band is None:
            continue
        color = f"C{i % 10}"
        axes[0].fill_between(band["steps"], band["low"], band["high"], color=color, alpha=0.2, lw=0)
        axes[0].plot(band["steps"], band["mean"], color=color, lw=1.8, label=lab,
                     marker="o" if len(band["steps"]) < 30 else None, ms=3)  # fmt: skip
        if lab in papers:
            pax = axes[0] if shared else axes[1]
            p = papers[lab]
            pax.fill_between(p["steps"], p["ci_low"], p["ci_high"], color=color, alpha=0.12, lw=0)
            pax.plot(p["steps"], p["mean"], color=color, lw=1.4, ls="--",
                     label=f"{lab} (paper)")  # fmt: skip
    for step in offline:
        axes[0].axvline(step, color="gray", ls=":", lw=1.0)
    if panels == 2:
        axes[0].set_title("this sweep")
        axes[1].set_title("paper (1M offline + 500K online)")
        axes[1].axvline(_reference.PAPER_OFFLINE_STEPS, color="gray", ls=":", lw=1.0)
    for a in axes:
        a.xaxis.set_major_formatter(EngFormatter(sep=""))
        a.set_xlabel("steps")
        a.set_ylim(-2, 102)
        a.grid(alpha=0.3)
        a.legend(loc="best", fontsize=7)
    axes[0].set_ylabel("success rate (%), mean and 95% CI")
    n = len(tasks)
    fig.suptitle(f"{column} ({n} task{'s' if n != 1 else ''})", fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(out_path, buffer.getvalue())
    return {"path": out_path, "panels": panels, "paper": sorted(papers)}


def write_report(
    sweep_dir: str, out_dir: str | None = None, *, reps: int = 2000, plots: bool = True,
    seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Read `sweep_dir`, write `table.md`, `table.csv` and `curves-<column>.png` into `out_dir`
    (default `sweep_dir/report`); the markdown text, the cells and the files written."""
    curves, counts = collect(sweep_dir)
    if not curves:
        raise ValueError(f"no finished run under {sweep_dir} (looked for */*/*.json records with "
                         "a summary.json in their run directory).")  # fmt: skip
    _rliable()  # fail before any work if the report's dependency is missing
    out_dir = out_dir or os.path.join(sweep_dir, "report")
    cells = table(curves, reps=reps, seed=seed)
    schedules = sorted({(c.offline_steps, c.online_steps) for c in curves})
    notes = [
        f"{counts['runs']} seed-runs from {counts['finished']} finished programs "
        f"({counts['programs'] - counts['finished']} not finished)"
        + (
            f"; {counts['superseded']} seed-runs of an older configuration of the same method, "
            "task and seed left out."
            if counts["superseded"]
            else "."
        ),
        "Schedule: "
        + "; ".join(f"{a:,} offline + {b:,} online" for a, b in schedules)
        + " steps (paper: 1,000,000 + 500,000)."
        + ("" if schedules == [(1_000_000, 500_000)] else " Compared by phase, not by step."),
    ]
    text = markdown(cells, title=f"Results: {sweep_dir}", notes=notes, reps=reps)
    files = {
        "markdown": os.path.join(out_dir, "table.md"),
        "csv": os.path.join(out_dir, "table.csv"),
    }
    atomic_write_text(files["markdown"], text)
    atomic_write_text(files["csv"], cells_csv(cells))
    pngs = []
    if plots:
        _, columns = labels_and_columns(curves)
        for col in columns:
            path = os.path.join(out_dir, f"curves-{col}.png")
            plot_curves(curves, col, path, reps=min(reps, 1000), dpi=110)
            pngs.append(path)
    return {"markdown": text, "cells": cells, "files": {**files, "png": pngs}, "counts": counts}
