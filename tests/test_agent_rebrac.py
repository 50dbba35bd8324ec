"""ReBRAC: the deterministic tanh actor's initialisation, the TD target with the target actor's
clipped smoothing noise and the actor loss by hand, gradient routing, acting, the delayed-target
cadence (and the paper's actor delay as an option), a toy where the BC weight shows, configs."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qam
from qam.agents import AGENTS, AgentState, ReBRACConfig, ReBRACParams, rebrac
from qam.data import SequenceBatch


OBS, A, H, B = 3, 2, 2, 8
D = A * H
AGENT = AGENTS["rebrac"]
# A large head scale and noise: the target actor's outputs reach past +-0.5 and most noise
# draws past the clip c, so both clips of the TD target's action are active.
CONFIG = AGENT.config(
    actor_hidden=(16,), critic_hidden=(16,), num_qs=3, horizon=H, rho=0.5, alpha_actor=0.7,
    actor_noise=1.0, actor_noise_clip=0.5, actor_fc_scale=1.0,
)  # fmt: skip
F64_RTOL, F64_ATOL = 1e-10, 1e-12
GELU_C = np.sqrt(2.0 / np.pi)


def _gelu(x):  # the tanh approximation, in NumPy
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + 0.044715 * x**3)))


def _leaves(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))


def _allclose(actual, expected, rtol=F64_RTOL, atol=F64_ATOL):
    actual_leaves, expected_leaves = _leaves(actual), _leaves(expected)
    assert len(actual_leaves) == len(expected_leaves) > 0
    for x, y in zip(actual_leaves, expected_leaves):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _changed(before, after):
    return any(not np.array_equal(x, y) for x, y in zip(_leaves(before), _leaves(after)))


# ---------------------------------------------------------------------------------------------
# The network.


def test_actor_head_is_variance_scaled_and_the_trunk_activates_its_last_layer(getkey, x64):
    # Head: uniform on +-sqrt(3 scale / ((fan_in + fan_out) / 2)), 0.01057 for 512 -> 25 at the
    # reference's 0.01; variance limit^2 / 3 (the sample variance of 12800 draws has a relative
    # sd of 0.9 / sqrt(12800) = 0.8%); zero bias. Trunk layers Xavier uniform.
    make = eqx.filter_jit(qam.nn.DeterministicTanhPolicy)
    policy = make(3, 25, (8, 512), key=getkey())
    weight, limit = np.asarray(policy.head.weight), np.sqrt(3 * 0.01 / ((512 + 25) / 2))
    np.testing.assert_allclose(limit, 0.01057, atol=5e-6)
    assert weight.shape == (25, 512)
    assert np.abs(weight).max() <= limit and np.abs(weight).max() > 0.99 * limit
    np.testing.assert_allclose(weight.var(), limit**2 / 3, rtol=0.04)
    assert np.all(np.asarray(policy.head.bias) == 0.0)
    for layer in policy.trunk.layers:
        fan_out, fan_in = layer.weight.shape
        assert np.abs(np.asarray(layer.weight)).max() <= np.sqrt(6 / (fan_in + fan_out))
        assert np.all(np.asarray(layer.bias) == 0.0)
    assert len(policy.trunk.layers) == 2 and policy.trunk.norms is None

    # mu(x) = tanh(W gelu(W2 gelu(W1 x)) + b) by hand, the activation after the last hidden
    # layer included; with a large head scale the pre-activations pass +-1 and tanh bounds them.
    policy = make(3, 4, (8, 16), head_scale=10.0, key=getkey())
    x = 3.0 * np.random.default_rng(0).standard_normal((32, 3))
    (w1, b1), (w2, b2) = [(np.asarray(m.weight), np.asarray(m.bias)) for m in policy.trunk.layers]
    pre = _gelu(_gelu(x @ w1.T + b1) @ w2.T + b2) @ np.asarray(policy.head.weight).T
    out = np.asarray(eqx.filter_jit(lambda p, x: jax.vmap(p)(x))(policy, jnp.asarray(x)))
    np.testing.assert_allclose(out, np.tanh(pre), rtol=1e-10, atol=1e-12)
    assert np.abs(pre).max() > 2.0 and np.all(np.abs(out) < 1.0)
    # Without the final activation the output would differ: the check has teeth.
    no_final = (_gelu(x @ w1.T + b1) @ w2.T + b2) @ np.asarray(policy.head.weight).T
    assert not np.allclose(np.tanh(no_final), out, atol=1e-3)


def test_actor_argument_errors(getkey):
    with pytest.raises(ValueError, match="hidden_sizes"):
        qam.nn.DeterministicTanhPolicy(3, 2, (), key=getkey())
    with pytest.raises(ValueError, match="head_scale"):
        qam.nn.DeterministicTanhPolicy(3, 2, (8,), head_scale=0.0, key=getkey())


# ---------------------------------------------------------------------------------------------
# The losses by hand, gradient routing, acting.


def _batch(seed):
    """A random float64 chunk batch whose example 0 ends before its last step (w_0 = 0)."""
    rng = np.random.default_rng(seed)
    valid = np.ones((B, H))
    valid[0, -1] = 0.0
    return SequenceBatch(
        observations=jnp.asarray(rng.standard_normal((B, OBS))),
        actions=jnp.asarray(rng.uniform(-1, 1, (B, H, A))),
        rewards=jnp.asarray(-rng.uniform(0, 1, (B, H))),
        masks=jnp.asarray(rng.integers(0, 2, (B, H)).astype(np.float64)),
        valid=jnp.asarray(valid),
        next_observations=jnp.asarray(2.0 * rng.standard_normal((B, H, OBS))),
    )


ROUTES = {"critic_loss": {"critic"}, "actor_q_loss": {"actor"}, "bc_loss": {"actor"}}


@pytest.fixture(scope="module")
def case():
    """In float64 and one compiled program: a state whose targets (critic and actor) differ
    from the online networks, the loss's metrics, the reverse-mode Jacobian of the routed terms
    over the parameters, and the networks' raw outputs for the by-hand formulas (NumPy)."""
    with jax.enable_x64(True):
        init = eqx.filter_jit(lambda k: AGENT.init(k, jnp.zeros(OBS), jnp.zeros(A), CONFIG))
        state, other = init(jax.random.PRNGKey(0)), init(jax.random.PRNGKey(1))
        targets = {"critic": other.params.critic, "actor": other.params.actor}
        state = eqx.tree_at(lambda s: s.targets, state, targets)
        batch, key = _batch(2), jax.random.PRNGKey(3)
        dynamic, static = eqx.partition(state.params, eqx.is_inexact_array)
        act_obs = 3.0 * jax.random.normal(jax.random.PRNGKey(5), (6, OBS))
        act_keys = jax.random.split(jax.random.PRNGKey(6), 6)

        def metrics_fn(d, batch=batch):
            metrics = rebrac._loss(eqx.combine(d, static), state, batch, key)[1]
            return {m: metrics[m] for m in ROUTES}, metrics

        ended = batch._replace(valid=jnp.zeros_like(batch.valid))  # every chunk crosses an end

        @jax.jit
        def run(d):
            jacobian, metrics = jax.jacrev(metrics_fn, has_aux=True)(d)
            ended_jacobian = jax.jacrev(lambda d: metrics_fn(d, ended)[0])(d)
            params, targets, obs = state.params, state.targets, batch.observations
            next_obs = batch.next_observations[:, -1]
            # The documented keys: split(key, B), one N(0, I_D) draw per example.
            xi = jax.vmap(lambda k: jax.random.normal(k, (D,)))(jax.random.split(key, B))
            a_hat = jax.vmap(params.actor)(obs)

            def mean_pessimistic_q(actor):
                q = jax.vmap(params.critic)(obs, jax.vmap(actor)(obs))
                return jnp.mean(jnp.mean(q, 1) - CONFIG.rho * jnp.std(q, 1))

            def ratio(actor):  # the Q term without the stop-gradient on 1 / mean |q|
                q = jax.vmap(params.critic)(obs, jax.vmap(actor)(obs))
                q = jnp.mean(q, 1) - CONFIG.rho * jnp.std(q, 1)
                return -jnp.mean(q) / jnp.mean(jnp.abs(q))

            mu_target = jax.vmap(targets["actor"])(next_obs)
            mu_online = jax.vmap(params.actor)(next_obs)
            # The critics at whatever next actions NumPy builds are evaluated below from these.
            act_xi = jax.vmap(lambda k: jax.random.normal(k, (D,)))(act_keys)
            acted = jax.vmap(lambda o, k: AGENT.act(state, o, key=k))(act_obs, act_keys)
            quiet = AgentState(state.params, state.targets, state.opt_state, state.step,
                               dataclasses.replace(CONFIG, actor_noise=0.0), D)  # fmt: skip
            quiet_acted = jax.vmap(lambda o, k: AGENT.act(quiet, o, key=k))(act_obs, act_keys)
            return dict(
                metrics=metrics, jacobian=jacobian, xi=xi, a_hat=a_hat, mu_target=mu_target,
                mu_online=mu_online, q_hat=jax.vmap(params.critic)(obs, a_hat),
                q_data=jax.vmap(params.critic)(obs, batch.actions.reshape(B, D)),
                grad_mean_q=jax.grad(mean_pessimistic_q)(params.actor),
                grad_ratio=jax.grad(ratio)(params.actor), act_xi=act_xi, acted=acted,
                quiet_acted=quiet_acted, act_mu=jax.vmap(params.actor)(act_obs),
                ended_jacobian=ended_jacobian,
            )  # fmt: skip

        out = jax.tree.map(np.asarray, run(dynamic))
        target_q = jax.jit(jax.vmap(state.targets["critic"]))
    return dict(out, state=state, batch=jax.tree.map(np.asarray, batch), target_q=target_q)


