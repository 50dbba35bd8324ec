"""BAM ("basic adjoint matching"): a fine-tuned flow trained by backpropagation through the
memoryless SDE of its behaviour-cloning base (docs/mathematics.md §2).

Networks as QAM's: the critic ensemble, a behaviour-cloning flow `actor_slow` (`v_B^on`) whose
EMA copy `v_B` is the base of the SDE (`target_actor`, the default; else `v_B^on` itself), and
a fine-tuned flow `actor_fast` (`v_theta`, randomly initialised). With the noise held fixed:

```
X_0 ~ N(0, I)
X_{i+1} = X_i + h (2 v_theta(t_i, X_i) - X_i / (t_i + h)) + sqrt(h) sigma_i xi_i,   i < K - 1
X_K = X_{K-1} + h v_B(t_{K-1}, X_{K-1})
L = L_critic + L_flow - inv_temp * mean_b [mean_e Q_e - rho std_e Q_e](s_b, X_K)
                      + mean_b sum_{i<K-1} 2 ||v_theta(t_i, X_i) - v_B(t_i, X_i)||^2 / sigma_i^2
```

- `L_critic`: the chunked TD loss (`critic_term`) with the next chunk from the deployed ODE
  (stored) and the pessimistic target; `L_flow`: flow matching of `actor_slow`, valid-weighted.
- The BAM term (`sde_bptt_term`) trains `actor_fast` only, by reverse mode through the whole
  rollout (the basic discrete adjoint, `qam.basic_adjoint`). The reward is the **online**
  critic, stored, **pessimistic** (`- rho std`), at the **unclipped** `X_K`; the base passes
  gradients through its state input but not into its parameters; not valid-weighted.
- The running cost has **no factor h** (the reference's), so `inv_temp` here is `K` times a
  QAM-scale temperature: BAM with `inv_temp = lambda` tilts toward `exp((lambda / K) Q)`. The
  paper's values 10 and 30 at `K = 10` are QAM's 1 and 3.
- `residual=True`: `actor_fast` parametrises `v_theta - v_B` (drift `v_theta + v_B`, running
  cost `2 ||v_theta||^2 / sigma_i^2`).

Acts with the Euler ODE of `actor_fast` (`actor_fast + actor_slow` when residual, the online
slow flow), or of `actor_slow` when `inv_temp = 0`, as the reference. One optimiser with
global-norm clipping at 1.0; Polyak targets of the critic and `actor_slow`.
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
from ._bptt import sde_bptt_term
from ._interface import Agent, AgentConfig, AgentState, check_batch, gradient_step, init_state
from ._terms import best_of_n, flow_term, policy_critic_term


@dataclasses.dataclass(frozen=True)
class BAMConfig(AgentConfig):
    """BAM's hyperparameters; the defaults are the reference's."""

    clip_grad: bool = True  # global-norm clip 1.0 on the concatenated gradient
    flow_steps: int = 10  # K >= 2: K - 1 noisy SDE steps, then one deterministic base step
    best_of_n: int = 1  # act with the best of n candidates under the online critic (mean)
    inv_temp: float = 0.3  # reward weight lambda (K times QAM's scale); 0: act with actor_slow
    target_actor: bool = True  # SDE base = EMA behaviour flow (else the online one)
    residual: bool = False  # actor_fast parametrises v_fine - v_B

    def _checks(self) -> list[tuple[str, bool, str]]:
        return super()._checks() + [
            ("flow_steps", self.flow_steps >= 2,
             ">= 2 (with one step the rollout has no noisy step and actor_fast no gradient)"),
            ("best_of_n", self.best_of_n >= 1, ">= 1"),
            ("inv_temp", self.inv_temp >= 0 and math.isfinite(self.inv_temp), "finite and >= 0"),
        ]  # fmt: skip


class BAMParams(eqx.Module):
    """The trainable modules of BAM."""

    critic: CriticEnsemble
    actor_slow: VelocityNetwork  # behaviour-cloning flow v_B^on (its EMA is the SDE base)
    actor_fast: VelocityNetwork  # fine-tuned flow v_theta (BPTT through the SDE)


def init(
    key: PRNGKeyArray,
    obs_example: Float[Array, " obs"],
    action_example: Float[Array, " action"],
    config: BAMConfig,
) -> AgentState:
    """A BAM agent for flat observations like `obs_example` and single actions like
    `action_example` (chunks of `config.horizon` of them). Targets: the critic and
    `actor_slow`."""
    obs_dim, dim = config.dims(obs_example, action_example)
    keys = jax.random.split(key, 3)
    params = BAMParams(
        config.make_critic(obs_dim, dim, key=keys[0]),
        config.make_flow(obs_dim, dim, key=keys[1]),
        config.make_flow(obs_dim, dim, key=keys[2]),  # actor_fast: random, not a copy
    )
    return init_state(params, targets=("critic", "actor_slow"), config=config, action_dim=dim)


def _deployed_velocity(params: BAMParams, config: BAMConfig):
    if config.inv_temp == 0:
        return params.actor_slow
    if config.residual:
        fast, slow = params.actor_fast, params.actor_slow
        return lambda t, x, obs: fast(t, x, obs) + slow(t, x, obs)
    return params.actor_fast


def act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The deployed policy for one observation: the clipped Euler ODE of `actor_fast` (see the
    module docstring for residual mode and `inv_temp = 0`) from
    `z = jax.random.normal(key, (D,))`, stored parameters; with `best_of_n > 1` the candidate
    with the highest mean online Q. Also the TD target's sampler."""
    params: BAMParams = stop_gradient_tree(state.params)
    config: BAMConfig = state.config
    velocity = _deployed_velocity(params, config)

    def sample(k):
        z = jax.random.normal(k, (state.action_dim,), obs.dtype)
        return ode_sample(velocity, obs, noise=z, num_steps=config.flow_steps)

    score = lambda a: jnp.mean(params.critic(obs, a))
    return best_of_n(sample, score, key=key, n=config.best_of_n)


