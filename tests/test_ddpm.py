"""The DDPM policy (`qam.vp_beta_schedule`, `qam.EpsilonNetwork`, `qam.ddpm_step`,
`qam.ddpm_sample`, `qam.ddpm_noisy_action`) and the QSM and DAC agents: the schedule's table,
the network and the sampler by hand, the sampler's moments under the exact noise predictor of a
Gaussian, the score target, the minimisers of both actor losses, every loss term by hand in
float64 with the `** valid` weighting, gradient routing, configuration errors and presets."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import qam
from qam.agents import AGENTS, AgentState, critic_action_gradient, ddpm, ddpm_actor_term
from qam.data import SequenceBatch


OBS, A, H, B, T = 3, 2, 2, 8, 4
D = A * H
TINY = dict(actor_hidden=(8, 8), critic_hidden=(16,), num_qs=2, horizon=H, diffusion_steps=T,
            time_dim=8)  # fmt: skip
CONFIGS = {
    "qsm": AGENTS["qsm"].config(**TINY, inv_temp=2.0, alpha=0.5),
    "dac": AGENTS["dac"].config(**TINY, alpha=0.7),
}
F64_RTOL, F64_ATOL = 1e-10, 1e-12

# The schedule's table: T = 10, b_min = 0.1, b_max = 10.
BETAS = [0.0578, 0.1466, 0.2270, 0.2999, 0.3659, 0.4256, 0.4798, 0.5288, 0.5732, 0.6135]
ALPHA_BARS = [0.9422, 0.8041, 0.6216, 0.4352, 0.2760, 0.1585, 0.0825, 0.0389, 0.0166, 0.0064]


def _np(schedule):
    return tuple(np.asarray(a, np.float64) for a in schedule)


@eqx.filter_jit
def _call(net, obs, x, n):
    """`net(obs, x, n)` for one example, compiled once per network and shapes."""
    return net(jnp.asarray(obs), jnp.asarray(x), n)


def _eps(net, obs, x, n):
    return np.asarray(_call(net, obs, x, jnp.asarray(float(n))))


# ---------------------------------------------------------------------------------------------
# Schedule and network.


def test_vp_schedule_matches_the_table(x64):
    betas, alphas, abars = _np(qam.vp_beta_schedule(10))
    assert betas.shape == alphas.shape == abars.shape == (11,)
    np.testing.assert_allclose(betas[1:], BETAS, atol=1e-4)
    np.testing.assert_allclose(abars[1:], ALPHA_BARS, atol=1e-4)
    assert (betas[0], alphas[0], abars[0]) == (0.0, 1.0, 1.0)
    np.testing.assert_allclose(alphas, 1.0 - betas, rtol=1e-15)
    np.testing.assert_allclose(abars, np.cumprod(alphas), rtol=1e-15)
    # Other bounds: the midpoint rule of a linear beta(t), beta_n = 1 - exp(-int beta over step n).
    b2, _, _ = _np(qam.vp_beta_schedule(4, b_min=0.5, b_max=2.0))
    rate = lambda t: 0.5 + 1.5 * t
    expected = [1 - np.exp(-0.25 * rate((n - 0.5) / 4)) for n in range(1, 5)]
    np.testing.assert_allclose(b2[1:], expected, rtol=1e-13)
    assert qam.vp_beta_schedule(3).betas.dtype == jnp.float64


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0,), {}, "num_steps"),
        ((10,), dict(b_min=2.0, b_max=1.0), "b_min"),
        ((10,), dict(b_min=0.0, b_max=0.0), "b_max > 0"),
        ((10,), dict(b_max=float("inf")), "finite"),
    ],
)
def test_vp_schedule_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        qam.vp_beta_schedule(*args, **kwargs)


def _mish(u):
    return u * np.tanh(np.log1p(np.exp(u)))


def _dense(layer, x):
    return np.asarray(layer.weight) @ x + np.asarray(layer.bias)


def _mlp_by_hand(mlp, x):
    for i, layer in enumerate(mlp.layers):
        x = _dense(layer, x)
        if i + 1 < len(mlp.layers):
            x = _mish(x)
    return x


@pytest.fixture(scope="module")
def nets():
    """Float64 epsilon networks made in one compiled program: `small` (time_dim 8) for the
    sampler tests, `wide` (time_dim 2048) for the network's own test."""
    with jax.enable_x64(True):
        make = eqx.filter_jit(lambda k1, k2: (
            qam.EpsilonNetwork(OBS, D, (8, 8), time_dim=8, key=k1),
            qam.EpsilonNetwork(OBS, D, (8, 8), time_dim=2048, key=k2),
        ))  # fmt: skip
        small, wide = make(jax.random.PRNGKey(20), jax.random.PRNGKey(21))
    return dict(small=small, wide=wide)


