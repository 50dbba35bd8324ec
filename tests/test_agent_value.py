"""FAWAC and IFQL (the state-value baselines) and their shared terms in `qam.agents._value`:
each term by hand, the expectile minimiser, the clipped advantage weights, gradient routing,
IFQL's min-over-ensemble selection, and a two-mode toy where both prefer the high-Q mode."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_chunk_batch

from qam.agents import (
    AGENTS,
    FAWACConfig,
    IFQLConfig,
    advantage_weights,
    expectile_value_term,
    fawac,
    ifql,
)
from qam.data import SequenceBatch
from qam.nn import CriticEnsemble


OBS, A, H, B = 3, 1, 2, 6  # chunks of two 1-D actions: D = 2, the toy's plane
D = H * A
MODULES = {"fawac": fawac, "ifql": ifql}
# One configuration per agent for every test here (one compiled init each). The critic has no
# LayerNorm so that `_linear_critic` can stand in for it with a known Q.
SMALL = dict(horizon=H, num_qs=2, actor_hidden=(32, 32), critic_hidden=(16,), flow_steps=3,
             critic_layer_norm=False, learning_rate=3e-3)  # fmt: skip
CONFIGS = {
    "fawac": AGENTS["fawac"].config(**SMALL, inv_temp=3.0),
    "ifql": AGENTS["ifql"].config(**SMALL, kappa=0.8),
}
F64_RTOL = 1e-10


def _batch(key):
    """Random chunks, the first example's last step invalid, masks cut on the second."""
    batch = random_chunk_batch(key, batch=B, horizon=H, obs_dim=OBS, action_dim=A)
    return batch._replace(
        valid=batch.valid.at[0, -1].set(0.0), masks=batch.masks.at[1, -1].set(0.0)
    )


@eqx.filter_jit
def _init(name, key):
    return MODULES[name].init(key, jnp.zeros(OBS), jnp.zeros(A), CONFIGS[name])


@pytest.fixture(scope="module")
def states():
    """Per agent, in float64: a fresh state, and a second critic to make its target differ."""
    with jax.enable_x64(True):
        return {
            name: (
                _init(name, jax.random.PRNGKey(0)),
                _init(name, jax.random.PRNGKey(1)).params.critic,
            )
            for name in MODULES
        }


def _with_target(state, critic):
    return eqx.tree_at(lambda s: s.targets["critic"], state, critic)


# --- hand computations from the networks, in float64 numpy ----------------------------------


def _np(x):
    return np.asarray(x, dtype=np.float64)


@eqx.filter_jit
def _by_hand(state, batch, next_key, flow_key):
    """Every network value the terms need, from single-example network calls (vmapped):
    `Q_e(s, a)`, `Q'_e(s, a)`, `V(s)`, `V(s')`, `Q'_e(s', a')` with `a'` the hand-written Euler
    ODE of the flow from `N(0, I)` noise of `next_key`'s splits, and the per-example flow
    matching losses with `flow_term`'s keys."""
    p, target, steps = state.params, state.targets["critic"], state.config.flow_steps
    obs, next_obs = batch.observations, batch.next_observations[:, -1]
    actions = batch.actions.reshape(B, D)
    value = jax.vmap(lambda o: p.value.mlp(o)[0])
    x = jax.vmap(lambda k: jax.random.normal(k, (D,), obs.dtype))(jax.random.split(next_key, B))
    for i in range(steps):
        t = jnp.full(B, i / steps, x.dtype)
        x = x + jax.vmap(p.flow)(t, x, next_obs) / steps

    def flow_loss(o, a, k):
        t_key, x_key = jax.random.split(k)
        t = jax.random.uniform(t_key, (), a.dtype)
        x0 = jax.random.normal(x_key, a.shape, a.dtype)
        return jnp.mean((p.flow(t, (1 - t) * x0 + t * a, o) - (a - x0)) ** 2)

    return dict(
        q=jax.vmap(p.critic)(obs, actions), target_q=jax.vmap(target)(obs, actions),
        v=value(obs), next_v=value(next_obs),
        next_q=jax.vmap(target)(next_obs, jnp.clip(x, -1.0, 1.0)),
        flow=jax.vmap(flow_loss)(obs, actions, jax.random.split(flow_key, B)),
    )  # fmt: skip


