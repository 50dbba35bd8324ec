"""Official OGBench dataset files, loaded without ever touching the network."""

import dataclasses
import datetime
import glob
import hashlib
import importlib.metadata
import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from ._compat import CAST_WARNING, import_ogbench, make_gym_env
from ._dataset import Dataset, dataset_from_numpy
from ._dense import (
    OGBENCH_CUBE_SUCCESS_THRESHOLD,
    DenseRewardConfig,
    check_dense_reward_version,
    relabel_dense,
    task_goals,
    wrap_dense_reward,
)


DEFAULT_DATASET_DIR = "~/.ogbench/data"
DATASET_DIR_ENV_VARS = ("QAM_DATASET_DIR", "OGBENCH_DATASET_DIR")
DEFAULT_ACTION_CLIP_EPS = 1e-5

# Domain -> dataset types, following the OGBench dataset list.
MANIPULATION_DOMAINS: dict[str, tuple[str, ...]] = {
    **{f"cube-{n}": ("play", "noisy") for n in ("single", "double", "triple", "quadruple")},
    "cube-octuple": ("play", "noisy"),
    "scene": ("play", "noisy"),
    **{f"puzzle-{s}": ("play", "noisy") for s in ("3x3", "4x4", "4x5", "4x6")},
}
LOCOMOTION_DOMAINS: dict[str, tuple[str, ...]] = {
    **{f"pointmaze-{s}": ("navigate", "stitch") for s in ("medium", "large", "giant", "teleport")},
    **{
        f"antmaze-{s}": ("navigate", "stitch", "explore")
        for s in ("medium", "large", "giant", "teleport")
    },
    **{
        f"humanoidmaze-{s}": ("navigate", "stitch")
        for s in ("medium", "large", "giant", "teleport")
    },
    **{f"antsoccer-{s}": ("navigate", "stitch") for s in ("arena", "medium")},
}


class _Dense(NamedTuple):
    """A resolved dense-reward setting: the version (`None`: the task's own reward with a
    non-default threshold) and the full config."""

    version: str | None
    config: DenseRewardConfig


def _is_cube_task(parsed: Any) -> bool:
    return parsed.domain.startswith("cube-")  # state-based cube-* (not visual-cube-*)


class DatasetNotFoundError(FileNotFoundError):
    """An OGBench dataset file is missing. The message names the file, the directory searched
    and the ways out; `qam` never downloads."""


class DatasetFileError(ValueError):
    """An OGBench dataset file exists but cannot be read (corrupt, truncated, wrong keys)."""


class UnknownEnvironmentError(ValueError):
    """The environment name is not a known OGBench single-task environment."""


@dataclasses.dataclass(frozen=True)
class OGBenchName:
    """A parsed OGBench single-task name such as `cube-double-play-singletask-task2-v0`.

    - `name`: the full name;
    - `domain`: e.g. `cube-double` (with a `visual-` prefix where present);
    - `dataset_type`: e.g. `play`, `noisy`, `navigate`, `stitch`, `explore`;
    - `env_id`: the gymnasium id of the single-task environment, e.g.
      `cube-double-singletask-task2-v0`;
    - `base_env_id`: the goal-conditioned environment id used for generation, e.g.
      `cube-double-v0`;
    - `dataset_name`: the file stem, e.g. `cube-double-play-v0`;
    - `task_id`: the task number, or `None` for the default task;
    - `is_manipulation`: cube-*, scene-* and puzzle-* (datasets can be generated locally).
    """

    name: str
    domain: str
    dataset_type: str
    env_id: str
    base_env_id: str
    dataset_name: str
    task_id: int | None
    is_manipulation: bool


def _unknown(name: str, why: str) -> UnknownEnvironmentError:
    domains = ", ".join(
        f"{d} ({'/'.join(t)})" for d, t in {**MANIPULATION_DOMAINS, **LOCOMOTION_DOMAINS}.items()
    )
    return UnknownEnvironmentError(
        f"Unknown OGBench environment {name!r}: {why}. Names look like "
        f"'cube-double-play-singletask-task2-v0' (domain, dataset type, 'singletask', optional "
        f"'taskN', version; a 'visual-' prefix is allowed). Known domains (dataset types): "
        f"{domains}."
    )


def parse_env_name(name: str) -> OGBenchName:
    """Parse an OGBench single-task name; see [`qam.data.OGBenchName`][].

    **Raises:** [`qam.data.UnknownEnvironmentError`][] (listing the known domains and dataset
    types) for anything that is not a known single-task name.
    """
    if not isinstance(name, str) or not name:
        raise _unknown(str(name), "expected a non-empty string")
    splits = name.split("-")
    if "singletask" not in splits:
        raise _unknown(name, "qam trains single-task agents; the name must contain 'singletask'")
    pos = splits.index("singletask")
    if pos < 2 or splits[-1] != "v0":
        raise _unknown(name, "expected '<domain>-<dataset type>-singletask[-taskN]-v0'")
    dataset_type = splits[pos - 1]
    domain = "-".join(splits[: pos - 1])
    bare = domain.removeprefix("visual-")
    table = MANIPULATION_DOMAINS if bare in MANIPULATION_DOMAINS else LOCOMOTION_DOMAINS
    if bare not in table:
        raise _unknown(name, f"unknown domain {domain!r}")
    if dataset_type not in table[bare]:
        raise _unknown(
            name, f"domain {bare!r} has dataset types {list(table[bare])}, not {dataset_type!r}"
        )
    rest = splits[pos + 1 : -1]
    task_id = None
    if rest:
        if len(rest) != 1 or not rest[0].startswith("task") or not rest[0][4:].isdigit():
            raise _unknown(name, f"unexpected task part {'-'.join(rest)!r}")
        task_id = int(rest[0][4:])
        if not 1 <= task_id <= 5:
            raise _unknown(name, f"task ids are 1..5, got {task_id}")
    return OGBenchName(
        name=name,
        domain=domain,
        dataset_type=dataset_type,
        env_id="-".join(splits[: pos - 1] + splits[pos:]),
        base_env_id=f"{domain}-v0",
        dataset_name=f"{domain}-{dataset_type}-v0",
        task_id=task_id,
        is_manipulation=table is MANIPULATION_DOMAINS,
    )


