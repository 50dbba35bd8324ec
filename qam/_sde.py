"""The memoryless SDE of QAM and its reference (K-step) discretisation.

Time runs from `t = 0` (Gaussian noise) to `t = 1` (the action). With the linear flow path
`X_t = (1 - t) X_0 + t X_1`, the memoryless SDE with the same marginals as the flow is

$$dX = \\big(2 v(X, t) - X / t\\big)\\,dt + \\sigma(t)\\,dW, \\qquad \\sigma(t)^2 = 2 (1 - t) / t.$$

The reference scheme (docs/mathematics.md §1.2) uses a grid `t_i = i h`, `h = 1 / K`, shifts the
singular `1 / t` terms by one step (`t_i + h` in place of `t_i`), takes `K - 1` noisy
Euler-Maruyama steps with the fine-tuned velocity and one last deterministic Euler step with the
*base* velocity:

```
X_0 ~ N(0, I)
X_{i+1} = X_i + h (2 v(t_i, X_i) - X_i / (t_i + h)) + sqrt(h) sigma_i xi_i,   i = 0 .. K-2
X_K     = X_{K-1} + h v_B(t_{K-1}, X_{K-1})
sigma_i^2 = 2 (1 - t_i + h) / (t_i + h)
```

Any `K >= 1` works. With one flow step (`K = 1`, `h = 1`, as in the paper's sensitivity study)
there are `K - 1 = 0` noisy steps: the rollout is the single deterministic base step
`X_1 = X_0 + v_B(0, X_0)`, and the fine-tuned velocity enters only the loss and deployment.
"""

from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax
from jaxtyping import Array, ArrayLike, DTypeLike, Float, PRNGKeyArray

from ._misc import check_num_steps, check_velocity, stop_gradient_tree
from ._types import Obs, VelocityField


class SDETrajectory(eqx.Module):
    """One rollout of the memoryless SDE on the grid `ts = linspace(0, 1, K + 1)`.

    **Fields:**

    - `xs`: shape `(K + 1, D)`. `xs[0]` is the initial Gaussian noise `X_0` (time 0), `xs[i]`
        the state at time `t_i = i / K`, and `xs[-1]` the (unclipped) action `X_K` (time 1).
    - `ts`: shape `(K + 1,)`, the times `t_0 = 0, ..., t_K = 1`.

    A batch of trajectories (from `jax.vmap(memoryless_sde_sample)`) is an `SDETrajectory`
    whose arrays carry a leading batch axis.
    """

    xs: Float[Array, "points action"]
    ts: Float[Array, " points"]

    @property
    def action(self) -> Float[Array, "... action"]:
        """The terminal state `X_K` (the unclipped action)."""
        return self.xs[..., -1, :]

    @property
    def num_steps(self) -> int:
        """The number of flow steps `K`."""
        return self.ts.shape[-1] - 1


def memoryless_sigma(
    t: Float[ArrayLike, "*shape"], step_size: Float[ArrayLike, "*shape"] | float
) -> Float[Array, "*shape"]:
    """The shifted memoryless noise level of the reference scheme,
    `sigma(t) = sqrt(2 (1 - t + h) / (t + h))` with `h = step_size`.

    At the grid points `t_i = i h` this is `sigma_i` of docs/mathematics.md §1.2; the shift by `h`
    keeps it finite at `t = 0` (`sigma_0^2 = 2 (1 + h) / h`).
    """
    t = jnp.asarray(t)
    return jnp.sqrt(2.0 * (1.0 - t + step_size) / (t + step_size))


def memoryless_step(x: Array, v: Array, t: Array, h: float, xi: Array) -> Array:
    """One noisy step of the reference scheme:
    `x + h (2 v - x / (t + h)) + sqrt(h) sigma(t) xi` with the shifted `sigma` above."""
    return x + h * (2.0 * v - x / (t + h)) + jnp.sqrt(h) * memoryless_sigma(t, h) * xi


def time_grid(num_steps: int, dtype: DTypeLike = jnp.float32) -> Float[Array, " points"]:
    """The flow-time grid `t_i = i / K`, `i = 0 .. K` (shape `(K + 1,)`)."""
    return jnp.arange(num_steps + 1, dtype=dtype) / num_steps


