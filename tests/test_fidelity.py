"""Fidelity to the authors' implementation.

- LayerNorm epsilon: 1e-6 (flax's default, the reference networks'), plumbed through every
  network constructor and `QAMConfig`.
- One flow step (`K = 1`, the paper's sensitivity study): every code path computes the
  reference scheme's `K = 1` case (no noisy step, one deterministic base step, a single-step
  lean adjoint `A_0 = 2 J_{v_B}(X_0, 1)^T A_1`, `sigma_0 = 2`).
- The lean adjoint's state index: on a NONLINEAR base velocity (whose Jacobian depends on the
  state, unlike the affine closed forms elsewhere) against an independent float64 NumPy
  recursion, so evaluating the VJP at `X_{i+1}` instead of `X_i` is caught.
- `inv_temp = 0` with a one-step or edit policy: `qam` trains that policy on `actor_slow`'s ODE
  actions (the ones it deploys on), a deliberate difference from the authors' implementation,
  which trains it on `actor_fast`'s.

Float comparisons of the core functions run in float64 (the NumPy oracles are float64 too).
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_chunk_batch
from jaxtyping import Array

import qam
from qam.agents import QAMConfig, qam as agent


D, M = 3, 2  # action and observation sizes of the core-function tests
RTOL, ATOL = 1e-10, 1e-12  # float64: the implementations agree with the oracles to ~1e-15


# --------------------------------------------------------------------------------------------
# A nonlinear velocity field v(t, x, obs) = tanh(W x + t b + C obs) and its float64 NumPy twin.


class TanhField(eqx.Module):
    w: Array
    b: Array
    c: Array

    def __call__(self, t, x, obs):
        t = jnp.asarray(t, dtype=x.dtype)
        return jnp.tanh(self.w @ x + t * self.b + self.c @ obs)


def _params(seed):
    rng = np.random.default_rng(seed)
    # Pre-activations of size ~1-2, so that tanh is far from linear and its Jacobian varies
    # with the state.
    w = 1.5 * rng.standard_normal((D, D)) / np.sqrt(D)
    return w, rng.standard_normal(D), rng.standard_normal((D, M))


def _np_v(p, t, x, obs):
    w, b, c = p
    return np.tanh(w @ x + t * b + c @ obs)


def _np_jac(p, t, x, obs):
    """d/dx tanh(W x + t b + C obs) = diag(1 - tanh^2(z)) W, written by hand."""
    w, b, c = p
    return (1.0 - np.tanh(w @ x + t * b + c @ obs) ** 2)[:, None] * w


def _jax_field(p):
    return TanhField(*(jnp.asarray(a) for a in p))  # float64 under `jax.enable_x64`


def _np_lean_adjoint(p_base, xs, obs, a_terminal, num_steps, *, state_offset=0):
    """The reference lean adjoint: A_i = A_{i+1} + h (2 J_B(X_i, t_{i+1}) - I / t_{i+1})^T A_{i+1}.

    `state_offset=1` is the mutation (the Jacobian at X_{i+1}); the tests check it differs."""
    h = 1.0 / num_steps
    a = np.asarray(a_terminal, np.float64)
    out = []
    for i in reversed(range(num_steps)):
        t_next = (i + 1) * h
        jac = _np_jac(p_base, t_next, xs[i + state_offset], obs)
        a = a + h * (2.0 * jac.T @ a - a / t_next)
        out.append(a)
    return np.stack(out[::-1])


def _np_sigma2(t, h):
    return 2.0 * (1.0 - t + h) / (t + h)


def _np_rollout(p_fine, p_base, obs, noise, num_steps, *, residual=False):
    h = 1.0 / num_steps
    x = noise[0]
    xs = [x]
    for i in range(num_steps - 1):
        t = i * h
        v = _np_v(p_fine, t, x, obs) + (_np_v(p_base, t, x, obs) if residual else 0.0)
        x = x + h * (2.0 * v - x / (t + h)) + np.sqrt(h * _np_sigma2(t, h)) * noise[i + 1]
        xs.append(x)
    xs.append(x + h * _np_v(p_base, (num_steps - 1) * h, x, obs))
    return np.stack(xs)


def _np_am_loss(p_fine, p_base, obs, xs, adjoints, num_steps, *, residual=False):
    h = 1.0 / num_steps
    total = 0.0
    for i in range(num_steps):
        t = i * h
        sigma = np.sqrt(_np_sigma2(t, h))
        control = _np_v(p_fine, t, xs[i], obs)
        if not residual:
            control = control - _np_v(p_base, t, xs[i], obs)
        total += np.sum((2.0 * control / sigma + sigma * adjoints[i]) ** 2)
    return total


def _np_basic_adjoint(p_fine, p_base, obs, xs, a_terminal, num_steps, *, scale, residual):
    """BAM's exact discrete adjoint with the hand-written tanh Jacobians (all at X_i)."""
    h = 1.0 / num_steps
    eye = np.eye(D)
    a = (eye + h * _np_jac(p_base, (num_steps - 1) * h, xs[num_steps - 1], obs)).T @ a_terminal
    out = [a]
    for i in reversed(range(num_steps - 1)):
        t = i * h
        x = xs[i]
        jac_fine, jac_base = _np_jac(p_fine, t, x, obs), _np_jac(p_base, t, x, obs)
        jac_drift = jac_fine + jac_base if residual else jac_fine
        step = eye + h * (2.0 * jac_drift - eye / (t + h))
        diff = _np_v(p_fine, t, x, obs) - (0.0 if residual else _np_v(p_base, t, x, obs))
        jac_diff = jac_fine if residual else jac_fine - jac_base
        a = step.T @ a + scale * 4.0 / _np_sigma2(t, h) * jac_diff.T @ diff
        out.append(a)
    return np.stack(out[::-1])


