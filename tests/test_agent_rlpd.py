"""RLPD: every loss term by hand in float64 (the TD target without an entropy term, the actor
term with pessimism, the temperature, the BC log-density of clipped data through atanh),
gradient routing, the deployed action, config errors, the training regime it declares and the
per-domain BC table."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_chunk_batch

from qam.agents import (
    AGENTS,
    DOMAINS,
    TUNED_BC_ALPHA,
    RLPDConfig,
    domain_of,
    rlpd,
    tuned_bc_alpha,
)


OBS, A, H, B = 3, 2, 2, 8
D = H * A
# bc_alpha 0.7 (not the default 0) so the BC term shows; rho 0.5 so pessimism shows.
CONFIG = AGENTS["rlpd"].config(
    actor_hidden=(16,), critic_hidden=(16,), num_qs=3, horizon=H, bc_alpha=0.7, rho=0.5
)
F64_RTOL, F64_ATOL = 1e-10, 1e-12

_loss = jax.jit(rlpd._loss)
_init = eqx.filter_jit(rlpd.init)


def _batch(key):
    """Random chunks with example 0's last step invalid (the valid weighting shows) and data
    actions exactly at +-1 in examples 1 and 2 (atanh is infinite there without the clip)."""
    batch = random_chunk_batch(key, batch=B, horizon=H, obs_dim=OBS, action_dim=A)
    actions = batch.actions.at[1, 0, 0].set(1.0).at[2, 1, 1].set(-1.0)
    return batch._replace(valid=batch.valid.at[0, -1].set(0.0), actions=actions)


def _state(seed=0, **overrides):
    """A state whose target critic differs from the online one and whose temperature is
    alpha = 0.5 (so alpha and log alpha differ)."""
    config = dataclasses.replace(CONFIG, **overrides)
    init = lambda k: _init(jax.random.PRNGKey(k), jnp.zeros(OBS), jnp.zeros(A), config)
    state, other = init(seed), init(seed + 100)
    state = dataclasses.replace(state, targets={"critic": other.params.critic})
    return eqx.tree_at(lambda s: s.params.log_alpha, state, jnp.asarray(np.log(0.5)))


# ---- Hand computations from the networks themselves (float64) -------------------------------


def _tanh_gaussian(policy, x, key):
    """`y = tanh(mean + std xi)`, `xi = normal(key)`, and its log-density
    `sum_d [log N(u_d; mean_d, std_d) - log(1 - y_d^2)]` (one example)."""
    mean, log_std = policy.distribution(x)
    xi = jax.random.normal(key, mean.shape, mean.dtype)
    y = jnp.tanh(mean + jnp.exp(log_std) * xi)
    log_prob = jnp.sum(-0.5 * xi**2 - log_std - 0.5 * np.log(2 * np.pi) - jnp.log1p(-(y**2)))
    return y, log_prob


def _data_log_prob(policy, x, a):
    """`log pi(a~ | x)` of a data chunk, `a~ = clip(a, -1 + 1e-5, 1 - 1e-5)`, `u = atanh(a~)`."""
    mean, log_std = policy.distribution(x)
    a = jnp.clip(a, -1 + 1e-5, 1 - 1e-5)
    u = 0.5 * jnp.log((1 + a) / (1 - a))
    z = (u - mean) / jnp.exp(log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * np.log(2 * np.pi) - jnp.log(1 - a**2))


def _pessimistic(q, rho):
    return jnp.mean(q, axis=1) - rho * jnp.std(q, axis=1)


@eqx.filter_jit
def _by_hand(state, batch, key, *, td_critic):
    """Every RLPD term by hand; `td_critic` is the critic of the TD target (the target one
    unless testing the alternative)."""
    p, config, obs = state.params, state.config, batch.observations
    td_key, actor_key = jax.random.split(key)
    # TD: a' ~ pi(. | s') from the online actor; y = R + gamma^H m P'_rho; no -alpha log pi.
    next_obs = batch.next_observations[:, -1]
    next_actions, _ = jax.vmap(lambda o, k: _tanh_gaussian(p.actor, o, k))(
        next_obs, jax.random.split(td_key, B)
    )
    next_q = jax.vmap(td_critic)(next_obs, next_actions)
    y = batch.rewards[:, -1] + config.discount**H * batch.masks[:, -1] * _pessimistic(
        next_q, config.rho
    )
    q_data = jax.vmap(p.critic)(obs, batch.actions.reshape(B, D))
    critic = jnp.mean(batch.valid[:, -1] * jnp.mean((q_data - y[:, None]) ** 2, axis=1))
    # Actor and temperature: online critic with pessimism, not valid-weighted.
    actions, log_probs = jax.vmap(lambda o, k: _tanh_gaussian(p.actor, o, k))(
        obs, jax.random.split(actor_key, B)
    )
    q_actor = _pessimistic(jax.vmap(p.critic)(obs, actions), config.rho)
    alpha = jnp.exp(p.log_alpha)
    actor = jnp.mean(alpha * log_probs - q_actor)
    entropy = -jnp.mean(log_probs)
    alpha_loss = alpha * (entropy - (-0.5 * D))
    # BC on every row, valid-weighted.
    data_lp = jax.vmap(lambda o, a: _data_log_prob(p.actor, o, a))(obs, batch.actions.reshape(B, D))
    bc_log_prob = jnp.mean(batch.valid[:, -1] * data_lp)
    bc = -config.bc_alpha * bc_log_prob
    total = critic + actor + alpha_loss + bc
    return dict(critic_loss=critic, actor_loss=actor, actor_q=jnp.mean(q_actor), entropy=entropy,
                alpha=alpha, alpha_loss=alpha_loss, bc_log_prob=bc_log_prob, bc_loss=bc,
                total_loss=total)  # fmt: skip


def _assert_metrics(metrics, expected):
    for name, value in expected.items():
        assert metrics[name].dtype == jnp.float64, name
        np.testing.assert_allclose(metrics[name], value, rtol=F64_RTOL, atol=F64_ATOL, err_msg=name)


def test_loss_terms_by_hand(x64):
    state, batch, key = _state(), _batch(jax.random.PRNGKey(1)), jax.random.PRNGKey(2)
    total, metrics = _loss(state.params, state, batch, key)
    expected = _by_hand(state, batch, key, td_critic=state.targets["critic"])
    _assert_metrics(metrics, expected)
    np.testing.assert_allclose(total, expected["total_loss"], rtol=F64_RTOL)
    assert np.isfinite(float(expected["bc_log_prob"]))  # the clip keeps atanh(+-1) finite
    # The TD target reads the target critic: the same computation with the online one is off.
    online = _by_hand(state, batch, key, td_critic=state.params.critic)
    assert abs(float(metrics["critic_loss"] - online["critic_loss"])) > 1e-3 * float(
        online["critic_loss"]
    )


def test_pessimism_enters_the_actor_term(x64):
    # rho = 0 gives the ensemble mean; the actor's Q changes by rho * mean_b std_e exactly.
    state, batch, key = _state(), _batch(jax.random.PRNGKey(1)), jax.random.PRNGKey(2)
    _, with_rho = _loss(state.params, state, batch, key)
    flat = dataclasses.replace(state, config=dataclasses.replace(state.config, rho=0.0))
    _, without = _loss(flat.params, flat, batch, key)
    _, actor_key = jax.random.split(key)
    actions, _ = jax.vmap(lambda o, k: _tanh_gaussian(state.params.actor, o, k))(
        batch.observations, jax.random.split(actor_key, B)
    )
    std = jnp.mean(jnp.std(jax.vmap(state.params.critic)(batch.observations, actions), axis=1))
    assert float(std) > 1e-3
    np.testing.assert_allclose(without["actor_q"] - with_rho["actor_q"], 0.5 * std, rtol=1e-9)
    np.testing.assert_allclose(without["actor_loss"] - with_rho["actor_loss"], -0.5 * std,
                               rtol=1e-9)  # fmt: skip


def test_data_log_prob_inverts_the_sampler(x64):
    # log pi(y | s) through atanh(y) equals the log-density the sampler reports from u, for
    # samples away from the clip.
    policy = _state().params.actor
    obs = jax.random.normal(jax.random.PRNGKey(3), (16, OBS), jnp.float64)
    keys = jax.random.split(jax.random.PRNGKey(4), 16)
    y, log_prob = jax.vmap(lambda o, k: policy.sample_and_log_prob(o, key=k))(obs, keys)
    assert float(jnp.max(jnp.abs(y))) < 1 - 1e-5
    again = jax.vmap(lambda o, a: rlpd.data_log_prob(policy, o, a))(obs, y)
    np.testing.assert_allclose(again, log_prob, rtol=1e-8, atol=1e-8)


def test_temperature_gradient_is_alpha_times_the_entropy_gap(x64):
    # d L / d log alpha = alpha (entropy - H_target), H_target = -0.5 D (alpha, not log alpha,
    # multiplies: that would give entropy - H_target alone).
    state, batch, key = _state(), _batch(jax.random.PRNGKey(1)), jax.random.PRNGKey(2)
    with_alpha = lambda la: eqx.tree_at(lambda p: p.log_alpha, state.params, la)
    grad = jax.jit(jax.grad(lambda la: _loss(with_alpha(la), state, batch, key)[0]))(
        state.params.log_alpha
    )
    _, metrics = _loss(state.params, state, batch, key)
    np.testing.assert_allclose(grad, 0.5 * (metrics["entropy"] + 0.5 * D), rtol=1e-10)


ROUTES = {
    "critic_loss": {"critic"},
    "actor_loss": {"actor"},  # through the critic's input; the critic is stored
    "alpha_loss": {"log_alpha"},
    "bc_loss": {"actor"},
}
WEIGHTED = {"critic_loss", "bc_loss"}  # the valid-weighted terms


def test_each_loss_term_moves_exactly_its_networks(x64):
    state = _state()
    dynamic, static = eqx.partition(state.params, eqx.is_inexact_array)
    key = jax.random.PRNGKey(2)

    @jax.jit
    def gradient_of(d, batch, cotangent):
        metrics = lambda d_: {
            m: v for m, v in _loss(eqx.combine(d_, static), state, batch, key)[1].items()
            if m in ROUTES
        }  # fmt: skip
        return jax.vjp(metrics, d)[1](cotangent)[0]

    def moved(metric, batch):
        cotangent = {m: jnp.asarray(float(m == metric)) for m in ROUTES}
        grads = gradient_of(dynamic, batch, cotangent)
        nonzero = lambda tree: any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(tree))
        return {f.name for f in dataclasses.fields(grads) if nonzero(getattr(grads, f.name))}

    batch = _batch(jax.random.PRNGKey(1))
    for metric, networks in ROUTES.items():
        assert moved(metric, batch) == networks, metric
    # Every chunk crossing an episode end (w = 0): the weighted terms give no gradient, the
    # actor and temperature terms (not weighted) still do.
    batch = batch._replace(valid=jnp.zeros_like(batch.valid))
    for metric, networks in ROUTES.items():
        assert moved(metric, batch) == (set() if metric in WEIGHTED else networks), metric


def test_act_samples_the_actor_and_stays_in_the_box(x64):
    state = _state()
    obs = jax.random.normal(jax.random.PRNGKey(3), (16, OBS), jnp.float64)
    keys = jax.random.split(jax.random.PRNGKey(4), 16)
    act = jax.jit(jax.vmap(lambda s, o, k: rlpd.act(s, o, key=k), in_axes=(None, 0, 0)))
    chunks = act(state, obs, keys)
    expected = jax.vmap(lambda o, k: _tanh_gaussian(state.params.actor, o, k)[0])(obs, keys)
    np.testing.assert_allclose(chunks, expected, rtol=F64_RTOL, atol=F64_ATOL)
    other = act(state, obs, jax.random.split(jax.random.PRNGKey(5), 16))
    assert float(jnp.min(jnp.abs(chunks - other))) > 1e-8  # sampled, not the mode
    # A saturated actor (pre-tanh values ~ +-100): the chunks are exactly +-1, never beyond.
    bias = jnp.array([100.0, -100.0] * (D // 2))
    big = eqx.tree_at(lambda s: s.params.actor.mean_head.bias, state, bias)
    chunks = np.asarray(act(big, obs, keys))
    np.testing.assert_array_equal(chunks, np.tile([1.0, -1.0] * (D // 2), (16, 1)))


def test_config_errors_defaults_and_regime():
    for field, value in (("bc_alpha", -0.1), ("bc_alpha", float("inf")), ("init_temp", 0.0),
                         ("target_entropy", float("nan")),
                         ("target_entropy_multiplier", float("inf"))):  # fmt: skip
        with pytest.raises(ValueError, match=rf"RLPDConfig\({field}=\.\.\.\)"):
            RLPDConfig(**{field: value})
    c = AGENTS["rlpd"].config()
    assert (c.bc_alpha, c.init_temp, c.target_entropy, c.target_entropy_multiplier) == (
        0.0, 1.0, None, 0.5,
    )  # fmt: skip
    assert not c.clip_grad and AGENTS["rlpd"].bc_act is None
    config = dataclasses.replace(CONFIG, init_temp=2.0)
    init = lambda k: rlpd.init(k, jnp.zeros(OBS), jnp.zeros(A), config)
    log_alpha = jax.jit(lambda k: init(k).params.log_alpha)(jax.random.PRNGKey(0))
    np.testing.assert_allclose(log_alpha, np.log(2.0), rtol=1e-6)
    assert set(eqx.filter_eval_shape(init, jax.random.PRNGKey(0)).targets) == {"critic"}
    assert dict(AGENTS["rlpd"].run_defaults) == dict(
        offline_steps=0, balanced_sampling=True, random_warmup=True
    )
    assert all(not AGENTS[name].run_defaults for name in AGENTS if name != "rlpd")


def test_tuned_bc_alpha_table_and_paper_config():
    # The reproduce script's values, one per domain; the paper runs (paper_config) keep 0.
    assert set(TUNED_BC_ALPHA) == set(DOMAINS)
    expected = {
        "antmaze-large-navigate": 0.0,
        "antmaze-giant-navigate": 0.01,
        "humanoidmaze-medium-navigate": 0.03,
        "humanoidmaze-large-navigate": 0.0,
        "scene-play": 0.3,
        "puzzle-3x3-play": 0.01,
        "puzzle-4x4-play": 0.0,
        "cube-double-play": 0.1,
        "cube-triple-play": 0.0,
        "cube-quadruple-play": 0.0,
    }
    assert TUNED_BC_ALPHA == expected
    for domain in DOMAINS:
        env = f"{domain}-singletask-task1-v0"
        assert domain_of(env) == domain
        c = AGENTS["rlpd"].paper_config(env)
        assert c.bc_alpha == 0.0
        assert (c.horizon, c.discount, c.rho) == tuple(DOMAINS[domain][k] for k in
                                                        ("horizon", "discount", "rho"))  # fmt: skip
        tuned = AGENTS["rlpd"].paper_config(env, bc_alpha=tuned_bc_alpha(env))
        assert tuned.bc_alpha == expected[domain]
    assert tuned_bc_alpha("scene-play-singletask-task3-v0") == 0.3
    with pytest.raises(ValueError, match="known domains"):
        tuned_bc_alpha("cube-single-play-singletask-task1-v0")
