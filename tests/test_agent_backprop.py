"""FBRAC, FQL and BAM: the backpropagation-through-the-sampler terms against unrolled
computations and the basic adjoint, every loss term by hand, gradient routing, acting, and one
toy per method where its characteristic behaviour shows."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import gaussian_m, gaussian_velocity

import qam
from qam.agents import (
    AGENTS,
    bam,
    fbrac,
    fql,
    ode_bptt_term,
    sde_bptt_term,
)
from qam.data import SequenceBatch


OBS, A, H, B, K = 3, 2, 2, 8, 3
D = A * H
TINY = dict(actor_hidden=(16,), critic_hidden=(16,), num_qs=2, horizon=H, flow_steps=K)
CONFIGS = {
    "fbrac": AGENTS["fbrac"].config(**TINY, alpha=0.5),
    "fql": AGENTS["fql"].config(**TINY, alpha=3.0),
    "bam": AGENTS["bam"].config(**TINY, inv_temp=2.0),
}
MODULES = {"fbrac": fbrac, "fql": fql, "bam": bam}
BC_FLOW = {"fbrac": "actor", "fql": "actor", "bam": "actor_slow"}
# Float64 comparisons of two evaluation orders of the same sums: rounding ~1e-15 relative.
F64_RTOL, F64_ATOL = 1e-10, 1e-12


def _allclose(actual, expected, rtol=F64_RTOL, atol=F64_ATOL):
    actual_leaves = jax.tree.leaves(eqx.filter(actual, eqx.is_inexact_array))
    expected_leaves = jax.tree.leaves(eqx.filter(expected, eqx.is_inexact_array))
    assert len(actual_leaves) == len(expected_leaves) > 0
    for x, y in zip(actual_leaves, expected_leaves):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _euler(velocity, obs, z, num_steps):
    """The clipped K-step Euler ODE, unrolled in Python."""
    y = z
    for i in range(num_steps):
        y = y + (1.0 / num_steps) * velocity(jnp.asarray(i / num_steps, z.dtype), y, obs)
    return jnp.clip(y, -1.0, 1.0)


def _linear_critic(weights):
    """A one-member critic `Q(s, a) = weights . concat(s, a)` (no hidden layer, no bias)."""
    weights = jnp.asarray(weights)
    critic = qam.nn.CriticEnsemble(
        1, weights.shape[0] - 1, (), num_critics=1, layer_norm=False, key=jax.random.PRNGKey(0)
    )
    weight = critic.members.layers[0].weight
    return eqx.tree_at(
        lambda q: (q.members.layers[0].weight, q.members.layers[0].bias),
        critic,
        (weights.astype(weight.dtype)[None, None], jnp.zeros((1, 1), weight.dtype)),
    )


# ---------------------------------------------------------------------------------------------
# The terms.


class _Affine(eqx.Module):
    w: jax.Array
    b: jax.Array
    u: jax.Array
    p: jax.Array

    def __call__(self, t, x, obs):
        return self.w @ x + self.b + t * self.u + self.p @ obs


@pytest.fixture(scope="module")
def small_critic():
    """A float64 three-member critic on 2-dim observations and 3-dim actions."""
    with jax.enable_x64(True):
        make = eqx.filter_jit(lambda k: qam.nn.CriticEnsemble(2, 3, (16,), num_critics=3, key=k))
        return make(jax.random.PRNGKey(10))


def test_ode_bptt_gradient_equals_the_unrolled_euler_chain_with_the_clip(small_critic, x64):
    # An affine field v = W x + b + t u + P s: the K Euler steps are y_{i+1} = M y_i + h (b +
    # t_i u + P s), M = I + h W, so d y_K = sum_i M^{K-1-i} h (dW y_i + db + t_i du + dP s), and
    # the clip multiplies the critic's action gradient by 1[|y_K| < 1]. Column 0 of W is zero
    # off the diagonal and b_0 is large: coordinate 0 is clipped in every sample and feeds no
    # other coordinate, so every gradient entry that reaches the loss only through it is 0.
    obs_dim, dim, batch, num_steps = 2, 3, 8, 5
    h = 1.0 / num_steps
    rng = np.random.default_rng(0)
    W = 0.8 * rng.standard_normal((dim, dim))
    W[1:, 0] = 0.0
    bias, u = np.array([6.0, 0.1, -0.2]), rng.standard_normal(dim)
    P, obs, z = (rng.standard_normal(shape) for shape in ((dim, obs_dim), (batch, obs_dim),
                                                          (batch, dim)))  # fmt: skip
    P = 0.3 * P
    critic = small_critic

    # The chain in NumPy, independent of JAX's differentiation of the scan and the clip.
    M = np.eye(dim) + h * W
    ys = [z]
    for i in range(num_steps):
        ys.append(ys[-1] @ M.T + h * (bias + i * h * u + obs @ P.T))
    y_final = ys[-1]
    actions = np.clip(y_final, -1.0, 1.0)

    @eqx.filter_jit
    def run(field, critic, obs, z, actions):
        term = lambda f: ode_bptt_term(f, critic, obs, noise=z, num_steps=num_steps)[0]
        q_loss = lambda a: -jnp.mean(critic.batched(obs, a))
        return (*eqx.filter_value_and_grad(term)(field), *jax.value_and_grad(q_loss)(actions))

    field = _Affine(*(jnp.asarray(x) for x in (W, bias, u, P)))
    loss, grads, expected_loss, dq = run(
        field, critic, *(jnp.asarray(x) for x in (obs, z, actions))
    )
    np.testing.assert_allclose(loss, expected_loss, rtol=F64_RTOL)
    dq = np.asarray(dq)  # (B, D): the critic's action gradient at the clipped actions

    def chain(g):
        back = [np.linalg.matrix_power(M, num_steps - 1 - i).T @ g.T for i in range(num_steps)]
        return dict(
            b=sum(h * bk.sum(1) for bk in back),
            u=sum(h * i * h * bk.sum(1) for i, bk in enumerate(back)),
            p=sum(h * bk @ obs for bk in back),
            w=sum(h * bk @ ys[i] for i, bk in enumerate(back)),
        )

    inside = np.abs(y_final) < 1.0
    assert not inside[:, 0].any() and inside[:, 1:].any() and not inside[:, 1:].all()
    expected = chain(dq * inside)
    for name, value in expected.items():
        np.testing.assert_allclose(getattr(grads, name), value, rtol=1e-9, atol=1e-12)
    # The clipped coordinate's gradients are exactly zero; the others are not.
    for value in (grads.b[0], grads.u[0], grads.p[0], grads.w[0]):
        assert np.all(np.asarray(value) == 0.0)
    assert np.all(np.abs(np.asarray(grads.b[1:])) > 1e-6)
    # Without the clip's mask the chain gives a different gradient: the comparison has teeth.
    assert not np.allclose(chain(dq)["b"], expected["b"], rtol=1e-3)


def _bam_reference_loss(fine, base, critic, obs, noise, num_steps, inv_temp, rho, residual):
    """BAM's loss as the reference computes it: one Python loop per example that evaluates each
    network once per step and accumulates the running cost as it goes."""
    h = 1.0 / num_steps

    def one(o, n):
        x, cost = n[0], 0.0
        for i in range(num_steps - 1):
            t = jnp.asarray(i / num_steps, n.dtype)
            sigma2 = 2.0 * (1.0 - t + h) / (t + h)
            v, vb = fine(t, x, o), base(t, x, o)
            cost = cost + 2.0 * jnp.sum((v if residual else v - vb) ** 2) / sigma2
            x = x + h * (2.0 * (v + vb if residual else v) - x / (t + h))
            x = x + jnp.sqrt(h * sigma2) * n[i + 1]
        x = x + h * base(jnp.asarray((num_steps - 1) / num_steps, n.dtype), x, o)
        q = critic(o, x)
        return -inv_temp * (jnp.mean(q) - rho * jnp.std(q)) + cost

    return jnp.mean(jax.vmap(one)(obs, noise))


def test_sde_bptt_gradient_equals_the_basic_adjoint(small_critic, getkey, x64):
    # Reverse mode through the rollout is the basic discrete adjoint (docs/mathematics.md §2):
    # dL/dtheta = mean_b sum_{i<K-1} [2h (dv/dtheta)^T A_{i+1} + dC_i/dtheta], with A from
    # qam.basic_adjoint (terminal adjoint -lambda d[mean - rho std]Q/da, BAM's running cost),
    # and dL/dX_0 = A_0 / B, dL/dxi_i = sqrt(h) sigma_i A_{i+1} / B. A_i holds the base's input
    # Jacobians (last step, running cost): if the term cut them, these would differ.
    obs_dim, dim, batch, num_steps, inv_temp, rho, residual = 2, 3, 3, 5, 2.0, 0.5, False
    h = 1.0 / num_steps
    critic = small_critic
    fine, base = eqx.filter_jit(lambda k1, k2: (
        qam.nn.VelocityNetwork(obs_dim, dim, (16, 16), key=k1),
        qam.nn.VelocityNetwork(obs_dim, dim, (16, 16), key=k2),
    ))(getkey(), getkey())  # fmt: skip
    rng = np.random.default_rng(1)
    obs = jnp.asarray(rng.standard_normal((batch, obs_dim)))
    noise = jnp.asarray(rng.standard_normal((batch, num_steps, dim)))

    @eqx.filter_jit
    def run(fine, base, critic, obs, noise):
        term = lambda args: sde_bptt_term(
            args[0], args[1], critic, obs, noise=args[2], num_steps=num_steps,
            inv_temp=inv_temp, rho=rho, residual=residual,
        )[0]  # fmt: skip
        loss, grads = eqx.filter_value_and_grad(term)((fine, base, noise))
        reference = _bam_reference_loss(fine, base, critic, obs, noise, num_steps, inv_temp,
                                        rho, residual)  # fmt: skip

        def adjoints(o, n):
            traj = qam.memoryless_sde_sample(fine, base, o, noise=n, num_steps=num_steps,
                                             residual=residual)  # fmt: skip
            reward = lambda a: jnp.mean(critic(o, a)) - rho * jnp.std(critic(o, a))
            terminal = -inv_temp * jax.grad(reward)(traj.action)
            return traj, qam.basic_adjoint(fine, base, o, traj, terminal, residual=residual)

        trajs, adj = jax.vmap(adjoints)(obs, noise)
        ts = trajs.ts[0, : num_steps - 1]

        def surrogate(f):
            def one(o, xs, a_next):
                def step(t, x, a):
                    v, vb = f(t, x, o), base(t, x, o)
                    cost = 2 * jnp.sum((v if residual else v - vb) ** 2)
                    return 2 * h * jnp.dot(v, a) + cost / qam.memoryless_sigma(t, h) ** 2

                return jnp.sum(jax.vmap(step)(ts, xs, a_next))

            return jnp.mean(jax.vmap(one)(obs, trajs.xs[:, : num_steps - 1], adj[:, 1:]))

        noise_scale = jnp.concatenate([jnp.ones(1), jnp.sqrt(h) * qam.memoryless_sigma(ts, h)])
        expected_noise_grad = adj * noise_scale[None, :, None] / batch
        # Residual mode (drift v + v_B, running cost 2 ||v||^2 / sigma^2): value only.
        residual_pair = [
            sde_bptt_term(fine, base, critic, obs, noise=noise, num_steps=num_steps,
                          inv_temp=inv_temp, rho=rho, residual=True)[0],
            _bam_reference_loss(fine, base, critic, obs, noise, num_steps, inv_temp, rho, True),
        ]  # fmt: skip
        return (loss, grads, reference, eqx.filter_grad(surrogate)(fine), expected_noise_grad,
                residual_pair)  # fmt: skip

    loss, (g_fine, g_base, g_noise), reference, expected_fine, expected_noise, residual_pair = run(
        fine, base, critic, obs, noise
    )
    np.testing.assert_allclose(loss, reference, rtol=F64_RTOL)
    np.testing.assert_allclose(*residual_pair, rtol=F64_RTOL)
    assert abs(float(residual_pair[0]) - float(loss)) > 1e-3  # the modes differ
    _allclose(g_fine, expected_fine)
    np.testing.assert_allclose(g_noise, expected_noise, rtol=F64_RTOL, atol=F64_ATOL)
    # The base's parameters get nothing; its inputs pass gradients (inside A above).
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_base))
    assert any(float(jnp.max(jnp.abs(g))) > 1e-3 for g in jax.tree.leaves(g_fine))


def test_term_argument_errors(small_critic, getkey):
    velocity, critic, obs = (lambda t, x, obs: x), small_critic, jnp.zeros((B, 2))
    with pytest.raises(ValueError, match="action_dim"):
        ode_bptt_term(velocity, critic, obs, key=getkey(), num_steps=K)
    with pytest.raises(ValueError, match="exactly one"):
        ode_bptt_term(velocity, critic, obs, key=getkey(), noise=jnp.zeros((B, 3)), num_steps=K)
    term = functools.partial(sde_bptt_term, velocity, velocity, critic, obs, num_steps=K,
                             inv_temp=1.0, rho=0.5)  # fmt: skip
    with pytest.raises(ValueError, match="action_dim"):
        term(key=getkey())
    with pytest.raises(ValueError, match=r"\(B, num_steps, D\)"):
        term(noise=jnp.zeros((B, K + 1, 3)))


# ---------------------------------------------------------------------------------------------
# The agents: every loss term by hand, gradient routing, acting.


def _batch(seed):
    """A random chunk batch (NumPy's generator, float64) whose example 0 ends before its last
    step, so the `valid` weighting is exercised."""
    rng = np.random.default_rng(seed)
    valid = np.ones((B, H))
    valid[0, -1] = 0.0
    return SequenceBatch(
        observations=jnp.asarray(rng.standard_normal((B, OBS))),
        actions=jnp.asarray(rng.uniform(-1, 1, (B, H, A))),
        rewards=jnp.asarray(-rng.uniform(0, 1, (B, H))),
        masks=jnp.ones((B, H)),
        valid=jnp.asarray(valid),
        next_observations=jnp.asarray(rng.standard_normal((B, H, OBS))),
    )


class _ZeroVelocity(eqx.Module):
    def __call__(self, t, x, obs):
        return jnp.zeros_like(x)


class _NoiseOf(eqx.Module):
    """A 'one-step policy' that returns the clipped noise part of `concat(s, z)`."""

    obs_dim: int = eqx.field(static=True)

    def __call__(self, x):
        return jnp.clip(x[self.obs_dim :], -1.0, 1.0)


def _by_hand(name, state, batch, key):
    """Every loss term of agent `name`, and its `act`, computed from the networks directly:
    Python-unrolled Euler loops, the reference-style BAM loop, the TD target and flow matching
    written out. Keys as the agent documents them: split(key, 3) = (TD sampler, flow, policy
    noise)."""
    config, params = CONFIGS[name], state.params
    obs, actions, w = batch.observations, batch.actions.reshape(B, D), batch.valid[:, -1]
    td_key, flow_key, noise_key = jax.random.split(key, 3)
    out = {}

    # TD: y = R + gamma^H m (mean - rho std) of the TARGET critic at the method's own next chunk.
    next_obs = batch.next_observations[:, -1]
    next_actions = jax.vmap(lambda o, k: AGENTS[name].act(state, o, key=k))(
        next_obs, jax.random.split(td_key, B)
    )
    next_q = jax.vmap(state.targets["critic"])(next_obs, next_actions)
    y = batch.rewards[:, -1] + config.discount**H * batch.masks[:, -1] * (
        jnp.mean(next_q, 1) - config.rho * jnp.std(next_q, 1)
    )
    q = jax.vmap(params.critic)(obs, actions)
    out["critic_loss"] = jnp.mean(w * jnp.mean((q - y[:, None]) ** 2, 1))

    # Flow matching of the BC flow, valid-weighted (example 0 is invalid).
    flow = getattr(params, BC_FLOW[name])

    def flow_loss(o, a, k):
        t_key, x_key = jax.random.split(k)
        t, x0 = jax.random.uniform(t_key, (), a.dtype), jax.random.normal(x_key, a.shape, a.dtype)
        return jnp.mean((flow(t, (1 - t) * x0 + t * a, o) - (a - x0)) ** 2)

    losses = jax.vmap(flow_loss)(obs, actions, jax.random.split(flow_key, B))
    out["flow_loss"], out["invalid_flow_loss"] = jnp.mean(w * losses), losses[0]

    if name == "fbrac":  # ONLINE critic (stored), ensemble mean, through K unrolled steps
        z = jax.random.normal(noise_key, (B, D))

        def bptt_q(actor):
            a = jax.vmap(lambda o, z_: _euler(actor, o, z_, K))(obs, z)
            return jnp.mean(jax.vmap(params.critic)(obs, a))

        out["bptt_q"], out["bptt_q_grad"] = eqx.filter_value_and_grad(bptt_q)(params.actor)
    elif name == "fql":  # teacher: the ONLINE BC flow on the same z; student clipped for Q only
        z = jax.random.normal(noise_key, (B, D))
        teacher = jax.vmap(lambda o, z_: _euler(params.actor, o, z_, K))(obs, z)
        student = jax.vmap(lambda o, z_: params.one_step(jnp.concatenate([o, z_])))(obs, z)
        out["distill_loss"] = jnp.mean((student - teacher) ** 2)
        out["one_step_q"] = jnp.mean(jax.vmap(params.critic)(obs, jnp.clip(student, -1, 1)))
        # Zero BC velocity: the teacher is clip(z_teacher); a student returning clip(z_student)
        # has distillation loss 0 only if the two are the same draw.
        probe = eqx.tree_at(lambda s: (s.params.actor, s.params.one_step), state,
                            (_ZeroVelocity(), _NoiseOf(OBS)))  # fmt: skip
        out["probe_distill_loss"] = fql._loss(probe.params, probe, batch, key)[1]["distill_loss"]
    else:  # BAM: the reference loop on the EMA base and the ONLINE critic
        noise = jax.vmap(lambda k: jax.random.normal(k, (K, D)))(jax.random.split(noise_key, B))
        reference = lambda fine: _bam_reference_loss(
            fine, state.targets["actor_slow"], params.critic, obs, noise, K, config.inv_temp,
            config.rho, False,
        )  # fmt: skip
        out["bam_loss"], out["bam_loss_grad"] = eqx.filter_value_and_grad(reference)(
            params.actor_fast
        )

    # Acting: FBRAC the ODE of its flow, BAM of actor_fast, FQL clip(mu(concat(s, z))) with the
    # one-step policy's outputs scaled up so that the clip is active.
    act_obs = 3.0 * jax.random.normal(jax.random.PRNGKey(5), (4, OBS))
    act_keys = jax.random.split(jax.random.PRNGKey(6), 4)
    act_state = state
    if name == "fql":
        act_state = eqx.tree_at(lambda s: s.params.one_step.layers[-1].weight, state,
                                replace_fn=lambda m: 4.0 * m)  # fmt: skip
    out["acted"] = jax.vmap(lambda o, k: AGENTS[name].act(act_state, o, key=k))(act_obs, act_keys)
    z = jax.vmap(lambda k: jax.random.normal(k, (D,)))(act_keys)
    ode = lambda v: jax.vmap(lambda o, z_: _euler(v, o, z_, K))(act_obs, z)
    if name == "fql":
        one_step = act_state.params.one_step
        out["raw_act"] = jax.vmap(lambda o, z_: one_step(jnp.concatenate([o, z_])))(act_obs, z)
        out["act"] = jnp.clip(out["raw_act"], -1.0, 1.0)
        out["flow_act"] = ode(params.actor)
        bc_act = AGENTS[name].bc_act
        assert bc_act is not None
        out["bc_acted"] = jax.vmap(lambda o, k: bc_act(state, o, key=k))(act_obs, act_keys)
    else:
        out["act"] = ode(params.actor if name == "fbrac" else params.actor_fast)
    return out


@pytest.fixture(scope="module", params=sorted(MODULES))
def case(request):
    """Per agent, in float64 and one compiled program: a state whose targets differ from the
    online networks (so a test can tell which one a term used), the loss's metrics, the
    reverse-mode Jacobian of the routed ones over the parameters, and the same quantities by
    hand; all returned as NumPy arrays."""
    name = request.param
    agent, module = AGENTS[name], MODULES[name]
    with jax.enable_x64(True):
        init = eqx.filter_jit(lambda k: agent.init(k, jnp.zeros(OBS), jnp.zeros(A), CONFIGS[name]))
        state, other = init(jax.random.PRNGKey(0)), init(jax.random.PRNGKey(1))
        for n in state.targets:
            state = eqx.tree_at(lambda s, n=n: s.targets[n], state, getattr(other.params, n))
        batch, key = _batch(2), jax.random.PRNGKey(3)
        dynamic, static = eqx.partition(state.params, eqx.is_inexact_array)

        def metrics_fn(d):
            metrics = module._loss(eqx.combine(d, static), state, batch, key)[1]
            return {m: metrics[m] for m in ROUTES[name]}, metrics

        @jax.jit
        def run(d):
            jacobian, metrics = jax.jacrev(metrics_fn, has_aux=True)(d)
            return metrics, jacobian, _by_hand(name, state, batch, key)

        metrics, jacobian, expected = jax.tree.map(np.asarray, run(dynamic))
    return dict(name=name, metrics=metrics, jacobian=jacobian, expected=expected)


ROUTES = {
    "fbrac": {"critic_loss": {"critic"}, "flow_loss": {"actor"}, "bptt_q": {"actor"}},
    "fql": {"critic_loss": {"critic"}, "flow_loss": {"actor"}, "distill_loss": {"one_step"},
            "one_step_q": {"one_step"}},
    "bam": {"critic_loss": {"critic"}, "flow_loss": {"actor_slow"}, "bam_q": {"actor_fast"},
            "bam_running_cost": {"actor_fast"}},
}  # fmt: skip


def test_each_loss_term_moves_only_its_networks(case):
    for metric, expected in ROUTES[case["name"]].items():
        grads = case["jacobian"][metric]
        moved = {
            field for field in type(grads).__dataclass_fields__
            if any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(getattr(grads, field)))
        }  # fmt: skip
        assert moved == expected, (metric, moved)


def test_critic_and_flow_losses_hand_computed(case):
    metrics, expected = case["metrics"], case["expected"]
    for name in ("critic_loss", "flow_loss"):
        np.testing.assert_allclose(metrics[name], expected[name], rtol=F64_RTOL)
    assert float(expected["invalid_flow_loss"]) > 0  # left out by its valid weight, not zero


def test_method_terms_hand_computed(case):
    name, metrics, expected, jacobian = (
        case["name"],
        case["metrics"],
        case["expected"],
        case["jacobian"],
    )
    config = CONFIGS[name]
    if name == "fbrac":  # through K unrolled Euler steps and the clip, value and gradient
        np.testing.assert_allclose(metrics["bptt_q"], expected["bptt_q"], rtol=F64_RTOL)
        _allclose(jacobian["bptt_q"].actor, expected["bptt_q_grad"])
        actor_loss = metrics["flow_loss"] - expected["bptt_q"] / config.alpha
    elif name == "fql":
        for metric in ("distill_loss", "one_step_q"):
            np.testing.assert_allclose(metrics[metric], expected[metric], rtol=F64_RTOL)
        actor_loss = (metrics["flow_loss"] + config.alpha * expected["distill_loss"]
                      - expected["one_step_q"])  # fmt: skip
    else:  # the reference-style loop, EMA base, ONLINE critic, value and gradient
        np.testing.assert_allclose(metrics["bam_loss"], expected["bam_loss"], rtol=F64_RTOL)
        bam_loss_grad = jax.tree.map(  # d bam_loss = -inv_temp d bam_q + d bam_running_cost
            lambda q, c: -config.inv_temp * q + c,
            jacobian["bam_q"].actor_fast, jacobian["bam_running_cost"].actor_fast,
        )  # fmt: skip
        _allclose(bam_loss_grad, expected["bam_loss_grad"])
        np.testing.assert_allclose(
            metrics["bam_loss"],
            -config.inv_temp * metrics["bam_q"] + metrics["bam_running_cost"],
            rtol=F64_RTOL,
        )
        actor_loss = metrics["flow_loss"] + expected["bam_loss"]
    if "actor_loss" in metrics:
        np.testing.assert_allclose(metrics["actor_loss"], actor_loss, rtol=F64_RTOL)
    np.testing.assert_allclose(
        metrics["total_loss"], metrics["critic_loss"] + actor_loss, rtol=F64_RTOL
    )


def test_act_by_hand(case):
    expected = case["expected"]
    np.testing.assert_allclose(expected["acted"], expected["act"], rtol=F64_RTOL, atol=F64_ATOL)
    if case["name"] == "fql":  # acts with clip(mu(s, z)), the clip active; the flow only teaches
        raw = np.abs(np.asarray(expected["raw_act"]))
        assert (raw > 1.0).any() and (raw < 1.0).any()
        assert not np.allclose(expected["acted"], expected["flow_act"])
        np.testing.assert_allclose(expected["bc_acted"], expected["flow_act"], rtol=F64_RTOL)


@pytest.mark.parametrize("case", ["fql"], indirect=True)
def test_fql_teacher_and_student_share_the_noise(case):
    # The probe (zero BC velocity, student clip(z)) has distillation loss exactly 0 with one
    # shared draw; with two independent draws it is mean (clip z - clip z')^2, about 1.
    assert float(case["expected"]["probe_distill_loss"]) == 0.0
    z1, z2 = np.random.default_rng(0).standard_normal((2, B, D))
    assert np.mean((np.clip(z1, -1, 1) - np.clip(z2, -1, 1)) ** 2) > 0.5


def test_configs_and_presets():
    with pytest.raises(ValueError, match="alpha"):
        AGENTS["fbrac"].config(alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        AGENTS["fql"].config(alpha=float("nan"))
    with pytest.raises(ValueError, match="flow_steps"):
        AGENTS["bam"].config(flow_steps=1)
    with pytest.raises(ValueError, match="inv_temp"):
        AGENTS["bam"].config(inv_temp=-1.0)
    name = "cube-double-play-singletask-task2-v0"
    c = AGENTS["fbrac"].paper_config(name)
    assert (c.alpha, c.horizon, c.discount, c.rho, c.clip_grad) == (0.1, 5, 0.99, 0.5, False)
    c = AGENTS["fql"].paper_config(name)
    assert (c.alpha, c.clip_grad) == (300.0, False)
    c = AGENTS["bam"].paper_config(name)
    assert (c.inv_temp, c.clip_grad, c.target_actor, c.residual) == (10.0, True, True, False)
    c = AGENTS["bam"].paper_config("humanoidmaze-large-navigate-singletask-task1-v0")
    assert (c.inv_temp, c.horizon, c.discount, c.rho) == (30.0, 1, 0.995, 0.0)
    assert AGENTS["fbrac"].paper_config("puzzle-3x3-play-singletask-task1-v0").alpha == 0.03
    assert AGENTS["fql"].paper_config("puzzle-4x4-play-singletask-task1-v0").alpha == 1.0
    assert AGENTS["fbrac"].bc_act is None  # its only flow is trained by Q too


# ---------------------------------------------------------------------------------------------
# Toys where each method's characteristic behaviour shows.


def _bam_discrete_optimum(s2, inv_temp_c, num_steps):
    """BAM's exact optimum for a N(0, s2) base and linear Q (per dimension, float64): the
    problem is linear-quadratic, so the optimal control is state-independent,
    `delta_i = inv_temp c h G_{i+1} sigma_i^2 / 2` with `G_{i+1} = dX_K / dX_{i+1}` of the base
    SDE chain, and the terminal mean moves by `sum_i 2 h G_{i+1} delta_i`. The `h` in `delta`
    is BAM's missing running-cost `h`: QAM's optimum has no `h` (inv_temp = K lambda)."""
    h = 1.0 / num_steps
    shift = 0.0
    for i in range(num_steps - 1):
        gain = 1.0 + h * gaussian_m((num_steps - 1) * h, s2)
        for j in range(i + 1, num_steps - 1):
            gain = gain * (1.0 + h * (2 * gaussian_m(j * h, s2) - 1.0 / (j * h + h)))
        sigma2 = 2 * (1 - i * h + h) / (i * h + h)
        shift = shift + 2 * h * gain * inv_temp_c * h * gain * sigma2 / 2
    return shift


def _adam_scan(loss, params, *, steps, learning_rate, key, frozen=None):
    """`steps` Adam steps on `loss(params, key)` in one `lax.scan`; `frozen` selects a field of
    `params` whose gradient is zeroed (kept fixed)."""
    dynamic, static = eqx.partition(params, eqx.is_inexact_array)
    optimizer = optax.adam(learning_rate)

    def step(carry, k):
        d, opt_state = carry
        grads = jax.grad(lambda d_: loss(eqx.combine(d_, static), k))(d)
        if frozen is not None:
            grads = eqx.tree_at(frozen, grads, replace_fn=lambda m: jax.tree.map(jnp.zeros_like, m))
        updates, opt_state = optimizer.update(grads, opt_state, d)
        return (optax.apply_updates(d, updates), opt_state), None

    @jax.jit
    def run(d):
        with jax.numpy_dtype_promotion("standard"):
            (d, _), _ = jax.lax.scan(step, (d, optimizer.init(d)), jax.random.split(key, steps))
        return d

    return eqx.combine(run(dynamic), static)


def test_bam_tilts_a_gaussian_base_by_its_discrete_optimum():
    # Base N(0, diag(1, 0.25)) (exact velocity), Q(a) = a_0 - a_1, inv_temp 10 (the paper's
    # scale: QAM's 1 at K = 10). After training a small velocity on the BAM term alone, the
    # SDE rollout's terminal mean moves by BAM's exact discrete optimum, (1.226, -0.316); QAM's
    # lambda = 1 optimum for the ODE is (0.879, -0.262) (docs/mathematics.md §6.2), and an
    # inv_temp read on QAM's scale (no 1 / K) would move it about K = 10 times as far.
    num_steps, inv_temp, batch = 10, 10.0, 64
    s2, c = np.array([1.0, 0.25]), np.array([1.0, -1.0])
    expected = _bam_discrete_optimum(s2, inv_temp * c, num_steps)
    np.testing.assert_allclose(expected, [1.22606, -0.31569], atol=1e-5)
    base = gaussian_velocity(jnp.zeros(2), jnp.asarray(s2, jnp.float32))

    @jax.jit
    def run():  # one program: set-up, 250 Adam steps, and 4096 paired rollouts
        critic = _linear_critic([0.0, *c])
        obs = jnp.zeros((batch, 1))
        loss = lambda v, k: sde_bptt_term(
            v, base, critic, obs, key=k, action_dim=2, num_steps=num_steps, inv_temp=inv_temp,
            rho=0.0,
        )[0]  # fmt: skip
        init = qam.nn.VelocityNetwork(1, 2, (32, 32), key=jax.random.PRNGKey(1))
        trained = _adam_scan(loss, init, steps=250, learning_rate=3e-3, key=jax.random.PRNGKey(2))
        noise = jax.random.normal(jax.random.PRNGKey(3), (4096, num_steps, 2))
        rollout = lambda v: jax.vmap(
            lambda n: qam.memoryless_sde_sample(v, base, jnp.zeros(1), noise=n,
                                                num_steps=num_steps).action
        )(noise)  # fmt: skip
        return jnp.mean(rollout(trained) - rollout(base), axis=0)

    # Paired noise: the shift's Monte Carlo error is small; the tolerance is for the fit.
    np.testing.assert_allclose(run(), expected, rtol=0.07)


TOY = dict(actor_hidden=(32, 32), critic_hidden=(8,), num_qs=1, horizon=1, flow_steps=5,
           learning_rate=3e-3)  # fmt: skip


def _two_mode_toy(name, config, evaluate, *, steps):
    """Train the policy part of `name`'s own loss (the critic held at Q(a) = a_0 + a_1) on two
    equally likely behaviour modes at (-0.5, -0.5) and (0.5, 0.5), then `evaluate(state, keys)`
    with 1000 keys; all in one compiled program."""
    agent, module = AGENTS[name], MODULES[name]
    n = 256
    rng = np.random.default_rng(1)
    actions = np.where(np.arange(n)[:, None] < n // 2, -0.5, 0.5) + 0.05 * rng.standard_normal(
        (n, 2)
    )
    batch = SequenceBatch(
        observations=jnp.zeros((n, 1)), actions=jnp.asarray(actions[:, None], jnp.float32),
        rewards=jnp.zeros((n, 1)), masks=jnp.ones((n, 1)), valid=jnp.ones((n, 1)),
        next_observations=jnp.zeros((n, 1, 1)),
    )  # fmt: skip

    @jax.jit
    def run(batch):
        state = agent.init(jax.random.PRNGKey(0), jnp.zeros(1), jnp.zeros(2), config)
        critic = _linear_critic([0.0, 1.0, 1.0])
        state = eqx.tree_at(lambda s: (s.params.critic, s.targets["critic"]), state,
                            (critic, critic))  # fmt: skip

        def loss(params, key):  # the stored networks (teacher, TD sampler) follow the online
            st = eqx.tree_at(lambda s: s.params, state, params)
            return module._loss(params, st, batch, key)[0]

        params = _adam_scan(loss, state.params, steps=steps, learning_rate=3e-3,
                            key=jax.random.PRNGKey(2), frozen=lambda p: p.critic)  # fmt: skip
        state = eqx.tree_at(lambda s: s.params, state, params)
        return evaluate(state, jax.random.split(jax.random.PRNGKey(3), 1000))

    return jax.tree.map(np.asarray, run(batch))


def _policy_samples(policy, state, keys):
    return jax.vmap(lambda k: policy(state, jnp.zeros(1), key=k))(keys)


def test_fbrac_moves_the_whole_flow_to_the_q_maximum_on_the_box():
    # alpha = 0.1 weighs Q ten times over the flow loss: backpropagation through the ODE moves
    # both modes onto the corner (1, 1) that maximises Q in the box, where the clip stops the
    # critic's gradient (the data are 50/50 and never above 0.65).
    actions = _two_mode_toy(
        "fbrac", AGENTS["fbrac"].config(**TOY, alpha=0.1),
        lambda state, keys: _policy_samples(AGENTS["fbrac"].act, state, keys), steps=300,
    )  # fmt: skip
    assert np.mean(actions.sum(1) > 0) > 0.98
    assert np.mean(np.all(actions > 0.9, axis=1)) > 0.8


def test_fql_one_step_policy_shifts_the_teacher_by_d_over_two_alpha():
    # With alpha = 1 the one-step policy's optimum is mu = teacher + c D / (2 alpha) = teacher
    # + (1, 1) where the box does not bind: the low mode (-0.5, -0.5) lands on (0.5, 0.5), the
    # high mode stops at the box. The BC flow, trained by flow matching only, stays 50/50.
    def evaluate(state, keys):
        params, obs = state.params, jnp.zeros(1)
        z = jax.vmap(lambda k: jax.random.normal(k, (2,)))(keys)
        ode = lambda z_: qam.ode_sample(params.actor, obs, noise=z_, num_steps=5)
        return dict(
            acted=_policy_samples(AGENTS["fql"].act, state, keys),
            behaviour=_policy_samples(AGENTS["fql"].bc_act, state, keys),
            teacher=jax.vmap(ode)(z),
            student=jax.vmap(lambda z_: params.one_step(jnp.concatenate([obs, z_])))(z),
        )

    out = _two_mode_toy("fql", AGENTS["fql"].config(**TOY, alpha=1.0), evaluate, steps=300)
    assert np.mean(out["acted"].sum(1) > 0) > 0.95
    assert 0.35 < np.mean(out["behaviour"].sum(1) > 0) < 0.65
    low = out["teacher"].sum(1) < -0.5
    assert low.sum() > 200
    shift = (out["student"] - out["teacher"])[low].mean(0)
    np.testing.assert_allclose(shift, [1.0, 1.0], atol=0.15)