def test_epsilon_network_by_hand(nets, x64):
    net = nets["wide"]
    obs = np.random.default_rng(0).standard_normal(OBS)
    x = np.random.default_rng(1).standard_normal(D)
    for n in (1, 3):
        w = np.asarray(net.time_kernel)  # (time_dim / 2, 1)
        assert w.shape == (1024, 1)
        f = 2 * np.pi * n * w[:, 0]
        c = _mlp_by_hand(net.condition, np.concatenate([np.cos(f), np.sin(f)]))
        expected = _mlp_by_hand(net.body, np.concatenate([x, obs, c]))  # order (x, s, c)
        actual = _call(net, obs, x, jnp.asarray(n))  # an integer step
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(_eps(net, obs, x, n), actual, rtol=1e-15)  # as a float
    # Layer layout: condition time_dim -> 8 -> 8 (mish between, none after), body concat -> 8 ->
    # 8 -> D; zero biases, Xavier-uniform kernels.
    assert [lay.weight.shape for lay in net.condition.layers] == [(8, 2048), (8, 8)]
    assert [lay.weight.shape for lay in net.body.layers] == [(8, D + OBS + 8), (8, 8), (D, 8)]
    for layer in (*net.condition.layers, *net.body.layers):
        assert np.all(np.asarray(layer.bias) == 0)
        fan_out, fan_in = layer.weight.shape
        limit = np.sqrt(6 / (fan_in + fan_out))
        assert 0.8 * limit < np.max(np.abs(np.asarray(layer.weight))) <= limit
    # W ~ N(0, 0.2^2): the sample std of 1024 draws is within 4 standard errors of 0.2.
    std = float(np.std(np.asarray(net.time_kernel)))
    assert abs(std - 0.2) < 4 * 0.2 / np.sqrt(2 * 1024)
    with pytest.raises(ValueError, match="time_dim"):
        qam.EpsilonNetwork(OBS, D, (4,), time_dim=5, key=jax.random.PRNGKey(0))
    assert float(qam.nn.mish(jnp.asarray(0.7))) == pytest.approx(float(_mish(0.7)), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# The sampler.


def _x0_hat(eps, x, abar):
    return (x - np.sqrt(1 - abar) * eps) / np.sqrt(abar)


def test_sampler_steps_by_hand(nets, x64):
    # One step of each branch against the written-out update. x has coordinates outside the
    # box, and the step noise xi is chosen (x0_hat does not depend on it) so that the QSM state
    # x0_hat + sqrt(beta_n) xi lands at (0.5, -0.3, 1.7, -2): the clips bind on some
    # coordinates and not on others.
    schedule = qam.vp_beta_schedule(T)
    betas, alphas, abars = _np(schedule)
    net = nets["small"]
    obs, x = np.random.default_rng(2).standard_normal(OBS), np.array([0.2, -0.5, 1.8, -2.5])
    landing = np.array([0.5, -0.3, 1.7, -2.0])
    step = jax.jit(
        lambda n, xi, clip_before, clip_after: qam.ddpm_step(
            net, jnp.asarray(obs), jnp.asarray(x), n, noise=xi, schedule=schedule,
            clip_before=clip_before, clip_after=clip_after,
        ),
        static_argnums=(2, 3),
    )  # fmt: skip
    for n in (1, 3):
        x0 = _x0_hat(_eps(net, obs, x, n), x, abars[n])
        xi = (landing - x0) / np.sqrt(betas[n])
        noise = np.sqrt(betas[n]) * xi if n > 1 else 0.0

        # DAC: the DDPM posterior mean from the clipped x0_hat; at n = 1 exactly clip(x0_hat).
        dac_next, dac_x0 = (np.asarray(v) for v in step(n, jnp.asarray(xi), True, False))
        np.testing.assert_allclose(dac_x0, np.clip(x0, -1, 1), rtol=1e-12)
        mean = (np.sqrt(abars[n - 1]) * betas[n] * np.clip(x0, -1, 1)
                + np.sqrt(alphas[n]) * (1 - abars[n - 1]) * x) / (1 - abars[n])  # fmt: skip
        np.testing.assert_allclose(dac_next, mean + noise, rtol=1e-12, atol=1e-14)
        if n == 1:
            np.testing.assert_array_equal(dac_next, dac_x0)
            assert np.all(np.abs(dac_next) <= 1) and np.any(np.abs(x0) > 1)

        # QSM: jump to x0_hat, add sqrt(beta_n) xi (none at n = 1), clip the state.
        qsm_next, qsm_x0 = (np.asarray(v) for v in step(n, jnp.asarray(xi), False, True))
        np.testing.assert_allclose(qsm_x0, x0, rtol=1e-12)
        np.testing.assert_allclose(qsm_next, np.clip(x0 + noise, -1, 1), rtol=1e-12, atol=1e-14)
        if n > 1:
            np.testing.assert_allclose(qsm_next, [0.5, -0.3, 1.0, -1.0], rtol=1e-12)


def _sample_by_hand(net, obs, key, schedule, clip_before, clip_after):
    """The reverse chain written out: x_T from split(key)[0]; step noises from successive
    splits of split(split(key)[1])[1]."""
    betas, alphas, abars = _np(schedule)
    num_steps = len(betas) - 1
    noise_key, sampler_key = jax.random.split(key)
    x = np.asarray(jax.random.normal(noise_key, (D,)))
    carry = jax.random.split(sampler_key)[1]
    for n in range(num_steps, 0, -1):
        carry, step_key = jax.random.split(carry)
        xi = np.asarray(jax.random.normal(step_key, (D,)))
        x0 = _x0_hat(_eps(net, obs, x, n), x, abars[n])
        if clip_before:
            x0 = np.clip(x0, -1, 1)
            x = (np.sqrt(abars[n - 1]) * betas[n] * x0
                 + np.sqrt(alphas[n]) * (1 - abars[n - 1]) * x) / (1 - abars[n])  # fmt: skip
        else:
            x = x0
        if n > 1:
            x = x + np.sqrt(betas[n]) * xi
        if clip_after:
            x = np.clip(x, -1, 1)
    return x


def test_sampler_by_hand_and_in_the_box(nets, getkey, x64):
    schedule = qam.vp_beta_schedule(T)
    net = nets["small"]
    # Scale the output layer so that x0_hat is often outside the box.
    net = eqx.tree_at(lambda m: m.body.layers[-1].weight, net, replace_fn=lambda w: 3.0 * w)
    obs = 2.0 * jax.random.normal(getkey(), (64, OBS))
    keys = jax.random.split(getkey(), 64)

    @jax.jit
    def run(obs, keys):
        def one(o, k, before, after):
            return qam.ddpm_sample(net, o, schedule=schedule, clip_before=before,
                                   clip_after=after, key=k, action_dim=D)  # fmt: skip

        flags = ((True, False), (False, True), (False, False))
        return [jax.vmap(lambda o, k, f=f: one(o, k, *f))(obs, keys) for f in flags]

    dac, qsm, neither = (np.asarray(v) for v in run(obs, keys))
    for i in range(3):
        o = obs[i]
        np.testing.assert_allclose(dac[i], _sample_by_hand(net, o, keys[i], schedule, True, False),
                                   rtol=1e-11, atol=1e-12)  # fmt: skip
        np.testing.assert_allclose(qsm[i], _sample_by_hand(net, o, keys[i], schedule, False, True),
                                   rtol=1e-11, atol=1e-12)  # fmt: skip
    assert np.all(np.abs(dac) <= 1) and np.all(np.abs(qsm) <= 1)
    assert np.any(np.abs(neither) > 1)  # no final clip of its own: the flags make the box
    # Given noise: the same chain as from the key.
    noise_key, sampler_key = jax.random.split(keys[0])
    carry, rows = jax.random.split(sampler_key)[1], []
    for _ in range(T):
        carry, k = jax.random.split(carry)
        rows.append(jax.random.normal(k, (D,)))
    given = qam.ddpm_sample(net, obs[0], schedule=schedule, clip_before=True, clip_after=False,
                            noise=jax.random.normal(noise_key, (D,)),
                            step_noise=jnp.stack(rows))  # fmt: skip
    np.testing.assert_allclose(given, dac[0], rtol=1e-12)
    with pytest.raises(ValueError, match="either `key`"):
        qam.ddpm_sample(net, obs[0], schedule=schedule, clip_before=True, clip_after=False)
    with pytest.raises(ValueError, match=r"\(T, D\)"):
        qam.ddpm_sample(net, obs[0], schedule=schedule, clip_before=True, clip_after=False,
                        noise=jnp.zeros(D), step_noise=jnp.zeros((T + 1, D)))  # fmt: skip


class _GaussianEps(eqx.Module):
    """The exact noise predictor `E[eps | x_n]` of data `a ~ N(mu, diag(s2))`:
    `sqrt(1 - abar_n) (x - sqrt(abar_n) mu) / (abar_n s2 + 1 - abar_n)`."""

    mu: jax.Array
    s2: jax.Array
    abars: jax.Array

    def __call__(self, obs, x, n):
        abar = self.abars[jnp.round(n).astype(jnp.int32)]
        return jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * self.mu) / (abar * self.s2 + 1 - abar)


