"""QAM, QAM-FQL and QAM-EDIT (Li et al., "Q-learning with Adjoint Matching", arXiv 2601.14234).

One agent, three configurations of `QAMConfig`:

- **QAM** (`fql_alpha = edit_scale = 0`): a behaviour-cloning flow `actor_slow` (flow matching),
  its EMA copy as the base of the memoryless SDE, and a fine-tuned flow `actor_fast` trained by
  adjoint matching toward `pi*(a|s) ∝ pi_beta(a|s) exp(inv_temp * Q(s, a))`. Acts with the Euler
  ODE of `actor_fast`.
- **QAM-FQL** (`fql_alpha > 0`): adds a one-step policy `pi_os(s, z)` distilled from the ODE of
  `actor_fast` plus a Q term; acts with `pi_os`.
- **QAM-EDIT** (`edit_scale > 0`): adds a tanh-Gaussian edit policy `pi_edit(e | s, a)` with
  SAC-style entropy tuning; acts with `clip(a_flow + edit_scale * e)`.

`init`, `update` and `act` are pure; `update` is one gradient step on one optimiser over every
trainable module (global-norm clip 1.0 then Adam), followed by Polyak targets computed from the
*pre-update* parameters, exactly as the reference. Batch the agent over seeds with `jax.vmap`.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from .._adjoint import _fused_loss, _fused_rollout
from .._flow import flow_matching_loss, ode_sample
from .._misc import stop_gradient_tree
from .._sde import _prepare_rollout
from ..nn import MLP, CriticEnsemble, TanhGaussianPolicy, VelocityNetwork
from ._common import ChunkBatch, critic_loss, flat_chunk, make_optimizer, polyak_update
from ._presets import DOMAINS, METHOD_PRESETS, domain_of


VARIANTS = ("qam", "qam-fql", "qam-edit")


@dataclasses.dataclass(frozen=True)
class QAMConfig:
    """Hyperparameters of the QAM family; the defaults are the reference `get_config()`.

    Per-domain values of the paper are applied by `QAMConfig.paper(variant, env_name)`.

    `inv_temp = 0` (no adjoint matching tilt) deploys the behaviour flow `actor_slow`'s Euler ODE
    instead of `actor_fast`'s. **A deliberate difference from the authors' implementation:**
    there, with `inv_temp = 0` and a one-step (`fql_alpha > 0`) or edit (`edit_scale > 0`)
    policy, that policy is *trained* on the ODE actions of `actor_fast` (the distillation
    teacher, or the flow action the edit is added to) while the agent *acts* with `actor_slow`'s;
    `qam` uses `actor_slow`'s ODE actions in both, so the policy is trained on the inputs it sees
    when deployed. With `inv_temp != 0` both implementations use `actor_fast` (plus `actor_slow`
    when `residual`) for both.
    """

    learning_rate: float = 3e-4  # Adam learning rate, one optimiser for every module
    clip_grad: bool = True  # global-norm clip 1.0 on the concatenated gradient
    actor_hidden: tuple[int, ...] = (512, 512, 512, 512)  # flows, one-step and edit policies
    critic_hidden: tuple[int, ...] = (512, 512, 512, 512)
    actor_layer_norm: bool = False
    critic_layer_norm: bool = True
    layer_norm_eps: float = 1e-6  # every LayerNorm's epsilon (flax's default, as the reference)
    num_qs: int = 10  # critic ensemble size E
    horizon: int = 5  # action chunk length H (also the n of the n-step target)
    action_chunking: bool = True  # critic and policy see the whole chunk (flattened)
    discount: float = 0.99
    rho: float = 0.5  # pessimism: target uses mean_e Q' - rho * std_e Q'
    tau: float = 0.005  # Polyak rate of the target critic and the EMA behaviour flow
    flow_steps: int = 10  # K >= 1; K = 1: one deterministic base step in the rollout
    best_of_n: int = 1  # act with the best of n candidates under the online critic
    inv_temp: float = 0.3  # lambda: pi* ∝ pi_beta exp(lambda Q); 0: act with actor_slow
    fql_alpha: float = 0.0  # > 0: QAM-FQL distillation coefficient
    edit_scale: float = 0.0  # > 0: QAM-EDIT edit magnitude
    target_actor: bool = True  # adjoint base = EMA behaviour flow (else the online one)
    residual: bool = False  # actor_fast parametrises v_fine - v_B
    clip_adj: bool = True  # critic gradient taken at clip(a, -1, 1)
    use_target_grad: bool = True  # terminal adjoint from the target critic
    edit_target_entropy: float | None = None  # None: -multiplier * D
    edit_target_entropy_multiplier: float = 0.5

    def __post_init__(self):
        checks = [
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("layer_norm_eps", self.layer_norm_eps >= 0, ">= 0"),
            ("num_qs", self.num_qs >= 1, ">= 1"),
            ("horizon", self.horizon >= 1, ">= 1"),
            ("discount", 0.0 <= self.discount <= 1.0, "in [0, 1]"),
            ("rho", self.rho >= 0, ">= 0"),
            ("tau", 0.0 < self.tau <= 1.0, "in (0, 1]"),
            ("flow_steps", self.flow_steps >= 1, ">= 1"),
            ("best_of_n", self.best_of_n >= 1, ">= 1"),
            ("fql_alpha", self.fql_alpha >= 0, ">= 0"),
            ("edit_scale", self.edit_scale >= 0, ">= 0"),
            ("actor_hidden", len(self.actor_hidden) >= 1, "at least one layer"),
            ("critic_hidden", len(self.critic_hidden) >= 1, "at least one layer"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(
                    f"`QAMConfig({name}=...)` must be {expected}; got {getattr(self, name)!r}."
                )
        if self.fql_alpha > 0 and self.edit_scale > 0:
            raise ValueError(
                "`QAMConfig(fql_alpha=..., edit_scale=...)`: QAM-FQL and QAM-EDIT are exclusive; "
                f"got fql_alpha={self.fql_alpha} and edit_scale={self.edit_scale}."
            )

    @property
    def variant(self) -> str:
        if self.fql_alpha > 0:
            return "qam-fql"
        return "qam-edit" if self.edit_scale > 0 else "qam"

    @classmethod
    def paper(cls, variant: str, env_name: str, **overrides: Any) -> "QAMConfig":
        """The paper's configuration of `variant` (`qam`, `qam-fql`, `qam-edit`) on the domain of
        `env_name` (docs/mathematics.md §5.2), with `overrides` applied last."""
        if variant not in VARIANTS:
            raise ValueError(f"`variant={variant!r}` is not one of {', '.join(VARIANTS)}.")
        domain = domain_of(env_name)
        settings = {k: v for k, v in DOMAINS[domain].items() if k != "sparse"}
        settings.update(METHOD_PRESETS[variant][domain])
        settings.update(overrides)
        return cls(**settings)


class QAMState(eqx.Module):
    """Everything a QAM agent carries between updates."""

    critic: CriticEnsemble
    target_critic: CriticEnsemble
    actor_slow: VelocityNetwork  # behaviour-cloning flow v_B^on
    target_actor_slow: VelocityNetwork  # its EMA: the adjoint matching base v_B
    actor_fast: VelocityNetwork  # fine-tuned flow v_theta (adjoint matching)
    one_step: MLP | None  # QAM-FQL: pi_os(concat(s, z))
    edit: TanhGaussianPolicy | None  # QAM-EDIT: pi_edit(e | concat(s, a))
    log_alpha: Float[Array, ""] | None  # QAM-EDIT entropy temperature
    opt_state: optax.OptState
    step: Array
    config: QAMConfig = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)  # the flat (chunked) action dimension D


class _Trainable(eqx.Module):
    critic: CriticEnsemble
    actor_slow: VelocityNetwork
    actor_fast: VelocityNetwork
    one_step: MLP | None
    edit: TanhGaussianPolicy | None
    log_alpha: Array | None


def _trainable(state: QAMState) -> _Trainable:
    return _Trainable(
        state.critic,
        state.actor_slow,
        state.actor_fast,
        state.one_step,
        state.edit,
        state.log_alpha,
    )


def init(
    key: PRNGKeyArray,
    obs_example: Float[Array, " obs"],
    action_example: Float[Array, " action"],
    config: QAMConfig,
) -> QAMState:
    """Create a QAM agent for flat observations like `obs_example` and single actions like
    `action_example` (the policy acts on chunks of `config.horizon` of them)."""
    if obs_example.ndim != 1 or action_example.ndim != 1:
        raise ValueError(
            "`init(obs_example=..., action_example=...)` must be one flat observation and one "
            f"flat action; got shapes {tuple(obs_example.shape)} and {tuple(action_example.shape)}."
        )
    obs_dim = obs_example.shape[0]
    dim = action_example.shape[0] * (config.horizon if config.action_chunking else 1)
    keys = jax.random.split(key, 5)
    critic = CriticEnsemble(
        obs_dim, dim, config.critic_hidden, num_critics=config.num_qs,
        layer_norm=config.critic_layer_norm, layer_norm_eps=config.layer_norm_eps, key=keys[0],
    )  # fmt: skip
    flow = lambda k: VelocityNetwork(
        obs_dim, dim, config.actor_hidden, layer_norm=config.actor_layer_norm,
        layer_norm_eps=config.layer_norm_eps, key=k,
    )  # fmt: skip
    actor_slow, actor_fast = flow(keys[1]), flow(keys[2])  # actor_fast: random, not a copy
    one_step = (
        MLP(
            obs_dim + dim,
            dim,
            config.actor_hidden,
            layer_norm=config.actor_layer_norm,
            layer_norm_eps=config.layer_norm_eps,
            key=keys[3],
        )
        if config.fql_alpha > 0
        else None
    )
    edit = (
        TanhGaussianPolicy(obs_dim + dim, dim, config.actor_hidden, key=keys[4])
        if config.edit_scale > 0
        else None
    )
    log_alpha = jnp.zeros(()) if config.edit_scale > 0 else None
    trainable = _Trainable(critic, actor_slow, actor_fast, one_step, edit, log_alpha)
    optimizer = make_optimizer(config.learning_rate, clip_grad=config.clip_grad)
    return QAMState(
        critic=critic,
        target_critic=critic,
        actor_slow=actor_slow,
        target_actor_slow=actor_slow,
        actor_fast=actor_fast,
        one_step=one_step,
        edit=edit,
        log_alpha=log_alpha,
        opt_state=optimizer.init(eqx.filter(trainable, eqx.is_inexact_array)),
        step=jnp.zeros((), jnp.int32),
        config=config,
        action_dim=dim,
    )


def _flow_velocity(state: QAMState):
    """The deployed flow velocity (docs/mathematics.md §1.7).

    Also the ODE that makes the one-step policy's distillation targets and the edit policy's
    input actions in `_losses`, so these policies are trained on the flow actions they are
    deployed on. With `inv_temp = 0` that is `actor_slow`, where the authors' implementation
    trains them on `actor_fast`'s ODE actions (see `QAMConfig`): a deliberate difference.
    """
    config = state.config
    if config.inv_temp == 0:
        return state.actor_slow
    if config.residual:
        fast, slow = state.actor_fast, state.actor_slow
        return lambda t, x, obs: fast(t, x, obs) + slow(t, x, obs)
    return state.actor_fast


def _edit_actions(edit, obs, flow_action, *, edit_scale, key):
    e, log_prob = edit.sample_and_log_prob(jnp.concatenate([obs, flow_action]), key=key)
    return jnp.clip(flow_action + edit_scale * e, -1.0, 1.0), log_prob


def _sample_one(state: QAMState, obs: Array, key: PRNGKeyArray) -> Array:
    config = state.config
    noise_key, edit_key = jax.random.split(key)
    z = jax.random.normal(noise_key, (state.action_dim,), obs.dtype)
    if config.fql_alpha > 0:
        assert state.one_step is not None
        return jnp.clip(state.one_step(jnp.concatenate([obs, z])), -1.0, 1.0)
    action = ode_sample(_flow_velocity(state), obs, noise=z, num_steps=config.flow_steps)
    if config.edit_scale > 0:
        assert state.edit is not None
        action, _ = _edit_actions(
            state.edit, obs, action, edit_scale=config.edit_scale, key=edit_key
        )
    return action


def act(
    state: QAMState, obs: Float[Array, " obs"], *, key: PRNGKeyArray
) -> Float[Array, " action"]:
    """The deployed policy for one observation: the flattened action chunk in `[-1, 1]^D`
    (reshape to `(horizon, action_dim)` and execute open-loop). Uses stored parameters only."""
    state = stop_gradient_tree(state)
    n = state.config.best_of_n
    if n == 1:
        return _sample_one(state, obs, key)
    candidates = jax.vmap(lambda k: _sample_one(state, obs, k))(jax.random.split(key, n))
    q = jax.vmap(lambda a: jnp.mean(state.critic(obs, a)))(candidates)
    return candidates[jnp.argmax(q)]


def _losses(params: _Trainable, state: QAMState, batch: ChunkBatch, key: PRNGKeyArray):
    config = state.config
    batch_size = batch.observations.shape[0]
    obs = batch.observations
    keys = jax.random.split(key, 5)
    metrics: dict[str, Array] = {}

    # Critic: chunked TD with the next action from the current (stored) policy.
    next_obs = batch.next_observations[:, -1]
    next_actions = jax.vmap(lambda o, k: act(state, o, key=k))(
        next_obs, jax.random.split(keys[0], batch_size)
    )
    next_q = state.target_critic.batched(next_obs, next_actions)
    q = params.critic.batched(obs, flat_chunk(batch.actions, chunked=config.action_chunking))
    loss_critic, critic_metrics = critic_loss(
        q, batch, jax.lax.stop_gradient(next_q), discount=config.discount, rho=config.rho
    )
    metrics.update(critic_metrics)

    # Behaviour-cloning flow, weighted by the last valid flag.
    actions = flat_chunk(batch.actions, chunked=config.action_chunking)
    valid = batch.valid[:, -1]
    flow_losses = jax.vmap(lambda o, a, k: flow_matching_loss(params.actor_slow, o, a, key=k))(
        obs, actions, jax.random.split(keys[1], batch_size)
    )
    loss_flow = jnp.mean(valid * flow_losses)
    metrics["flow_loss"] = loss_flow

    # Adjoint matching: rollout with stored actor_fast, lean adjoint through the base.
    base = state.target_actor_slow if config.target_actor else state.actor_slow
    base = stop_gradient_tree(base)
    reward_critic = stop_gradient_tree(
        state.target_critic if config.use_target_grad else state.critic
    )

    # Adjoint matching as `fused_adjoint_matching_loss` computes it (each network evaluated
    # once per point), split in two so that the terminal adjoints
    # `-inv_temp * d mean_j Q_j(s, clip(a)) / da` of the whole batch come from one batched
    # critic gradient (ensemble axis outermost) between the rollout and the loss.
    def rollout_one(o, k):
        noise, h, ts, _ = _prepare_rollout(
            "update", k, None, state.action_dim, config.flow_steps, base
        )
        return _fused_rollout(params.actor_fast, base, o, noise, h, ts, residual=config.residual)

    trajectories, controls = jax.vmap(rollout_one)(obs, jax.random.split(keys[2], batch_size))

    def q_mean_sum(a):
        a = jnp.clip(a, -1.0, 1.0) if config.clip_adj else a
        return jnp.sum(jnp.mean(reward_critic.batched(obs, a), axis=1))

    terminal = jax.lax.stop_gradient(-config.inv_temp * jax.grad(q_mean_sum)(trajectories.action))
    loss_am = jnp.mean(
        jax.vmap(_fused_loss, in_axes=(None, 0, 0, 0, 0))(
            base, obs, trajectories, controls, terminal
        )
    )
    metrics["am_loss"] = loss_am
    total = loss_critic + loss_flow + loss_am

    critic_stored = stop_gradient_tree(state.critic)
    if config.fql_alpha > 0 or config.edit_scale > 0:
        z = jax.random.normal(keys[3], (batch_size, state.action_dim), obs.dtype)
        teacher = stop_gradient_tree(_flow_velocity(state))
        flow_actions = jax.lax.stop_gradient(
            jax.vmap(lambda o, z_: ode_sample(teacher, o, noise=z_, num_steps=config.flow_steps))(
                obs, z
            )
        )
        if config.fql_alpha > 0:
            one_step_policy = params.one_step
            assert one_step_policy is not None
            one_step = jax.vmap(lambda o, z_: one_step_policy(jnp.concatenate([o, z_])))(obs, z)
            loss_distill = jnp.mean((flow_actions - one_step) ** 2)
            q_os = critic_stored.batched(obs, jnp.clip(one_step, -1.0, 1.0))
            loss_q = -jnp.mean(q_os)
            total = total + loss_q + config.fql_alpha * loss_distill
            metrics.update(distill_loss=loss_distill, one_step_q=-loss_q)
        else:
            assert params.edit is not None and params.log_alpha is not None
            edited, log_prob = jax.vmap(
                lambda o, a, k: _edit_actions(
                    params.edit, o, a, edit_scale=config.edit_scale, key=k
                )
            )(obs, flow_actions, jax.random.split(keys[4], batch_size))
            loss_edit_q = -jnp.mean(critic_stored.batched(obs, edited))
            alpha_stored = jnp.exp(jax.lax.stop_gradient(params.log_alpha))
            loss_entropy = jnp.mean(alpha_stored * log_prob)
            target_entropy = (
                config.edit_target_entropy
                if config.edit_target_entropy is not None
                else -config.edit_target_entropy_multiplier * state.action_dim
            )
            entropy = -jnp.mean(log_prob)
            loss_alpha = jnp.exp(params.log_alpha) * (
                jax.lax.stop_gradient(entropy) - target_entropy
            )
            total = total + loss_edit_q + loss_entropy + loss_alpha
            metrics.update(
                edit_q=-loss_edit_q, entropy=entropy, alpha=jnp.exp(params.log_alpha),
                alpha_loss=loss_alpha,
            )  # fmt: skip
    metrics["total_loss"] = total
    return total, metrics


def update(
    state: QAMState, batch: ChunkBatch, *, key: PRNGKeyArray
) -> tuple[QAMState, dict[str, Array]]:
    """One gradient step of every module on one batch (docs/mathematics.md §1, §3, §4).

    Total loss `L_critic + L_flow + L_AM (+ QAM-FQL or QAM-EDIT terms)`, one optimiser, then
    `target <- tau * online_pre_update + (1 - tau) * target` for the critic and the BC flow.
    Returns the new state and scalar metrics (`grad_norm` is before clipping).
    """
    config = state.config
    params = _trainable(state)
    dynamic, static = eqx.partition(params, eqx.is_inexact_array)

    def loss_fn(dynamic_):
        return _losses(eqx.combine(dynamic_, static), state, batch, key)

    grads, metrics = jax.grad(loss_fn, has_aux=True)(dynamic)
    optimizer = make_optimizer(config.learning_rate, clip_grad=config.clip_grad)
    updates, opt_state = optimizer.update(grads, state.opt_state, dynamic)
    new: _Trainable = eqx.combine(optax.apply_updates(dynamic, updates), static)  # pyright: ignore[reportAssignmentType]
    metrics["grad_norm"] = optax.global_norm(grads)
    return (
        QAMState(
            critic=new.critic,
            target_critic=polyak_update(state.target_critic, state.critic, tau=config.tau),
            actor_slow=new.actor_slow,
            target_actor_slow=polyak_update(
                state.target_actor_slow, state.actor_slow, tau=config.tau
            ),
            actor_fast=new.actor_fast,
            one_step=new.one_step,
            edit=new.edit,
            log_alpha=new.log_alpha,
            opt_state=opt_state,
            step=state.step + 1,
            config=config,
            action_dim=state.action_dim,
        ),
        metrics,
    )
