"""Local generation of OGBench manipulation datasets with OGBench's own scripted oracles.

Mirrors OGBench's `data_gen_scripts/generate_manipspace.py` (not shipped in the `ogbench`
wheel): same environments (`terminate_at_goal=False`, `mode='data_collection'`), oracles,
noise parameters, per-episode cube-stacking probabilities, scene health check, stored keys
and dtypes, and the train/validation split, so the files load with `ogbench.load_dataset`
and `ogbench.make_env_and_datasets(..., dataset_path=...)`.
"""

import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import sys
import time
import types
import warnings
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._io import atomic_savez, atomic_write_text
from ._compat import CAST_WARNING, import_ogbench, make_gym_env


GENERATABLE_ENVS = (
    "cube-single-v0",
    "cube-double-v0",
    "cube-triple-v0",
    "cube-quadruple-v0",
    "cube-octuple-v0",
    "scene-v0",
    "puzzle-3x3-v0",
    "puzzle-4x4-v0",
    "puzzle-4x5-v0",
    "puzzle-4x6-v0",
)
DATASET_TYPES = ("play", "noisy")
OGBENCH_MAX_EPISODE_STEPS = 1001  # OGBench: 1001 steps -> 1000 transitions per episode.


@dataclasses.dataclass(frozen=True)
class GeneratedDataset:
    """What [`qam.data.generate_dataset`][] wrote: the `train_path` and `val_path` files,
    the transition counts (rows stored; `ogbench.load_dataset` drops each episode's last row)
    and the generation `metadata` (also written next to the files as `<name>.meta.json`)."""

    train_path: str
    val_path: str
    num_train_steps: int
    num_val_steps: int
    metadata: dict[str, Any]


def dataset_file_stem(env_name: str, dataset_type: str) -> str:
    """`cube-double-v0`, `play` -> `cube-double-play-v0` (OGBench's file naming)."""
    _check_env(env_name, dataset_type)
    return f"{env_name.removesuffix('-v0')}-{dataset_type}-v0"


def _check_env(env_name: str, dataset_type: str) -> None:
    if env_name not in GENERATABLE_ENVS:
        hint = ""
        if isinstance(env_name, str) and ("maze" in env_name or "soccer" in env_name):
            hint = (
                " Locomotion datasets need OGBench's expert policies, which are not shipped; "
                "use the official files."
            )
        elif isinstance(env_name, str) and env_name.startswith("visual-"):
            hint = " Pixel ('visual-') datasets need the official files."
        elif isinstance(env_name, str) and "singletask" in env_name:
            hint = (
                " Pass the goal-conditioned environment, e.g. 'cube-double-v0' for "
                "'cube-double-play-singletask-task2-v0'."
            )
        raise ValueError(
            f"Cannot generate a dataset for {env_name!r}: local generation supports "
            f"{list(GENERATABLE_ENVS)}.{hint}"
        )
    if dataset_type not in DATASET_TYPES:
        raise ValueError(
            f"dataset_type: expected one of {list(DATASET_TYPES)}, got {dataset_type!r}."
        )


def _default_p_random_action(env_name: str, dataset_type: str) -> float:
    # OGBench's commands: noisy cube/scene use 0.1, noisy puzzle 0.2, play 0.
    if dataset_type == "play":
        return 0.0
    return 0.2 if env_name.startswith("puzzle") else 0.1


def _sample_p_stack(env_name: str) -> float:
    # OGBench's per-episode probability of stacking the target cube on another cube.
    if "single" in env_name:
        return 0.0
    if "double" in env_name:
        return float(np.random.uniform(0.0, 0.25))
    if "triple" in env_name:
        return float(np.random.uniform(0.05, 0.35))
    if "quadruple" in env_name:
        return float(np.random.uniform(0.1, 0.5))
    if "octuple" in env_name:
        return float(np.random.uniform(0.0, 0.35))
    return 0.5


