"""IFQL: implicit Q-learning values with rejection sampling from a behaviour-cloning flow.

The flow variant of IDQL (registered as `qam.agents.AGENTS["ifql"]`): the critic learns by
expectile regression without ever querying a policy, the flow `v_B` is pure behaviour cloning,
and acting draws `N` chunks from the flow and keeps the one the critic ensemble's *minimum*
rates highest. Per update (`s, a` the batch observation and flattened chunk,
`w = valid_{H-1}`, `E` members):

```
value:  q = mean_e Q'_e(s, a) - rho std_e Q'_e(s, a)                  (target critic, data chunk)
        L_V = mean_b |kappa - 1(q_b < V(s_b))| (q_b - V(s_b))^2        (no valid weighting)
critic: L_Q = (1/(E B)) sum_b w_b sum_e (Q_e(s, a) - R - gamma^H m V(s'))^2   (V stored, no rho)
actor:  L_flow = mean_b [w_b mean_d (v_B(t, x_t, s) - (a - x_0))_d^2]   (no critic term)
total = L_V + L_Q + L_flow, one plain Adam step (no gradient clipping)
acting: c_n = ODE_K(v_B; s, z_n), z_n ~ N(0, I), n = 1..N
        a = c_{n*},  n* = argmax_n min_e Q_e(s, c_n)                     (online critic, stored)
```
Targets: the critic only (read by the value regression). Acting uses the online critic and
flow (stored) and one observation, the only case the reference supports (its sampler draws the
candidates along an axis that is consistent only for an unbatched observation).
"""

import dataclasses

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from .._flow import ode_sample
from .._misc import stop_gradient_tree
from ..data import SequenceBatch
from ..nn import CriticEnsemble, VelocityNetwork
from ._common import flat_chunk
from ._interface import Agent, AgentConfig, AgentState, check_batch, gradient_step, init_state
from ._terms import aggregate_q, best_of_n, flow_term, td_term
from ._value import ValueNetwork, expectile_value_term


@dataclasses.dataclass(frozen=True)
class IFQLConfig(AgentConfig):
    """Hyperparameters of IFQL; the defaults are the reference `get_config()` (plain Adam).
    The paper's per-domain `kappa` comes with `paper_config`."""

    flow_steps: int = 10  # K Euler steps of the behaviour flow's ODE
    kappa: float = 0.9  # expectile of the value regression, in (0, 1); 0.5: the mean
    num_samples: int = 32  # N candidate chunks per action; the best under min_e Q is executed

    def _checks(self) -> list[tuple[str, bool, str]]:
        return super()._checks() + [
            ("flow_steps", self.flow_steps >= 1, ">= 1"),
            ("kappa", 0.0 < self.kappa < 1.0, "in (0, 1)"),
            ("num_samples", self.num_samples >= 1, ">= 1"),
        ]


class IFQLParams(eqx.Module):
    """The trainable modules of an IFQL agent."""

    critic: CriticEnsemble
    value: ValueNetwork  # V(s), an upper expectile of the target critic; the TD bootstrap
    flow: VelocityNetwork  # v_B, behaviour cloning; the source of the candidates


def init(
    key: PRNGKeyArray,
    obs_example: Float[Array, " obs"],
    action_example: Float[Array, " action"],
    config: IFQLConfig,
) -> AgentState:
    """An IFQL agent for flat observations like `obs_example` and single actions like
    `action_example` (chunks of `config.horizon`). Target: the critic."""
    obs_dim, dim = config.dims(obs_example, action_example)
    keys = jax.random.split(key, 3)
    params = IFQLParams(
        critic=config.make_critic(obs_dim, dim, key=keys[0]),
        value=ValueNetwork(obs_dim, config.critic_hidden, layer_norm=config.critic_layer_norm,
                           layer_norm_eps=config.layer_norm_eps, key=keys[1]),
        flow=config.make_flow(obs_dim, dim, key=keys[2]),
    )  # fmt: skip
    return init_state(params, targets=("critic",), config=config, action_dim=dim)


def bc_act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The behaviour-cloning policy: `ODE_K(v_B; s, z)`, `z ~ N(0, I)` from `key`, clipped
    to `[-1, 1]^D` (stored parameters). One candidate of `act`."""
    params: IFQLParams = stop_gradient_tree(state.params)
    z = jax.random.normal(key, (state.action_dim,), obs.dtype)
    return ode_sample(params.flow, obs, noise=z, num_steps=state.config.flow_steps)


def act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The deployed policy for one observation: of the `num_samples` candidates
    `bc_act(state, obs, key=k_n)`, `k_n` the splits of `key`, the one with the highest
    `min_e Q_e(s, c_n)` under the online critic (stored parameters)."""
    critic = stop_gradient_tree(state.params.critic)
    return best_of_n(
        lambda k: bc_act(state, obs, key=k),
        lambda a: aggregate_q(critic(obs, a), how="min"),
        key=key, n=state.config.num_samples,
    )  # fmt: skip


def _loss(params: IFQLParams, state: AgentState, batch: SequenceBatch, key: PRNGKeyArray):
    """`L_V + L_Q + L_flow` (see the module docstring) and their metrics."""
    config: IFQLConfig = state.config
    stored: IFQLParams = stop_gradient_tree(state.params)
    obs = batch.observations
    actions = flat_chunk(batch.actions, chunked=config.action_chunking)

    target_q = state.targets["critic"].batched(obs, actions)
    loss_v, metrics = expectile_value_term(
        params.value.batched(obs),
        aggregate_q(target_q, how="pessimistic", rho=config.rho),
        kappa=config.kappa,
    )
    next_v = stored.value.batched(batch.next_observations[:, -1])
    loss_q, critic_metrics = td_term(
        params.critic.batched(obs, actions), batch, next_v, discount=config.discount
    )
    loss_flow, flow_metrics = flow_term(params.flow, batch, key=key, chunked=config.action_chunking)
    total = loss_v + loss_q + loss_flow
    metrics = {**metrics, **critic_metrics, **flow_metrics}
    return total, dict(metrics, total_loss=total)


def update(
    state: AgentState, batch: SequenceBatch, *, key: PRNGKeyArray
) -> tuple[AgentState, dict[str, Array]]:
    """One plain Adam step of `V`, the critic and the flow on `L_V + L_Q + L_flow`, then the
    critic's Polyak target from the pre-update parameters."""
    check_batch(batch, state)
    return gradient_step(state, lambda params: _loss(params, state, batch, key))


AGENT = Agent("ifql", IFQLConfig, init, update, act, bc_act)
