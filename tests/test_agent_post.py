"""FEdit and DSRL (post-processing of a behaviour-cloning flow): every loss term by hand, the
SAC temperature by hand, gradient routing, the latent-to-action map through the EMA flow, the
edited action, presets and config errors, and a 2-D toy where the edit / noise policy moves the
action toward higher known Q."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_chunk_batch

from qam.agents import AGENTS, DSRLConfig, FEditConfig, dsrl, fedit, sac_actor_term
from qam.data import SequenceBatch


OBS, A, H, B, K = 3, 2, 2, 8, 3
D = H * A
TINY = dict(actor_hidden=(16,), critic_hidden=(16,), num_qs=3, horizon=H, flow_steps=K)
CONFIGS = {
    # edit_scale 1.5: large enough that the final clip binds on some coordinates.
    "fedit": AGENTS["fedit"].config(**TINY, edit_scale=1.5),
    # noise_scale 0.6 != 1: the latent critic's unscaled N(0, I) latents differ from the
    # noise policy's scaled ones.
    "dsrl": AGENTS["dsrl"].config(**TINY, noise_scale=0.6),
}
MODULES = {"fedit": fedit, "dsrl": dsrl}
F64_RTOL, F64_ATOL = 1e-10, 1e-12

# Compiled once per agent (and dtype); eager execution of many small ops costs more here.
_loss = {name: jax.jit(module._loss) for name, module in MODULES.items()}
_init = {name: eqx.filter_jit(module.init) for name, module in MODULES.items()}


def _batch(key):
    """Random chunks with example 0's last step invalid (the valid weighting is exercised)."""
    batch = random_chunk_batch(key, batch=B, horizon=H, obs_dim=OBS, action_dim=A)
    return batch._replace(valid=batch.valid.at[0, -1].set(0.0))


def _state(name, seed=0, **overrides):
    """A state whose targets differ from the online networks (so using one for the other
    shows) and whose temperature is alpha = 0.5 (so alpha and log alpha differ)."""
    config = dataclasses.replace(CONFIGS[name], **overrides)
    init = lambda k: _init[name](jax.random.PRNGKey(k), jnp.zeros(OBS), jnp.zeros(A), config)
    state, other = init(seed), init(seed + 100)
    targets = {k: getattr(other.params, k) for k in state.targets}
    state = dataclasses.replace(state, targets=targets)
    return eqx.tree_at(lambda s: s.params.log_alpha, state, jnp.asarray(np.log(0.5)))


# ---- Hand computations from the networks themselves (float64) -------------------------------


def _euler(velocity, obs, z):
    """K Euler steps of the flow ODE from `z`, then the clip to [-1, 1] (one example)."""
    x = z
    for i in range(K):
        x = x + velocity(jnp.asarray(i / K), x, obs) / K
    return jnp.clip(x, -1.0, 1.0)


def _tanh_gaussian(policy, x, key):
    """`y = tanh(mean + std xi)`, `xi = normal(key)`, and its log-density
    `sum_d [log N(u_d; mean_d, std_d) - log(1 - y_d^2)]` (one example)."""
    mean, log_std = policy.distribution(x)
    xi = jax.random.normal(key, mean.shape, mean.dtype)
    u = mean + jnp.exp(log_std) * xi
    y = jnp.tanh(u)
    log_prob = jnp.sum(-0.5 * xi**2 - log_std - 0.5 * np.log(2 * np.pi) - jnp.log1p(-(y**2)))
    return y, log_prob


def _td_loss(state, batch, next_actions):
    """`(1/(E B)) sum_b w_b sum_e (Q_e(s_b, a_b) - y_b)^2`, `y = R + gamma^H m (mean - rho std)`
    of the target critic at `(s', a')`."""
    config = state.config
    next_q = jax.vmap(state.targets["critic"])(batch.next_observations[:, -1], next_actions)
    pessimistic = jnp.mean(next_q, axis=1) - config.rho * jnp.std(next_q, axis=1)
    y = batch.rewards[:, -1] + config.discount**H * batch.masks[:, -1] * pessimistic
    q = jax.vmap(state.params.critic)(batch.observations, batch.actions.reshape(B, D))
    return jnp.mean(batch.valid[:, -1] * jnp.mean((q - y[:, None]) ** 2, axis=1))