def bc_act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The behaviour-cloning policy: the Euler ODE of `actor_slow` from
    `z = jax.random.normal(key, (D,))` (no best-of-n)."""
    params: BAMParams = stop_gradient_tree(state.params)
    z = jax.random.normal(key, (state.action_dim,), obs.dtype)
    return ode_sample(params.actor_slow, obs, noise=z, num_steps=state.config.flow_steps)


def _loss(params: BAMParams, state: AgentState, batch: SequenceBatch, key: PRNGKeyArray):
    """`L_critic + L_flow + L_BAM`; keys: split(key, 3) = (TD sampler, flow, SDE noise)."""
    config: BAMConfig = state.config
    obs = batch.observations
    td_key, flow_key, sde_key = jax.random.split(key, 3)
    loss_critic, metrics = policy_critic_term(params.critic, state, batch, act, key=td_key)
    loss_flow, flow_metrics = flow_term(
        params.actor_slow, batch, key=flow_key, chunked=config.action_chunking
    )
    loss_bam, bam_metrics = sde_bptt_term(
        params.actor_fast,
        state.targets["actor_slow"] if config.target_actor else state.params.actor_slow,
        state.params.critic, obs, key=sde_key, action_dim=state.action_dim,
        num_steps=config.flow_steps, inv_temp=config.inv_temp, rho=config.rho,
        residual=config.residual,
    )  # fmt: skip
    total = loss_critic + loss_flow + loss_bam
    return total, {**metrics, **flow_metrics, **bam_metrics, "total_loss": total}


def update(
    state: AgentState, batch: SequenceBatch, *, key: PRNGKeyArray
) -> tuple[AgentState, dict[str, Array]]:
    """One clipped-Adam step of every module on `L_critic + L_flow + L_BAM`, then the Polyak
    targets of the critic and `actor_slow` from the pre-update parameters."""
    check_batch(batch, state)
    return gradient_step(state, lambda params: _loss(params, state, batch, key))


AGENT = Agent("bam", BAMConfig, init, update, act, bc_act)
