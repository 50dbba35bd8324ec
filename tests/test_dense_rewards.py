"""Dense cube rewards v1-v9: each version against hand-computed rewards on scripted states, the
observation layout against the simulator's own state, offline relabelling equal to the online
reward step for step on a replayed episode, v8's chunk shaping, the success threshold, and the
errors for bad options."""

import dataclasses
import math
import os
import types
import warnings

import jax
import mujoco
import numpy as np
import pytest

import qam.data as qd
from qam.data import CubeState, DenseRewardConfig


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:glfw")

TASK = "cube-double-play-singletask-task2-v0"
STEPS = 100  # the generated play episode: the oracle grasps, lifts, carries and releases a cube
REPLAY = 80
CFG = DenseRewardConfig()


# ----------------------------------------------------------------------------- reference
# An independent scalar transcription of the definitions (plain Python, one state at a time).
def _ref_parts(state, goals, init, cfg):
    cubes, e, closure, contact = state
    n = len(cubes)
    tau = cfg.cube_success_threshold
    d = [math.dist(c, g) for c, g in zip(cubes, goals)]
    d0 = [math.dist(c, g) for c, g in zip(init, goals)]
    de = [math.dist(e, c) for c in cubes]
    q = [1.0 if d[i] <= tau else min(max(1 - (d[i] - tau) / max(d0[i] - tau,
         cfg.progress_min_distance), 0.0), 1.0) for i in range(n)]  # fmt: skip
    rho = [min(max(1 - (x - cfg.reach_radius) / cfg.reach_scale, 0.0), 1.0) for x in de]
    holding = (
        cfg.grasp_contact <= contact and cfg.grasp_closure_min <= closure <= cfg.grasp_closure_max
    )
    held = [holding and x <= cfg.grasp_radius for x in de]
    reached = [x <= cfg.reach_radius for x in de]
    at = [x <= tau for x in d]
    return types.SimpleNamespace(n=n, d=d, q=q, rho=rho, held=held, reached=reached, at=at)


def _ref_staged(complete, score):
    n = len(complete)
    if all(complete):
        return 1.0
    a = complete.index(False)
    return (sum(complete) + score[a]) / n


def _ref_potential(kind, state, goals, init, cfg):
    p = _ref_parts(state, goals, init, cfg)
    q, rho, held, reached, at = p.q, p.rho, p.held, p.reached, p.at
    idx = range(p.n)
    if kind == 2:
        return sum(q) / p.n
    if kind == 3:
        return _ref_staged(at, [(1 + q[i]) / 2 if reached[i] else rho[i] / 2 for i in idx])
    if kind == 6:
        score = [0.75 if held[i] and at[i] else (2 + q[i]) / 4 if held[i]
                 else 0.25 if reached[i] else rho[i] / 4 for i in idx]  # fmt: skip
        return _ref_staged([at[i] and not held[i] for i in idx], score)
    score = [(2 + q[i]) / 3 if held[i] else 1 / 3 if reached[i] else rho[i] / 3 for i in idx]
    return _ref_staged(at, score)


def _ref_reward(version, prev, cur, goals, init, cfg):
    p = _ref_parts(prev, goals, init, cfg)
    n, at = p.n, p.at
    base = sum(at) - n
    bonus = cfg.success_bonus if all(at) else 0.0
    if all(at):
        stage = 0.0
    else:
        a = at.index(False)
        sub = 2 if p.held[a] else 1 if p.reached[a] else 0
        stage = cfg.stage_penalties[sub] * (n - sum(at))

    def shaping(kind):
        before = _ref_potential(kind, prev, goals, init, cfg)
        after = _ref_potential(kind, cur, goals, init, cfg)
        return cfg.shaping_lambda * (cfg.shaping_gamma * after - before)

    def release():
        c = _ref_parts(cur, goals, init, cfg)
        total = 0.0
        for i in range(n):
            if p.held[i] and not c.held[i]:
                total += cfg.release_bonus if c.d[i] <= cfg.release_radius else -cfg.release_penalty
        return total

    return {
        "v1": lambda: base + bonus,
        "v2": lambda: n * (_ref_potential(2, prev, goals, init, cfg) - 1) + bonus,
        "v3": lambda: n * (_ref_potential(3, prev, goals, init, cfg) - 1) + bonus,
        "v4": lambda: base + shaping(2) + bonus,
        "v5": lambda: base + shaping(3) + bonus,
        "v6": lambda: base + shaping(6) + bonus,
        "v7": lambda: stage + shaping(7) + bonus,
        "v8": lambda: stage + shaping(7) + release() + bonus,
        "v9": lambda: stage + bonus,
    }[version]()


