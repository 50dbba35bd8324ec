"""Critic-gradient guidance of a behaviour-cloning flow (CGQL and its noisy-critic variants).

Three building blocks:

- a **time-conditioned critic** `Q_e(s, a, t)`: a `qam.nn.CriticEnsemble` built for `D + 1`
  action inputs and called on `concat(a, t)` (so its MLP sees `concat(s, a, t)`, `t` a raw
  scalar); `t = 1` is the clean-action critic, `t < 1` a critic of the noisy flow state;
- `guided_ode_sample` / `guided_ode_actions`: the Euler ODE of a base flow with the critic's
  action gradient added to the velocity (classifier guidance with `Q` as the classifier);
- `noisy_critic_term` (with `linex_loss`): regression of the critic at noisy flow states onto
  the clean-action target critic, with a squared or a linex loss.

Flow time runs from `t = 0` (noise `x_0 ~ N(0, I)`) to `t = 1` (the action), the linear path
`x_t = (1 - t) x_0 + t x_1` of `qam.flow_matching_loss`.
"""

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._misc import check_num_steps, check_velocity, stop_gradient_tree
from .._sde import time_grid
from .._types import VelocityField
from ..nn import CriticEnsemble


CriticTime = Literal["one", "flow"]
NoisyLoss = Literal["mse", "linex"]


def time_conditioned_q(
    critic: CriticEnsemble,
    obs: Float[Array, " obs"],
    action: Float[Array, " action"],
    t: Float[ArrayLike, ""],
) -> Float[Array, " ensemble"]:
    """`Q_e(s, a, t)` for one example: `critic(s, concat(a, t))`, the ensemble's `E` values.

    `critic` must be a `CriticEnsemble` built with action size `D + 1`; `t` is cast to the
    action's dtype."""
    t = jnp.asarray(t, dtype=action.dtype)
    return critic(obs, jnp.concatenate([action, t[None]]))


def time_conditioned_q_batched(
    critic: CriticEnsemble,
    obs: Float[Array, "batch obs"],
    actions: Float[Array, "batch action"],
    t: Float[Array, " batch"],
) -> Float[Array, "batch ensemble"]:
    """`Q_e(s_b, a_b, t_b)` for a batch, through `CriticEnsemble.batched` (same values as
    `jax.vmap(time_conditioned_q)`)."""
    t = t.astype(actions.dtype)
    return critic.batched(obs, jnp.concatenate([actions, t[:, None]], axis=-1))


