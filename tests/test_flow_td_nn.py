"""Flow matching, ODE sampling, the TD loss and the network modules."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import qam


# Float64 comparisons of two evaluation orders of the same few-layer computation: rounding is
# ~1e-15 relative, so 1e-10 is generous and still far below any real (O(1e-3)+) discrepancy.
F64_RTOL, F64_ATOL = 1e-10, 1e-12


def test_flow_matching_loss_zero_for_exact_point_mass_velocity(getkey, x64):
    # For a point mass at `a` the exact velocity is (a - x) / (1 - t): the loss is 0 up to the
    # rounding of x_t, amplified by 1 / (1 - t) (float64: ~1e-16 / (1 - t), squared).
    a = jnp.array([0.3, -0.7, 0.1])
    exact = lambda t, x, obs: (a - x) / (1.0 - t)
    for _ in range(5):
        assert float(qam.flow_matching_loss(exact, None, a, key=getkey())) < 1e-20


def test_flow_matching_loss_hand_computed(getkey, x64):
    key = getkey()
    a = jnp.array([0.5, -0.5])
    zero = lambda t, x, obs: jnp.zeros_like(x)
    t_key, noise_key = jax.random.split(key)
    x0 = jax.random.normal(noise_key, (2,))
    expected = jnp.mean((a - x0) ** 2)  # mean over dims, not sum
    assert x0.dtype == jnp.float64
    loss = qam.flow_matching_loss(zero, None, a, key=key)
    np.testing.assert_allclose(loss, expected, rtol=F64_RTOL)


def test_ode_sample_constant_and_linear_fields(getkey, x64):
    c = jnp.array([0.2, -0.4])
    z = jax.random.normal(getkey(), (2,))
    out = qam.ode_sample(lambda t, x, obs: c, None, noise=z, num_steps=7, clip=False)
    np.testing.assert_allclose(out, z + c, rtol=F64_RTOL, atol=F64_ATOL)
    # v = x: K Euler steps multiply by (1 + 1/K)^K.
    out = qam.ode_sample(lambda t, x, obs: x, None, noise=z, num_steps=4, clip=False)
    np.testing.assert_allclose(out, z * 1.25**4, rtol=F64_RTOL)
    clipped = qam.ode_sample(lambda t, x, obs: 10.0 * jnp.ones_like(x), None, noise=z, num_steps=3)
    np.testing.assert_array_equal(clipped, jnp.ones(2))


def test_td_loss_hand_computed(x64):
    q = jnp.array([1.0, 2.0])
    next_q = jnp.array([3.0, 5.0])  # mean 4, std 1
    loss, aux = qam.td_loss(q, jnp.asarray(-1.0), jnp.asarray(0.5), next_q, rho=0.5)
    # y = -1 + 0.5 * (4 - 0.5 * 1) = 0.75; errors 0.25, 1.25; mean of squares 0.8125.
    np.testing.assert_allclose(aux.next_value, 3.5, rtol=F64_RTOL)
    np.testing.assert_allclose(aux.target, 0.75, rtol=F64_RTOL)
    np.testing.assert_allclose(aux.td_error, [0.25, 1.25], rtol=F64_RTOL)
    np.testing.assert_allclose(loss, 0.8125, rtol=F64_RTOL)
    # A chunked 3-step target with a terminal mask: discount = gamma^H * mask = 0.
    loss, aux = qam.td_loss(q, jnp.asarray(-2.71), jnp.asarray(0.0), next_q, rho=0.5)
    np.testing.assert_allclose(aux.target, -2.71, rtol=F64_RTOL)
    np.testing.assert_allclose(loss, ((1 + 2.71) ** 2 + (2 + 2.71) ** 2) / 2, rtol=F64_RTOL)


def test_td_loss_gradient_only_into_q_values(x64):
    q = jnp.array([1.0, 2.0, 0.5])
    next_q = jnp.array([3.0, 5.0, 4.0])
    g_q, g_next = jax.grad(
        lambda a, b: qam.td_loss(a, jnp.asarray(0.1), jnp.asarray(0.9), b)[0], argnums=(0, 1)
    )(q, next_q)
    _, aux = qam.td_loss(q, jnp.asarray(0.1), jnp.asarray(0.9), next_q)
    np.testing.assert_allclose(g_q, 2 * aux.td_error / 3, rtol=F64_RTOL)
    np.testing.assert_array_equal(g_next, 0.0)


def test_td_loss_errors():
    with pytest.raises((ValueError, TypeCheckError), match="reward"):
        qam.td_loss(jnp.zeros(2), jnp.zeros(1), jnp.asarray(0.9), jnp.zeros(2))


def test_mlp_init_and_structure(getkey, x64):
    mlp = qam.nn.MLP(10, 3, (64, 32), layer_norm=True, key=getkey())
    assert [layer.weight.shape for layer in mlp.layers] == [(64, 10), (32, 64), (3, 32)]
    for layer in mlp.layers:
        fan_out, fan_in = layer.weight.shape
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        assert layer.weight.dtype == jnp.float64
        assert float(jnp.max(jnp.abs(layer.weight))) <= limit * (1 + 1e-12)  # rounding of sqrt
        # Xavier-uniform: the variance is limit^2 / 3. For n uniform draws the sample variance
        # has relative standard error sqrt(0.8 / n) (excess kurtosis -1.2); allow 4 of them.
        n = layer.weight.size
        rtol = 4 * np.sqrt(0.8 / n)
        np.testing.assert_allclose(jnp.var(layer.weight), limit**2 / 3, rtol=rtol)
        np.testing.assert_array_equal(layer.bias, 0.0)
    assert mlp.norms is not None and len(mlp.norms) == 2
    # Hand-rolled forward: Linear -> GELU -> LayerNorm per hidden layer, final Linear.
    x = jax.random.normal(getkey(), (10,))
    h = x
    for layer, norm in zip(mlp.layers[:-1], mlp.norms):
        h = norm(jax.nn.gelu(layer.weight @ h + layer.bias))
    np.testing.assert_allclose(mlp(x), mlp.layers[-1].weight @ h, rtol=F64_RTOL, atol=F64_ATOL)


def test_velocity_network_concatenates_obs_action_time(getkey, x64):
    net = qam.nn.VelocityNetwork(4, 3, (8,), key=getkey())
    obs, x, t = jnp.ones(4), jnp.arange(3.0), jnp.asarray(0.25)
    np.testing.assert_allclose(
        net(t, x, obs), net.mlp(jnp.concatenate([obs, x, t[None]])), rtol=F64_RTOL, atol=F64_ATOL
    )
    assert net(0.5, x, obs).shape == (3,)


def test_critic_ensemble_members_are_independent(getkey, x64):
    critic = qam.nn.CriticEnsemble(4, 2, (16, 16), num_critics=5, key=getkey())
    obs, act = jax.random.normal(getkey(), (4,)), jax.random.normal(getkey(), (2,))
    q = critic(obs, act)
    assert q.shape == (5,)
    assert len(np.unique(np.round(np.asarray(q), 6))) == 5
    for e in range(5):
        member = jax.tree.map(
            lambda leaf, e=e: leaf[e] if eqx.is_array(leaf) else leaf, critic.members
        )
        np.testing.assert_allclose(
            q[e], member(jnp.concatenate([obs, act]))[0], rtol=F64_RTOL, atol=F64_ATOL
        )
    with pytest.raises(ValueError, match="num_critics"):
        qam.nn.CriticEnsemble(4, 2, (16,), num_critics=0, key=getkey())


def test_tanh_gaussian_log_prob_matches_change_of_variables(getkey):
    with jax.enable_x64(True):  # the textbook form loses digits in 1 - tanh(u)^2; float64
        mean = jnp.array([0.1, -0.3, 0.5])
        log_std = jnp.array([-0.5, 0.0, 0.3])
        u = jnp.array([0.4, -1.2, 2.0])
        a = jnp.tanh(u)
        std = jnp.exp(log_std)
        gauss = -0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)
        expected = jnp.sum(gauss - jnp.log(1 - a**2))
        log_prob = qam.nn.tanh_gaussian_log_prob(u, mean, log_std)
        assert log_prob.dtype == jnp.float64
        np.testing.assert_allclose(log_prob, expected, rtol=F64_RTOL)
    # Stable far in the tails, where tanh(u) rounds to +-1 and atanh would be infinite: in the
    # float32 the library runs in. The value, 57.7, is a sum of ~6 terms of size <= 60, so its
    # float32 rounding is <= 6 * 60 * eps32 ~ 4e-5 absolute, inside rtol 1e-5 (5.8e-4).
    far = qam.nn.tanh_gaussian_log_prob(jnp.array([30.0]), jnp.array([30.0]), jnp.array([0.0]))
    assert far.dtype == jnp.float32 and bool(jnp.isfinite(far))
    np.testing.assert_allclose(far, -0.5 * np.log(2 * np.pi) - 2 * (np.log(2) - 30.0), rtol=1e-5)


def test_tanh_gaussian_policy_sampling_statistics(getkey):
    policy = qam.nn.TanhGaussianPolicy(3, 2, (16, 16), key=getkey())
    x = jnp.ones(3)
    mean, log_std = policy.distribution(x)
    assert bool(jnp.all((log_std >= -20) & (log_std <= 2)))
    keys = jax.random.split(getkey(), 20_000)
    actions, log_probs = jax.vmap(lambda k: policy.sample_and_log_prob(x, key=k))(keys)
    assert bool(jnp.all(jnp.abs(actions) < 1))
    # E[atanh(a)] = mean: check the reparameterisation, 4 standard errors.
    pre = jnp.arctanh(jnp.clip(actions, -1 + 1e-6, 1 - 1e-6))
    se = jnp.exp(log_std) / np.sqrt(len(keys))
    assert bool(jnp.all(jnp.abs(jnp.mean(pre, 0) - mean) < 4 * se))
    assert log_probs.shape == (20_000,)
    # The same float32 ops on the same inputs; tanh is within 1 ulp whatever the compilation.
    np.testing.assert_allclose(policy.mode(x), jnp.tanh(mean), rtol=4 * np.finfo(np.float32).eps)


def test_critic_ensemble_batched_equals_vmapped_call(getkey, x64):
    # The same sums in two orders: compared in float64 (in float32 the gradients, sums over 5
    # members of products of size ~1, differ by ~1e-6 with the reduction order).
    critic = qam.nn.CriticEnsemble(4, 3, (16, 16), num_critics=5, key=getkey())
    obs, act = jax.random.normal(getkey(), (7, 4)), jax.random.normal(getkey(), (7, 3))
    q = critic.batched(obs, act)
    assert q.dtype == jnp.float64 and q.shape == (7, 5)
    np.testing.assert_allclose(q, jax.vmap(critic)(obs, act), rtol=F64_RTOL, atol=F64_ATOL)
    g1 = jax.grad(lambda a: jnp.sum(critic.batched(obs, a) ** 2))(act)
    g2 = jax.grad(lambda a: jnp.sum(jax.vmap(critic)(obs, a) ** 2))(act)
    np.testing.assert_allclose(g1, g2, rtol=F64_RTOL, atol=F64_ATOL)
    assert float(jnp.max(jnp.abs(g1))) > 1e-3  # not vacuously zero


def _reference_layer_norm(x, weight, bias, eps):
    # Textbook LayerNorm, differentiated by autodiff: the oracle for the hand-written JVP.
    mean = jnp.mean(x)
    var = jnp.mean((x - mean) ** 2)
    return (x - mean) / jnp.sqrt(var + eps) * weight + bias


def test_layer_norm_matches_equinox_and_autodiff(getkey, x64):
    n = 24
    norm = qam.nn.LayerNorm(n)
    norm = eqx.tree_at(
        lambda m: (m.weight, m.bias),
        norm,
        (jax.random.normal(getkey(), (n,)), jax.random.normal(getkey(), (n,))),
    )
    eps = norm.eps  # compared with equinox's and the textbook LayerNorm at the same epsilon
    reference = eqx.tree_at(
        lambda m: (m.weight, m.bias), eqx.nn.LayerNorm(n, eps=eps), (norm.weight, norm.bias)
    )
    x = 3.0 + 2.0 * jax.random.normal(getkey(), (n,))
    assert norm(x).dtype == jnp.float64
    np.testing.assert_allclose(norm(x), reference(x), rtol=F64_RTOL, atol=F64_ATOL)
    # Normalised output: zero mean, (biased) variance var / (var + eps) before the affine map.
    plain = qam.nn.LayerNorm(n)(x)
    np.testing.assert_allclose(jnp.mean(plain), 0.0, atol=F64_ATOL)
    np.testing.assert_allclose(jnp.var(plain), jnp.var(x) / (jnp.var(x) + eps), rtol=F64_RTOL)

    args = (x, norm.weight, norm.bias)
    cotangent = jax.random.normal(getkey(), (n,))

    # Reverse mode (what training uses), for every argument.
    def ours_fn(x_, weight, bias):
        return eqx.tree_at(lambda m: (m.weight, m.bias), norm, (weight, bias))(x_)

    ours = jax.vjp(ours_fn, *args)[1](cotangent)
    theirs = jax.vjp(lambda *a: _reference_layer_norm(*a, eps), *args)[1](cotangent)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=F64_RTOL, atol=F64_ATOL)
    # Forward mode and a second derivative work too (the rule is a JVP, not a VJP).
    tangent = jax.random.normal(getkey(), (n,))
    np.testing.assert_allclose(
        jax.jvp(norm, (x,), (tangent,))[1],
        jax.jvp(
            lambda x_: _reference_layer_norm(x_, norm.weight, norm.bias, eps), (x,), (tangent,)
        )[1],
        rtol=F64_RTOL,
        atol=F64_ATOL,
    )

    def scalar(f):
        return lambda x_: jnp.sum(jnp.sin(f(x_)))

    np.testing.assert_allclose(
        jax.hessian(scalar(norm))(x),
        jax.hessian(scalar(lambda x_: _reference_layer_norm(x_, norm.weight, norm.bias, eps)))(x),
        rtol=F64_RTOL,
        atol=F64_ATOL,
    )