def _state(cubes, effector, closure, contact):
    return CubeState(np.asarray(cubes, float), np.asarray(effector, float),
                     np.asarray(closure, float), np.asarray(contact, float))  # fmt: skip


def _reward(version, prev, cur, goals, init, cfg=CFG):
    out = qd.dense_reward(version, _state(*prev), _state(*cur), goals=np.asarray(goals, float),
                          initial_cubes=np.asarray(init, float), config=cfg)  # fmt: skip
    assert out.shape == () and out.dtype == np.float64
    return float(out)


# One cube: goal g, start c0 (d0 = 0.2 m, so place progress falls over 0.16 m beyond tau).
G1, C1 = [(0.5, 0.1, 0.02)], [(0.5, -0.1, 0.02)]
OPEN, HOLD = (0.0, 0.0), (0.56, 1.0)  # (closure, contact)
S = {
    "start": ([(0.5, -0.1, 0.02)], (0.5, -0.1, 0.27), *OPEN),  # effector 0.25 m above
    "reached": ([(0.5, -0.1, 0.02)], (0.5, -0.1, 0.03), *OPEN),  # 1 cm above, open
    "grasped": ([(0.5, -0.1, 0.02)], (0.5, -0.1, 0.02), *HOLD),
    "lifted": ([(0.5, -0.1, 0.12)], (0.5, -0.1, 0.12), *HOLD),
    "above_goal": ([(0.5, 0.1, 0.07)], (0.5, 0.1, 0.07), *HOLD),  # d = 0.05 > tau
    "released_at_goal": ([(0.5, 0.1, 0.05)], (0.5, 0.1, 0.09), 0.1, 0.0),  # d = 0.03
    "released_far": ([(0.5, -0.1, 0.10)], (0.5, -0.1, 0.15), 0.1, 0.0),
}


@pytest.mark.parametrize(
    "version,prev,cur,expected",
    [
        # P7(start) = rho/3 with rho = 1 - (0.25 - 0.03)/0.5 = 0.56; P7(reached) = 1/3.
        ("v7", "start", "reached", -3 + 10 * (0.99 / 3 - 0.56 / 3)),
        ("v9", "start", "reached", -3.0),
        ("v9", "reached", "grasped", -2.0),
        # Lifting: P6 stays (2 + 0)/4 (place progress is 0 beyond the start distance).
        ("v6", "grasped", "lifted", -1 + 10 * (0.99 * 0.5 - 0.5)),
        ("v9", "lifted", "above_goal", -1.0),
        # Above the goal: q = 1 - (0.05 - 0.04)/0.16 = 0.9375; released at the goal: P = 1.
        ("v1", "above_goal", "released_at_goal", -1.0),
        ("v2", "above_goal", "released_at_goal", 0.9375 - 1),
        ("v3", "above_goal", "released_at_goal", (1 + 0.9375) / 2 - 1),
        ("v4", "above_goal", "released_at_goal", -1 + 10 * (0.99 - 0.9375)),
        ("v5", "above_goal", "released_at_goal", -1 + 10 * (0.99 - (1 + 0.9375) / 2)),
        ("v6", "above_goal", "released_at_goal", -1 + 10 * (0.99 - (2 + 0.9375) / 4)),
        ("v7", "above_goal", "released_at_goal", -1 + 10 * (0.99 - (2 + 0.9375) / 3)),
        ("v8", "above_goal", "released_at_goal", -1 + 10 * (0.99 - (2 + 0.9375) / 3) + 5),
        # Released 0.215 m from the goal: -5; P7 falls from 2/3 to rho/3, rho = 1 - 0.02/0.5.
        ("v8", "lifted", "released_far", -1 + 10 * (0.99 * 0.96 / 3 - 2 / 3) - 5),
        ("v7", "lifted", "released_far", -1 + 10 * (0.99 * 0.96 / 3 - 2 / 3)),
        # The transition out of the success state: bonus 10, level terms 0, P = 1 before.
        ("v1", "released_at_goal", "released_at_goal", 10.0),
        ("v3", "released_at_goal", "released_at_goal", 10.0),
        ("v7", "released_at_goal", "released_at_goal", 10 + 10 * (0.99 - 1)),
        ("v9", "released_at_goal", "released_at_goal", 10.0),
    ],
)
def test_scripted_single_cube_by_hand(version, prev, cur, expected):
    got = _reward(version, S[prev], S[cur], G1, C1)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert got == pytest.approx(_ref_reward(version, S[prev], S[cur], G1, C1, CFG), abs=1e-12)


