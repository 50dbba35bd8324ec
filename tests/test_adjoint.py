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


# Float64 rounding of a K-step recursion of O(1) numbers: ~K * 1e-16, so 1e-10 is generous and
# any wrong step, index or sign (an O(h) = O(0.1) change) is far outside it.
F64_RTOL, F64_ATOL = 1e-10, 1e-12
# The spec vectors are printed to 7 decimals (0.5e-7 rounding), SPEC_SIGMA2 to 6 (0.5e-6).
SPEC_ATOL = 5e-8


def test_lean_adjoint_matches_spec_vectors(getkey, x64):
    base = gaussian_velocity(0.0, 1.0)
    traj = _trajectory(base, base, 1, getkey())
    adjoints = qam.lean_adjoint(base, None, traj, jnp.array([-1.0]))
    assert adjoints.shape == (K, 1) and adjoints.dtype == jnp.float64
    np.testing.assert_allclose(adjoints[:, 0], SPEC_ADJOINTS, rtol=0, atol=SPEC_ATOL)
    reference = reference_adjoints(1.0, np.array([-1.0]), K)
    np.testing.assert_allclose(adjoints, reference, rtol=F64_RTOL, atol=F64_ATOL)


def test_lean_adjoint_gaussian_recursion_diagonal(getkey, x64):
    s2 = jnp.array([1.0, 0.25, 0.04])
    base = gaussian_velocity(jnp.array([0.3, -0.2, 0.1]), s2)
    terminal = jnp.array([-1.0, 0.5, 2.0])
    traj = _trajectory(base, base, 3, getkey())
    adjoints = qam.lean_adjoint(base, None, traj, terminal)
    expected = reference_adjoints(s2, terminal, K)
    np.testing.assert_allclose(adjoints, expected, rtol=F64_RTOL, atol=F64_ATOL)


def test_lean_adjoint_converges_to_continuous_adjoint(getkey, x64):
    # Continuous lean adjoint for a Gaussian base: a(t) = a(1) * s^2 t / Sigma_t. The scheme is
    # first order: its error is 1.33 h (6.6e-4 at K = 2000; float64, so no rounding part).
    num_steps = 2000
    s2 = 1.0
    base = gaussian_velocity(0.0, s2)
    traj = _trajectory(base, base, 1, getkey(), num_steps=num_steps)
    adjoints = qam.lean_adjoint(base, None, traj, jnp.array([-1.0]))
    t = np.arange(num_steps) / num_steps
    continuous = -1.0 * s2 * t / ((1 - t) ** 2 + t**2 * s2)
    np.testing.assert_allclose(adjoints[:, 0], continuous, atol=2e-3)


def test_lean_adjoint_nonsymmetric_affine_field_catches_transpose(getkey, x64):
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
    np.testing.assert_allclose(adjoints, expected, rtol=F64_RTOL, atol=F64_ATOL)
    # The untransposed product differs: the test would catch a VJP/JVP mix-up.
    a_wrong = np.asarray(terminal, dtype=np.float64)
    f_last = np.eye(dim) + H * (2.0 * np.asarray(b_of(1.0), np.float64) - np.eye(dim))
    assert not np.allclose(f_last @ a_wrong, expected[-1], atol=1e-3)


def _nonlinear_base(w, c):
    """`v_B(t, x, obs) = obs * tanh(W x + t c) - x`: its Jacobian depends on the state and time."""

    def base(t, x, obs):
        return obs * jnp.tanh(w @ x + t * c) - x

    return base


def _lean_recursion(base, obs, xs, terminal, *, state_shift=0, time_shift=1):
    """The lean adjoint transcribed (float64): `A_i = A_{i+1} + h (2 J^T A_{i+1} - A_{i+1} / t)`
    with `J` the base Jacobian at `X_{i + state_shift}` and `t = t_{i + time_shift}`; the
    defaults (`X_i`, `t_{i+1}`) are the scheme, the others deliberate index errors."""
    a = np.asarray(terminal, np.float64)
    out = []
    for i in reversed(range(K)):
        t = (i + time_shift) * H
        jac = np.asarray(jax.jacobian(lambda x_, t=t: base(t, x_, obs))(xs[i + state_shift]))
        a = a + H * (2.0 * jac.T @ a - a / ((i + 1) * H))
        out.append(a)
    return np.stack(out[::-1])


