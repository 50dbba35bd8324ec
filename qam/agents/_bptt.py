"""Backpropagation through a policy's sampler: loss terms whose gradient reaches the sampling
velocity through every step of the rollout (FBRAC through the Euler ODE, BAM through the
memoryless SDE). Each returns `(loss, metrics)`, like the terms in `qam.agents`.

The randomness is reparameterised: the noise is drawn once (or given) and held fixed, so the
sampled action is a differentiable function of the velocity's parameters. Every other network
is stored (`stop_gradient` on its parameters), but gradients pass through its *inputs*: the
critic's action input, and in the SDE the base velocity's state input.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._flow import ode_sample
from .._misc import stop_gradient_tree
from .._sde import _resolve_batch_noise, memoryless_sde_sample, memoryless_sigma
from .._types import VelocityField
from ..nn import CriticEnsemble
from ._terms import aggregate_q


def ode_bptt_term(
    velocity: VelocityField,
    critic: CriticEnsemble,
    obs: Float[Array, "batch obs"],
    *,
    num_steps: int,
    key: PRNGKeyArray | None = None,
    noise: Float[Array, "batch action"] | None = None,
    action_dim: int | None = None,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Q maximisation by backpropagation through the flow's Euler ODE (FBRAC):

    ```
    y_0 = z_b,  y_{i+1} = y_i + h v(t_i, y_i, s_b),  t_i = i h,  h = 1 / K
    a_b = clip(y_K, -1, 1)
    L   = - mean_b mean_e Q_e(s_b, a_b)
    ```
    differentiated with respect to `velocity` through all `K` steps (`qam.ode_sample`) and
    through the final clip, whose gradient is 0 for every coordinate outside `[-1, 1]`: an
    action pushed past the box stops receiving the critic's gradient in that coordinate. The
    critic is stored (gradients flow through its action input only); ensemble mean, no
    pessimism, no valid weighting.

    **Arguments:** `velocity` (trained), `critic`, the `(B, obs)` observations, `num_steps`
    `K`, and either `noise` (the `(B, D)` initial noises `z_b`) or `key` with `action_dim` `D`
    (then `z = jax.random.normal(key, (B, D))`).

    **Returns:** `(L, {"bptt_q": mean_b mean_e Q_e(s_b, a_b)})`.
    """
    name = "ode_bptt_term"
    batch = obs.shape[0]
    if noise is None:
        if key is None or action_dim is None:
            raise ValueError(f"`{name}` needs `noise=`, or `key=` with `action_dim=`.")
        noise = jax.random.normal(key, (batch, action_dim), obs.dtype)
    elif key is not None:
        raise ValueError(f"`{name}` takes exactly one of `key=` or `noise=`; got both.")
    elif noise.ndim != 2 or noise.shape[0] != batch:
        raise ValueError(
            f"`{name}(noise=...)` must have shape (B, D) = ({batch}, D); got {tuple(noise.shape)}."
        )
    actions = jax.vmap(lambda o, z: ode_sample(velocity, o, noise=z, num_steps=num_steps))(
        obs, noise
    )
    q = jnp.mean(stop_gradient_tree(critic).batched(obs, actions))
    return -q, {"bptt_q": q}