def _np_dict(d):
    return {k: _np(v) for k, v in d.items()}


@pytest.mark.parametrize("kappa", [0.9, 0.5, 0.2])
def test_expectile_minimiser(kappa, x64):
    # Samples {0, 1}: the kappa-expectile is kappa; at 0.5 it is the mean. Found by Newton's
    # method on the term (piecewise quadratic, so it lands exactly after a step or two).
    q = jnp.array([0.0, 1.0])
    loss = lambda c: expectile_value_term(jnp.full(2, c), q, kappa=kappa)[0]
    newton = jax.jit(lambda c: c - jax.grad(loss)(c) / jax.grad(jax.grad(loss))(c))
    c = jnp.asarray(0.3)
    for _ in range(5):
        c = newton(c)
    np.testing.assert_allclose(c, kappa, rtol=1e-12)
    if kappa == 0.5:
        np.testing.assert_allclose(c, jnp.mean(q), rtol=1e-12)


def test_advantage_weights_clip_at_100(x64):
    advantages = jnp.array([1.0, 0.0, 0.5, -1.0])
    v = jnp.array([0.2, -0.3, 1.0, 0.0])
    q = jnp.stack([v + advantages - 0.4, v + advantages + 0.4], axis=1)  # mean_e q - v = A
    omega = advantage_weights(q, v, inv_temp=6.4)
    np.testing.assert_allclose(omega, [100.0, 1.0, np.exp(3.2), np.exp(-6.4)], rtol=1e-12)


ROUTES = {
    "fawac": {"critic_loss": {"critic"}, "value_loss": {"value"}, "flow_loss": {"flow"}},
    "ifql": {"value_loss": {"value"}, "critic_loss": {"critic"}, "flow_loss": {"flow"}},
}
# Not valid-weighted: a batch with every chunk crossing an episode end still trains these.
UNWEIGHTED = {"fawac": set(), "ifql": {"value_loss"}}


def _metrics_and_jacobian(name, state):
    """`f(batch, key) -> (metrics, d term / d params for each term of ROUTES)`."""
    return lambda batch, key: _jacobian(name, state, batch, key)[::-1]


@eqx.filter_jit
def _jacobian(name, state, batch, key):
    def terms(params):
        metrics = MODULES[name]._loss(params, state, batch, key)[1]
        return {n: metrics[n] for n in ROUTES[name]}, metrics

    return eqx.filter_jacrev(terms, has_aux=True)(state.params)


def _assert_routes(name, jacobian, batch, key):
    """Each term's gradient reaches exactly its networks; with no valid step, only the
    unweighted terms' do."""

    def moved(grads):
        nonzero = lambda tree: any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(tree))
        return {f for f in ("critic", "value", "flow") if nonzero(getattr(grads, f))}

    _, jac = jacobian(batch, key)
    for metric, networks in ROUTES[name].items():
        assert moved(jac[metric]) == networks, metric
    _, jac = jacobian(batch._replace(valid=jnp.zeros_like(batch.valid)), key)
    for metric, networks in ROUTES[name].items():
        assert moved(jac[metric]) == (networks if metric in UNWEIGHTED[name] else set()), metric


