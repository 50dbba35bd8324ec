"""FQL (flow Q-learning): a behaviour-cloning flow and a one-step policy distilled from it.

Three networks: the critic ensemble, a behaviour-cloning flow `v_B` and a one-step policy
`mu(concat(s, z))` (no time input) that maps a noise `z` straight to a chunk:

```
z_b ~ N(0, I_D),  teacher_b = ODE_K(v_B; s_b, z_b)              (clipped Euler ODE, stored)
L = L_critic + L_flow + alpha * mean_{b,d} (mu(s_b, z_b) - teacher_b)^2
                      - mean_b mean_e Q_e(s_b, clip(mu(s_b, z_b), -1, 1))
```

- `L_critic`: the chunked TD loss (`critic_term`) with the next chunk `clip(mu(s', z))` of the
  online one-step policy (stored) and the pessimistic target `mean_e Q'_e - rho std_e Q'_e`.
- `L_flow`: flow matching of `v_B` on the data chunks, valid-weighted (`flow_term`); nothing
  else trains `v_B`.
- The distillation and Q terms (`one_step_distillation_term`) train `mu` only: the teacher is
  the **online** behaviour flow with stored parameters, run from the **same** noise `z_b` as
  the student; the teacher's actions are clipped (ODE outputs), the student's only for the
  critic; the critic is the online one, stored, ensemble mean, no pessimism and no `1 / |Q|`
  normalisation; neither term is valid-weighted. `alpha` multiplies the distillation.

Acts with `clip(mu(s, z), -1, 1)`, `z ~ N(0, I)`; the flow is only the teacher (and the
behaviour-cloning policy `bc_act`). One plain Adam over all modules; Polyak target of the
critic only.
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._flow import ode_sample
from .._misc import stop_gradient_tree
from ..data import SequenceBatch
from ..nn import MLP, CriticEnsemble, VelocityNetwork
from ._interface import Agent, AgentConfig, AgentState, check_batch, gradient_step, init_state
from ._terms import (
    best_of_n,
    flow_term,
    ode_actions,
    one_step_distillation_term,
    policy_critic_term,
)


@dataclasses.dataclass(frozen=True)
class FQLConfig(AgentConfig):
    """FQL's hyperparameters; the defaults are the reference's (plain Adam)."""

    alpha: float = 100.0  # weight of the distillation loss (larger: closer to the BC flow)
    flow_steps: int = 10  # K >= 1 Euler steps of the teacher's ODE
    best_of_n: int = 1  # act with the best of n candidates under the online critic (mean)

    def _checks(self) -> list[tuple[str, bool, str]]:
        return super()._checks() + [
            ("alpha", self.alpha >= 0 and math.isfinite(self.alpha), "finite and >= 0"),
            ("flow_steps", self.flow_steps >= 1, ">= 1"),
            ("best_of_n", self.best_of_n >= 1, ">= 1"),
        ]


class FQLParams(eqx.Module):
    """The trainable modules of FQL."""

    critic: CriticEnsemble
    actor: VelocityNetwork  # the behaviour-cloning flow v_B (flow matching only)
    one_step: MLP  # the deployed policy mu(concat(s, z))


def init(
    key: PRNGKeyArray,
    obs_example: Float[Array, " obs"],
    action_example: Float[Array, " action"],
    config: FQLConfig,
) -> AgentState:
    """An FQL agent for flat observations like `obs_example` and single actions like
    `action_example` (chunks of `config.horizon` of them). Target: the critic."""
    obs_dim, dim = config.dims(obs_example, action_example)
    critic_key, actor_key, one_step_key = jax.random.split(key, 3)
    params = FQLParams(
        config.make_critic(obs_dim, dim, key=critic_key),
        config.make_flow(obs_dim, dim, key=actor_key),
        config.make_mlp(obs_dim + dim, dim, key=one_step_key),
    )
    return init_state(params, targets=("critic",), config=config, action_dim=dim)


def act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The deployed policy for one observation: `clip(mu(concat(s, z)), -1, 1)` with
    `z = jax.random.normal(key, (D,))`, stored parameters; with `best_of_n > 1` the candidate
    with the highest mean online Q. Also the TD target's sampler."""
    params: FQLParams = stop_gradient_tree(state.params)
    config: FQLConfig = state.config

    def sample(k):
        z = jax.random.normal(k, (state.action_dim,), obs.dtype)
        return jnp.clip(params.one_step(jnp.concatenate([obs, z])), -1.0, 1.0)

    score = lambda a: jnp.mean(params.critic(obs, a))
    return best_of_n(sample, score, key=key, n=config.best_of_n)


def bc_act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The behaviour-cloning policy: `ODE_K(v_B; s, z)` from `z = jax.random.normal(key, (D,))`
    (no best-of-n)."""
    params: FQLParams = stop_gradient_tree(state.params)
    z = jax.random.normal(key, (state.action_dim,), obs.dtype)
    return ode_sample(params.actor, obs, noise=z, num_steps=state.config.flow_steps)


def _loss(params: FQLParams, state: AgentState, batch: SequenceBatch, key: PRNGKeyArray):
    """`L_critic + L_flow + alpha L_distill + L_Q`; keys: split(key, 3) = (TD sampler, flow,
    distillation noise `z = jax.random.normal(k, (B, D))`)."""
    config: FQLConfig = state.config
    stored: FQLParams = stop_gradient_tree(state.params)
    obs = batch.observations
    td_key, flow_key, noise_key = jax.random.split(key, 3)
    loss_critic, metrics = policy_critic_term(params.critic, state, batch, act, key=td_key)
    loss_flow, flow_metrics = flow_term(
        params.actor, batch, key=flow_key, chunked=config.action_chunking
    )
    # One noise per example, shared by the teacher's ODE and the student.
    z = jax.random.normal(noise_key, (obs.shape[0], state.action_dim), obs.dtype)
    teacher = ode_actions(stored.actor, obs, z, num_steps=config.flow_steps)
    loss_policy, policy_metrics = one_step_distillation_term(
        params.one_step, stored.critic, obs, z, teacher, alpha=config.alpha
    )
    total = loss_critic + loss_flow + loss_policy
    metrics = {**metrics, **flow_metrics, **policy_metrics, "actor_loss": loss_flow + loss_policy}
    return total, dict(metrics, total_loss=total)


def update(
    state: AgentState, batch: SequenceBatch, *, key: PRNGKeyArray
) -> tuple[AgentState, dict[str, Array]]:
    """One plain-Adam step of every module on `L_critic + L_flow + alpha L_distill + L_Q`, then
    the critic's Polyak target from the pre-update parameters."""
    check_batch(batch, state)
    return gradient_step(state, lambda params: _loss(params, state, batch, key))


AGENT = Agent("fql", FQLConfig, init, update, act, bc_act)