def sde_bptt_term(
    velocity: VelocityField,
    base_velocity: VelocityField,
    critic: CriticEnsemble,
    obs: Float[Array, "batch obs"],
    *,
    num_steps: int,
    inv_temp: float,
    rho: float,
    key: PRNGKeyArray | None = None,
    noise: Float[Array, "batch steps action"] | None = None,
    action_dim: int | None = None,
    residual: bool = False,
    running_cost_scale: float = 1.0,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """BAM's objective, differentiated through the memoryless SDE rollout with the noise held
    fixed (docs/mathematics.md §2):

    ```
    X   = qam.memoryless_sde_sample(v, v_B, s_b, noise=noise_b)     # differentiable in v
    C_i = 2 ||v(t_i, X_i) - v_B(t_i, X_i)||^2 / sigma_i^2,  i < K - 1  (residual: 2 ||v||^2 / ...)
    L = - inv_temp * mean_b [mean_e Q_e(s_b, X_K) - rho std_e Q_e(s_b, X_K)]
        + running_cost_scale * mean_b sum_{i<K-1} C_i
    ```
    with `sigma_i^2 = 2 (1 - t_i + h) / (t_i + h)` and the networks at the unshifted `t_i`. The
    running cost has **no factor h** (the reference's; `running_cost_scale = 1`), so
    `inv_temp = lambda` solves the control problem for the reward `(lambda / K) Q`;
    `running_cost_scale = h` gives the exact discretisation of `int 1/2 ||u||^2 dt`. The reward
    is pessimistic (`std` with ddof 0) and `X_K` is **not** clipped. No valid weighting.

    Gradients: into `velocity`'s parameters, through the states of the rollout. `base_velocity`
    and `critic` are stored, but gradients pass through their inputs (the base's state at the
    last step and in `C_i`, the critic's action), so reverse mode computes the basic discrete
    adjoint (`qam.basic_adjoint` with `running_cost_scale`) and
    `dL/dtheta = mean_b sum_{i<K-1} [2h (d v / d theta)^T A_{i+1} + d C_i / d theta]`.

    Each noisy step's fine velocity is evaluated twice: once by the rollout and once, on the
    returned states, for `C_i` (the rollout returns states, not velocities). With `K = 1` there
    is no noisy step, no running cost, and `velocity` gets no gradient.

    **Arguments:** `velocity` (trained), `base_velocity` (BAM: the EMA behaviour flow),
    `critic` (BAM: the online critic), the `(B, obs)` observations, `num_steps` `K`, `inv_temp`,
    `rho`, and either `noise` (`(B, K, D)`, row 0 of each example the initial noise, rows
    `1 .. K-1` the step noises, as `qam.memoryless_sde_sample`) or `key` with `action_dim`
    (then example `b` uses `jax.random.normal(k_b, (K, D))`, `k_b` the `B` splits of `key`);
    `residual` as in `qam.memoryless_sde_sample`.

    **Returns:** `(L, {"bam_loss": L, "bam_q": mean_b [mean_e Q_e - rho std_e Q_e](X_K),
    "bam_running_cost": running_cost_scale * mean_b sum_i C_i})`.
    """
    name = "sde_bptt_term"
    noise = _resolve_batch_noise(
        name, key, noise, obs.shape[0], action_dim, num_steps, dtype=obs.dtype
    )
    base = stop_gradient_tree(base_velocity)
    trajectories = jax.vmap(
        lambda o, n: memoryless_sde_sample(
            velocity, base, o, noise=n, num_steps=num_steps, residual=residual
        )
    )(obs, noise)

    # Running cost on the noisy steps' states X_0 .. X_{K-2}, differentiable in the states.
    ts = trajectories.ts[0, : num_steps - 1]
    sigma2 = memoryless_sigma(ts, 1.0 / num_steps) ** 2

    def controls(o, xs):
        def control(t, x):
            v = velocity(t, x, o)
            return v if residual else v - base(t, x, o)

        return jax.vmap(control)(ts, xs)

    u = jax.vmap(controls)(obs, trajectories.xs[:, : num_steps - 1])  # (B, K - 1, D)
    costs = 2.0 * jnp.sum(u**2, axis=-1) / sigma2[None, :]  # C_i per example and step
    running = running_cost_scale * jnp.mean(jnp.sum(costs, axis=-1))

    q = stop_gradient_tree(critic).batched(obs, trajectories.action)
    # With rho = 0 the std is left out: its gradient is NaN where the members agree (one member).
    how = "mean" if isinstance(rho, int | float) and rho == 0 else "pessimistic"
    reward = jnp.mean(aggregate_q(q, how=how, rho=rho))
    loss = -inv_temp * reward + running
    return loss, {"bam_loss": loss, "bam_q": reward, "bam_running_cost": running}