def _linear_gaussian_moments(mu, s2, schedule, *, dac, variance, x_init):
    """Mean and variance (per dimension, float64) of the reverse chain under `_GaussianEps`:
    x0_hat = p_n x + q_n with p_n = sqrt(abar) s2 / (abar s2 + 1 - abar), q_n = (1 - abar) mu /
    (abar s2 + 1 - abar); DAC's step is c0 x0_hat + c1 x, QSM's x0_hat; then the step's noise
    variance `variance(n)`. Also the largest |x0_hat| mean + 6 sd met."""
    betas, alphas, abars = _np(schedule)
    m, v = x_init
    reach = 0.0
    for n in range(len(betas) - 1, 0, -1):
        den = abars[n] * s2 + 1 - abars[n]
        p, q = np.sqrt(abars[n]) * s2 / den, (1 - abars[n]) * mu / den
        reach = max(reach, float(np.max(np.abs(p * m + q) + 6 * np.sqrt(p**2 * v))))
        if dac:
            c0 = np.sqrt(abars[n - 1]) * betas[n] / (1 - abars[n])
            c1 = np.sqrt(alphas[n]) * (1 - abars[n - 1]) / (1 - abars[n])
            slope, shift = c0 * p + c1, c0 * q
        else:
            slope, shift = p, q
        m, v = slope * m + shift, slope**2 * v + variance(n)
    return m, v, reach