def test_lean_adjoint_depends_on_the_states_and_the_base_not_the_fine_velocity(getkey, x64):
    dim = 3
    w = jax.random.normal(getkey(), (dim, dim))
    c = jax.random.normal(getkey(), (dim,))
    base = _nonlinear_base(w, c)
    obs = jnp.array([1.5, -0.7, 2.0])
    terminal = jax.random.normal(getkey(), (dim,))
    noise = jax.random.normal(getkey(), (K, dim))
    fine = lambda t, x, obs: jnp.sin(3.0 * x) + t
    traj = qam.memoryless_sde_sample(fine, base, obs, noise=noise, num_steps=K)
    adjoints = qam.lean_adjoint(base, obs, traj, terminal)

    # The base recursion along the trajectory's own states: J at (X_i, t_{i+1}). An index error
    # (J at X_{i+1}, or at t_i) moves the result by far more than the tolerance.
    expected = _lean_recursion(base, obs, traj.xs, terminal)
    np.testing.assert_allclose(adjoints, expected, rtol=F64_RTOL, atol=F64_ATOL)
    for wrong in (dict(state_shift=1), dict(time_shift=0)):
        gap = np.max(np.abs(_lean_recursion(base, obs, traj.xs, terminal, **wrong) - expected))
        assert gap > 1e-3, (wrong, gap)

    # Another fine velocity with the noise that reproduces the same states: the same adjoint.
    other = lambda t, x, obs: obs - 2.0 * x
    xs, ts = np.asarray(traj.xs), np.asarray(traj.ts)
    sigma = np.asarray(qam.memoryless_sigma(ts[:-2], H))
    drift = np.stack([np.asarray(other(ts[i], traj.xs[i], obs)) for i in range(K - 1)])
    xi = (xs[1:-1] - xs[:-2] - H * (2.0 * drift - xs[:-2] / (ts[:-2, None] + H))) / (
        np.sqrt(H) * sigma[:, None]
    )
    same_states = qam.memoryless_sde_sample(
        other, base, obs, noise=jnp.concatenate([noise[:1], jnp.asarray(xi)]), num_steps=K
    )
    np.testing.assert_allclose(same_states.xs, traj.xs, rtol=F64_RTOL, atol=F64_ATOL)
    np.testing.assert_allclose(
        qam.lean_adjoint(base, obs, same_states, terminal), adjoints, rtol=F64_RTOL, atol=F64_ATOL
    )
    # The same fine velocity change with the original noise moves the states, and the adjoint
    # (the base is nonlinear, so its Jacobian follows the states).
    moved = qam.memoryless_sde_sample(other, base, obs, noise=noise, num_steps=K)
    assert np.max(np.abs(qam.lean_adjoint(base, obs, moved, terminal) - adjoints)) > 1e-3
    # The terminal state enters only through the terminal adjoint.
    shifted = qam.SDETrajectory(traj.xs.at[-1].add(1.0), traj.ts)
    np.testing.assert_allclose(
        qam.lean_adjoint(base, obs, shifted, terminal), adjoints, rtol=F64_RTOL, atol=F64_ATOL
    )
    # A different nonlinear base on the same states changes it.
    other_base = _nonlinear_base(w + 0.5 * jax.random.normal(getkey(), (dim, dim)), c)
    assert np.max(np.abs(qam.lean_adjoint(other_base, obs, traj, terminal) - adjoints)) > 1e-3


class _OffsetVelocity(eqx.Module):
    """`v(t, x) = v_B(t, x) + offsets[round(t K)]`: any per-step offset of the base."""

    offsets: jax.Array

    def __call__(self, t, x, obs):
        index = jnp.round(t * K).astype(jnp.int32)
        return gaussian_velocity(0.0, 1.0)(t, x, obs) + self.offsets[index]


def test_loss_zero_and_gradient_zero_at_discrete_optimum(getkey, x64):
    base = gaussian_velocity(0.0, 1.0)
    traj = _trajectory(base, base, 1, getkey())
    adjoints = qam.lean_adjoint(base, None, traj, jnp.array([-1.0]))
    sigma2 = qam.memoryless_sigma(traj.ts[:-1], H) ** 2
    np.testing.assert_allclose(sigma2, SPEC_SIGMA2, rtol=0, atol=10 * SPEC_ATOL)
    optimum = _OffsetVelocity(-0.5 * sigma2[:, None] * adjoints)
    np.testing.assert_allclose(optimum.offsets[:, 0], SPEC_OPTIMUM_CONTROL, rtol=0, atol=SPEC_ATOL)
    loss, grad = eqx.filter_value_and_grad(qam.adjoint_matching_loss)(
        optimum, base, None, traj, adjoints
    )
    # Each residual 2 u / sigma + sigma A cancels to float64 rounding (~1e-15 of sigma |A| ~ 6).
    assert abs(float(loss)) < 1e-24
    np.testing.assert_allclose(grad.offsets, 0.0, atol=1e-12)


