"""FEdit: a behaviour-cloning flow plus a tanh-Gaussian edit policy (the edit construction of
EXPO, Dong et al., arXiv 2507.07986, and of QAM-EDIT, on a plain BC flow).

Four trainable modules: the critic ensemble `Q_e`, a behaviour-cloning flow `v_B`, an edit
policy `pi_edit(e | concat(s, a))` (tanh-Gaussian) and a temperature `log alpha` (init 0):

```
z_b ~ N(0, I_D),  a_b = ODE_K(v_B; s_b, z_b)                  (ONLINE flow, stored, clipped)
e_b ~ pi_edit(. | s_b, a_b) (reparameterised),  l_b = log pi_edit(e_b | s_b, a_b)
a~_b = clip(a_b + edit_scale * e_b, -1, 1)
L = L_critic + L_flow - mean_b mean_e Q_e(s_b, a~_b)
    + mean_b(sg(alpha) l_b) + alpha (sg(-mean_b l_b) - H_target),  H_target = -0.5 D
```

- `L_critic`: the chunked TD loss (`critic_term`) with the next chunk from the deployed sampler
  below on `s'` (fresh `z` and `e`, online networks, stored) and the pessimistic target
  `mean_e Q'_e - rho std_e Q'_e`; valid-weighted.
- `L_flow`: flow matching of `v_B` on the data chunks, valid-weighted (`flow_term`); nothing
  else trains `v_B` (it has no EMA copy: the edit is added to the online flow's actions).
- The edit terms (`edit_policy_term`, shared with QAM-EDIT) train `pi_edit` (Q and entropy)
  and `log alpha` (temperature; alpha, not log alpha, multiplies); the critic is the online
  one, stored, ensemble mean, no pessimism; not valid-weighted.

Acts with `a~` for one observation, `e` sampled (not the mode), at evaluation too; with
`best_of_n > 1` the candidate with the highest mean online Q. One plain Adam over all modules;
Polyak target of the critic only.
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
from ..nn import CriticEnsemble, TanhGaussianPolicy, VelocityNetwork
from ._interface import Agent, AgentConfig, AgentState, check_batch, gradient_step, init_state
from ._terms import (
    best_of_n,
    edit_actions,
    edit_policy_term,
    flow_term,
    ode_actions,
    policy_critic_term,
    target_entropy,
)


@dataclasses.dataclass(frozen=True)
class FEditConfig(AgentConfig):
    """FEdit's hyperparameters; the defaults are the reference's (plain Adam).

    The reference's `edit_scale` default 0 means "must be set" (the paper tunes it per domain,
    `paper_config`); here it must be > 0, and `AGENTS["fedit"].config()` sets 0.2.
    """

    flow_steps: int = 10  # K >= 1 Euler steps of the BC flow's ODE
    best_of_n: int = 1  # act with the best of n candidates under the online critic (mean)
    edit_scale: float = 0.0  # edit magnitude, a~ = clip(a + edit_scale * e) (> 0; must be set)
    edit_target_entropy: float | None = None  # entropy target; None: -multiplier * D
    edit_target_entropy_multiplier: float = 0.5  # the multiplier above

    def _checks(self) -> list[tuple[str, bool, str]]:
        return super()._checks() + [
            ("flow_steps", self.flow_steps >= 1, ">= 1"),
            ("best_of_n", self.best_of_n >= 1, ">= 1"),
            ("edit_scale", self.edit_scale > 0 and math.isfinite(self.edit_scale),
             "finite and > 0 (the reference's default 0 means 'must be set')"),
            ("edit_target_entropy", self.edit_target_entropy is None
             or math.isfinite(self.edit_target_entropy), "None or finite"),
            ("edit_target_entropy_multiplier", math.isfinite(self.edit_target_entropy_multiplier),
             "finite"),
        ]  # fmt: skip


class FEditParams(eqx.Module):
    """The trainable modules of FEdit."""

    critic: CriticEnsemble
    bc_flow: VelocityNetwork  # the behaviour-cloning flow v_B (flow matching only)
    edit: TanhGaussianPolicy  # pi_edit(e | concat(s, a))
    log_alpha: Float[Array, ""]  # the edit policy's entropy temperature


def init(
    key: PRNGKeyArray,
    obs_example: Float[Array, " obs"],
    action_example: Float[Array, " action"],
    config: FEditConfig,
) -> AgentState:
    """An FEdit agent for flat observations like `obs_example` and single actions like
    `action_example` (chunks of `config.horizon` of them). Target: the critic."""
    obs_dim, dim = config.dims(obs_example, action_example)
    critic_key, flow_key, edit_key = jax.random.split(key, 3)
    edit = TanhGaussianPolicy(obs_dim + dim, dim, config.actor_hidden, key=edit_key)
    params = FEditParams(
        config.make_critic(obs_dim, dim, key=critic_key),
        config.make_flow(obs_dim, dim, key=flow_key), edit, jnp.zeros(()),
    )  # fmt: skip
    return init_state(params, targets=("critic",), config=config, action_dim=dim)


def act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The deployed policy for one observation: `clip(a + edit_scale * e, -1, 1)` with
    `a = ODE_K(v_B; s, z)`, `(z key, e key) = split(key)`, `z ~ N(0, I)`, `e ~ pi_edit(. | s, a)`
    (sampled), stored parameters; with `best_of_n > 1` the candidate with the highest mean
    online Q (candidate `i` from `split(key, n)[i]`). Also the TD target's sampler."""
    params: FEditParams = stop_gradient_tree(state.params)
    config: FEditConfig = state.config

    def sample(k):
        noise_key, edit_key = jax.random.split(k)
        z = jax.random.normal(noise_key, (state.action_dim,), obs.dtype)
        a = ode_sample(params.bc_flow, obs, noise=z, num_steps=config.flow_steps)
        return edit_actions(params.edit, obs, a, edit_scale=config.edit_scale, key=edit_key)[0]

    score = lambda a: jnp.mean(params.critic(obs, a))
    return best_of_n(sample, score, key=key, n=config.best_of_n)