def test_sampler_moments_under_the_exact_gaussian_predictor(x64):
    # Both branches are affine in x under the exact predictor of a Gaussian, so the output is
    # Gaussian with moments from a closed-form recursion. With the true reverse variance
    # (posterior variance + c0^2 Var(a | x_n)) and x_T from the true marginal, the recursion
    # returns exactly N(mu, s2): a check of the predictor and of the recursion. The sampler
    # uses variance beta_n and x_T ~ N(0, I): 16384 samples match that recursion's moments
    # within 4 standard errors, and differ from the data's variance by many.
    schedule = qam.vp_beta_schedule(T)
    betas, _, abars = _np(schedule)
    mu, s2 = np.array([0.3, -0.2]), np.array([0.01, 0.0225])
    true_var = lambda n: (betas[n] * (1 - abars[n - 1]) / (1 - abars[n])
                          + (np.sqrt(abars[n - 1]) * betas[n] / (1 - abars[n])) ** 2
                          * s2 * (1 - abars[n]) / (abars[n] * s2 + 1 - abars[n]))  # fmt: skip
    marginal = (np.sqrt(abars[T]) * mu, abars[T] * s2 + 1 - abars[T])
    m, v, _ = _linear_gaussian_moments(mu, s2, schedule, dac=True, variance=true_var,
                                       x_init=marginal)  # fmt: skip
    np.testing.assert_allclose(m, mu, rtol=1e-12)
    np.testing.assert_allclose(v, s2, rtol=1e-12)

    eps_net = _GaussianEps(jnp.asarray(mu), jnp.asarray(s2), schedule.alpha_bars)
    num = 16384
    keys = jax.random.split(jax.random.PRNGKey(7), num)

    @jax.jit
    def samples(keys):
        draw = lambda k, before: qam.ddpm_sample(
            eps_net, jnp.zeros(1), schedule=schedule, clip_before=before, clip_after=False,
            key=k, action_dim=2,
        )  # fmt: skip
        return jax.vmap(lambda k: draw(k, True))(keys), jax.vmap(lambda k: draw(k, False))(keys)

    for dac, x in zip((True, False), samples(keys)):
        x = np.asarray(x)
        m, v, reach = _linear_gaussian_moments(
            mu,
            s2,
            schedule,
            dac=dac,
            variance=lambda n: betas[n] if n > 1 else 0.0,
            x_init=(0.0, 1.0),
        )
        if dac:
            assert reach < 1.0  # the clip of x0_hat never binds: the chain is affine
        np.testing.assert_array_less(np.abs(x.mean(0) - m), 4 * np.sqrt(v / num))
        np.testing.assert_array_less(np.abs(x.var(0) - v), 4 * v * np.sqrt(2 / (num - 1)))
        assert np.all(np.abs(v - s2) > 20 * v * np.sqrt(2 / (num - 1)))


# ---------------------------------------------------------------------------------------------
# The actor terms.


def _gelu(u):
    return 0.5 * u * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (u + 0.044715 * u**3)))


def _critic_by_hand(critic, obs, action):
    """mean_e Q_e(s, a) with the members' layers written out (GELU, LayerNorm eps)."""
    x0, values = jnp.concatenate([obs, action]), []
    layers, norms = critic.members.layers, critic.members.norms
    for e in range(critic.num_critics):
        x = x0
        for i, layer in enumerate(layers):
            x = layer.weight[e] @ x + layer.bias[e]
            if i + 1 < len(layers):
                x = _gelu(x)
                if norms is not None:
                    c = x - jnp.mean(x)
                    x = c / jnp.sqrt(jnp.mean(c**2) + norms[i].eps)
                    x = x * norms[i].weight[e] + norms[i].bias[e]
        values.append(x[0])
    return sum(values) / len(values)


@eqx.filter_jit
def _hand_gradient_jit(critic, obs, actions):
    return jax.vmap(jax.grad(lambda o, a: _critic_by_hand(critic, o, a), argnums=1))(obs, actions)


def _hand_gradient(critic, obs, actions):
    """Row b: the gradient of the hand-written mean_e Q_e(s_b, .) at actions_b."""
    return np.asarray(_hand_gradient_jit(critic, jnp.asarray(obs), jnp.asarray(actions)))