def test_fawac_terms_by_hand_and_their_gradients(states, getkey, x64):
    config = CONFIGS["fawac"]
    state, batch, key = _with_target(*states["fawac"]), _batch(getkey()), getkey()
    next_key, flow_key = jax.random.split(key)  # as the agent splits its key
    # Shift V so that the advantages straddle the clip: exp(inv_temp * A) = 100 at A = tau.
    n = _np_dict(_by_hand(state, batch, next_key, flow_key))
    advantage, tau = n["q"].mean(1) - n["v"], np.log(100.0) / config.inv_temp
    shift = advantage.max() - (tau + (advantage.max() - advantage.min()) / 2)
    state = eqx.tree_at(lambda s: s.params.value.mlp.layers[-1].bias, state,
                        state.params.value.mlp.layers[-1].bias + shift)  # fmt: skip
    n = _np_dict(_by_hand(state, batch, next_key, flow_key))
    jacobian = _metrics_and_jacobian("fawac", state)
    metrics, _ = jacobian(batch, key)
    w, gamma_h, e = _np(batch.valid[:, -1]), config.discount**H, config.num_qs
    # TD target from the online flow's ODE with fresh noise, then mean - rho std of Q'.
    y = _np(batch.rewards[:, -1]) + gamma_h * _np(batch.masks[:, -1]) * (
        n["next_q"].mean(1) - config.rho * n["next_q"].std(1)
    )
    critic = np.sum(w[:, None] * (n["q"] - y[:, None]) ** 2) / (e * B)
    np.testing.assert_allclose(metrics["critic_loss"], critic, rtol=F64_RTOL)
    # V regressed on every member of the TARGET critic, valid-weighted.
    value = np.sum(w[:, None] * (n["target_q"] - n["v"][:, None]) ** 2) / (e * B)
    np.testing.assert_allclose(metrics["value_loss"], value, rtol=F64_RTOL)
    # Flow matching weighted by valid * min(exp(lambda (mean_e Q - V)), 100), ONLINE critic.
    omega = np.minimum(np.exp(config.inv_temp * (n["q"].mean(1) - n["v"])), 100.0)
    assert np.any(omega == 100.0) and np.any(omega < 100.0)
    flow = np.mean(w * omega * n["flow"])
    np.testing.assert_allclose(metrics["flow_loss"], flow, rtol=F64_RTOL)
    np.testing.assert_allclose(metrics["weight_mean"], omega.mean(), rtol=F64_RTOL)
    np.testing.assert_allclose(metrics["total_loss"], critic + value + flow, rtol=F64_RTOL)
    _assert_routes("fawac", jacobian, batch, key)


def test_ifql_terms_by_hand_and_their_gradients(states, getkey, x64):
    config = CONFIGS["ifql"]
    state, batch, key = _with_target(*states["ifql"]), _batch(getkey()), getkey()
    n = _np_dict(_by_hand(state, batch, key, key))  # the flow term gets the agent's key
    jacobian = _metrics_and_jacobian("ifql", state)
    metrics, _ = jacobian(batch, key)
    w, gamma_h = _np(batch.valid[:, -1]), config.discount**H
    # Expectile of mean - rho std of the TARGET critic at the data chunk; no valid weight.
    diff = n["target_q"].mean(1) - config.rho * n["target_q"].std(1) - n["v"]
    assert np.any(diff < 0) and np.any(diff > 0)
    value = np.mean(np.where(diff >= 0, config.kappa, 1 - config.kappa) * diff**2)
    np.testing.assert_allclose(metrics["value_loss"], value, rtol=F64_RTOL)
    # TD to R + gamma^H m V(s'): no policy, no rho.
    y = _np(batch.rewards[:, -1]) + gamma_h * _np(batch.masks[:, -1]) * n["next_v"]
    critic = np.sum(w[:, None] * (n["q"] - y[:, None]) ** 2) / (config.num_qs * B)
    np.testing.assert_allclose(metrics["critic_loss"], critic, rtol=F64_RTOL)
    flow = np.mean(w * n["flow"])
    np.testing.assert_allclose(metrics["flow_loss"], flow, rtol=F64_RTOL)
    np.testing.assert_allclose(metrics["total_loss"], value + critic + flow, rtol=F64_RTOL)
    _assert_routes("ifql", jacobian, batch, key)