def _td_loss(case, next_mu, *, noise_clip=CONFIG.actor_noise_clip):
    """The chunked TD loss in NumPy for next actions clip(next_mu + clip(sigma xi, -c, c))."""
    batch, c = case["batch"], CONFIG
    noise = np.clip(c.actor_noise * case["xi"], -noise_clip, noise_clip)
    next_a = np.clip(next_mu + noise, -1.0, 1.0)
    with jax.enable_x64(True):
        next_q = np.asarray(case["target_q"](jnp.asarray(batch.next_observations[:, -1]),
                                             jnp.asarray(next_a)))  # fmt: skip
    y = batch.rewards[:, -1] + c.discount**H * batch.masks[:, -1] * (
        next_q.mean(1) - c.rho * next_q.std(1)
    )
    per_example = ((case["q_data"] - y[:, None]) ** 2).mean(1)
    return np.mean(batch.valid[:, -1] * per_example), noise, next_a


def test_td_target_uses_the_target_actor_with_clipped_smoothing_noise(case):
    loss, noise, next_a = _td_loss(case, case["mu_target"])
    np.testing.assert_allclose(case["metrics"]["critic_loss"], loss, rtol=F64_RTOL)
    # Both clips are active on this batch: some noise entries at +-c and some inside, some
    # actions at +-1.
    assert (np.abs(noise) == 0.5).any() and (np.abs(noise) < 0.5).any()
    raw = case["mu_target"] + noise
    assert (np.abs(raw) > 1.0).any() and np.all(np.abs(next_a) <= 1.0)
    # The online actor, or unclipped noise, give other losses: the comparison has teeth.
    assert abs(_td_loss(case, case["mu_online"])[0] - loss) > 1e-3 * loss
    assert abs(_td_loss(case, case["mu_target"], noise_clip=np.inf)[0] - loss) > 1e-3 * loss