def _make_oracles(
    env: Any, env_name: str, oracle: str, noise: float, smoothing: float, min_norm: float
) -> dict[str, Any]:
    from ogbench.manipspace.oracles.markov.button_markov import ButtonMarkovOracle
    from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle
    from ogbench.manipspace.oracles.markov.drawer_markov import DrawerMarkovOracle
    from ogbench.manipspace.oracles.markov.window_markov import WindowMarkovOracle
    from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
    from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

    plan: dict[str, Any] = dict(noise=noise, noise_smoothing=smoothing)
    if env_name.startswith("cube"):
        if oracle == "markov":
            return {"cube": CubeMarkovOracle(env=env, min_norm=min_norm)}
        return {"cube": CubePlanOracle(env=env, **plan)}
    if env_name.startswith("scene"):
        if oracle == "markov":
            return {
                "cube": CubeMarkovOracle(env=env, min_norm=min_norm, max_step=100),
                "button": ButtonMarkovOracle(env=env, min_norm=min_norm),
                "drawer": DrawerMarkovOracle(env=env, min_norm=min_norm),
                "window": WindowMarkovOracle(env=env, min_norm=min_norm),
            }
        return {
            "cube": CubePlanOracle(env=env, **plan),
            "button": ButtonPlanOracle(env=env, **plan),
            "drawer": DrawerPlanOracle(env=env, **plan),
            "window": WindowPlanOracle(env=env, **plan),
        }
    if oracle == "markov":
        button = ButtonMarkovOracle(env=env, min_norm=min_norm, gripper_always_closed=True)
        return {"button": button}
    return {"button": ButtonPlanOracle(env=env, gripper_always_closed=True, **plan)}


@contextlib.contextmanager
def _preserved_global_numpy() -> Iterator[None]:
    """OGBench's oracles draw from numpy's global RNG, which each episode seeds: restore the
    caller's state afterwards."""
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)


def _episode_seed(seed: int, index: int, attempt: int) -> int:
    """The seed of episode `index` (train then validation), retry `attempt`: a function of
    these three numbers only, so episodes do not depend on each other or on the worker."""
    return int(np.random.SeedSequence([seed, index, attempt]).generate_state(1)[0])


