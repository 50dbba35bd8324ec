"""Agent plumbing shared by every method: the batch layout, the optimiser, Polyak targets and
the chunked critic (TD) step. Agents assemble these with the core functions; none of them
re-implements a piece of another."""

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from .._td import td_loss


class ChunkBatch(NamedTuple):
    """A batch of action-chunk sequences (docs/mathematics.md §3.1), as `qam.data` samples it.

    - `observations`: `(B, obs)`, the first observation `s_j`.
    - `actions`: `(B, H, A)`, the `H` actions `a_j .. a_{j+H-1}`.
    - `rewards`: `(B, H)`, discounted partial returns `R_k = sum_{m<=k} gamma^m r_{j+m} valid_m`.
    - `masks`: `(B, H)`, running minimum of `1 - success` over valid steps.
    - `valid`: `(B, H)`, 1 until an episode ended strictly before step `k`.
    - `next_observations`: `(B, H, obs)`, held across episode ends.
    """

    observations: Float[Array, "batch obs"]
    actions: Float[Array, "batch horizon action"]
    rewards: Float[Array, "batch horizon"]
    masks: Float[Array, "batch horizon"]
    valid: Float[Array, "batch horizon"]
    next_observations: Float[Array, "batch horizon obs"]


def make_optimizer(learning_rate: float, *, clip_grad: bool) -> optax.GradientTransformation:
    """One optimiser for all trainable modules: `clip_by_global_norm(1.0)` then Adam when
    `clip_grad` (so the clip acts on the concatenated gradient of every module), else Adam."""
    adam = optax.adam(learning_rate)
    return optax.chain(optax.clip_by_global_norm(1.0), adam) if clip_grad else adam


def polyak_update(target: Any, online: Any, *, tau: float) -> Any:
    """`target <- tau * online + (1 - tau) * target` on every inexact array leaf."""
    online_arrays = eqx.filter(online, eqx.is_inexact_array)
    target_arrays, static = eqx.partition(target, eqx.is_inexact_array)
    new = optax.incremental_update(online_arrays, target_arrays, tau)
    return eqx.combine(new, static)


def flat_chunk(actions: Float[Array, "batch horizon action"], *, chunked: bool) -> Array:
    """The critic's action input: the whole chunk flattened row-major (`(B, H*A)`), or only the
    first action when `chunked` is False."""
    if chunked:
        return actions.reshape(actions.shape[0], -1)
    return actions[:, 0]


def critic_loss(
    q: Float[Array, "batch ensemble"],
    batch: ChunkBatch,
    next_q: Float[Array, "batch ensemble"],
    *,
    discount: float,
    rho: float,
) -> tuple[Array, dict[str, Array]]:
    """The chunked TD loss of docs/mathematics.md §3.2, averaged over the batch:

    ```
    y = R_{H-1} + gamma^H * mask_{H-1} * (mean_e q'_e - rho * std_e q'_e)
    L = (1 / (E B)) sum_b valid_{b,H-1} sum_e (Q_e(s_b, a_chunk_b) - y_b)^2
    ```
    `q` are the online critics at `(s, a_chunk)` (flatten the chunk with `flat_chunk`; gradients
    flow through `q`) and `next_q` the target critics at `(next_obs_{H-1}, a')` with `a'` from the
    current policy.
    """
    horizon = batch.rewards.shape[1]
    bootstrap = (discount**horizon) * batch.masks[:, -1]
    losses, aux = jax.vmap(lambda q_, r, d, nq: td_loss(q_, r, d, nq, rho=rho))(
        q, batch.rewards[:, -1], bootstrap, next_q
    )
    valid = batch.valid[:, -1]
    loss = jnp.mean(valid * losses)
    return loss, {"critic_loss": loss, "q_mean": jnp.mean(q), "target_mean": jnp.mean(aux.target)}