def _flow_loss(velocity, batch, key):
    def one(obs, action, k):
        t_key, x_key = jax.random.split(k)
        t = jax.random.uniform(t_key, (), jnp.float64)
        x0 = jax.random.normal(x_key, (D,), jnp.float64)
        return jnp.mean((velocity(t, (1 - t) * x0 + t * action, obs) - (action - x0)) ** 2)

    losses = jax.vmap(one)(
        batch.observations, batch.actions.reshape(B, D), jax.random.split(key, B)
    )
    return jnp.mean(batch.valid[:, -1] * losses)


def _fedit_sample(params, obs, key, edit_scale):
    """FEdit's deployed chunk by hand: clip(a_flow + edit_scale * e), online flow."""
    noise_key, edit_key = jax.random.split(key)
    a_flow = _euler(params.bc_flow, obs, jax.random.normal(noise_key, (D,), jnp.float64))
    e, _ = _tanh_gaussian(params.edit, jnp.concatenate([obs, a_flow]), edit_key)
    return jnp.clip(a_flow + edit_scale * e, -1.0, 1.0)


def _dsrl_sample(flow, policy, obs, key, noise_scale):
    """DSRL's deployed chunk by hand: F(s, noise_scale * clip(zeta)) through `flow`."""
    zeta, _ = _tanh_gaussian(policy, obs, key)
    return _euler(flow, obs, noise_scale * jnp.clip(zeta, -1.0, 1.0))


@eqx.filter_jit
def _fedit_by_hand(state, batch, key):
    p, config, obs = state.params, state.config, batch.observations
    td_key, flow_key, noise_key, edit_key = jax.random.split(key, 4)
    next_actions = jax.vmap(lambda o, k: _fedit_sample(p, o, k, config.edit_scale))(
        batch.next_observations[:, -1], jax.random.split(td_key, B)
    )
    z = jax.random.normal(noise_key, (B, D), jnp.float64)

    def edit_one(o, z_, k):
        a_flow = _euler(p.bc_flow, o, z_)  # the online flow
        e, log_prob = _tanh_gaussian(p.edit, jnp.concatenate([o, a_flow]), k)
        edited = jnp.clip(a_flow + config.edit_scale * e, -1.0, 1.0)
        return jnp.mean(p.critic(o, edited)), log_prob

    q, log_probs = jax.vmap(edit_one)(obs, z, jax.random.split(edit_key, B))
    entropy = -jnp.mean(log_probs)
    alpha = jnp.exp(p.log_alpha)
    alpha_loss = alpha * (entropy - (-0.5 * D))
    critic = _td_loss(state, batch, next_actions)
    flow = _flow_loss(p.bc_flow, batch, flow_key)
    total = critic + flow - jnp.mean(q) + alpha * jnp.mean(log_probs) + alpha_loss
    return dict(critic_loss=critic, flow_loss=flow, edit_q=jnp.mean(q), entropy=entropy,
                alpha_loss=alpha_loss, total_loss=total)  # fmt: skip


@eqx.filter_jit
def _dsrl_by_hand(state, batch, key, *, flow):
    """Every DSRL term by hand with `flow` as F's velocity (the EMA flow unless testing the
    alternative)."""
    p, config, obs = state.params, state.config, batch.observations
    td_key, flow_key, latent_key, actor_key = jax.random.split(key, 4)
    next_actions = jax.vmap(
        lambda o, k: _dsrl_sample(flow, p.noise_policy, o, k, config.noise_scale)
    )(batch.next_observations[:, -1], jax.random.split(td_key, B))
    z = jax.random.normal(latent_key, (B, D), jnp.float64)  # unscaled, no tanh

    def latent_one(o, z_):
        target = p.critic(o, _euler(flow, o, z_))  # online critic, member by member
        return jnp.mean((p.latent_critic(o, z_) - target) ** 2)

    latent = jnp.mean(jax.vmap(latent_one)(obs, z))

    def actor_one(o, k):
        zeta, log_prob = _tanh_gaussian(p.noise_policy, o, k)
        return jnp.mean(p.latent_critic(o, config.noise_scale * zeta)), log_prob

    qs, log_probs = jax.vmap(actor_one)(obs, jax.random.split(actor_key, B))
    alpha = jnp.exp(p.log_alpha)
    actor = jnp.mean(alpha * log_probs - qs)
    alpha_loss = alpha * (-jnp.mean(log_probs) - (-0.5 * D))
    critic = _td_loss(state, batch, next_actions)
    flow_loss = _flow_loss(p.bc_flow, batch, flow_key)
    total = critic + latent + flow_loss + actor + alpha_loss
    return dict(critic_loss=critic, latent_loss=latent, flow_loss=flow_loss, actor_loss=actor,
                actor_q=jnp.mean(qs), alpha_loss=alpha_loss, total_loss=total)  # fmt: skip