def default_sparse(env_name: str) -> bool:
    """The paper's default for the sparse transform: on for scene-* and puzzle-*."""
    bare = parse_env_name(env_name).domain.removeprefix("visual-")
    return bare.startswith("scene") or bare.startswith("puzzle")


def resolve_dataset_dir(dataset_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """The dataset directory and where it came from.

    Order: the `dataset_dir` argument, then `$QAM_DATASET_DIR`, then `$OGBENCH_DATASET_DIR`,
    then OGBench's default `~/.ogbench/data`. Returns `(absolute path, source)`.
    """
    if dataset_dir is not None:
        return os.path.abspath(os.path.expanduser(os.fspath(dataset_dir))), "`dataset_dir` argument"
    for var in DATASET_DIR_ENV_VARS:
        value = os.environ.get(var)
        if value:
            return os.path.abspath(os.path.expanduser(value)), f"${var}"
    return os.path.abspath(os.path.expanduser(DEFAULT_DATASET_DIR)), "default"


def ogbench_version() -> str:
    try:
        return importlib.metadata.version("ogbench")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "not installed"


def _generate_command(parsed: OGBenchName, directory: str) -> str:
    return (
        f"python -m qam.data.generate --env {parsed.base_env_id} --dataset-type "
        f"{parsed.dataset_type} --episodes 1000 --dir {directory}"
    )


def _not_found(path: str, parsed: OGBenchName, directory: str, source: str) -> DatasetNotFoundError:
    files = f"{parsed.dataset_name}.npz and {parsed.dataset_name}-val.npz"
    lines = [
        f"OGBench dataset file not found: {path}",
        f"Directory searched: {directory} (from the {source}; set it with the `dataset_dir` "
        f"argument, ${DATASET_DIR_ENV_VARS[0]} or ${DATASET_DIR_ENV_VARS[1]}; default "
        f"{DEFAULT_DATASET_DIR}).",
        "qam never downloads datasets. Ways out:",
        f"  1. place the official files {files} in {directory} (OGBench's files from "
        "https://rail.eecs.berkeley.edu/datasets/ogbench/ or its Hugging Face mirror "
        "zhouzypaul/ogbench_datasets, copied in by hand), or point the dataset directory at "
        "a copy;",
    ]
    if parsed.is_manipulation and not parsed.domain.startswith("visual-"):
        lines.append(
            "  2. generate one locally with OGBench's scripted oracles (about 1M transitions "
            "for 1000 episodes; statistically like, not identical to, the official files):\n"
            f"     {_generate_command(parsed, directory)}"
        )
    elif parsed.is_manipulation:
        lines.append(
            "  2. local generation covers state-based manipulation datasets only; pixel "
            "('visual-') datasets need the official files."
        )
    else:
        lines.append(
            "  2. locomotion datasets (pointmaze, antmaze, humanoidmaze, antsoccer) need "
            "OGBench's expert policies, which are not shipped: they cannot be generated "
            "locally, use the official files."
        )
    return DatasetNotFoundError("\n".join(lines))


def _file_record(path: str) -> dict[str, Any]:
    stat = os.stat(path)
    record: dict[str, Any] = {
        "path": path,
        "bytes": stat.st_size,
        "modified": datetime.datetime.fromtimestamp(stat.st_mtime, datetime.UTC).isoformat(),
    }
    sidecar = _sidecar_path(path)
    if os.path.exists(sidecar):
        try:
            with open(sidecar) as f:
                record["generated"] = json.load(f)
        except (OSError, ValueError):
            record["generated"] = "unreadable sidecar"
    return record


def _sidecar_path(npz_path: str) -> str:
    return npz_path.removesuffix(".npz") + ".meta.json"


def _member_header(archive: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an `.npz` archive, read from its header only."""
    with archive.open(name + ".npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(f)
    return shape, dtype


def _check_raw_file(path: str, visual: bool) -> None:
    """Before OGBench reads `path`: the arrays' dtypes are what the format holds (float
    observations, or uint8 for visual tasks; float actions) and `terminals` marks episode
    ends (at least one, and on the last row), so nothing is cast or misread silently. Files
    that are not zip archives are left to the reader's own corruption error."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return
    with archive:
        names = {n.removesuffix(".npy") for n in archive.namelist()}
        if not {"observations", "actions", "terminals"} <= names:
            return  # reported by the reader as a missing array
        try:
            (_, obs_dtype), (_, act_dtype) = (
                _member_header(archive, "observations"),
                _member_header(archive, "actions"),
            )
            with archive.open("terminals.npy") as f:
                terminals = np.lib.format.read_array(f)
        except Exception:  # a damaged member: the reader names the corruption
            return
    expected_obs = "uint8" if visual else "floating-point"
    obs_ok = obs_dtype == np.uint8 if visual else np.issubdtype(obs_dtype, np.floating)
    for key, dtype, ok, expected in (("observations", obs_dtype, obs_ok, expected_obs),
                                     ("actions", act_dtype, np.issubdtype(act_dtype, np.floating),
                                      "floating-point")):  # fmt: skip
        if not ok:
            raise DatasetFileError(
                f"OGBench dataset file {path}: its {key} are {dtype}, expected {expected}; "
                "the file was not written in OGBench's format."
            )
    if terminals.size and (not np.any(terminals) or not terminals[-1]):
        raise DatasetFileError(
            f"OGBench dataset file {path}: its `terminals` array marks "
            f"{int(np.count_nonzero(terminals))} episode ends and "
            f"{'does not end' if not terminals[-1] else 'ends'} with one; OGBench's format marks "
            "the last transition of every episode, including the final row."
        )


def _load_file(path: str, parsed: OGBenchName) -> dict[str, np.ndarray]:
    """`ogbench.load_dataset` (regular format, with qpos/qvel/button_states), with clear
    errors for corrupt or truncated files."""
    ogbench = import_ogbench()
    visual = "visual" in parsed.env_id
    _check_raw_file(path, visual)
    try:
        with open(path, "rb") as fh:  # closed even when the file turns out to be corrupt
            data = ogbench.load_dataset(
                fh,
                ob_dtype=np.uint8 if visual else np.float32,
                action_dtype=np.float32,
                compact_dataset=False,
                add_info=True,
            )
    except Exception as e:  # zipfile.BadZipFile, zlib.error, EOFError, KeyError, pickle, ...
        if isinstance(e, KeyError):
            why = f"missing array {e}; an OGBench file holds observations, actions, terminals"
        else:
            why = f"{type(e).__name__}: {e}"
        raise DatasetFileError(
            f"Cannot read OGBench dataset file {path}: it looks corrupt or truncated ({why}). "
            "Delete it and copy the official file in again, or regenerate it."
        ) from e
    if "qpos" not in data:
        raise DatasetFileError(
            f"OGBench dataset file {path} has no 'qpos' array, which single-task relabelling "
            "needs; it is not an OGBench dataset file."
        )
    if data["observations"].shape[0] == 0:
        raise DatasetFileError(f"OGBench dataset file {path} holds no transitions.")
    return data


def _check_matches_env(raw: dict[str, np.ndarray], env: Any, path: str, env_name: str) -> None:
    """Refuse a file whose observations or actions do not fit `env_name`'s environment (e.g.
    a cube-double file named cube-single), or hold non-finite values, naming the file."""
    with warnings.catch_warnings():  # OGBench builds its float64 boxes on each access
        warnings.filterwarnings("ignore", message=CAST_WARNING)
        expected = {"observations": tuple(env.observation_space.shape),
                    "actions": tuple(env.action_space.shape)}  # fmt: skip
    for key, shape in expected.items():
        got = tuple(raw[key].shape[1:])
        if got != shape:
            raise DatasetFileError(
                f"OGBench dataset file {path} does not match {env_name}: its {key} have shape "
                f"{got} per row, the environment's are {shape}. The file belongs to another "
                "environment; use the file made for this task."
            )
        if np.issubdtype(raw[key].dtype, np.floating) and not np.all(np.isfinite(raw[key])):
            bad = int(np.sum(~np.all(np.isfinite(raw[key].reshape(len(raw[key]), -1)), axis=1)))
            raise DatasetFileError(
                f"OGBench dataset file {path} has non-finite {key} in {bad} rows; the file is "
                "damaged. Regenerate it or copy the official file in again."
            )


def _relabel(
    data: dict[str, np.ndarray],
    parsed: OGBenchName,
    env: Any,
    *,
    sparse: bool,
    action_clip_eps: float | None,
    dense: _Dense | None = None,
) -> dict[str, np.ndarray]:
    from ogbench.relabel_utils import relabel_dataset

    relabel_dataset(parsed.env_id, env, data)  # also resets `env`, which sets the task's goals
    if dense is not None:
        data["rewards"], data["masks"] = relabel_dense(
            data["observations"], data["next_observations"], data["terminals"],
            goals=task_goals(env), version=dense.version, config=dense.config,
        )  # fmt: skip
    if sparse:
        data["rewards"] = np.where(data["rewards"] != 0.0, -1.0, 0.0).astype(np.float32)
    if action_clip_eps is not None:
        lim = 1.0 - action_clip_eps
        data["actions"] = np.clip(data["actions"], -lim, lim).astype(np.float32)
    return data


def reward_definition(env_name: str, *, sparse: bool, dense: _Dense | None = None) -> str:
    """A one-line description of the single-task reward and mask, for run metadata."""
    parsed = parse_env_name(env_name)
    bare = parsed.domain.removeprefix("visual-")
    if dense is not None:
        tau = dense.config.cube_success_threshold
        what = (
            f"dense cube reward {dense.version} (qam.data.dense_reward_{dense.version})"
            if dense.version is not None
            else "OGBench's single-task cube reward r = #cubes at goal - #cubes"
        )
        base = (
            f"{what} of the transition s -> s', read from the float32 observations; success "
            f"and mask = 1 - success(s) with cube_success_threshold = {tau} m"
        )
    elif parsed.is_manipulation:
        base = (
            "OGBench single-task relabelling of the pre-step state: r = #satisfied subtasks - "
            "#subtasks (<= 0), mask = 1 - all subtasks satisfied"
        )
    elif bare.startswith("antsoccer"):
        base = (
            "OGBench single-task relabelling: r = success - 1, mask = 1 - success (ball xy "
            "within goal_tol of the goal)"
        )
    else:
        base = (
            "OGBench single-task relabelling: r = success - 1, mask = 1 - success (agent xy "
            "within goal_tol of the goal)"
        )
    if sparse:
        base += "; then sparse: r <- -1 if r != 0 else 0"
    return base


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What was loaded, for the run record. `to_dict()` gives a JSON-ready dict.

    - `env_name`, `env_id`, `dataset_name`, `dataset_type`, `task_id`: see
      [`qam.data.OGBenchName`][];
    - `ogbench_version`: the installed `ogbench` package version;
    - `reward`: the reward and mask definition (including the sparse transform when used);
    - `sparse`, `action_clip_eps`: the transforms applied;
    - `dataset_dir`, `dataset_dir_source`: where files were looked up and why there;
    - `files`: one record per file read (`path`, `bytes`, `modified`, and `generated` for
      files written by `qam.data.generate`);
    - `num_train`, `num_val`: transitions in the training and validation files (`num_val` is
      counted from the file when it is not loaded, and is 0 when there is no such file);
    - `shard_index`, `num_shards`: for sharded (100M) datasets, else `None`;
    - `dense_reward_version`: the dense cube reward (`v1`-`v9`), or `None` for the task's own;
    - `cube_success_threshold`: the cube success threshold in metres (OGBench's 0.04 unless
      set; cube tasks only, else `None`);
    - `dense_reward_config`: every constant of the dense reward (see
      [`qam.data.DenseRewardConfig`][]) when the reward was relabelled with one, else `None`.
    """

    env_name: str
    env_id: str
    dataset_name: str
    dataset_type: str
    task_id: int | None
    ogbench_version: str
    reward: str
    sparse: bool
    action_clip_eps: float | None
    dataset_dir: str
    dataset_dir_source: str
    files: tuple[dict[str, Any], ...]
    num_train: int
    num_val: int
    shard_index: int | None = None
    num_shards: int | None = None
    dense_reward_version: str | None = None
    cube_success_threshold: float | None = None
    dense_reward_config: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["files"] = [dict(f) for f in self.files]
        return out


class OGBenchData(NamedTuple):
    """What [`qam.data.load_ogbench`][] returns: the single-task `env` (a gymnasium env, or
    `None` when `make_env=False`), the `train` and `val` [`qam.data.Dataset`][]s (`val` is
    `None` when `load_val=False`) and the [`qam.data.DatasetInfo`][] record."""

    env: Any
    train: Dataset
    val: Dataset | None
    info: DatasetInfo


def _resolve_dense(
    env_name: str,
    version: str | None,
    cube_success_threshold: Any,
    config: Any,
) -> _Dense | None:
    """Check the dense-reward options; `None` when the task's own reward is unchanged (no
    version and OGBench's threshold)."""
    check_dense_reward_version(version)
    if config is not None and not isinstance(config, DenseRewardConfig):
        raise ValueError(
            f"dense_reward_config: expected None or a qam.data.DenseRewardConfig, got "
            f"{type(config).__name__}."
        )
    config = DenseRewardConfig() if config is None else config
    if cube_success_threshold is not None:
        t = cube_success_threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not np.isfinite(t) or t <= 0:
            raise ValueError(
                f"cube_success_threshold: expected None or a finite number of metres > 0, "
                f"got {cube_success_threshold!r}."
            )
        config = dataclasses.replace(config, cube_success_threshold=float(t))
    changed = config.cube_success_threshold != OGBENCH_CUBE_SUCCESS_THRESHOLD
    if version is None and not changed:
        return None
    parsed = parse_env_name(env_name)
    if not _is_cube_task(parsed):
        argument = (
            f"dense_reward_version={version!r}"
            if version is not None
            else f"cube_success_threshold={config.cube_success_threshold!r}"
        )
        raise ValueError(
            f"{argument}: dense rewards and the cube success threshold apply to OGBench's "
            f"state-based cube tasks (cube-single/double/triple/quadruple/octuple), not "
            f"{env_name!r}."
        )
    return _Dense(version, config)


def make_env(
    env_name: str,
    *,
    dense_reward_version: str | None = None,
    cube_success_threshold: float | None = None,
    dense_reward_config: DenseRewardConfig | None = None,
    chunk_length: int | None = None,
    **env_kwargs: Any,
) -> Any:
    """The OGBench single-task gymnasium environment for `env_name` (no dataset, no network).

    E.g. `make_env("cube-double-play-singletask-task2-v0")` makes
    `cube-double-singletask-task2-v0`, the environment OGBench pairs with that dataset.

    For a cube task, `dense_reward_version` (`"v1"`-`"v9"`) or a `cube_success_threshold`
    (metres; OGBench's 0.04 by default) other than OGBench's wrap it with
    [`qam.data.wrap_dense_reward`][]: reward, termination and `info["success"]` become the
    dense reward's with that threshold, computed by the same functions that relabel the
    dataset in [`qam.data.load_ogbench`][]. `dense_reward_config` sets the reward's
    constants (its `cube_success_threshold` is replaced by the argument when given);
    `chunk_length` is the length of the executed action chunks, for v8's
    `info["chunk_shaping"]`. Other keyword arguments go to `gymnasium.make`.

    **Raises:** `ValueError` naming the argument for an unknown version, a bad threshold, or
    a dense reward or threshold on a task that is not a state-based cube task.
    """
    import gymnasium

    import_ogbench()  # registers the environments

    parsed = parse_env_name(env_name)
    dense = _resolve_dense(
        env_name, dense_reward_version, cube_success_threshold, dense_reward_config
    )
    if parsed.env_id not in gymnasium.registry:
        raise _unknown(env_name, f"ogbench {ogbench_version()} does not register {parsed.env_id}")
    env = make_gym_env(parsed.env_id, **env_kwargs)
    if dense is None:
        return env
    return wrap_dense_reward(
        env, version=dense.version, config=dense.config, chunk_length=chunk_length
    )


def _resolve_transforms(
    env_name: str, sparse: bool | None, action_clip_eps: float | None | str
) -> tuple[bool, float | None]:
    if sparse is None:
        sparse = default_sparse(env_name)
    if action_clip_eps == "default":
        action_clip_eps = DEFAULT_ACTION_CLIP_EPS
    if action_clip_eps is not None and not 0.0 <= float(action_clip_eps) < 1.0:
        raise ValueError(
            f"action_clip_eps: expected None or a float in [0, 1), got {action_clip_eps!r}."
        )
    return bool(sparse), None if action_clip_eps is None else float(action_clip_eps)


def load_ogbench(
    env_name: str,
    *,
    dataset_dir: str | os.PathLike | None = None,
    sparse: bool | None = None,
    action_clip_eps: float | None | str = "default",
    load_val: bool = True,
    make_env: bool = True,
    dense_reward_version: str | None = None,
    cube_success_threshold: float | None = None,
    dense_reward_config: DenseRewardConfig | None = None,
) -> OGBenchData:
    """Load an OGBench single-task dataset from local files; never downloads.

    Reads `<dataset_dir>/<dataset>.npz` (and `<dataset>-val.npz`) with `ogbench.load_dataset`
    (regular format: `next_observations[i] = observations[i+1]` within a trajectory,
    `terminals` = 1 on each trajectory's last transition), relabels rewards and masks with
    OGBench's own single-task relabelling (`ogbench.relabel_utils.relabel_dataset`), then
    applies the paper's transforms and moves the arrays onto the JAX device.

    **Arguments:**

    - `env_name`: an OGBench single-task name, e.g. `cube-double-play-singletask-task2-v0`,
      `puzzle-3x3-play-singletask-task1-v0`, `antmaze-large-navigate-singletask-task1-v0`.
    - `dataset_dir`: the directory holding the files; defaults to `$QAM_DATASET_DIR`, then
      `$OGBENCH_DATASET_DIR`, then `~/.ogbench/data`.
    - `sparse`: the paper's sparse transform `r ← −1[r ≠ 0]` (0 on full success, −1
      otherwise). `None` (default) uses the paper's choice: on for scene-* and puzzle-*.
    - `action_clip_eps`: clip dataset actions to `±(1 − eps)`; the paper's `1e-5` by default,
      `None` to disable.
    - `load_val`: also load the `-val.npz` split.
    - `make_env`: also return the single-task environment (needed for relabelling anyway).
    - `dense_reward_version`: `None` (the task's own reward) or `"v1"`-`"v9"`, the dense
      cube rewards of [`qam.data.DenseRewardConfig`][]'s module (cube tasks only): rewards
      `r(s_i, s'_i)` and masks `1 − success(s_i)` are recomputed from the observations with
      the functions the returned environment (wrapped by [`qam.data.wrap_dense_reward`][])
      uses online, so offline and online rewards agree exactly. Not combined with `sparse`.
    - `cube_success_threshold`: metres (cube tasks only); `None` keeps the config's,
      OGBench's 0.04 by default. Another value relabels rewards and masks with that
      threshold (OGBench's own reward when `dense_reward_version` is `None`) and sets the
      environment's success check to it.
    - `dense_reward_config`: the dense reward's constants; `None` for the defaults.

    **Returns:**

    A [`qam.data.OGBenchData`][] `(env, train, val, info)`.

    **Raises:**

    - [`qam.data.UnknownEnvironmentError`][] for a name that is not a known single-task name.
    - [`qam.data.DatasetNotFoundError`][] at once when a file is missing, naming it, the
      directory searched and the ways out (place the official files, or generate them
      locally for manipulation domains; locomotion needs the official files).
    - [`qam.data.DatasetFileError`][] for a corrupt or truncated file, naming it.
    - `ValueError` naming the argument for an unknown `dense_reward_version`, a bad
      `cube_success_threshold`, either on a task that is not a state-based cube task, or a
      dense reward together with `sparse=True`.
    """
    parsed = parse_env_name(env_name)
    dense = _resolve_dense(
        env_name, dense_reward_version, cube_success_threshold, dense_reward_config
    )
    if dense is not None and dense.version is not None and sparse:
        raise ValueError(
            f"sparse: the sparse transform r <- -1[r != 0] applies to the task's own reward; "
            f"with dense_reward_version={dense.version!r} pass sparse=None or False, got "
            f"{sparse!r}."
        )
    sparse, action_clip_eps = _resolve_transforms(env_name, sparse, action_clip_eps)
    directory, source = resolve_dataset_dir(dataset_dir)
    paths = [os.path.join(directory, f"{parsed.dataset_name}.npz")]
    if load_val:
        paths.append(os.path.join(directory, f"{parsed.dataset_name}-val.npz"))
    for path in paths:
        if not os.path.isfile(path):
            raise _not_found(path, parsed, directory, source)

    env = _make_env_for(env_name, dense) if make_env else _relabel_env(env_name)
    datasets = []
    try:
        for path in paths:
            raw = _load_file(path, parsed)
            _check_matches_env(raw, env, path, env_name)
            raw = _relabel(
                raw, parsed, env, sparse=sparse, action_clip_eps=action_clip_eps, dense=dense
            )
            datasets.append(dataset_from_numpy(raw, name=os.path.basename(path)))
            del raw
    finally:
        if not make_env:  # the relabelling env is the caller's only when it asked for one
            env.close()
    train = datasets[0]
    val = datasets[1] if load_val else None
    info = _dataset_info(
        env_name, parsed, sparse, action_clip_eps, directory, source, paths,
        num_train=train.size,
        num_val=_count_transitions(directory, parsed) if val is None else val.size,
        dense=dense,
    )  # fmt: skip
    return OGBenchData(env=env if make_env else None, train=train, val=val, info=info)


def _count_transitions(directory: str, parsed: OGBenchName) -> int:
    """Transitions in the validation file without loading it (0 if there is none): OGBench's
    regular format drops each trajectory's last row, so it is the number of non-terminal rows."""
    path = os.path.join(directory, f"{parsed.dataset_name}-val.npz")
    if not os.path.isfile(path):
        return 0
    try:
        with np.load(path) as file:
            return int(np.sum(file["terminals"] == 0))
    except Exception as error:  # a corrupt validation file is named, as a corrupt train file is
        raise DatasetFileError(f"{path}: could not read `terminals` ({error}).") from error


def _dataset_info(
    env_name, parsed, sparse, action_clip_eps, directory, source, paths, dense=None, **counts
) -> DatasetInfo:
    if _is_cube_task(parsed):
        threshold = (
            OGBENCH_CUBE_SUCCESS_THRESHOLD if dense is None else dense.config.cube_success_threshold
        )
        counts.update(cube_success_threshold=threshold)
    if dense is not None:
        counts.update(
            dense_reward_version=dense.version, dense_reward_config=dense.config.to_dict()
        )
    return DatasetInfo(
        env_name=env_name,
        env_id=parsed.env_id,
        dataset_name=parsed.dataset_name,
        dataset_type=parsed.dataset_type,
        task_id=parsed.task_id,
        ogbench_version=ogbench_version(),
        reward=reward_definition(env_name, sparse=sparse, dense=dense),
        sparse=sparse,
        action_clip_eps=action_clip_eps,
        dataset_dir=directory,
        dataset_dir_source=source,
        files=tuple(_file_record(p) for p in paths),
        **counts,
    )


def _make_env_for(env_name: str, dense: _Dense | None = None) -> Any:
    if dense is None:
        return make_env(env_name)
    return make_env(env_name, dense_reward_version=dense.version, dense_reward_config=dense.config)


def _relabel_env(env_name: str) -> Any:
    """A single-task env used only for relabelling (it is reset, never stepped). Not cached:
    a MuJoCo environment holds 150-450 MB (meshes, the IK model, the simulation arena) and
    takes ~0.5 s to build, so the caller closes it once the files are relabelled."""
    return make_env(env_name)


def list_shards(shard_dir: str | os.PathLike) -> list[str]:
    """The shard files of a sharded (e.g. 100M-transition) dataset directory: every `*.npz`
    that is not a `-val.npz`, sorted by name."""
    directory = os.path.abspath(os.path.expanduser(os.fspath(shard_dir)))
    files = sorted(glob.glob(os.path.join(directory, "*.npz")))
    return [f for f in files if not f.endswith("-val.npz")]


def iter_ogbench_shards(
    env_name: str,
    shard_dir: str | os.PathLike,
    *,
    sparse: bool | None = None,
    action_clip_eps: float | None | str = "default",
    cycle: bool = False,
) -> Iterator[tuple[Dataset, DatasetInfo]]:
    """Stream a sharded OGBench dataset (e.g. the 100M-transition datasets: a directory of
    `.npz` shard files) one shard at a time, so memory holds one shard.

    Each shard is read with `ogbench.load_dataset`, relabelled for `env_name`'s task and
    transformed exactly as in [`qam.data.load_ogbench`][]. The next shard is read only when
    the iterator is advanced; drop the previous [`qam.data.Dataset`][] before advancing to
    keep a single shard resident.

    **Arguments:**

    - `env_name`: the single-task name the shards belong to, e.g.
      `cube-quadruple-play-singletask-task1-v0`.
    - `shard_dir`: the directory of shard files (see [`qam.data.list_shards`][]).
    - `sparse`, `action_clip_eps`: as in [`qam.data.load_ogbench`][].
    - `cycle`: restart from the first shard after the last, forever.

    **Yields:** `(dataset, info)` per shard; `info.shard_index` / `info.num_shards` say which.

    **Raises:** [`qam.data.DatasetNotFoundError`][] at once if the directory is missing or
    holds no shard; [`qam.data.DatasetFileError`][] for a corrupt shard, naming it.
    """
    parsed = parse_env_name(env_name)
    sparse, action_clip_eps = _resolve_transforms(env_name, sparse, action_clip_eps)
    directory = os.path.abspath(os.path.expanduser(os.fspath(shard_dir)))
    shards = list_shards(directory) if os.path.isdir(directory) else []
    if not shards:
        raise DatasetNotFoundError(
            f"No OGBench dataset shards (*.npz, excluding *-val.npz) found in {directory}. "
            "qam never downloads datasets. Place the shard files there by hand (the "
            "100M-transition datasets are distributed as directories of .npz shards; see "
            "OGBench's and horizon-reduction's READMEs), or load a single-file dataset with "
            "qam.data.load_ogbench."
        )
    return _shard_iterator(env_name, parsed, shards, directory, sparse, action_clip_eps, cycle)


def _shard_iterator(env_name, parsed, shards, directory, sparse, action_clip_eps, cycle):
    env = _relabel_env(env_name)  # the iterator's own, closed when it ends or is dropped
    try:
        while True:
            for i, path in enumerate(shards):
                raw = _load_file(path, parsed)
                raw = _relabel(raw, parsed, env, sparse=sparse, action_clip_eps=action_clip_eps)
                dataset = dataset_from_numpy(raw, name=os.path.basename(path))
                del raw
                info = _dataset_info(
                    env_name, parsed, sparse, action_clip_eps, directory, "shard_dir argument",
                    [path], num_train=dataset.size, num_val=0, shard_index=i,
                    num_shards=len(shards),
                )  # fmt: skip
                yield dataset, info
                del dataset
            if not cycle:
                return
    finally:
        env.close()


@dataclasses.dataclass(frozen=True)
class ShardHeader:
    """What `inspect_ogbench_shards` reads of one shard file without
    loading its arrays (only `terminals` is read in full).

    - `path`, `name` (the file name), `bytes` (the file size);
    - `rows`: rows in the file; `transitions`: rows of the regular format, i.e. rows that are
      not an episode's last (`terminals == 0`), the size of the loaded [`qam.data.Dataset`][];
    - `fingerprint`: SHA-256 over every member's (name, CRC-32, uncompressed size) from the
      zip's central directory: a change to any array's bytes changes it, and computing it
      reads only the end of the file.
    """

    path: str
    name: str
    bytes: int
    rows: int
    transitions: int
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.bytes, "rows": self.rows,
                "transitions": self.transitions, "fingerprint": self.fingerprint}  # fmt: skip


