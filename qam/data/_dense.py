r"""Dense, shaped rewards `v1`-`v9` for the OGBench cube tasks: pure numpy functions of the
cube state, used unchanged to relabel offline datasets, to reward online interaction and to
count success in evaluation, so the three always agree.

**State.** A [`qam.data.CubeState`][] is read from OGBench's state observation (the float32
row a dataset stores, or the environment's observation cast to float32, the way the replay
buffer stores it), never from the simulator's float64 internals, so an offline row and the
online step that produced it give bit-identical rewards. For `n` cubes the observation holds
`19 + 9n` entries; with OGBench's centre `o = (0.425, 0, 0)` m and scale 10:

| entries | content | read as |
|---|---|---|
| `12:15` | `10 (e − o)`, the pinch site | `effector` `e` (m) |
| `17` | `3 × gripper_opening` (0 open, ≈0.56 on a cube, ≈0.98 shut) | `closure` |
| `18` | pad contact force / 50, clipped to `[0, 1]` | `contact` |
| `19+9i : 22+9i` | `10 (c_i − o)`, cube `i`'s centre | `cubes[i]` `c_i` (m) |

The goals `g_i` are the task's target positions (the environment's target mocap bodies,
fixed per task because OGBench's single-task cube environments do not permute the cubes);
`c⁰_i` are the cube positions of the episode's first observation (the actual reset state
online, each dataset episode's first row offline).

**Per-cube quantities** (threshold `τ = cube_success_threshold`, OGBench's 0.04 m by default;
all distances Euclidean in 3-D, written out component by component so that a batch of rows
and a single row round identically):

- at goal: `d_i = ‖c_i − g_i‖ ≤ τ`; success: every cube at goal (OGBench's cube check);
- place progress (threshold-aware saturation):
  `q_i = 1` if `d_i ≤ τ`, else `clip(1 − (d_i − τ) / max(d⁰_i − τ, progress_min_distance), 0, 1)`
  with `d⁰_i = ‖c⁰_i − g_i‖` (0 at the episode's start, 1 within the threshold);
- reach progress: `ρ_i = clip(1 − (‖e − c_i‖ − reach_radius) / reach_scale, 0, 1)` (1 within
  `reach_radius`); reached: `‖e − c_i‖ ≤ reach_radius`;
- grasped: `contact ≥ grasp_contact` and `closure ∈ [grasp_closure_min, grasp_closure_max]`
  and `‖e − c_i‖ ≤ grasp_radius` (the fingers press on something, are neither open nor shut
  on nothing, and the cube is between them).

**Staged potentials** `P ∈ [0, 1]` (`= 1` exactly when every cube is complete). Cubes are
worked on in index order (for OGBench's stacking tasks that is bottom to top); the *active*
cube `a` is the first incomplete one and `u_a` its stage score; `P = (#complete + u_a) / n`:

- `P2` (continuous progress): `P2 = mean_i q_i`;
- `P3` (reach, then place; complete = at goal): `u_a = (1 + q_a)/2` once reached, else
  `ρ_a/2`;
- `P6` (move to object, grasp, move to goal, release; complete = at goal and not grasped):
  `u_a = 3/4` grasped at its goal, `(2 + q_a)/4` grasped, `1/4` reached, else `ρ_a/4`;
- `P7` (move to object, grasp, move to goal; complete = at goal): `u_a = (2 + q_a)/3`
  grasped, `1/3` reached, else `ρ_a/3`.

`P7`'s substage of the active cube (0 move to object, 1 grasp, 2 move to goal) gives the
stage penalty `stage_penalties[stage] × #incomplete cubes` (`−3, −2, −1` per cube by
default), 0 once every cube is at its goal.

**Rewards** of the transition `s → s'` (`prev → cur`). Following OGBench's single-task cube
environments (`success_timing='pre'`), the level terms, the success bonus and the episode's
end are those of the state the action is taken in, `s`: the transition out of a success
state is the terminal one (the environment terminates there and the dataset's mask is 0), it
is paid `success_bonus` once, and every level term is ≤ 0 and 0 only at success, so lingering
short of the goal never pays (the potential terms telescope: their sum is bounded by `λ`).
With `base(s) = #cubes at goal − n` (OGBench's own reward),
`B = success_bonus · 1[success(s)]`, `λ = shaping_lambda`, `γ = shaping_gamma`:

| version | `r(s, s')` |
|---|---|
| v1 | `base(s) + B` (count-based progress) |
| v2 | `n (P2(s) − 1) + B` |
| v3 | `n (P3(s) − 1) + B` |
| v4 | `base(s) + λ (γ P2(s') − P2(s)) + B` |
| v5 | `base(s) + λ (γ P3(s') − P3(s)) + B` |
| v6 | `base(s) + λ (γ P6(s') − P6(s)) + B` |
| v7 | `stage(s) + λ (γ P7(s') − P7(s)) + B` |
| v8 | `stage(s) + λ (γ P7(s') − P7(s)) + release(s, s') + B` |
| v9 | `stage(s) + B` |

with `release(s, s') = Σ_i 1[grasped_i(s) ∧ ¬grasped_i(s')] · (release_bonus if
‖c_i(s') − g_i‖ ≤ release_radius else −release_penalty)`.

**v8's chunk-aligned shaping.** Online and in evaluation an action chunk of `k` steps is
executed open-loop from `s_t` (chunks start at every reset, so at `t = 0, k, 2k, …`), and the
shaping of that chunk is `F = λ (γ^k P(s_{t+k}) − P(s_t))`. The per-step potential term above
*is* that shaping spread over the chunk: with `γ` the critic's discount,
`Σ_{i<k} γ^i λ (γ P(s_{t+i+1}) − P(s_{t+i})) = λ (γ^k P(s_{t+k}) − P(s_t))` (exactly, up to
rounding) for every window. So the replay buffer and the offline dataset store the same
per-step rewards, the sequence sampler (whose chunk return is `Σ_i γ^i r_{j+i}`) gives every
sampled chunk its telescoped shaping without any change, and a chunk cut short by the
episode's end after `m < k` steps gets `λ (γ^m P(s_end) − P(s_t))`, the same as the sampler's
chunks that stop at
an episode boundary. The environment of [`qam.data.wrap_dense_reward`][] reports `F` of each
executed chunk in `info["chunk_shaping"]` at the chunk's last step. The trainer sets `γ` to the
agent's discount for every version, so per step v8's potential term is v7's; what v8 adds is
the release event. At the terminal transition the potential of `s'` still enters (`P(s') ≈ 1`):
the shaping adds `λ γ^{T+1} P(s_{T+1})` to a successful episode's discounted return, a small
extra reward for finishing sooner.
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import numpy as np


DENSE_REWARD_VERSIONS = ("v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9")
OGBENCH_CUBE_SUCCESS_THRESHOLD = 0.04  # m, OGBench's `CubeEnv._compute_successes`

# OGBench's state observation of the cube environments (`CubeEnv.compute_observation`).
_XYZ_CENTER = (0.425, 0.0, 0.0)
_XYZ_SCALE = 10.0
_GRIPPER_SCALE = 3.0
_EFFECTOR = slice(12, 15)
_CLOSURE = 17
_CONTACT = 18
_PROPRIO_DIM = 19
_PER_CUBE = 9


@dataclasses.dataclass(frozen=True)
class DenseRewardConfig:
    """The constants of the dense cube rewards (see the module docstring for the formulas).

    - `cube_success_threshold`: `τ`, metres; a cube is at its goal when its centre is within
      `τ` of the goal (OGBench: 0.04 m). Also the environment's success check.
    - `success_bonus`: reward paid on the terminal transition (the one out of a success
      state), reward units.
    - `shaping_lambda`: `λ`, reward units per unit of potential (potentials lie in `[0, 1]`).
    - `shaping_gamma`: `γ` of the potential terms; it must be the critic's discount for the
      chunk identity of v8 (the trainer passes the agent's `discount`).
    - `progress_min_distance`: metres; the smallest normaliser `d⁰ − τ` of place progress
      (a cube that starts at, or near, its goal).
    - `reach_radius`: metres; the effector has reached a cube within this distance.
    - `reach_scale`: metres; reach progress falls from 1 to 0 over this distance beyond
      `reach_radius`.
    - `grasp_radius`: metres; a grasped cube's centre is within this distance of the pinch
      site (it sits between the fingers: 2-6 mm in OGBench's play data).
    - `grasp_contact`: the pad contact signal (force / 50 N, in `[0, 1]`) at or above which
      the fingers press on something (≈1 on a cube, ≈0.34 closed on nothing).
    - `grasp_closure_min`, `grasp_closure_max`: the closure (0 open, 1 shut) of a grasp:
      ≈0.56 on a cube, ≈0.98 closed on nothing.
    - `release_radius`: metres; a cube released within this distance of its goal earns
      `release_bonus`, farther away `−release_penalty` (v8), reward units.
    - `stage_penalties`: per-step penalty per incomplete cube in the substages move to
      object, grasp, move to goal (v7-v9), reward units.
    """

    cube_success_threshold: float = OGBENCH_CUBE_SUCCESS_THRESHOLD
    success_bonus: float = 10.0
    shaping_lambda: float = 10.0
    shaping_gamma: float = 0.99
    progress_min_distance: float = 0.1
    reach_radius: float = 0.03
    reach_scale: float = 0.5
    grasp_radius: float = 0.02
    grasp_contact: float = 0.5
    grasp_closure_min: float = 0.2
    grasp_closure_max: float = 0.9
    release_radius: float = 0.06
    release_bonus: float = 5.0
    release_penalty: float = 5.0
    stage_penalties: tuple[float, float, float] = (-3.0, -2.0, -1.0)

    def __post_init__(self):
        for name, ok, expected in self._checks():
            if not ok:
                raise ValueError(
                    f"DenseRewardConfig.{name}: expected {expected}, got {getattr(self, name)!r}."
                )

    def _checks(self) -> list[tuple[str, bool, str]]:
        def finite(x: Any) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

        positive = "a finite number > 0"
        checks = [
            (name, finite(getattr(self, name)) and getattr(self, name) > 0, positive)
            for name in ("cube_success_threshold", "progress_min_distance", "reach_radius",
                         "reach_scale", "grasp_radius", "release_radius")
        ]  # fmt: skip
        checks += [
            (name, finite(getattr(self, name)) and getattr(self, name) >= 0, "a finite number >= 0")
            for name in ("success_bonus", "shaping_lambda", "release_bonus", "release_penalty")
        ]
        gamma, contact = self.shaping_gamma, self.grasp_contact
        lo, hi = self.grasp_closure_min, self.grasp_closure_max
        checks += [
            ("shaping_gamma", finite(gamma) and 0 <= gamma <= 1, "a number in [0, 1]"),
            ("grasp_contact", finite(contact) and 0 < contact <= 1, "a number in (0, 1]"),
            ("grasp_closure_min", finite(lo) and 0 <= lo <= 1, "a number in [0, 1]"),
            ("grasp_closure_max", finite(hi) and finite(lo) and lo <= hi <= 1,
             "a number in [grasp_closure_min, 1]"),
            ("stage_penalties",
             isinstance(self.stage_penalties, tuple) and len(self.stage_penalties) == 3
             and all(finite(p) and p <= 0 for p in self.stage_penalties),
             "a tuple of 3 finite numbers <= 0 (move to object, grasp, move to goal)"),
        ]  # fmt: skip
        return checks

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["stage_penalties"] = list(self.stage_penalties)
        return out


class CubeState(NamedTuple):
    """The state the dense rewards read, for any leading batch shape `...`:

    - `cubes`: cube centres `(..., n, 3)`, metres;
    - `effector`: the pinch site `(..., 3)`, metres;
    - `closure`: gripper closure `(...,)`, 0 open to 1 shut (OGBench's `gripper_opening`);
    - `contact`: pad contact signal `(...,)` in `[0, 1]`.
    """

    cubes: Any
    effector: Any
    closure: Any
    contact: Any


def num_cubes_of(observation_dim: int) -> int:
    """The number of cubes of an OGBench cube state observation of `observation_dim` entries
    (`19 + 9n`); `ValueError` for any other size."""
    n, rest = divmod(int(observation_dim) - _PROPRIO_DIM, _PER_CUBE)
    if n < 1 or rest:
        raise ValueError(
            f"observations: expected OGBench cube state observations of 19 + 9n entries "
            f"(n cubes), got {observation_dim}."
        )
    return n


def cube_state_from_observations(observations: Any) -> CubeState:
    """The [`qam.data.CubeState`][] of OGBench cube state observations `(..., 19 + 9n)`.

    The observations are rounded to float32 first (what a dataset and the replay buffer
    store), then decoded in float64: `x = obs / 10 + o` for positions and `obs[17] / 3` for
    the closure (see the module docstring for the layout)."""
    obs = np.asarray(np.asarray(observations, dtype=np.float32), dtype=np.float64)
    n = num_cubes_of(obs.shape[-1])
    center = np.asarray(_XYZ_CENTER, dtype=np.float64)
    cubes = np.stack(
        [obs[..., _PROPRIO_DIM + _PER_CUBE * i : _PROPRIO_DIM + _PER_CUBE * i + 3]
         for i in range(n)], axis=-2,
    )  # fmt: skip
    return CubeState(
        cubes=cubes / _XYZ_SCALE + center,
        effector=obs[..., _EFFECTOR] / _XYZ_SCALE + center,
        closure=obs[..., _CLOSURE] / _GRIPPER_SCALE,
        contact=obs[..., _CONTACT],
    )


# ----------------------------------------------------------------------------- pieces
def _distance(a: Any, b: Any) -> np.ndarray:
    """`‖a − b‖` over the last axis (of size 3), summed in a fixed order."""
    d0, d1, d2 = (a[..., j] - b[..., j] for j in range(3))
    return np.asarray(np.sqrt(d0 * d0 + d1 * d1 + d2 * d2))


def _per_cube(f, n: int) -> np.ndarray:
    return np.stack([np.asarray(f(i)) for i in range(n)], axis=-1)


def _count(flags: Any) -> np.ndarray:
    """`Σ_i flags[..., i]` as float64, cube by cube in index order."""
    total = np.zeros(flags.shape[:-1])
    for i in range(flags.shape[-1]):
        total = total + flags[..., i].astype(np.float64)
    return np.asarray(total)


def cube_distances(state: CubeState, goals: Any) -> np.ndarray:
    """`d_i = ‖c_i − g_i‖`, `(..., n)`, metres."""
    goals = np.asarray(goals, dtype=np.float64)
    n = state.cubes.shape[-2]
    return _per_cube(lambda i: _distance(state.cubes[..., i, :], goals[..., i, :]), n)


def cube_successes(state: CubeState, goals: Any, config: DenseRewardConfig) -> np.ndarray:
    """Cube `i` at its goal, `d_i ≤ τ`, `(..., n)` bool."""
    return cube_distances(state, goals) <= config.cube_success_threshold


def task_success(state: CubeState, goals: Any, config: DenseRewardConfig) -> np.ndarray:
    """Every cube at its goal, `(...,)` bool: OGBench's cube success with threshold `τ`."""
    return np.asarray(np.all(cube_successes(state, goals, config), axis=-1))


def _effector_distances(state: CubeState) -> np.ndarray:
    n = state.cubes.shape[-2]
    return _per_cube(lambda i: _distance(state.effector, state.cubes[..., i, :]), n)


def grasped(state: CubeState, config: DenseRewardConfig) -> np.ndarray:
    """Cube `i` held in the gripper, `(..., n)` bool (see the module docstring)."""
    holding = (
        (state.contact >= config.grasp_contact)
        & (state.closure >= config.grasp_closure_min)
        & (state.closure <= config.grasp_closure_max)
    )
    return (_effector_distances(state) <= config.grasp_radius) & np.asarray(holding)[..., None]


def place_progress(
    state: CubeState, goals: Any, initial_cubes: Any, config: DenseRewardConfig
) -> np.ndarray:
    """`q_i`, `(..., n)` in `[0, 1]`: 1 within `τ` of the goal, 0 at the episode's start."""
    tau = config.cube_success_threshold
    d = cube_distances(state, goals)
    d0 = cube_distances(CubeState(np.asarray(initial_cubes, np.float64), None, None, None), goals)
    scale = np.maximum(d0 - tau, config.progress_min_distance)
    return np.asarray(np.where(d <= tau, 1.0, np.clip(1.0 - (d - tau) / scale, 0.0, 1.0)))


def reach_progress(state: CubeState, config: DenseRewardConfig) -> np.ndarray:
    """`ρ_i`, `(..., n)` in `[0, 1]`: 1 within `reach_radius` of cube `i`."""
    excess = _effector_distances(state) - config.reach_radius
    return np.asarray(np.clip(1.0 - excess / config.reach_scale, 0.0, 1.0))


def _active(values: Any, index: Any) -> np.ndarray:
    return np.asarray(np.take_along_axis(values, index[..., None], axis=-1)[..., 0])


def _staged(complete: Any, stage_score: Any) -> np.ndarray:
    """`(#complete + u_a) / n` with `a` the first incomplete cube; 1 when all are complete."""
    n = complete.shape[-1]
    index = np.argmax(~complete, axis=-1)
    done = np.all(complete, axis=-1)
    return np.asarray(np.where(done, 1.0, (_count(complete) + _active(stage_score, index)) / n))


def potential_v2(state, goals, initial_cubes, config) -> np.ndarray:
    """`P2 = mean_i q_i`: continuous distance-to-goal progress."""
    q = place_progress(state, goals, initial_cubes, config)
    return np.asarray(_count(q) / q.shape[-1])


def potential_v3(state, goals, initial_cubes, config) -> np.ndarray:
    """`P3`: staged sequential progress, reach then place, of the active cube."""
    q = place_progress(state, goals, initial_cubes, config)
    rho = reach_progress(state, config)
    reached = _effector_distances(state) <= config.reach_radius
    score = np.where(reached, (1.0 + q) / 2.0, rho / 2.0)
    return _staged(cube_successes(state, goals, config), score)


def potential_v6(state, goals, initial_cubes, config) -> np.ndarray:
    """`P6`: pick-place progress in four substages (move to object, grasp, move to goal,
    release); a cube is complete once it rests at its goal, released."""
    q = place_progress(state, goals, initial_cubes, config)
    rho = reach_progress(state, config)
    held = grasped(state, config)
    at_goal = cube_successes(state, goals, config)
    reached = _effector_distances(state) <= config.reach_radius
    score = np.where(
        held & at_goal, 0.75,
        np.where(held, (2.0 + q) / 4.0, np.where(reached, 0.25, rho / 4.0)),
    )  # fmt: skip
    return _staged(at_goal & ~held, score)


def _v7_parts(state, goals, initial_cubes, config) -> tuple[np.ndarray, np.ndarray]:
    """`(P7, stage penalty)` of `state`."""
    q = place_progress(state, goals, initial_cubes, config)
    rho = reach_progress(state, config)
    held = grasped(state, config)
    complete = cube_successes(state, goals, config)
    reached = _effector_distances(state) <= config.reach_radius
    score = np.where(held, (2.0 + q) / 3.0, np.where(reached, 1.0 / 3.0, rho / 3.0))
    stage = np.where(held, 2, np.where(reached, 1, 0))
    index = np.argmax(~complete, axis=-1)
    per_cube = np.asarray(config.stage_penalties, dtype=np.float64)[_active(stage, index)]
    incomplete = complete.shape[-1] - _count(complete)
    penalty = np.where(np.all(complete, axis=-1), 0.0, per_cube * incomplete)
    return _staged(complete, score), np.asarray(penalty)


def potential_v7(state, goals, initial_cubes, config) -> np.ndarray:
    """`P7`: pick-place progress in three substages (move to object, grasp, move to goal)."""
    return _v7_parts(state, goals, initial_cubes, config)[0]


def stage_penalty(state, goals, initial_cubes, config) -> np.ndarray:
    """`stage_penalties[substage of the active cube] × #incomplete cubes` (0 when done)."""
    return _v7_parts(state, goals, initial_cubes, config)[1]


def base_reward(state: CubeState, goals: Any, config: DenseRewardConfig) -> np.ndarray:
    """OGBench's single-task cube reward with threshold `τ`: `#cubes at goal − n` (≤ 0)."""
    successes = cube_successes(state, goals, config)
    return np.asarray(_count(successes) - successes.shape[-1])


def release_event(
    prev: CubeState, cur: CubeState, goals: Any, config: DenseRewardConfig
) -> np.ndarray:
    """`Σ_i 1[cube i let go during the step] · (release_bonus if it is within release_radius
    of its goal after the step, else −release_penalty)`."""
    let_go = grasped(prev, config) & ~grasped(cur, config)
    near = cube_distances(cur, goals) <= config.release_radius
    value = np.where(near, config.release_bonus, -config.release_penalty)
    return _count(np.where(let_go, value, 0.0))


def _bonus(prev: CubeState, goals: Any, config: DenseRewardConfig) -> np.ndarray:
    return np.asarray(np.where(task_success(prev, goals, config), config.success_bonus, 0.0))


def _shaping(potential, prev, cur, goals, initial_cubes, config) -> np.ndarray:
    before = potential(prev, goals, initial_cubes, config)
    after = potential(cur, goals, initial_cubes, config)
    return np.asarray(config.shaping_lambda * (config.shaping_gamma * after - before))


# ----------------------------------------------------------------------------- versions
def dense_reward_v1(prev, cur, *, goals, initial_cubes, config) -> np.ndarray:
    """v1, count-based progress: `#cubes at goal(s) − n + B`."""
    return np.asarray(base_reward(prev, goals, config) + _bonus(prev, goals, config))


def dense_reward_v2(prev, cur, *, goals, initial_cubes, config) -> np.ndarray:
    """v2, continuous progress: `n (P2(s) − 1) + B`."""
    n = prev.cubes.shape[-2]
    level = n * (potential_v2(prev, goals, initial_cubes, config) - 1.0)
    return np.asarray(level + _bonus(prev, goals, config))


def dense_reward_v3(prev, cur, *, goals, initial_cubes, config) -> np.ndarray:
    """v3, staged sequential progress: `n (P3(s) − 1) + B`."""
    n = prev.cubes.shape[-2]
    level = n * (potential_v3(prev, goals, initial_cubes, config) - 1.0)
    return np.asarray(level + _bonus(prev, goals, config))


def dense_reward_v4(prev, cur, *, goals, initial_cubes, config) -> np.ndarray:
    """v4: `base(s) + λ (γ P2(s') − P2(s)) + B`."""
    shaping = _shaping(potential_v2, prev, cur, goals, initial_cubes, config)
    return np.asarray(base_reward(prev, goals, config) + shaping + _bonus(prev, goals, config))


def dense_reward_v5(prev, cur, *, goals, initial_cubes, config) -> np.ndarray:
    """v5: `base(s) + λ (γ P3(s') − P3(s)) + B`."""
    shaping = _shaping(potential_v3, prev, cur, goals, initial_cubes, config)
    return np.asarray(base_reward(prev, goals, config) + shaping + _bonus(prev, goals, config))


def dense_reward_v6(prev, cur, *, goals, initial_cubes, config) -> np.ndarray:
    """v6: `base(s) + λ (γ P6(s') − P6(s)) + B`."""
    shaping = _shaping(potential_v6, prev, cur, goals, initial_cubes, config)
    return np.asarray(base_reward(prev, goals, config) + shaping + _bonus(prev, goals, config))


def dense_reward_v7(prev, cur, *, goals, initial_cubes, config) -> np.ndarray:
    """v7: `stage(s) + λ (γ P7(s') − P7(s)) + B`."""
    shaping = _shaping(potential_v7, prev, cur, goals, initial_cubes, config)
    penalty = stage_penalty(prev, goals, initial_cubes, config)
    return np.asarray(penalty + shaping + _bonus(prev, goals, config))


def dense_reward_v8(prev, cur, *, goals, initial_cubes, config) -> np.ndarray:
    """v8: `stage(s) + λ (γ P7(s') − P7(s)) + release(s, s') + B`; the potential term is the
    per-step form of the chunk shaping `λ (γ^k P_end − P_start)` (module docstring)."""
    shaping = _shaping(potential_v7, prev, cur, goals, initial_cubes, config)
    penalty = stage_penalty(prev, goals, initial_cubes, config)
    release = release_event(prev, cur, goals, config)
    return np.asarray(penalty + shaping + release + _bonus(prev, goals, config))


def dense_reward_v9(prev, cur, *, goals, initial_cubes, config) -> np.ndarray:
    """v9: `stage(s) + B` (v8 without the potential and the release terms)."""
    penalty = stage_penalty(prev, goals, initial_cubes, config)
    return np.asarray(penalty + _bonus(prev, goals, config))


DENSE_REWARDS = {
    "v1": dense_reward_v1, "v2": dense_reward_v2, "v3": dense_reward_v3,
    "v4": dense_reward_v4, "v5": dense_reward_v5, "v6": dense_reward_v6,
    "v7": dense_reward_v7, "v8": dense_reward_v8, "v9": dense_reward_v9,
}  # fmt: skip
# The potential whose shaping each version adds (v8's is its chunk-aligned shaping).
SHAPING_POTENTIALS = {"v4": potential_v2, "v5": potential_v3, "v6": potential_v6,
                      "v7": potential_v7, "v8": potential_v7}  # fmt: skip


def check_dense_reward_version(version: Any, argument: str = "dense_reward_version") -> None:
    """`ValueError` naming `argument` unless `version` is `None` or one of v1-v9."""
    if version is not None and version not in DENSE_REWARD_VERSIONS:
        raise ValueError(
            f"{argument}: expected None (the task's own reward) or one of "
            f"{', '.join(DENSE_REWARD_VERSIONS)}, got {version!r}."
        )


def dense_reward_options(
    version: str | None, cube_success_threshold: float, *, discount: float
) -> dict[str, Any]:
    """The keyword arguments of [`qam.data.load_ogbench`][] and [`qam.data.make_env`][] for a
    run with dense reward `version` (`None`: the task's own) and `cube_success_threshold`
    (metres), the shaping discount being the critic's `discount`: `{}` (nothing changes) for
    `None` with OGBench's 0.04 m."""
    check_dense_reward_version(version)
    if version is None and cube_success_threshold == OGBENCH_CUBE_SUCCESS_THRESHOLD:
        return {}
    config = DenseRewardConfig(shaping_gamma=float(discount))
    return dict(dense_reward_version=version, cube_success_threshold=cube_success_threshold,
                dense_reward_config=config)  # fmt: skip


def dense_reward(
    version: str | None,
    prev: CubeState,
    cur: CubeState,
    *,
    goals: Any,
    initial_cubes: Any,
    config: DenseRewardConfig,
) -> np.ndarray:
    """The reward of the transitions `prev → cur` under `version` (`(...,)` float64);
    `None` gives OGBench's own single-task reward `base(prev)` with the config's threshold."""
    check_dense_reward_version(version)
    if version is None:
        return np.asarray(base_reward(prev, goals, config))
    return DENSE_REWARDS[version](prev, cur, goals=goals, initial_cubes=initial_cubes,
                                  config=config)  # fmt: skip


def chunk_shaping(
    version: str | None, p_start: Any, p_end: Any, steps: int, config: DenseRewardConfig
) -> np.ndarray:
    """The telescoped shaping of a chunk of `steps` steps, `λ (γ^steps P_end − P_start)`:
    the discounted sum `Σ_{i<steps} γ^i λ (γ P_{i+1} − P_i)` of the per-step potential terms
    (0 for the versions without shaping)."""
    if version not in SHAPING_POTENTIALS:
        return np.zeros(np.shape(p_start))
    lam, gamma = config.shaping_lambda, config.shaping_gamma
    return np.asarray(lam * (gamma**steps * np.asarray(p_end) - np.asarray(p_start)))


# ----------------------------------------------------------------------------- offline
def episode_starts(terminals: Any) -> np.ndarray:
    """For each row of a flat table of episodes, the index of its episode's first row (row 0
    and every row after a `terminals` flag)."""
    term = np.asarray(terminals).astype(bool)
    first = np.concatenate([[True], term[:-1]])
    return np.asarray(np.maximum.accumulate(np.where(first, np.arange(term.size), 0)))


def relabel_dense(
    observations: Any,
    next_observations: Any,
    terminals: Any,
    *,
    goals: Any,
    version: str | None,
    config: DenseRewardConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Rewards and masks of a flat OGBench dataset (regular format: `next_observations[i]`
    follows `observations[i]`, `terminals` marks each episode's last transition) under
    `version`, with the same functions the environment wrapper uses online.

    Returns `(rewards, masks)` as float32 `(N,)`: `r_i = r(s_i, s'_i)` and
    `mask_i = 1 − success(s_i)` (OGBench's pre-step timing), with each row's initial cube
    positions those of its episode's first row."""
    prev = cube_state_from_observations(observations)
    cur = cube_state_from_observations(next_observations)
    initial = prev.cubes[episode_starts(terminals)]
    goals = np.asarray(goals, dtype=np.float64)
    rewards = dense_reward(version, prev, cur, goals=goals, initial_cubes=initial, config=config)
    masks = 1.0 - task_success(prev, goals, config).astype(np.float64)
    return rewards.astype(np.float32), masks.astype(np.float32)


# ----------------------------------------------------------------------------- online
def _cube_env(env: Any) -> Any:
    inner = env.unwrapped
    if not hasattr(inner, "_cube_target_mocap_ids") or not hasattr(inner, "_num_cubes"):
        raise ValueError(
            f"dense_reward_version: dense rewards are defined for OGBench's cube environments "
            f"only, got {type(inner).__name__}."
        )
    if getattr(inner, "_ob_type", "states") != "states":
        raise ValueError(
            "dense_reward_version: dense rewards read the state observation; pixel ('visual-') "
            "cube environments are not supported."
        )
    return inner


def task_goals(env: Any) -> np.ndarray:
    """The goal positions `(n, 3)` (m) of a reset single-task cube environment: its target
    mocap bodies, which OGBench's own relabelling reads too."""
    inner = _cube_env(env)
    ids = list(inner._cube_target_mocap_ids)
    return np.asarray(inner._data.mocap_pos[ids], dtype=np.float64).copy()


class _DenseReward:
    """The body of `DenseRewardWrapper`; see [`qam.data.wrap_dense_reward`][]."""

    env: Any  # set by `gymnasium.Wrapper.__init__`

    def __init__(
        self,
        env: Any,
        *,
        version: str | None,
        config: DenseRewardConfig | None = None,
        chunk_length: int | None = None,
    ):
        super().__init__(env)  # pyright: ignore[reportCallIssue]  (gymnasium.Wrapper's)
        check_dense_reward_version(version)
        if chunk_length is not None and (
            not isinstance(chunk_length, int) or isinstance(chunk_length, bool) or chunk_length < 1
        ):
            raise ValueError(f"chunk_length: expected None or an int >= 1, got {chunk_length!r}.")
        self._inner = _cube_env(env)
        self.version = version
        self.config = DenseRewardConfig() if config is None else config
        self.chunk_length = chunk_length
        self._potential = SHAPING_POTENTIALS.get(version) if version else None

    def begin_episode(self, observation: Any) -> None:
        """Start the reward's episode from `observation` (done by `reset`; call it again after
        changing the simulator's state by hand, e.g. to replay a recorded episode)."""
        self._goals = task_goals(self.env)
        self._prev = cube_state_from_observations(observation)
        self._initial = self._prev.cubes
        self._t = 0
        if self._potential is not None:
            self._chunk_start = self._potential_of(self._prev)
            self._chunk_steps = 0

    def _potential_of(self, state: CubeState) -> float:
        assert self._potential is not None
        return float(self._potential(state, self._goals, self._initial, self.config))

    def reset(self, **kwargs: Any) -> Any:
        observation, info = self.env.reset(**kwargs)
        self.begin_episode(observation)
        return observation, info

    def step(self, action: Any) -> Any:
        observation, _, _, truncated, info = self.env.step(action)
        cur = cube_state_from_observations(observation)
        reward = float(dense_reward(self.version, self._prev, cur, goals=self._goals,
                                    initial_cubes=self._initial, config=self.config))  # fmt: skip
        success = bool(task_success(self._prev, self._goals, self.config))
        info["success"] = success
        self._t += 1
        if self._potential is not None:
            potential = self._potential_of(cur)
            info["potential"] = potential
            self._chunk_steps += 1
            if self.chunk_length is not None and (
                self._chunk_steps == self.chunk_length or success or truncated
            ):
                info["chunk_shaping"] = float(chunk_shaping(
                    self.version, self._chunk_start, potential, self._chunk_steps, self.config
                ))  # fmt: skip
                self._chunk_start, self._chunk_steps = potential, 0
        self._prev = cur
        return observation, reward, success, truncated, info


@functools.cache
def _wrapper_class() -> type:
    import gymnasium  # optional (the `ogbench` extra): imported only when an env is wrapped

    return type("DenseRewardWrapper", (_DenseReward, gymnasium.Wrapper), {
        "__doc__": _DenseReward.__doc__, "__module__": __name__,
        "__qualname__": "DenseRewardWrapper",
    })  # fmt: skip


def wrap_dense_reward(
    env: Any,
    *,
    version: str | None,
    config: DenseRewardConfig | None = None,
    chunk_length: int | None = None,
) -> Any:
    """`env` (a single-task OGBench cube environment) wrapped in a `gymnasium.Wrapper`
    (`DenseRewardWrapper`) whose reward, termination and `info["success"]` are the dense
    reward's:

    - `reset` reads the goals from the task's target bodies and the episode's initial cube
      positions from the reset observation;
    - `step` returns `r(s, s')` of `version` (OGBench's own `#at goal − n` with threshold
      `τ` when `version` is `None`) and `terminated = info["success"] = success(s)` with the
      threshold `τ` (the state before the step: OGBench's single-task timing), all computed
      from the observations rounded to float32, as the replay buffer stores them;
    - with `chunk_length = k`, `info["chunk_shaping"]` is `λ (γ^m P(s_end) − P(s_start))` at
      the last step of each executed chunk (chunks start at the reset, every `k` steps; `m`
      the steps taken, `< k` for a chunk cut short by the environment's end of the episode),
      and `info["potential"]` the potential after each step (versions with shaping).

    `wrapper.begin_episode(obs)` restarts the reward's episode from `obs` after the
    simulator's state was changed by hand (e.g. to replay a recorded episode).

    **Raises:** `ValueError` naming the argument for an unknown `version`, a bad
    `chunk_length`, or an environment that is not a state-based cube environment.
    """
    return _wrapper_class()(env, version=version, config=config, chunk_length=chunk_length)