def _assert_metrics(metrics, expected):
    for name, value in expected.items():
        assert metrics[name].dtype == jnp.float64, name
        np.testing.assert_allclose(metrics[name], value, rtol=F64_RTOL, atol=F64_ATOL, err_msg=name)


def test_fedit_loss_terms_by_hand(x64):
    state, batch, key = _state("fedit"), _batch(jax.random.PRNGKey(1)), jax.random.PRNGKey(2)
    _, metrics = _loss["fedit"](state.params, state, batch, key)
    _assert_metrics(metrics, _fedit_by_hand(state, batch, key))


def test_dsrl_loss_terms_by_hand(x64):
    state, batch, key = _state("dsrl"), _batch(jax.random.PRNGKey(1)), jax.random.PRNGKey(2)
    _, metrics = _loss["dsrl"](state.params, state, batch, key)
    _assert_metrics(metrics, _dsrl_by_hand(state, batch, key, flow=state.targets["bc_flow"]))


def test_dsrl_maps_latents_through_the_ema_flow(x64):
    # The TD target and the latent critic's regression target go through F with the EMA flow:
    # the hand computation with the online flow instead must be far off (the two flows are
    # independent initialisations here). With use_target_latent=False it is the online one.
    batch, key = _batch(jax.random.PRNGKey(1)), jax.random.PRNGKey(2)
    state = _state("dsrl")
    _, metrics = _loss["dsrl"](state.params, state, batch, key)
    online = _dsrl_by_hand(state, batch, key, flow=state.params.bc_flow)
    for name in ("critic_loss", "latent_loss"):
        assert abs(float(metrics[name] - online[name])) > 1e-3 * abs(float(online[name])), name
    config = dataclasses.replace(state.config, use_target_latent=False)
    state = dataclasses.replace(state, config=config)
    _, metrics = _loss["dsrl"](state.params, state, batch, key)
    _assert_metrics(metrics, {k: online[k] for k in ("critic_loss", "latent_loss")})


def test_fedit_act_edits_the_online_flow(x64):
    state = _state("fedit")
    obs = jax.random.normal(jax.random.PRNGKey(3), (16, OBS), jnp.float64)
    keys = jax.random.split(jax.random.PRNGKey(4), 16)
    chunks = jax.jit(jax.vmap(lambda o, k: fedit.act(state, o, key=k)))(obs, keys)
    expected = jax.jit(jax.vmap(lambda o, k: _fedit_sample(state.params, o, k, 1.5)))(obs, keys)
    np.testing.assert_allclose(chunks, expected, rtol=F64_RTOL, atol=F64_ATOL)
    clipped = np.abs(np.asarray(chunks)) == 1.0
    assert clipped.any() and not clipped.all()  # the clip binds somewhere, not everywhere


def test_dsrl_act_is_stochastic_through_the_ema_flow(x64):
    state = _state("dsrl")
    obs = jax.random.normal(jax.random.PRNGKey(3), (OBS,), jnp.float64)
    keys = jax.random.split(jax.random.PRNGKey(4), 4)
    chunks = jax.jit(jax.vmap(lambda k: dsrl.act(state, obs, key=k)))(keys)
    flow, policy = state.targets["bc_flow"], state.params.noise_policy
    expected = jax.jit(jax.vmap(lambda k: _dsrl_sample(flow, policy, obs, k, 0.6)))(keys)
    np.testing.assert_allclose(chunks, expected, rtol=F64_RTOL, atol=F64_ATOL)
    assert float(jnp.min(jnp.abs(chunks[0] - chunks[1]))) > 1e-6  # sampled, not the mode