@eqx.filter_jit
def _linear_critic(coefs, offset):
    """A `CriticEnsemble` (no LayerNorm) with `Q_e(s, a) = coefs_e . a + offset` up to rounding:
    the first layer puts `a + 20` in the first `D` units (20 in the rest), where GELU is the
    identity to machine precision, later hidden layers pass them on, and the last layer takes
    `coefs_e . (h - 20) + offset`."""
    num, dim = coefs.shape
    obs_dim, hidden = OBS, CONFIGS["ifql"].critic_hidden
    critic = CriticEnsemble(obs_dim, dim, hidden, num_critics=num, layer_norm=False,
                            key=jax.random.PRNGKey(0))  # fmt: skip
    width = hidden[0]
    assert all(h == width for h in hidden) and width >= dim
    layers = [(jnp.eye(width, obs_dim + dim, k=obs_dim), jnp.full(width, 20.0))]  # unit i: a_i
    layers += [(jnp.eye(width), jnp.zeros(width))] * (len(hidden) - 1)
    stacked = [(jnp.broadcast_to(w, (num, *w.shape)), jnp.broadcast_to(b, (num, *b.shape)))
               for w, b in layers]  # fmt: skip
    head = jnp.zeros((num, 1, width)).at[:, 0, :dim].set(coefs)
    stacked.append((head, offset - 20.0 * jnp.sum(coefs, axis=1, keepdims=True)))
    for i, (w, b) in enumerate(stacked):
        critic = eqx.tree_at(
            lambda c, i=i: (c.members.layers[i].weight, c.members.layers[i].bias), critic, (w, b)
        )
    return critic


@eqx.filter_jit
def _candidates_and_choice(state, obs, key):
    n = state.config.num_samples
    candidates = jax.vmap(lambda k: ifql.bc_act(state, obs, key=k))(jax.random.split(key, n))
    values = jax.vmap(lambda a: state.params.critic(obs, a))(candidates)
    return candidates, values, ifql.act(state, obs, key=key)


def test_ifql_picks_the_best_ensemble_minimum(states, getkey, x64):
    # Members that disagree: Q_1 = 2 a_0, Q_2 = a_1 - a_0. The mean favours a_0 + a_1 (a
    # corner near (1, 1), where Q_2 = 0); the minimum wants a_0 near a_1 / 3. IFQL takes the
    # minimum.
    coefs = jnp.array([[2.0, 0.0], [-1.0, 1.0]])
    state = eqx.tree_at(lambda s: s.params.critic, states["ifql"][0],
                        _linear_critic(coefs, jnp.zeros(())))  # fmt: skip
    candidates, values, chosen = _candidates_and_choice(state, jax.random.normal(getkey(), (OBS,)),
                                                        getkey())  # fmt: skip
    q = _np(candidates) @ _np(coefs).T  # (N, E), the members' values by hand
    np.testing.assert_allclose(values, q, atol=1e-10)
    assert np.argmax(q.min(1)) != np.argmax(q.mean(1))  # the setting tells min from mean
    np.testing.assert_array_equal(chosen, candidates[np.argmax(q.min(1))])


# --- a two-mode toy with a known Q ------------------------------------------------------------

MODES = np.array([[0.5, 0.5], [-0.5, -0.5]])  # behaviour chunks: half each, noise 0.1
KNOWN_Q = (np.ones((2, D)), 1.0)  # Q = a_0 + a_1 + 1: 2 on the high mode, 0 on the low one


def _toy_batch(key, size=64):
    mode_key, noise_key = jax.random.split(key)
    centres = jnp.asarray(MODES)[jax.random.bernoulli(mode_key, 0.5, (size,)).astype(jnp.int32)]
    actions = jnp.clip(centres + 0.1 * jax.random.normal(noise_key, (size, D)), -1.0, 1.0)
    return SequenceBatch(
        observations=jnp.zeros((size, OBS)), actions=actions.reshape(size, H, A),
        rewards=jnp.zeros((size, H)), masks=jnp.ones((size, H)), valid=jnp.ones((size, H)),
        next_observations=jnp.zeros((size, H, OBS)),
    )  # fmt: skip


@eqx.filter_jit
def _train_toy(name, state, known, keys):
    """Updates on toy batches with the critic (online and target) held at the known Q."""
    with_known = lambda s: eqx.tree_at(lambda s: (s.params.critic, s.targets["critic"]), s,
                                       (known, known))  # fmt: skip

    def step(state, key):
        batch_key, update_key = jax.random.split(key)
        state, _ = MODULES[name].update(state, _toy_batch(batch_key), key=update_key)
        return with_known(state), None

    return jax.lax.scan(step, with_known(state), keys)[0]