def test_qsm_score_target_is_the_critic_gradient_at_the_noisy_action(x64):
    # g = grad_a mean_e Q_e at the noisy chunk itself (coordinates outside the box included,
    # no clip); an eps "network" that returns -inv_temp * g of the hand-written critic at its
    # input has QSM loss exactly 0.
    rng = np.random.default_rng(3)
    obs = jnp.asarray(rng.standard_normal((B, OBS)))
    x = jnp.asarray(1.5 * rng.standard_normal((B, D)))
    assert np.any(np.abs(np.asarray(x)) > 1)
    inv_temp = 3.0

    class _Target(eqx.Module):
        critic: qam.nn.CriticEnsemble

        def __call__(self, o, a, n):
            return -inv_temp * jax.grad(lambda a_: _critic_by_hand(self.critic, o, a_))(a)

    @jax.jit
    def run(key):
        critic = qam.nn.CriticEnsemble(OBS, D, (16,), num_critics=3, key=key)
        loss, metrics = ddpm_actor_term(
            _Target(critic), critic, obs, x, jnp.full(B, 2), jnp.zeros((B, D)), jnp.ones(B),
            schedule=qam.vp_beta_schedule(T), actor_loss="qsm", inv_temp=inv_temp, alpha=0.0,
        )  # fmt: skip
        hand = lambda a: jax.vmap(jax.grad(lambda o, a_: _critic_by_hand(critic, o, a_),
                                           argnums=1))(obs, a)  # fmt: skip
        return (critic_action_gradient(critic, obs, x), hand(x), hand(jnp.clip(x, -1, 1)), loss,
                metrics["qsm_loss"])  # fmt: skip

    g, hand, hand_clipped, loss, qsm_loss = (np.asarray(v) for v in run(jax.random.PRNGKey(9)))
    np.testing.assert_allclose(g, hand, rtol=1e-11, atol=1e-13)
    assert float(qsm_loss) < 1e-24 and float(loss) < 1e-24
    # At the clipped chunk the gradient differs: the test would see a clip.
    assert not np.allclose(hand_clipped, g, atol=1e-3)


class _ConstEps(eqx.Module):
    """A one-parameter eps 'network': theta in every coordinate."""

    theta: jax.Array

    def __call__(self, obs, x, n):
        return jnp.broadcast_to(self.theta, x.shape)


def _linear_critic(obs_dim, weights):
    """One member, Q(s, a) = weights . a (no hidden layer, no bias): gradient `weights`."""
    weights = jnp.asarray(weights)
    critic = qam.nn.CriticEnsemble(obs_dim, weights.shape[0], (), num_critics=1,
                                   layer_norm=False, key=jax.random.PRNGKey(0))  # fmt: skip
    w = jnp.concatenate([jnp.zeros(obs_dim), weights])[None, None]
    return eqx.tree_at(lambda q: (q.members.layers[0].weight, q.members.layers[0].bias), critic,
                       (w, jnp.zeros((1, 1))))  # fmt: skip


