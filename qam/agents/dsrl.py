"""DSRL: a noise-space policy steering a behaviour-cloning flow, with a latent critic (Wagenmaker
et al., "Steering Your Diffusion Policy with Latent Space Reinforcement Learning",
arXiv 2506.15799), as the QAM paper runs it.

Five trainable modules: the critic ensemble `Q_e(s, a)`, a latent critic ensemble `Z_e(s, z)`
(same architecture and size, on `concat(s, z)`, no target), a behaviour-cloning flow `v_B`, a
noise policy `pi_z(zeta | s)` (tanh-Gaussian over the `D` latent dimensions) and a temperature
`log alpha` (init 0). Targets: the critic and the BC flow `v_B'`. A latent `z` becomes a chunk
through the flow's ODE, `F(s, z) = ODE_K(v_B'; s, z)` (clipped; the EMA flow with
`use_target_latent`, the default, everywhere: acting, TD targets and the latent critic):

```
TD target:  zeta' ~ pi_z(. | s'),  a' = F(s', noise_scale * clip(zeta', -1, 1))
latent critic:  z_b ~ N(0, I_D) (UNSCALED, no tanh)
        L_Z = mean_{b,e} (Z_e(s_b, z_b) - Q_e(s_b, F(s_b, z_b)))^2
actor:  zeta_b ~ pi_z(. | s_b) (reparameterised),  l_b = log pi_z(zeta_b | s_b)
        L_actor = mean_b( sg(alpha) l_b - mean_e Z_e(s_b, noise_scale * zeta_b) )
        L_alpha = alpha (sg(-mean_b l_b) - H_target),  H_target = -0.5 D
L = L_critic + L_Z + L_flow + L_actor + L_alpha
```

- `L_critic` (`critic_term`): chunked TD with the pessimistic target `mean_e Q'_e - rho std_e Q'_e`,
  valid-weighted; `pi_z` and the flow are stored.
- `L_Z` (`latent_critic_term`) trains `Z` only: the online critic is stored, member `e` of `Z`
  regresses onto member `e` of `Q`; not valid-weighted. `Z` is fitted on standard normal
  latents but queried on the box `noise_scale * (-1, 1)^D` (the reference's behaviour).
- `L_actor + L_alpha` (`sac_actor_term`) train `pi_z` (through `Z`'s input, `Z` stored) and
  `log alpha` (alpha, not log alpha, multiplies); not valid-weighted.
- `L_flow` (`flow_term`) trains `v_B` by flow matching, valid-weighted. Unlike the original
  DSRL, which freezes a pretrained flow, the flow keeps training; the latents are mapped
  through its EMA for stability. (The paper's text names a "target network for the noise-space
  policy" in one sentence and one "for the BC flow policy" in the next; the reference code does
  the latter, and so does this: `pi_z` has no target.)

Acts stochastically (at evaluation too): `F(s, noise_scale * clip(zeta, -1, 1))`,
`zeta ~ pi_z(. | s)` (the clip is a no-op on tanh samples); with `best_of_n > 1` the candidate
with the highest mean online Q. One plain Adam over all modules.
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._flow import ode_sample
from .._misc import stop_gradient_tree
from .._types import VelocityField
from ..data import SequenceBatch
from ..nn import CriticEnsemble, TanhGaussianPolicy, VelocityNetwork
from ._interface import Agent, AgentConfig, AgentState, check_batch, gradient_step, init_state
from ._sac import latent_critic_term, sac_actor_term
from ._terms import best_of_n, flow_term, ode_actions, policy_critic_term, target_entropy


@dataclasses.dataclass(frozen=True)
class DSRLConfig(AgentConfig):
    """DSRL's hyperparameters; the defaults are the reference's (plain Adam)."""

    flow_steps: int = 10  # K >= 1 Euler steps of the flow's ODE F(s, z)
    best_of_n: int = 1  # act with the best of n candidates under the online critic (mean)
    noise_scale: float = 1.0  # latent box half-width: z = noise_scale * zeta, zeta in (-1, 1)^D
    use_target_latent: bool = True  # F uses the EMA BC flow (else the online one, stored)
    target_entropy: float | None = None  # noise policy's entropy target; None: -multiplier * D
    target_entropy_multiplier: float = 0.5  # the multiplier above

    def _checks(self) -> list[tuple[str, bool, str]]:
        return super()._checks() + [
            ("flow_steps", self.flow_steps >= 1, ">= 1"),
            ("best_of_n", self.best_of_n >= 1, ">= 1"),
            ("noise_scale", self.noise_scale > 0 and math.isfinite(self.noise_scale),
             "finite and > 0"),
            ("target_entropy", self.target_entropy is None or math.isfinite(self.target_entropy),
             "None or finite"),
            ("target_entropy_multiplier", math.isfinite(self.target_entropy_multiplier),
             "finite"),
        ]  # fmt: skip


class DSRLParams(eqx.Module):
    """The trainable modules of DSRL."""

    critic: CriticEnsemble  # Q_e(s, a)
    latent_critic: CriticEnsemble  # Z_e(s, z), distilled from Q_e(s, F(s, z))
    bc_flow: VelocityNetwork  # the behaviour-cloning flow v_B (its EMA maps latents to chunks)
    noise_policy: TanhGaussianPolicy  # pi_z(zeta | s), zeta in (-1, 1)^D
    log_alpha: Float[Array, ""]  # the noise policy's entropy temperature


def init(
    key: PRNGKeyArray,
    obs_example: Float[Array, " obs"],
    action_example: Float[Array, " action"],
    config: DSRLConfig,
) -> AgentState:
    """A DSRL agent for flat observations like `obs_example` and single actions like
    `action_example` (chunks of `config.horizon` of them). Targets: the critic and the BC
    flow."""
    obs_dim, dim = config.dims(obs_example, action_example)
    keys = jax.random.split(key, 4)
    noise_policy = TanhGaussianPolicy(obs_dim, dim, config.actor_hidden, key=keys[3])
    params = DSRLParams(
        config.make_critic(obs_dim, dim, key=keys[0]),
        config.make_critic(obs_dim, dim, key=keys[1]),  # the latent critic, on concat(s, z)
        config.make_flow(obs_dim, dim, key=keys[2]), noise_policy, jnp.zeros(()),
    )  # fmt: skip
    return init_state(params, targets=("critic", "bc_flow"), config=config, action_dim=dim)


def _latent_flow(state: AgentState) -> VelocityField:
    """The velocity of `F(s, z)`, stored: the EMA BC flow (`use_target_latent`) or the online
    one."""
    config: DSRLConfig = state.config
    flow = state.targets["bc_flow"] if config.use_target_latent else state.params.bc_flow
    return stop_gradient_tree(flow)


def act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The deployed policy for one observation: `F(s, noise_scale * clip(zeta, -1, 1))` with
    `zeta ~ pi_z(. | s)` drawn with `key` (sampled, not the mode), stored parameters; with
    `best_of_n > 1` the candidate with the highest mean online Q (candidate `i` from
    `split(key, n)[i]`). Also the TD target's sampler."""
    params: DSRLParams = stop_gradient_tree(state.params)
    config: DSRLConfig = state.config
    flow = _latent_flow(state)

    def sample(k):
        zeta, _ = params.noise_policy.sample_and_log_prob(obs, key=k)
        z = config.noise_scale * jnp.clip(zeta, -1.0, 1.0)
        return ode_sample(flow, obs, noise=z, num_steps=config.flow_steps)

    score = lambda a: jnp.mean(params.critic(obs, a))
    return best_of_n(sample, score, key=key, n=config.best_of_n)