@eqx.filter_jit
def _samples(policy, state, keys):
    return jax.vmap(lambda k: policy(state, jnp.zeros(OBS), key=k))(keys)


def _toy(name, states, steps):
    known = _linear_critic(jnp.asarray(KNOWN_Q[0]), jnp.asarray(KNOWN_Q[1]))
    state = _train_toy(name, states[name][0], known, jax.random.split(jax.random.PRNGKey(1), steps))
    keys = jax.random.split(jax.random.PRNGKey(2), 200)
    sample = lambda policy: np.asarray(_samples(policy, state, keys))
    return state, sample


@eqx.filter_jit
def _weights(state, obs, actions):
    v = state.params.value.batched(obs)
    return v, advantage_weights(state.params.critic.batched(obs, actions), v, inv_temp=3.0)


def test_toy_fawac_weights_tilt_to_the_high_q_mode(states, x64):
    state, sample = _toy("fawac", states, 150)
    batch = _toy_batch(jax.random.PRNGKey(3), 256)
    actions = batch.actions.reshape(256, D)
    v, omega = map(_np, _weights(state, batch.observations, actions))
    np.testing.assert_allclose(v.mean(), 1.0, atol=0.15)  # V fits E_beta[Q] (about 0 at init)
    high = np.asarray(jnp.sum(actions, axis=1) > 0)
    assert omega[high].mean() > 50 * omega[~high].mean()  # A = +-1: exp(3) against exp(-3)
    # The advantage-weighted flow has moved (almost) all its mass onto the high-Q mode.
    chunks = sample(fawac.act)
    assert np.mean(chunks.sum(1) > 0) > 0.9
    np.testing.assert_allclose(np.median(chunks[chunks.sum(1) > 0], axis=0), MODES[0], atol=0.2)


def test_toy_ifql_best_of_n_picks_the_high_q_mode(states, x64):
    _, sample = _toy("ifql", states, 200)
    bc = sample(ifql.bc_act)
    assert 0.3 < np.mean(bc.sum(1) > 0) < 0.7  # the behaviour flow keeps both modes
    chunks = sample(ifql.act)
    assert np.all(chunks.sum(1) > 0)  # best of 32 under Q: always the high-Q mode
    distance = np.linalg.norm(chunks - np.asarray(MODES[0]), axis=1)
    assert np.median(distance) < 0.35  # near the mode, not the box corner (1, 1) at 0.71


def test_config_errors_and_presets():
    with pytest.raises(ValueError, match="inv_temp"):
        FAWACConfig(inv_temp=-1.0)
    with pytest.raises(ValueError, match="inv_temp"):
        FAWACConfig(inv_temp=float("nan"))
    with pytest.raises(ValueError, match="flow_steps"):
        FAWACConfig(flow_steps=0)
    with pytest.raises(ValueError, match="kappa"):
        IFQLConfig(kappa=1.0)
    with pytest.raises(ValueError, match="num_samples"):
        IFQLConfig(num_samples=0)
    assert (FAWACConfig().inv_temp, FAWACConfig().clip_grad) == (10.0, False)
    c = IFQLConfig()
    assert (c.kappa, c.num_samples, c.clip_grad) == (0.9, 32, False)
    task = "cube-double-play-singletask-task2-v0"
    assert AGENTS["fawac"].paper_config(task).inv_temp == 0.8
    assert AGENTS["ifql"].paper_config(task).kappa == 0.9
    c = AGENTS["fawac"].paper_config("antmaze-large-navigate-singletask-task1-v0")
    assert (c.inv_temp, c.horizon, c.discount) == (6.4, 1, 0.99)
    c = AGENTS["ifql"].paper_config("humanoidmaze-medium-navigate-singletask-task1-v0")
    assert (c.kappa, c.horizon, c.discount, c.rho) == (0.7, 1, 0.995, 0.0)
    assert AGENTS["ifql"].paper_config("puzzle-3x3-play-singletask-task1-v0").kappa == 0.95
