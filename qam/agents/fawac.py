"""FAWAC: advantage-weighted flow matching with a state value.

The advantage-weighted flow-matching baseline of the FQL paper (Park et al., "Flow Q-learning",
2025), as the QAM authors' code runs it (registered as `qam.agents.AGENTS["fawac"]`). One flow
`v_B` is trained by flow matching with advantage weights, so it fits
`pi(a|s) ∝ pi_beta(a|s) min(exp(lambda A(s, a)), 100)`; a value network `V(s)` supplies the
baseline of the advantage; the critic is a chunked TD ensemble. Per update (`s, a` the batch
observation and flattened chunk, `w = valid_{H-1}`, `E` members):

```
critic: a' = ODE_K(v_B; s', z), z ~ N(0, I)          (online flow, stored, fresh noise, clipped)
        y = R + gamma^H m (mean_e Q'_e(s', a') - rho std_e Q'_e(s', a'))          (target critic)
        L_Q = (1/(E B)) sum_b w_b sum_e (Q_e(s_b, a_b) - y_b)^2
value:  L_V = (1/(E B)) sum_b w_b sum_e (Q'_e(s_b, a_b) - V(s_b))^2   (target critic, member-wise)
actor:  A = mean_e Q_e(s, a) - V(s),  omega = min(exp(inv_temp * A), 100)  (online Q, V; stored)
        L_flow = mean_b [w_b omega_b mean_d (v_B(t, x_t, s) - (a - x_0))_d^2]
total = L_Q + L_V + L_flow, one plain Adam step (no gradient clipping)
```
Targets: the critic only (read by the TD target and the value regression). Acting: the Euler
ODE of `v_B` from `z ~ N(0, I)`, clipped to `[-1, 1]`. There is no separate behaviour-cloning
policy (the one flow is advantage-weighted), so the agent has no `bc_act`; with `inv_temp = 0`
the flow is plain behaviour cloning.
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
from ..nn import CriticEnsemble, VelocityNetwork
from ._common import flat_chunk
from ._interface import Agent, AgentConfig, AgentState, check_batch, gradient_step, init_state
from ._terms import flow_term, policy_critic_term
from ._value import ValueNetwork, advantage_weights, value_regression_term


@dataclasses.dataclass(frozen=True)
class FAWACConfig(AgentConfig):
    """Hyperparameters of FAWAC; the defaults are the reference `get_config()` (plain Adam).
    The paper's per-domain `inv_temp` (0.8 or 6.4) comes with `paper_config`."""

    flow_steps: int = 10  # K Euler steps of the flow ODE (acting and TD target)
    inv_temp: float = 10.0  # lambda: omega = min(exp(lambda * (mean_e Q - V)), 100); 0: BC

    def _checks(self) -> list[tuple[str, bool, str]]:
        return super()._checks() + [
            ("flow_steps", self.flow_steps >= 1, ">= 1"),
            ("inv_temp", 0 <= self.inv_temp < math.inf, "finite and >= 0"),
        ]


class FAWACParams(eqx.Module):
    """The trainable modules of a FAWAC agent."""

    critic: CriticEnsemble
    value: ValueNetwork  # V(s), the advantage baseline
    flow: VelocityNetwork  # v_B, advantage-weighted flow matching; the deployed policy


def init(
    key: PRNGKeyArray,
    obs_example: Float[Array, " obs"],
    action_example: Float[Array, " action"],
    config: FAWACConfig,
) -> AgentState:
    """A FAWAC agent for flat observations like `obs_example` and single actions like
    `action_example` (chunks of `config.horizon`). Target: the critic."""
    obs_dim, dim = config.dims(obs_example, action_example)
    keys = jax.random.split(key, 3)
    params = FAWACParams(
        critic=config.make_critic(obs_dim, dim, key=keys[0]),
        value=ValueNetwork(obs_dim, config.critic_hidden, layer_norm=config.critic_layer_norm,
                           layer_norm_eps=config.layer_norm_eps, key=keys[1]),
        flow=config.make_flow(obs_dim, dim, key=keys[2]),
    )  # fmt: skip
    return init_state(params, targets=("critic",), config=config, action_dim=dim)


def act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The deployed policy for one observation: `ODE_K(v_B; s, z)`, `z ~ N(0, I)` from `key`,
    clipped to `[-1, 1]^D` (stored parameters)."""
    params: FAWACParams = stop_gradient_tree(state.params)
    z = jax.random.normal(key, (state.action_dim,), obs.dtype)
    return ode_sample(params.flow, obs, noise=z, num_steps=state.config.flow_steps)


def _loss(params: FAWACParams, state: AgentState, batch: SequenceBatch, key: PRNGKeyArray):
    """`L_Q + L_V + L_flow` (see the module docstring) and their metrics."""
    config: FAWACConfig = state.config
    stored: FAWACParams = stop_gradient_tree(state.params)
    obs = batch.observations
    actions = flat_chunk(batch.actions, chunked=config.action_chunking)
    target_key, flow_key = jax.random.split(key)

    loss_q, metrics = policy_critic_term(params.critic, state, batch, act, key=target_key)
    target_q = state.targets["critic"].batched(obs, actions)
    loss_v, value_metrics = value_regression_term(params.value.batched(obs), target_q, batch)
    omega = advantage_weights(
        stored.critic.batched(obs, actions), stored.value.batched(obs), inv_temp=config.inv_temp
    )
    loss_flow, flow_metrics = flow_term(
        params.flow, batch, key=flow_key, chunked=config.action_chunking, weights=omega
    )
    total = loss_q + loss_v + loss_flow
    metrics = {**metrics, **value_metrics, **flow_metrics}
    return total, dict(metrics, weight_mean=jnp.mean(omega), total_loss=total)


def update(
    state: AgentState, batch: SequenceBatch, *, key: PRNGKeyArray
) -> tuple[AgentState, dict[str, Array]]:
    """One plain Adam step of the critic, `V` and the flow on `L_Q + L_V + L_flow`, then the
    critic's Polyak target from the pre-update parameters."""
    check_batch(batch, state)
    return gradient_step(state, lambda params: _loss(params, state, batch, key))


AGENT = Agent("fawac", FAWACConfig, init, update, act)
