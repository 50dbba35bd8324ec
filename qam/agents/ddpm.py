"""QSM and DAC: a DDPM policy whose noise predictor is trained on the critic's action gradient.

Two registered agents (`qam.agents.AGENTS["qsm" | "dac"]`), one `DDPMConfig` whose
`actor_loss` names the method. Two trainable networks: the critic ensemble `Q_e` and the DDPM
epsilon network `eps_theta(s, x, n)` (`qam.EpsilonNetwork`, mish, learnable Fourier features of
the step index `n`), which *is* the policy. Target: the critic only. Per update (`s, a` the
batch observation and flattened chunk, `w` the chunk's last `valid`, `T = diffusion_steps`,
`abar_n` from `qam.vp_beta_schedule(T, b_min=beta_min, b_max=beta_max)`):

```
critic:  a'_b = ddpm_sample(eps_theta; s'_b)          (the acting sampler, stored parameters)
         L_Q  = chunked TD loss, target mean_e Q'_e(s', a') - rho std_e Q'_e(s', a')
actor:   n_b ~ U{1..T}, eps_b ~ N(0, I_D),  x_b = sqrt(abar_n) a_b + sqrt(1 - abar_n) eps_b
         g_b = grad_x mean_e Q'_e(s_b, x) at x = x_b  (TARGET critic, stored; noisy, unclipped)
         e_b = eps_theta(s_b, x_b, n_b)
         qsm: L_actor = alpha L_BC + mean_b [ (mean_d (-inv_temp g_b - e_b)^2) ^ w_b ]
         dac: L_actor = alpha L_BC + mean_b [ (mean_d sqrt(1 - abar_n) g_b e_b) ^ w_b ]
         L_BC = mean_b [ (mean_d (eps_b - e_b)^2) ^ w_b ]
total = L_Q + L_actor, one Adam step after a global-norm clip to 1 (`clip_grad`)
```
(`qam.agents.ddpm_actor_term`; `^ w` is the authors' `** valid`, see there; `alpha` weighs the
DDPM behaviour cloning, `inv_temp` is QSM's only.)

Sampling (`qam.ddpm_sample`, `x_T ~ N(0, I)`, `n = T .. 1`): **qsm** jumps to the denoised
estimate `x0_hat` and re-noises it with `sqrt(beta_n)`, clipping each state to `[-1, 1]`
(`clip_sampler_after`; not the DDPM update of the paper's Eq. 52, reproduced as the authors'
code runs it); **dac** takes the DDPM posterior-mean step from a clipped `x0_hat`
(`clip_sampler_before`), variance `beta_n`. Acting and the TD target use the same sampler with
fresh randomness; actions are stochastic at evaluation too. No best-of-n, no
behaviour-cloning policy (`bc_act` is `None`: the one network is both).

Where this follows the authors' code rather than the papers: QSM here has a DDPM BC term
(weight `alpha`; the original QSM has none) and uses the critic's gradient at the noisy action
instead of a learned noisy critic; both QSM and DAC raise per-example losses to the power
`valid` (`valid_weighting="multiply"` multiplies instead, same gradient).
"""

import dataclasses
import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._ddpm import DDPMSchedule, EpsilonNetwork, ddpm_noisy_action, ddpm_sample, vp_beta_schedule
from .._misc import stop_gradient_tree
from ..data import SequenceBatch
from ..nn import CriticEnsemble
from ._common import flat_chunk
from ._ddpm_terms import ddpm_actor_term
from ._interface import Agent, AgentConfig, AgentState, check_batch, gradient_step, init_state
from ._terms import policy_critic_term


@dataclasses.dataclass(frozen=True)
class DDPMConfig(AgentConfig):
    """Hyperparameters of QSM and DAC; the defaults are the reference's `get_config()` (whose
    sampler clips neither before nor after: the registered `qsm` and `dac` set their paper
    flags, and `dac` an `alpha`, through `Agent.defaults`)."""

    clip_grad: bool = True  # global-norm clip 1.0 on the concatenated gradient
    actor_loss: Literal["qsm", "dac"] = "qsm"  # qsm: eps to -inv_temp g; dac: g-weighted eps
    diffusion_steps: int = 10  # T >= 1 DDPM steps
    time_dim: int = 64  # Fourier features of the step index (even)
    beta_min: float = 0.1  # VP schedule: beta(t) rises linearly from beta_min ...
    beta_max: float = 10.0  # ... to beta_max
    inv_temp: float = 1.0  # qsm: lambda, the score target is -lambda * grad_a Q (unused by dac)
    alpha: float = 0.0  # weight of the DDPM behaviour-cloning loss (dac: must be > 0)
    use_target_critic_grad: bool = True  # the actor's action gradient from the target critic
    clip_sampler_before: bool = False  # clip x0_hat and take the DDPM posterior step (dac)
    clip_sampler_after: bool = False  # jump to x0_hat, re-noise, clip each state (qsm)
    valid_weighting: Literal["exponent", "multiply"] = "exponent"  # loss ** valid, or valid * loss

    def _checks(self) -> list[tuple[str, bool, str]]:
        finite = math.isfinite
        dac = self.actor_loss == "dac"
        return super()._checks() + [
            ("actor_loss", self.actor_loss in ("qsm", "dac"), "one of qsm, dac"),
            ("diffusion_steps", self.diffusion_steps >= 1, ">= 1"),
            ("time_dim", self.time_dim >= 2 and self.time_dim % 2 == 0, "even and >= 2"),
            ("beta_min", finite(self.beta_min) and 0 <= self.beta_min <= self.beta_max,
             "finite with 0 <= beta_min <= beta_max"),
            ("beta_max", finite(self.beta_max) and self.beta_max > 0, "finite and > 0"),
            ("inv_temp", finite(self.inv_temp) and self.inv_temp >= 0, "finite and >= 0"),
            ("alpha", finite(self.alpha) and (self.alpha > 0 if dac else self.alpha >= 0),
             "finite and > 0 for actor_loss dac (its loss is linear in eps_theta without the "
             "BC term)" if dac else "finite and >= 0"),
            ("valid_weighting", self.valid_weighting in ("exponent", "multiply"),
             "one of exponent, multiply"),
        ]  # fmt: skip

    def schedule(self) -> DDPMSchedule:
        """The VP schedule of `diffusion_steps` steps between `beta_min` and `beta_max`."""
        return vp_beta_schedule(self.diffusion_steps, b_min=self.beta_min, b_max=self.beta_max)


