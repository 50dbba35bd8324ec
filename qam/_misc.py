"""Small private helpers shared by the core modules."""

from typing import TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp


_T = TypeVar("_T")


def stop_gradient_tree(tree: _T) -> _T:
    """`jax.lax.stop_gradient` on every inexact array leaf of `tree`, leaving other leaves
    (functions, static fields, integers) untouched. Used to freeze modules passed in as
    fixed networks: gradients still flow through their *inputs*, never into their parameters.
    """
    dynamic, static = eqx.partition(tree, eqx.is_inexact_array)
    return eqx.combine(jax.lax.stop_gradient(dynamic), static)


def check_num_steps(name: str, num_steps: int) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool):
        raise TypeError(f"`{name}(..., num_steps=...)` must be a Python int; got {num_steps!r}.")
    if num_steps < 1:
        raise ValueError(
            f"`{name}(..., num_steps=...)` must be at least 1 (K - 1 noisy steps, then one "
            f"deterministic step); got {num_steps}."
        )


def check_velocity(name: str, arg: str, velocity, obs, action_dim: int, dtype) -> None:
    """Raise a `ValueError` naming `arg` of `name` unless `velocity(t, x, obs)` evaluates, on one
    observation like `obs` and one action of size `action_dim`, to an action of that size.

    A static check at trace time (`eqx.filter_eval_shape`: nothing is computed), so a batch
    passed where one example is expected, or a wrong `action_dim`, is named instead of
    surfacing as a raw shape error deep inside the network."""
    t = jax.ShapeDtypeStruct((), dtype)
    x = jax.ShapeDtypeStruct((action_dim,), dtype)
    o = jax.ShapeDtypeStruct(jnp.shape(obs), jnp.result_type(obs))
    try:
        out = eqx.filter_eval_shape(lambda v, t_, x_, o_: v(t_, x_, o_), velocity, t, x, o)
    except Exception as error:  # any failure of the network on these shapes
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"`{name}(..., {arg}=...)` cannot be evaluated on one observation of shape "
            f"{tuple(jnp.shape(obs))} and one action of shape ({action_dim},) "
            f"({type(error).__name__}: {detail}). Pass one example (batch with `jax.vmap`) and "
            "an action size the network was built for."
        ) from error
    if getattr(out, "shape", None) != (action_dim,):
        raise ValueError(
            f"`{name}(..., {arg}=...)` returned shape {getattr(out, 'shape', type(out))} for an "
            f"action of shape ({action_dim},); a velocity field maps an action to one of the "
            "same shape."
        )
