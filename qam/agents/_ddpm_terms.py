"""The loss terms of the DDPM policies (QSM, DAC): behaviour cloning of the noise, and the two
ways the critic's action gradient enters the epsilon network.

On noisy data chunks `x_n = sqrt(abar_n) a + sqrt(1 - abar_n) eps` (`qam.ddpm_noisy_action`),
with `eps_hat = eps_theta(s, x_n, n)` and `g = grad_x mean_e Q_e(s, x)` at `x = x_n` (the
noisy chunk, unclipped; the critic is stored):

```
L_BC  = mean_b [ ( mean_d (eps_b - eps_hat_b)^2 ) ^ w_b ]
L_QSM = mean_b [ ( mean_d (-lambda g_b - eps_hat_b)^2 ) ^ w_b ]              (lambda = inv_temp)
L_DAC = mean_b [ ( mean_d sqrt(1 - abar_n) g_b,d eps_hat_b,d ) ^ w_b ]        (no lambda)
L_actor = alpha L_BC + L_QSM   or   alpha L_BC + L_DAC
```

`^ w_b` is the authors' valid weighting (`** valid`, `w = valid` at the chunk's last step): a
valid example contributes its loss, an invalid one the constant 1 (no gradient), and the mean
still divides by `B`. Gradient-wise this equals multiplying by `w`; the loss values differ.
`valid_weighting="multiply"` gives the usual `mean_b [w_b * loss_b]`.

Minimisers per `(s, x_n, n)`: QSM `eps_theta* = (alpha E[eps | x_n] - lambda g) / (1 + alpha)`
(in score units `-eps / sqrt(1 - abar_n)`: the behaviour score shrunk by `alpha / (1 + alpha)`
plus `lambda g / ((1 + alpha) sqrt(1 - abar_n))`); DAC `eps_theta* = E[eps | x_n] - sqrt(1 -
abar_n) g / (2 alpha)`, i.e. the behaviour score plus `g / (2 alpha)`: DAC needs `alpha > 0`.
"""

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._ddpm import DDPMSchedule, EpsilonModel
from .._misc import stop_gradient_tree
from ..nn import CriticEnsemble


ActorLoss = Literal["qsm", "dac"]
ValidWeighting = Literal["exponent", "multiply"]


def critic_action_gradient(
    critic: CriticEnsemble, obs: Float[Array, "batch obs"], actions: Float[Array, "batch action"]
) -> Float[Array, "batch action"]:
    """Row `b`: `grad_a mean_e Q_e(s_b, a)` at `a = actions_b` (no clip), the critic stored:
    the gradient of `sum_b mean_e Q_e(s_b, a_b)`, so each row is its own example's."""
    critic = stop_gradient_tree(critic)
    q_sum = lambda a: jnp.sum(jnp.mean(critic.batched(obs, a), axis=1))
    return jax.lax.stop_gradient(jax.grad(q_sum)(actions))


def weigh_valid(
    losses: Float[Array, " batch"], valid: Float[Array, " batch"], *, how: ValidWeighting
) -> Float[Array, ""]:
    """`mean_b losses_b ** valid_b` (`exponent`, the authors' code) or `mean_b valid_b *
    losses_b` (`multiply`)."""
    if how == "exponent":
        return jnp.mean(jnp.power(losses, valid))
    if how == "multiply":
        return jnp.mean(valid * losses)
    raise ValueError(f"`valid_weighting={how!r}` is not one of exponent, multiply.")


def ddpm_actor_term(
    eps_net: EpsilonModel,
    critic: CriticEnsemble,
    obs: Float[Array, "batch obs"],
    noisy_actions: Float[Array, "batch action"],
    steps: Int[Array, " batch"],
    noise: Float[Array, "batch action"],
    valid: Float[Array, " batch"],
    *,
    schedule: DDPMSchedule,
    actor_loss: ActorLoss,
    inv_temp: float,
    alpha: float,
    valid_weighting: ValidWeighting = "exponent",
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """`alpha L_BC + L_QSM` (`actor_loss="qsm"`) or `alpha L_BC + L_DAC` (`"dac"`) of the
    module docstring, on the noisy chunks `x_n = noisy_actions` at steps `n = steps` made from
    `noise = eps` (rows of `jax.vmap(qam.ddpm_noisy_action)`). One evaluation of `eps_net`
    serves both parts; `critic` (the target critic by default in the agents) is stored and
    differentiated at `x_n`; `inv_temp` is unused by DAC. Gradients reach `eps_net` only.
    Metrics: `bc_loss`, `qsm_loss` or `dac_loss`, `actor_loss` (the sum)."""
    if actor_loss not in ("qsm", "dac"):
        raise ValueError(f"`actor_loss={actor_loss!r}` is not one of qsm, dac.")
    dtype = noisy_actions.dtype
    eps_hat = jax.vmap(eps_net)(obs, noisy_actions, steps.astype(dtype))
    g = critic_action_gradient(critic, obs, noisy_actions)
    bc = weigh_valid(jnp.mean((noise - eps_hat) ** 2, axis=1), valid, how=valid_weighting)
    if actor_loss == "qsm":
        per_example = jnp.mean((-inv_temp * g - eps_hat) ** 2, axis=1)
    else:
        scale = jnp.sqrt(1.0 - schedule.alpha_bars.astype(dtype)[steps])
        per_example = jnp.mean(scale[:, None] * g * eps_hat, axis=1)
    method = weigh_valid(per_example, valid, how=valid_weighting)
    total = alpha * bc + method
    return total, {"bc_loss": bc, f"{actor_loss}_loss": method, "actor_loss": total}