class _Progress:
    """tqdm when available, else a line every 10%."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self._bar = None
        self._total, self._desc, self._enabled = total, desc, enabled
        self._n, self._last_pct = 0, -1
        if not enabled:
            return
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="ep", file=sys.stderr)
        except ImportError:
            pass

    def update(self, n: int = 1) -> None:
        self._n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._enabled:
            pct = 100 * self._n // max(self._total, 1)
            if pct // 10 != self._last_pct // 10:
                print(f"{self._desc}: {self._n}/{self._total} episodes", file=sys.stderr)
                self._last_pct = pct

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _task_xyzs(env: Any, task: int) -> tuple[np.ndarray, np.ndarray]:
    """The initial and goal positions (one row per cube) of evaluation task `task` (1-based).

    OGBench defines the tasks (`set_tasks`) only in task mode; read them off a bare holder
    so the data-collection environment is left untouched."""
    unwrapped = env.unwrapped
    holder = types.SimpleNamespace(_env_type=unwrapped._env_type, _reward_task_id=None)
    type(unwrapped).set_tasks(holder)
    task_infos = holder.task_infos
    if not 1 <= task <= len(task_infos):
        raise ValueError(f"task: expected an int in 1..{len(task_infos)}, got {task!r}.")
    info = task_infos[task - 1]
    return (
        np.asarray(info["init_xyzs"], dtype=np.float64),
        np.asarray(info["goal_xyzs"], dtype=np.float64),
    )


def _maybe_task_start(env: Any, ob, info, init_xyzs: np.ndarray | None, fraction: float, p_stack):
    """With probability `fraction`, put the cubes at the task's initial positions (with
    OGBench's task-mode jitter: +-1 cm in x and y, a random yaw) and draw a new target;
    returns the (possibly new) observation and info. Draws nothing when `fraction == 0`."""
    if init_xyzs is None or fraction <= 0.0 or np.random.rand() >= fraction:
        return ob, info
    import mujoco
    from ogbench.manipspace import lie

    unwrapped = env.unwrapped
    for i, xyz in enumerate(init_xyzs):
        pos = xyz.copy()
        pos[:2] += np.random.uniform(-0.01, 0.01, size=2)
        yaw = np.random.uniform(0, 2 * np.pi)
        joint = unwrapped._data.joint(f"object_joint_{i}")
        joint.qpos[:3] = pos
        joint.qpos[3:] = lie.SO3.from_z_radians(yaw).wxyz.tolist()
        joint.qvel[:] = 0.0
    mujoco.mj_forward(unwrapped._model, unwrapped._data)  # pyright: ignore[reportAttributeAccessIssue]
    return unwrapped.set_new_target(p_stack=p_stack)


def _maybe_task_target(env: Any, ob, info, goal_xyzs: np.ndarray | None, fraction: float):
    """With probability `fraction`, move the current target (the block `set_new_target` chose)
    to that block's goal in the evaluation task; returns the (possibly new) observation and
    info. Draws from numpy's global RNG only when `fraction > 0`, so datasets generated
    without a task mixture are unchanged."""
    if goal_xyzs is None or fraction <= 0.0 or np.random.rand() >= fraction:
        return ob, info
    unwrapped = env.unwrapped
    block = int(info["privileged/target_block"])
    unwrapped._data.mocap_pos[unwrapped._cube_target_mocap_ids[block]] = goal_xyzs[block]
    return unwrapped.compute_observation(), unwrapped.get_reset_info()


def _run_episode(
    env, action_space, env_name, oracle, agents, noise, p_random_action, seed: int,
    task_xyzs: tuple[np.ndarray, np.ndarray] | None = None, task_goal_fraction: float = 0.0,
    task_start_fraction: float = 0.0,
) -> dict[str, list]:  # fmt: skip
    np.random.seed(seed)
    ob, info = env.reset(seed=seed)
    action_space.seed(seed)
    p_stack = _sample_p_stack(env_name)
    init_xyzs, goal_xyzs = (None, None) if task_xyzs is None else task_xyzs
    ob, info = _maybe_task_start(env, ob, info, init_xyzs, task_start_fraction, p_stack)
    ob, info = _maybe_task_target(env, ob, info, goal_xyzs, task_goal_fraction)
    xi = float(np.random.uniform(0, noise)) if oracle == "markov" else 0.0
    agent = agents[info["privileged/target_task"]]
    agent.reset(ob, info)
    has_buttons = hasattr(env.unwrapped, "_cur_button_states")
    episode: dict[str, list] = defaultdict(list)
    done = False
    while not done:
        if np.random.rand() < p_random_action:
            action = action_space.sample()
        else:
            action = np.array(agent.select_action(ob, info))
            if oracle == "markov":
                scale = [xi, xi, xi, xi * 3, xi * 10]
                action = action + np.random.normal(0, scale, action.shape)
        action = np.clip(action, -1, 1)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if agent.done:
            agent_ob, agent_info = env.unwrapped.set_new_target(p_stack=p_stack)
            agent_ob, agent_info = _maybe_task_target(
                env, agent_ob, agent_info, goal_xyzs, task_goal_fraction
            )
            agent = agents[agent_info["privileged/target_task"]]
            agent.reset(agent_ob, agent_info)
        episode["observations"].append(ob)
        episode["actions"].append(action)
        episode["terminals"].append(done)
        episode["qpos"].append(info["prev_qpos"])
        episode["qvel"].append(info["prev_qvel"])
        if has_buttons:
            episode["button_states"].append(info["prev_button_states"])
        ob = next_ob
    return episode


def _scene_healthy(episode: dict[str, list]) -> bool:
    # OGBench's check: the cube stays visible unless it is in the drawer.
    block_xyzs = np.asarray(episode["qpos"])[:, 14:17]
    if (block_xyzs[:, 1] >= 0.29).any():
        return False
    too_far_left = (block_xyzs[:, 1] <= -0.3) & (
        (block_xyzs[:, 2] < 0.06) | (block_xyzs[:, 2] > 0.08)
    )
    return not too_far_left.any()


def _episode_arrays(episode: dict[str, list]) -> dict[str, np.ndarray]:
    """One episode's rows as arrays of the stored dtypes."""
    out = {}
    for k, rows in episode.items():
        if k == "terminals":
            dtype = bool
        elif k == "button_states":
            dtype = np.int64
        else:
            dtype = np.float32
        out[k] = np.asarray(rows, dtype=dtype)
    return out


def _to_arrays(episodes: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([ep[k] for ep in episodes]) for k in episodes[0]}


@dataclasses.dataclass(frozen=True)
class _EpisodeSettings:
    """Everything an episode depends on besides its index (picklable, for the workers)."""

    env_name: str
    oracle: str
    seed: int
    max_episode_steps: int
    noise: float
    noise_smoothing: float
    min_norm: float
    p_random_action: float
    task: int | None = None
    task_goal_fraction: float = 0.0
    task_start_fraction: float = 0.0


