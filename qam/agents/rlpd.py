"""RLPD: soft actor-critic on a tanh-Gaussian actor with an optional behaviour-cloning term,
trained online only on batches that are half offline data and half online experience (Ball et
al., "Efficient Online Reinforcement Learning with Offline Data", arXiv 2302.02948), as the QAM
paper runs it.

Three trainable modules: the critic ensemble `Q_e`, an actor `pi(. | s)` (tanh-Gaussian over
the `D = H A` chunk coordinates) and a temperature `log alpha` (init `log(init_temp)` = 0).
Target: the critic only.

```
TD target: a'_b ~ pi(. | s'_b)    (online actor, stored, reparameterised, NOT clipped)
           y_b = R_b + gamma^H m_b (mean_e Q'_e(s'_b, a'_b) - rho std_e Q'_e(s'_b, a'_b))
           L_critic = (1 / (E B)) sum_b w_b sum_e (Q_e(s_b, a_b) - y_b)^2     (no -alpha log pi)
actor:     y_b ~ pi(. | s_b) (reparameterised),  l_b = log pi(y_b | s_b)
           L_actor = mean_b( sg(alpha) l_b - P_rho(s_b, y_b) ),
                     P_rho = mean_e Q_e - rho std_e Q_e  (ONLINE critic, stored, with pessimism)
           L_alpha = alpha (sg(-mean_b l_b) - H_target),  H_target = -0.5 D
BC:        L_BC = -bc_alpha mean_b( w_b log pi(clip(a_b, -1 + 1e-5, 1 - 1e-5) | s_b) )
L = L_critic + L_actor + L_alpha + L_BC
```

- `std` is the population standard deviation (ddof 0) over the `E` members; `w_b` is the valid
  flag of the chunk's last step. The critic and BC terms are valid-weighted, the actor and
  temperature terms are not. The BC term applies to every row of the batch (offline and online
  halves alike); the data chunk's log-density needs its pre-tanh value `u = atanh(a)`, hence the
  clip to `+-(1 - 1e-5)`.
- Alpha, not log alpha, multiplies the temperature loss (as the reference): its gradient in
  `log alpha` is `alpha (entropy - H_target)`.
- Differs from the original RLPD: one update per environment step (not 20), all `E` members
  aggregated as `mean - rho std` (no random subset, no min), no entropy term in the TD target,
  whole action chunks.

Acts with `clip(y, -1, 1)`, `y ~ pi(. | s)` (sampled, not the mode), at evaluation too. One
plain Adam over all modules; Polyak target of the critic only. No behaviour-cloning policy.

**The training regime** (`AGENT.run_defaults`, which `examples/offline_to_online.py` applies
unless a flag says otherwise): no offline phase (`offline_steps=0`), balanced batches
(`balanced_sampling=True`: the replay buffer holds only online transitions and each batch is
`B / 2` offline chunks followed by `B / 2` online chunks) and a random warm-up
(`random_warmup=True`: for the first `start_training` environment steps each action is one
uniform draw from `[-1, 1]^A`, a single action rather than a chunk, and there are no updates).

**The BC weight.** The paper says the BC coefficient was tuned per domain, and the authors'
reproduce script defines the tuned values (`TUNED_BC_ALPHA`), but it never passes them to the
runs it generates: every RLPD run of the released code has `bc_alpha = 0`. That is the default
here (and `paper_config`'s); the paper's stated setting is one argument away:

```
env = "scene-play-singletask-task1-v0"
config = AGENTS["rlpd"].paper_config(env, bc_alpha=tuned_bc_alpha(env))   # 0.3 on scene
```
(`--bc-alpha 0.3` on the command line.)
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._misc import stop_gradient_tree
from ..data import SequenceBatch
from ..nn import CriticEnsemble, TanhGaussianPolicy, tanh_gaussian_log_prob
from ._common import flat_chunk
from ._interface import Agent, AgentConfig, AgentState, check_batch, gradient_step, init_state
from ._presets import domain_of
from ._sac import sac_actor_term
from ._terms import aggregate_q, policy_critic_term, target_entropy


# The per-domain BC weights the authors' reproduce script defines for RLPD (and never applies;
# see the module docstring). Keyed by the domains of `qam.agents.DOMAINS`.
TUNED_BC_ALPHA: dict[str, float] = {
    "antmaze-large-navigate": 0.0,
    "antmaze-giant-navigate": 0.01,
    "humanoidmaze-medium-navigate": 0.03,
    "humanoidmaze-large-navigate": 0.0,
    "scene-play": 0.3,
    "puzzle-3x3-play": 0.01,
    "puzzle-4x4-play": 0.0,
    "cube-double-play": 0.1,
    "cube-triple-play": 0.0,
    "cube-quadruple-play": 0.0,
}

# Dataset actions are clipped to +-(1 - BC_CLIP_EPS) before atanh in the BC term.
BC_CLIP_EPS = 1e-5


def tuned_bc_alpha(env_name: str) -> float:
    """The paper's tuned BC weight for the domain of `env_name` (`TUNED_BC_ALPHA`); raises
    `ValueError` for a name outside the paper's domains."""
    return TUNED_BC_ALPHA[domain_of(env_name)]


