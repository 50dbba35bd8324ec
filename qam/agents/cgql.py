"""CGQL, CGQL-MSE and CGQL-Linex: a behaviour-cloning flow steered at sampling time by the
action gradient of a time-conditioned critic (classifier guidance with `Q` as the classifier).

Three registered agents (`qam.agents.AGENTS["cgql" | "cgql-mse" | "cgql-linex"]`), one
`CGQLConfig` whose `mode` names the method. Two trainable modules and a Polyak target of each:
a time-conditioned critic ensemble `Q_e(s, a, t)` (a `CriticEnsemble` over `D + 1` action
inputs called on `concat(a, t)`, see `time_conditioned_q`) and a behaviour-cloning flow `v_B`.
There is no other actor: the policy is the guided ODE

```
S(s):  x_0 = z ~ N(0, I_D);  for i = 0 .. K-1, t_i = i/K:
           v_i = v_B'(t_i, x_i, s)                                (EMA flow if target_guidance)
           if lambda > 0 and i > 0:
               v_i += theta (lambda (1 - t_i) grad_x mean_e Q_e(s, x_i, c_i) + x_i) / t_i
           x_{i+1} = x_i + v_i / K
       a = clip(x_K, -1, 1)
```
with `theta = guidance_coef`, `lambda = inv_temp`, the ONLINE critic (stored), and critic time
`c_i = 1` in mode "simple" or `c_i = t_i` in modes "mse" and "linex" (`guided_ode_sample`).

Loss (one plain Adam step on the sum):

```
TD:     a' = S(s') (stored parameters, fresh noise)
        y  = R + gamma^H m (mean_e Q'_e(s', a', 1) - rho std_e Q'_e(s', a', 1))
        L_TD = (1/(E B)) sum_{e,b} w_b (Q_e(s_b, a_b, 1) - y_b)^2
noisy ("mse", "linex" only): L_noisy = noisy_critic_term: Q_e(s, (1-u) eps + u a, u) regressed
        onto Q'_e(s, a, 1) member by member, squared or linex loss (lambda, isd_clip)
flow:   L_flow = flow matching of v_B on the data chunks (valid-weighted)
L = L_TD + noisy_coef L_noisy + L_flow
```

- One network is both the TD critic (at `t = 1`) and the noisy critic (at `t = u`); "simple"
  trains it only at `t = 1` and still evaluates that clean-action critic on the noisy `x_i`
  during guidance.
- The `x_i / t_i` part of the guidance field acts even where `grad Q = 0`: over `K = 10` steps
  it scales samples (about the origin) by about `prod_{i=1}^{K-1} (1 + theta / i)` (x1.34 at
  `theta = 0.1`, x10.8 at `theta = 1`; see `guided_ode_sample`). The paper's `theta = 1` runs
  (CGQL-MSE/-Linex on puzzle-4x4) are dominated by it.
- Linex (`linex_loss`): its minimiser is the noisy-action log-partition
  `(1/lambda) log E[exp(lambda Q'(s, a, 1)) | x_u]`; its linear branch (`delta > isd_clip`) is
  not slope-matched to the exponential one, as in the authors' code.
- `inv_temp = 0` makes `S` the plain ODE of `v_B'`. With `best_of_n > 1`, `S` keeps the
  candidate with the highest `mean_e Q_e(s, a, 1)` (online critic).
- Not ported: the authors' `separate=True` option (a separate time-free TD critic plus a
  `d_critic`) is broken there (the sampler and the TD target still call the critic with a time
  input it was not built with, and `d_critic` is never trained).
"""

import dataclasses
import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._flow import ode_sample
from .._misc import stop_gradient_tree
from ..data import SequenceBatch
from ..nn import CriticEnsemble, VelocityNetwork
from ._common import flat_chunk
from ._guidance import (
    guided_ode_sample,
    noisy_critic_term,
    time_conditioned_q,
    time_conditioned_q_batched,
)
from ._interface import Agent, AgentConfig, AgentState, check_batch, gradient_step, init_state
from ._terms import aggregate_q, best_of_n, flow_term, td_term


Mode = Literal["simple", "mse", "linex"]
MODES: tuple[str, ...] = ("simple", "mse", "linex")


@dataclasses.dataclass(frozen=True)
class CGQLConfig(AgentConfig):
    """CGQL's hyperparameters; the defaults are the reference `get_config()` (plain Adam).

    The paper runs set `inv_temp = 10` in all three modes (the per-domain presets do), with the
    per-domain `guidance_coef` (and `noisy_coef` for "mse" / "linex").
    """

    mode: Mode = "simple"  # simple: critic at t = 1 only; mse / linex: noisy critic regression
    guidance_coef: float = 0.1  # theta: weight of the guidance field (x/t term included)
    inv_temp: float = 1.0  # lambda: critic gradient scale; 0 turns guidance off
    noisy_coef: float = 0.001  # eta: weight of the noisy-critic loss (mse / linex only)
    isd_clip: float = 5.0  # linex: delta above this takes the linear branch
    target_guidance: bool = True  # base of the guided ODE: the EMA BC flow (else online)
    flow_steps: int = 10  # K >= 1 Euler steps of the guided ODE
    best_of_n: int = 1  # act with the best of n candidates, mean_e Q_e(s, a, 1)

    def _checks(self) -> list[tuple[str, bool, str]]:
        finite = math.isfinite
        return super()._checks() + [
            ("mode", self.mode in MODES, f"one of {', '.join(MODES)}"),
            ("guidance_coef", self.guidance_coef >= 0 and finite(self.guidance_coef),
             "finite and >= 0"),
            ("inv_temp", self.inv_temp >= 0 and finite(self.inv_temp), "finite and >= 0"),
            ("noisy_coef", self.noisy_coef >= 0 and finite(self.noisy_coef), "finite and >= 0"),
            ("isd_clip", self.isd_clip > 0 and finite(self.isd_clip), "finite and > 0"),
            ("flow_steps", self.flow_steps >= 1, ">= 1"),
            ("best_of_n", self.best_of_n >= 1, ">= 1"),
        ]  # fmt: skip


