"""Named loss terms the methods assemble; each returns `(loss, metrics)`.

Conventions shared by every term:

- Batches are `qam.data.SequenceBatch`; `s = observations`, `a` the flattened chunk, and
  `R, m, w, s'` the entries at the chunk's last step `H - 1` (`rewards`, `masks`, `valid`,
  `next_observations`).
- "Stored" networks are passed through `stop_gradient_tree` by the caller or here: no gradient
  reaches their parameters, but gradients still flow through their inputs.
- Every term is averaged over the batch (`mean_b`); weights multiply per-example losses.
"""

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._adjoint import fused_adjoint_matching_batch_loss
from .._flow import flow_matching_loss, ode_sample
from .._misc import stop_gradient_tree
from .._types import VelocityField
from ..data import SequenceBatch
from ..nn import CriticEnsemble, TanhGaussianPolicy
from ._common import flat_chunk


Aggregation = Literal["pessimistic", "mean", "min"]


def aggregate_q(
    q: Float[Array, "*batch ensemble"], *, how: Aggregation, rho: float = 0.0
) -> Float[Array, "*batch"]:
    """Reduce the ensemble axis (last): `pessimistic` = `mean_e q - rho * std_e q` (population
    std, ddof 0), `mean`, or `min`.

    The std's gradient is taken as 0 where the members agree exactly (always with one critic),
    where `sqrt` has none: `jnp.std` would give NaN there, even times `rho = 0`."""
    if how == "pessimistic":
        mean = jnp.mean(q, axis=-1)
        if (isinstance(rho, (int, float)) and rho == 0) or q.shape[-1] == 1:
            return mean
        var = jnp.var(q, axis=-1)
        positive = var > 0
        std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
        return mean - rho * std
    if how == "mean":
        return jnp.mean(q, axis=-1)
    if how == "min":
        return jnp.min(q, axis=-1)
    raise ValueError(f"`how={how!r}` is not one of pessimistic, mean, min.")