@dataclasses.dataclass(frozen=True)
class RLPDConfig(AgentConfig):
    """RLPD's hyperparameters; the defaults are the reference's (plain Adam, `bc_alpha = 0`:
    what the authors' scripts ran, see `TUNED_BC_ALPHA` for the paper's tuned values)."""

    bc_alpha: float = 0.0  # weight of the BC term -mean_b(w_b log pi(a_b | s_b)), >= 0
    init_temp: float = 1.0  # initial temperature alpha (log alpha starts at log(init_temp))
    target_entropy: float | None = None  # the actor's entropy target; None: -multiplier * D
    target_entropy_multiplier: float = 0.5  # the multiplier above

    def _checks(self) -> list[tuple[str, bool, str]]:
        finite = math.isfinite
        return super()._checks() + [
            ("bc_alpha", self.bc_alpha >= 0 and finite(self.bc_alpha), "finite and >= 0"),
            ("init_temp", self.init_temp > 0 and finite(self.init_temp), "finite and > 0"),
            ("target_entropy", self.target_entropy is None or finite(self.target_entropy),
             "None or finite"),
            ("target_entropy_multiplier", finite(self.target_entropy_multiplier), "finite"),
        ]  # fmt: skip


class RLPDParams(eqx.Module):
    """The trainable modules of RLPD."""

    critic: CriticEnsemble  # Q_e(s, a)
    actor: TanhGaussianPolicy  # pi(y | s), y in (-1, 1)^D
    log_alpha: Float[Array, ""]  # the actor's entropy temperature


def init(
    key: PRNGKeyArray,
    obs_example: Float[Array, " obs"],
    action_example: Float[Array, " action"],
    config: RLPDConfig,
) -> AgentState:
    """An RLPD agent for flat observations like `obs_example` and single actions like
    `action_example` (chunks of `config.horizon` of them). Target: the critic."""
    obs_dim, dim = config.dims(obs_example, action_example)
    critic_key, actor_key = jax.random.split(key)
    actor = TanhGaussianPolicy(
        obs_dim, dim, config.actor_hidden, layer_norm=config.actor_layer_norm,
        layer_norm_eps=config.layer_norm_eps, key=actor_key,
    )  # fmt: skip
    # A strong (not weakly typed) scalar, so the first update's state has the same types as
    # every later one (a weak type would compile the update twice).
    log_alpha = jnp.full((), math.log(config.init_temp), jnp.result_type(float))
    params = RLPDParams(config.make_critic(obs_dim, dim, key=critic_key), actor, log_alpha)
    return init_state(params, targets=("critic",), config=config, action_dim=dim)


def _sample(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """`y ~ pi(. | s)` with stored parameters, unclipped (the TD target's sampler)."""
    actor: TanhGaussianPolicy = stop_gradient_tree(state.params.actor)
    return actor.sample_and_log_prob(obs, key=key)[0]


def act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The deployed policy for one observation: `clip(y, -1, 1)`, `y ~ pi(. | s)` drawn with
    `key` (sampled, not the mode), stored parameters."""
    return jnp.clip(_sample(state, obs, key=key), -1.0, 1.0)


def data_log_prob(
    policy: TanhGaussianPolicy, obs: Float[Array, " obs"], action: Float[Array, " chunk"]
) -> Float[Array, ""]:
    """`log pi(a~ | s)` of a given chunk, `a~ = clip(a, -1 + 1e-5, 1 - 1e-5)`, through its
    pre-tanh value `u = atanh(a~)`: `sum_d [log N(u_d; mu_d, sigma_d) - log(1 - a~_d^2)]`."""
    mean, log_std = policy.distribution(obs)
    clipped = jnp.clip(action, -1.0 + BC_CLIP_EPS, 1.0 - BC_CLIP_EPS)
    return tanh_gaussian_log_prob(jnp.arctanh(clipped), mean, log_std)


def _loss(params: RLPDParams, state: AgentState, batch: SequenceBatch, key: PRNGKeyArray):
    """`L_critic + L_actor + L_alpha + L_BC`; keys: split(key) = (TD sampler, actor samples),
    each split once more into one key per example."""
    config: RLPDConfig = state.config
    stored: RLPDParams = stop_gradient_tree(state.params)
    obs = batch.observations
    td_key, actor_key = jax.random.split(key)
    loss_critic, metrics = policy_critic_term(params.critic, state, batch, _sample, key=td_key)
    actions, log_prob = jax.vmap(lambda o, k: params.actor.sample_and_log_prob(o, key=k))(
        obs, jax.random.split(actor_key, obs.shape[0])
    )
    q = aggregate_q(stored.critic.batched(obs, actions), how="pessimistic", rho=config.rho)
    loss_actor, actor_metrics = sac_actor_term(
        log_prob, q, params.log_alpha,
        entropy_target=target_entropy(
            state.action_dim, value=config.target_entropy,
            multiplier=config.target_entropy_multiplier,
        ),
    )  # fmt: skip
    data = flat_chunk(batch.actions, chunked=config.action_chunking)
    bc_log_prob = jnp.mean(
        batch.valid[:, -1] * jax.vmap(lambda o, a: data_log_prob(params.actor, o, a))(obs, data)
    )
    loss_bc = -config.bc_alpha * bc_log_prob
    total = loss_critic + loss_actor + loss_bc
    metrics = {**metrics, **actor_metrics, "bc_loss": loss_bc, "bc_log_prob": bc_log_prob}
    return total, dict(metrics, total_loss=total)


def update(
    state: AgentState, batch: SequenceBatch, *, key: PRNGKeyArray
) -> tuple[AgentState, dict[str, Array]]:
    """One plain-Adam step of every module on `L_critic + L_actor + L_alpha + L_BC`, then the
    critic's Polyak target from the pre-update parameters."""
    check_batch(batch, state)
    return gradient_step(state, lambda params: _loss(params, state, batch, key))


AGENT = Agent(
    "rlpd", RLPDConfig, init, update, act, None, {},
    run_defaults={"offline_steps": 0, "balanced_sampling": True, "random_warmup": True},
)  # fmt: skip
