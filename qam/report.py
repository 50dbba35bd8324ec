"""Reading, plotting and summarising a run's evaluations: `read_eval_curve` (our learning curve
from `eval.csv` / `eval.jsonl` or the trainer's rows), `plot_learning_curve` (a PNG with the
paper's curve for the same task and method beside ours, from `qam.reference`) and `summary` (a
one-screen text summary, also written as `summary.txt` / `summary.json`).

Plain Python + NumPy; matplotlib (for `plot_learning_curve`) is optional and imported only when
used. Files are written atomically.
"""

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from . import reference as _reference
from ._io import atomic_write_bytes, atomic_write_text
from .logging import _read_jsonl, to_python


__all__ = ["plot_learning_curve", "read_eval_curve", "summary"]

StrPath = str | os.PathLike


# ------------------------------------------------------------------------- eval curves
def _number(value: Any) -> float | None:
    """A CSV cell or row value as a float; `None` when blank/missing."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return float(value)
    return float(to_python(value))


def read_eval_curve(
    evals: Sequence[Mapping[str, Any]] | StrPath, *, metric: str = "success"
) -> dict[str, np.ndarray]:
    """Our evaluation curve from `eval.csv` (or `eval.jsonl`), or from rows in memory.

    Rows without `metric` (e.g. a row holding only the behaviour-cloning policy's `bc_success`)
    are skipped; a later row at the same step replaces an earlier one.

    **Arguments:**

    - `evals`: a path to `eval.csv` / `eval.jsonl`, or rows: either flat (as logged, with
        `metric` and `metric/seed<i>` keys) or with `metric` as a per-seed list (as in the
        trainer's `evals`, `{"step": 5000, "success": [0.4, 0.6]}`).
    - `metric`: the metric to read.

    **Returns:**

    A dict with `steps` (`int64`, shape `(N,)`), `mean` (`(N,)`) and `per_seed` (`(N, S)`, NaN
    where a seed's value is missing), sorted by step; `S` is 0 when only means were logged.
    """
    rows = _load_rows(evals)
    by_step: dict[int, tuple[float, list[float]]] = {}
    for row in rows:
        value = row.get(metric)
        if value is None or value == "":
            continue
        step = int(float(row["step"]))
        if isinstance(value, list | tuple | np.ndarray | jax.Array) and np.ndim(value) > 0:
            seeds = [float(v) for v in np.asarray(to_python(value), np.float64).reshape(-1)]
            mean = float(np.mean(seeds))
        else:
            mean = _number(value)
            seeds = []
            i = 0
            while f"{metric}/seed{i}" in row:
                v = _number(row[f"{metric}/seed{i}"])
                seeds.append(math.nan if v is None else v)
                i += 1
        assert mean is not None
        by_step[step] = (mean, seeds)
    steps = sorted(by_step)
    width = max((len(by_step[s][1]) for s in steps), default=0)
    per_seed = np.full((len(steps), width), np.nan)
    for i, s in enumerate(steps):
        seeds = by_step[s][1]
        per_seed[i, : len(seeds)] = seeds
    return {
        "steps": np.asarray(steps, np.int64),
        "mean": np.asarray([by_step[s][0] for s in steps], np.float64),
        "per_seed": per_seed,
    }


def _load_rows(evals: Sequence[Mapping[str, Any]] | StrPath) -> list[Mapping[str, Any]]:
    if isinstance(evals, str | os.PathLike):
        path = os.fspath(evals)
        if path.endswith(".jsonl"):
            return [rec for _, rec in _read_jsonl(path)]
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    return list(evals)


def _last_value(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[int, float] | None:
    """`(step, value)` of the last row with a non-blank `key`."""
    for row in reversed(rows):
        v = row.get(key)
        if v is not None and v != "":
            if isinstance(v, list | tuple):
                v = float(np.mean(v))
            return int(float(row["step"])), float(v)
    return None


def _paper_value(curve: Mapping[str, Any], step: int) -> tuple[float, float, float] | None:
    hits = np.nonzero(curve["steps"] == step)[0]
    if hits.size == 0:
        return None
    i = int(hits[0])
    return float(curve["mean"][i]), float(curve["ci_low"][i]), float(curve["ci_high"][i])


def plot_learning_curve(
    evals: Sequence[Mapping[str, Any]] | StrPath,
    out_path: StrPath,
    *,
    task: str,
    method: str,
    offline_steps: int,
    metric: str = "success",
    scale: float = 100.0,
    title: str | None = None,
    dpi: int = 120,
) -> dict[str, Any]:
    """Plot our learning curve, with the paper's for the same task and method, to a PNG.

    Our success rate: the mean over seeds (thick) and each seed (thin), with a dashed vertical
    line at the offline -> online boundary and, when logged, the behaviour-cloning flow policy's
    success (`bc_success`) as a marker at its step.

    The paper's curve (mean over its 12 seeds and 95% bootstrap band) is drawn when
    `qam.reference.paper_curve(task, method)` has one. Its schedule is 1M offline + 500K online
    steps. When `offline_steps` is also 1M the two curves share one axis; otherwise the paper's
    curve goes in a **second panel on its own axis** (same y-range), because stretching or
    shifting it onto a shorter schedule would pair our step t with a paper step that saw a
    different amount of training, which a side-by-side plot does not pretend.

    Written atomically; draws with matplotlib's Agg renderer directly (no pyplot, no display, the
    global backend untouched).

    **Arguments:**

    - `evals`: a path to `eval.csv` / `eval.jsonl`, or rows (see `read_eval_curve`).
    - `out_path`: the PNG to write.
    - `task`: the OGBench task (for the paper's curve and the title).
    - `method`: the agent (`qam`, `qam-fql`, `qam-edit` or a paper method name).
    - `offline_steps`: where our offline phase ends.
    - `metric`: the logged metric to plot.
    - `scale`: multiplies our values (default 100: logged success rates are fractions in [0, 1]
        and the paper's are percentages); use 1.0 if yours are percentages already.
    - `title`: the figure title (default: task and method).
    - `dpi`: resolution.

    **Returns:**

    A dict: `path` (the PNG), `panels` (1 or 2) and `paper` (whether the paper's curve is drawn).
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise ImportError("plot_learning_curve needs matplotlib: pip install matplotlib") from None
    ours = read_eval_curve(evals, metric=metric)
    bc = _last_value(_load_rows(evals), "bc_" + metric)
    paper = _reference.paper_curve(task, method)
    paper_offline = _reference.PAPER_OFFLINE_STEPS
    shared = paper is not None and offline_steps == paper_offline
    panels = 2 if paper is not None and not shared else 1
    fig = Figure(figsize=(6.4 * panels, 4.2), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False, sharey=True)[0]
    ax = axes[0]
    steps = ours["steps"]
    for j in range(ours["per_seed"].shape[1]):
        ax.plot(steps, scale * ours["per_seed"][:, j], color="C0", lw=0.7, alpha=0.35,
                label="our seeds" if j == 0 else None)  # fmt: skip
    n_seeds = ours["per_seed"].shape[1]
    seeds_text = f", {n_seeds} seed{'s' if n_seeds != 1 else ''}" if n_seeds else ""
    marker = "o" if len(steps) < 30 else None
    ax.plot(steps, scale * ours["mean"], color="C0", lw=2.0, marker=marker, ms=3,
            label=f"ours ({method}{seeds_text})")  # fmt: skip
    if bc is not None:
        ax.plot([bc[0]], [scale * bc[1]], marker="X", ms=8, color="C2", ls="none",
                label="BC flow policy")  # fmt: skip
    ax.axvline(offline_steps, color="gray", ls="--", lw=1.0, label="offline → online")
    ax.set_title("this run" if panels == 2 else "")
    if paper is not None:
        pax = ax if shared else axes[1]
        pax.fill_between(paper["steps"], paper["ci_low"], paper["ci_high"], color="C1",
                         alpha=0.2, lw=0, label="paper 95% CI")  # fmt: skip
        pax.plot(paper["steps"], paper["mean"], color="C1", lw=2.0,
                 label=f"paper ({paper['method']}, {paper['seeds']} seeds)")  # fmt: skip
        if not shared:
            pax.axvline(paper_offline, color="gray", ls="--", lw=1.0, label="offline → online")
            pax.set_title("paper (1M offline + 500K online)")
            pax.set_xlim(0, int(paper["steps"].max()))
    for a in axes:
        a.xaxis.set_major_formatter(EngFormatter(sep=""))
        a.set_xlabel("steps")
        a.set_ylim(-2, 102)
        a.grid(alpha=0.3)
        a.legend(loc="best", fontsize=8)
    axes[0].set_ylabel(f"{metric} rate (%)" if scale == 100.0 else metric)
    right = max([offline_steps, *(int(s) for s in steps[-1:])])
    if shared and paper is not None:
        right = max(right, int(paper["steps"].max()))
    axes[0].set_xlim(0, right * 1.02)
    fig.suptitle(title or f"{task} — {method}", fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(out_path, buffer.getvalue())
    return {"path": os.fspath(out_path), "panels": panels, "paper": paper is not None}


# ------------------------------------------------------------------------- summary
def _stats(values: Any, scale: float) -> dict[str, Any]:
    arr = scale * np.asarray(values, np.float64).reshape(-1)
    return {
        "mean": float(np.mean(arr)),
        "std": float(np.std(arr)),
        "per_seed": [float(v) for v in arr],
    }


def summary(
    run_dir: StrPath,
    *,
    task: str,
    method: str,
    seeds: Sequence[int],
    evals: Sequence[Mapping[str, Any]] | StrPath,
    offline_steps: int,
    online_steps: int,
    bc_success: Any = None,
    wall_time: float | None = None,
    metric: str = "success",
    scale: float = 100.0,
    write: bool = True,
) -> str:
    """A one-screen text summary of a run; also written to `run_dir/summary.txt` and (as data)
    `run_dir/summary.json`, atomically.

    Reports the task, agent, seeds and schedule; our success rate (in percent, mean ± std over
    seeds, `np.std` with `ddof=0`) at the end of the offline phase, at the end, and at its best
    evaluation; the behaviour-cloning flow policy's success if given; the paper's number (mean and
    95% CI) for the same task and method at its offline end (1M) and final (1.5M) step, when it
    has a curve; the wall time; and the files in `run_dir`.

    **Arguments:**

    - `run_dir`: the run directory.
    - `task`, `method`: the OGBench task and the agent (as for `plot_learning_curve`).
    - `seeds`: the seeds, in seed-axis order.
    - `evals`: the evaluations: the trainer's list (`{"step", "success": [per seed], ...}`),
        logged rows, or a path to `eval.csv` / `eval.jsonl`.
    - `offline_steps`, `online_steps`: the schedule.
    - `bc_success`: the BC flow policy's success per seed (or a mean), if evaluated.
    - `wall_time`: seconds the run took (this session), if known.
    - `metric`: the metric to summarise.
    - `scale`: as for `plot_learning_curve` (100: fractions shown as percentages).
    - `write`: write `summary.txt` / `summary.json` (default) or only return the text.

    **Returns:**

    The summary text.
    """
    run_dir = os.fspath(run_dir)
    curve = read_eval_curve(evals, metric=metric)
    n_seeds = len(seeds)

    def at(i: int) -> dict[str, Any]:
        row = curve["per_seed"][i]
        values = row[~np.isnan(row)]
        if values.size:
            stats = _stats(values, scale)
        else:  # only the mean was logged
            stats = {"mean": scale * float(curve["mean"][i]), "std": None, "per_seed": []}
        return {"step": int(curve["steps"][i]), **stats}

    record: dict[str, Any] = {
        "task": task,
        "method": method,
        "paper_method": _reference.canonical_method(method),
        "seeds": [int(s) for s in seeds],
        "offline_steps": int(offline_steps),
        "online_steps": int(online_steps),
        "metric": metric,
        "units": "percent" if scale == 100.0 else f"x{scale}",
        "wall_time_s": None if wall_time is None else float(wall_time),
        "offline_end": None,
        "final": None,
        "best": None,
        "bc": None,
        "paper": None,
    }
    if len(curve["steps"]):
        offline_hits = np.nonzero(curve["steps"] == offline_steps)[0]
        if offline_hits.size:
            record["offline_end"] = at(int(offline_hits[-1]))
        record["final"] = at(len(curve["steps"]) - 1)
        record["best"] = at(int(np.argmax(curve["mean"])))
    if bc_success is not None:
        record["bc"] = _stats(np.asarray(to_python(bc_success), np.float64), scale)
    paper = _reference.paper_curve(task, method)
    if paper is not None:
        paper_offline = _reference.PAPER_OFFLINE_STEPS
        paper_final = int(paper["steps"].max())
        points = {}
        for name, step in (("offline_end", paper_offline), ("final", paper_final)):
            value = _paper_value(paper, step)
            if value is not None:
                points[name] = {"step": step, "mean": value[0], "ci95": [value[1], value[2]]}
        record["paper"] = {"method": paper["method"], "seeds": paper["seeds"], **points}
    files = sorted(
        name + ("/" if os.path.isdir(os.path.join(run_dir, name)) else "")
        for name in (os.listdir(run_dir) if os.path.isdir(run_dir) else [])
        if not name.startswith(".") and not name.endswith(".tmp")
    )
    if write:
        files = sorted(set(files) | {"summary.txt", "summary.json"})
    record["files"] = files

    text = _summary_text(record, n_seeds)
    if write:
        atomic_write_text(os.path.join(run_dir, "summary.json"),
                          json.dumps(to_python(record), indent=2) + "\n")  # fmt: skip
        atomic_write_text(os.path.join(run_dir, "summary.txt"), text)
    return text


def _summary_text(r: Mapping[str, Any], n_seeds: int) -> str:
    unit = "%" if r["units"] == "percent" else ""
    total = r["offline_steps"] + r["online_steps"]
    paper_name = r["paper_method"]
    lines = [
        f"Run summary — {r['task']}",
        f"  agent      {r['method']}" + (f" (paper: {paper_name})" if paper_name else ""),
        f"  seeds      {' '.join(str(s) for s in r['seeds'])} ({n_seeds})",
        f"  steps      {r['offline_steps']:,} offline + {r['online_steps']:,} online = {total:,}",
    ]
    if r["wall_time_s"] is not None:
        lines.append(f"  wall time  {_format_duration(r['wall_time_s'])}")
    lines.append("")
    lines.append(f"{r['metric']} rate ({unit or r['units']}, mean ± std over seeds)")

    def fmt(label: str, s: Mapping[str, Any] | None, step: bool = True) -> None:
        if s is None:
            return
        head = f"  {label:<12}" + (f"(step {s['step']:>9,})  " if step else " " * 18)
        std = "" if s["std"] is None else f" ± {s['std']:.1f}"
        line = f"{head}{s['mean']:5.1f}{std}{unit}"
        if 1 < len(s["per_seed"]) <= 8:
            line += "   [" + " ".join(f"{v:.1f}" for v in s["per_seed"]) + "]"
        lines.append(line)

    fmt("offline end", r["offline_end"])
    fmt("final", r["final"])
    fmt("best", r["best"])
    fmt("BC flow", r["bc"], step=False)
    if r["final"] is None:
        lines.append("  (no evaluations)")
    paper = r["paper"]
    lines.append("")
    if paper is None:
        lines.append(f"paper: no curve for {r['task']} / {r['method']}")
    else:
        lines.append(f"paper ({paper['method']}, {paper['seeds']} seeds, mean [95% CI], "
                     "1M offline + 500K online)")  # fmt: skip
        for name, label in (("offline_end", "offline end"), ("final", "final")):
            p = paper.get(name)
            if p is not None:
                lo, hi = p["ci95"]
                lines.append(f"  {label:<12}(step {p['step']:>9,})  {p['mean']:5.1f}%"
                             f"   [{lo:.1f}, {hi:.1f}]")  # fmt: skip
        if r["offline_steps"] != _reference.PAPER_OFFLINE_STEPS:
            lines.append("  (our schedule differs from the paper's: compare by phase, not step)")
    lines.append("")
    lines.append("files: " + "  ".join(r["files"]))
    return "\n".join(lines) + "\n"


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