def test_sac_temperature_by_hand(x64):
    # alpha = 0.5, target entropy -0.5 D = -2 for D = 4; entropy = -mean(l) = -0.5.
    log_prob, q = jnp.array([-1.0, 2.0, 0.5]), jnp.array([1.0, 2.0, 3.0])
    log_alpha = jnp.asarray(np.log(0.5))
    target = -0.5 * 4

    def total(lp, q_, la):
        return sac_actor_term(lp, q_, la, entropy_target=target)

    (loss, metrics), grads = jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)(
        log_prob, q, log_alpha
    )
    np.testing.assert_allclose(metrics["alpha_loss"], 0.5 * (-0.5 + 2.0), rtol=F64_RTOL)
    np.testing.assert_allclose(metrics["actor_loss"], np.mean([-1.5, -1.0, -2.75]), rtol=F64_RTOL)
    np.testing.assert_allclose(loss, 0.75 - 1.75, rtol=F64_RTOL)
    # d/d log_alpha = alpha (entropy - target) = 0.75 (it would be 1.5 if log alpha
    # multiplied); the log-probs get sg(alpha) / B from the actor term only; q gets -1 / B.
    np.testing.assert_allclose(grads[2], 0.75, rtol=F64_RTOL)
    np.testing.assert_allclose(grads[0], np.full(3, 0.5 / 3), rtol=F64_RTOL)
    np.testing.assert_allclose(grads[1], np.full(3, -1.0 / 3), rtol=F64_RTOL)


ROUTES = {
    "fedit": {
        "critic_loss": {"critic"},
        "flow_loss": {"bc_flow"},
        "edit_q": {"edit"},
        "alpha_loss": {"log_alpha"},
    },
    "dsrl": {
        "critic_loss": {"critic"},
        "latent_loss": {"latent_critic"},  # L_Z moves Z only
        "flow_loss": {"bc_flow"},
        "actor_loss": {"noise_policy"},  # through Z's input; Z stored
        "alpha_loss": {"log_alpha"},
    },
}
WEIGHTED = {"critic_loss", "flow_loss"}  # the valid-weighted terms


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_each_loss_term_moves_exactly_its_networks(name, x64):
    # Each term's metric differentiated separately over state.params: one compiled VJP of all
    # the metrics, pulled back with a one-hot cotangent per term.
    state = _state(name)
    dynamic, static = eqx.partition(state.params, eqx.is_inexact_array)
    routes, key = ROUTES[name], jax.random.PRNGKey(2)

    @jax.jit
    def gradient_of(d, batch, cotangent):
        metrics = lambda d_: {
            m: v for m, v in _loss[name](eqx.combine(d_, static), state, batch, key)[1].items()
            if m in routes
        }  # fmt: skip
        return jax.vjp(metrics, d)[1](cotangent)[0]

    def moved(metric, batch):
        cotangent = {m: jnp.asarray(float(m == metric)) for m in routes}
        grads = gradient_of(dynamic, batch, cotangent)
        nonzero = lambda tree: any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(tree))
        return {f.name for f in dataclasses.fields(grads) if nonzero(getattr(grads, f.name))}

    batch = _batch(jax.random.PRNGKey(1))
    for metric, networks in routes.items():
        assert moved(metric, batch) == networks, metric
    # Every chunk crossing an episode end (w = 0): the weighted terms give no gradient, the
    # policy terms (not weighted) still do.
    batch = batch._replace(valid=jnp.zeros_like(batch.valid))
    for metric, networks in routes.items():
        assert moved(metric, batch) == (set() if metric in WEIGHTED else networks), metric


def test_config_errors_and_presets():
    with pytest.raises(ValueError, match=r"edit_scale=.*must be finite and > 0"):
        FEditConfig()  # the reference's 0 means "must be set"
    with pytest.raises(ValueError, match="edit_scale"):
        FEditConfig(edit_scale=-0.1)
    with pytest.raises(ValueError, match="noise_scale"):
        DSRLConfig(noise_scale=0.0)
    with pytest.raises(ValueError, match="flow_steps"):
        DSRLConfig(flow_steps=0)
    with pytest.raises(ValueError, match="best_of_n"):
        AGENTS["fedit"].config(best_of_n=0)
    assert AGENTS["fedit"].config().edit_scale == 0.2
    assert not AGENTS["fedit"].config().clip_grad and not AGENTS["dsrl"].config().clip_grad
    c = AGENTS["dsrl"].config()
    assert (c.noise_scale, c.use_target_latent, c.target_entropy_multiplier) == (1.0, True, 0.5)
    env = "cube-double-play-singletask-task2-v0"
    c = AGENTS["fedit"].paper_config(env)
    assert (c.edit_scale, c.horizon, c.discount, c.rho) == (0.2, 5, 0.99, 0.5)
    c = AGENTS["dsrl"].paper_config(env)
    assert (c.noise_scale, c.horizon, c.discount, c.rho) == (1.0, 5, 0.99, 0.5)
    assert AGENTS["fedit"].paper_config("puzzle-4x4-play-singletask-task1-v0").edit_scale == 0.8
    c = AGENTS["dsrl"].paper_config("humanoidmaze-medium-navigate-singletask-task1-v0")
    assert (c.noise_scale, c.horizon, c.discount, c.rho) == (0.6, 1, 0.995, 0.0)
    assert AGENTS["dsrl"].paper_config("cube-triple-play-singletask-task1-v0").noise_scale == 1.4