@pytest.mark.parametrize("actor_loss", ["qsm", "dac"])
def test_gradient_descent_finds_the_minimiser(actor_loss, x64):
    # 1-D chunk, constant g = 0.8, all examples at step n = 3, a quarter invalid. Gradient
    # descent on alpha L_BC + L_actor converges to (alpha eps_bar - lambda g) / (1 + alpha)
    # (QSM) or eps_bar - sqrt(1 - abar_3) g / (2 alpha) (DAC), eps_bar over the VALID examples
    # (invalid ones contribute a constant under `** valid`, nothing under `valid *`). The two
    # weightings have the same gradient; their losses differ by (1 + alpha) (#invalid) / B.
    schedule, n, g, lam, alpha, batch = qam.vp_beta_schedule(T), 3, 0.8, 2.0, 1.5, 64
    rng = np.random.default_rng(4)
    eps = rng.standard_normal((batch, 1))
    valid = (np.arange(batch) % 4 != 0).astype(np.float64)
    abar = float(schedule.alpha_bars[n])
    x = np.sqrt(abar) * rng.uniform(-1, 1, (batch, 1)) + np.sqrt(1 - abar) * eps
    critic, obs = _linear_critic(1, [g]), jnp.zeros((batch, 1))
    eps_bar = eps[valid == 1].mean()
    if actor_loss == "qsm":
        expected = (alpha * eps_bar - lam * g) / (1 + alpha)
    else:
        expected = eps_bar - np.sqrt(1 - abar) * g / (2 * alpha)

    def loss(theta, how):
        return ddpm_actor_term(
            _ConstEps(theta), critic, obs, jnp.asarray(x), jnp.full(batch, n), jnp.asarray(eps),
            jnp.asarray(valid), schedule=schedule, actor_loss=actor_loss, inv_temp=lam,
            alpha=alpha, valid_weighting=how,
        )[0]  # fmt: skip

    @jax.jit
    def run(theta):
        step = lambda th, _: (th - 0.2 * jax.grad(loss)(th, "exponent"), None)
        theta = jax.lax.scan(step, theta, None, length=600)[0]
        probes = jnp.stack([theta, jnp.asarray(0.3), jnp.asarray(-1.7)])
        per_probe = lambda how, f: jax.vmap(lambda p: f(p, how))(probes)
        return theta, {how: (per_probe(how, loss), per_probe(how, jax.grad(loss)))
                       for how in ("exponent", "multiply")}  # fmt: skip

    theta, probed = run(jnp.asarray(-2.0))
    np.testing.assert_allclose(theta, expected, rtol=1e-9)
    (loss_exp, grad_exp), (loss_mul, grad_mul) = probed["exponent"], probed["multiply"]
    assert abs(float(grad_exp[0])) < 1e-9  # stationary at the minimiser
    np.testing.assert_allclose(grad_exp, grad_mul, rtol=1e-12, atol=1e-14)
    gap = (1 + alpha) * np.sum(valid == 0) / batch
    np.testing.assert_allclose(loss_exp - loss_mul, np.full(3, gap), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# The agents: every loss term by hand, gradient routing, acting.


def _batch(seed, *, all_invalid=False):
    rng = np.random.default_rng(seed)
    valid = np.ones((B, H))
    valid[0, -1] = 0.0
    if all_invalid:
        valid[:, -1] = 0.0
    return SequenceBatch(
        observations=jnp.asarray(rng.standard_normal((B, OBS))),
        actions=jnp.asarray(rng.uniform(-1, 1, (B, H, A))),
        rewards=jnp.asarray(-rng.uniform(0, 1, (B, H))),
        masks=jnp.asarray(np.where(np.arange(B)[:, None] == 1, 0.0, 1.0) * np.ones((B, H))),
        valid=jnp.asarray(valid),
        next_observations=jnp.asarray(rng.standard_normal((B, H, OBS))),
    )


def _by_hand(name, state, batch, key):
    """Every loss term and `act` of agent `name` from the networks: the sampler written out,
    the TD target, the noising, the critic gradient of a hand-written critic, and the
    `** valid` weighting as 'the loss where valid, 1 where not'. Keys as the agent documents
    them: split(key) = (TD sampler, noising); example b noised with split(noising, B)[b]."""
    config, params = CONFIGS[name], state.params
    schedule = config.schedule()
    _, _, abars = _np(schedule)
    obs = np.asarray(batch.observations)
    actions, w = np.asarray(batch.actions).reshape(B, D), np.asarray(batch.valid[:, -1])
    td_key, noise_key = jax.random.split(key)
    out = {}

    next_obs = batch.next_observations[:, -1]
    flags = (config.clip_sampler_before, config.clip_sampler_after)
    next_actions = np.stack([
        np.clip(_sample_by_hand(params.actor, next_obs[b], k, schedule, *flags), -1, 1)
        for b, k in enumerate(jax.random.split(td_key, B))
    ])  # fmt: skip
    next_q = np.asarray(jax.vmap(state.targets["critic"])(next_obs, jnp.asarray(next_actions)))
    y = np.asarray(batch.rewards[:, -1]) + config.discount**H * np.asarray(batch.masks[:, -1]) * (
        next_q.mean(1) - config.rho * next_q.std(1)
    )
    q = np.asarray(jax.vmap(params.critic)(batch.observations, jnp.asarray(actions)))
    out["critic_loss"] = np.mean(w * np.mean((q - y[:, None]) ** 2, 1))

    ks = jax.random.split(noise_key, B)
    steps = np.array([int(jax.random.randint(jax.random.split(k)[0], (), 1, T + 1)) for k in ks])
    eps = np.stack([np.asarray(jax.random.normal(jax.random.split(k)[1], (D,))) for k in ks])
    x = np.sqrt(abars[steps])[:, None] * actions + np.sqrt(1 - abars[steps])[:, None] * eps
    pred = np.stack([_eps(params.actor, obs[b], x[b], steps[b]) for b in range(B)])

    def quirk(losses):  # ** valid: the loss where valid, exactly 1 where not
        return np.mean(np.where(w == 1.0, losses, 1.0))

    out["bc_loss"] = quirk(np.mean((eps - pred) ** 2, 1))
    for critic_name, critic in (("target", state.targets["critic"]), ("online", params.critic)):
        g = _hand_gradient(critic, obs, x)
        if name == "qsm":
            losses = np.mean((-config.inv_temp * g - pred) ** 2, 1)
        else:
            losses = np.mean(np.sqrt(1 - abars[steps])[:, None] * g * pred, 1)
        out[f"method_loss_{critic_name}"] = quirk(losses)
    out["steps"] = steps
    return out


@pytest.fixture(scope="module")
def initial():
    """One float64 initial state and a second critic (both agents' TINY networks have the same
    shapes, so one compiled init serves both)."""
    with jax.enable_x64(True):
        config = CONFIGS["qsm"]
        init = eqx.filter_jit(lambda k: AGENTS["qsm"].init(k, jnp.zeros(OBS), jnp.zeros(A), config))
        return init(jax.random.PRNGKey(0)), init(jax.random.PRNGKey(1)).params.critic


def _with_config(state, config):
    return AgentState(state.params, state.targets, state.opt_state, state.step, config,
                      state.action_dim)  # fmt: skip


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, initial):
    """Per agent, in float64 and one compiled program: a state whose target critic differs from
    the online one; the loss's metrics (also with `use_target_critic_grad=False`) and the
    reverse-mode Jacobian of the routed metrics; the metrics and gradient of an all-invalid
    batch; acting; and the same quantities by hand."""
    name = request.param
    agent, config = AGENTS[name], CONFIGS[name]
    with jax.enable_x64(True):
        state = eqx.tree_at(lambda s: s.targets["critic"], initial[0], initial[1])
        state = _with_config(state, config)
        online_state = _with_config(
            state, dataclasses.replace(config, use_target_critic_grad=False)
        )
        batch, invalid, key = _batch(2), _batch(2, all_invalid=True), jax.random.PRNGKey(3)
        obs = 3.0 * jax.random.normal(jax.random.PRNGKey(5), (3, OBS))
        act_keys = jax.random.split(jax.random.PRNGKey(6), 3)
        dynamic, static = eqx.partition(state.params, eqx.is_inexact_array)
        routed = ("critic_loss", "bc_loss", f"{name}_loss")

        def metrics_fn(d, st, b):
            metrics = ddpm._loss(eqx.combine(d, static), st, b, key)[1]
            return {m: metrics[m] for m in routed}, metrics

        @jax.jit
        def run(d):
            # The batch and its all-invalid copy in one vmapped Jacobian.
            both = jax.tree.map(lambda x, y: jnp.stack([x, y]), batch, invalid)
            jacobians, metrics = jax.vmap(
                lambda b: jax.jacrev(metrics_fn, has_aux=True)(d, state, b)
            )(both)
            first, second = (
                jax.tree.map(lambda x, i=i: x[i], (jacobians, metrics)) for i in (0, 1)
            )

            def method(d_):
                routed_metrics, all_metrics = metrics_fn(d_, online_state, batch)
                return routed_metrics[f"{name}_loss"], all_metrics

            online_grad, online = jax.grad(method, has_aux=True)(d)
            acted = jax.vmap(lambda o, k: agent.act(state, o, key=k))(obs, act_keys)
            return first[1], first[0], online, online_grad, second[1], second[0], acted

        out = jax.tree.map(np.asarray, run(dynamic))
        expected = _by_hand(name, state, batch, key)
        flags = (config.clip_sampler_before, config.clip_sampler_after)
        act_hand = np.stack([
            np.clip(_sample_by_hand(state.params.actor, o, k, config.schedule(), *flags), -1, 1)
            for o, k in zip(obs, act_keys)
        ])  # fmt: skip
    names = ("metrics", "jacobian", "online", "online_grad", "invalid_metrics",
             "invalid_jacobian", "acted")  # fmt: skip
    return dict(name=name, expected=expected, act_hand=act_hand, **dict(zip(names, out)))


