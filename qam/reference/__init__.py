"""The QAM paper's learning curves, shipped with the library for comparison plots.

Facts from the paper's released experiment data (github.com/ColinQiyangLi/qam, `exp_data/`,
12 seeds per task), stored as gzipped CSV next to this module:

- `paper_main_curves.csv.gz`: every (task, method) of the main study, on the `play` /
  `navigate` datasets. Tasks are single tasks (`cube-double-play-singletask-task2-v0`),
  domains (`cube-double-play`, the mean over its 5 tasks) and `all` (the 50 tasks).
- `paper_quality_curves.csv.gz`: the same for the `noisy` (manipulation) and `stitch`
  (navigation) datasets, for a subset of the methods.

Columns: `task, method, step, seeds, success_mean_pct, ci95_low_pct, ci95_high_pct`. One row per
evaluation, every 50K environment steps; the offline phase ends at 1,000,000 steps and the online
phase runs to 1,500,000 (RLPD is online only, so its rows start at 1,050,000). Success rates are
percentages: the mean over seeds and a 95% bootstrap interval of that mean (5000 resamples).
"""

import csv
import functools
import gzip
import importlib.resources
from typing import Any

import numpy as np


__all__ = [
    "PAPER_OFFLINE_STEPS",
    "PAPER_ONLINE_STEPS",
    "available_methods",
    "available_tasks",
    "canonical_method",
    "paper_curve",
]

#: Offline gradient steps of the paper's runs (the online phase starts after them).
PAPER_OFFLINE_STEPS = 1_000_000
#: Online environment steps of the paper's runs (the curves end at 1,500,000).
PAPER_ONLINE_STEPS = 500_000

_FILES = ("paper_main_curves.csv.gz", "paper_quality_curves.csv.gz")

# This library's agent names -> the paper's method names. Other names match the paper's method
# names case-insensitively (`fql` -> `FQL`, `rebrac` -> `ReBRAC`, `cgql-m` -> `CGQL-M`).
_ALIASES = {
    "qam": "QAM",
    "qam-fql": "QAM-F",
    "qam-f": "QAM-F",
    "qam-edit": "QAM-E",
    "qam-e": "QAM-E",
}


@functools.lru_cache(maxsize=1)
def _table() -> dict[tuple[str, str], dict[str, Any]]:
    """`(task, method) -> curve`, read once from the packaged files."""
    out: dict[tuple[str, str], dict[str, list]] = {}
    root = importlib.resources.files(__name__)
    for name in _FILES:
        seen = set(out)  # a (task, method) already read from an earlier file is kept as it was
        with root.joinpath(name).open("rb") as raw, gzip.open(raw, "rt", newline="") as f:
            for row in csv.DictReader(f):
                key = (row["task"], row["method"])
                if key in seen:
                    continue
                curve = out.get(key)
                if curve is None:
                    curve = out[key] = {"steps": [], "mean": [], "low": [], "high": [], "seeds": []}
                curve["steps"].append(int(row["step"]))
                curve["seeds"].append(int(row["seeds"]))
                curve["mean"].append(float(row["success_mean_pct"]))
                curve["low"].append(float(row["ci95_low_pct"]))
                curve["high"].append(float(row["ci95_high_pct"]))
    table = {}
    for (task, method), curve in out.items():
        order = np.argsort(curve["steps"], kind="stable")
        table[(task, method)] = {
            "steps": np.asarray(curve["steps"], np.int64)[order],
            "mean": np.asarray(curve["mean"], np.float64)[order],
            "ci_low": np.asarray(curve["low"], np.float64)[order],
            "ci_high": np.asarray(curve["high"], np.float64)[order],
            "seeds": int(max(curve["seeds"])),
        }
    return table


def available_methods(task: str | None = None) -> list[str]:
    """The paper's method names (sorted), optionally only those with a curve for `task`.

    **Arguments:**

    - `task`: an OGBench task (`cube-double-play-singletask-task2-v0`), a domain
        (`cube-double-play`) or `all`; `None` for every method.

    **Returns:**

    A sorted list of method names as the paper spells them (`QAM-E`, `ReBRAC`, ...).
    """
    return sorted({m for t, m in _table() if task is None or t == task})


def available_tasks(method: str | None = None) -> list[str]:
    """The tasks (and domains, and `all`) with a paper curve, sorted.

    **Arguments:**

    - `method`: only tasks with a curve for this method (any name `paper_curve` accepts);
        `None` for every task.

    **Returns:**

    A sorted list of task names.
    """
    name = None if method is None else canonical_method(method)
    return sorted({t for t, m in _table() if name is None or m == name})


def canonical_method(method: str) -> str | None:
    """The paper's name for `method`, or `None` when the paper has no such method.

    Accepts this library's agent names (`qam` -> `QAM`, `qam-fql` -> `QAM-F`, `qam-edit` ->
    `QAM-E`) and the paper's names in any case, with `_` for `-` (`rebrac` -> `ReBRAC`).
    """
    key = method.strip().lower().replace("_", "-")
    if key in _ALIASES:
        return _ALIASES[key]
    for name in available_methods():
        if name.lower() == key:
            return name
    return None


def paper_curve(task: str, method: str) -> dict[str, Any] | None:
    """The paper's learning curve for one task and method.

    **Arguments:**

    - `task`: an OGBench task (`cube-double-play-singletask-task2-v0`), a domain
        (`cube-double-play`, the mean over its 5 tasks) or `all`.
    - `method`: this library's agent name (`qam`, `qam-fql`, `qam-edit`) or a paper method name
        in any case (`fql`, `rebrac`, `QAM-E`).

    **Returns:**

    `None` when the paper has no curve for this pair; otherwise a dict with

    - `task`, `method`: the names as the paper spells them;
    - `steps`: `int64` array of environment/gradient steps (every 50K, offline up to
        1,000,000, online up to 1,500,000);
    - `mean`: mean success rate over seeds, in **percent**;
    - `ci_low`, `ci_high`: the 95% bootstrap interval of that mean, in percent;
    - `seeds`: the number of seeds (12).

    The arrays are fresh copies; modifying them does not affect later calls.
    """
    name = canonical_method(method)
    if name is None:
        return None
    curve = _table().get((task, name))
    if curve is None:
        return None
    return {
        "task": task,
        "method": name,
        "steps": curve["steps"].copy(),
        "mean": curve["mean"].copy(),
        "ci_low": curve["ci_low"].copy(),
        "ci_high": curve["ci_high"].copy(),
        "seeds": curve["seeds"],
    }