class DDPMParams(eqx.Module):
    """The trainable modules of QSM and DAC."""

    critic: CriticEnsemble
    actor: EpsilonNetwork  # the DDPM noise predictor eps_theta(s, x, n): the policy


def init(
    key: PRNGKeyArray,
    obs_example: Float[Array, " obs"],
    action_example: Float[Array, " action"],
    config: DDPMConfig,
) -> AgentState:
    """A QSM or DAC agent for flat observations like `obs_example` and single actions like
    `action_example` (chunks of `config.horizon` of them). Target: the critic."""
    obs_dim, dim = config.dims(obs_example, action_example)
    critic_key, actor_key = jax.random.split(key)
    actor = EpsilonNetwork(
        obs_dim, dim, config.actor_hidden, time_dim=config.time_dim,
        layer_norm=config.actor_layer_norm, layer_norm_eps=config.layer_norm_eps, key=actor_key,
    )  # fmt: skip
    params = DDPMParams(config.make_critic(obs_dim, dim, key=critic_key), actor)
    return init_state(params, targets=("critic",), config=config, action_dim=dim)


def act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The deployed policy for one observation: `qam.ddpm_sample` of the online epsilon
    network (stored) with the config's clip flags and randomness from `key`, then a clip to
    `[-1, 1]` (a no-op for both registered samplers, whose outputs are already in the box; it
    keeps the interface's promise when both flags are off). Also the TD target's sampler."""
    params: DDPMParams = stop_gradient_tree(state.params)
    config: DDPMConfig = state.config
    action = ddpm_sample(
        params.actor, obs, schedule=config.schedule(), clip_before=config.clip_sampler_before,
        clip_after=config.clip_sampler_after, key=key, action_dim=state.action_dim,
    )  # fmt: skip
    return jnp.clip(action, -1.0, 1.0)


def _loss(params: DDPMParams, state: AgentState, batch: SequenceBatch, key: PRNGKeyArray):
    """`L_critic + L_actor`; keys: `split(key)` = (TD sampler, actor noising); the actor's
    `(x_n, n, eps)` of example `b` is `qam.ddpm_noisy_action(a_b, key=k_b)`, `k = split(., B)`."""
    config: DDPMConfig = state.config
    obs = batch.observations
    td_key, noise_key = jax.random.split(key)
    loss_critic, metrics = policy_critic_term(params.critic, state, batch, act, key=td_key)
    schedule = config.schedule()
    actions = flat_chunk(batch.actions, chunked=config.action_chunking)
    noisy, steps, noise = jax.vmap(lambda a, k: ddpm_noisy_action(a, key=k, schedule=schedule))(
        actions, jax.random.split(noise_key, obs.shape[0])
    )
    grad_critic = state.targets["critic"] if config.use_target_critic_grad else state.params.critic
    loss_actor, actor_metrics = ddpm_actor_term(
        params.actor, grad_critic, obs, noisy, steps, noise, batch.valid[:, -1],
        schedule=schedule, actor_loss=config.actor_loss, inv_temp=config.inv_temp,
        alpha=config.alpha, valid_weighting=config.valid_weighting,
    )  # fmt: skip
    total = loss_critic + loss_actor
    return total, {**metrics, **actor_metrics, "total_loss": total}


def update(
    state: AgentState, batch: SequenceBatch, *, key: PRNGKeyArray
) -> tuple[AgentState, dict[str, Array]]:
    """One (clipped) Adam step of the critic and the epsilon network on `L_critic + L_actor`,
    then the critic's Polyak target from the pre-update parameters."""
    check_batch(batch, state)
    return gradient_step(state, lambda params: _loss(params, state, batch, key))


QSM = Agent(
    "qsm", DDPMConfig, init, update, act, None,
    defaults={"actor_loss": "qsm", "clip_sampler_before": False, "clip_sampler_after": True},
)  # fmt: skip
"""QSM: score matching of the DDPM policy to `-inv_temp * grad_a Q'` plus `alpha` DDPM BC;
samples by jumping to `x0_hat`, re-noising and clipping each state."""

DAC = Agent(
    "dac", DDPMConfig, init, update, act, None,
    defaults={"actor_loss": "dac", "clip_sampler_before": True, "clip_sampler_after": False,
              "alpha": 1.0},
)  # fmt: skip
"""DAC: the gradient-weighted epsilon loss plus `alpha` DDPM BC (default `alpha = 1`, the
paper's value on 6 of its 10 domains); samples with the DDPM posterior step from a clipped
`x0_hat`."""
