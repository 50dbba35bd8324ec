"""A run specification resolved to the main job's full configuration, its identity and its
command line.

The main job is `examples/offline_to_online.py`: a `Job` dataclass (the run's settings) plus
the selected agent's config class, both starting from a preset (`preset_defaults`). `resolve`
takes the same starting point (for the paper's preset, the paper settings of the task's domain;
the `noisy` / `stitch` datasets take their `play` / `navigate` domain's), applies the spec's
overrides where the setting exists, and checks the result with the job's own checks. The
identity of a run is the SHA-256 of the canonical JSON (sorted keys, no whitespace, tuples as
lists, floats as Python's shortest round-trip repr) of every setting that changes what is
computed: the job's fields except where files go (`out`, `dataset_dir`, `shard_dir`) and how
progress is shown (`progress`, `tensorboard`, `wandb`), and the agent config's class name and
fields. It is
the same in every process and on every machine, and any changed setting changes it.

The command line passes every one of those settings explicitly (on the `small` preset, which
exists for every task), so the process computes exactly the resolved configuration.
"""

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from ._study import RunSpec, Times, preset_env


__all__ = ["Resolved", "canonical_json", "config_hash", "load_main_job", "resolve"]

#: Job fields that say where files go or how progress shows; not part of a run's identity.
NOT_IDENTITY = ("out", "dataset_dir", "shard_dir", "progress", "tensorboard", "wandb", "preset")
#: Job fields a spec sets itself (overriding them with `--set` is refused).
OWN_FLAGS = {"env": "--tasks", "agent": "--methods", "seeds": "--seeds", "out": "--out",
             "dataset_dir": "--dataset-dir"}  # fmt: skip

DEFAULT_SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "examples", "offline_to_online.py",
)  # fmt: skip


def load_main_job(script: str | None = None) -> ModuleType:
    """The main job's module (`examples/offline_to_online.py` of this checkout, or `script`),
    imported once per process and registered as `offline_to_online`."""
    return _load(os.path.abspath(script or DEFAULT_SCRIPT))


@functools.cache
def _load(path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise ValueError(
            f"the main job script {path} does not exist; sweeps run examples/offline_to_online.py "
            "of a source checkout (pass its path as `script`)."
        )
    name = "offline_to_online"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == path:
        return sys.modules[name]
    folder = os.path.dirname(path)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # tyro reads field comments through the module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def canonical_json(payload: Any) -> str:
    """`payload` as canonical JSON: sorted keys, no whitespace, ASCII, tuples as lists; NaN and
    infinities are refused (they have no JSON form)."""
    return json.dumps(_plain(payload), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)  # fmt: skip


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, bool | int | float | str) or x is None:
        return x
    raise TypeError(f"a run setting must be JSON data; got {type(x).__name__} {x!r}.")


