"""FBRAC: a behaviour-cloning flow that also maximises Q by backpropagation through its ODE.

One flow `v` is the policy. It is trained by flow matching on the data and, at the same time,
by the critic's value of its own ODE actions, differentiated through all `K` Euler steps:

```
y_0 = z_b ~ N(0, I),  y_{i+1} = y_i + h v(t_i, y_i, s_b),  t_i = i h,  h = 1 / K
a_b = ODE_K(v; s_b, z_b) = clip(y_K, -1, 1)
L   = L_critic + L_flow - mean_b mean_e Q_e(s_b, a_b) / alpha
```

- `L_critic`: the chunked TD loss (`critic_term`) with the next chunk from the same ODE
  (online flow, stored) and the pessimistic target `mean_e Q'_e - rho std_e Q'_e`.
- `L_flow`: flow matching of `v` on the data chunks, valid-weighted (`flow_term`).
- The Q term (`ode_bptt_term`): the **online** critic, stored, ensemble mean, no pessimism,
  not valid-weighted; the gradient reaches `v` through every step and through the final clip
  (zero for coordinates outside the box). `alpha` **divides** it: a larger `alpha` is closer
  to behaviour cloning (`alpha = 0.03` weighs Q 33 times more than `alpha = 1`).

Acts with `ODE_K(v; s, z)`. One plain Adam over both modules; Polyak target of the critic only.
There is no separate behaviour-cloning policy (`bc_act` is `None`): the only flow is the
Q-trained one.
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
from ._bptt import ode_bptt_term
from ._interface import Agent, AgentConfig, AgentState, check_batch, gradient_step, init_state
from ._terms import best_of_n, flow_term, policy_critic_term


@dataclasses.dataclass(frozen=True)
class FBRACConfig(AgentConfig):
    """FBRAC's hyperparameters; the defaults are the reference's (plain Adam)."""

    alpha: float = 100.0  # divides the Q term: L_flow - mean Q / alpha (larger: closer to BC)
    flow_steps: int = 10  # K >= 1 Euler steps of the policy's ODE
    best_of_n: int = 1  # act with the best of n candidates under the online critic (mean)

    def _checks(self) -> list[tuple[str, bool, str]]:
        return super()._checks() + [
            ("alpha", self.alpha > 0 and math.isfinite(self.alpha), "finite and > 0"),
            ("flow_steps", self.flow_steps >= 1, ">= 1"),
            ("best_of_n", self.best_of_n >= 1, ">= 1"),
        ]


class FBRACParams(eqx.Module):
    """The trainable modules of FBRAC."""

    critic: CriticEnsemble
    actor: VelocityNetwork  # the flow policy v: flow matching plus BPTT of Q


def init(
    key: PRNGKeyArray,
    obs_example: Float[Array, " obs"],
    action_example: Float[Array, " action"],
    config: FBRACConfig,
) -> AgentState:
    """An FBRAC agent for flat observations like `obs_example` and single actions like
    `action_example` (chunks of `config.horizon` of them). Target: the critic."""
    obs_dim, dim = config.dims(obs_example, action_example)
    critic_key, actor_key = jax.random.split(key)
    params = FBRACParams(
        config.make_critic(obs_dim, dim, key=critic_key),
        config.make_flow(obs_dim, dim, key=actor_key),
    )
    return init_state(params, targets=("critic",), config=config, action_dim=dim)


def act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The policy for one observation: `ODE_K(v; s, z)` from `z = jax.random.normal(key, (D,))`
    (clipped to `[-1, 1]`), stored parameters; with `best_of_n > 1` the candidate with the
    highest mean online Q. Also the TD target's sampler."""
    params: FBRACParams = stop_gradient_tree(state.params)
    config: FBRACConfig = state.config

    def sample(k):
        z = jax.random.normal(k, (state.action_dim,), obs.dtype)
        return ode_sample(params.actor, obs, noise=z, num_steps=config.flow_steps)

    score = lambda a: jnp.mean(params.critic(obs, a))
    return best_of_n(sample, score, key=key, n=config.best_of_n)


def _loss(params: FBRACParams, state: AgentState, batch: SequenceBatch, key: PRNGKeyArray):
    """`L_critic + L_flow + L_Q / alpha`; keys: split(key, 3) = (TD sampler, flow, BPTT noise)."""
    config: FBRACConfig = state.config
    stored: FBRACParams = stop_gradient_tree(state.params)
    obs = batch.observations
    td_key, flow_key, bptt_key = jax.random.split(key, 3)
    loss_critic, metrics = policy_critic_term(params.critic, state, batch, act, key=td_key)
    loss_flow, flow_metrics = flow_term(
        params.actor, batch, key=flow_key, chunked=config.action_chunking
    )
    loss_q, q_metrics = ode_bptt_term(
        params.actor, stored.critic, obs, key=bptt_key, action_dim=state.action_dim,
        num_steps=config.flow_steps,
    )  # fmt: skip
    actor_loss = loss_flow + loss_q / config.alpha
    total = loss_critic + actor_loss
    metrics = {**metrics, **flow_metrics, **q_metrics, "actor_loss": actor_loss}
    return total, dict(metrics, total_loss=total)


def update(
    state: AgentState, batch: SequenceBatch, *, key: PRNGKeyArray
) -> tuple[AgentState, dict[str, Array]]:
    """One plain-Adam step of the critic and the flow on `L_critic + L_flow - mean Q / alpha`,
    then the critic's Polyak target from the pre-update parameters."""
    check_batch(batch, state)
    return gradient_step(state, lambda params: _loss(params, state, batch, key))


AGENT = Agent("fbrac", FBRACConfig, init, update, act, None)
