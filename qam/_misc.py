"""Small private helpers shared by the core modules."""

from typing import TypeVar

import equinox as eqx
import jax


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