def _resolve_noise(
    name: str,
    key: PRNGKeyArray | None,
    noise: Array | None,
    action_dim: int | None,
    num_rows: int,
) -> Array:
    if noise is None:
        if key is None:
            raise ValueError(f"`{name}` needs either `key=` or `noise=`; got neither.")
        if action_dim is None:
            raise ValueError(
                f"`{name}(..., key=...)` needs `action_dim=` (the flat action size D) to draw "
                "the noise; got action_dim=None."
            )
        if not isinstance(action_dim, int) or action_dim < 1:
            raise ValueError(
                f"`{name}(..., action_dim=...)` must be a positive int; got {action_dim!r}."
            )
        return jax.random.normal(key, (num_rows, action_dim))
    if key is not None:
        raise ValueError(f"`{name}` takes `key=` or `noise=`, not both.")
    if noise.ndim != 2 or noise.shape[0] != num_rows:
        raise ValueError(
            f"`{name}(..., noise=...)` must have shape (num_steps, action_dim) = ({num_rows}, D); "
            f"got shape {tuple(noise.shape)}."
        )
    if action_dim is not None and noise.shape[1] != action_dim:
        raise ValueError(
            f"`{name}(..., noise=...)` has action dimension {noise.shape[1]} but "
            f"`action_dim={action_dim}`."
        )
    return noise


def _resolve_batch_noise(
    name: str,
    key: PRNGKeyArray | None,
    noise: Array | None,
    batch: int,
    action_dim: int | None,
    num_steps: int,
    dtype: Any = None,
) -> Array:
    """The `(B, K, D)` noise of `B` rollouts: `noise` checked, or row block `b` drawn as
    `jax.random.normal(k_b, (K, D))` with `k_b` the `B` splits of `key` (each example's noise
    exactly as a single rollout on key `k_b` draws it; `dtype` None: the default float)."""
    check_num_steps(name, num_steps)
    if noise is None:
        if key is None:
            raise ValueError(f"`{name}` needs either `key=` or `noise=`; got neither.")
        if not isinstance(action_dim, int) or isinstance(action_dim, bool) or action_dim < 1:
            raise ValueError(
                f"`{name}(..., key=...)` needs `action_dim=` (the flat action size D), a positive "
                f"int, to draw the noise; got action_dim={action_dim!r}."
            )
        shape, dtype = (num_steps, action_dim), float if dtype is None else dtype
        return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(jax.random.split(key, batch))
    if key is not None:
        raise ValueError(f"`{name}` takes `key=` or `noise=`, not both.")
    if noise.ndim != 3 or noise.shape[:2] != (batch, num_steps):
        raise ValueError(
            f"`{name}(noise=...)` must have shape (B, num_steps, D) = ({batch}, {num_steps}, D); "
            f"got {tuple(noise.shape)}."
        )
    return noise


def _prepare_rollout(name, key, noise, action_dim, num_steps, base_velocity):
    """Shared argument checks and set-up of the memoryless rollouts: the `(K, D)` noise, the
    step `h = 1 / K`, the grid `t_0 .. t_K` and the frozen base velocity."""
    check_num_steps(name, num_steps)
    noise = _resolve_noise(name, key, noise, action_dim, num_steps)
    ts = time_grid(num_steps, noise.dtype)
    return noise, 1.0 / num_steps, ts, stop_gradient_tree(base_velocity)


