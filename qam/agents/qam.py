"""QAM, QAM-FQL and QAM-EDIT (Li et al., "Q-learning with Adjoint Matching", arXiv 2601.14234).

Three registered agents (`qam.agents.AGENTS["qam" | "qam-fql" | "qam-edit"]`), one
`QAMConfig` whose `variant` names the method:

- **qam**: a behaviour-cloning flow `actor_slow` (flow matching), its EMA copy as the base of
  the memoryless SDE, and a fine-tuned flow `actor_fast` trained by adjoint matching toward
  `pi*(a|s) ∝ pi_beta(a|s) exp(inv_temp * Q(s, a))`. Acts with the Euler ODE of `actor_fast`.
- **qam-fql**: adds a one-step policy `pi_os(s, z)` distilled from the ODE of `actor_fast`
  plus a Q term (`one_step_distillation_term`); acts with `pi_os`.
- **qam-edit**: adds a tanh-Gaussian edit policy `pi_edit(e | s, a)` with SAC-style entropy
  tuning (`edit_policy_term`); acts with `clip(a_flow + edit_scale * e)`.

The update is the sum of named terms (`critic_term`, `flow_term`, `adjoint_matching_term`, and
the variant's policy term) stepped once by `gradient_step` (global-norm clip 1.0 then Adam),
with Polyak targets of the critic and `actor_slow` from the *pre-update* parameters, exactly
as the reference. Batch the agent over seeds with `jax.vmap`.
"""

import dataclasses
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._flow import ode_sample
from .._misc import stop_gradient_tree
from ..data import SequenceBatch
from ..nn import MLP, CriticEnsemble, TanhGaussianPolicy, VelocityNetwork
from ._interface import Agent, AgentConfig, AgentState, check_batch, gradient_step, init_state
from ._terms import (
    adjoint_matching_term,
    best_of_n,
    edit_actions,
    edit_policy_term,
    flow_term,
    ode_actions,
    one_step_distillation_term,
    policy_critic_term,
    target_entropy,
)


Variant = Literal["qam", "qam-fql", "qam-edit"]


@dataclasses.dataclass(frozen=True)
class QAMConfig(AgentConfig):
    """Hyperparameters of the QAM family; the defaults are the reference `get_config()`.

    `variant` picks the method: `qam` acts with the fine-tuned flow's ODE, `qam-fql` adds a
    one-step policy distilled from it (weight `fql_alpha`), `qam-edit` adds an edit policy
    (magnitude `edit_scale`). The reference selects them by `fql_alpha > 0` / `edit_scale > 0`;
    its per-domain runs with `edit_scale = 0` or `fql_alpha = 0` are `variant="qam"` here.

    `inv_temp = 0` (no adjoint matching tilt) deploys the behaviour flow `actor_slow`'s Euler ODE
    instead of `actor_fast`'s. **A deliberate difference from the authors' implementation:**
    there, with `inv_temp = 0` and a one-step or edit policy, that policy is *trained* on the
    ODE actions of `actor_fast` (the distillation teacher, or the flow action the edit is added
    to) while the agent *acts* with `actor_slow`'s; `qam` uses `actor_slow`'s ODE actions in
    both, so the policy is trained on the inputs it sees when deployed. With `inv_temp != 0`
    both implementations use `actor_fast` (plus `actor_slow` when `residual`) for both.
    """

    clip_grad: bool = True  # global-norm clip 1.0 on the concatenated gradient
    variant: Variant = "qam"  # qam, qam-fql (one-step policy) or qam-edit (edit policy)
    flow_steps: int = 10  # K >= 1 Euler / SDE steps; K = 1: one deterministic base step
    best_of_n: int = 1  # act with the best of n candidates under the online critic (mean)
    inv_temp: float = 0.3  # lambda: pi* ∝ pi_beta exp(lambda Q); 0: act with actor_slow
    fql_alpha: float = 0.0  # qam-fql: weight of the one-step distillation loss (> 0)
    edit_scale: float = 0.0  # qam-edit: edit magnitude, a~ = clip(a + edit_scale * e) (> 0)
    target_actor: bool = True  # adjoint base = EMA behaviour flow (else the online one)
    residual: bool = False  # actor_fast parametrises v_fine - v_B
    clip_adj: bool = True  # critic gradient taken at clip(a, -1, 1)
    use_target_grad: bool = True  # terminal adjoint from the target critic
    edit_target_entropy: float | None = None  # qam-edit entropy target; None: -multiplier * D
    edit_target_entropy_multiplier: float = 0.5  # qam-edit: the multiplier above

    def _checks(self) -> list[tuple[str, bool, str]]:
        fql, edit = self.variant == "qam-fql", self.variant == "qam-edit"
        return super()._checks() + [
            ("variant", self.variant in VARIANTS, f"one of {', '.join(VARIANTS)}"),
            ("flow_steps", self.flow_steps >= 1, ">= 1"),
            ("best_of_n", self.best_of_n >= 1, ">= 1"),
            ("inv_temp", self.inv_temp >= 0 and self.inv_temp < float("inf"), "finite and >= 0"),
            ("fql_alpha", self.fql_alpha > 0 if fql else self.fql_alpha == 0,
             "> 0 for variant qam-fql" if fql else f"0 for variant {self.variant} (only qam-fql "
             "has a one-step policy)"),
            ("edit_scale", self.edit_scale > 0 if edit else self.edit_scale == 0,
             "> 0 for variant qam-edit" if edit else f"0 for variant {self.variant} (only "
             "qam-edit has an edit policy)"),
        ]  # fmt: skip