def _np_inputs(seed, num_steps):
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal(M)
    noise = rng.standard_normal((num_steps, D))
    return obs, noise, rng.standard_normal(D)


# --------------------------------------------------------------------------------------------
# 3. The lean adjoint's state index, on a nonlinear base.


@pytest.mark.parametrize("num_steps", [1, 2, 10])
def test_lean_adjoint_nonlinear_base_uses_state_x_i_and_time_t_next(num_steps):
    p_base = _params(0)
    rng = np.random.default_rng(1)
    xs = 1.5 * rng.standard_normal((num_steps + 1, D))  # any states: the recursion is pathwise
    obs, a_terminal = rng.standard_normal(M), rng.standard_normal(D)
    expected = _np_lean_adjoint(p_base, xs, obs, a_terminal, num_steps)
    # The oracle tells the two state indices apart on this field (so this test can fail).
    mutated = _np_lean_adjoint(p_base, xs, obs, a_terminal, num_steps, state_offset=1)
    assert np.max(np.abs(expected - mutated)) > 1e-2
    if num_steps == 1:  # A_0 = 2 J_B(X_0, 1)^T A_1
        np.testing.assert_allclose(
            expected[0], 2.0 * _np_jac(p_base, 1.0, xs[0], obs).T @ a_terminal, rtol=1e-14
        )

    with jax.enable_x64(True):
        traj = qam.SDETrajectory(xs=jnp.asarray(xs), ts=qam.time_grid(num_steps, jnp.float64))
        adjoints = qam.lean_adjoint(
            _jax_field(p_base), jnp.asarray(obs), traj, jnp.asarray(a_terminal)
        )
        assert adjoints.dtype == jnp.float64 and adjoints.shape == (num_steps, D)
        np.testing.assert_allclose(adjoints, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("num_steps", [1, 2, 10])
def test_basic_adjoint_nonlinear_fields_against_numpy(num_steps, residual):
    p_fine, p_base = _params(2), _params(3)
    obs, noise, a_terminal = _np_inputs(4, num_steps)
    xs = _np_rollout(p_fine, p_base, obs, noise, num_steps, residual=residual)
    scale = 0.7
    expected = _np_basic_adjoint(
        p_fine, p_base, obs, xs, a_terminal, num_steps, scale=scale, residual=residual
    )
    with jax.enable_x64(True):
        fine, base = _jax_field(p_fine), _jax_field(p_base)
        traj = qam.memoryless_sde_sample(
            fine, base, jnp.asarray(obs), noise=jnp.asarray(noise), num_steps=num_steps,
            residual=residual,
        )  # fmt: skip
        np.testing.assert_allclose(traj.xs, xs, rtol=RTOL, atol=ATOL)
        adjoints = qam.basic_adjoint(
            fine, base, jnp.asarray(obs), traj, jnp.asarray(a_terminal),
            running_cost_scale=scale, residual=residual,
        )  # fmt: skip
        np.testing.assert_allclose(adjoints, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("num_steps", [1, 2, 10])
def test_rollout_adjoint_and_losses_nonlinear_against_numpy(num_steps, residual):
    # The whole chain on nonlinear fields and a nonlinear reward: built-in and diffrax rollouts,
    # lean adjoint, composed loss and fused loss, against one float64 NumPy computation.
    p_fine, p_base = _params(5), _params(6)
    obs, noise, _ = _np_inputs(7, num_steps)
    inv_temp = 1.7  # reward r(a) = inv_temp * sum(sin(a)): A_K = -inv_temp * cos(X_K)
    xs = _np_rollout(p_fine, p_base, obs, noise, num_steps, residual=residual)
    adjoints = _np_lean_adjoint(p_base, xs, obs, -inv_temp * np.cos(xs[-1]), num_steps)
    loss = _np_am_loss(p_fine, p_base, obs, xs, adjoints, num_steps, residual=residual)

    with jax.enable_x64(True):
        fine, base = _jax_field(p_fine), _jax_field(p_base)
        o, n = jnp.asarray(obs), jnp.asarray(noise)
        kwargs = dict(noise=n, num_steps=num_steps, residual=residual)
        traj = qam.memoryless_sde_sample(fine, base, o, **kwargs)
        traj_diffrax = qam.memoryless_sde_sample(fine, base, o, solver=diffrax.Euler(), **kwargs)
        for t in (traj, traj_diffrax):
            np.testing.assert_allclose(t.xs, xs, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(t.ts, np.arange(num_steps + 1) / num_steps, rtol=1e-15)
        lean = qam.lean_adjoint(base, o, traj, -inv_temp * jnp.cos(traj.action))
        np.testing.assert_allclose(lean, adjoints, rtol=RTOL, atol=ATOL)
        composed = qam.adjoint_matching_loss(fine, base, o, traj, lean, residual=residual)
        fused, fused_traj = qam.fused_adjoint_matching_loss(
            fine, base, o, lambda a: -inv_temp * jnp.cos(a), **kwargs
        )
        np.testing.assert_allclose(fused_traj.xs, xs, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(composed, loss, rtol=RTOL)
        np.testing.assert_allclose(fused, loss, rtol=RTOL)


# --------------------------------------------------------------------------------------------
# 2. One flow step (K = 1).


def test_one_flow_step_closed_form():
    """K = 1: h = 1, no noisy step, X_1 = X_0 + v_B(0, X_0); A_0 = 2 J_B(X_0, 1)^T A_1;
    sigma_0 = 2; L = || (v - v_B)(0, X_0) + 2 A_0 ||^2; BAM's A_0 = (I + J_B(X_0, 0))^T A_1;
    deployment is one Euler step X_0 + v(0, X_0)."""
    p_fine, p_base = _params(8), _params(9)
    obs, noise, a_terminal = _np_inputs(10, 1)
    x0 = noise[0]
    x1 = x0 + _np_v(p_base, 0.0, x0, obs)
    a0 = 2.0 * _np_jac(p_base, 1.0, x0, obs).T @ a_terminal
    loss = np.sum((_np_v(p_fine, 0.0, x0, obs) - _np_v(p_base, 0.0, x0, obs) + 2.0 * a0) ** 2)
    basic = (np.eye(D) + _np_jac(p_base, 0.0, x0, obs)).T @ a_terminal
    deployed = x0 + _np_v(p_fine, 0.0, x0, obs)

    with jax.enable_x64(True):
        fine, base = _jax_field(p_fine), _jax_field(p_base)
        o, n, a1 = jnp.asarray(obs), jnp.asarray(noise), jnp.asarray(a_terminal)
        np.testing.assert_allclose(qam.memoryless_sigma(jnp.asarray(0.0), 1.0), 2.0, rtol=1e-15)
        traj = qam.memoryless_sde_sample(fine, base, o, noise=n, num_steps=1)
        assert traj.xs.shape == (2, D) and traj.num_steps == 1
        np.testing.assert_allclose(traj.xs, np.stack([x0, x1]), rtol=RTOL, atol=ATOL)
        # The fine velocity does not enter the rollout at K = 1.
        other = qam.memoryless_sde_sample(_jax_field(_params(11)), base, o, noise=n, num_steps=1)
        np.testing.assert_array_equal(other.xs, traj.xs)
        lean = qam.lean_adjoint(base, o, traj, a1)
        np.testing.assert_allclose(lean, a0[None], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(
            qam.adjoint_matching_loss(fine, base, o, traj, lean), loss, rtol=RTOL
        )
        fused, _ = qam.fused_adjoint_matching_loss(
            fine, base, o, lambda a: a1, noise=n, num_steps=1
        )
        np.testing.assert_allclose(fused, loss, rtol=RTOL)
        np.testing.assert_allclose(
            qam.basic_adjoint(fine, base, o, traj, a1), basic[None], rtol=RTOL, atol=ATOL
        )
        for solver in (None, diffrax.Euler()):
            np.testing.assert_allclose(
                qam.ode_sample(fine, o, noise=n[0], num_steps=1, solver=solver, clip=False),
                deployed,
                rtol=RTOL,
                atol=ATOL,
            )

        # The fused loss's gradient is the composed one's (d/dtheta of the single term).
        def composed_loss(f):
            t = qam.memoryless_sde_sample(f, base, o, noise=n, num_steps=1)
            return qam.adjoint_matching_loss(f, base, o, t, qam.lean_adjoint(base, o, t, a1))

        def fused_loss(f):
            return qam.fused_adjoint_matching_loss(f, base, o, lambda a: a1, noise=n, num_steps=1)[
                0
            ]

        g_composed, g_fused = jax.grad(composed_loss)(fine), jax.grad(fused_loss)(fine)
        for g1, g2 in zip(jax.tree.leaves(g_composed), jax.tree.leaves(g_fused)):
            np.testing.assert_allclose(g1, g2, rtol=RTOL, atol=ATOL)
        assert float(jnp.max(jnp.abs(g_fused.w))) > 0


def test_one_flow_step_from_a_key_and_errors(getkey):
    key = getkey()
    base = qam.nn.VelocityNetwork(M, D, (8,), key=getkey())
    traj = qam.memoryless_sde_sample(base, base, jnp.ones(M), key=key, action_dim=D, num_steps=1)
    np.testing.assert_array_equal(traj.xs[0], jax.random.normal(key, (1, D))[0])
    with pytest.raises(ValueError, match="at least 1"):
        qam.memoryless_sde_sample(base, base, jnp.ones(M), key=key, action_dim=D, num_steps=0)
    short = qam.SDETrajectory(xs=jnp.zeros((1, D)), ts=jnp.zeros((1,)))
    with pytest.raises(ValueError, match="at least 1 flow step"):
        qam.lean_adjoint(base, jnp.ones(M), short, jnp.zeros(D))
    with pytest.raises(ValueError, match="flow_steps"):
        QAMConfig(flow_steps=0)


# --------------------------------------------------------------------------------------------
# Agents: K = 1 and inv_temp = 0.

OBS, A, H, B = 4, 2, 2, 6
TINY = dict(actor_hidden=(16, 16), critic_hidden=(16, 16), num_qs=2, horizon=H)


def _batch(key):
    return random_chunk_batch(key, batch=B, horizon=H, obs_dim=OBS, action_dim=A)


_act = eqx.filter_jit(agent.act)


def _with_distinct_targets(state, config, key):
    """Targets that differ from the online networks, so the test sees which one is used."""
    other = agent.init(key, jnp.zeros(OBS), jnp.zeros(A), config)
    return eqx.tree_at(
        lambda s: (s.targets["critic"], s.targets["actor_slow"]),
        state,
        (other.params.critic, other.params.actor_slow),
    )


def test_agent_with_one_flow_step(getkey):
    # QAM-EDIT, the variant of the paper's sensitivity study (its AM term and flow ODE are
    # plain QAM's; one compiled update keeps the test short).
    config = QAMConfig(**TINY, flow_steps=1, inv_temp=2.0, variant="qam-edit", edit_scale=0.1)
    state = agent.init(getkey(), jnp.zeros(OBS), jnp.zeros(A), config)
    state = _with_distinct_targets(state, config, getkey())
    batch, key = _batch(getkey()), getkey()
    new, metrics = jax.jit(agent.update)(state, batch, key=key)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in metrics.values())
    assert int(new.step) == 1

    # The AM term is the K = 1 closed form on the agent's own noise: X_0 from the rollout key,
    # base = EMA flow at times 0 and 1, terminal adjoint from the target critic at clip(X_1).
    keys = jax.random.split(jax.random.split(key, 5)[2], B)
    base, critic = state.targets["actor_slow"], state.targets["critic"]
    fast = state.params.actor_fast

    def one(o, k):
        x0 = jax.random.normal(k, (1, H * A))[0]
        x1 = x0 + base(0.0, x0, o)
        a1 = -config.inv_temp * jax.grad(lambda a: jnp.mean(critic(o, jnp.clip(a, -1, 1))))(x1)
        a0 = 2.0 * jax.vjp(lambda x: base(1.0, x, o), x0)[1](a1)[0]
        return jnp.sum((fast(0.0, x0, o) - base(0.0, x0, o) + 2.0 * a0) ** 2)

    expected = jax.jit(lambda o, k: jnp.mean(jax.vmap(one)(o, k)))(batch.observations, keys)
    # A mean of sums of squares: no cancellation, so a float32 relative tolerance holds.
    np.testing.assert_allclose(metrics["am_loss"], expected, rtol=1e-5)

    # Deployment: one Euler step of actor_fast from the action noise, then the edit.
    obs = batch.observations[0]
    act_key = getkey()
    z = jax.random.normal(jax.random.split(act_key)[0], (H * A,))
    flow_action = jnp.clip(z + state.params.actor_fast(0.0, z, obs), -1.0, 1.0)
    assert state.params.edit is not None
    flow_action, _ = qam.agents.edit_actions(
        state.params.edit, obs, flow_action, edit_scale=0.1, key=jax.random.split(act_key)[1]
    )
    np.testing.assert_allclose(_act(state, obs, key=act_key), flow_action, rtol=1e-6, atol=1e-6)


@eqx.filter_jit
def _ode_actions(velocity, obs, z, num_steps):
    return jax.vmap(lambda o, z_: qam.ode_sample(velocity, o, noise=z_, num_steps=num_steps))(
        obs, z
    )


@pytest.mark.parametrize("variant", ["qam-fql", "qam-edit"])
def test_zero_inv_temp_trains_the_extra_policy_on_actor_slow(variant, getkey):
    """With inv_temp = 0, the one-step / edit policy is trained on actor_slow's ODE actions, the
    ones it acts on (the authors' code trains it on actor_fast's): a deliberate difference."""
    extra = {"fql_alpha": 10.0} if variant == "qam-fql" else {"edit_scale": 0.5}
    extra["variant"] = variant
    config = QAMConfig(**TINY, flow_steps=3, inv_temp=0.0, **extra)
    state = agent.init(getkey(), jnp.zeros(OBS), jnp.zeros(A), config)
    batch, key = _batch(getkey()), getkey()
    _, metrics = jax.jit(agent._loss)(state.params, state, batch, key)

    keys = jax.random.split(key, 5)
    obs = batch.observations
    z = jax.random.normal(keys[3], (B, H * A))
    slow = _ode_actions(state.params.actor_slow, obs, z, config.flow_steps)
    fast = _ode_actions(state.params.actor_fast, obs, z, config.flow_steps)

    if variant == "qam-fql":
        one_step = state.params.one_step
        assert one_step is not None
        pred = jax.vmap(lambda o, z_: one_step(jnp.concatenate([o, z_])))(obs, z)
        names = ("distill_loss",)

        def metric_values(flow_actions):
            return {"distill_loss": jnp.mean((flow_actions - pred) ** 2)}
    else:
        edit = state.params.edit
        assert edit is not None
        edit_keys = jax.random.split(keys[4], B)
        names = ("edit_q", "entropy")

        def metric_values(flow_actions):
            edited, log_prob = jax.vmap(
                lambda o, a, k: qam.agents.edit_actions(edit, o, a, edit_scale=0.5, key=k)
            )(obs, flow_actions, edit_keys)
            return {
                "edit_q": jnp.mean(state.params.critic.batched(obs, edited)),
                "entropy": -jnp.mean(log_prob),
            }

    with_slow, with_fast = jax.jit(lambda a, b: (metric_values(a), metric_values(b)))(slow, fast)
    for name in names:
        scale = float(jnp.abs(with_slow[name])) + 1e-6
        np.testing.assert_allclose(metrics[name], with_slow[name], rtol=1e-5, atol=1e-6 * scale)
        # actor_fast's ODE actions would give a clearly different value.
        assert abs(float(metrics[name] - with_fast[name])) > 1e-3 * scale, name
    assert float(jnp.max(jnp.abs(slow - fast))) > 1e-2

    # Deployment uses actor_slow as well (the edit is added to actor_slow's ODE action).
    if variant == "qam-edit":
        assert state.params.edit is not None
        o, act_key = obs[0], getkey()
        noise_key, edit_key = jax.random.split(act_key)
        z0 = jax.random.normal(noise_key, (H * A,))
        flow_action = qam.ode_sample(
            state.params.actor_slow, o, noise=z0, num_steps=config.flow_steps
        )
        expected, _ = qam.agents.edit_actions(
            state.params.edit, o, flow_action, edit_scale=0.5, key=edit_key
        )
        np.testing.assert_allclose(_act(state, o, key=act_key), expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 1. LayerNorm epsilon.


def _textbook_layer_norm(x, weight, bias, eps):
    mean = jnp.mean(x)
    return (x - mean) / jnp.sqrt(jnp.mean((x - mean) ** 2) + eps) * weight + bias


def _norm_eps(net):
    """The epsilons of an MLP's LayerNorms (static fields, so `eval_shape` nets suffice)."""
    assert net.norms is not None
    return {n.eps for n in net.norms}


def test_layer_norm_default_epsilon_is_flax_and_is_plumbed():
    # Built with `eqx.filter_eval_shape`: the epsilon is a static field, so no weights are made.
    key = jax.random.PRNGKey(0)
    build = lambda cls, *args, **kwargs: eqx.filter_eval_shape(cls, *args, key=key, **kwargs)
    assert qam.nn.DEFAULT_LAYER_NORM_EPS == 1e-6
    assert qam.nn.LayerNorm(4).eps == 1e-6 and qam.nn.LayerNorm(4, eps=1e-3).eps == 1e-3
    for eps in (None, 1e-4):
        kw = {} if eps is None else {"layer_norm_eps": eps}
        expected = {1e-6 if eps is None else eps}
        networks = {
            "mlp": build(qam.nn.MLP, 3, 1, (4, 4), layer_norm=True, **kw),
            "mlp-final": build(qam.nn.MLP, 3, 1, (4,), layer_norm=True, activate_final=True, **kw),
            "velocity": build(qam.nn.VelocityNetwork, 2, 2, (4,), layer_norm=True, **kw).mlp,
            "critic": build(qam.nn.CriticEnsemble, 2, 2, (4,), num_critics=2, **kw).members,
            "edit": build(qam.nn.TanhGaussianPolicy, 2, 2, (4, 4), layer_norm=True, **kw).trunk,
        }
        for name, net in networks.items():
            assert _norm_eps(net) == expected, name
        # The agent's networks take `QAMConfig.layer_norm_eps` (default 1e-6).
        config = QAMConfig(**TINY, actor_layer_norm=True, variant="qam-fql", fql_alpha=1.0, **kw)
        state = eqx.filter_eval_shape(agent.init, key, jnp.zeros(OBS), jnp.zeros(A), config)
        p = state.params
        for net in (p.critic.members, p.actor_slow.mlp, p.actor_fast.mlp):
            assert _norm_eps(net) == expected
        assert p.one_step is not None and _norm_eps(p.one_step) == expected
    with pytest.raises(ValueError, match="eps"):
        qam.nn.LayerNorm(4, eps=-1.0)
    with pytest.raises(ValueError, match="layer_norm_eps"):
        QAMConfig(layer_norm_eps=-1.0)


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_layer_norm_epsilon_values_and_derivatives(eps):
    # Features of variance ~1e-5, where the epsilon matters (1e-5 vs 1e-6 changes the output
    # by ~25%), checked in float64 against equinox's LayerNorm and the textbook formula
    # differentiated by autodiff (reverse, forward, second order).
    n = 16
    rng = np.random.default_rng(12)
    x_np = 0.3 + 3e-3 * rng.standard_normal(n)
    weight_np, bias_np, cotangent_np, tangent_np = rng.standard_normal((4, n))
    other_eps = 1e-5 if eps == 1e-6 else 1e-6

    with jax.enable_x64(True):
        x, weight, bias, cotangent, tangent = (
            jnp.asarray(a) for a in (x_np, weight_np, bias_np, cotangent_np, tangent_np)
        )
        norm = qam.nn.LayerNorm(n, eps=eps)
        norm = eqx.tree_at(lambda m: (m.weight, m.bias), norm, (weight, bias))
        theirs = eqx.nn.LayerNorm(n, eps=eps, dtype=jnp.float64)
        theirs = eqx.tree_at(lambda m: (m.weight, m.bias), theirs, (weight, bias))

        def textbook(x_, w_, b_, eps_=eps):
            return _textbook_layer_norm(x_, w_, b_, eps_)

        def ours(x_, w_, b_):
            return eqx.tree_at(lambda m: (m.weight, m.bias), norm, (w_, b_))(x_)

        @jax.jit
        def compute(x, weight, bias, cotangent, tangent):
            args = (x, weight, bias)
            sin_sum = lambda f: lambda x_: jnp.sum(jnp.sin(f(x_, weight, bias)))
            return {
                "value": (ours(*args), textbook(*args)),
                "equinox": (ours(*args), theirs(x)),
                "other_eps": (ours(*args), textbook(*args, other_eps)),
                "vjp": (jax.vjp(ours, *args)[1](cotangent), jax.vjp(textbook, *args)[1](cotangent)),
                "jvp": (
                    jax.jvp(lambda x_: ours(x_, weight, bias), (x,), (tangent,))[1],
                    jax.jvp(lambda x_: textbook(x_, weight, bias), (x,), (tangent,))[1],
                ),
                "hessian": (jax.hessian(sin_sum(ours))(x), jax.hessian(sin_sum(textbook))(x)),
            }

        out = compute(x, weight, bias, cotangent, tangent)
        assert out["value"][0].dtype == jnp.float64
        ours_other, textbook_other = out.pop("other_eps")
        assert float(jnp.max(jnp.abs(ours_other - textbook_other))) > 1e-2  # eps is really used
        # The value has no cancellation: float64 agreement to ~1e-15. The derivatives are of
        # size ~1/sqrt(var) ~ 300 and differ in summation order: relative to their magnitude.
        tolerances = {"value": 1e-12, "equinox": 1e-12, "vjp": 1e-9, "jvp": 1e-9, "hessian": 1e-7}
        for name, (mine, reference) in out.items():
            for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(reference)):
                scale = float(jnp.max(jnp.abs(b)))
                tol = tolerances[name]
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=name)


def test_mlp_with_layer_norm_uses_the_configured_epsilon(getkey):
    # An MLP with a LayerNorm, hand-evaluated with the textbook formula and epsilon 1e-6.
    with jax.enable_x64(True):
        mlp = qam.nn.MLP(5, 2, (8,), layer_norm=True, key=getkey())
        mlp = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, mlp)
        assert mlp.norms is not None
        x = jax.random.normal(getkey(), (5,), jnp.float64)

        @jax.jit
        def compute(mlp, x):
            hidden = jax.nn.gelu(mlp.layers[0].weight @ x + mlp.layers[0].bias)
            norm = mlp.norms[0]
            normed = _textbook_layer_norm(hidden, norm.weight, norm.bias, 1e-6)
            return mlp(x), mlp.layers[1].weight @ normed + mlp.layers[1].bias

        mine, expected = compute(mlp, x)
        np.testing.assert_allclose(mine, expected, rtol=1e-12, atol=1e-12)