def bc_act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The behaviour-cloning policy: the online flow's `ODE_K(v_B; s, z)` from
    `z = jax.random.normal(key, (D,))` (no noise policy, no best-of-n)."""
    params: DSRLParams = stop_gradient_tree(state.params)
    z = jax.random.normal(key, (state.action_dim,), obs.dtype)
    return ode_sample(params.bc_flow, obs, noise=z, num_steps=state.config.flow_steps)


def _loss(params: DSRLParams, state: AgentState, batch: SequenceBatch, key: PRNGKeyArray):
    """`L_critic + L_Z + L_flow + L_actor + L_alpha`; keys: split(key, 4) = (TD sampler, flow,
    latent-critic latents `z = jax.random.normal(k, (B, D))`, noise policy samples)."""
    config: DSRLConfig = state.config
    stored: DSRLParams = stop_gradient_tree(state.params)
    obs = batch.observations
    batch_size = obs.shape[0]
    td_key, flow_key, latent_key, actor_key = jax.random.split(key, 4)
    loss_critic, metrics = policy_critic_term(params.critic, state, batch, act, key=td_key)
    flow = _latent_flow(state)
    z = jax.random.normal(latent_key, (batch_size, state.action_dim), obs.dtype)
    latent_actions = ode_actions(flow, obs, z, num_steps=config.flow_steps)
    loss_latent, latent_metrics = latent_critic_term(
        params.latent_critic, stored.critic, obs, z, latent_actions
    )
    loss_flow, flow_metrics = flow_term(
        params.bc_flow, batch, key=flow_key, chunked=config.action_chunking
    )
    zeta, log_prob = jax.vmap(lambda o, k: params.noise_policy.sample_and_log_prob(o, key=k))(
        obs, jax.random.split(actor_key, batch_size)
    )
    q = jnp.mean(stored.latent_critic.batched(obs, config.noise_scale * zeta), axis=1)
    loss_actor, actor_metrics = sac_actor_term(
        log_prob, q, params.log_alpha,
        entropy_target=target_entropy(
            state.action_dim, value=config.target_entropy,
            multiplier=config.target_entropy_multiplier,
        ),
    )  # fmt: skip
    total = loss_critic + loss_latent + loss_flow + loss_actor
    metrics = {**metrics, **latent_metrics, **flow_metrics, **actor_metrics}
    return total, dict(metrics, total_loss=total)


def update(
    state: AgentState, batch: SequenceBatch, *, key: PRNGKeyArray
) -> tuple[AgentState, dict[str, Array]]:
    """One plain-Adam step of every module on `L_critic + L_Z + L_flow + L_actor + L_alpha`,
    then the Polyak targets of the critic and the BC flow from the pre-update parameters."""
    check_batch(batch, state)
    return gradient_step(state, lambda params: _loss(params, state, batch, key))


AGENT = Agent("dsrl", DSRLConfig, init, update, act, bc_act)