class _EpisodeGenerator:
    """An environment and its oracles; `episode(i)` is a function of the settings and `i`
    only (each attempt reseeds the environment, its action space and numpy's global RNG)."""

    def __init__(self, settings: _EpisodeSettings):
        s = self.settings = settings
        self.env = make_gym_env(  # quiet about float32 casts on make, reset and step
            s.env_name,
            terminate_at_goal=False,
            mode="data_collection",
            max_episode_steps=s.max_episode_steps,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=CAST_WARNING)
            # OGBench's `action_space` is a property that builds a new, unseeded `Box` on every
            # access: keep one, which each episode seeds, so random actions follow the seed.
            self.action_space = self.env.action_space
        self.agents = _make_oracles(
            self.env, s.env_name, s.oracle, s.noise, s.noise_smoothing, s.min_norm
        )
        self.task_xyzs = None if s.task is None else _task_xyzs(self.env, s.task)

    def episode(self, index: int) -> tuple[dict[str, np.ndarray], int]:
        """Episode `index` and the number of unhealthy (retried) scene episodes before it."""
        s = self.settings
        attempt = 0
        while True:
            episode = _run_episode(
                self.env,
                self.action_space,
                s.env_name,
                s.oracle,
                self.agents,
                s.noise,
                s.p_random_action,
                _episode_seed(s.seed, index, attempt),
                self.task_xyzs,
                s.task_goal_fraction,
                s.task_start_fraction,
            )
            if not s.env_name.startswith("scene") or _scene_healthy(episode):
                return _episode_arrays(episode), attempt
            attempt += 1

    def close(self) -> None:
        self.env.close()


_worker_generator: _EpisodeGenerator | None = None


def _init_worker(settings: _EpisodeSettings) -> None:
    global _worker_generator
    _worker_generator = _EpisodeGenerator(settings)


def _worker_block(start: int, stop: int) -> list[tuple[dict[str, np.ndarray], int]]:
    """Episodes `start..stop-1` in a worker process (set up by `_init_worker`)."""
    assert _worker_generator is not None
    with _preserved_global_numpy():
        return [_worker_generator.episode(i) for i in range(start, stop)]


def _generate_episodes(
    settings: _EpisodeSettings, total: int, workers: int, bar: _Progress
) -> list[tuple[dict[str, np.ndarray], int]]:
    """Episodes `0..total-1` in order, in this process or in `workers` spawned processes."""
    if workers == 1:
        gen = _EpisodeGenerator(settings)
        try:
            with _preserved_global_numpy():
                results = []
                for i in range(total):
                    results.append(gen.episode(i))
                    bar.update()
                return results
        finally:
            gen.close()

    block = max(1, math.ceil(total / (4 * workers)))
    starts = range(0, total, block)
    blocks: dict[int, list[tuple[dict[str, np.ndarray], int]]] = {}
    # Spawn, never fork: the parent may have JAX (or other) threads running.
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(starts)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(settings,),
    )
    try:
        futures = {
            pool.submit(_worker_block, start, min(start + block, total)): start for start in starts
        }
        for future in concurrent.futures.as_completed(futures):
            blocks[futures[future]] = result = future.result()
            bar.update(len(result))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [episode for start in starts for episode in blocks[start]]


def _check_task_mixture(
    env_name: str, task: int | None, goal_fraction: float, start_fraction: float
) -> None:
    for name, value in [
        ("task_goal_fraction", goal_fraction), ("task_start_fraction", start_fraction)
    ]:  # fmt: skip
        if isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name}: expected a float in [0, 1], got {value!r}.")
    if goal_fraction > 0.0 or start_fraction > 0.0:
        if not env_name.startswith("cube"):
            raise ValueError(
                f"task mixture (task_goal_fraction, task_start_fraction): supported for cube-* "
                f"only, got env_name={env_name!r}."
            )
        if isinstance(task, bool) or not isinstance(task, int) or not 1 <= task <= 5:
            raise ValueError(
                f"task: expected an int in 1..5 with a task mixture (task_goal_fraction or "
                f"task_start_fraction > 0), got {task!r}."
            )
    elif task is not None:
        raise ValueError(
            f"task: only meaningful with task_goal_fraction or task_start_fraction > 0 (got "
            f"task={task!r} with both fractions 0)."
        )