def _shard_error(path: str, why: str) -> DatasetFileError:
    return DatasetFileError(
        f"OGBench dataset shard {path} {why}. Copy the shard in again (or remove it and start "
        "a new run without it)."
    )


def inspect_ogbench_shards(
    env_name: str, shard_dir: str | os.PathLike, *, env: Any = None
) -> list[ShardHeader]:
    """Check every shard of a sharded dataset directory cheaply, before training: each
    `*.npz` (not `-val.npz`, sorted by name, see [`qam.data.list_shards`][]) must be a
    readable zip archive holding `observations`, `actions`, `terminals` and `qpos` (OGBench's
    single-task relabelling needs it) with one leading size, OGBench's dtypes (float or, for
    visual tasks, uint8 observations; float actions), per-row shapes that fit `env_name`'s
    environment (`env`, or one built for the call when `None`), and `terminals` marking at least one
    episode end, on the last row among them. Only the archive's directory, the arrays'
    headers and `terminals` are read; the other arrays' bytes are checked (by their CRC-32)
    when the shard is loaded.

    **Returns:** one `ShardHeader` per shard, in order.

    **Raises:** [`qam.data.DatasetNotFoundError`][] if the directory is missing or holds no
    shard; [`qam.data.DatasetFileError`][] naming the first shard that fails a check.
    """
    parsed = parse_env_name(env_name)
    directory = os.path.abspath(os.path.expanduser(os.fspath(shard_dir)))
    paths = list_shards(directory) if os.path.isdir(directory) else []
    if not paths:
        raise DatasetNotFoundError(
            f"No OGBench dataset shards (*.npz, excluding *-val.npz) found in {directory}"
            f"{'' if os.path.isdir(directory) else ' (no such directory)'}. qam never downloads "
            "datasets: place the shard files there by hand (the 100M-transition datasets are "
            "directories of .npz shards; see OGBench's and horizon-reduction's READMEs)."
        )
    own = env is None
    env = _relabel_env(env_name) if own else env
    try:
        with warnings.catch_warnings():  # OGBench builds its float64 boxes on each access
            warnings.filterwarnings("ignore", message=CAST_WARNING)
            expected = {"observations": tuple(env.observation_space.shape),
                        "actions": tuple(env.action_space.shape)}  # fmt: skip
    finally:
        if own:  # built for this call; a caller's env stays open
            env.close()
    visual = "visual" in parsed.env_id
    return [_inspect_shard(path, expected, visual) for path in paths]


