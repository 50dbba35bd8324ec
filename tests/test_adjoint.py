"""The lean adjoint, the basic adjoint and the adjoint matching loss against closed forms."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import gaussian_velocity, reference_adjoints

import qam


K = 10
H = 1.0 / K

# docs/mathematics.md §6.2 test vectors: mu = 0, S = 1, inv_temp * c = 1, K = 10.
SPEC_ADJOINTS = np.array(
    [0.0204106, -0.1046043, -0.3233224, -0.6115010, -0.9085158, -1.1356448, -1.2476098,
     -1.2537861, -1.1924119, -1.1]
)  # fmt: skip
SPEC_SIGMA2 = np.array([22, 10, 6, 4, 2.8, 2, 1.428571, 1, 0.666667, 0.4])
SPEC_OPTIMUM_CONTROL = np.array(
    [-0.2245166, 0.5230215, 0.9699672, 1.2230021, 1.2719222, 1.1356448, 0.8911498, 0.6268930,
     0.3974706, 0.22]
)  # fmt: skip


def _trajectory(velocity, base, dim, key, num_steps=K):
    return qam.memoryless_sde_sample(
        velocity, base, None, key=key, action_dim=dim, num_steps=num_steps
    )


def test_lean_adjoint_matches_spec_vectors(getkey):
    base = gaussian_velocity(0.0, 1.0)
    traj = _trajectory(base, base, 1, getkey())
    adjoints = qam.lean_adjoint(base, None, traj, jnp.array([-1.0]))
    assert adjoints.shape == (K, 1)
    np.testing.assert_allclose(adjoints[:, 0], SPEC_ADJOINTS, rtol=1e-5, atol=1e-6)


def test_lean_adjoint_gaussian_recursion_diagonal(getkey):
    s2 = jnp.array([1.0, 0.25, 0.04])
    base = gaussian_velocity(jnp.array([0.3, -0.2, 0.1]), s2)
    terminal = jnp.array([-1.0, 0.5, 2.0])
    traj = _trajectory(base, base, 3, getkey())
    adjoints = qam.lean_adjoint(base, None, traj, terminal)
    np.testing.assert_allclose(adjoints, reference_adjoints(s2, terminal, K), rtol=2e-5, atol=1e-6)


def test_lean_adjoint_converges_to_continuous_adjoint(getkey):
    # Continuous lean adjoint for a Gaussian base: a(t) = a(1) * s^2 t / Sigma_t.
    num_steps = 2000
    s2 = 1.0
    base = gaussian_velocity(0.0, s2)
    traj = _trajectory(base, base, 1, getkey(), num_steps=num_steps)
    adjoints = qam.lean_adjoint(base, None, traj, jnp.array([-1.0]))
    t = np.arange(num_steps) / num_steps
    continuous = -1.0 * s2 * t / ((1 - t) ** 2 + t**2 * s2)
    np.testing.assert_allclose(adjoints[:, 0], continuous, atol=2e-3)


def test_lean_adjoint_nonsymmetric_affine_field_catches_transpose(getkey):
    # v(x, t) = alpha(t) + B(t) x with non-symmetric B(t): A_i = F_i^T ... F_{K-1}^T A_K,
    # F_j = I + h (2 B(t_{j+1}) - I / t_{j+1}).
    dim = 3
    b0 = jax.random.normal(getkey(), (dim, dim))
    b1 = jax.random.normal(getkey(), (dim, dim))
    alpha = jax.random.normal(getkey(), (dim,))

    def b_of(t):
        return b0 + t * b1

    def field(t, x, obs):
        return alpha * t + b_of(t) @ x

    traj = _trajectory(field, field, dim, getkey())
    terminal = jax.random.normal(getkey(), (dim,))
    adjoints = qam.lean_adjoint(field, None, traj, terminal)

    a = np.asarray(terminal, dtype=np.float64)
    expected = []
    for i in reversed(range(K)):
        t_next = (i + 1) * H
        f = np.eye(dim) + H * (2.0 * np.asarray(b_of(t_next), np.float64) - np.eye(dim) / t_next)
        a = f.T @ a
        expected.append(a)
    expected = np.stack(expected[::-1])
    np.testing.assert_allclose(adjoints, expected, rtol=1e-4, atol=1e-5)
    # The untransposed product differs: the test would catch a VJP/JVP mix-up.
    a_wrong = np.asarray(terminal, dtype=np.float64)
    f_last = np.eye(dim) + H * (2.0 * np.asarray(b_of(1.0), np.float64) - np.eye(dim))
    assert not np.allclose(f_last @ a_wrong, expected[-1], atol=1e-3)


def test_lean_adjoint_depends_only_on_base(getkey):
    base = gaussian_velocity(0.0, 1.0)
    traj = _trajectory(base, base, 1, getkey())

    def crazy(t, x, obs):
        return 100.0 * jnp.sin(x) + t

    a1 = qam.lean_adjoint(base, None, traj, jnp.array([-1.0]))
    # Same trajectory, any fine velocity: the lean adjoint never sees it.
    traj2 = _trajectory(crazy, base, 1, getkey())
    a2 = qam.lean_adjoint(base, None, traj2, jnp.array([-1.0]))
    np.testing.assert_allclose(a1, a2, rtol=1e-5)  # linear base: state-independent


class _OffsetVelocity(eqx.Module):
    """`v(t, x) = v_B(t, x) + offsets[round(t K)]`: any per-step offset of the base."""

    offsets: jax.Array

    def __call__(self, t, x, obs):
        index = jnp.round(t * K).astype(jnp.int32)
        return gaussian_velocity(0.0, 1.0)(t, x, obs) + self.offsets[index]


def test_loss_zero_and_gradient_zero_at_discrete_optimum(getkey):
    base = gaussian_velocity(0.0, 1.0)
    traj = _trajectory(base, base, 1, getkey())
    adjoints = qam.lean_adjoint(base, None, traj, jnp.array([-1.0]))
    sigma2 = qam.memoryless_sigma(traj.ts[:-1], H) ** 2
    np.testing.assert_allclose(sigma2, SPEC_SIGMA2, rtol=1e-5)
    optimum = _OffsetVelocity(-0.5 * sigma2[:, None] * adjoints)
    np.testing.assert_allclose(optimum.offsets[:, 0], SPEC_OPTIMUM_CONTROL, rtol=1e-5, atol=1e-6)
    loss, grad = eqx.filter_value_and_grad(qam.adjoint_matching_loss)(
        optimum, base, None, traj, adjoints
    )
    assert abs(float(loss)) < 1e-10
    np.testing.assert_allclose(grad.offsets, 0.0, atol=1e-6)


def test_loss_value_at_base_velocity(getkey):
    base = gaussian_velocity(0.0, 1.0)
    traj = _trajectory(base, base, 1, getkey())
    adjoints = qam.lean_adjoint(base, None, traj, jnp.array([-1.0]))
    loss = qam.adjoint_matching_loss(base, base, None, traj, adjoints)
    np.testing.assert_allclose(loss, 12.3595366, rtol=1e-5)


def test_loss_residual_mode_matches_non_residual(getkey):
    base = gaussian_velocity(0.0, 1.0)
    traj = _trajectory(base, base, 1, getkey())
    adjoints = qam.lean_adjoint(base, None, traj, jnp.array([-1.0]))
    offsets = jax.random.normal(getkey(), (K, 1))
    full = _OffsetVelocity(offsets)
    residual = lambda t, x, obs: offsets[jnp.round(t * K).astype(jnp.int32)]
    a = qam.adjoint_matching_loss(full, base, None, traj, adjoints)
    b = qam.adjoint_matching_loss(residual, base, None, traj, adjoints, residual=True)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_loss_gradient_flows_only_into_velocity(getkey):
    fine = qam.nn.VelocityNetwork(2, 2, (16,), key=getkey())
    base = qam.nn.VelocityNetwork(2, 2, (16,), key=getkey())
    obs = jnp.ones(2)
    traj = qam.memoryless_sde_sample(fine, base, obs, key=getkey(), action_dim=2, num_steps=4)
    adjoints = qam.lean_adjoint(base, obs, traj, jnp.ones(2))

    def loss(fine_, base_, xs_, adj_):
        return qam.adjoint_matching_loss(fine_, base_, obs, qam.SDETrajectory(xs_, traj.ts), adj_)

    g_fine, g_base, g_xs, g_adj = jax.grad(loss, argnums=(0, 1, 2, 3))(
        fine, base, traj.xs, adjoints
    )
    assert any(float(jnp.abs(leaf).sum()) > 0 for leaf in jax.tree.leaves(g_fine))
    for tree in (g_base, g_xs, g_adj):
        assert all(float(jnp.abs(leaf).sum()) == 0 for leaf in jax.tree.leaves(tree))


def _perturbed_rollout_cost(fine, base, obs, noise, deltas, reward_grad_fn, scale, residual):
    """Differentiable rollout with additive state perturbations `deltas[i]` at X_i; returns
    the BAM-style cost. d cost / d deltas[i] at 0 is the basic adjoint A_i."""
    num_steps = noise.shape[0]
    h = 1.0 / num_steps
    x = noise[0]
    cost = 0.0
    for i in range(num_steps - 1):
        x = x + deltas[i]
        t = jnp.asarray(i * h)
        v = fine(t, x, obs)
        vb = base(t, x, obs)
        drift_v = v + vb if residual else v
        control = v if residual else v - vb
        sigma = qam.memoryless_sigma(t, h)
        cost = cost + scale * 2.0 * jnp.sum(control**2) / sigma**2
        x = x + h * (2.0 * drift_v - x / (t + h)) + jnp.sqrt(h) * sigma * noise[i + 1]
    x = x + deltas[num_steps - 1]
    x = x + h * base(jnp.asarray((num_steps - 1) * h), x, obs)
    return cost + reward_grad_fn(x)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.0])
def test_basic_adjoint_equals_autodiff_through_rollout(getkey, residual, scale):
    dim, num_steps = 3, 6
    fine = qam.nn.VelocityNetwork(2, dim, (16, 16), key=getkey())
    base = qam.nn.VelocityNetwork(2, dim, (16, 16), key=getkey())
    obs = jax.random.normal(getkey(), (2,))
    noise = jax.random.normal(getkey(), (num_steps, dim))
    traj = qam.memoryless_sde_sample(
        fine, base, obs, noise=noise, num_steps=num_steps, residual=residual
    )
    c = jax.random.normal(getkey(), (dim,))
    terminal_cost = lambda a: -jnp.sum(jnp.sin(c * a))
    terminal = jax.grad(terminal_cost)(traj.action)
    adjoints = qam.basic_adjoint(
        fine, base, obs, traj, terminal, running_cost_scale=scale, residual=residual
    )
    cost = functools.partial(
        _perturbed_rollout_cost, fine, base, obs, noise,
        reward_grad_fn=terminal_cost, scale=scale, residual=residual,
    )  # fmt: skip
    expected = jax.grad(cost)(jnp.zeros((num_steps, dim)))
    np.testing.assert_allclose(adjoints, expected, rtol=1e-4, atol=1e-5)

    # With the noise held fixed, A_0 is also the gradient w.r.t. the initial noise.
    def cost_of_x0(x0):
        t = qam.memoryless_sde_sample(
            fine, base, obs, noise=noise.at[0].set(x0), num_steps=num_steps, residual=residual
        )
        if scale == 0.0:
            return terminal_cost(t.action)
        return cost(jnp.zeros((num_steps, dim)).at[0].set(x0 - noise[0]))

    np.testing.assert_allclose(adjoints[0], jax.grad(cost_of_x0)(noise[0]), rtol=1e-4, atol=1e-5)


def test_basic_adjoint_equals_lean_adjoint_for_the_base_without_running_cost(getkey):
    # With v = v_B there is no control; the basic adjoint differs from the lean one only by
    # the time shift and the last step (docs/mathematics.md §1.9, D2/D3): both are O(h) apart,
    # not equal.
    base = gaussian_velocity(0.0, 1.0)
    traj = _trajectory(base, base, 1, getkey(), num_steps=400)
    terminal = jnp.array([-1.0])
    lean = qam.lean_adjoint(base, None, traj, terminal)
    basic = qam.basic_adjoint(base, base, None, traj, terminal, running_cost_scale=0.0)
    # Away from t = 0 (where the shifted scheme zeroes A_0) they agree to O(h).
    np.testing.assert_allclose(lean[40:], basic[40:], atol=2e-2)
    assert float(jnp.max(jnp.abs(lean[40:] - basic[40:]))) > 1e-5


@pytest.mark.parametrize("residual", [False, True])
def test_fused_loss_equals_composed_pieces_value_and_gradient(getkey, residual):
    dim, num_steps = 3, 5
    fine = qam.nn.VelocityNetwork(2, dim, (16, 16), key=getkey())
    base = qam.nn.VelocityNetwork(2, dim, (16, 16), key=getkey())
    obs = jax.random.normal(getkey(), (2,))
    noise = jax.random.normal(getkey(), (num_steps, dim))
    c = jax.random.normal(getkey(), (dim,))
    terminal_fn = lambda a: -2.0 * jax.grad(lambda a_: jnp.sum(jnp.sin(c * a_)))(a)

    def composed(model):
        traj = qam.memoryless_sde_sample(
            model, base, obs, noise=noise, num_steps=num_steps, residual=residual
        )
        traj = jax.lax.stop_gradient(traj)
        adjoint = qam.lean_adjoint(base, obs, traj, terminal_fn(traj.action))
        loss = qam.adjoint_matching_loss(model, base, obs, traj, adjoint, residual=residual)
        return loss, traj

    def fused(model):
        return qam.fused_adjoint_matching_loss(
            model, base, obs, terminal_fn, noise=noise, num_steps=num_steps, residual=residual
        )

    (l1, t1), g1 = eqx.filter_value_and_grad(composed, has_aux=True)(fine)
    (l2, t2), g2 = eqx.filter_value_and_grad(fused, has_aux=True)(fine)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    np.testing.assert_allclose(t2.xs, t1.xs, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_fused_loss_does_not_re_evaluate_the_fine_network(getkey):
    # Count, at run time, how many (t, x) points the fine network is evaluated on while
    # computing the loss gradient: the composed pipeline evaluates the rollout's K-1 points and
    # then all K again in the loss (2K - 1); the fused one evaluates each point once (K).
    num_steps = 4
    evaluated = []

    class Counted(eqx.Module):
        weight: jax.Array

        def __call__(self, t, x, obs):
            jax.debug.callback(lambda x_: evaluated.append(max(1, x_.size // 2)), x)
            return self.weight @ x + t

    fine = Counted(jax.random.normal(getkey(), (2, 2)))
    base = lambda t, x, obs: -x
    noise = jax.random.normal(getkey(), (num_steps, 2))

    def composed(model):
        traj = qam.memoryless_sde_sample(model, base, None, noise=noise, num_steps=num_steps)
        traj = jax.lax.stop_gradient(traj)
        adjoint = qam.lean_adjoint(base, None, traj, -traj.action)
        return qam.adjoint_matching_loss(model, base, None, traj, adjoint)

    def fused(model):
        return qam.fused_adjoint_matching_loss(
            model, base, None, lambda a: -a, noise=noise, num_steps=num_steps
        )[0]

    def count(f):
        evaluated.clear()
        jax.block_until_ready(jax.grad(f)(fine))
        jax.effects_barrier()
        return sum(evaluated)

    assert count(composed) == 2 * num_steps - 1
    assert count(fused) == num_steps
