"""The paper's studies as data, and their expansion into run specifications (pure Python).

A `Study` is methods x tasks x seeds x variants: every variant is a set of setting overrides
applied on top of a preset (`"paper"`: the paper's per-domain settings of each method, or
`"small"`: the CPU demo's). `expand` lists one `RunSpec` per (method, task, variant, seed), in
a fixed order; nothing here needs a method to be registered, so the counts of the paper's
studies are what the paper ran:

| study | methods | tasks | variants | seeds | runs |
|---|---|---|---|---|---|
| `main` | 16 (Table 1) | 50 (10 domains x tasks 1-5) | 1 | 12 | 9,600 |
| `quality` | 9 | 30 (6 `noisy` / `stitch` domains x 5) | 1 | 12 | 3,240 |
| `sensitivity` | QAM-E | 10 (each domain's default task) | 10 | 12 | 1,200 |
| `rlpd` | RLPD (online only) | 50 | 1 | 12 | 600 |

The seeds are the reference scripts' 10001, 20002, ..., 120012. The sensitivity study varies
QAM-E around its per-domain setting: the inverse temperature `inv_temp` times 0.1, 0.3, 3 and 10
(the paper's plot calls these "x tau"), the number of flow steps `flow_steps` (T) in 1, 3, 20,
30, an ensemble of `num_qs = 2` (K) critics, and no gradient clipping (`clip_grad = False`), one
change at a time. The quality study reruns the main settings of a domain on its `noisy`
(manipulation) or `stitch` (navigation) dataset: `scene-noisy` takes `scene-play`'s values.
RLPD trains online only (`offline_steps = 0`).
"""

import dataclasses
import itertools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


__all__ = [
    "MAIN_DOMAINS",
    "MAIN_TASKS",
    "PAPER_METHODS",
    "PAPER_NAMES",
    "PAPER_SEEDS",
    "QUALITY_DOMAINS",
    "QUALITY_METHODS",
    "QUALITY_TASKS",
    "SENSITIVITY_TASKS",
    "STUDIES",
    "RunSpec",
    "Study",
    "Times",
    "Variant",
    "expand",
    "load_study",
    "preset_env",
    "select",
]

#: The reference scripts' seeds: 10001, 20002, ..., 120012.
PAPER_SEEDS: tuple[int, ...] = tuple(10001 * k for k in range(1, 13))

#: The paper's Table 1 methods, by this library's agent names, in the table's order.
PAPER_METHODS: tuple[str, ...] = (
    "rebrac", "fbrac", "bam", "fql", "fawac", "cgql", "cgql-mse", "cgql-linex", "dac", "qsm",
    "dsrl", "fedit", "ifql", "qam", "qam-fql", "qam-edit",
)  # fmt: skip

#: Agent name -> the paper's name of the method (the released curves use these).
PAPER_NAMES: dict[str, str] = {
    "rebrac": "ReBRAC", "fbrac": "FBRAC", "bam": "BAM", "fql": "FQL", "fawac": "FAWAC",
    "cgql": "CGQL", "cgql-mse": "CGQL-M", "cgql-linex": "CGQL-L", "dac": "DAC", "qsm": "QSM",
    "dsrl": "DSRL", "fedit": "FEdit", "ifql": "IFQL", "qam": "QAM", "qam-fql": "QAM-F",
    "qam-edit": "QAM-E", "rlpd": "RLPD",
}  # fmt: skip

#: The main study's domains, in Table 1's column order.
MAIN_DOMAINS: tuple[str, ...] = (
    "antmaze-large-navigate", "antmaze-giant-navigate", "humanoidmaze-medium-navigate",
    "humanoidmaze-large-navigate", "scene-play", "puzzle-3x3-play", "puzzle-4x4-play",
    "cube-double-play", "cube-triple-play", "cube-quadruple-play",
)  # fmt: skip

#: The quality study's domains (the `stitch` / `noisy` datasets of six main domains).
QUALITY_DOMAINS: tuple[str, ...] = (
    "antmaze-large-stitch", "humanoidmaze-medium-stitch", "scene-noisy", "puzzle-3x3-noisy",
    "cube-double-noisy", "cube-triple-noisy",
)  # fmt: skip