def test_actor_loss_by_hand(case):
    batch, metrics, c = case["batch"], case["metrics"], CONFIG
    q_e = case["q_hat"]  # the ONLINE critic at the actor's chunks, (B, E)
    q = q_e.mean(1) - c.rho * q_e.std(1)
    scale = 1.0 / np.mean(np.abs(q))
    w = batch.valid[:, -1]
    squared = ((case["a_hat"] - batch.actions.reshape(B, D)) ** 2).sum(1)  # sum over D
    bc = np.mean(w * squared)
    np.testing.assert_allclose(metrics["q_scale"], scale, rtol=F64_RTOL)
    np.testing.assert_allclose(metrics["actor_q_loss"], -np.mean(scale * q), rtol=F64_RTOL)
    np.testing.assert_allclose(metrics["bc_loss"], bc, rtol=F64_RTOL)
    assert squared[0] > 0.1 and w[0] == 0.0  # example 0 is left out by its weight, not by 0
    np.testing.assert_allclose(metrics["actor_loss"], -np.mean(scale * q) + c.alpha_actor * bc,
                               rtol=F64_RTOL)  # fmt: skip
    total = metrics["critic_loss"] + metrics["actor_loss"]
    np.testing.assert_allclose(metrics["total_loss"], total, rtol=F64_RTOL)
    # 1 / mean|q| is held: the Q term's gradient is scale * d(-mean q), not that of the ratio.
    grad_q = case["jacobian"]["actor_q_loss"].actor
    _allclose(grad_q, jax.tree.map(lambda g: -scale * g, case["grad_mean_q"]))
    leaves = zip(_leaves(grad_q), _leaves(case["grad_ratio"]))
    assert any(not np.allclose(x, y, rtol=1e-3, atol=1e-8) for x, y in leaves)


def test_each_loss_term_moves_only_its_networks(case):
    for metric, expected in ROUTES.items():
        grads = case["jacobian"][metric]
        moved = {
            field.name for field in dataclasses.fields(ReBRACParams)
            if any(np.any(g != 0) for g in _leaves(getattr(grads, field.name)))
        }  # fmt: skip
        assert moved == expected, (metric, moved)