# Two cubes (task 2 of cube-double): the first incomplete cube is the active one, and the
# stage penalty counts the incomplete cubes.
G2 = [(0.35, 0.1, 0.02), (0.5, 0.1, 0.02)]
C2 = [(0.35, -0.1, 0.02), (0.5, -0.1, 0.02)]
S2 = {
    "start": (C2, (0.5, -0.1, 0.27), *OPEN),
    "first_done": ([G2[0], C2[1]], (0.5, -0.1, 0.27), *OPEN),
    "second_held": ([C2[0], (0.5, 0.0, 0.1)], (0.5, 0.0, 0.1), *HOLD),
    "second_done": ([C2[0], G2[1]], (0.35, -0.1, 0.03), *OPEN),
    "both": (G2, (0.5, 0.1, 0.3), *OPEN),
}


def test_scripted_two_cubes_active_cube_and_stage_penalty():
    rho0 = 1 - (math.dist((0.5, -0.1, 0.27), C2[0]) - 0.03) / 0.5  # effector to cube 0
    # Nothing done: cube 0 is active (stage 0, far): -3 x 2 incomplete.
    assert _reward("v9", S2["start"], S2["start"], G2, C2) == -6.0
    # Cube 0 done: cube 1 active, effector 0.25 m above it: -3 x 1; P7 = (1 + 0.56/3)/2.
    assert _reward("v9", S2["first_done"], S2["start"], G2, C2) == -3.0
    want = -3 + 10 * (0.99 * (0 + rho0 / 3) / 2 - (1 + 0.56 / 3) / 2)
    assert _reward("v7", S2["first_done"], S2["start"], G2, C2) == pytest.approx(want, abs=1e-12)
    # Cube 1 held but cube 0 (the active one) untouched: the active cube's stage counts.
    assert _reward("v9", S2["second_held"], S2["second_held"], G2, C2) == -6.0
    # Cube 1 at its goal, effector reached cube 0: grasp stage -2 x 1.
    assert _reward("v9", S2["second_done"], S2["second_done"], G2, C2) == -2.0
    assert _reward("v1", S2["second_done"], S2["second_done"], G2, C2) == -1.0
    assert _reward("v1", S2["both"], S2["both"], G2, C2) == 10.0
    for version in qd.DENSE_REWARD_VERSIONS:
        for a in S2.values():
            for b in S2.values():
                want = _ref_reward(version, a, b, G2, C2, CFG)
                assert _reward(version, a, b, G2, C2) == pytest.approx(want, abs=1e-12)


def test_grasp_detection():
    cube = [(0.5, 0.0, 0.02)]

    def held(effector, closure, contact):
        return bool(np.all(qd._dense.grasped(_state(cube, effector, closure, contact), CFG)))

    assert held((0.5, 0.0, 0.025), 0.56, 1.0)  # on a cube, pressing
    assert not held((0.5, 0.0, 0.025), 0.98, 0.34)  # shut on nothing
    assert not held((0.5, 0.0, 0.025), 0.56, 0.3)  # no contact force
    assert not held((0.5, 0.0, 0.045), 0.56, 1.0)  # the cube is not between the fingers
    assert not held((0.5, 0.0, 0.025), 0.1, 1.0)  # open


