"""Flow matching for the behaviour policy, and deterministic (Euler or diffrax) ODE sampling.

Linear path: `X_t = (1 - t) X_0 + t X_1`, `X_0 ~ N(0, I)` at `t = 0` (noise) and `X_1` the
action at `t = 1`; the target velocity is `X_1 - X_0`.
"""

import diffrax
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._misc import check_velocity
from ._sde import _resolve_noise, time_grid
from ._types import Obs, Scalar, VelocityField


def flow_matching_loss(
    velocity: VelocityField,
    obs: Obs,
    action: Float[Array, " action"],
    *,
    key: PRNGKeyArray,
) -> Scalar:
    """The behaviour-cloning flow-matching loss for one (observation, action) pair.

    ```
    t ~ U[0, 1),  x_0 ~ N(0, I),  x_t = (1 - t) x_0 + t x_1,  x_1 = action
    L = mean_d ( v(t, x_t, obs) - (x_1 - x_0) )_d^2
    ```
    (a mean over action dimensions, as in the reference, unlike the sum in the adjoint matching
    loss). Gradients flow into `velocity`. Weight (e.g. by `valid`) and average over a batch at
    the call site.
    """
    if action.ndim != 1:
        raise ValueError(
            f"`flow_matching_loss(..., action=...)` must be one flat action of shape (D,); got "
            f"shape {tuple(action.shape)}. For a batch, use `jax.vmap`."
        )
    check_velocity("flow_matching_loss", "velocity", velocity, obs, action.shape[0], action.dtype)
    t_key, noise_key = jax.random.split(key)
    t = jax.random.uniform(t_key, (), dtype=action.dtype)
    x0 = jax.random.normal(noise_key, action.shape, dtype=action.dtype)
    xt = (1.0 - t) * x0 + t * action
    return jnp.mean((velocity(t, xt, obs) - (action - x0)) ** 2)


def ode_sample(
    velocity: VelocityField,
    obs: Obs,
    *,
    key: PRNGKeyArray | None = None,
    noise: Float[Array, " action"] | None = None,
    action_dim: int | None = None,
    num_steps: int = 10,
    solver: diffrax.AbstractSolver | None = None,
    clip: bool = True,
) -> Float[Array, " action"]:
    """Sample an action by integrating the flow ODE `dx/dt = v(t, x, obs)` from `t = 0` to 1.

    Built-in: `K` Euler steps `y_{i+1} = y_i + h v(t_i, y_i, obs)`, `h = 1 / K`, from
    `y_0 = noise` (`~ N(0, I)`), then a clip to `[-1, 1]` if `clip`. With `solver` a diffrax
    solver, the same grid is integrated by `diffrax.diffeqsolve` (`diffrax.Euler()` agrees with
    the built-in loop). Gradients flow through `velocity` and `noise` (as one-step distillation
    needs); wrap the call in `jax.lax.stop_gradient` for a fixed teacher.

    **Arguments:**

    - `velocity`: `v(t, x, obs)`.
    - `obs`: the observation.
    - `key` or `noise`: where the initial noise comes from (`noise` has shape `(D,)`).
    - `action_dim`: `D`, needed with `key`.
    - `num_steps`: `K >= 1`.
    - `solver`: `None` or a diffrax solver.
    - `clip`: clip the result to `[-1, 1]`.

    **Returns:** the action, shape `(D,)`.
    """
    name = "ode_sample"
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"`{name}(..., num_steps=...)` must be a positive int; got {num_steps!r}.")
    if noise is not None and noise.ndim != 1:
        raise ValueError(
            f"`{name}(..., noise=...)` must have shape (D,); got shape {tuple(noise.shape)}."
        )
    x0 = _resolve_noise(name, key, None if noise is None else noise[None], action_dim, 1)[0]
    check_velocity(name, "velocity", velocity, obs, x0.shape[0], x0.dtype)
    ts = time_grid(num_steps, x0.dtype)
    h = 1.0 / num_steps
    if solver is None:

        def step(x, t):
            return x + h * velocity(t, x, obs), None

        x1, _ = jax.lax.scan(step, x0, ts[:-1])
    else:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, x, args: velocity(t, x, args)),
            solver,
            t0=ts[0],
            t1=ts[-1],
            dt0=None,
            y0=x0,
            args=obs,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.StepTo(ts=ts),
            max_steps=num_steps,
        )
        assert sol.ys is not None
        x1 = sol.ys[0]
    return jnp.clip(x1, -1.0, 1.0) if clip else x1
