"""Shared jaxtyping aliases and the velocity-field protocol.

Dimension names used across the package:

- `action`: the flat action dimension `D` (an action chunk of `H` actions of size `A`
  flattened row-major, so `D = H * A`);
- `steps`: the number of flow steps `K`;
- `points`: `K + 1` grid points `t_0 = 0, ..., t_K = 1`;
- `ensemble`: the number of critics `E`;
- `obs`: a flat observation.
"""

from typing import Any, Protocol, runtime_checkable

from jaxtyping import Array, ArrayLike, Float, PyTree


Scalar = Float[Array, ""]
ScalarLike = Float[ArrayLike, ""]
Action = Float[Array, " action"]
Obs = PyTree[Any]


@runtime_checkable
class VelocityField(Protocol):
    """A single-example velocity field `v(t, x, obs) -> dx/dt`.

    Called with diffrax's `(t, y, args)` argument order, so any velocity field drops into
    `diffrax.ODETerm` unchanged. `t` is a scalar array in `[0, 1]` (0 is noise, 1 is the
    action), `x` a flat action of shape `(D,)` and `obs` any pytree. Returns shape `(D,)`.
    """

    def __call__(self, t: ScalarLike, x: Action, obs: Obs, /) -> Action: ...