def _read_shard_headers(path: str, fh: Any) -> tuple[list[zipfile.ZipInfo], dict, np.ndarray]:
    """The archive's members, the headers of the arrays OGBench reads, and `terminals`."""
    try:
        archive = zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, OSError) as error:
        raise _shard_error(path, f"is not a readable .npz archive, truncated or corrupt "
                           f"({type(error).__name__}: {error})") from None  # fmt: skip
    with archive:
        infos = archive.infolist()
        names = {i.filename.removesuffix(".npy") for i in infos}
        missing = [k for k in ("observations", "actions", "terminals", "qpos") if k not in names]
        if missing:
            raise _shard_error(
                path, f"has no {', '.join(missing)} array (it holds {sorted(names)}); an "
                "OGBench file holds observations, actions, terminals, qpos"
            )  # fmt: skip
        try:
            headers = {k: _member_header(archive, k)
                       for k in ("observations", "actions", "terminals", "qpos")}  # fmt: skip
            with archive.open("terminals.npy") as f:
                terminals = np.lib.format.read_array(f)
        except Exception as error:  # zlib.error, BadZipFile (CRC), ValueError (header)
            raise _shard_error(
                path, f"has a damaged array ({type(error).__name__}: {error})"
            ) from None
    return infos, headers, terminals


