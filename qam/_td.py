"""Temporal-difference loss of a critic ensemble with a pessimistic target."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ._types import Scalar


class TDAux(NamedTuple):
    """Auxiliary outputs of `td_loss`.

    - `target`: `y = reward + discount * next_value` (no gradient).
    - `next_value`: the pessimistic value `mean_e(q'_e) - rho * std_e(q'_e)`.
    - `td_error`: `q_e - y`, per ensemble member.
    """

    target: Float[Array, ""]
    next_value: Float[Array, ""]
    td_error: Float[Array, " ensemble"]


def pessimistic_value(
    q_values: Float[Array, " ensemble"], *, rho: float | Float[ArrayLike, ""]
) -> Float[Array, ""]:
    """`mean_e q_e - rho * std_e q_e` over an ensemble (population std, `ddof = 0`)."""
    return jnp.mean(q_values) - rho * jnp.std(q_values)


def td_loss(
    q_values: Float[Array, " ensemble"],
    reward: Float[ArrayLike, ""],
    discount: Float[ArrayLike, ""],
    next_q_values: Float[Array, " ensemble"],
    *,
    rho: float | Float[ArrayLike, ""] = 0.5,
) -> tuple[Scalar, TDAux]:
    """Squared TD error of an ensemble critic on one transition (docs/mathematics.md §3.2).

    ```
    y = reward + discount * (mean_e q'_e - rho * std_e q'_e)        (std with ddof = 0)
    L = mean_e (q_e - y)^2
    ```
    `y` is wrapped in `jax.lax.stop_gradient`: gradients flow only into `q_values`.

    For action chunks of length `H` (an `H`-step target), pass the discounted partial return
    `R_{H-1} = sum_k gamma^k r_k` as `reward` and fold the bootstrap discount and terminal mask
    into `discount = gamma^H * mask`, as rlax's `discount_t` absorbs termination. Weight by the
    `valid` flag and average over the batch at the call site (the reference divides by `E * B`,
    which is what `mean_b(valid_b * L_b)` gives).

    **Arguments:**

    - `q_values`: `Q_e(s, a)` of each of the `E` online critics, shape `(E,)`.
    - `reward`: the (partial) return, a scalar.
    - `discount`: the bootstrap discount including masks, a scalar.
    - `next_q_values`: `Q'_e(s', a')` of the target critics, shape `(E,)`.
    - `rho`: the pessimism coefficient.

    **Returns:** `(loss, TDAux(target, next_value, td_error))`.
    """
    if q_values.ndim != 1 or next_q_values.ndim != 1:
        raise ValueError(
            "`td_loss(q_values=..., next_q_values=...)` must both have shape (ensemble,); got "
            f"{tuple(q_values.shape)} and {tuple(next_q_values.shape)}. "
            "For a batch, use `jax.vmap`."
        )
    for name, value in (("reward", reward), ("discount", discount)):
        if jnp.ndim(value) != 0:
            raise ValueError(
                f"`td_loss(..., {name}=...)` must be a scalar; got shape {jnp.shape(value)}."
            )
    next_value = jax.lax.stop_gradient(pessimistic_value(next_q_values, rho=rho))
    target = jax.lax.stop_gradient(jnp.asarray(reward) + jnp.asarray(discount) * next_value)
    td_error = q_values - target
    return jnp.mean(td_error**2), TDAux(target=target, next_value=next_value, td_error=td_error)