def memoryless_sde_sample(
    velocity: VelocityField,
    base_velocity: VelocityField,
    obs: Obs,
    *,
    key: PRNGKeyArray | None = None,
    action_dim: int | None = None,
    num_steps: int = 10,
    noise: Float[Array, "steps action"] | None = None,
    solver: diffrax.AbstractSolver | None = None,
    residual: bool = False,
) -> SDETrajectory:
    """Sample one trajectory of the memoryless SDE (the reference discretisation).

    ```
    X_0 = noise[0]  (~ N(0, I))
    X_{i+1} = X_i + h (2 v_i - X_i / (t_i + h)) + sqrt(h) sigma_i noise[i + 1],  i = 0 .. K-2
    X_K = X_{K-1} + h v_B(t_{K-1}, X_{K-1}, obs)       (deterministic, base velocity)
    ```
    with `h = 1 / K`, `t_i = i h`, `sigma_i^2 = 2 (1 - t_i + h) / (t_i + h)` and
    `v_i = velocity(t_i, X_i, obs)` (or `velocity + base_velocity` when `residual=True`). The
    networks see the unshifted time `t_i`; the shift by `h` appears only in `X / (t + h)` and
    `sigma`. `X_K` is not clipped.

    Gradients flow through `velocity`, the states and the noise (so backpropagation through the
    rollout, as BAM does, works); `base_velocity` is wrapped in `jax.lax.stop_gradient`, so its
    parameters receive no gradient, though gradients pass through its inputs. QAM does not need
    these gradients: `adjoint_matching_loss` stops them.

    **Arguments:**

    - `velocity`: the fine-tuned velocity `v_theta(t, x, obs)`.
    - `base_velocity`: the behaviour velocity `v_B(t, x, obs)` (QAM: the EMA behaviour flow).
    - `obs`: the observation (any pytree), passed to both fields.
    - `key`: a PRNG key; draws `noise` as `jax.random.normal(key, (K, D))`. Give `key` or
        `noise`, not both.
    - `action_dim`: the flat action dimension `D` (needed with `key`).
    - `num_steps`: `K >= 1`. At `K = 1` there is no noisy step: `X_1 = X_0 + v_B(0, X_0, obs)`
        and `velocity` does not enter the rollout.
    - `noise`: shape `(K, D)`: row 0 is `X_0`, rows `1 .. K-1` the standard normal step noises
        `xi_0 .. xi_{K-2}` (none at `K = 1`). Two implementations fed the same `noise` follow
        the same path.
    - `solver`: `None` for the built-in loop, or a diffrax solver (e.g. `diffrax.Euler()`):
        the noisy part is then solved by `diffrax.diffeqsolve` on the same grid with a Brownian
        path whose increments are exactly `sqrt(h) xi_i`, and the last step by the same solver
        on the base ODE. `diffrax.Euler()` agrees with the built-in loop to float precision.
    - `residual`: if `True`, `velocity` parametrises `v_fine - v_B` and the rollout uses
        `velocity + base_velocity`.

    **Returns:** an `SDETrajectory` with `xs` of shape `(K + 1, D)` and `ts = linspace(0, 1, K+1)`.

    Batch over observations with `jax.vmap` (bind keyword arguments with `functools.partial`).
    """
    noise, h, ts, base = _prepare_rollout(
        "memoryless_sde_sample", key, noise, action_dim, num_steps, base_velocity
    )
    for arg, field in (("velocity", velocity), ("base_velocity", base)):
        check_velocity("memoryless_sde_sample", arg, field, obs, noise.shape[1], noise.dtype)

    def drift_velocity(t, x):
        v = velocity(t, x, obs)
        return v + base(t, x, obs) if residual else v

    x0 = noise[0]
    if solver is None:

        def step(x, inputs):
            t, xi = inputs
            x_next = memoryless_step(x, drift_velocity(t, x), t, h, xi)
            return x_next, x_next

        x_last, xs_noisy = jax.lax.scan(step, x0, (ts[: num_steps - 1], noise[1:]))
        xs = jnp.concatenate([x0[None], xs_noisy], axis=0)
        action = x_last + h * base(ts[num_steps - 1], x_last, obs)
    else:
        xs, action = _diffrax_rollout(drift_velocity, base, obs, noise, ts, h, solver)
    return SDETrajectory(xs=jnp.concatenate([xs, action[None]], axis=0), ts=ts)


def _diffrax_rollout(drift_velocity, base, obs, noise, ts, h, solver):
    num_steps = ts.shape[0] - 1
    if num_steps == 1:  # no noisy step: only the deterministic base step from X_0
        return noise[:1], _diffrax_last_step(base, obs, noise[0], ts, solver)
    dim = noise.shape[1]
    grid = ts[:num_steps]  # t_0 .. t_{K-1}: the noisy part runs on [0, t_{K-1}]
    # A Brownian path through the given increments: W(t_i) = sqrt(h) * sum_{j < i} xi_j, linear
    # in between, so each solver step on the grid sees exactly sqrt(h) * xi_i.
    knots = jnp.concatenate([jnp.zeros((1, dim), noise.dtype), jnp.sqrt(h) * noise[1:]], axis=0)
    brownian = diffrax.LinearInterpolation(ts=grid, ys=jnp.cumsum(knots, axis=0))
    drift = diffrax.ODETerm(lambda t, x, _: 2.0 * drift_velocity(t, x) - x / (t + h))
    diffusion = diffrax.ControlTerm(
        lambda t, x, _: lineax.DiagonalLinearOperator(
            jnp.broadcast_to(memoryless_sigma(t, h), x.shape).astype(x.dtype)
        ),
        brownian,
    )
    sol = diffrax.diffeqsolve(
        diffrax.MultiTerm(drift, diffusion),
        solver,
        t0=grid[0],
        t1=grid[-1],
        dt0=None,
        y0=noise[0],
        saveat=diffrax.SaveAt(ts=grid),
        stepsize_controller=diffrax.StepTo(ts=grid),
        max_steps=num_steps,
    )
    xs = sol.ys
    assert xs is not None
    return xs, _diffrax_last_step(base, obs, xs[-1], ts, solver)


def _diffrax_last_step(base, obs, x_last, ts, solver):
    """The deterministic last step `X_K = X_{K-1} + h v_B(t_{K-1}, X_{K-1})` by `solver`."""
    num_steps = ts.shape[0] - 1
    last = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, x, args: base(t, x, args)),
        solver,
        t0=ts[num_steps - 1],
        t1=ts[num_steps],
        dt0=None,
        y0=x_last,
        args=obs,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.StepTo(ts=ts[num_steps - 1 :]),
        max_steps=1,
    )
    assert last.ys is not None
    return last.ys[0]