def test_loss_terms_hand_computed(case):
    name, metrics, expected = case["name"], case["metrics"], case["expected"]
    config = CONFIGS[name]
    for metric in ("critic_loss", "bc_loss"):
        np.testing.assert_allclose(metrics[metric], expected[metric], rtol=F64_RTOL)
    np.testing.assert_allclose(metrics[f"{name}_loss"], expected["method_loss_target"],
                               rtol=F64_RTOL)  # fmt: skip
    actor_loss = config.alpha * expected["bc_loss"] + expected["method_loss_target"]
    np.testing.assert_allclose(metrics["actor_loss"], actor_loss, rtol=F64_RTOL)
    np.testing.assert_allclose(metrics["total_loss"], expected["critic_loss"] + actor_loss,
                               rtol=F64_RTOL)  # fmt: skip
    # use_target_critic_grad=False: the online critic's gradient, which differs here.
    np.testing.assert_allclose(case["online"][f"{name}_loss"], expected["method_loss_online"],
                               rtol=F64_RTOL)  # fmt: skip
    assert not np.isclose(expected["method_loss_online"], expected["method_loss_target"])
    assert len(set(expected["steps"].tolist())) > 1  # the steps are drawn per example


def _moved(grads):
    return {
        field for field in ("critic", "actor")
        if any(np.any(g != 0) for g in jax.tree.leaves(getattr(grads, field)))
    }  # fmt: skip


def test_each_loss_term_moves_only_its_networks(case):
    # The actor term differentiates a stored critic: with the online critic's gradient
    # (use_target_critic_grad=False) it still moves the epsilon network only.
    routes = {"critic_loss": {"critic"}, "bc_loss": {"actor"}, f"{case['name']}_loss": {"actor"}}
    for metric, expected in routes.items():
        assert _moved(case["jacobian"][metric]) == expected, metric
    assert _moved(case["online_grad"]) == {"actor"}


