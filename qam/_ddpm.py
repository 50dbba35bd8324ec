"""A DDPM policy with a variance-preserving schedule: the schedule, the epsilon network, the
training noising and the two reverse samplers of QSM and DAC.

Indices: the diffusion step `n` runs over the integers `0, 1, ..., T` (`T = num_steps`). `n = 0`
is the clean action, `n = T` (almost) pure noise; sampling goes *down*, `n = T, T - 1, ..., 1`.
Unlike the flows elsewhere in `qam` there is no time in `[0, 1]`: the network is fed the
integer index `n` itself, as a float.

```
forward (training):  x_n = sqrt(abar_n) a + sqrt(1 - abar_n) eps,   eps ~ N(0, I),  n ~ U{1..T}
network:             eps_theta(s, x_n, n) ~ eps                          (predicts the noise)
denoised estimate:   x0_hat = (x_n - sqrt(1 - abar_n) eps_theta(s, x_n, n)) / sqrt(abar_n)
```
with `beta_n`, `alpha_n = 1 - beta_n`, `abar_n = prod_{k <= n} alpha_k` from `vp_beta_schedule`
and the conventions `beta_0 = 0`, `alpha_0 = abar_0 = 1` (every array has `T + 1` entries and
is indexed by `n` directly).
"""

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, DTypeLike, Float, Int, PRNGKeyArray, Real

from .nn import DEFAULT_LAYER_NORM_EPS, MLP, mish


class DDPMSchedule(NamedTuple):
    """A DDPM noise schedule indexed by the step `n = 0 .. T` (each array has `T + 1` entries).

    - `betas`: `beta_n`, with `beta_0 = 0`.
    - `alphas`: `alpha_n = 1 - beta_n` (`alpha_0 = 1`).
    - `alpha_bars`: `abar_n = prod_{k <= n} alpha_k` (`abar_0 = 1`).
    """

    betas: Float[Array, " steps_plus_one"]
    alphas: Float[Array, " steps_plus_one"]
    alpha_bars: Float[Array, " steps_plus_one"]

    @property
    def num_steps(self) -> int:
        """`T`."""
        return self.betas.shape[0] - 1