def test_a_batch_of_ended_chunks_trains_only_the_q_term(case):
    # w = 0 everywhere: the TD and BC terms (valid-weighted) give exactly zero gradient; the
    # actor's Q term (not weighted) still moves the actor.
    grads = case["ended_jacobian"]
    for metric in ("critic_loss", "bc_loss"):
        assert all(np.all(g == 0) for g in _leaves(grads[metric])), metric
    assert any(np.abs(g).max() > 1e-6 for g in _leaves(grads["actor_q_loss"].actor))


def test_act_by_hand(case):
    noise = np.clip(CONFIG.actor_noise * case["act_xi"], -0.5, 0.5)
    expected = np.clip(case["act_mu"] + noise, -1.0, 1.0)
    np.testing.assert_allclose(case["acted"], expected, rtol=F64_RTOL, atol=F64_ATOL)
    assert (np.abs(case["act_mu"] + noise) > 1.0).any()  # the final clip is active
    # sigma = 0: the actor's output itself, whatever the key.
    np.testing.assert_allclose(case["quiet_acted"], case["act_mu"], rtol=F64_RTOL, atol=0)
    assert AGENT.bc_act is None


# ---------------------------------------------------------------------------------------------
# The update cadence.


def _moments(opt_state):
    """The actor parts of every params-shaped tree in the optimiser state (Adam's moments)."""
    trees = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ReBRACParams))
    return [t.actor for t in trees if isinstance(t, ReBRACParams)]


@pytest.mark.parametrize("delay_actor", [False, True])
def test_targets_move_every_second_update_and_the_actor_per_the_switch(delay_actor):
    # Targets (critic and actor) move at updates 2 and 4 only, from the parameters before that
    # update; the critic trains at every update; the actor at every update (the authors' code)
    # or, with the paper's stated actor delay, at 2 and 4 only, its Adam moments held too.
    config = AGENT.config(actor_hidden=(8,), critic_hidden=(8,), num_qs=2, horizon=H,
                          alpha_actor=0.5, delay_actor=delay_actor)  # fmt: skip
    init = eqx.filter_jit(lambda k: AGENT.init(k, jnp.zeros(OBS), jnp.zeros(A), config))
    state = init(jax.random.PRNGKey(0))
    update = eqx.filter_jit(lambda s, b, k: AGENT.update(s, b, key=k))
    batch = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _batch(7))
    moved = {"critic": [], "actor": [], "targets": [], "moments": []}
    for k in range(1, 5):
        new, _ = update(state, batch, jax.random.PRNGKey(10 + k))
        moved["critic"].append(_changed(state.params.critic, new.params.critic))
        moved["actor"].append(_changed(state.params.actor, new.params.actor))
        moved["targets"].append([_changed(state.targets[n], new.targets[n]) for n in new.targets])
        moved["moments"].append(_changed(_moments(state.opt_state), _moments(new.opt_state)))
        if k % 2 == 0:
            for name in ("critic", "actor"):
                pairs = zip(_leaves(getattr(state.params, name)), _leaves(state.targets[name]))
                expected = [config.tau * np.asarray(o) + (1 - config.tau) * np.asarray(t)
                            for o, t in pairs]  # fmt: skip
                _allclose(_leaves(new.targets[name]), expected, rtol=1e-6, atol=1e-7)
        state = new
    assert int(state.step) == 4
    assert moved["critic"] == [True] * 4
    assert moved["targets"] == [[False, False], [True, True]] * 2
    every = [not delay_actor or k % 2 == 0 for k in range(1, 5)]
    assert moved["actor"] == every and moved["moments"] == every
    assert len(_moments(state.opt_state)) == 2  # Adam's mu and nu were both inspected


# ---------------------------------------------------------------------------------------------
# A toy where the actor's BC weight shows.


