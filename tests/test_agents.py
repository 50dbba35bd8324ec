"""QAM agents: gradient routing, determinism, acting, TD target and edit entropy by hand."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_chunk_batch

import qam
from qam.agents import ChunkBatch, QAMConfig, critic_loss, qam as agent


pytestmark = pytest.mark.standard_promotion

OBS, A, H, B = 5, 2, 3, 8
TINY = dict(actor_hidden=(16, 16), critic_hidden=(16, 16), num_qs=3, horizon=H, flow_steps=4)
VARIANTS = {
    "qam": QAMConfig(**TINY, inv_temp=1.0),
    "qam-fql": QAMConfig(**TINY, inv_temp=1.0, fql_alpha=10.0),
    "qam-edit": QAMConfig(**TINY, inv_temp=1.0, edit_scale=0.1),
}
_update = jax.jit(agent.update)


def _batch(key):
    """One example with its last step invalid, so the `valid` weighting is exercised."""
    batch = random_chunk_batch(key, batch=B, horizon=H, obs_dim=OBS, action_dim=A)
    return batch._replace(valid=batch.valid.at[0, -1].set(0.0))


EPS32 = float(np.finfo(np.float32).eps)
# Float64 comparisons of two evaluation orders of the same losses: rounding ~1e-15 relative.
F64_RTOL, F64_ATOL = 1e-10, 1e-12


def _assert_polyak_close(expected, actual):
    """Float32 Polyak targets `tau * online + (1 - tau) * target` against the same average
    computed here: each side costs 3 roundings (two products, a sum, each <= eps32 / 2) of
    terms no larger than the leaf's largest entry, so the two agree to 3 eps32 of that scale;
    4 eps32 is allowed. Averaging the post-update online parameters instead moves each entry by
    ~tau * lr = 1.5e-6, 3-5x that tolerance."""
    a_leaves = jax.tree.leaves(eqx.filter(expected, eqx.is_inexact_array))
    b_leaves = jax.tree.leaves(eqx.filter(actual, eqx.is_inexact_array))
    assert len(a_leaves) == len(b_leaves)
    for x, y in zip(a_leaves, b_leaves):
        assert x.dtype == y.dtype == jnp.float32
        scale = float(np.max(np.abs(x))) if x.size else 0.0
        np.testing.assert_allclose(y, x, rtol=0, atol=4 * EPS32 * scale)


def _changed(a, b):
    leaves = zip(jax.tree.leaves(eqx.filter(a, eqx.is_inexact_array)),
                 jax.tree.leaves(eqx.filter(b, eqx.is_inexact_array)))  # fmt: skip
    return any(not np.array_equal(x, y) for x, y in leaves)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_update_changes_the_right_networks_and_is_deterministic(variant, getkey):
    config = VARIANTS[variant]
    state = agent.init(getkey(), jnp.zeros(OBS), jnp.zeros(A), config)
    assert state.action_dim == H * A
    batch, key = _batch(getkey()), getkey()
    new, metrics = _update(state, batch, key=key)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in metrics.values())
    for name in ("critic", "actor_slow", "actor_fast"):
        assert _changed(getattr(state, name), getattr(new, name)), name
    # Targets move from the pre-update online parameters: tau * online + (1 - tau) * target,
    # and the first target equals the online network, so the target does not move at step 1.
    _assert_polyak_close(state.target_critic, new.target_critic)
    assert int(new.step) == 1
    assert (new.one_step is not None) == (variant == "qam-fql")
    assert (new.edit is not None) == (variant == "qam-edit")
    if variant == "qam-fql":
        assert _changed(state.one_step, new.one_step)
    if variant == "qam-edit":
        assert _changed(state.edit, new.edit)
        assert not np.array_equal(state.log_alpha, new.log_alpha)
    again, _ = _update(state, batch, key=key)
    assert not _changed(new, again)
    # Second step: the target moves by tau * (online_1 - target_1), computed from pre-update.
    newer, _ = _update(new, batch, key=getkey())
    expected = jax.tree.map(
        lambda o, t: config.tau * o + (1 - config.tau) * t,
        eqx.filter(new.critic, eqx.is_inexact_array),
        eqx.filter(new.target_critic, eqx.is_inexact_array),
    )
    _assert_polyak_close(expected, newer.target_critic)


def test_each_loss_moves_only_its_network(getkey):
    # Gradient routing: the flow loss moves only actor_slow, the AM loss only actor_fast,
    # the critic loss only the critic (checked by differentiating each term separately).
    config = VARIANTS["qam-edit"]
    state = agent.init(getkey(), jnp.zeros(OBS), jnp.zeros(A), config)
    batch, key = _batch(getkey()), getkey()
    params = agent._trainable(state)
    dynamic, static = eqx.partition(params, eqx.is_inexact_array)

    metrics_fn = lambda d: agent._losses(eqx.combine(d, static), state, batch, key)[1]
    names = ["critic_loss", "flow_loss", "am_loss", "edit_q", "alpha_loss"]
    # One reverse-mode Jacobian of every loss term at once (a single compiled program).
    jacobian = jax.jit(jax.jacrev(lambda d: {n: metrics_fn(d)[n] for n in names}))(dynamic)
    grads_of = lambda metric: jacobian[metric]

    def moved(grads):
        names = ("critic", "actor_slow", "actor_fast", "edit", "log_alpha")
        nonzero = lambda tree: any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(tree))
        return {name for name in names if nonzero(getattr(grads, name))}

    assert moved(grads_of("critic_loss")) == {"critic"}
    assert moved(grads_of("flow_loss")) == {"actor_slow"}
    assert moved(grads_of("am_loss")) == {"actor_fast"}
    assert moved(grads_of("edit_q")) == {"edit"}
    assert moved(grads_of("alpha_loss")) == {"log_alpha"}


def test_am_term_equals_the_composed_public_functions(getkey, x64):
    # The agent computes adjoint matching in two vmapped halves around one batched critic
    # gradient; it must equal, in value and in gradient, the spec's composition of
    # memoryless_sde_sample, lean_adjoint (terminal adjoint -inv_temp * dmean(Q)/da from the
    # target critic at the clipped action, EMA base) and adjoint_matching_loss. Float64: the
    # two orders of the same sums then agree to ~1e-15 instead of float32's ~1e-6.
    config = dataclasses.replace(VARIANTS["qam"], inv_temp=2.5)
    state = agent.init(getkey(), jnp.zeros(OBS), jnp.zeros(A), config)
    state = eqx.tree_at(  # make the target networks differ from the online ones
        lambda s: (s.target_critic, s.target_actor_slow),
        state,
        (
            agent.init(getkey(), jnp.zeros(OBS), jnp.zeros(A), config).critic,
            agent.init(getkey(), jnp.zeros(OBS), jnp.zeros(A), config).actor_slow,
        ),
    )
    batch, key = _batch(getkey()), getkey()
    params = agent._trainable(state)
    dynamic, static = eqx.partition(params, eqx.is_inexact_array)
    am_value, am_grad = jax.jit(
        jax.value_and_grad(
            lambda d: agent._losses(eqx.combine(d, static), state, batch, key)[1]["am_loss"]
        )
    )(dynamic)

    keys = jax.random.split(jax.random.split(key, 5)[2], B)
    base, critic = state.target_actor_slow, state.target_critic

    def reference(actor_fast):
        def one(o, k):
            traj = qam.memoryless_sde_sample(
                actor_fast, base, o, key=k, action_dim=H * A, num_steps=config.flow_steps
            )
            dq = jax.grad(lambda a: jnp.mean(critic(o, jnp.clip(a, -1.0, 1.0))))(traj.action)
            adjoint = qam.lean_adjoint(base, o, traj, -config.inv_temp * dq)
            return qam.adjoint_matching_loss(actor_fast, base, o, traj, adjoint)

        return jnp.mean(jax.vmap(one)(batch.observations, keys))

    ref_value, ref_grad = eqx.filter_jit(eqx.filter_value_and_grad(reference))(state.actor_fast)
    assert am_value.dtype == jnp.float64
    np.testing.assert_allclose(am_value, ref_value, rtol=F64_RTOL)
    ours = jax.tree.leaves(eqx.filter(am_grad.actor_fast, eqx.is_inexact_array))
    theirs = jax.tree.leaves(eqx.filter(ref_grad, eqx.is_inexact_array))
    assert len(ours) == len(theirs)
    for g1, g2 in zip(ours, theirs):
        np.testing.assert_allclose(g1, g2, rtol=F64_RTOL, atol=F64_ATOL)
    assert any(float(jnp.max(jnp.abs(g))) > 1e-3 for g in ours)  # not vacuously zero


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_act_returns_chunks_in_the_box(variant, getkey):
    config = dataclasses.replace(VARIANTS[variant], best_of_n=3)
    state = agent.init(getkey(), jnp.zeros(OBS), jnp.zeros(A), config)
    obs = 10.0 * jax.random.normal(getkey(), (16, OBS))
    actions = jax.vmap(lambda o, k: agent.act(state, o, key=k))(obs, jax.random.split(getkey(), 16))
    assert actions.shape == (16, H * A)
    assert bool(jnp.all(jnp.abs(actions) <= 1.0))


def test_critic_loss_hand_computed(getkey, x64):
    # Known Q-values of a two-member critic; target y = R_{H-1} + gamma^H mask (mean - rho std).
    q = jnp.array([[1.0, 3.0], [1.0, 3.0]])  # Q_e(s_b, a_b) of a two-member critic
    batch = ChunkBatch(
        observations=jnp.zeros((2, 1)),
        actions=jnp.zeros((2, 2, 1)),
        rewards=jnp.array([[-1.0, -1.9], [0.0, -0.5]]),
        masks=jnp.array([[1.0, 1.0], [1.0, 0.0]]),
        valid=jnp.array([[1.0, 1.0], [1.0, 1.0]]),
        next_observations=jnp.zeros((2, 2, 1)),
    )
    next_q = jnp.array([[2.0, 4.0], [10.0, 10.0]])  # mean 3, std 1; mean 10, std 0
    loss, metrics = critic_loss(q, batch, next_q, discount=0.9, rho=0.5)
    y0 = -1.9 + 0.81 * (3.0 - 0.5)
    y1 = -0.5  # mask 0 cuts the bootstrap
    expected = ((1 - y0) ** 2 + (3 - y0) ** 2 + (1 - y1) ** 2 + (3 - y1) ** 2) / 4
    # Float64: y0 = -1.9 + 2.025 cancels, which in float32 leaves only ~6 significant digits.
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(loss, expected, rtol=F64_RTOL)
    np.testing.assert_allclose(metrics["target_mean"], (y0 + y1) / 2, rtol=F64_RTOL)


def test_edit_entropy_terms_hand_computed(getkey, x64):
    # Float64: entropy - H_target may cancel, which float32 would leave with few digits.
    config = VARIANTS["qam-edit"]
    state = agent.init(getkey(), jnp.zeros(OBS), jnp.zeros(A), config)
    state = dataclasses.replace(state, log_alpha=jnp.asarray(np.log(0.5), jnp.float64))
    _, metrics = agent._losses(agent._trainable(state), state, _batch(getkey()), getkey())
    # L_alpha = alpha * (entropy - H_target), H_target = -0.5 * D.
    target = -0.5 * H * A
    assert metrics["alpha_loss"].dtype == jnp.float64
    expected = 0.5 * (metrics["entropy"] - target)
    np.testing.assert_allclose(metrics["alpha_loss"], expected, rtol=F64_RTOL, atol=F64_ATOL)


def test_config_errors_and_presets():
    with pytest.raises(ValueError, match="exclusive"):
        QAMConfig(fql_alpha=1.0, edit_scale=0.1)
    with pytest.raises(ValueError, match="flow_steps"):
        QAMConfig(flow_steps=0)
    with pytest.raises(ValueError, match="not one of"):
        QAMConfig.paper("sac", "cube-double-play-singletask-task2-v0")
    with pytest.raises(ValueError, match="known domains"):
        QAMConfig.paper("qam", "walker-run-v0")
    c = QAMConfig.paper("qam-edit", "cube-triple-play-singletask-task2-v0")
    assert (c.inv_temp, c.edit_scale, c.horizon, c.discount) == (3.0, 0.1, 5, 0.99)
    c = QAMConfig.paper("qam-fql", "humanoidmaze-large-navigate-singletask-task1-v0")
    assert (c.inv_temp, c.fql_alpha, c.horizon, c.discount, c.rho) == (0.3, 30.0, 1, 0.995, 0.0)
    assert qam.agents.domain_of("puzzle-4x4-play-singletask-task3-v0") == "puzzle-4x4-play"