#: The methods the quality study reruns.
QUALITY_METHODS: tuple[str, ...] = (
    "qam", "qam-edit", "qam-fql", "rebrac", "fedit", "fql", "qsm", "dsrl", "bam",
)  # fmt: skip


def _tasks(domain: str) -> tuple[str, ...]:
    return tuple(f"{domain}-singletask-task{i}-v0" for i in range(1, 6))


def _default_task(domain: str) -> str:
    """OGBench's default task of a domain: task 1 for the mazes, task 2 for manipulation."""
    return f"{domain}-singletask-task{1 if 'maze' in domain else 2}-v0"


MAIN_TASKS: tuple[str, ...] = tuple(t for d in MAIN_DOMAINS for t in _tasks(d))
QUALITY_TASKS: tuple[str, ...] = tuple(t for d in QUALITY_DOMAINS for t in _tasks(d))
SENSITIVITY_TASKS: tuple[str, ...] = tuple(_default_task(d) for d in MAIN_DOMAINS)

_TASK = re.compile(r"^(?P<domain>.+)-singletask(-task(?P<task>\d+))?-v\d+$")


def domain(task: str) -> str:
    """`cube-double-play-singletask-task2-v0` -> `cube-double-play` (a name without the
    `-singletask-...` suffix is returned as it is)."""
    m = _TASK.match(task)
    return task if m is None else m.group("domain")


def preset_env(task: str) -> str:
    """The task whose domain gives `task` its paper settings: the main study's dataset of the
    same domain (`stitch` -> `navigate`, `noisy` -> `play`, as the reference's quality script
    does); other tasks are their own."""
    return task.replace("-stitch-", "-navigate-").replace("-noisy-", "-play-")