class CGQLParams(eqx.Module):
    """The trainable modules of CGQL."""

    critic: CriticEnsemble  # time-conditioned: action input concat(a, t), size D + 1
    actor: VelocityNetwork  # the behaviour-cloning flow v_B (flow matching only)


def init(
    key: PRNGKeyArray,
    obs_example: Float[Array, " obs"],
    action_example: Float[Array, " action"],
    config: CGQLConfig,
) -> AgentState:
    """A CGQL agent for flat observations like `obs_example` and single actions like
    `action_example` (chunks of `config.horizon` of them). Targets: the critic and the flow."""
    obs_dim, dim = config.dims(obs_example, action_example)
    critic_key, actor_key = jax.random.split(key)
    params = CGQLParams(
        config.make_critic(obs_dim, dim + 1, key=critic_key),
        config.make_flow(obs_dim, dim, key=actor_key),
    )
    return init_state(params, targets=("critic", "actor"), config=config, action_dim=dim)


def act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The deployed policy for one observation: the guided ODE `S(s)` from
    `z = jax.random.normal(key, (D,))` (base `v_B'` if `target_guidance`, the online critic's
    gradient, stored parameters); with `best_of_n > 1` the candidate (from `split(key, n)`)
    with the highest `mean_e Q_e(s, a, 1)`. Also the TD target's sampler."""
    params: CGQLParams = stop_gradient_tree(state.params)
    config: CGQLConfig = state.config
    base = stop_gradient_tree(state.targets["actor"]) if config.target_guidance else params.actor

    def sample(k):
        z = jax.random.normal(k, (state.action_dim,), obs.dtype)
        return guided_ode_sample(
            base, params.critic, obs, noise=z, num_steps=config.flow_steps,
            guidance_coef=config.guidance_coef, inv_temp=config.inv_temp,
            critic_time="one" if config.mode == "simple" else "flow",
        )  # fmt: skip

    score = lambda a: jnp.mean(time_conditioned_q(params.critic, obs, a, 1.0))
    return best_of_n(sample, score, key=key, n=config.best_of_n)


def bc_act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The behaviour-cloning policy: the online flow's plain `ODE_K(v_B; s, z)` from
    `z = jax.random.normal(key, (D,))` (no guidance, no best-of-n). (`act` with `inv_temp = 0`
    is the same ODE of the EMA flow `v_B'`.)"""
    params: CGQLParams = stop_gradient_tree(state.params)
    z = jax.random.normal(key, (state.action_dim,), obs.dtype)
    return ode_sample(params.actor, obs, noise=z, num_steps=state.config.flow_steps)


def _loss(params: CGQLParams, state: AgentState, batch: SequenceBatch, key: PRNGKeyArray):
    """`L_TD + noisy_coef L_noisy (mse / linex) + L_flow`; keys: split(key, 3) = (TD sampler,
    noisy-critic draws, flow)."""
    config: CGQLConfig = state.config
    obs = batch.observations
    batch_size = obs.shape[0]
    actions = flat_chunk(batch.actions, chunked=config.action_chunking)
    td_key, noisy_key, flow_key = jax.random.split(key, 3)

    # TD at t = 1 with the next chunk from the guided sampler (stored parameters).
    next_obs = batch.next_observations[:, -1]
    next_actions = jax.vmap(lambda o, k: act(state, o, key=k))(
        next_obs, jax.random.split(td_key, batch_size)
    )
    ones = jnp.ones((batch_size,), actions.dtype)
    target_critic = stop_gradient_tree(state.targets["critic"])
    next_q = time_conditioned_q_batched(target_critic, next_obs, next_actions, ones)
    next_value = aggregate_q(next_q, how="pessimistic", rho=config.rho)
    q = time_conditioned_q_batched(params.critic, obs, actions, ones)
    total, metrics = td_term(q, batch, next_value, discount=config.discount)

    if config.mode != "simple":
        loss_noisy, noisy_metrics = noisy_critic_term(
            params.critic, target_critic, obs, actions, batch.valid[:, -1], key=noisy_key,
            loss="mse" if config.mode == "mse" else "linex", inv_temp=config.inv_temp,
            isd_clip=config.isd_clip,
        )  # fmt: skip
        total = total + config.noisy_coef * loss_noisy
        metrics.update(noisy_metrics)

    loss_flow, flow_metrics = flow_term(
        params.actor, batch, key=flow_key, chunked=config.action_chunking
    )
    total = total + loss_flow
    metrics = {**metrics, **flow_metrics, "total_loss": total}
    return total, metrics


def update(
    state: AgentState, batch: SequenceBatch, *, key: PRNGKeyArray
) -> tuple[AgentState, dict[str, Array]]:
    """One plain-Adam step of the critic and the flow on `L_TD + noisy_coef L_noisy + L_flow`,
    then the Polyak targets of both from the pre-update parameters."""
    check_batch(batch, state)
    return gradient_step(state, lambda params: _loss(params, state, batch, key))


CGQL = Agent("cgql", CGQLConfig, init, update, act, bc_act, {"mode": "simple"})
CGQL_MSE = Agent("cgql-mse", CGQLConfig, init, update, act, bc_act, {"mode": "mse"})
CGQL_LINEX = Agent("cgql-linex", CGQLConfig, init, update, act, bc_act, {"mode": "linex"})