def generate_dataset(
    env_name: str,
    dataset_type: str,
    *,
    num_episodes: int,
    out_dir: str | os.PathLike,
    seed: int = 0,
    max_episode_steps: int | None = None,
    num_val_episodes: int | None = None,
    noise: float = 0.1,
    noise_smoothing: float = 0.5,
    min_norm: float = 0.4,
    p_random_action: float | None = None,
    progress: bool = True,
    overwrite: bool = True,
    workers: int = 1,
    task: int | None = None,
    task_goal_fraction: float = 0.0,
    task_start_fraction: float = 0.0,
) -> GeneratedDataset:
    """Generate an OGBench manipulation dataset locally with OGBench's scripted oracles.

    Writes `out_dir/<env>-<type>-v0.npz` and `out_dir/<env>-<type>-v0-val.npz` (e.g.
    `cube-double-play-v0.npz`) in OGBench's own format: `observations` (float32), `actions`
    (float32, clipped to `[−1, 1]`), `terminals` (bool, 1 on each episode's last step), `qpos`,
    `qvel` (float32, the state *before* each action) and, for scene and puzzle,
    `button_states` (int64). Each file is written to a temporary file in `out_dir` and moved
    into place with `os.replace`.

    The dataset is a deterministic function of `seed`, the episode counts and the settings
    below, independent of `workers`: episode `i` (training then validation episodes) and each
    retry of an unhealthy scene episode gets its own seed derived from `(seed, i, attempt)`,
    which seeds the environment, its action space and numpy's global RNG (which OGBench's
    oracles draw from). numpy's global RNG state is restored afterwards.

    Following OGBench's `generate_manipspace.py`:

    - `play`: the plan oracle (`ogbench.manipspace.oracles.plan`) following keyframe plans
      with temporally correlated noise (`noise`, Gaussian-smoothed with `noise_smoothing`);
    - `noisy`: the Markov oracle (`ogbench.manipspace.oracles.markov`) with per-episode
      Gaussian action noise `ξ ~ U(0, noise)`, scaled `(ξ, ξ, ξ, 3ξ, 10ξ)` per action
      dimension, and a random action with probability `p_random_action` (default 0.1 for cube
      and scene, 0.2 for puzzle, as in OGBench's commands; 0 for `play`).

    Tasks are resampled whenever the oracle finishes one (`env.set_new_target`), with OGBench's
    per-episode cube-stacking probability; unhealthy scene episodes are retried.

    **Not in OGBench: a task mixture** (cube-* only), for small datasets on which offline RL
    visibly beats behaviour cloning. With `task` (an evaluation task, 1-5):

    - `task_goal_fraction = p`: each target `set_new_target` draws is, with probability `p`,
      moved to its block's goal position in that task (the block and its yaw are still
      OGBench's random choice). The observation does not contain the target, so behaviour
      cloning reproduces the mixture (it carries the cube to the task's goal about a fraction
      `p` of the time), while a policy steered by a learned Q-function can choose the rewarded
      placement.
    - `task_start_fraction = q`: each episode starts, with probability `q`, with the cubes at
      the task's initial positions (jittered as OGBench's task mode does), so a small dataset
      covers the evaluation's start.

    Both `0` (the default) draw nothing extra and give OGBench's datasets.

    **Arguments:**

    - `env_name`: one of `cube-{single,double,triple,quadruple,octuple}-v0`, `scene-v0`,
      `puzzle-{3x3,4x4,4x5,4x6}-v0`.
    - `dataset_type`: `"play"` or `"noisy"`.
    - `num_episodes`: training episodes (OGBench: 1000 for single/double/scene/3x3/4x4,
      3000 for triple/4x5, 5000 for quadruple/4x6).
    - `out_dir`: output directory (created if needed).
    - `seed`: random seed, an int >= 0.
    - `max_episode_steps`: steps per episode; OGBench's 1001 by default (1000 transitions
      after `ogbench.load_dataset` drops each episode's last step). Small values make tiny
      test datasets.
    - `num_val_episodes`: validation episodes; OGBench's `num_episodes // 10` by default, at
      least 1.
    - `noise`, `noise_smoothing`, `min_norm`, `p_random_action`: OGBench's oracle settings.
    - `progress`: show a progress bar on stderr.
    - `overwrite`: replace existing files; if `False`, raise `FileExistsError`.
    - `task`, `task_goal_fraction`, `task_start_fraction`: the task mixture above (default:
      none).
    - `workers`: number of processes generating episodes. `1` runs in this process; more
      spawn a process pool (each worker builds its own environment and oracles and takes
      blocks of consecutive episodes). The files do not depend on it. As with any spawned
      pool, a script calling this with `workers > 1` needs the `if __name__ == "__main__":`
      guard.

    **Returns:** a [`qam.data.GeneratedDataset`][].
    """
    import_ogbench()  # registers the environments

    _check_env(env_name, dataset_type)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected an int >= 1, got {workers!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}.")
    if not isinstance(num_episodes, int) or num_episodes < 1:
        raise ValueError(f"num_episodes: expected an int >= 1, got {num_episodes!r}.")
    steps = OGBENCH_MAX_EPISODE_STEPS if max_episode_steps is None else int(max_episode_steps)
    if steps < 2:
        raise ValueError(f"max_episode_steps: expected an int >= 2, got {max_episode_steps!r}.")
    if num_val_episodes is None:
        num_val_episodes = max(1, num_episodes // 10)
    if num_val_episodes < 1:
        raise ValueError(f"num_val_episodes: expected an int >= 1, got {num_val_episodes!r}.")
    if p_random_action is None:
        p_random_action = _default_p_random_action(env_name, dataset_type)
    _check_task_mixture(env_name, task, task_goal_fraction, task_start_fraction)

    directory = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    os.makedirs(directory, exist_ok=True)
    stem = dataset_file_stem(env_name, dataset_type)
    train_path = os.path.join(directory, f"{stem}.npz")
    val_path = os.path.join(directory, f"{stem}-val.npz")
    if not overwrite:
        for p in (train_path, val_path):
            if os.path.exists(p):
                raise FileExistsError(f"{p} exists; pass overwrite=True to replace it.")

    oracle = "plan" if dataset_type == "play" else "markov"
    settings = _EpisodeSettings(
        env_name=env_name,
        oracle=oracle,
        seed=seed,
        max_episode_steps=steps,
        noise=noise,
        noise_smoothing=noise_smoothing,
        min_norm=min_norm,
        p_random_action=p_random_action,
        task=task,
        task_goal_fraction=float(task_goal_fraction),
        task_start_fraction=float(task_start_fraction),
    )
    started = time.time()
    total = num_episodes + num_val_episodes
    bar = _Progress(total, stem, progress)
    try:
        results = _generate_episodes(settings, total, workers, bar)
    finally:
        bar.close()
    retries = sum(attempts for _, attempts in results)
    train = _to_arrays([episode for episode, _ in results[:num_episodes]])
    val = _to_arrays([episode for episode, _ in results[num_episodes:]])
    del results
    metadata = {
        "generator": "qam.data.generate",
        "ogbench_version": _ogbench_version(),
        "env_name": env_name,
        "dataset_type": dataset_type,
        "oracle": oracle,
        "seed": seed,
        "num_episodes": num_episodes,
        "num_val_episodes": num_val_episodes,
        "max_episode_steps": steps,
        "noise": noise,
        "noise_smoothing": noise_smoothing,
        "min_norm": min_norm,
        "p_random_action": p_random_action,
        "task": task,
        "task_goal_fraction": float(task_goal_fraction),
        "task_start_fraction": float(task_start_fraction),
        "unhealthy_episode_retries": retries,
        "workers": workers,
        "num_train_steps": int(train["terminals"].shape[0]),
        "num_val_steps": int(val["terminals"].shape[0]),
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
        "seconds": round(time.time() - started, 3),
    }
    # The training file last, an old one removed first: a present training file implies a
    # complete pair, even after a failed or interrupted overwrite.
    if os.path.exists(train_path):
        os.remove(train_path)
    atomic_savez(val_path, val)
    atomic_savez(train_path, train)
    text = json.dumps(metadata, indent=2, sort_keys=True) + "\n"
    for p in (train_path, val_path):
        atomic_write_text(p.removesuffix(".npz") + ".meta.json", text)
    return GeneratedDataset(
        train_path=train_path,
        val_path=val_path,
        num_train_steps=metadata["num_train_steps"],
        num_val_steps=metadata["num_val_steps"],
        metadata=metadata,
    )


def _ogbench_version() -> str:
    from ._ogbench import ogbench_version

    return ogbench_version()
