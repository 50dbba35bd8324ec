"""ReBRAC: a deterministic tanh actor with behaviour cloning and target-policy smoothing.

Two networks, each with a Polyak target: the critic ensemble `Q_e` and a deterministic actor
`mu(s) = tanh(W phi(s))` (`qam.nn.DeterministicTanhPolicy`, head scaled by `actor_fc_scale`).
Per update (`s, a` the batch observation and flattened chunk, `R, m, w, s'` the chunk's last
step, `xi ~ N(0, I_D)`, `sigma = actor_noise`, `c = actor_noise_clip`):

```
critic: a'_b = clip(mu'(s'_b) + clip(sigma xi_b, -c, c), -1, 1)      (TARGET actor, stored)
        y_b  = R_b + gamma^H m_b (mean_e Q'_e(s'_b, a'_b) - rho std_e Q'_e(s'_b, a'_b))
        L_Q  = (1/(E B)) sum_b w_b sum_e (Q_e(s_b, a_b) - y_b)^2
actor:  a^_b = mu(s_b),  q_b = mean_e Q_e(s_b, a^_b) - rho std_e Q_e(s_b, a^_b)   (ONLINE, stored)
        lambda = sg(1 / mean_b |q_b|)
        L_actor = -mean_b(lambda q_b) + alpha_actor mean_b(w_b sum_d (a^_{b,d} - a_{b,d})^2)
total = L_Q + L_actor, one plain Adam step over both modules
```
The Q term is not valid-weighted, the BC term is (and sums over all `D` chunk coordinates);
`lambda` makes the Q term invariant to the critic's scale. Targets: `theta' <- tau theta_pre +
(1 - tau) theta'` for the critic and the actor only on updates `k % actor_freq == 0` (`k = 1, 2,
...` the update count; the reference's online loop takes one flag per environment step for all
its `utd_ratio` updates, the same at the paper's ratio of 1). Acting, online and at evaluation:
`clip(mu(s) + clip(sigma xi, -c, c), -1, 1)` (deterministic when `sigma = 0`). There is no
behaviour-cloning policy (`bc_act` is `None`).

Where this differs from the paper's text (the defaults are what the authors' code ran):

- **The actor is not delayed.** The paper states an actor delay of 2 ("following the original
  paper"); the authors' code trains the actor at every update and delays only the targets.
  `delay_actor=True` gives the stated behaviour: the actor's parameters and Adam moments are
  held on updates with `k % actor_freq != 0` (the optimiser's shared step count still advances,
  so the actor's bias correction uses `k`).
- **No critic BC penalty.** Original ReBRAC also penalises the TD target by the next action's
  distance to the data; this agent, like the authors' code, has only the actor's BC term.
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._misc import stop_gradient_tree
from ..data import SequenceBatch
from ..nn import CriticEnsemble, DeterministicTanhPolicy
from ._common import flat_chunk
from ._interface import (
    Agent,
    AgentConfig,
    AgentState,
    _where_tree,
    check_batch,
    gradient_step,
    init_state,
)
from ._terms import aggregate_q, policy_critic_term


@dataclasses.dataclass(frozen=True)
class ReBRACConfig(AgentConfig):
    """ReBRAC's hyperparameters; the defaults are the reference's (plain Adam). The paper's
    per-domain `alpha_actor` and `actor_noise` come with `paper_config`."""

    alpha_actor: float = 0.0  # weight of the actor's BC term mean_b w_b sum_d (mu(s) - a)^2
    actor_noise: float = 0.2  # sigma of the smoothing (TD target) and acting noise; 0: none
    actor_noise_clip: float = 0.5  # c: the noise sigma * xi is clipped to [-c, c]
    actor_freq: int = 2  # the targets move on updates k with k % actor_freq == 0
    actor_fc_scale: float = 0.01  # variance-scaling factor of the actor's output layer
    delay_actor: bool = False  # the paper's text: the actor too moves only on those updates

    def _checks(self) -> list[tuple[str, bool, str]]:
        finite = math.isfinite
        return super()._checks() + [
            ("alpha_actor", self.alpha_actor >= 0 and finite(self.alpha_actor), "finite and >= 0"),
            ("actor_noise", self.actor_noise >= 0 and finite(self.actor_noise), "finite and >= 0"),
            ("actor_noise_clip", self.actor_noise_clip >= 0 and finite(self.actor_noise_clip),
             "finite and >= 0"),
            ("actor_freq", self.actor_freq >= 1, ">= 1"),
            ("actor_fc_scale", self.actor_fc_scale > 0 and finite(self.actor_fc_scale),
             "finite and > 0"),
        ]  # fmt: skip


class ReBRACParams(eqx.Module):
    """The trainable modules of ReBRAC (both have Polyak targets)."""

    critic: CriticEnsemble
    actor: DeterministicTanhPolicy  # the deterministic policy mu(s)


def init(
    key: PRNGKeyArray,
    obs_example: Float[Array, " obs"],
    action_example: Float[Array, " action"],
    config: ReBRACConfig,
) -> AgentState:
    """A ReBRAC agent for flat observations like `obs_example` and single actions like
    `action_example` (chunks of `config.horizon` of them). Targets: the critic and the actor."""
    obs_dim, dim = config.dims(obs_example, action_example)
    critic_key, actor_key = jax.random.split(key)
    actor = DeterministicTanhPolicy(
        obs_dim, dim, config.actor_hidden, layer_norm=config.actor_layer_norm,
        layer_norm_eps=config.layer_norm_eps, head_scale=config.actor_fc_scale, key=actor_key,
    )  # fmt: skip
    params = ReBRACParams(config.make_critic(obs_dim, dim, key=critic_key), actor)
    return init_state(params, targets=("critic", "actor"), config=config, action_dim=dim)


def _noisy(
    actor: DeterministicTanhPolicy,
    obs: Float[Array, " obs"],
    config: ReBRACConfig,
    key: PRNGKeyArray,
) -> Float[Array, " chunk"]:
    """`clip(mu(s) + clip(sigma xi, -c, c), -1, 1)`, `xi = jax.random.normal(key, (D,))`."""
    mean = actor(obs)
    xi = jax.random.normal(key, mean.shape, mean.dtype)
    noise = jnp.clip(config.actor_noise * xi, -config.actor_noise_clip, config.actor_noise_clip)
    return jnp.clip(mean + noise, -1.0, 1.0)


def act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The policy for one observation (online and evaluation): the online actor with clipped
    noise, `clip(mu(s) + clip(sigma xi, -c, c), -1, 1)`, `xi ~ N(0, I)` from `key`, stored
    parameters."""
    return _noisy(stop_gradient_tree(state.params.actor), obs, state.config, key)


