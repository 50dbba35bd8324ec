"""Lean and basic adjoints of the memoryless SDE, and the adjoint matching loss.

Sign convention: the adjoint is the gradient of a *cost* to be minimised, so for the reward
`r(a) = inv_temp * Q(s, a)` the terminal adjoint is `A_K = -inv_temp * dQ/da` at the action.
Time runs from 0 (noise) to 1 (action); the adjoint is integrated backwards, from `t_K = 1` to
`t_0 = 0`. See Domingo-Enrich et al., "Adjoint Matching" (arXiv 2409.08861) and Li et al.,
"Q-learning with Adjoint Matching" (arXiv 2601.14234).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._misc import check_velocity, stop_gradient_tree
from ._sde import (
    SDETrajectory,
    _prepare_rollout,
    _resolve_batch_noise,
    memoryless_sigma,
    memoryless_step,
)
from ._types import Obs, Scalar, VelocityField


def _check_trajectory(
    name: str, trajectory: SDETrajectory, adjoint_name: str, adjoint, obs, **fields
) -> None:
    xs, ts = trajectory.xs, trajectory.ts
    if xs.ndim != 2 or ts.ndim != 1 or xs.shape[0] != ts.shape[0]:
        raise ValueError(
            f"`{name}(..., trajectory=...)` must be a single trajectory with `xs` of shape "
            f"(K + 1, D) and `ts` of shape (K + 1,); got xs {tuple(xs.shape)} and ts "
            f"{tuple(ts.shape)}. For a batch, use `jax.vmap`."
        )
    if xs.shape[0] < 2:
        raise ValueError(
            f"`{name}(..., trajectory=...)` needs at least 1 flow step (K + 1 >= 2 points); "
            f"got {xs.shape[0]} points."
        )
    if adjoint_name == "terminal_adjoint":
        expected = (xs.shape[1],)
    else:
        expected = (xs.shape[0] - 1, xs.shape[1])
    if tuple(adjoint.shape) != expected:
        raise ValueError(
            f"`{name}(..., {adjoint_name}=...)` must have shape {expected} to match the "
            f"trajectory (K = {xs.shape[0] - 1}, D = {xs.shape[1]}); got {tuple(adjoint.shape)}."
        )
    for arg, field in fields.items():
        check_velocity(name, arg, field, obs, xs.shape[1], xs.dtype)


def lean_adjoint(
    base_velocity: VelocityField,
    obs: Obs,
    trajectory: SDETrajectory,
    terminal_adjoint: Float[Array, " action"],
) -> Float[Array, "steps action"]:
    """The lean adjoint of QAM along one trajectory, by the reference backward recursion.

    ```
    A_K = terminal_adjoint                       (usually -inv_temp * dQ/da at X_K)
    f_i(x) = 2 v_B(t_{i+1}, x, obs) - x / t_{i+1}
    A_i = A_{i+1} + h J_{f_i}(X_i)^T A_{i+1},    i = K-1 .. 0
    ```
    One vector-Jacobian product of the *base* drift per step: the base velocity is evaluated at
    the state at the left end of the step, `X_i`, and the *shifted* time `t_{i+1} = t_i + h`
    (the time at which the memoryless drift's `1 / t` is evaluated in the rollout). The step
    `i = K-1` uses the SDE drift at time 1 even though the rollout's last step was the ODE.
    Nothing depends on the fine-tuned velocity and there is no running-cost term: this is the
    continuous lean adjoint `dA/dt = -(d b_B / dx)^T A` discretised as in docs/mathematics.md §1.4.

    With one flow step (`K = 1`, `h = 1`, `t_1 = 1`) the recursion is the single step
    `A_0 = A_1 + (2 J_{v_B}(X_0, 1) - I)^T A_1 = 2 J_{v_B}(X_0, 1)^T A_1`, the Jacobian of the
    base velocity at time 1 taken at the initial noise `X_0`.

    Nothing is differentiated through: `base_velocity`, the trajectory and the result are all
    wrapped in `jax.lax.stop_gradient`.

    **Arguments:**

    - `base_velocity`: the behaviour velocity `v_B(t, x, obs)` used in the rollout.
    - `obs`: the observation.
    - `trajectory`: one `SDETrajectory` (`xs` of shape `(K + 1, D)`).
    - `terminal_adjoint`: `A_K`, shape `(D,)`.

    **Returns:** `A_0 .. A_{K-1}`, shape `(K, D)`, row `i` aligned with `trajectory.xs[i]`.
    """
    _check_trajectory("lean_adjoint", trajectory, "terminal_adjoint", terminal_adjoint, obs,
                      base_velocity=base_velocity)  # fmt: skip
    base = stop_gradient_tree(base_velocity)
    xs = jax.lax.stop_gradient(trajectory.xs)
    ts = jax.lax.stop_gradient(trajectory.ts)

    def step(a_next, inputs):
        x, t_next, h = inputs
        _, vjp = jax.vjp(lambda x_: base(t_next, x_, obs), x)
        (a_dot_dv,) = vjp(a_next)
        a = a_next + h * (2.0 * a_dot_dv - a_next / t_next)
        return a, a

    init = jax.lax.stop_gradient(terminal_adjoint).astype(xs.dtype)
    _, adjoints = jax.lax.scan(step, init, (xs[:-1], ts[1:], jnp.diff(ts)), reverse=True)
    return jax.lax.stop_gradient(adjoints)


def basic_adjoint(
    velocity: VelocityField,
    base_velocity: VelocityField,
    obs: Obs,
    trajectory: SDETrajectory,
    terminal_adjoint: Float[Array, " action"],
    *,
    running_cost_scale: float = 1.0,
    residual: bool = False,
) -> Float[Array, "steps action"]:
    """The basic (exact discrete) adjoint of the memoryless rollout, as in BAM
    (docs/mathematics.md §2).

    It is the gradient, with respect to each state `X_i`, of the cost-to-go
    `J = c_K(X_K) + sum_{j < K-1} C_j(X_j)` of the rollout of `memoryless_sde_sample` with the
    noise held fixed, where `terminal_adjoint = dc_K/da (X_K)` and
    `C_j(x) = running_cost_scale * 2 ||v(t_j, x) - v_B(t_j, x)||^2 / sigma_j^2` (in residual
    mode `v` itself is the difference). So it equals `jax.grad` through the rollout:

    ```
    A_K     = terminal_adjoint
    A_{K-1} = (I + h dv_B/dx (X_{K-1}, t_{K-1}))^T A_K
    A_i     = (I + h d/dx[2 v(t_i, x) - x / (t_i + h)])^T A_{i+1} + dC_i/dx,   at x = X_i
    ```
    Unlike `lean_adjoint`, the Jacobians are of the *fine-tuned* drift at the unshifted time,
    and the running cost enters. `running_cost_scale=1.0` is BAM's cost (no factor `h`);
    `running_cost_scale=h` is the exact discretisation of `int 1/2 ||u||^2 dt`; `0.0` drops it.
    With one flow step (`K = 1`) only the base step is left: `A_0 = (I + dv_B/dx (X_0, 0))^T A_1`
    (no running cost). No gradient flows out of the result.

    **Returns:** `A_0 .. A_{K-1}`, shape `(K, D)`.
    """
    _check_trajectory("basic_adjoint", trajectory, "terminal_adjoint", terminal_adjoint, obs,
                      velocity=velocity, base_velocity=base_velocity)  # fmt: skip
    base = stop_gradient_tree(base_velocity)
    fine = stop_gradient_tree(velocity)
    xs = jax.lax.stop_gradient(trajectory.xs)
    ts = jax.lax.stop_gradient(trajectory.ts)
    num_steps = xs.shape[0] - 1

    def fine_drift_velocity(t, x):
        v = fine(t, x, obs)
        return v + base(t, x, obs) if residual else v

    def control_difference(t, x):
        v = fine(t, x, obs)
        return v if residual else v - base(t, x, obs)

    a_last_next = jax.lax.stop_gradient(terminal_adjoint).astype(xs.dtype)
    _, vjp_last = jax.vjp(lambda x_: base(ts[-2], x_, obs), xs[-2])
    h_last = ts[-1] - ts[-2]
    a_last = a_last_next + h_last * vjp_last(a_last_next)[0]

    def step(a_next, inputs):
        x, t, h = inputs
        sigma = memoryless_sigma(t, h)

        def step_map(x_):
            return x_ + h * (2.0 * fine_drift_velocity(t, x_) - x_ / (t + h))

        def running_cost(x_):
            diff = control_difference(t, x_)
            return running_cost_scale * 2.0 * jnp.sum(diff**2) / sigma**2

        _, vjp = jax.vjp(step_map, x)
        a = vjp(a_next)[0] + jax.grad(running_cost)(x)
        return a, a

    steps = (xs[: num_steps - 1], ts[: num_steps - 1], jnp.diff(ts)[: num_steps - 1])
    _, adjoints = jax.lax.scan(step, a_last, steps, reverse=True)
    return jax.lax.stop_gradient(jnp.concatenate([adjoints, a_last[None]], axis=0))


def adjoint_matching_loss(
    velocity: VelocityField,
    base_velocity: VelocityField,
    obs: Obs,
    trajectory: SDETrajectory,
    adjoint: Float[Array, "steps action"],
    *,
    residual: bool = False,
) -> Scalar:
    """The adjoint matching loss of QAM on one trajectory (docs/mathematics.md §1.5).

    ```
    r_i = 2 (v(t_i, X_i) - v_B(t_i, X_i)) / sigma_i + sigma_i A_i
    L   = sum_{i=0}^{K-1} || r_i ||^2          (sum over steps and dims; no factor h)
    ```
    (in residual mode `r_i = 2 v(t_i, X_i) / sigma_i + sigma_i A_i`), with
    `sigma_i^2 = 2 (1 - t_i + h) / (t_i + h)` and the networks at the unshifted `t_i`. Its
    pointwise minimiser is `v(t_i, x) = v_B(t_i, x) - (sigma_i^2 / 2) E[A_i | X_i = x]`, the
    velocity of the reward-tilted flow in the continuous limit. With one flow step (`K = 1`,
    `sigma_0 = 2`) the loss is the single term `|| (v - v_B)(0, X_0) + 2 A_0 ||^2`.

    Gradients flow only into `velocity`: `base_velocity`, the trajectory and `adjoint` are
    wrapped in `jax.lax.stop_gradient`. Average over a batch at the call site (the reference does
    not weight this loss by the `valid` flags).

    **Arguments:**

    - `velocity`: the trainable fine-tuned velocity (first, for `eqx.filter_grad`).
    - `base_velocity`: the base velocity of the rollout (QAM: the EMA behaviour flow).
    - `obs`: the observation.
    - `trajectory`: the `SDETrajectory` the adjoint was computed on.
    - `adjoint`: `A_0 .. A_{K-1}` from `lean_adjoint`, shape `(K, D)`.
    - `residual`: whether `velocity` parametrises `v_fine - v_B`.

    **Returns:** the scalar loss for this trajectory.
    """
    _check_trajectory("adjoint_matching_loss", trajectory, "adjoint", adjoint, obs,
                      velocity=velocity, base_velocity=base_velocity)  # fmt: skip
    xs = jax.lax.stop_gradient(trajectory.xs[:-1])
    ts = jax.lax.stop_gradient(trajectory.ts)
    adjoint = jax.lax.stop_gradient(adjoint)
    t, h = ts[:-1], jnp.diff(ts)
    sigma = memoryless_sigma(t, h)[:, None]
    v = jax.vmap(velocity, in_axes=(0, 0, None))(t, xs, obs)
    if residual:
        control = v
    else:
        base = stop_gradient_tree(base_velocity)
        control = v - jax.vmap(base, in_axes=(0, 0, None))(t, xs, obs)
    residuals = 2.0 * control / sigma + sigma * adjoint
    return jnp.sum(residuals**2)


def fused_adjoint_matching_loss(
    velocity: VelocityField,
    base_velocity: VelocityField,
    obs: Obs,
    terminal_adjoint_fn: Callable[[Float[Array, " action"]], Float[Array, " action"]],
    *,
    key: PRNGKeyArray | None = None,
    action_dim: int | None = None,
    num_steps: int = 10,
    noise: Float[Array, "steps action"] | None = None,
    residual: bool = False,
) -> tuple[Scalar, SDETrajectory]:
    """Rollout, lean adjoint and adjoint matching loss in one pass, evaluating every network
    once per input.

    Computes exactly `adjoint_matching_loss(velocity, base_velocity, obs, traj, A)` with
    `traj = memoryless_sde_sample(velocity, base_velocity, obs, ...)` (on the same `key` or
    `noise`) and `A = lean_adjoint(base_velocity, obs, traj, terminal_adjoint_fn(traj.action))`,
    and has the same gradient with respect to `velocity`; but the fine velocity's evaluations
    `v(t_i, X_i)` made by the rollout are the ones the loss differentiates (the states are held
    by `jax.lax.stop_gradient`, so reverse mode stores one set of activations per step and never
    re-runs the network), and the base's last-step evaluation `v_B(t_{K-1}, X_{K-1})` is shared
    by the rollout and the loss. Use it for training; use the composed functions to inspect the
    pieces.

    **Arguments:** as `memoryless_sde_sample`, plus `terminal_adjoint_fn`, mapping the
    (unclipped) action `X_K` to the terminal adjoint `A_K` (e.g.
    `lambda a: -inv_temp * jax.grad(q)(a)`); it is evaluated without gradient.

    **Returns:** `(loss, trajectory)`; gradients flow only into `velocity`.
    """
    noise, h, ts, base = _prepare_rollout(
        "fused_adjoint_matching_loss", key, noise, action_dim, num_steps, base_velocity
    )
    for arg, field in (("velocity", velocity), ("base_velocity", base)):
        check_velocity("fused_adjoint_matching_loss", arg, field, obs, noise.shape[1], noise.dtype)
    trajectory, controls = _fused_rollout(velocity, base, obs, noise, h, ts, residual=residual)
    terminal = jax.lax.stop_gradient(terminal_adjoint_fn(trajectory.action))
    return _fused_loss(base, obs, trajectory, controls, terminal), trajectory


def fused_adjoint_matching_batch_loss(
    velocity: VelocityField,
    base_velocity: VelocityField,
    obs: Float[Array, "batch obs"],
    terminal_adjoint_fn: Callable[[Float[Array, "batch action"]], Float[Array, "batch action"]],
    *,
    key: PRNGKeyArray | None = None,
    action_dim: int | None = None,
    num_steps: int = 10,
    noise: Float[Array, "batch steps action"] | None = None,
    residual: bool = False,
) -> tuple[Scalar, SDETrajectory]:
    """`fused_adjoint_matching_loss` for a batch, averaged over it: the training path.

    Equals `mean_b fused_adjoint_matching_loss(velocity, base_velocity, obs_b, ...)` with the
    per-example keys `jax.random.split(key, B)` (or the rows of `noise`), but the terminal
    adjoints of the whole batch come from one call `terminal_adjoint_fn(X_K)` on the `(B, D)`
    actions between the rollouts and the loss, so a critic ensemble is evaluated once, batched
    (e.g. `lambda a: -inv_temp * jax.grad(lambda a: jnp.sum(q_mean(obs, a)))(a)`); it is
    evaluated without gradient.

    **Returns:** `(mean_b loss_b, trajectories)` with a leading batch axis on the trajectories;
    gradients flow only into `velocity`.
    """
    if obs.ndim != 2:
        raise ValueError(
            "`fused_adjoint_matching_batch_loss(obs=...)` must be a batch of flat observations "
            f"of shape (B, obs); got shape {tuple(obs.shape)}."
        )
    name = "fused_adjoint_matching_batch_loss"
    noise = _resolve_batch_noise(name, key, noise, obs.shape[0], action_dim, num_steps)
    _, h, ts, base = _prepare_rollout(name, None, noise[0], action_dim, num_steps, base_velocity)
    for arg, field in (("velocity", velocity), ("base_velocity", base)):
        check_velocity(name, arg, field, obs[0], noise.shape[2], noise.dtype)
    trajectories, controls = jax.vmap(
        lambda o, n: _fused_rollout(velocity, base, o, n, h, ts, residual=residual)
    )(obs, noise)
    terminal = jax.lax.stop_gradient(terminal_adjoint_fn(trajectories.action))
    if terminal.shape != trajectories.action.shape:
        raise ValueError(
            f"`{name}(terminal_adjoint_fn=...)` must map the ({obs.shape[0]}, D) actions to "
            f"adjoints of the same shape; got {tuple(terminal.shape)}."
        )
    losses = jax.vmap(_fused_loss, in_axes=(None, 0, 0, 0, 0))(
        base, obs, trajectories, controls, terminal
    )
    return jnp.mean(losses), trajectories


def _fused_rollout(
    velocity: VelocityField,
    base: VelocityField,
    obs: Obs,
    noise: Float[Array, "steps action"],
    h: float,
    ts: Float[Array, " steps_plus_one"],
    *,
    residual: bool,
) -> tuple[SDETrajectory, Float[Array, "steps action"]]:
    """First half of `fused_adjoint_matching_loss`: the rollout (no gradient through the
    states) and the controls `u_i = v_theta(t_i, X_i) - v_B(t_i, X_i)` (`v_theta` when
    `residual`) at its points, differentiable in `velocity`'s parameters. `base` is already
    frozen. Split from the loss so a caller can compute the terminal adjoints of a whole batch
    at once (e.g. with `CriticEnsemble.batched`) between the two halves."""
    num_steps = noise.shape[0]

    def control(v, x, t):
        return v if residual else v - base(t, x, obs)

    def step(x, inputs):
        t, xi = inputs
        x = jax.lax.stop_gradient(x)
        v = velocity(t, x, obs)  # differentiable in the velocity's parameters only
        drift_v = jax.lax.stop_gradient(v + base(t, x, obs) if residual else v)
        return memoryless_step(x, drift_v, t, h, xi), (x, control(v, x, t))

    x_last, (xs, controls) = jax.lax.scan(step, noise[0], (ts[: num_steps - 1], noise[1:]))
    x_last = jax.lax.stop_gradient(x_last)
    t_last = ts[num_steps - 1]
    v_base_last = base(t_last, x_last, obs)
    action = jax.lax.stop_gradient(x_last + h * v_base_last)
    v_last = velocity(t_last, x_last, obs)
    control_last = v_last if residual else v_last - v_base_last
    trajectory = SDETrajectory(
        xs=jax.lax.stop_gradient(jnp.concatenate([xs, x_last[None], action[None]], axis=0)), ts=ts
    )
    return trajectory, jnp.concatenate([controls, control_last[None]], axis=0)


def _fused_loss(
    base: VelocityField,
    obs: Obs,
    trajectory: SDETrajectory,
    controls: Float[Array, "steps action"],
    terminal_adjoint: Float[Array, " action"],
) -> Scalar:
    """Second half of `fused_adjoint_matching_loss`: the lean adjoint from `terminal_adjoint`
    (no gradient) and `sum_i || 2 u_i / sigma_i + sigma_i A_i ||^2`."""
    num_steps = controls.shape[0]
    sigmas = memoryless_sigma(trajectory.ts[:-1], 1.0 / num_steps)
    adjoint = lean_adjoint(base, obs, trajectory, terminal_adjoint)
    residuals = 2.0 * controls / sigmas[:, None] + sigmas[:, None] * adjoint
    return jnp.sum(residuals**2)