VARIANTS: tuple[str, ...] = ("qam", "qam-fql", "qam-edit")


class QAMParams(eqx.Module):
    """The trainable modules of a QAM-family agent."""

    critic: CriticEnsemble
    actor_slow: VelocityNetwork  # behaviour-cloning flow v_B^on (its EMA is the AM base)
    actor_fast: VelocityNetwork  # fine-tuned flow v_theta (adjoint matching)
    one_step: MLP | None  # qam-fql: pi_os(concat(s, z))
    edit: TanhGaussianPolicy | None  # qam-edit: pi_edit(e | concat(s, a))
    log_alpha: Float[Array, ""] | None  # qam-edit entropy temperature


# Kept for annotations: every agent's state is an `AgentState`.
QAMState = AgentState


def init(
    key: PRNGKeyArray,
    obs_example: Float[Array, " obs"],
    action_example: Float[Array, " action"],
    config: QAMConfig,
) -> AgentState:
    """Create a QAM agent for flat observations like `obs_example` and single actions like
    `action_example` (the policy acts on chunks of `config.horizon` of them). Targets: the
    critic and the behaviour flow `actor_slow`."""
    obs_dim, dim = config.dims(obs_example, action_example)
    keys = jax.random.split(key, 5)
    critic = config.make_critic(obs_dim, dim, key=keys[0])
    actor_slow = config.make_flow(obs_dim, dim, key=keys[1])
    actor_fast = config.make_flow(obs_dim, dim, key=keys[2])  # random, not a copy
    fql, edit = config.variant == "qam-fql", config.variant == "qam-edit"
    one_step = config.make_mlp(obs_dim + dim, dim, key=keys[3]) if fql else None
    edit_policy = (
        TanhGaussianPolicy(obs_dim + dim, dim, config.actor_hidden, key=keys[4]) if edit else None
    )
    params = QAMParams(
        critic, actor_slow, actor_fast, one_step, edit_policy, jnp.zeros(()) if edit else None
    )
    return init_state(params, targets=("critic", "actor_slow"), config=config, action_dim=dim)


def _flow_velocity(params: QAMParams, config: QAMConfig):
    """The deployed flow velocity (docs/mathematics.md §1.7).

    Also the ODE that makes the one-step policy's distillation targets and the edit policy's
    input actions in `_loss`, so these policies are trained on the flow actions they are
    deployed on. With `inv_temp = 0` that is `actor_slow`, where the authors' implementation
    trains them on `actor_fast`'s ODE actions (see `QAMConfig`): a deliberate difference.
    """
    if config.inv_temp == 0:
        return params.actor_slow
    if config.residual:
        fast, slow = params.actor_fast, params.actor_slow
        return lambda t, x, obs: fast(t, x, obs) + slow(t, x, obs)
    return params.actor_fast


def _sample_one(params: QAMParams, config: QAMConfig, obs: Array, key: PRNGKeyArray, dim: int):
    noise_key, edit_key = jax.random.split(key)
    z = jax.random.normal(noise_key, (dim,), obs.dtype)
    if config.variant == "qam-fql":
        assert params.one_step is not None
        return jnp.clip(params.one_step(jnp.concatenate([obs, z])), -1.0, 1.0)
    action = ode_sample(_flow_velocity(params, config), obs, noise=z, num_steps=config.flow_steps)
    if config.variant == "qam-edit":
        assert params.edit is not None
        action, _ = edit_actions(
            params.edit, obs, action, edit_scale=config.edit_scale, key=edit_key
        )
    return action