def test_loss_value_at_base_velocity(getkey, x64):
    base = gaussian_velocity(0.0, 1.0)
    traj = _trajectory(base, base, 1, getkey())
    adjoints = qam.lean_adjoint(base, None, traj, jnp.array([-1.0]))
    loss = qam.adjoint_matching_loss(base, base, None, traj, adjoints)
    np.testing.assert_allclose(loss, 12.3595366, rtol=0, atol=SPEC_ATOL)


def test_loss_residual_mode_matches_non_residual(getkey, x64):
    base = gaussian_velocity(0.0, 1.0)
    traj = _trajectory(base, base, 1, getkey())
    adjoints = qam.lean_adjoint(base, None, traj, jnp.array([-1.0]))
    offsets = jax.random.normal(getkey(), (K, 1))
    full = _OffsetVelocity(offsets)
    residual = lambda t, x, obs: offsets[jnp.round(t * K).astype(jnp.int32)]
    a = qam.adjoint_matching_loss(full, base, None, traj, adjoints)
    b = qam.adjoint_matching_loss(residual, base, None, traj, adjoints, residual=True)
    np.testing.assert_allclose(a, b, rtol=F64_RTOL)


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
def test_basic_adjoint_equals_autodiff_through_rollout(getkey, x64, residual, scale):
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
    np.testing.assert_allclose(adjoints, expected, rtol=F64_RTOL, atol=F64_ATOL)

    # With the noise held fixed, A_0 is also the gradient w.r.t. the initial noise.
    def cost_of_x0(x0):
        t = qam.memoryless_sde_sample(
            fine, base, obs, noise=noise.at[0].set(x0), num_steps=num_steps, residual=residual
        )
        if scale == 0.0:
            return terminal_cost(t.action)
        return cost(jnp.zeros((num_steps, dim)).at[0].set(x0 - noise[0]))

    np.testing.assert_allclose(
        adjoints[0], jax.grad(cost_of_x0)(noise[0]), rtol=F64_RTOL, atol=F64_ATOL
    )


def test_basic_and_lean_adjoints_differ_by_order_h_for_the_base_without_running_cost(getkey, x64):
    # With v = v_B there is no control; the basic adjoint differs from the lean one only by
    # the time shift and the last step (docs/mathematics.md §1.9, D2/D3): both are O(h) apart,
    # not equal.
    base = gaussian_velocity(0.0, 1.0)
    terminal = jnp.array([-1.0])
    gaps = {}
    for num_steps in (100, 200):
        traj = _trajectory(base, base, 1, getkey(), num_steps=num_steps)
        lean = qam.lean_adjoint(base, None, traj, terminal)
        basic = qam.basic_adjoint(base, base, None, traj, terminal, running_cost_scale=0.0)
        # Away from t = 0 (where the shifted scheme zeroes A_0); float64, so no rounding part.
        start = num_steps // 10
        gaps[num_steps] = float(jnp.max(jnp.abs(lean[start:] - basic[start:])))
    # The gap is 2.16 h (float64): first order, so it halves with h; not zero, not O(1).
    for num_steps, gap in gaps.items():
        assert 1.5 < gap * num_steps < 3.0, gaps
    assert 1.8 < gaps[100] / gaps[200] < 2.2, gaps


@pytest.mark.parametrize("residual", [False, True])
def test_fused_loss_equals_composed_pieces_value_and_gradient(getkey, x64, residual):
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
    np.testing.assert_allclose(l2, l1, rtol=F64_RTOL)
    np.testing.assert_allclose(t2.xs, t1.xs, rtol=F64_RTOL, atol=F64_ATOL)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert a.dtype == b.dtype == jnp.float64
        np.testing.assert_allclose(b, a, rtol=F64_RTOL, atol=F64_ATOL)


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