def _inspect_shard(path: str, expected: dict[str, tuple], visual: bool) -> ShardHeader:
    with open(path, "rb") as fh:  # closed even when the archive turns out to be damaged
        infos, headers, terminals = _read_shard_headers(path, fh)
    rows = {k: (shape[0] if shape else None) for k, (shape, _) in headers.items()}
    if len(set(rows.values())) != 1:
        raise _shard_error(path, f"has arrays of different lengths {rows}")
    (obs_shape, obs_dtype), (act_shape, act_dtype) = headers["observations"], headers["actions"]
    obs_ok = obs_dtype == np.uint8 if visual else np.issubdtype(obs_dtype, np.floating)
    if not obs_ok or not np.issubdtype(act_dtype, np.floating):
        raise _shard_error(
            path, f"has {obs_dtype} observations and {act_dtype} actions, expected "
            f"{'uint8' if visual else 'floating-point'} and floating-point ones"
        )  # fmt: skip
    for key, shape in (("observations", obs_shape), ("actions", act_shape)):
        if tuple(shape[1:]) != expected[key]:
            raise _shard_error(
                path, f"does not fit the environment: its {key} have shape "
                f"{tuple(shape[1:])} per row, the environment's are {expected[key]}"
            )  # fmt: skip
    if terminals.size == 0 or not np.any(terminals) or not terminals[-1]:
        raise _shard_error(
            path, f"has `terminals` marking {int(np.count_nonzero(terminals))} episode ends "
            f"over {terminals.size} rows, expected the last row of every episode, the final "
            "row included"
        )  # fmt: skip
    digest = hashlib.sha256()
    for info in sorted(infos, key=lambda i: i.filename):
        digest.update(f"{info.filename}:{info.CRC:08x}:{info.file_size};".encode())
    return ShardHeader(
        path=path, name=os.path.basename(path), bytes=os.path.getsize(path),
        rows=int(terminals.size), transitions=int(np.count_nonzero(terminals == 0)),
        fingerprint=digest.hexdigest(),
    )  # fmt: skip