def _target_act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The TD target's sampler: as `act` but with the target actor `mu'`."""
    return _noisy(stop_gradient_tree(state.targets["actor"]), obs, state.config, key)


def _loss(params: ReBRACParams, state: AgentState, batch: SequenceBatch, key: PRNGKeyArray):
    """`L_Q + L_actor`; `key` is split over the batch for the TD target's smoothing noise."""
    config: ReBRACConfig = state.config
    stored: ReBRACParams = stop_gradient_tree(state.params)
    obs = batch.observations
    loss_critic, metrics = policy_critic_term(params.critic, state, batch, _target_act, key=key)
    actions = jax.vmap(params.actor)(obs)
    q = aggregate_q(stored.critic.batched(obs, actions), how="pessimistic", rho=config.rho)
    scale = jax.lax.stop_gradient(1.0 / jnp.mean(jnp.abs(q)))
    q_loss = -jnp.mean(scale * q)
    data = flat_chunk(batch.actions, chunked=config.action_chunking)
    bc_loss = jnp.mean(batch.valid[:, -1] * jnp.sum((actions - data) ** 2, axis=1))
    actor_loss = q_loss + config.alpha_actor * bc_loss
    total = loss_critic + actor_loss
    metrics = dict(metrics, actor_q=jnp.mean(q), q_scale=scale, actor_q_loss=q_loss,
                   bc_loss=bc_loss, actor_loss=actor_loss)  # fmt: skip
    return total, dict(metrics, total_loss=total)


def update(
    state: AgentState, batch: SequenceBatch, *, key: PRNGKeyArray
) -> tuple[AgentState, dict[str, Array]]:
    """One plain-Adam step of the critic and the actor on `L_Q + L_actor`; the Polyak targets
    of both move (from the pre-update parameters) on updates `k % actor_freq == 0`, and with
    `delay_actor` the actor (parameters and Adam moments) moves only on those updates too."""
    check_batch(batch, state)
    config: ReBRACConfig = state.config
    new, metrics = gradient_step(
        state, lambda params: _loss(params, state, batch, key), target_period=config.actor_freq
    )
    if not config.delay_actor:
        return new, metrics
    full = (state.step + 1) % config.actor_freq == 0

    def hold(updated, before):  # the actor's part of params and of each Adam moment
        if isinstance(updated, ReBRACParams):
            actor = _where_tree(full, updated.actor, before.actor)
            return eqx.tree_at(lambda p: p.actor, updated, actor)
        return updated

    is_params = lambda x: isinstance(x, ReBRACParams)
    params = hold(new.params, state.params)
    opt_state = jax.tree.map(hold, new.opt_state, state.opt_state, is_leaf=is_params)
    held = AgentState(params, new.targets, opt_state, new.step, config, new.action_dim)
    return held, metrics


AGENT = Agent("rebrac", ReBRACConfig, init, update, act, None)