def test_all_invalid_batch_gives_losses_of_one_and_no_gradient(case):
    # `** valid` with valid = 0 everywhere: every per-example loss is exactly 1 (so are the
    # means), the TD loss is 0, and no parameter receives any gradient from any term.
    metrics, name = case["invalid_metrics"], case["name"]
    assert float(metrics["bc_loss"]) == 1.0
    assert float(metrics[f"{name}_loss"]) == 1.0
    assert float(metrics["critic_loss"]) == 0.0
    assert float(metrics["total_loss"]) == CONFIGS[name].alpha + 1.0
    for metric in ("critic_loss", "bc_loss", f"{name}_loss"):
        for g in jax.tree.leaves(case["invalid_jacobian"][metric]):
            assert np.all(np.asarray(g) == 0.0), metric


def test_act_by_hand(case):
    np.testing.assert_allclose(case["acted"], case["act_hand"], rtol=1e-10, atol=1e-12)
    assert np.all(np.abs(case["acted"]) <= 1.0)


# ---------------------------------------------------------------------------------------------
# Configuration and presets.


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("qsm", dict(actor_loss="score"), "actor_loss"),
        ("qsm", dict(diffusion_steps=0), "diffusion_steps"),
        ("qsm", dict(time_dim=7), "time_dim"),
        ("qsm", dict(beta_min=-0.1), "beta_min"),
        ("qsm", dict(beta_min=2.0, beta_max=1.0), "beta_min"),
        ("qsm", dict(beta_min=0.0, beta_max=0.0), "beta_max"),
        ("qsm", dict(inv_temp=float("nan")), "inv_temp"),
        ("qsm", dict(alpha=-1.0), "alpha"),
        ("dac", dict(alpha=0.0), r"alpha.*> 0 for actor_loss dac"),
        ("qsm", dict(valid_weighting="sum"), "valid_weighting"),
    ],
)
def test_config_errors(name, overrides, match):
    # A value outside a Literal field's choices is refused by the type checker under the test
    # suite's beartype hook before the config's own check (a ValueError) would run.
    with pytest.raises((ValueError, TypeCheckError), match=match):
        AGENTS[name].config(**overrides)


QSM_PAPER = {  # (inv_temp, alpha)
    "antmaze-large-navigate": (10, 10), "antmaze-giant-navigate": (10, 10),
    "humanoidmaze-medium-navigate": (10, 30), "humanoidmaze-large-navigate": (10, 30),
    "scene-play": (3, 30), "puzzle-3x3-play": (10, 30), "puzzle-4x4-play": (10, 1),
    "cube-double-play": (1, 10), "cube-triple-play": (10, 10), "cube-quadruple-play": (1, 10),
}  # fmt: skip
DAC_PAPER = {
    "antmaze-large-navigate": 0.3, "antmaze-giant-navigate": 0.3,
    "humanoidmaze-medium-navigate": 1, "humanoidmaze-large-navigate": 0.3, "scene-play": 1,
    "puzzle-3x3-play": 1, "puzzle-4x4-play": 1, "cube-double-play": 3, "cube-triple-play": 0.3,
    "cube-quadruple-play": 1,
}  # fmt: skip


def test_registered_defaults_and_presets():
    qsm, dac = AGENTS["qsm"].config(), AGENTS["dac"].config()
    assert (qsm.actor_loss, qsm.clip_sampler_before, qsm.clip_sampler_after) == ("qsm", False, True)
    assert (dac.actor_loss, dac.clip_sampler_before, dac.clip_sampler_after) == ("dac", True, False)
    for c in (qsm, dac):
        assert (c.diffusion_steps, c.time_dim, c.beta_min, c.beta_max) == (10, 64, 0.1, 10.0)
        assert (c.clip_grad, c.use_target_critic_grad, c.valid_weighting) == (
            True, True, "exponent")  # fmt: skip
    assert (qsm.inv_temp, qsm.alpha, dac.alpha) == (1.0, 0.0, 1.0)
    assert AGENTS["qsm"].bc_act is None and AGENTS["dac"].bc_act is None
    for domain, (inv_temp, alpha) in QSM_PAPER.items():
        c = AGENTS["qsm"].paper_config(f"{domain}-singletask-task1-v0")
        assert (c.inv_temp, c.alpha, c.actor_loss, c.clip_sampler_after) == (
            inv_temp, alpha, "qsm", True)  # fmt: skip
    for domain, alpha in DAC_PAPER.items():
        c = AGENTS["dac"].paper_config(f"{domain}-singletask-task1-v0")
        assert (c.alpha, c.actor_loss, c.clip_sampler_before) == (alpha, "dac", True)
    c = AGENTS["dac"].paper_config("humanoidmaze-large-navigate-singletask-task1-v0")
    assert (c.horizon, c.discount, c.rho) == (1, 0.995, 0.0)