# ---- 2-D toy --------------------------------------------------------------------------------
# One-step problem (H = 1, masks 0, so Q*(s, a) = R(a) exactly) with a known
# Q = 10 * mean(a) and behaviour data in two modes at -(0.5, 0.5) and +(0.5, 0.5)
# (std 0.1). After 100 updates (lr 3e-3, one hidden layer of 32) the deployed policy's chunks
# must score clearly higher under the known Q than the BC flow's. Measured with the keys
# PRNGKey(0..4): the BC flow keeps both modes (mean(a) within +-0.05, 48-53% of its chunks in
# the good mode); FEdit (edit_scale 0.5, so at most +0.5 in mean(a)) gains 0.25-0.31 in
# mean(a), with 74-81% of its chunks in the good mode; DSRL (noise_scale 1) gains 0.49-0.60,
# with 98-99.6% in the good mode (its noise policy picks latents the flow maps there). The
# thresholds are about half of the gains; each 512-sample estimate has a standard error of
# ~0.02 in mean(a) and in the fractions.
TOY_B, TOY_STEPS = 32, 100
# agent: (overrides, least gain in mean(a), least fraction of chunks in the good mode)
TOY = {"fedit": (dict(edit_scale=0.5), 0.13, 0.62), "dsrl": (dict(noise_scale=1.0), 0.28, 0.9)}


def _toy_batch(key):
    k1, k2 = jax.random.split(key)
    sign = jnp.where(jax.random.bernoulli(k1, 0.5, (TOY_B, 1)), 1.0, -1.0)
    a = jnp.clip(0.5 * sign + 0.1 * jax.random.normal(k2, (TOY_B, 2)), -0.99, 0.99)
    return SequenceBatch(
        observations=jnp.zeros((TOY_B, 1)), actions=a[:, None, :],
        rewards=10.0 * jnp.mean(a, axis=1)[:, None], masks=jnp.zeros((TOY_B, 1)),
        valid=jnp.ones((TOY_B, 1)), next_observations=jnp.zeros((TOY_B, 1, 1)),
    )  # fmt: skip


def _toy_samples(name, key):
    """Train on the toy for TOY_STEPS updates from `key`; 512 deployed and 512 BC chunks."""
    agent = AGENTS[name]
    config = agent.config(
        actor_hidden=(32,), critic_hidden=(32,), num_qs=2, horizon=1, flow_steps=5,
        learning_rate=3e-3, **TOY[name][0],
    )  # fmt: skip

    @eqx.filter_jit
    def train_and_sample(key):
        init_key, train_key, eval_key = jax.random.split(key, 3)
        state = agent.init(init_key, jnp.zeros(1), jnp.zeros(2), config)

        def step(s, k):
            batch_key, update_key = jax.random.split(k)
            return agent.update(s, _toy_batch(batch_key), key=update_key)[0], None

        state, _ = jax.lax.scan(step, state, jax.random.split(train_key, TOY_STEPS))
        keys = jax.random.split(eval_key, 512)
        deployed = jax.vmap(lambda k: agent.act(state, jnp.zeros(1), key=k))(keys)
        behaviour = jax.vmap(lambda k: agent.bc_act(state, jnp.zeros(1), key=k))(keys)
        return deployed, behaviour

    return train_and_sample(key)


@pytest.mark.parametrize("name", sorted(TOY))
def test_toy_policy_moves_toward_higher_q(name):
    _, least_gain, least_good = TOY[name]
    deployed, behaviour = _toy_samples(name, jax.random.PRNGKey(0))
    q_deployed, q_behaviour = np.mean(deployed, axis=1), np.mean(behaviour, axis=1)
    # The BC flow keeps both modes; the deployed policy moves toward the good one.
    assert abs(float(np.mean(q_behaviour))) < 0.15
    assert 0.3 < float(np.mean(q_behaviour > 0)) < 0.7
    assert float(np.mean(q_deployed) - np.mean(q_behaviour)) > least_gain
    assert float(np.mean(q_deployed > 0)) > least_good
