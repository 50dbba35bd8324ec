"""Soft actor-critic pieces for policies with a learned temperature (DSRL's noise policy, RLPD's
actor), and the latent critic a noise-space policy maximises (DSRL).

Conventions as in the other `qam.agents` terms: each returns `(loss, metrics)`, means over the
batch, and the values handed in are what the caller computed with stored networks (no gradient
reaches a critic's parameters from here).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._misc import stop_gradient_tree
from ..nn import CriticEnsemble
from ._terms import temperature_term


def sac_actor_term(
    log_prob: Float[Array, " batch"],
    q: Float[Array, " batch"],
    log_alpha: Float[Array, ""],
    *,
    entropy_target: float,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """SAC's actor and temperature losses on reparameterised samples `y_b ~ pi(. | x_b)`:

    ```
    alpha   = exp(log_alpha)
    L_actor = mean_b( sg(alpha) * l_b - q_b )                  l_b = log pi(y_b | x_b)
    L_alpha = alpha * ( sg(-mean_b l_b) - entropy_target )     (`temperature_term`)
    L       = L_actor + L_alpha
    ```
    `q_b` is the critic's value of the sample, aggregated by the caller (DSRL: the mean of its
    latent critic; RLPD: `mean - rho std`) with the critic stored, so `L_actor` trains the
    policy (through `l_b` and `q_b`) and `L_alpha` only `log_alpha`. Alpha, not log alpha,
    multiplies the temperature loss (as the reference): its gradient in `log_alpha` is
    `alpha * (entropy - entropy_target)`. No valid weighting.

    **Returns:** `(L, {"actor_loss": L_actor, "actor_q": mean_b q_b, "entropy": -mean_b l_b,
    "alpha": alpha, "alpha_loss": L_alpha})`.
    """
    alpha = jnp.exp(jax.lax.stop_gradient(log_alpha))
    actor_loss = jnp.mean(alpha * log_prob - q)
    alpha_loss, metrics = temperature_term(log_alpha, log_prob, entropy_target=entropy_target)
    metrics = dict(metrics, actor_loss=actor_loss, actor_q=jnp.mean(q))
    return actor_loss + alpha_loss, metrics


def latent_critic_term(
    latent_critic: CriticEnsemble,
    critic: CriticEnsemble,
    obs: Float[Array, "batch obs"],
    latents: Float[Array, "batch latent"],
    actions: Float[Array, "batch chunk"],
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Distil an action critic into a critic of latents (DSRL):

    ```
    L_Z = (1 / (E B)) sum_b sum_e ( Z_e(s_b, z_b) - Q_e(s_b, a_b) )^2,   a_b = F(s_b, z_b)
    ```
    with `a_b` the action the latent `z_b` maps to (the caller's sampler, e.g. the BC flow's
    ODE from `z_b`). Member `e` of `latent_critic` regresses onto member `e` of `critic` (the
    two ensembles must have the same size). `critic` is stored and `actions` carry no gradient,
    so only `latent_critic` is trained. No valid weighting (the regression involves no data
    action).

    **Returns:** `(L_Z, {"latent_loss": L_Z, "latent_q_mean": mean_{b,e} Z_e(s_b, z_b)})`.
    """
    if latent_critic.num_critics != critic.num_critics:
        raise ValueError(
            f"`latent_critic_term`: the latent critic has {latent_critic.num_critics} members "
            f"but the critic has {critic.num_critics}; they are matched member by member."
        )
    target = stop_gradient_tree(critic).batched(obs, jax.lax.stop_gradient(actions))
    z = latent_critic.batched(obs, latents)
    loss = jnp.mean((z - target) ** 2)
    return loss, {"latent_loss": loss, "latent_q_mean": jnp.mean(z)}