def vp_beta_schedule(
    num_steps: int, *, b_min: float = 0.1, b_max: float = 10.0, dtype: DTypeLike | None = None
) -> DDPMSchedule:
    """The variance-preserving ("vp") schedule of `T = num_steps` steps:

    ```
    beta_n = 1 - exp(-b_min / T - (b_max - b_min) (2 n - 1) / (2 T^2)),   n = 1 .. T;  beta_0 = 0
    alpha_n = 1 - beta_n,   abar_n = prod_{k <= n} alpha_k   (abar_0 = 1)
    ```
    the discretisation of the VP SDE with a linear rate `beta(t) = b_min + (b_max - b_min) t`
    on `[0, 1]`: `-log alpha_n` is its integral over the `n`-th of `T` equal intervals. With
    `T = 10` and the defaults: `beta_1..10 = 0.0578 0.1466 0.2270 0.2999 0.3659 0.4256 0.4798 0.5288
    0.5732 0.6135` and `abar_1..10 = 0.9422 0.8041 0.6216 0.4352 0.2760 0.1585 0.0825 0.0389
    0.0166 0.0064`. Computed in float64 and returned in `dtype` (default: JAX's default float).

    Needs `0 <= b_min <= b_max`, `b_max > 0` (so every `beta_n > 0`), both finite.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(
            f"`vp_beta_schedule(num_steps=...)` must be a positive int; got {num_steps!r}."
        )
    if not (math.isfinite(b_min) and math.isfinite(b_max) and 0 <= b_min <= b_max and b_max > 0):
        raise ValueError(
            "`vp_beta_schedule(b_min=..., b_max=...)` must be finite with 0 <= b_min <= b_max "
            f"and b_max > 0; got b_min={b_min!r}, b_max={b_max!r}."
        )
    t = num_steps
    n = np.arange(1, t + 1, dtype=np.float64)
    alphas = np.exp(-b_min / t - 0.5 * (b_max - b_min) * (2.0 * n - 1.0) / t**2)
    alphas = np.concatenate([[1.0], alphas])
    betas = np.concatenate([[0.0], 1.0 - alphas[1:]])
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    return DDPMSchedule(
        betas=jnp.asarray(betas, dtype),
        alphas=jnp.asarray(alphas, dtype),
        alpha_bars=jnp.asarray(np.cumprod(alphas), dtype),
    )


class EpsilonNetwork(eqx.Module):
    """The DDPM noise predictor `eps_theta(s, x, n)` for one example.

    ```
    time features:  f = 2 pi n W^T,  W in R^{(time_dim / 2) x 1} trainable, init N(0, 0.2^2)
                    e = concat(cos f, sin f)                                  (time_dim numbers)
    condition:      c = MLP_c(e)        Dense layers of widths hidden_sizes, mish between them,
                                        none after the last (no LayerNorm); c has hidden_sizes[-1]
    output:         eps_theta = MLP(concat(x, s, c))   widths hidden_sizes, mish, final Dense(D)
    ```
    The order inside the concatenation is `(x, s, c)` (action first, unlike the critics and
    velocity fields). `n` is the integer step index `1 .. T` fed as a float, not a time in
    `[0, 1]`. Xavier-uniform kernels and zero biases in every Dense layer. `layer_norm`: LayerNorm
    after each hidden activation of the output MLP only (the reference runs without).

    **Arguments:** `obs_dim`, `action_dim` (`D`), `hidden_sizes` (e.g. `(512, 512, 512, 512)`,
    at least one), `time_dim` (even, >= 2), `layer_norm`, `layer_norm_eps`, `key`.
    """

    time_kernel: Float[Array, "half 1"]
    condition: MLP
    body: MLP

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_sizes: Sequence[int] = (512, 512, 512, 512),
        *,
        time_dim: int = 64,
        layer_norm: bool = False,
        layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS,
        key: PRNGKeyArray,
    ):
        if not hidden_sizes:
            raise ValueError("`EpsilonNetwork(hidden_sizes=...)` must name at least one layer.")
        if time_dim < 2 or time_dim % 2:
            raise ValueError(
                f"`EpsilonNetwork(time_dim=...)` must be even and >= 2; got {time_dim}."
            )
        time_key, cond_key, body_key = jax.random.split(key, 3)
        *inner, last = hidden_sizes
        self.time_kernel = 0.2 * jax.random.normal(time_key, (time_dim // 2, 1))
        self.condition = MLP(time_dim, last, inner, activation=mish, key=cond_key)
        self.body = MLP(
            action_dim + obs_dim + last, action_dim, hidden_sizes, layer_norm=layer_norm,
            layer_norm_eps=layer_norm_eps, activation=mish, key=body_key,
        )  # fmt: skip

    def time_features(self, n: Real[ArrayLike, ""]) -> Float[Array, " time_dim"]:
        """`e = concat(cos f, sin f)`, `f = 2 pi n W[:, 0]`."""
        f = 2.0 * jnp.pi * jnp.asarray(n, self.time_kernel.dtype) * self.time_kernel[:, 0]
        return jnp.concatenate([jnp.cos(f), jnp.sin(f)])

    def __call__(
        self, obs: Float[Array, " obs"], x: Float[Array, " action"], n: Real[ArrayLike, ""]
    ) -> Float[Array, " action"]:
        c = self.condition(self.time_features(jnp.asarray(n, x.dtype)))
        return self.body(jnp.concatenate([x, obs, c]))


EpsilonModel = Callable[[Array, Array, Array], Array]
"""Any single-example noise predictor `eps(obs, x, n) -> (D,)`, e.g. an `EpsilonNetwork`."""


def ddpm_noisy_action(
    action: Float[Array, " action"], *, key: PRNGKeyArray, schedule: DDPMSchedule
) -> tuple[Float[Array, " action"], Int[Array, ""], Float[Array, " action"]]:
    """One training input of the epsilon network: `(x_n, n, eps)` with

    ```
    n ~ Uniform{1, ..., T},  eps ~ N(0, I_D),  x_n = sqrt(abar_n) a + sqrt(1 - abar_n) eps
    ```
    Keys: `n` from `split(key)[0]`, `eps` from `split(key)[1]`. Batch with `jax.vmap`.
    """
    if action.ndim != 1:
        raise ValueError(
            f"`ddpm_noisy_action(action=...)` must be one flat action of shape (D,); got shape "
            f"{tuple(action.shape)}. For a batch, use `jax.vmap`."
        )
    step_key, noise_key = jax.random.split(key)
    n = jax.random.randint(step_key, (), 1, schedule.num_steps + 1)
    eps = jax.random.normal(noise_key, action.shape, action.dtype)
    abar = schedule.alpha_bars.astype(action.dtype)[n]
    return jnp.sqrt(abar) * action + jnp.sqrt(1.0 - abar) * eps, n, eps


def ddpm_step(
    eps_net: EpsilonModel,
    obs: Float[Array, " obs"],
    x: Float[Array, " action"],
    n: Int[ArrayLike, ""],
    *,
    noise: Float[Array, " action"],
    schedule: DDPMSchedule,
    clip_before: bool,
    clip_after: bool,
) -> tuple[Float[Array, " action"], Float[Array, " action"]]:
    """One reverse step from `x = x_n` to `x_{n-1}` (`1 <= n <= T`, may be traced), as the
    authors' sampler takes it; returns `(x_{n-1}, x0_hat)`.

    ```
    x0_hat = (x_n - sqrt(1 - abar_n) eps_theta(s, x_n, n)) / sqrt(abar_n)
    clip_before (DAC):   x0_hat <- clip(x0_hat, -1, 1)
                         m = [sqrt(abar_{n-1}) beta_n x0_hat + sqrt(alpha_n) (1 - abar_{n-1}) x_n]
                             / (1 - abar_n)                   (the DDPM posterior mean)
    otherwise (QSM):     m = x0_hat                           (jumps to the denoised estimate)
    x_{n-1} = m + 1[n > 1] sqrt(beta_n) xi,   xi = noise
    clip_after (QSM):    x_{n-1} <- clip(x_{n-1}, -1, 1)
    ```
    The variance is `beta_n`, not the posterior variance `beta_n (1 - abar_{n-1}) / (1 -
    abar_n)`; no noise is added at `n = 1`. With `clip_before`, the DDPM update of the paper's
    Eq. 52 (Ho et al.'s `sigma_n^2 = beta_n` choice) up to the clip of `x0_hat`; at `n = 1`
    (`abar_0 = 1`) the posterior mean is exactly `x0_hat` (the coefficients are `1` and `0` in
    floating point too), so the step returns exactly `clip(x0_hat)`. **Without `clip_before`
    the step is not the paper's Eq. 52**: the authors' code (QSM) replaces the posterior mean
    by `x0_hat` and re-noises it with `sqrt(beta_n)`; reproduced as written.
    """
    dtype = x.dtype
    betas, alphas, abars = (a.astype(dtype) for a in schedule)
    del betas  # the step uses 1 - alpha_n for beta_n, as the reference (equal up to rounding)
    n = jnp.asarray(n)
    abar, abar_prev, alpha = abars[n], abars[n - 1], alphas[n]
    eps = eps_net(obs, x, n.astype(dtype))
    x0_hat = (x - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
    if clip_before:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
        coef_x0 = jnp.sqrt(abar_prev) * (1.0 - alpha) / (1.0 - abar)
        coef_x = jnp.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar)
        mean = coef_x0 * x0_hat + coef_x * x
    else:
        mean = x0_hat
    x_next = mean + jnp.where(n > 1, jnp.sqrt(1.0 - alpha), jnp.zeros((), dtype)) * noise
    if clip_after:
        x_next = jnp.clip(x_next, -1.0, 1.0)
    return x_next, x0_hat


def ddpm_sample(
    eps_net: EpsilonModel,
    obs: Float[Array, " obs"],
    *,
    schedule: DDPMSchedule,
    clip_before: bool,
    clip_after: bool,
    key: PRNGKeyArray | None = None,
    action_dim: int | None = None,
    noise: Float[Array, " action"] | None = None,
    step_noise: Float[Array, "steps action"] | None = None,
) -> Float[Array, " action"]:
    """One action from the reverse DDPM chain for ONE observation: `x_T ~ N(0, I_D)`, then
    `ddpm_step` for `n = T, T - 1, ..., 1`; returns `x_0` (no final clip: with `clip_before`
    the last step returns `clip(x0_hat)`, with `clip_after` every step is clipped; with neither
    the output can leave `[-1, 1]`).

    - `clip_before=True, clip_after=False`: DAC's sampler (DDPM posterior mean with a clipped
      `x0_hat`). `clip_before=False, clip_after=True`: QSM's (jump to `x0_hat`, re-noise, clip).
    - Randomness, either from `key` (with `action_dim = D`), as the authors' sampler draws it:
      `k_0, k_1 = split(key)`, `x_T = normal(k_0, (D,))`; `c = split(k_1)[1]` and at every step
      `c, k = split(c)`, `xi_n = normal(k, (D,))` (also at `n = 1`, where it is unused); or
      given: `noise = x_T` and `step_noise[i] = xi` of the `i`-th step taken (`n = T - i`, the
      last row unused). Same dtype as `obs`.
    - Gradients flow through `eps_net`'s parameters and inputs (stop them at the call site).
    """
    if (key is None) == (noise is None) or (noise is None) != (step_noise is None):
        raise ValueError(
            "`ddpm_sample(...)` takes either `key` (with `action_dim`) or both `noise` and "
            "`step_noise`."
        )
    num_steps = schedule.num_steps
    if key is not None:
        if action_dim is None or action_dim < 1:
            raise ValueError(
                f"`ddpm_sample(key=..., action_dim=...)` needs action_dim >= 1; got {action_dim!r}."
            )
        noise_key, sampler_key = jax.random.split(key)
        noise = jax.random.normal(noise_key, (action_dim,), obs.dtype)

        def draw(carry, _):
            carry, step_key = jax.random.split(carry)
            return carry, jax.random.normal(step_key, (action_dim,), obs.dtype)

        _, step_noise = jax.lax.scan(draw, jax.random.split(sampler_key)[1], None, num_steps)
    assert noise is not None and step_noise is not None
    if noise.ndim != 1 or step_noise.shape != (num_steps, noise.shape[0]):
        raise ValueError(
            f"`ddpm_sample(noise=..., step_noise=...)` must have shapes (D,) and (T, D) = "
            f"({num_steps}, D); got {tuple(noise.shape)} and {tuple(step_noise.shape)}."
        )

    def step(x, inputs):
        n, xi = inputs
        x, _ = ddpm_step(
            eps_net, obs, x, n, noise=xi, schedule=schedule, clip_before=clip_before,
            clip_after=clip_after,
        )  # fmt: skip
        return x, None

    ns = jnp.arange(num_steps, 0, -1)
    x0, _ = jax.lax.scan(step, noise, (ns, step_noise))
    return x0