def _toy_actor(alpha_actor, *, steps=300):
    """Train ReBRAC's actor (its own loss; only the actor moves) against a fixed two-member
    critic Q_e(s, a) = b_e s + a_0 + a_1, b = (2.5, 1.5), at s = 1 (mean 2 + a_0 + a_1, std
    0.5: the pessimistic q = 1.75 + a_0 + a_1 at rho = 0.5), on data around (-0.5, -0.3);
    return mu(1)."""
    config = AGENT.config(actor_hidden=(32, 32), critic_hidden=(8,), num_qs=2, horizon=1,
                          alpha_actor=alpha_actor, actor_noise=0.0, rho=0.5)  # fmt: skip
    n = 64
    data = np.array([-0.5, -0.3]) + 0.05 * np.random.default_rng(1).standard_normal((n, 2))
    batch = SequenceBatch(
        observations=jnp.ones((n, 1)), actions=jnp.asarray(data[:, None], jnp.float32),
        rewards=jnp.zeros((n, 1)), masks=jnp.ones((n, 1)), valid=jnp.ones((n, 1)),
        next_observations=jnp.ones((n, 1, 1)),
    )  # fmt: skip

    @jax.jit
    def run(batch):
        state = AGENT.init(jax.random.PRNGKey(0), jnp.zeros(1), jnp.zeros(2), config)
        linear = qam.nn.CriticEnsemble(1, 2, (), num_critics=2, layer_norm=False,
                                       key=jax.random.PRNGKey(1))  # fmt: skip
        weights = jnp.array([[[2.5, 1.0, 1.0]], [[1.5, 1.0, 1.0]]])
        critic = eqx.tree_at(lambda q: (q.members.layers[0].weight, q.members.layers[0].bias),
                             linear, (weights, jnp.zeros((2, 1))))  # fmt: skip
        state = eqx.tree_at(lambda s: (s.params.critic, s.targets["critic"]), state,
                            (critic, critic))  # fmt: skip
        dynamic, static = eqx.partition(state.params.actor, eqx.is_inexact_array)

        def loss(d, key):
            params = eqx.tree_at(lambda p: p.actor, state.params, eqx.combine(d, static))
            return rebrac._loss(params, state, batch, key)[0]

        optimizer = optax.adam(3e-3)

        def step(carry, key):
            d, opt_state = carry
            updates, opt_state = optimizer.update(jax.grad(loss)(d, key), opt_state, d)
            return (optax.apply_updates(d, updates), opt_state), None

        with jax.numpy_dtype_promotion("standard"):
            init = (dynamic, optimizer.init(dynamic))
            (d, _), _ = jax.lax.scan(step, init, jax.random.split(jax.random.PRNGKey(2), steps))
        return eqx.combine(d, static)(jnp.ones(1))

    return np.asarray(run(batch)), data.mean(0)


def test_bc_weight_holds_the_actor_near_the_data_against_the_q_gradient():
    # alpha = 0: the actor climbs Q to the box's corner (1, 1). alpha = 3: the stationary point
    # of -q / |q| + alpha mean_b |mu - a_b|^2 (the 1 / |q| held) is mu = a_bar + c / (2 alpha
    # q(mu)), c = (1, 1), q(mu) = 1.75 + c.mu: a shift of ~0.13 per coordinate off the data
    # mean (0.167 without the 1 / |q| normalisation, 0 without the Q term).
    greedy, _ = _toy_actor(0.0)
    assert np.all(greedy > 0.9)
    held, mean = _toy_actor(3.0)
    fixed = mean.copy()
    for _ in range(200):
        fixed = mean + 1.0 / (2 * 3.0 * (1.75 + fixed.sum()))
    shift = fixed - mean
    assert 0.12 < shift[0] < 0.145
    np.testing.assert_allclose(held, fixed, atol=0.005)


# ---------------------------------------------------------------------------------------------
# Configs.


def test_config_errors_name_the_field():
    for field, value in [("alpha_actor", -0.1), ("actor_noise", float("nan")),
                         ("actor_noise_clip", -1.0), ("actor_freq", 0),
                         ("actor_fc_scale", 0.0)]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            ReBRACConfig(**{field: value})


def test_paper_config_per_domain():
    c = AGENT.paper_config("cube-triple-play-singletask-task1-v0")
    assert (c.alpha_actor, c.actor_noise, c.horizon, c.discount, c.rho) == (0.01, 0.2, 5, 0.99, 0.5)
    assert (c.actor_freq, c.actor_fc_scale, c.actor_noise_clip) == (2, 0.01, 0.5)
    assert (c.clip_grad, c.delay_actor, c.num_qs, c.learning_rate) == (False, False, 10, 3e-4)
    c = AGENT.paper_config("puzzle-3x3-play-singletask-task4-v0")
    assert (c.alpha_actor, c.actor_noise) == (0.1, 0.0)
    c = AGENT.paper_config("humanoidmaze-large-navigate-singletask-task1-v0")
    assert (c.alpha_actor, c.actor_noise, c.horizon, c.discount, c.rho) == (
        0.01,
        0.1,
        1,
        0.995,
        0.0,
    )
    c = AGENT.paper_config("scene-play-singletask-task2-v0", delay_actor=True)
    assert (c.alpha_actor, c.actor_noise, c.delay_actor) == (0.03, 0.0, True)
    assert set(qam.agents.METHOD_PRESETS["rebrac"]) == set(qam.agents.DOMAINS)