def load_ogbench_shard(
    env_name: str,
    path: str | os.PathLike,
    *,
    env: Any,
    sparse: bool | None = None,
    action_clip_eps: float | None | str = "default",
    dense_reward_version: str | None = None,
    cube_success_threshold: float | None = None,
    dense_reward_config: DenseRewardConfig | None = None,
    shard_index: int | None = None,
    num_shards: int | None = None,
) -> tuple[Dataset, DatasetInfo]:
    """Load one shard file as [`qam.data.load_ogbench`][] loads a dataset file: OGBench's
    regular format, the task's single-task relabelling through `env` (the task's
    environment, e.g. from [`qam.data.make_env`][] with the same dense-reward options),
    then the dense reward, sparse transform and action clip, on the device.

    **Returns:** `(dataset, info)`, `info.files` naming this shard and `info.shard_index` /
    `info.num_shards` as given.

    **Raises:** [`qam.data.DatasetFileError`][] naming the shard if it is corrupt or does not
    fit the environment; `ValueError` for bad dense-reward options, as `load_ogbench`.
    """
    parsed = parse_env_name(env_name)
    dense = _resolve_dense(
        env_name, dense_reward_version, cube_success_threshold, dense_reward_config
    )
    sparse, clip = _resolve_transforms(env_name, sparse, action_clip_eps)
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"OGBench dataset shard not found: {path}")
    raw = _load_file(path, parsed)
    _check_matches_env(raw, env, path, env_name)
    raw = _relabel(raw, parsed, env, sparse=sparse, action_clip_eps=clip, dense=dense)
    dataset = dataset_from_numpy(raw, name=os.path.basename(path))
    del raw
    info = _dataset_info(
        env_name, parsed, sparse, clip, os.path.dirname(path), "shard_dir argument", [path],
        dense=dense, num_train=dataset.size, num_val=0, shard_index=shard_index,
        num_shards=num_shards,
    )  # fmt: skip
    return dataset, info
