"""CGQL, CGQL-MSE and CGQL-Linex: the guided sampler against its recursion (the x/t term's scale
on a Gaussian base, the displacement along a linear critic's gradient, a hand-unrolled loop on
nonlinear networks), the linex loss's minimisers and branches, every loss term by hand in
float64, gradient routing, valid weighting, acting, config errors and presets."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import gaussian_m, gaussian_velocity
from jaxtyping import TypeCheckError

import qam
from qam.agents import (
    AGENTS,
    DOMAINS,
    METHOD_PRESETS,
    cgql,
    guided_ode_actions,
    guided_ode_sample,
    linex_loss,
    noisy_critic_term,
    ode_actions,
    time_conditioned_q,
    time_conditioned_q_batched,
)
from qam.data import SequenceBatch


OBS, A, H, B, K = 3, 2, 2, 8, 3
D = A * H
NAMES = ("cgql", "cgql-mse", "cgql-linex")
TINY = dict(actor_hidden=(16,), critic_hidden=(16,), num_qs=2, horizon=H, flow_steps=K)
# Guidance strong enough to move the samples; in linex a small switch and a large inverse
# temperature put some members of the batch on each branch of the loss; cgql-mse runs the
# online flow as its base and keeps the best of two candidates.
CONFIGS = {
    "cgql": AGENTS["cgql"].config(**TINY, inv_temp=3.0, guidance_coef=0.3),
    "cgql-mse": AGENTS["cgql-mse"].config(
        **TINY,
        inv_temp=3.0,
        guidance_coef=0.3,
        noisy_coef=0.5,
        target_guidance=False,
        best_of_n=2,
    ),  # fmt: skip
    "cgql-linex": AGENTS["cgql-linex"].config(
        **TINY, inv_temp=8.0, guidance_coef=0.3, noisy_coef=0.5, isd_clip=0.5
    ),  # fmt: skip
}
F64_RTOL, F64_ATOL = 1e-10, 1e-12


def _linear_critic(weights, num_critics=1):
    """A critic `Q_e(s, a, t) = w_e . concat(s, a, t)` (no hidden layer, no bias); `weights` has
    shape `(E, obs + D + 1)`."""
    weights = jnp.atleast_2d(jnp.asarray(weights))
    critic = qam.nn.CriticEnsemble(
        1, weights.shape[1] - 1, (), num_critics=weights.shape[0], layer_norm=False,
        key=jax.random.PRNGKey(0),
    )  # fmt: skip
    weight = critic.members.layers[0].weight
    return eqx.tree_at(
        lambda q: (q.members.layers[0].weight, q.members.layers[0].bias),
        critic,
        (weights.astype(weight.dtype)[:, None, :], jnp.zeros((weights.shape[0], 1), weight.dtype)),
    )


def _guided_by_hand(base, critic, obs, z, num_steps, theta, lam, flow_time):
    """The guided Euler ODE unrolled in Python: plain step at i = 0, then
    `v += theta (lam (1 - t) grad_x mean_e Q_e(s, x, c) + x) / t` with `c = t` or 1."""
    x = z
    for i in range(num_steps):
        t = i / num_steps
        v = base(jnp.asarray(t, z.dtype), x, obs)
        if lam > 0 and i > 0:
            c = jnp.asarray([t if flow_time else 1.0], z.dtype)
            g = jax.grad(lambda y, c=c: jnp.mean(critic(obs, jnp.concatenate([y, c]))))(x)
            v = v + theta * (lam * (1 - t) * g + x) / t
        x = x + v / num_steps
    return jnp.clip(x, -1.0, 1.0)


@pytest.fixture(scope="module")
def networks():
    """Float64: a nonlinear velocity field, a three-member time-conditioned critic,
    observations and noises (one compiled program rather than many small eager ones)."""

    @eqx.filter_jit
    def make(key):
        keys = jax.random.split(key, 4)
        return (
            qam.nn.VelocityNetwork(OBS, D, (16, 16), key=keys[0]),
            qam.nn.CriticEnsemble(OBS, D + 1, (16,), num_critics=3, key=keys[1]),
            jax.random.normal(keys[2], (B, OBS)),
            2.0 * jax.random.normal(keys[3], (B, D)),
        )

    with jax.enable_x64(True):
        return make(jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------------------------
# The guided sampler.


def test_x_over_t_term_scales_a_gaussian_base_even_with_a_zero_critic(x64):
    # With grad Q = 0 and the exact N(0, s^2) velocity v = m(t) x, each guided step is
    # x_{i+1} = (1 + h m(t_i) + theta / i) x_i: linear, so the output's std over the plain
    # ODE's is the product of the per-step ratios, independent of the noise.
    s2 = np.array([1.0, 0.25])
    base = gaussian_velocity(jnp.zeros(2), jnp.asarray(s2))
    critic = _linear_critic(np.zeros(1 + 2 + 1))
    obs = jnp.zeros((256, 1))
    noise = jax.random.normal(jax.random.PRNGKey(0), (256, 2))

    @jax.jit
    def stds(theta):
        run = lambda th: guided_ode_actions(
            base, critic, obs, noise, num_steps=10, guidance_coef=th, inv_temp=10.0, clip=False
        )
        return jnp.std(run(theta), axis=0) / jnp.std(run(0.0), axis=0)

    ratios = {theta: np.asarray(stds(theta)) for theta in (0.01, 0.1, 1.0)}
    np.testing.assert_allclose(ratios[0.01][0], 1.0302, atol=5e-5)
    np.testing.assert_allclose(ratios[0.1][0], 1.3362, atol=5e-5)
    np.testing.assert_allclose(ratios[1.0][0], 10.826, atol=5e-4)
    np.testing.assert_allclose(ratios[0.1][1], 1.3571, atol=5e-5)

    def product(theta, s):
        ratio = 1.0
        for i in range(1, 10):
            step = 1.0 + 0.1 * gaussian_m(i / 10, s)
            ratio *= (step + theta / i) / step
        return ratio

    for theta, r in ratios.items():
        np.testing.assert_allclose(r, [product(theta, s) for s in s2], rtol=1e-10)
    # About prod_{i=1}^{K-1} (1 + theta / i): the rough size quoted in the docstring.
    np.testing.assert_allclose(ratios[1.0][0], 10.0, rtol=0.1)


def test_no_guidance_is_the_plain_ode_exactly(networks, x64):
    # theta = 0 (inv_temp > 0: the guided loop runs, adding exactly 0) and inv_temp = 0 (the
    # guidance is skipped even with theta > 0) both give qam.ode_sample's bits.
    base, critic, obs, noise = networks

    @jax.jit
    def run(base, critic, obs, noise):
        plain = ode_actions(base, obs, noise, num_steps=K)
        zero_theta = guided_ode_actions(base, critic, obs, noise, num_steps=K, guidance_coef=0.0,
                                        inv_temp=10.0, critic_time="flow")  # fmt: skip
        zero_lam = guided_ode_actions(base, critic, obs, noise, num_steps=K, guidance_coef=1.0,
                                      inv_temp=0.0)  # fmt: skip
        return plain, zero_theta, zero_lam

    plain, zero_theta, zero_lam = run(base, critic, obs, noise)
    np.testing.assert_array_equal(zero_theta, plain)
    np.testing.assert_array_equal(zero_lam, plain)
    assert np.any(np.abs(np.asarray(plain)) < 1.0)  # not all clipped: the bits carry content


def test_guidance_moves_samples_along_a_linear_critic_gradient_by_the_predicted_amount(x64):
    # Q_e = w_e . concat(s, a, t): grad_a mean_e Q_e = c = mean_e w_e[a] at any t. With the
    # Gaussian base, the difference Delta_i between the runs with this critic and a zero critic
    # (same theta, so the same x/t part) obeys, coordinate by coordinate, whatever the noise,
    #   Delta_1 = 0,
    #   Delta_{i+1} = (1 + h m(t_i) + theta / i) Delta_i + h theta lam (1 - t_i) c / t_i,
    # for i = 1 .. K-1.
    s2, theta, lam, num_steps = np.array([1.0, 0.25]), 0.2, 3.0, 10
    w = np.array([[5.0, 1.0, -0.5, 7.0], [-3.0, 0.2, -1.5, -2.0]])  # (obs 1, a 2, t 1)
    c = w[:, 1:3].mean(0)
    h = 1.0 / num_steps
    delta = np.zeros(2)
    for i in range(1, num_steps):
        t = i * h
        delta = (1 + h * gaussian_m(t, s2) + theta / i) * delta + h * theta * lam * (1 - t) * c / t
    base = gaussian_velocity(jnp.zeros(2), jnp.asarray(s2))
    obs = jnp.full((16, 1), 0.7)
    noise = jax.random.normal(jax.random.PRNGKey(1), (16, 2))

    @jax.jit
    def shifts(weights):
        def run(weights, critic_time):
            return guided_ode_actions(
                base, _linear_critic(weights), obs, noise, num_steps=num_steps,
                guidance_coef=theta, inv_temp=lam, critic_time=critic_time, clip=False,
            )  # fmt: skip

        # A linear critic's gradient does not depend on t: both critic times move alike.
        return [run(weights, ct) - run(jnp.zeros_like(weights), ct) for ct in ("one", "flow")]

    for shift in shifts(jnp.asarray(w)):
        np.testing.assert_allclose(shift, np.broadcast_to(delta, shift.shape), rtol=1e-10)
    assert np.all(delta * c > 0) and np.all(np.abs(delta) > 0.1)  # along +c, and not small


def test_guided_sampler_matches_the_unrolled_loop_in_each_critic_time(networks, x64):
    # Nonlinear base and critic: the sampler is the loop above exactly, the gradient of the
    # ensemble MEAN at critic time 1 ("one") or t_i ("flow"); the two differ.
    base, critic, obs, noise = networks
    theta, lam, num_steps = 0.3, 4.0, 4

    @jax.jit
    def run(base, critic, obs, noise):
        out = {}
        for critic_time in ("one", "flow"):
            out[critic_time] = guided_ode_actions(
                base, critic, obs, noise, num_steps=num_steps, guidance_coef=theta,
                inv_temp=lam, critic_time=critic_time,
            )  # fmt: skip
            out[critic_time + "_hand"] = jax.vmap(
                lambda o, z, ct=critic_time: _guided_by_hand(
                    base, critic, o, z, num_steps, theta, lam, ct == "flow"
                )
            )(obs, noise)
        return out

    out = run(base, critic, obs, noise)
    for critic_time in ("one", "flow"):
        np.testing.assert_allclose(out[critic_time], out[critic_time + "_hand"], rtol=F64_RTOL,
                                   atol=F64_ATOL)  # fmt: skip
    assert np.max(np.abs(np.asarray(out["one"] - out["flow"]))) > 1e-4
    assert np.all(np.abs(np.asarray(out["one"])) <= 1.0)


# ---------------------------------------------------------------------------------------------
# Linex.


def test_linex_minimiser_is_the_target_and_over_two_points_the_log_partition(x64):
    # Each loss is convex in q (exponential branch; the linear one is not reached here), so a
    # zero derivative with the right signs either side marks the minimiser.
    lam, clip, p, q1, q2 = 2.0, 5.0, 0.3, 0.0, 1.0
    loss = lambda q, target: linex_loss(q, target, inv_temp=lam, clip=clip)
    targets = jnp.asarray([-1.3, 0.0, 0.4, 2.0])
    # Targets q1 w.p. p, q2 w.p. 1 - p: the minimiser is (1/lam) log E exp(lam q~), above the
    # squared loss's minimiser, the mean 0.72 (Jensen).
    partition = float(np.log(p * np.exp(lam * q1) + (1 - p) * np.exp(lam * q2)) / lam)
    mixture = lambda q: p * loss(q, jnp.asarray(q1)) + (1 - p) * loss(q, jnp.asarray(q2))

    @jax.jit
    def derivatives(offset):
        single = jax.vmap(jax.grad(loss))(targets + offset, targets)
        return single, jax.grad(mixture)(jnp.asarray(partition) + offset)

    at, at_mixture = derivatives(0.0)
    np.testing.assert_allclose(at, 0.0, atol=1e-15)
    np.testing.assert_allclose(at_mixture, 0.0, atol=1e-14)
    for offset, sign in ((-1e-3, -1.0), (1e-3, 1.0)):
        single, mixed = derivatives(offset)
        assert np.all(np.sign(single) == sign) and np.sign(mixed) == sign
    # The squared loss's minimiser, the mean, is a strict Jensen lower bound here.
    assert partition > p * q1 + (1 - p) * q2 + 0.05 and lam * (q2 - partition) < clip
    # Far from the minimiser on the exponential side the derivative is -lam (e^delta - 1).
    np.testing.assert_allclose(derivatives(-0.5)[0], -lam * (np.exp(lam * 0.5) - 1), rtol=1e-12)


def test_linex_linear_branch_has_slope_minus_lambda_and_is_not_slope_matched(x64):
    lam, clip = 1.5, 5.0
    g = jax.jit(jax.vmap(jax.grad(lambda q, t: linex_loss(q, t, inv_temp=lam, clip=clip))))
    target = jnp.asarray([10.0, 100.0, 1e4, 3.0])
    pred = jnp.asarray([0.0, 0.0, 0.0, 0.0])  # delta = 15, 150, 1.5e4 (linear), 4.5 (exp)
    values = jax.jit(lambda q, t: linex_loss(q, t, inv_temp=lam, clip=clip))(pred, target)
    np.testing.assert_allclose(values[:3], lam * target[:3], rtol=1e-15)  # loss = delta
    np.testing.assert_allclose(values[3], np.exp(4.5), rtol=1e-15)
    grads = np.asarray(g(pred, target))
    np.testing.assert_array_equal(grads[:3], -lam)
    np.testing.assert_allclose(grads[3], -lam * (np.exp(4.5) - 1), rtol=1e-12)
    # Either side of the switch: -lam (e^5 - 1) ~ -147 lam against -lam.
    eps = 1e-9
    below, above = g(jnp.asarray([-(clip - eps) / lam, -(clip + eps) / lam]), jnp.zeros(2))
    np.testing.assert_allclose(below, -lam * (np.exp(clip) - 1), rtol=1e-6)
    assert float(above) == -lam


# ---------------------------------------------------------------------------------------------
# The agents: every loss term by hand, gradient routing, valid weighting, acting.


def _batch(seed, *, valid=True):
    """A random float64 chunk batch; example 0 ends before its last step (or every example, with
    `valid=False`)."""
    rng = np.random.default_rng(seed)
    w = np.ones((B, H))
    w[0 if valid else slice(None), -1] = 0.0
    return SequenceBatch(
        observations=jnp.asarray(rng.standard_normal((B, OBS))),
        actions=jnp.asarray(rng.uniform(-1, 1, (B, H, A))),
        rewards=jnp.asarray(-rng.uniform(0, 1, (B, H))),
        masks=jnp.ones((B, H)),
        valid=jnp.asarray(w),
        next_observations=jnp.asarray(rng.standard_normal((B, H, OBS))),
    )


def _by_hand(name, state, batch, key):
    """Every loss term of agent `name` from the networks directly, keys as documented:
    split(key, 3) = (TD sampler, noisy-critic draws, flow)."""
    config, params, targets = CONFIGS[name], state.params, state.targets
    obs, actions, w = batch.observations, batch.actions.reshape(B, D), batch.valid[:, -1]
    td_key, noisy_key, flow_key = jax.random.split(key, 3)
    flow_time = name != "cgql"
    q_at = lambda critic, o, a, t: critic(o, jnp.concatenate([a, jnp.asarray([t])]))
    out = {}

    # TD: a' from the guided loop on the EMA flow (cgql-mse: the online flow, best of two by
    # the online critic's mean at t = 1) with the ONLINE critic; target critic at t = 1.
    next_obs = batch.next_observations[:, -1]
    base = targets["actor"] if config.target_guidance else params.actor

    def candidate(o, k):
        z = jax.random.normal(k, (D,))
        return _guided_by_hand(base, params.critic, o, z, K, config.guidance_coef,
                               config.inv_temp, flow_time)  # fmt: skip

    def next_action(o, k):
        if config.best_of_n == 1:
            return candidate(o, k)
        keys = jax.random.split(k, config.best_of_n)
        candidates = [candidate(o, k_) for k_ in keys]
        scores = jnp.stack([jnp.mean(q_at(params.critic, o, c, 1.0)) for c in candidates])
        return jnp.stack(candidates)[jnp.argmax(scores)]

    next_actions = jax.vmap(next_action)(next_obs, jax.random.split(td_key, B))
    next_q = jax.vmap(lambda o, a: q_at(targets["critic"], o, a, 1.0))(next_obs, next_actions)
    y = batch.rewards[:, -1] + config.discount**H * batch.masks[:, -1] * (
        jnp.mean(next_q, 1) - config.rho * jnp.std(next_q, 1)
    )
    q = jax.vmap(lambda o, a: q_at(params.critic, o, a, 1.0))(obs, actions)
    out["critic_loss"] = jnp.sum(w[:, None] * (q - y[:, None]) ** 2) / (B * config.num_qs)
    out["next_actions"] = next_actions

    # Noisy critic: x_u = (1 - u) eps + u a, Q_e(s, x_u, u) against Q'_e(s, a, 1), per member.
    u_key, eps_key = jax.random.split(noisy_key)
    u, eps = jax.random.uniform(u_key, (B,)), jax.random.normal(eps_key, (B, D))
    noisy = (1 - u[:, None]) * eps + u[:, None] * actions
    pred = jax.vmap(lambda o, x, t: q_at(params.critic, o, x, t))(obs, noisy, u)
    tilde = jax.vmap(lambda o, a: q_at(targets["critic"], o, a, 1.0))(obs, actions)
    delta = config.inv_temp * (tilde - pred)
    out["linex_branch"] = delta > config.isd_clip
    per = {
        "cgql-mse": (pred - tilde) ** 2,
        "cgql-linex": jnp.where(
            delta > config.isd_clip, delta, jnp.exp(delta) + config.inv_temp * pred
        ),  # fmt: skip
    }.get(name, jnp.zeros_like(pred))
    out["noisy_critic_loss"] = jnp.sum(w[:, None] * per) / (B * config.num_qs)

    # Flow matching of the online BC flow, valid-weighted.
    def flow_loss(o, a, k):
        t_key, x_key = jax.random.split(k)
        t, x0 = jax.random.uniform(t_key, (), a.dtype), jax.random.normal(x_key, a.shape, a.dtype)
        return jnp.mean((params.actor(t, (1 - t) * x0 + t * a, o) - (a - x0)) ** 2)

    losses = jax.vmap(flow_loss)(obs, actions, jax.random.split(flow_key, B))
    out["flow_loss"] = jnp.mean(w * losses)
    noisy_weight = 0.0 if name == "cgql" else config.noisy_coef
    out["total_loss"] = (
        out["critic_loss"] + noisy_weight * out["noisy_critic_loss"] + out["flow_loss"]
    )

    # bc_act: the ONLINE flow's plain ODE. (`act` is the TD sampler, checked above.)
    act_obs = 3.0 * jax.random.normal(jax.random.PRNGKey(5), (4, OBS))
    act_keys = jax.random.split(jax.random.PRNGKey(6), 4)
    bc_act = AGENTS[name].bc_act
    assert bc_act is not None
    out["bc_acted"] = jax.vmap(lambda o, k: bc_act(state, o, key=k))(act_obs, act_keys)
    z = jax.vmap(lambda k: jax.random.normal(k, (D,)))(act_keys)
    out["bc_act"] = jax.vmap(lambda o, z_: qam.ode_sample(params.actor, o, noise=z_,
                                                          num_steps=K))(act_obs, z)  # fmt: skip
    return out


ROUTES = {"critic_loss": {"critic"}, "noisy_critic_loss": {"critic"}, "flow_loss": {"actor"}}


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    """Per agent, in float64 and one compiled program: a state whose targets differ from the
    online networks, the loss's metrics, the reverse-mode Jacobian of the routed ones, the
    total loss's gradient on a batch whose chunks all cross an episode end, and the same
    quantities by hand; all returned as NumPy arrays."""
    name = request.param
    agent = AGENTS[name]
    with jax.enable_x64(True):
        init = eqx.filter_jit(lambda k: agent.init(k, jnp.zeros(OBS), jnp.zeros(A), CONFIGS[name]))
        state, other = init(jax.random.PRNGKey(0)), init(jax.random.PRNGKey(1))
        for n in state.targets:
            state = eqx.tree_at(lambda s, n=n: s.targets[n], state, getattr(other.params, n))
        batch, invalid, key = _batch(2), _batch(2, valid=False), jax.random.PRNGKey(3)
        dynamic, static = eqx.partition(state.params, eqx.is_inexact_array)
        # Routing for cgql and cgql-linex (cgql-mse's terms are linex's with another loss).
        routed = {"cgql": ["critic_loss", "flow_loss"], "cgql-mse": [],
                  "cgql-linex": list(ROUTES)}[name]  # fmt: skip

        def metrics_fn(d):
            metrics = cgql._loss(eqx.combine(d, static), state, batch, key)[1]
            return {m: metrics[m] for m in routed}, metrics

        @jax.jit
        def run(d):
            if routed:
                jacobian, metrics = jax.jacrev(metrics_fn, has_aux=True)(d)
            else:
                jacobian, metrics = {}, metrics_fn(d)[1]
            invalid_grad, invalid_metrics = None, None
            if name == "cgql-linex":  # every weighted term of every mode
                invalid_grad, invalid_metrics = jax.grad(
                    lambda d_: cgql._loss(eqx.combine(d_, static), state, invalid, key),
                    has_aux=True,
                )(d)
            return (metrics, jacobian, invalid_grad, invalid_metrics,
                    _by_hand(name, state, batch, key))  # fmt: skip

        metrics, jacobian, invalid_grad, invalid_metrics, expected = jax.tree.map(
            np.asarray, run(dynamic)
        )
    return dict(name=name, metrics=metrics, jacobian=jacobian, invalid_grad=invalid_grad,
                invalid_metrics=invalid_metrics, expected=expected)  # fmt: skip


def test_loss_terms_hand_computed(case):
    name, metrics, expected = case["name"], case["metrics"], case["expected"]
    keys = ["critic_loss", "flow_loss", "total_loss"]
    keys += [] if name == "cgql" else ["noisy_critic_loss"]
    for key in keys:
        np.testing.assert_allclose(metrics[key], expected[key], rtol=F64_RTOL, err_msg=key)
    if name == "cgql":
        assert "noisy_critic_loss" not in metrics  # "simple" trains the critic at t = 1 only
    if name == "cgql-linex":  # both branches of the loss occur in this batch
        branch = expected["linex_branch"]
        assert branch.any() and not branch.all()
    # The guided next chunks (final clip) stay in the box.
    assert np.all(np.abs(expected["next_actions"]) <= 1.0)


@pytest.mark.parametrize("case", ["cgql", "cgql-linex"], indirect=True)
def test_each_loss_term_moves_only_its_networks(case):
    for metric, grads in case["jacobian"].items():
        moved = {
            field for field in type(grads).__dataclass_fields__
            if any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(getattr(grads, field)))
        }  # fmt: skip
        assert moved == ROUTES[metric], (case["name"], metric, moved)


@pytest.mark.parametrize("case", ["cgql-linex"], indirect=True)
def test_all_invalid_batch_gives_zero_loss_and_zero_gradient(case):
    # Every term (TD, noisy regression, flow matching) is valid-weighted: w = 0 everywhere
    # leaves nothing, where the valid batch's gradient is non-zero (the routing test). Linex
    # has every term the other modes have.
    metrics = case["invalid_metrics"]
    for key in ("critic_loss", "flow_loss", "total_loss", "noisy_critic_loss"):
        if key in metrics:
            assert float(metrics[key]) == 0.0, key
    assert all(np.all(np.asarray(g) == 0.0) for g in jax.tree.leaves(case["invalid_grad"]))
    assert float(metrics["q_mean"]) != 0.0  # the critic was evaluated, only weighted out


def test_bc_act_is_the_online_flows_plain_ode(case):
    expected = case["expected"]
    np.testing.assert_allclose(expected["bc_acted"], expected["bc_act"], rtol=F64_RTOL,
                               atol=F64_ATOL)  # fmt: skip


def test_time_conditioned_critic_and_argument_errors(networks, getkey, x64):
    _, critic, obs, actions = networks
    t = jnp.linspace(0.0, 1.0, B)

    @jax.jit
    def values(critic, obs, actions, t):
        by_member = jax.vmap(lambda o, a, t_: critic(o, jnp.concatenate([a, t_[None]])))
        one = jax.vmap(lambda o, a, t_: time_conditioned_q(critic, o, a, t_))
        return (
            time_conditioned_q_batched(critic, obs, actions, t),
            one(obs, actions, t),
            (by_member(obs, actions, t)),
        )

    batched, one, expected = values(critic, obs, actions, t)
    np.testing.assert_allclose(batched, expected, rtol=F64_RTOL, atol=F64_ATOL)
    np.testing.assert_allclose(one, expected, rtol=F64_RTOL, atol=F64_ATOL)
    assert batched.shape == (B, 3)
    bad: Any = "t"  # not a loss name nor a critic time
    with pytest.raises((ValueError, TypeCheckError), match="loss"):
        noisy_critic_term(critic, critic, obs, actions, jnp.ones(B), key=getkey(), loss=bad)
    with pytest.raises((ValueError, TypeCheckError), match="noise"):
        guided_ode_sample(lambda t, x, o: x, critic, obs[0], noise=actions, num_steps=K,
                          guidance_coef=0.1, inv_temp=1.0)  # fmt: skip
    with pytest.raises((ValueError, TypeCheckError), match="critic_time"):
        guided_ode_sample(lambda t, x, o: x, critic, obs[0], noise=actions[0], num_steps=K,
                          guidance_coef=0.1, inv_temp=1.0, critic_time=bad)  # fmt: skip
    with pytest.raises(ValueError, match="num_steps"):
        guided_ode_sample(lambda t, x, o: x, critic, obs[0], noise=actions[0], num_steps=0,
                          guidance_coef=0.1, inv_temp=1.0)  # fmt: skip


@pytest.mark.parametrize(
    "field, value",
    [("mode", "huber"), ("guidance_coef", -0.1), ("inv_temp", float("nan")),
     ("noisy_coef", -1.0), ("isd_clip", 0.0), ("flow_steps", 0), ("best_of_n", 0)],
)  # fmt: skip
def test_config_errors(field, value):
    with pytest.raises((ValueError, TypeCheckError), match=field):
        AGENTS["cgql"].config(**{field: value})


def test_configs_and_presets():
    for name, mode in zip(NAMES, ("simple", "mse", "linex")):
        c = AGENTS[name].config()
        assert (c.mode, c.inv_temp, c.guidance_coef, c.noisy_coef, c.isd_clip) == (
            mode,
            1.0,
            0.1,
            0.001,
            5.0,
        )
        assert (c.target_guidance, c.flow_steps, c.best_of_n, c.clip_grad) == (True, 10, 1, False)
        assert set(METHOD_PRESETS[name]) == set(DOMAINS)
        assert all(row["inv_temp"] == 10.0 for row in METHOD_PRESETS[name].values())
    cd = "cube-double-play-singletask-task2-v0"
    c = AGENTS["cgql"].paper_config(cd)
    assert (c.mode, c.inv_temp, c.guidance_coef, c.horizon, c.discount, c.rho) == (
        "simple",
        10.0,
        0.01,
        5,
        0.99,
        0.5,
    )
    c = AGENTS["cgql-mse"].paper_config("puzzle-4x4-play-singletask-task1-v0")
    assert (c.mode, c.guidance_coef, c.noisy_coef) == ("mse", 1.0, 0.001)
    p3 = "puzzle-3x3-play-singletask-task1-v0"
    assert AGENTS["cgql-mse"].paper_config(p3).noisy_coef == 0.1
    c = AGENTS["cgql-linex"].paper_config(p3)
    assert (c.mode, c.guidance_coef, c.noisy_coef) == ("linex", 0.1, 0.001)
    c = AGENTS["cgql"].paper_config("humanoidmaze-large-navigate-singletask-task1-v0")
    assert (c.guidance_coef, c.horizon, c.discount, c.rho) == (0.01, 1, 0.995, 0.0)
    c = AGENTS["cgql-linex"].paper_config("cube-quadruple-play-singletask-task1-v0")
    assert (c.guidance_coef, c.noisy_coef) == (0.01, 0.1)