def test_success_at_the_threshold_and_just_outside():
    goal, init = [(0.5, 0.0, 0.02)], [(0.5, 0.3, 0.02)]
    cfg = DenseRewardConfig(cube_success_threshold=0.0625)  # exact in binary
    at = ([(0.5625, 0.0, 0.02)], (0.5, 0.3, 0.3), *OPEN)  # d = 0.0625 exactly
    out = ([(0.5625 + 2**-20, 0.0, 0.02)], (0.5, 0.3, 0.3), *OPEN)
    for version in qd.DENSE_REWARD_VERSIONS:
        bonus_at = _reward(version, at, at, goal, init, cfg) - _ref_reward(
            version, at, at, goal, init, dataclasses.replace(cfg, success_bonus=0.0)
        )
        assert bonus_at == pytest.approx(10.0, abs=1e-9)  # fmt: skip
        assert _reward(version, out, out, goal, init, cfg) == pytest.approx(
            _ref_reward(version, out, out, goal, init, cfg), abs=1e-12)  # fmt: skip
    assert _reward("v1", at, at, goal, init, cfg) == 10.0
    assert _reward("v1", out, out, goal, init, cfg) == -1.0
    assert _reward(None, at, at, goal, init, cfg) == 0.0  # OGBench's own reward with tau
    # OGBench's 0.04 m by default.
    near = ([(0.5 + 0.04 - 1e-9, 0.0, 0.02)], (0.5, 0.3, 0.3), *OPEN)
    far = ([(0.5 + 0.04 + 1e-9, 0.0, 0.02)], (0.5, 0.3, 0.3), *OPEN)
    assert _reward("v1", near, near, goal, init) == 10.0
    assert _reward("v1", far, far, goal, init) == -1.0