def config_hash(payload: Any) -> str:
    """SHA-256 (hex) of `canonical_json(payload)`."""
    return hashlib.sha256(canonical_json(payload).encode("ascii")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A spec's full configuration: `job` (the main job's fields) and `agent` (the agent
    config's init fields), `agent_class` (its class name), `identity` (what is hashed) and
    `run_id` (the hash)."""

    spec: RunSpec
    job: dict[str, Any]
    agent: dict[str, Any]
    agent_class: str
    applied: frozenset[str]

    @property
    def identity(self) -> dict[str, Any]:
        job = {k: v for k, v in self.job.items() if k not in NOT_IDENTITY}
        return {"job": job, "agent_class": self.agent_class, "agent": self.agent}

    @functools.cached_property
    def run_id(self) -> str:
        return config_hash(self.identity)

    def argv(self, *, out: str, dataset_dir: str | None) -> list[str]:
        """The main job's command line computing exactly this configuration."""
        args = [
            "--env",
            self.job["env"],
            "--agent",
            self.job["agent"],
            "--preset",
            "small",
            "--seeds",
            *(str(s) for s in self.job["seeds"]),
            "--out",
            out,
            "--no-progress",
        ]
        if dataset_dir is not None:
            args += ["--dataset-dir", dataset_dir]
        skip = {"env", "agent", "seeds", "out", "dataset_dir", "preset", "progress"}
        for name, value in self.job.items():
            if name not in skip:
                args += _flag(name, value)
        for name, value in self.agent.items():
            args += _flag(name, value)
        return args


def _flag(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + name.replace("_", "-")]
    if value is None:
        return [flag, "None"]
    if isinstance(value, tuple | list):
        if not value:
            raise ValueError(f"`{name}`: an empty tuple cannot be passed on a command line.")
        return [flag, *(repr(v) if isinstance(v, float) else str(v) for v in value)]
    if isinstance(value, float):
        return [flag, repr(value)]
    return [flag, str(value)]


@functools.lru_cache(maxsize=4096)
def _preset(main: ModuleType, method: str, preset: str, env: str) -> tuple[Any, Any]:
    return main.preset_defaults(method, preset, env)


def _coerce(value: Any, current: Any, key: str) -> Any:
    """`value` in the type of the setting's current value (`8` for a tuple of ints -> `(8,)`,
    `3` for a float -> `3.0`)."""
    if isinstance(value, Times):
        return value.apply(current, key)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"`--set {key}=...` must be true or false; got {value!r}.")
        return value
    if isinstance(current, tuple):
        items = value if isinstance(value, tuple | list) else (value,)
        kinds = {type(c) for c in current}
        if kinds == {int} and all(isinstance(v, int | float) and float(v).is_integer()
                                  for v in items):  # fmt: skip
            return tuple(int(v) for v in items)
        return tuple(items)
    if isinstance(current, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, str) and not isinstance(value, str):
        return str(value)
    return value


def resolve(spec: RunSpec, *, main: ModuleType | None = None) -> Resolved:
    """`spec`'s full configuration (see the module docstring). An override is applied where the
    job or this method's config has the setting and ignored otherwise (`Resolved.applied` says
    which were applied, so a sweep can refuse a key no run has). Raises `ValueError` for an
    unregistered method, a setting a spec owns (`env`, `agent`, `seeds`, `out`, `dataset_dir`)
    and a value the job's or the agent's checks reject."""
    main = main or load_main_job()
    if spec.method not in main.AGENTS:
        raise ValueError(f"method {spec.method!r} is not a registered agent; registered: "
                         f"{', '.join(main.AGENTS)}.")  # fmt: skip
    env = preset_env(spec.task) if spec.preset == "paper" else spec.task
    job, config = _preset(main, spec.method, spec.preset, env)
    config_class = main.AGENTS[spec.method].config_class
    job_fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job)}
    agent_fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config_class)
                    if f.init}  # fmt: skip
    job_fields.update(env=spec.task, agent=spec.method, seeds=tuple(spec.seeds))
    if spec.preset == "paper":  # the domain's reward transform, said explicitly
        from ..agents import DOMAINS, domain_of

        job_fields["sparse"] = "yes" if DOMAINS[domain_of(env)]["sparse"] else "no"
    applied = set()
    for key, value in spec.overrides:
        if key in OWN_FLAGS:
            raise ValueError(f"`--set {key}=...`: {key} is set with {OWN_FLAGS[key]}.")
        target = job_fields if key in job_fields else agent_fields if key in agent_fields else None
        if target is None:
            continue
        target[key] = _coerce(value, target[key], key)
        applied.add(key)
    try:
        checked = config_class(**agent_fields)
        main.build_configs(type(job)(**job_fields), checked)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{spec.method} on {spec.task}: {error}") from None
    agent_fields = {f.name: getattr(checked, f.name) for f in dataclasses.fields(config_class)
                    if f.init}  # fmt: skip
    return Resolved(spec, job_fields, agent_fields, config_class.__name__, frozenset(applied))