def td_term(
    q: Float[Array, "batch ensemble"],
    batch: SequenceBatch,
    next_value: Float[Array, " batch"],
    *,
    discount: float,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """The chunked TD loss with a given bootstrap value (docs/mathematics.md §3.2):

    ```
    y_b = R_b + gamma^H * m_b * next_value_b              (no gradient)
    L   = (1 / (E B)) sum_b w_b sum_e (q_{b,e} - y_b)^2
    ```
    normalised by `E * B`, not by `sum_b w_b`, as the reference.
    """
    horizon = batch.rewards.shape[1]
    bootstrap = (discount**horizon) * batch.masks[:, -1]
    target = jax.lax.stop_gradient(batch.rewards[:, -1] + bootstrap * next_value)
    per_example = jnp.mean((q - target[:, None]) ** 2, axis=1)
    loss = jnp.mean(batch.valid[:, -1] * per_example)
    return loss, {"critic_loss": loss, "q_mean": jnp.mean(q), "target_mean": jnp.mean(target)}


def critic_term(
    critic: CriticEnsemble,
    target_critic: CriticEnsemble,
    batch: SequenceBatch,
    next_actions: Float[Array, "batch chunk"],
    *,
    discount: float,
    rho: float,
    chunked: bool = True,
    aggregation: Aggregation = "pessimistic",
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """The critic's TD loss with the next chunk from the method's own sampler:
    `td_term(Q_e(s, a), batch, agg_e Q'_e(s', a'))`, `agg` the method's aggregation
    (`pessimistic`: `mean - rho * std`). Gradients reach `critic`; `target_critic` and
    `next_actions` are stored."""
    next_obs = batch.next_observations[:, -1]
    next_q = jax.lax.stop_gradient(target_critic.batched(next_obs, next_actions))
    q = critic.batched(batch.observations, flat_chunk(batch.actions, chunked=chunked))
    next_value = aggregate_q(next_q, how=aggregation, rho=rho)
    return td_term(q, batch, next_value, discount=discount)


def policy_critic_term(
    critic: CriticEnsemble,
    state: Any,
    batch: SequenceBatch,
    act: Callable[..., Float[Array, " chunk"]],
    *,
    key: PRNGKeyArray,
    aggregation: Aggregation = "pessimistic",
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """`critic_term` with the next chunk from the method's own policy: `a'_b = act(state, s'_b,
    key=k_b)`, `k = split(key, B)` (stored parameters, as `act` uses), the target critic
    `state.targets["critic"]`, and the config's `discount`, `rho` and `action_chunking`."""
    config = state.config
    next_actions = jax.vmap(lambda o, k: act(state, o, key=k))(
        batch.next_observations[:, -1], jax.random.split(key, batch.observations.shape[0])
    )
    return critic_term(
        critic, state.targets["critic"], batch, next_actions, discount=config.discount,
        rho=config.rho, chunked=config.action_chunking, aggregation=aggregation,
    )  # fmt: skip


def ode_actions(
    velocity: VelocityField,
    obs: Float[Array, "batch obs"],
    noise: Float[Array, "batch chunk"],
    *,
    num_steps: int,
) -> Float[Array, "batch chunk"]:
    """`qam.ode_sample` for a batch: row `b` is `ODE_K(v; s_b, z_b)`, clipped to `[-1, 1]`."""
    return jax.vmap(lambda o, z: ode_sample(velocity, o, noise=z, num_steps=num_steps))(obs, noise)


def flow_term(
    velocity: VelocityField,
    batch: SequenceBatch,
    *,
    key: PRNGKeyArray,
    chunked: bool = True,
    weights: Float[Array, " batch"] | None = None,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Behaviour-cloning flow matching on the batch's chunks (docs/mathematics.md §1.6):
    `mean_b [w_b * omega_b * flow_matching_loss(v, s_b, a_b)]`, `omega` = `weights` (e.g.
    FAWAC's advantage weights) or 1. One key per example."""
    obs = batch.observations
    actions = flat_chunk(batch.actions, chunked=chunked)
    losses = jax.vmap(lambda o, a, k: flow_matching_loss(velocity, o, a, key=k))(
        obs, actions, jax.random.split(key, obs.shape[0])
    )
    w = batch.valid[:, -1] if weights is None else batch.valid[:, -1] * weights
    loss = jnp.mean(w * losses)
    return loss, {"flow_loss": loss}


def adjoint_matching_term(
    velocity: VelocityField,
    base_velocity: VelocityField,
    reward_critic: CriticEnsemble,
    obs: Float[Array, "batch obs"],
    *,
    key: PRNGKeyArray,
    inv_temp: float,
    action_dim: int,
    num_steps: int,
    residual: bool = False,
    clip_action: bool = True,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Adjoint matching of `velocity` toward `pi_beta exp(inv_temp * mean_e Q_e)` on a batch
    (docs/mathematics.md §1): `qam.fused_adjoint_matching_batch_loss` with the terminal
    adjoints `A_K = -inv_temp * d mean_e Q_e(s, clip(X_K)) / d X_K` of the whole batch from
    one batched critic gradient. `base_velocity` and `reward_critic` are stored."""
    base = stop_gradient_tree(base_velocity)
    critic = stop_gradient_tree(reward_critic)

    def terminal_adjoints(actions):
        def q_mean_sum(a):
            a = jnp.clip(a, -1.0, 1.0) if clip_action else a
            return jnp.sum(jnp.mean(critic.batched(obs, a), axis=1))

        return -inv_temp * jax.grad(q_mean_sum)(actions)

    loss, _ = fused_adjoint_matching_batch_loss(
        velocity, base, obs, terminal_adjoints, key=key, action_dim=action_dim,
        num_steps=num_steps, residual=residual,
    )  # fmt: skip
    return loss, {"am_loss": loss}


def one_step_distillation_term(
    one_step: Callable[[Array], Array],
    critic: CriticEnsemble,
    obs: Float[Array, "batch obs"],
    noise: Float[Array, "batch chunk"],
    teacher_actions: Float[Array, "batch chunk"],
    *,
    alpha: float,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """One-step distillation (FQL, QAM-FQL): a policy `mu(concat(s, z))` regressed onto a
    multi-step flow's actions from the *same* noise `z`, plus a Q term:

    ```
    mu_b = mu(concat(s_b, z_b))
    L = alpha * mean_{b,d} (mu_b - sg(teacher_b))^2 - mean_{b,e} Q_e(s_b, clip(mu_b))
    ```
    The teacher's actions are clipped (ODE outputs), the student's only for the critic; the
    critic is stored; no valid weighting (as the reference)."""
    student = jax.vmap(lambda o, z: one_step(jnp.concatenate([o, z])))(obs, noise)
    distill = jnp.mean((jax.lax.stop_gradient(teacher_actions) - student) ** 2)
    q = stop_gradient_tree(critic).batched(obs, jnp.clip(student, -1.0, 1.0))
    q_loss = -jnp.mean(q)
    return q_loss + alpha * distill, {"distill_loss": distill, "one_step_q": -q_loss}


def edit_actions(
    edit: TanhGaussianPolicy,
    obs: Float[Array, " obs"],
    flow_action: Float[Array, " chunk"],
    *,
    edit_scale: float,
    key: PRNGKeyArray,
) -> tuple[Float[Array, " chunk"], Float[Array, ""]]:
    """An edited chunk `clip(a + edit_scale * e, -1, 1)`, `e ~ pi_edit(. | concat(s, a))`
    (reparameterised), and `log pi_edit(e | s, a)`."""
    e, log_prob = edit.sample_and_log_prob(jnp.concatenate([obs, flow_action]), key=key)
    return jnp.clip(flow_action + edit_scale * e, -1.0, 1.0), log_prob


def target_entropy(
    action_dim: int, *, value: float | None = None, multiplier: float = 0.5
) -> float:
    """SAC's entropy target: `value`, or `-multiplier * D` when `value` is None."""
    return value if value is not None else -multiplier * action_dim


def temperature_term(
    log_alpha: Float[Array, ""], log_prob: Float[Array, " batch"], *, entropy_target: float
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """SAC's temperature loss `alpha * (sg(-mean_b log pi) - target)`, `alpha = exp(log_alpha)`
    (alpha, not log alpha, multiplies, as the reference). Gradient to `log_alpha` only."""
    entropy = -jnp.mean(log_prob)
    alpha = jnp.exp(log_alpha)
    loss = alpha * (jax.lax.stop_gradient(entropy) - entropy_target)
    return loss, {"entropy": entropy, "alpha": alpha, "alpha_loss": loss}


def edit_policy_term(
    edit: TanhGaussianPolicy,
    log_alpha: Float[Array, ""],
    critic: CriticEnsemble,
    obs: Float[Array, "batch obs"],
    flow_actions: Float[Array, "batch chunk"],
    *,
    key: PRNGKeyArray,
    edit_scale: float,
    entropy_target: float,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """The edit policy with SAC temperature (QAM-EDIT, FEdit) on stored flow actions `a`:

    ```
    a~  = clip(a + edit_scale * e, -1, 1),  e ~ pi_edit(. | s, a),  l = log pi_edit(e | s, a)
    L   = -mean_{b,e} Q_e(s, a~) + mean_b(sg(alpha) l) + alpha (sg(-mean_b l) - target)
    ```
    The critic is stored; the flow actions carry no gradient; no valid weighting."""
    flow_actions = jax.lax.stop_gradient(flow_actions)
    edited, log_prob = jax.vmap(
        lambda o, a, k: edit_actions(edit, o, a, edit_scale=edit_scale, key=k)
    )(obs, flow_actions, jax.random.split(key, obs.shape[0]))
    q_loss = -jnp.mean(stop_gradient_tree(critic).batched(obs, edited))
    entropy_loss = jnp.mean(jnp.exp(jax.lax.stop_gradient(log_alpha)) * log_prob)
    alpha_loss, metrics = temperature_term(log_alpha, log_prob, entropy_target=entropy_target)
    return q_loss + entropy_loss + alpha_loss, dict(metrics, edit_q=-q_loss)


def best_of_n(
    sample: Callable[[PRNGKeyArray], Float[Array, " chunk"]],
    score: Callable[[Float[Array, " chunk"]], Float[Array, ""]],
    *,
    key: PRNGKeyArray,
    n: int,
) -> Float[Array, " chunk"]:
    """`argmax` of `score` over `n` candidates `sample(k_i)`, `k_i` the `n` splits of `key`
    (with `n = 1`, `sample(key)` itself, unscored)."""
    if n == 1:
        return sample(key)
    candidates = jax.vmap(sample)(jax.random.split(key, n))
    return candidates[jnp.argmax(jax.vmap(score)(candidates))]
