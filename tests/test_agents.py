"""QAM agents: gradient routing, determinism, acting, TD target and edit entropy by hand."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_chunk_batch

import qam
from qam.agents import AGENTS, QAMConfig, aggregate_q, qam as agent, td_term
from qam.data import SequenceBatch


OBS, A, H, B = 5, 2, 3, 8
TINY = dict(actor_hidden=(16, 16), critic_hidden=(16, 16), num_qs=3, horizon=H, flow_steps=4)
VARIANTS = {
    "qam": AGENTS["qam"].config(**TINY, inv_temp=1.0),
    "qam-fql": AGENTS["qam-fql"].config(**TINY, inv_temp=1.0, fql_alpha=10.0),
    "qam-edit": AGENTS["qam-edit"].config(**TINY, inv_temp=1.0, edit_scale=0.1),
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
        assert _changed(getattr(state.params, name), getattr(new.params, name)), name
    # Targets move from the pre-update online parameters: tau * online + (1 - tau) * target,
    # and the first target equals the online network, so the target does not move at step 1.
    _assert_polyak_close(state.targets["critic"], new.targets["critic"])
    assert int(new.step) == 1
    assert (new.params.one_step is not None) == (variant == "qam-fql")
    assert (new.params.edit is not None) == (variant == "qam-edit")
    if variant == "qam-fql":
        assert _changed(state.params.one_step, new.params.one_step)
    if variant == "qam-edit":
        assert _changed(state.params.edit, new.params.edit)
        assert not np.array_equal(state.params.log_alpha, new.params.log_alpha)
    again, _ = _update(state, batch, key=key)
    assert not _changed(new, again)
    # Second step: the target moves by tau * (online_1 - target_1), computed from pre-update.
    newer, _ = _update(new, batch, key=getkey())
    expected = jax.tree.map(
        lambda o, t: config.tau * o + (1 - config.tau) * t,
        eqx.filter(new.params.critic, eqx.is_inexact_array),
        eqx.filter(new.targets["critic"], eqx.is_inexact_array),
    )
    _assert_polyak_close(expected, newer.targets["critic"])


def test_each_loss_moves_only_its_network(getkey):
    # Gradient routing: the flow loss moves only actor_slow, the AM loss only actor_fast,
    # the critic loss only the critic (checked by differentiating each term separately).
    config = VARIANTS["qam-edit"]
    state = agent.init(getkey(), jnp.zeros(OBS), jnp.zeros(A), config)
    batch, key = _batch(getkey()), getkey()
    dynamic, static = eqx.partition(state.params, eqx.is_inexact_array)

    metrics_fn = lambda d: agent._loss(eqx.combine(d, static), state, batch, key)[1]
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
        lambda s: (s.targets["critic"], s.targets["actor_slow"]),
        state,
        (
            agent.init(getkey(), jnp.zeros(OBS), jnp.zeros(A), config).params.critic,
            agent.init(getkey(), jnp.zeros(OBS), jnp.zeros(A), config).params.actor_slow,
        ),
    )
    batch, key = _batch(getkey()), getkey()
    dynamic, static = eqx.partition(state.params, eqx.is_inexact_array)
    am_value, am_grad = jax.jit(
        jax.value_and_grad(
            lambda d: agent._loss(eqx.combine(d, static), state, batch, key)[1]["am_loss"]
        )
    )(dynamic)

    keys = jax.random.split(jax.random.split(key, 5)[2], B)
    base, critic = state.targets["actor_slow"], state.targets["critic"]

    def reference(actor_fast):
        def one(o, k):
            traj = qam.memoryless_sde_sample(
                actor_fast, base, o, key=k, action_dim=H * A, num_steps=config.flow_steps
            )
            dq = jax.grad(lambda a: jnp.mean(critic(o, jnp.clip(a, -1.0, 1.0))))(traj.action)
            adjoint = qam.lean_adjoint(base, o, traj, -config.inv_temp * dq)
            return qam.adjoint_matching_loss(actor_fast, base, o, traj, adjoint)

        return jnp.mean(jax.vmap(one)(batch.observations, keys))

    reference_grad = eqx.filter_jit(eqx.filter_value_and_grad(reference))
    ref_value, ref_grad = reference_grad(state.params.actor_fast)
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


def test_td_term_hand_computed(getkey, x64):
    # Known Q-values of a two-member critic; target y = R_{H-1} + gamma^H mask (mean - rho std).
    q = jnp.array([[1.0, 3.0], [1.0, 3.0]])  # Q_e(s_b, a_b) of a two-member critic
    batch = SequenceBatch(
        observations=jnp.zeros((2, 1)),
        actions=jnp.zeros((2, 2, 1)),
        rewards=jnp.array([[-1.0, -1.9], [0.0, -0.5]]),
        masks=jnp.array([[1.0, 1.0], [1.0, 0.0]]),
        valid=jnp.array([[1.0, 1.0], [1.0, 1.0]]),
        next_observations=jnp.zeros((2, 2, 1)),
    )
    next_q = jnp.array([[2.0, 4.0], [10.0, 10.0]])  # mean 3, std 1; mean 10, std 0
    next_value = aggregate_q(next_q, how="pessimistic", rho=0.5)
    loss, metrics = td_term(q, batch, next_value, discount=0.9)
    y0 = -1.9 + 0.81 * (3.0 - 0.5)
    y1 = -0.5  # mask 0 cuts the bootstrap
    expected = ((1 - y0) ** 2 + (3 - y0) ** 2 + (1 - y1) ** 2 + (3 - y1) ** 2) / 4
    # Float64: y0 = -1.9 + 2.025 cancels, which in float32 leaves only ~6 significant digits.
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(loss, expected, rtol=F64_RTOL)
    np.testing.assert_allclose(metrics["target_mean"], (y0 + y1) / 2, rtol=F64_RTOL)


def test_pessimistic_aggregate_and_its_gradient_where_the_members_agree(x64):
    q = jnp.array([[1.0, 3.0, 2.0], [0.5, 0.5, 0.5]])
    got = aggregate_q(q, how="pessimistic", rho=0.5)
    np.testing.assert_allclose(got, [2.0 - 0.5 * np.sqrt(2.0 / 3.0), 0.5], rtol=1e-15)
    # d std / d q_e = (q_e - mean) / (E std): finite where the members differ; 0 where they
    # agree exactly (jnp.std's gradient is NaN there), and one critic is just the mean.
    grad = jax.grad(lambda q: aggregate_q(q, how="pessimistic", rho=0.5).sum())(q)
    std = np.sqrt(2.0 / 3.0)
    expected_row0 = 1 / 3 - 0.5 * (np.array([1.0, 3.0, 2.0]) - 2.0) / (3 * std)
    np.testing.assert_allclose(grad, [expected_row0, [1 / 3] * 3], rtol=1e-14)
    one = jax.grad(lambda q: aggregate_q(q, how="pessimistic", rho=0.5).sum())(q[:, :1])
    np.testing.assert_array_equal(one, np.ones((2, 1)))


def test_edit_entropy_terms_hand_computed(getkey, x64):
    # Float64: entropy - H_target may cancel, which float32 would leave with few digits.
    config = VARIANTS["qam-edit"]
    state = agent.init(getkey(), jnp.zeros(OBS), jnp.zeros(A), config)
    state = eqx.tree_at(lambda s: s.params.log_alpha, state, jnp.asarray(np.log(0.5)))
    _, metrics = agent._loss(state.params, state, _batch(getkey()), getkey())
    # L_alpha = alpha * (entropy - H_target), H_target = -0.5 * D.
    target = -0.5 * H * A
    assert metrics["alpha_loss"].dtype == jnp.float64
    expected = 0.5 * (metrics["entropy"] - target)
    np.testing.assert_allclose(metrics["alpha_loss"], expected, rtol=F64_RTOL, atol=F64_ATOL)


def test_config_errors_and_presets():
    with pytest.raises(ValueError, match=r"edit_scale=.*must be 0 for variant qam-fql"):
        QAMConfig(variant="qam-fql", fql_alpha=1.0, edit_scale=0.1)
    with pytest.raises(ValueError, match=r"fql_alpha=.*must be > 0 for variant qam-fql"):
        QAMConfig(variant="qam-fql")
    with pytest.raises(ValueError, match="flow_steps"):
        QAMConfig(flow_steps=0)
    with pytest.raises(ValueError, match="inv_temp"):
        QAMConfig(inv_temp=float("nan"))
    with pytest.raises(ValueError, match="actor_hidden"):
        QAMConfig(actor_hidden=(16, 0))
    with pytest.raises(ValueError, match="known domains"):
        AGENTS["qam"].paper_config("walker-run-v0")
    c = AGENTS["qam-edit"].paper_config("cube-triple-play-singletask-task2-v0")
    assert (c.variant, c.inv_temp, c.edit_scale, c.horizon, c.discount) == (
        "qam-edit", 3.0, 0.1, 5, 0.99,
    )  # fmt: skip
    c = AGENTS["qam-fql"].paper_config("humanoidmaze-large-navigate-singletask-task1-v0")
    assert (c.inv_temp, c.fql_alpha, c.horizon, c.discount, c.rho) == (0.3, 30.0, 1, 0.995, 0.0)
    # The paper's QAM-EDIT with edit_scale 0 on scene is plain QAM.
    c = AGENTS["qam-edit"].paper_config("scene-play-singletask-task1-v0")
    assert (c.variant, c.edit_scale, c.inv_temp) == ("qam", 0.0, 1.0)
    assert qam.agents.domain_of("puzzle-4x4-play-singletask-task3-v0") == "puzzle-4x4-play"


# Outputs of the QAM family's update before it moved onto the shared agent interface (commit
# 26ceaba, float64, tests/data/qam_update_reference.npz): same init key, batch and update
# keys. The refactor must not change a single number beyond reduction-order rounding.
REFERENCE_CASES = {
    "qam": ("qam", dict(inv_temp=1.0)),
    "qam_residual": ("qam", dict(inv_temp=1.0, residual=True, target_actor=False,
                                 use_target_grad=False)),
    "qam_fql": ("qam-fql", dict(inv_temp=1.0, fql_alpha=10.0)),
    "qam_edit": ("qam-edit", dict(inv_temp=1.0, edit_scale=0.1, best_of_n=3)),
    "qam_edit_t0": ("qam-edit", dict(inv_temp=0.0, edit_scale=0.1)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_update_equals_the_pre_interface_implementation(case, x64):
    import os

    reference = np.load(os.path.join(os.path.dirname(__file__), "data", "qam_update_reference.npz"))
    name, overrides = REFERENCE_CASES[case]
    config = AGENTS[name].config(
        actor_hidden=(16, 16), critic_hidden=(16, 16), num_qs=3, horizon=3, flow_steps=4,
        **overrides,
    )  # fmt: skip
    state = agent.init(jax.random.PRNGKey(1), jnp.zeros(5), jnp.zeros(2), config)
    batch = random_chunk_batch(jax.random.PRNGKey(2), batch=8, horizon=3, obs_dim=5, action_dim=2)
    batch = jax.tree.map(lambda x: x.astype(jnp.float64), batch)
    batch = batch._replace(valid=batch.valid.at[0, -1].set(0.0))
    update = jax.jit(agent.update)
    for i in range(2):
        state, metrics = update(state, batch, key=jax.random.PRNGKey(10 + i))
    p, t = state.params, state.targets
    modules = dict(critic=p.critic, target_critic=t["critic"], actor_slow=p.actor_slow,
                   target_actor_slow=t["actor_slow"], actor_fast=p.actor_fast,
                   one_step=p.one_step, edit=p.edit, log_alpha=p.log_alpha)  # fmt: skip
    compared = 0
    for module_name, module in modules.items():
        leaves = jax.tree.leaves(eqx.filter(module, eqx.is_inexact_array))
        assert (module is None) == (f"{case}/{module_name}/0" not in reference), module_name
        for j, leaf in enumerate(leaves):
            expected = reference[f"{case}/{module_name}/{j}"]
            assert leaf.dtype == jnp.float64
            np.testing.assert_allclose(leaf, expected, rtol=F64_RTOL, atol=F64_ATOL)
            compared += 1
    assert compared >= 20
    for key, value in metrics.items():
        np.testing.assert_allclose(value, reference[f"{case}/metric/{key}"], rtol=F64_RTOL)
    chunk = jax.jit(agent.act)(state, batch.observations[1], key=jax.random.PRNGKey(7))
    np.testing.assert_allclose(chunk, reference[f"{case}/act"], rtol=F64_RTOL, atol=F64_ATOL)