def act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The deployed policy for one observation: the flattened action chunk in `[-1, 1]^D`
    (reshape to `(horizon, action_dim)` and execute open-loop). Uses stored parameters only:
    the one-step policy (qam-fql), the fine-tuned flow's Euler ODE, plus the edit (qam-edit);
    with `best_of_n > 1` the candidate with the highest mean online Q."""
    params: QAMParams = stop_gradient_tree(state.params)
    config: QAMConfig = state.config
    return best_of_n(
        lambda k: _sample_one(params, config, obs, k, state.action_dim),
        lambda a: jnp.mean(params.critic(obs, a)),
        key=key, n=config.best_of_n,
    )  # fmt: skip


def bc_act(
    state: AgentState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " chunk"]:
    """The behaviour-cloning policy trained alongside: the Euler ODE of `actor_slow` from
    `z ~ N(0, I)` (no tilt, no edit, no one-step policy, no best-of-n)."""
    params: QAMParams = stop_gradient_tree(state.params)
    config: QAMConfig = state.config
    z = jax.random.normal(jax.random.split(key)[0], (state.action_dim,), obs.dtype)
    return ode_sample(params.actor_slow, obs, noise=z, num_steps=config.flow_steps)


def _loss(params: QAMParams, state: AgentState, batch: SequenceBatch, key: PRNGKeyArray):
    """`L_critic + L_flow + L_AM (+ the qam-fql or qam-edit policy terms)`."""
    config: QAMConfig = state.config
    stored: QAMParams = stop_gradient_tree(state.params)
    obs = batch.observations
    batch_size = obs.shape[0]
    keys = jax.random.split(key, 5)

    # Critic: chunked TD with the next chunk from the current (stored) policy.
    total, metrics = policy_critic_term(params.critic, state, batch, act, key=keys[0])
    loss_flow, flow_metrics = flow_term(
        params.actor_slow, batch, key=keys[1], chunked=config.action_chunking
    )
    # Adjoint matching of actor_fast on the memoryless SDE of the (EMA) behaviour flow.
    loss_am, am_metrics = adjoint_matching_term(
        params.actor_fast,
        state.targets["actor_slow"] if config.target_actor else state.params.actor_slow,
        state.targets["critic"] if config.use_target_grad else state.params.critic,
        obs, key=keys[2], inv_temp=config.inv_temp, action_dim=state.action_dim,
        num_steps=config.flow_steps, residual=config.residual, clip_action=config.clip_adj,
    )  # fmt: skip
    total = total + loss_flow + loss_am
    metrics = {**metrics, **flow_metrics, **am_metrics}

    if config.variant != "qam":
        z = jax.random.normal(keys[3], (batch_size, state.action_dim), obs.dtype)
        teacher = _flow_velocity(stored, config)
        flow_actions = ode_actions(teacher, obs, z, num_steps=config.flow_steps)
        if config.variant == "qam-fql":
            assert params.one_step is not None
            loss_policy, policy_metrics = one_step_distillation_term(
                params.one_step, stored.critic, obs, z, flow_actions, alpha=config.fql_alpha
            )
        else:
            assert params.edit is not None and params.log_alpha is not None
            loss_policy, policy_metrics = edit_policy_term(
                params.edit, params.log_alpha, stored.critic, obs, flow_actions, key=keys[4],
                edit_scale=config.edit_scale,
                entropy_target=target_entropy(
                    state.action_dim, value=config.edit_target_entropy,
                    multiplier=config.edit_target_entropy_multiplier,
                ),
            )  # fmt: skip
        total = total + loss_policy
        metrics.update(policy_metrics)
    metrics["total_loss"] = total
    return total, metrics


def update(
    state: AgentState, batch: SequenceBatch, *, key: PRNGKeyArray
) -> tuple[AgentState, dict[str, Array]]:
    """One gradient step of every module on one batch (docs/mathematics.md §1, §3, §4).

    Total loss `L_critic + L_flow + L_AM (+ qam-fql or qam-edit terms)`, one optimiser, then
    `target <- tau * online_pre_update + (1 - tau) * target` for the critic and the BC flow.
    Returns the new state and scalar metrics (`grad_norm` is before clipping).
    """
    check_batch(batch, state)
    return gradient_step(state, lambda params: _loss(params, state, batch, key))


QAM = Agent("qam", QAMConfig, init, update, act, bc_act, {"variant": "qam"})
QAM_FQL = Agent(
    "qam-fql", QAMConfig, init, update, act, bc_act, {"variant": "qam-fql", "fql_alpha": 30.0}
)
QAM_EDIT = Agent(
    "qam-edit", QAMConfig, init, update, act, bc_act, {"variant": "qam-edit", "edit_scale": 0.1}
)
