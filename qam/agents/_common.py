"""Optimiser and target plumbing shared by every method."""

from typing import Any

import equinox as eqx
import optax
from jaxtyping import Array, Float


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