def bc_act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The behaviour-cloning policy: `ODE_K(v_B; s, z)` from `z = jax.random.normal(key, (D,))`
    (no edit, no best-of-n)."""
    params: FEditParams = stop_gradient_tree(state.params)
    z = jax.random.normal(key, (state.action_dim,), obs.dtype)
    return ode_sample(params.bc_flow, obs, noise=z, num_steps=state.config.flow_steps)


def _loss(params: FEditParams, state: AgentState, batch: SequenceBatch, key: PRNGKeyArray):
    """`L_critic + L_flow + L_edit`; keys: split(key, 4) = (TD sampler, flow, flow-action noise
    `z = jax.random.normal(k, (B, D))`, edit)."""
    config: FEditConfig = state.config
    stored: FEditParams = stop_gradient_tree(state.params)
    obs = batch.observations
    td_key, flow_key, noise_key, edit_key = jax.random.split(key, 4)
    loss_critic, metrics = policy_critic_term(params.critic, state, batch, act, key=td_key)
    loss_flow, flow_metrics = flow_term(
        params.bc_flow, batch, key=flow_key, chunked=config.action_chunking
    )
    z = jax.random.normal(noise_key, (obs.shape[0], state.action_dim), obs.dtype)
    flow_actions = ode_actions(stored.bc_flow, obs, z, num_steps=config.flow_steps)
    loss_edit, edit_metrics = edit_policy_term(
        params.edit, params.log_alpha, stored.critic, obs, flow_actions, key=edit_key,
        edit_scale=config.edit_scale,
        entropy_target=target_entropy(
            state.action_dim, value=config.edit_target_entropy,
            multiplier=config.edit_target_entropy_multiplier,
        ),
    )  # fmt: skip
    total = loss_critic + loss_flow + loss_edit
    metrics = {**metrics, **flow_metrics, **edit_metrics, "actor_loss": loss_flow + loss_edit}
    return total, dict(metrics, total_loss=total)


def update(
    state: AgentState, batch: SequenceBatch, *, key: PRNGKeyArray
) -> tuple[AgentState, dict[str, Array]]:
    """One plain-Adam step of every module on `L_critic + L_flow + L_edit`, then the critic's
    Polyak target from the pre-update parameters."""
    check_batch(batch, state)
    return gradient_step(state, lambda params: _loss(params, state, batch, key))


AGENT = Agent("fedit", FEditConfig, init, update, act, bc_act, {"edit_scale": 0.2})