def guided_ode_sample(
    velocity: VelocityField,
    critic: CriticEnsemble,
    obs: Float[Array, " obs"],
    *,
    noise: Float[Array, " action"],
    num_steps: int,
    guidance_coef: float | Float[Array, ""],
    inv_temp: float,
    critic_time: CriticTime = "one",
    clip: bool = True,
) -> Float[Array, " action"]:
    """One action from the critic-gradient guided Euler ODE of a base flow.

    ```
    x_0 = noise,  h = 1/K,  t_i = i h
    for i = 0 .. K-1:
        v_i = velocity(t_i, x_i, s)
        if inv_temp > 0 and i > 0:
            g_i = d/dx mean_e Q_e(s, x, c_i) at x = x_i    c_i = 1 ("one") or t_i ("flow")
            v_i = v_i + guidance_coef * (inv_temp (1 - t_i) g_i + x_i) / t_i
        x_{i+1} = x_i + h v_i
    return clip(x_K, -1, 1)          (the only clip; x_i enters the critic unclipped)
    ```

    The added field is `theta = guidance_coef` times the velocity `(x + (1 - t) score) / t` of
    the linear path whose noisy-action score is approximated by `lambda grad Q`
    (`lambda = inv_temp`). Step 0 has no guidance (the `1/t` is infinite there); with
    `inv_temp = 0` the loop is the plain Euler ODE of `velocity` (`qam.ode_sample`).

    **The `x/t` term moves samples even where `grad Q = 0`.** On its own it multiplies the
    state (about the origin, not about the behaviour mean) at step `i >= 1` by
    `1 + theta / i` on top of the base step, so over `K` steps the sample is scaled by about
    `prod_{i=1}^{K-1} (1 + theta / i)`: for a `N(0, s^2)` base and `K = 10`, the output's scale
    relative to `theta = 0` is x1.030 at `theta = 0.01`, x1.34 at `theta = 0.1` and x10.8 at
    `theta = 1` (`s^2 = 1`; x1.38 and x14.3 at `s^2 = 0.04`), before the final clip.

    **Arguments:**

    - `velocity`: the base flow `v(t, x, obs)` (CGQL: the EMA behaviour flow), called as is.
    - `critic`: a time-conditioned `CriticEnsemble` (action size `D + 1`); pass it stored
      (`stop_gradient_tree`): only the gradient with respect to `x` is used.
    - `noise`: `x_0`, shape `(D,)`.
    - `num_steps`: `K >= 1`.
    - `guidance_coef`: `theta` (may be a traced scalar); `inv_temp`: `lambda`, a Python
      float `>= 0` (0 turns guidance off).
    - `critic_time`: `"one"` evaluates the clean-action critic `Q(s, x_i, 1)` on the noisy
      state (CGQL "simple"); `"flow"` the noisy critic `Q(s, x_i, t_i)` (CGQL-MSE, -Linex).
    - `clip`: clip the result to `[-1, 1]`.
    """
    name = "guided_ode_sample"
    check_num_steps(name, num_steps)
    if noise.ndim != 1:
        raise ValueError(
            f"`{name}(..., noise=...)` must have shape (D,); got shape {tuple(noise.shape)}. "
            "For a batch, use `guided_ode_actions`."
        )
    if critic_time not in ("one", "flow"):
        raise ValueError(f"`{name}(..., critic_time=...)` must be 'one' or 'flow'; got "
                         f"{critic_time!r}.")  # fmt: skip
    if not inv_temp >= 0:
        raise ValueError(f"`{name}(..., inv_temp=...)` must be >= 0; got {inv_temp!r}.")
    check_velocity(name, "velocity", velocity, obs, noise.shape[0], noise.dtype)
    h = 1.0 / num_steps
    ts = time_grid(num_steps, noise.dtype)

    def mean_q(x, c):
        return jnp.mean(time_conditioned_q(critic, obs, x, c))

    def plain_step(x, t):
        return x + h * velocity(t, x, obs), None

    def guided_step(x, t):
        v = velocity(t, x, obs)
        c = t if critic_time == "flow" else jnp.ones_like(t)
        g = jax.grad(mean_q)(x, c)
        v = v + guidance_coef * (inv_temp * (1.0 - t) * g + x) / t
        return x + h * v, None

    # Step 0 (t = 0) is never guided; steps 1 .. K-1 are when inv_temp > 0.
    x, _ = plain_step(noise, ts[0])
    x, _ = jax.lax.scan(guided_step if inv_temp > 0 else plain_step, x, ts[1:-1])
    return jnp.clip(x, -1.0, 1.0) if clip else x


def guided_ode_actions(
    velocity: VelocityField,
    critic: CriticEnsemble,
    obs: Float[Array, "batch obs"],
    noise: Float[Array, "batch action"],
    *,
    num_steps: int,
    guidance_coef: float | Float[Array, ""],
    inv_temp: float,
    critic_time: CriticTime = "one",
    clip: bool = True,
) -> Float[Array, "batch action"]:
    """`guided_ode_sample` for a batch: row `b` from `(s_b, z_b)`. The critic gradient is
    per example (the gradient of `sum_b mean_e Q_e(s_b, x_b, c)` with respect to `x`)."""
    return jax.vmap(
        lambda o, z: guided_ode_sample(
            velocity, critic, o, noise=z, num_steps=num_steps, guidance_coef=guidance_coef,
            inv_temp=inv_temp, critic_time=critic_time, clip=clip,
        )
    )(obs, noise)  # fmt: skip


