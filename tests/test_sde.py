"""The memoryless SDE rollout: exact scheme, diffrax agreement, statistics, errors."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import gaussian_m, gaussian_velocity
from jaxtyping import TypeCheckError

import qam


# Float64 comparisons of two implementations of the same K-step scheme: rounding ~K * 1e-16.
F64_RTOL, F64_ATOL = 1e-10, 1e-12


def test_rollout_matches_hand_written_scheme(getkey, x64):
    num_steps, dim = 5, 2
    fine = lambda t, x, obs: jnp.sin(x) * obs + t
    base = lambda t, x, obs: -x + 2.0 * t
    obs = jnp.array([0.7, -1.3])
    noise = jax.random.normal(getkey(), (num_steps, dim))
    traj = qam.memoryless_sde_sample(fine, base, obs, noise=noise, num_steps=num_steps)
    h = 1.0 / num_steps
    x = np.asarray(noise[0], np.float64)
    expected = [x]
    for i in range(num_steps - 1):
        t = i * h
        v = np.sin(x) * np.asarray(obs) + t
        sigma = np.sqrt(2 * (1 - t + h) / (t + h))
        x = x + h * (2 * v - x / (t + h)) + np.sqrt(h) * sigma * np.asarray(noise[i + 1])
        expected.append(x)
    t = (num_steps - 1) * h
    expected.append(x + h * (-x + 2 * t))
    assert traj.xs.dtype == jnp.float64
    np.testing.assert_allclose(traj.xs, np.stack(expected), rtol=F64_RTOL, atol=F64_ATOL)
    np.testing.assert_allclose(traj.ts, np.linspace(0, 1, num_steps + 1), rtol=0, atol=F64_ATOL)
    assert traj.num_steps == num_steps
    np.testing.assert_array_equal(traj.action, traj.xs[-1])


def test_residual_rollout_uses_sum_of_velocities(getkey, x64):
    fine = lambda t, x, obs: 0.3 * x
    base = lambda t, x, obs: -x + t
    summed = lambda t, x, obs: fine(t, x, obs) + base(t, x, obs)
    noise = jax.random.normal(getkey(), (6, 3))
    a = qam.memoryless_sde_sample(fine, base, None, noise=noise, num_steps=6, residual=True)
    b = qam.memoryless_sde_sample(summed, base, None, noise=noise, num_steps=6)
    np.testing.assert_allclose(a.xs, b.xs, rtol=F64_RTOL, atol=F64_ATOL)


def test_key_and_noise_paths_agree(getkey):
    key = getkey()
    fine = qam.nn.VelocityNetwork(3, 4, (8,), key=getkey())
    obs = jnp.ones(3)
    a = qam.memoryless_sde_sample(fine, fine, obs, key=key, action_dim=4, num_steps=7)
    b = qam.memoryless_sde_sample(
        fine, fine, obs, noise=jax.random.normal(key, (7, 4)), num_steps=7
    )
    np.testing.assert_array_equal(a.xs, b.xs)


@pytest.mark.parametrize("num_steps", [2, 10])
def test_diffrax_euler_agrees_with_builtin_loop(getkey, x64, num_steps):
    fine = qam.nn.VelocityNetwork(3, 4, (16, 16), key=getkey())
    base = qam.nn.VelocityNetwork(3, 4, (16, 16), key=getkey())
    obs = jax.random.normal(getkey(), (3,))
    noise = jax.random.normal(getkey(), (num_steps, 4))
    builtin = qam.memoryless_sde_sample(fine, base, obs, noise=noise, num_steps=num_steps)
    via_diffrax = qam.memoryless_sde_sample(
        fine, base, obs, noise=noise, num_steps=num_steps, solver=diffrax.Euler()
    )
    # Diffrax takes the increments as differences of a cumulative Brownian path, which rounds
    # them by ~eps64 * |W| (float64: ~1e-15); nothing else differs.
    assert via_diffrax.xs.dtype == jnp.float64
    np.testing.assert_allclose(via_diffrax.xs, builtin.xs, rtol=F64_RTOL, atol=F64_ATOL)
    np.testing.assert_array_equal(via_diffrax.ts, builtin.ts)


def test_diffrax_ode_sample_agrees_with_builtin(getkey, x64):
    velocity = qam.nn.VelocityNetwork(3, 4, (16,), key=getkey())
    obs = jax.random.normal(getkey(), (3,))
    noise = jax.random.normal(getkey(), (4,))
    a = qam.ode_sample(velocity, obs, noise=noise, num_steps=10, clip=False)
    b = qam.ode_sample(velocity, obs, noise=noise, num_steps=10, clip=False, solver=diffrax.Euler())
    np.testing.assert_allclose(a, b, rtol=F64_RTOL, atol=F64_ATOL)


def test_terminal_variance_matches_exact_discrete_chain(getkey):
    # For a N(0, s2) base the K-step chain is linear-Gaussian; its terminal variance follows
    # Var_{i+1} = (1 + h (2 m(t_i) - 1/(t_i + h)))^2 Var_i + h sigma_i^2, then the ODE step.
    # (docs/mathematics.md §1.9, D1: s2 = 1, K = 10 gives 1.226, not 1.)
    num_steps, s2, n = 10, 1.0, 40_000
    h = 1.0 / num_steps
    base = gaussian_velocity(0.0, s2)
    keys = jax.random.split(getkey(), n)
    sample = lambda k: qam.memoryless_sde_sample(
        base, base, None, key=k, action_dim=1, num_steps=num_steps
    ).action[0]
    actions = jax.jit(jax.vmap(sample))(keys)
    var = 1.0
    for i in range(num_steps - 1):
        t = i * h
        var = (1 + h * (2 * gaussian_m(t, s2) - 1 / (t + h))) ** 2 * var + h * 2 * (1 - t + h) / (
            t + h
        )
    var = (1 + h * gaussian_m((num_steps - 1) * h, s2)) ** 2 * var
    assert abs(var - 1.226) < 1e-3
    # Sample variance standard error ~ var * sqrt(2/n) ~ 0.0087; allow 4 standard errors.
    assert abs(float(jnp.var(actions)) - var) < 4 * var * np.sqrt(2 / n)
    assert abs(float(jnp.mean(actions))) < 4 * np.sqrt(var / n)


def test_gradients_flow_through_velocity_not_base(getkey):
    fine = qam.nn.VelocityNetwork(2, 2, (8,), key=getkey())
    base = qam.nn.VelocityNetwork(2, 2, (8,), key=getkey())
    noise = jax.random.normal(getkey(), (4, 2))

    def f(fine_, base_):
        traj = qam.memoryless_sde_sample(fine_, base_, jnp.ones(2), noise=noise, num_steps=4)
        return jnp.sum(traj.action**2)

    g_fine, g_base = jax.grad(f, argnums=(0, 1))(fine, base)
    assert any(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g_fine))
    assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(g_base))


def _zero(t, x, obs):
    return jnp.zeros_like(x)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(key=jax.random.PRNGKey(0), action_dim=2, num_steps=-1), ValueError, "at least 1"),
        (dict(key=jax.random.PRNGKey(0), action_dim=2, num_steps=0), ValueError, "at least 1"),
        (dict(key=jax.random.PRNGKey(0), action_dim=2, num_steps=2.5), TypeError, "num_steps"),
        (dict(action_dim=2), ValueError, "either `key=` or `noise=`"),
        (dict(key=jax.random.PRNGKey(0)), ValueError, "needs `action_dim=`"),
        (dict(key=jax.random.PRNGKey(0), action_dim=0), ValueError, "positive int"),
        (
            dict(noise=jnp.zeros((3, 2)), num_steps=4),
            ValueError,
            r"shape \(num_steps, action_dim\)",
        ),
        (dict(noise=jnp.zeros((4, 2)), num_steps=4, action_dim=3), ValueError, "`action_dim=3`"),
        (
            dict(noise=jnp.zeros((4, 2)), key=jax.random.PRNGKey(0), num_steps=4),
            ValueError,
            "not both",
        ),
    ],
)
def test_sample_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        qam.memoryless_sde_sample(_zero, _zero, None, **kwargs)


def test_ode_sample_errors():
    with pytest.raises(ValueError, match="positive int"):
        qam.ode_sample(_zero, None, key=jax.random.PRNGKey(0), action_dim=2, num_steps=0)
    # Under the jaxtyping hook the annotation catches it first; both errors name `noise`.
    with pytest.raises((ValueError, TypeCheckError), match="noise"):
        qam.ode_sample(_zero, None, noise=jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="needs `action_dim=`"):
        qam.ode_sample(_zero, None, key=jax.random.PRNGKey(0))


def test_trajectory_shape_errors(getkey):
    traj = qam.memoryless_sde_sample(_zero, _zero, None, key=getkey(), action_dim=2, num_steps=4)
    with pytest.raises(ValueError, match=r"terminal_adjoint=...\)` must have shape \(2,\)"):
        qam.lean_adjoint(_zero, None, traj, jnp.zeros(3))
    with pytest.raises(ValueError, match=r" adjoint=...\)` must have shape \(4, 2\)"):
        qam.adjoint_matching_loss(_zero, _zero, None, traj, jnp.zeros((5, 2)))
    batched = jax.vmap(
        lambda k: qam.memoryless_sde_sample(_zero, _zero, None, key=k, action_dim=2, num_steps=4)
    )(jax.random.split(getkey(), 3))
    with pytest.raises(ValueError, match="use `jax.vmap`"):
        qam.lean_adjoint(_zero, None, batched, jnp.zeros(2))


def test_jaxtyping_rejects_wrong_rank_with_argument_name(getkey):
    # Under the jaxtyping import hook (pytest addopts), annotations are checked at call time.
    traj = qam.memoryless_sde_sample(_zero, _zero, None, key=getkey(), action_dim=2, num_steps=4)
    with pytest.raises((TypeCheckError, ValueError), match="terminal_adjoint"):
        qam.lean_adjoint(_zero, None, traj, jnp.zeros((2, 2)))
    with pytest.raises((TypeCheckError, ValueError), match="next_q_values"):
        qam.td_loss(jnp.zeros(3), 0.0, 0.9, jnp.zeros((3, 1)))


def test_memoryless_sigma_values(x64):
    h = 0.1
    t = jnp.arange(10, dtype=jnp.float64) / 10
    np.testing.assert_allclose(
        qam.memoryless_sigma(t, h) ** 2,
        [22, 10, 6, 4, 2.8, 2, 10 / 7, 1, 2 / 3, 0.4],  # 2 (1 - t + h) / (t + h), exactly
        rtol=F64_RTOL,
    )