@dataclasses.dataclass(frozen=True)
class Times:
    """A relative override: the preset's value times `factor` (`Times(0.1)` on `inv_temp`)."""

    factor: float

    def apply(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(
                f"`{key}` x{self.factor}: a relative override needs a number, but the setting "
                f"is {value!r}."
            )
        return float(value) * self.factor

    def __str__(self) -> str:
        return f"x{self.factor:g}"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One set of overrides of a study: `label` names it in tables and plots (empty: the
    method's paper name), `overrides` maps a run or agent setting to a value or a `Times`."""

    label: str = ""
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run to make: `method` (an agent name) on `task` with `seeds` (one program), the
    study's preset and overrides (the variant's, then the command line's), and the label the
    report files it under."""

    study: str
    method: str
    task: str
    seeds: tuple[int, ...]
    preset: str = "paper"
    overrides: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    @property
    def name(self) -> str:
        """The label, or the method's paper name, or the method."""
        return self.label or PAPER_NAMES.get(self.method, self.method)


@dataclasses.dataclass(frozen=True)
class Study:
    """Methods x tasks x seeds x variants, on a preset (see the module docstring)."""

    name: str
    methods: tuple[str, ...]
    tasks: tuple[str, ...]
    seeds: tuple[int, ...] = PAPER_SEEDS
    variants: tuple[Variant, ...] = (Variant(),)
    preset: str = "paper"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    about: str = ""

    def __post_init__(self):
        for field in ("methods", "tasks", "seeds", "variants"):
            if not getattr(self, field):
                raise ValueError(f"`Study({field}=...)` must be non-empty; got nothing.")
        if self.preset not in ("paper", "small"):
            raise ValueError(
                f"`Study(preset=...)` must be 'paper' or 'small'; got {self.preset!r}."
            )
        for field in ("methods", "tasks", "seeds"):
            values = getattr(self, field)
            if len(set(values)) != len(values):
                raise ValueError(f"`Study({field}=...)` has duplicates: {list(values)}.")

    def __len__(self) -> int:
        return len(self.methods) * len(self.tasks) * len(self.variants) * len(self.seeds)


def _sensitivity_variants() -> tuple[Variant, ...]:
    out = [Variant(f"QAM-E ({f:g}x tau)", {"inv_temp": Times(float(f))}) for f in (0.1, 0.3, 3, 10)]
    out += [Variant(f"QAM-E (T={t})", {"flow_steps": t}) for t in (1, 3, 20, 30)]
    out += [Variant("QAM-E (K=2)", {"num_qs": 2}), Variant("QAM-E-NOCLIP", {"clip_grad": False})]
    return tuple(out)


#: The paper's studies by name.
STUDIES: dict[str, Study] = {
    "main": Study("main", PAPER_METHODS, MAIN_TASKS,
                  about="Table 1: 16 methods x 50 tasks x 12 seeds, 1M offline + 500K online"),
    "quality": Study("quality", QUALITY_METHODS, QUALITY_TASKS,
                     about="the noisy / stitch datasets: 9 methods x 30 tasks x 12 seeds"),
    "sensitivity": Study("sensitivity", ("qam-edit",), SENSITIVITY_TASKS,
                         variants=_sensitivity_variants(),
                         about="QAM-E's hyperparameters one at a time: 10 variants x 10 tasks"),
    "rlpd": Study("rlpd", ("rlpd",), MAIN_TASKS, overrides={"offline_steps": 0},
                  about="RLPD, online only: 50 tasks x 12 seeds"),
}  # fmt: skip


def expand(study: Study, *, extra: Mapping[str, Any] | None = None) -> list[RunSpec]:
    """One `RunSpec` per (method, task, variant, seed) of `study`, in that nesting order
    (seeds innermost). Overrides apply in order: the study's, the variant's, then `extra`
    (the command line's `--set`); a `preset` key among them replaces the study's preset."""
    out = []
    for method, task, variant in itertools.product(study.methods, study.tasks, study.variants):
        merged = {**study.overrides, **variant.overrides, **(extra or {})}
        preset = merged.pop("preset", study.preset)
        if preset not in ("paper", "small"):
            raise ValueError(f"`preset` must be 'paper' or 'small'; got {preset!r}.")
        items = tuple(sorted(merged.items()))
        for seed in study.seeds:
            out.append(RunSpec(study.name, method, task, (seed,), preset, items, variant.label))
    return out


def select(
    study: Study,
    *,
    methods: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> Study:
    """A slice of `study`: only `methods` (of the study's), `tasks` (full names, or domains
    meaning their tasks in the study) and `seeds` (any). Raises `ValueError` naming what is
    not in the study."""
    changes: dict[str, Any] = {}
    if methods is not None:
        bad = [m for m in methods if m not in study.methods]
        if bad:
            raise ValueError(f"`--methods`: {', '.join(bad)} not in study {study.name!r}, whose "
                             f"methods are {', '.join(study.methods)}.")  # fmt: skip
        changes["methods"] = tuple(dict.fromkeys(methods))
    if tasks is not None:
        chosen: list[str] = []
        for t in tasks:
            hits = [x for x in study.tasks if x == t or domain(x) == t]
            if not hits:
                domains = ", ".join(dict.fromkeys(domain(x) for x in study.tasks))
                raise ValueError(f"`--tasks`: {t!r} is neither a task nor a domain of study "
                                 f"{study.name!r} (its domains: {domains}).")  # fmt: skip
            chosen += hits
        changes["tasks"] = tuple(dict.fromkeys(chosen))
    if seeds is not None:
        changes["seeds"] = tuple(dict.fromkeys(int(s) for s in seeds))
    return dataclasses.replace(study, **changes)


# ---------------------------------------------------------------------- user-defined grids
def _override_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        if set(value) == {"times"}:
            return Times(float(value["times"]))
        raise ValueError(f"an override value may be a plain value or {{'times': x}}; got {value}.")
    if isinstance(value, list):
        return tuple(value)
    return value


def _label(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def study_from_dict(spec: Mapping[str, Any], *, name: str = "grid") -> Study:
    """A user-defined study from a mapping (a JSON or TOML file's content):

    ```
    {"name": "temps", "methods": ["qam"], "tasks": ["cube-double-play"],
     "seeds": 4,                      # a count (the first paper seeds) or a list
     "preset": "paper",               # or "small"
     "set": {"online_steps": 0},      # overrides of every run
     "grid": {"inv_temp": [0.3, 1.0, 3.0], "flow_steps": [5, 10]},  # the product: 6 variants
     "variants": [{"label": "slow", "set": {"inv_temp": {"times": 0.1}}}]}  # and/or listed ones
    ```

    Tasks may be full names or domains (their 5 tasks); `{"times": x}` is a relative override.
    """
    known = {"name", "methods", "tasks", "seeds", "preset", "set", "grid", "variants", "about"}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"study file: unknown keys {sorted(unknown)}; expected {sorted(known)}.")
    for key in ("methods", "tasks"):
        if not spec.get(key):
            raise ValueError(
                f"study file: `{key}` must be a non-empty list; got {spec.get(key)!r}."
            )
    tasks: list[str] = []
    for t in spec["tasks"]:
        tasks += [t] if _TASK.match(t) else list(_tasks(t))
    seeds = spec.get("seeds", len(PAPER_SEEDS))
    if isinstance(seeds, int):
        if not 1 <= seeds <= len(PAPER_SEEDS):
            raise ValueError(f"study file: `seeds` as a count must be in [1, 12]; got {seeds}.")
        seeds = PAPER_SEEDS[:seeds]
    variants: list[Variant] = []
    grid = spec.get("grid") or {}
    if grid:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            chosen = {k: _override_value(v) for k, v in zip(keys, values, strict=True)}
            variants.append(Variant(_label(chosen), chosen))
    for v in spec.get("variants") or []:
        chosen = {k: _override_value(x) for k, x in (v.get("set") or {}).items()}
        variants.append(Variant(v.get("label") or _label(chosen), chosen))
    overrides = {k: _override_value(v) for k, v in (spec.get("set") or {}).items()}
    return Study(
        str(spec.get("name", name)), tuple(spec["methods"]), tuple(dict.fromkeys(tasks)),
        seeds=tuple(int(s) for s in seeds), variants=tuple(variants) or (Variant(),),
        preset=str(spec.get("preset", "paper")), overrides=overrides,
        about=str(spec.get("about", "")),
    )  # fmt: skip


def load_study(name_or_path: str) -> Study:
    """A study by name (`main`, `quality`, `sensitivity`, `rlpd`) or from a `.json` / `.toml`
    file (see `study_from_dict`). Raises `ValueError` for anything else."""
    if name_or_path in STUDIES:
        return STUDIES[name_or_path]
    if name_or_path.endswith((".json", ".toml")):
        if not os.path.isfile(name_or_path):
            raise ValueError(f"STUDY: no such file {name_or_path!r}.")
        stem = os.path.splitext(os.path.basename(name_or_path))[0]
        if name_or_path.endswith(".toml"):
            import tomllib

            with open(name_or_path, "rb") as f:
                return study_from_dict(tomllib.load(f), name=stem)
        with open(name_or_path, encoding="utf-8") as f:
            return study_from_dict(json.load(f), name=stem)
    raise ValueError(f"STUDY must be one of {', '.join(STUDIES)} or a .json / .toml grid file; "
                     f"got {name_or_path!r}.")  # fmt: skip


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as a dict: keys with `-` or `_`; values as JSON where they
    parse (`3`, `0.5`, `true`, `null`, `[8, 8]`), `x0.1` as `Times(0.1)`, `8,8` as a tuple,
    anything else as a string. Raises `ValueError` for an item without `=`."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"`--set` takes KEY=VALUE; got {item!r}.")
        out[key] = parse_value(raw.strip())
    return out


def parse_value(raw: str) -> Any:
    """One `--set` value (see `parse_set`)."""
    m = re.fullmatch(r"x(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", raw)
    if m:
        return Times(float(raw[1:]))
    if raw.lower() in ("none", "null"):
        return None
    if raw.lower() in ("true", "false", "yes", "no"):
        return raw.lower() in ("true", "yes")
    try:
        value = json.loads(raw)
    except ValueError:
        if "," in raw:
            return tuple(parse_value(p.strip()) for p in raw.split(",") if p.strip())
        return raw
    return tuple(value) if isinstance(value, list) else value