def linex_loss(
    pred: Float[Array, "*shape"],
    target: Float[Array, "*shape"],
    *,
    inv_temp: float,
    clip: float,
) -> Float[Array, "*shape"]:
    """The elementwise linex loss of a prediction `q` against a target `q~`, with a linear
    branch for large under-estimates:

    ```
    delta = lambda (q~ - q)
    loss  = exp(delta) + lambda q    if delta <= clip
          = delta                    if delta >  clip
    ```
    `exp(delta) + lambda q = [exp(delta) - delta - 1] + lambda q~ + 1`: up to a term constant in
    `q` it is the linex divergence, minimised at `q = q~`; over a distribution of targets its
    minimiser is the log-partition `(1/lambda) log E[exp(lambda q~)]` (while no sample crosses
    the switch). The linear branch is **not slope-matched**: its derivative in `q` is
    `-lambda`, against `-lambda (exp(clip) - 1)` (about `-147 lambda` at `clip = 5`) for the
    exponential branch at the switch, so very under-estimated `q` are pulled up weakly (as the
    authors' code). The exponential is evaluated at `min(delta, clip)`, so no overflow.
    """
    delta = inv_temp * (target - pred)
    above = delta > clip
    return jnp.where(above, delta, jnp.exp(jnp.minimum(delta, clip)) + inv_temp * pred)


def noisy_critic_term(
    critic: CriticEnsemble,
    target_critic: CriticEnsemble,
    obs: Float[Array, "batch obs"],
    actions: Float[Array, "batch action"],
    weights: Float[Array, " batch"],
    *,
    key: PRNGKeyArray,
    loss: NoisyLoss,
    inv_temp: float = 1.0,
    isd_clip: float = 5.0,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Regression of a time-conditioned critic at noisy flow states onto the clean-action
    target critic, member by member (CGQL-MSE, CGQL-Linex):

    ```
    u_b ~ U[0, 1),  eps_b ~ N(0, I_D),  x_b = (1 - u_b) eps_b + u_b a_b
    q~_{e,b} = Q'_e(s_b, a_b, 1)        (target critic at the CLEAN chunk; no gradient)
    q_{e,b}  = Q_e(s_b, x_b, u_b)       (gradient to the critic)
    mse:   L = (1/(E B)) sum_{e,b} w_b (q_{e,b} - q~_{e,b})^2
    linex: L = (1/(E B)) sum_{e,b} w_b linex_loss(q_{e,b}, q~_{e,b}; inv_temp, isd_clip)
    ```
    normalised by `E * B`, not by `sum_b w_b`. In expectation over the data given `x_u`, the
    squared loss fits `E[Q'(s, a, 1) | x_u]` and the linex loss the log-partition
    `(1/lambda) log E[exp(lambda Q'(s, a, 1)) | x_u]` that exact guidance needs (the squared
    one is its Jensen lower bound). Keys: `split(key)` = (`u = uniform(k, (B,))`,
    `eps = normal(k, (B, D))`). `inv_temp` and `isd_clip` are used by the linex loss only.
    """
    if loss not in ("mse", "linex"):
        raise ValueError(f"`noisy_critic_term(..., loss=...)` must be 'mse' or 'linex'; got "
                         f"{loss!r}.")  # fmt: skip
    batch = actions.shape[0]
    u_key, eps_key = jax.random.split(key)
    u = jax.random.uniform(u_key, (batch,), dtype=actions.dtype)
    eps = jax.random.normal(eps_key, actions.shape, dtype=actions.dtype)
    noisy = (1.0 - u[:, None]) * eps + u[:, None] * actions
    target = time_conditioned_q_batched(
        stop_gradient_tree(target_critic), obs, actions, jnp.ones_like(u)
    )
    target = jax.lax.stop_gradient(target)
    pred = time_conditioned_q_batched(critic, obs, noisy, u)
    if loss == "mse":
        per = (pred - target) ** 2
    else:
        per = linex_loss(pred, target, inv_temp=inv_temp, clip=isd_clip)
    value = jnp.mean(weights[:, None] * per)
    return value, {"noisy_critic_loss": value, "noisy_q_mean": jnp.mean(pred)}