# ----------------------------------------------------------------------------- environment
@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A generated cube-double play episode, a single-task env, and that episode replayed in
    it (state restored from the file's first qpos/qvel, then the file's actions)."""
    directory = tmp_path_factory.mktemp("dense")
    gen = qd.generate_dataset("cube-double-v0", "play", num_episodes=1, num_val_episodes=1,
                              out_dir=directory, seed=0, max_episode_steps=STEPS,
                              progress=False)  # fmt: skip
    raw = dict(np.load(gen.train_path))
    base = qd.make_env(TASK)
    import gymnasium

    from qam.data import _ogbench

    class _KeptOpen(gymnasium.Wrapper):  # `load_ogbench` closes its relabelling env
        def close(self):
            pass

    with pytest.MonkeyPatch.context() as patch:  # relabel with this env: no second simulator
        patch.setattr(_ogbench, "_relabel_env", lambda name: _KeptOpen(base))
        yield directory, raw, base
    base.close()


def _replay(base, raw, version, cfg=CFG, chunk_length=None, steps=REPLAY):
    """Online: the wrapped env from the file's first state through its actions. Returns the
    observations (float64, env's), rewards, terminations and infos."""
    env = qd.wrap_dense_reward(base, version=version, config=cfg, chunk_length=chunk_length)
    env.reset(seed=0)
    inner = env.unwrapped
    inner._data.qpos[:] = raw["qpos"][0]
    inner._data.qvel[:] = raw["qvel"][0]
    mujoco.mj_forward(inner._model, inner._data)  # pyright: ignore[reportAttributeAccessIssue]
    obs = inner.compute_observation()
    env.begin_episode(obs)
    observations, rewards, terminated, infos = [obs], [], [], []
    for t in range(steps):
        obs, r, term, trunc, info = env.step(raw["actions"][t])
        observations.append(obs)
        rewards.append(r)
        terminated.append(term)
        infos.append(info)
    return np.asarray(observations), np.asarray(rewards), np.asarray(terminated), infos


def _write_episode(directory, observations, actions):
    """`observations` (T + 1 rows) as one episode in OGBench's file format."""
    os.makedirs(directory, exist_ok=True)
    t = len(observations)
    terminals = np.zeros(t, bool)
    terminals[-1] = True
    np.savez(os.path.join(directory, "cube-double-play-v0.npz"),
             observations=observations.astype(np.float32),
             actions=np.concatenate([actions[: t - 1], actions[:1]]).astype(np.float32),
             terminals=terminals, qpos=np.zeros((t, 28), np.float32),
             qvel=np.zeros((t, 28), np.float32))  # fmt: skip


def test_observation_layout_matches_the_simulator(generated):
    _, raw, base = generated
    # Cube positions in the file's observations are the file's qpos (float32 rounding).
    state = qd.cube_state_from_observations(raw["observations"])
    for i in range(2):
        np.testing.assert_allclose(state.cubes[:, i], raw["qpos"][:, 14 + 7 * i : 17 + 7 * i],
                                   rtol=0, atol=1e-6)  # fmt: skip
    assert np.any(state.cubes[:, :, 2] > 0.05)  # the episode lifts a cube
    # The effector, gripper and cubes of the live env's own info, every step.
    base.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(12):
        obs, *_, info = base.step(rng.uniform(-1, 1, 5))
        s = qd.cube_state_from_observations(obs)
        np.testing.assert_allclose(s.effector, info["proprio/effector_pos"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(s.closure, info["proprio/gripper_opening"][0], atol=1e-6)
        np.testing.assert_allclose(s.contact, info["proprio/gripper_contact"][0], atol=1e-6)
        for i in range(2):
            np.testing.assert_allclose(s.cubes[i], info[f"privileged/block_{i}_pos"], atol=1e-6)
    np.testing.assert_array_equal(qd.task_goals(base), [[0.35, 0.1, 0.02], [0.5, 0.1, 0.02]])


def test_offline_relabel_equals_online_reward_step_for_step(generated, tmp_path):
    directory, raw, base = generated
    runs: dict[str | None, tuple] = {v: _replay(base, raw, v) for v in qd.DENSE_REWARD_VERSIONS}
    observations = runs["v1"][0]
    # The replay follows the file (up to the first step's controller warm start) and every
    # version saw the same episode: the wrapper changes rewards, not dynamics.
    np.testing.assert_allclose(observations[1:].astype(np.float32),
                               raw["observations"][1 : REPLAY + 1], atol=1e-3)  # fmt: skip
    for obs, *_ in runs.values():
        np.testing.assert_array_equal(obs, observations)
    states = qd.cube_state_from_observations(observations)
    held = np.any(np.asarray(qd._dense.grasped(states, CFG)), axis=-1).tolist()
    assert any(held) and not held[-1]  # a grasp, then a release, within the replay
    # No version: OGBench's reward with a threshold that the episode meets half the time.
    far = qd._dense.cube_distances(states, qd.task_goals(base)).max(-1)
    tau = float(np.median(far[:-1]))
    runs[None] = _replay(base, raw, None, dataclasses.replace(CFG, cube_success_threshold=tau))
    assert 0 < runs[None][2].sum() < REPLAY
    _write_episode(tmp_path, observations, raw["actions"])
    for version, (_, rewards, terminated, _) in runs.items():
        threshold = None if version else tau
        data = qd.load_ogbench(TASK, dataset_dir=tmp_path, load_val=False, make_env=False,
                               dense_reward_version=version,
                               cube_success_threshold=threshold)  # fmt: skip
        np.testing.assert_array_equal(np.asarray(data.train.rewards), rewards.astype(np.float32))
        np.testing.assert_array_equal(np.asarray(data.train.masks), 1.0 - terminated)
        assert data.info.cube_success_threshold == (threshold or 0.04)


def test_v8_chunk_shaping_online_and_in_the_sampler(generated, tmp_path):
    _, raw, base = generated
    k, gamma, lam = 5, CFG.shaping_gamma, CFG.shaping_lambda
    observations, rewards, _, infos = _replay(base, raw, "v8", chunk_length=k, steps=23)
    states = qd.cube_state_from_observations(observations)
    init, goals = states.cubes[0], qd.task_goals(base)
    potential = np.asarray([
        float(qd._dense.potential_v7(qd.CubeState(*(x[t] for x in states)), goals, init, CFG))
        for t in range(len(observations))
    ])  # fmt: skip
    np.testing.assert_array_equal([i["potential"] for i in infos], potential[1:])
    ends = [t for t, i in enumerate(infos) if "chunk_shaping" in i]
    assert ends == [4, 9, 14, 19]  # chunks aligned with the reset: t = 0, 5, 10, ...
    for end in ends:
        start = end + 1 - k
        per_step = sum(gamma**i * lam * (gamma * potential[start + i + 1] - potential[start + i])
                       for i in range(k))  # fmt: skip
        telescoped = lam * (gamma**k * potential[end + 1] - potential[start])
        assert per_step == pytest.approx(telescoped, abs=1e-12)
        assert infos[end]["chunk_shaping"] == pytest.approx(telescoped, abs=1e-12)
    # A chunk cut short by the episode's end (a 7-step time limit): m = 2 steps.
    import gymnasium

    short = qd.wrap_dense_reward(gymnasium.wrappers.TimeLimit(base, 7), version="v8",
                                 chunk_length=k)  # fmt: skip
    first = qd.cube_state_from_observations(short.reset(seed=1)[0])
    p = [float(qd._dense.potential_v7(first, qd.task_goals(base), first.cubes, CFG))]
    truncated, info = False, {}
    for _ in range(7):
        _, _, _, truncated, info = short.step(np.zeros(5))
        p.append(info["potential"])
    assert truncated
    assert info["chunk_shaping"] == pytest.approx(lam * (gamma**2 * p[7] - p[5]), abs=1e-12)

    # Offline: the sampler's discounted chunk return of the shaping-only reward is the
    # telescoped chunk shaping, for every sampled window (two episodes: windows may be cut).
    cfg = dataclasses.replace(CFG, success_bonus=0.0, release_bonus=0.0, release_penalty=0.0,
                              stage_penalties=(0.0, 0.0, 0.0))  # fmt: skip
    obs = raw["observations"][: REPLAY + 1]
    # Rows 0-40 and 41-90 as two episodes (40 and 49 transitions); OGBench's regular format
    # drops each episode's last observation row.
    ends = np.zeros(len(obs), bool)
    ends[[40, len(obs) - 1]] = True
    rows = np.flatnonzero(~ends)
    o, no = obs[rows], obs[rows + 1]
    term = np.zeros(len(rows), np.float32)
    term[[39, len(rows) - 1]] = 1.0
    r, m = qd.relabel_dense(o, no, term, goals=goals, version="v8", config=cfg)
    table = qd.dataset_from_numpy(dict(observations=o, actions=np.zeros((len(o), 5)), rewards=r,
                                       masks=m, terminals=term, next_observations=no))  # fmt: skip
    batch = qd.sample_sequence(table, jax.random.PRNGKey(0), 64, horizon=k, discount=gamma)
    starts = qd._dense.episode_starts(term)
    cut = 0
    for b in range(64):
        j = int(np.flatnonzero(np.all(o == np.asarray(batch.observations[b]), axis=1))[0])
        length = int(np.asarray(batch.valid[b]).sum())
        cut += length < k
        init_j = qd.cube_state_from_observations(o[starts[j]]).cubes

        def pot(x, init=init_j):
            state = qd.cube_state_from_observations(x)
            return float(qd._dense.potential_v7(state, goals, init, cfg))

        want = lam * (gamma**length * pot(no[j + length - 1]) - pot(o[j]))
        got = float(np.asarray(batch.rewards[b, -1]))
        terms = float(np.abs(r[j : j + length]).sum())
        assert got == pytest.approx(want, abs=4 * k * 2**-23 * (terms + abs(want)) + 1e-7)
    assert cut > 0  # some windows stop at the first episode's end


def test_threshold_changes_success_alike_in_the_env_and_the_reward(generated, tmp_path):
    _, raw, base = generated
    # Task 2's cubes start 0.19-0.21 m from their goals.
    for tau, success in ((0.25, True), (0.15, False)):
        cfg = dataclasses.replace(CFG, cube_success_threshold=tau)
        env = qd.wrap_dense_reward(base, version="v1", config=cfg)
        obs0, _ = env.reset(seed=5)
        obs1, reward, terminated, _, info = env.step(np.zeros(5))
        assert info["success"] is success and terminated is success
        assert base.unwrapped._success is False  # OGBench's own 0.04 m check says otherwise
        assert reward == (10.0 if success else -2.0)
        r, m = qd.relabel_dense(obs0[None], obs1[None], np.ones(1), goals=qd.task_goals(base),
                                version="v1", config=cfg)  # fmt: skip
        assert r[0] == reward and m[0] == (0.0 if success else 1.0)


def test_make_env_and_load_ogbench_wrap_with_the_options(generated, monkeypatch):
    directory, _, base = generated
    from qam.data import _ogbench

    monkeypatch.setattr(_ogbench, "make_gym_env", lambda env_id, **kwargs: base)  # no rebuild
    made = qd.make_env(TASK, dense_reward_version="v2", cube_success_threshold=0.25,
                       chunk_length=5)  # fmt: skip
    assert made.version == "v2" and made.chunk_length == 5
    assert made.config == DenseRewardConfig(cube_success_threshold=0.25)
    made.reset(seed=5)
    assert made.step(np.zeros(5))[4]["success"] is True
    assert qd.make_env(TASK) is base  # no option: the plain environment
    data = qd.load_ogbench(TASK, dataset_dir=directory, load_val=False,
                           dense_reward_version="v9")  # fmt: skip
    assert data.env.version == "v9" and data.env.config == DenseRewardConfig()


# ----------------------------------------------------------------------------- options
def test_bad_options_raise_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="dense_reward_version"):
        qd.load_ogbench("puzzle-3x3-play-singletask-task1-v0", dense_reward_version="v1")
    with pytest.raises(ValueError, match="dense_reward_version"):
        qd.make_env("scene-play-singletask-task1-v0", dense_reward_version="v7")
    with pytest.raises(ValueError, match="dense_reward_version"):
        qd.make_env("visual-cube-double-play-singletask-task2-v0", dense_reward_version="v7")
    with pytest.raises(ValueError, match="dense_reward_version.*'v10'"):
        qd.load_ogbench(TASK, dense_reward_version="v10")
    with pytest.raises(ValueError, match="cube_success_threshold"):
        qd.load_ogbench("puzzle-3x3-play-singletask-task1-v0", cube_success_threshold=0.05)
    for bad in (0.0, -0.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cube_success_threshold"):
            qd.make_env(TASK, dense_reward_version="v1", cube_success_threshold=bad)
    with pytest.raises(ValueError, match="sparse"):
        qd.load_ogbench(TASK, dataset_dir=tmp_path, dense_reward_version="v7", sparse=True)
    from qam.data import _ogbench

    with pytest.raises(ValueError, match="dense_reward_config"):  # (typed: checked here)
        _ogbench._resolve_dense(TASK, "v7", None, {"success_bonus": 1})
    with pytest.raises(ValueError, match="cube_success_threshold"):
        _ogbench._resolve_dense(TASK, "v7", "0.04", None)
    with pytest.raises(ValueError, match="shaping_gamma"):
        DenseRewardConfig(shaping_gamma=1.5)
    with pytest.raises(ValueError, match="stage_penalties"):
        DenseRewardConfig(stage_penalties=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="grasp_closure_max"):
        DenseRewardConfig(grasp_closure_min=0.5, grasp_closure_max=0.4)
    with pytest.raises(ValueError, match="observations"):
        qd.cube_state_from_observations(np.zeros(30))
    from qam.train import RunConfig

    with pytest.raises(ValueError, match="dense_reward_version"):
        RunConfig(env_name=TASK, dense_reward_version="v0")
    assert qd.dense_reward_options(None, 0.04, discount=0.9) == {}
    options = qd.dense_reward_options("v8", 0.05, discount=0.9)
    assert options["dense_reward_config"].shaping_gamma == 0.9
    assert options["cube_success_threshold"] == 0.05


def test_recorded_in_dataset_info(generated):
    directory, _, _ = generated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = qd.load_ogbench(TASK, dataset_dir=directory, load_val=False, make_env=False,
                               dense_reward_version="v7", cube_success_threshold=0.05)  # fmt: skip
    record = data.info.to_dict()
    assert record["dense_reward_version"] == "v7" and record["cube_success_threshold"] == 0.05
    assert record["dense_reward_config"] == dict(CFG.to_dict(), cube_success_threshold=0.05)
    assert "v7" in record["reward"] and "0.05" in record["reward"]
    plain = qd.load_ogbench(TASK, dataset_dir=directory, load_val=False, make_env=False).info
    assert plain.dense_reward_version is None and plain.dense_reward_config is None
    assert plain.cube_success_threshold == 0.04
