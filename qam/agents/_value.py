"""A state-value network `V(s)` and the loss terms that fit and use it (FAWAC, IFQL).

Conventions as in `qam.agents` terms: `(loss, metrics)` pairs, batch means, and the critic
values handed in are targets (no gradient reaches them). Two ways of fitting `V`:

- `value_regression_term`: least squares on every critic member (FAWAC's `V ≈ E_pi_beta Q`);
- `expectile_value_term`: the IQL expectile (IFQL's `V ≈` an upper expectile of `Q`).

`advantage_weights` turns `Q - V` into the clipped exponential weights of advantage-weighted
regression (`flow_term(..., weights=...)`).
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..data import SequenceBatch
from ..nn import DEFAULT_LAYER_NORM_EPS, MLP


class ValueNetwork(eqx.Module):
    """A state value `V(s) = MLP(s)`, a scalar, with LayerNorm after each hidden activation by
    default (as the reference's value networks). Single example; `batched` maps a batch."""

    mlp: MLP

    def __init__(
        self,
        obs_dim: int,
        hidden_sizes: Sequence[int] = (512, 512, 512, 512),
        *,
        layer_norm: bool = True,
        layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS,
        key: PRNGKeyArray,
    ):
        self.mlp = MLP(
            obs_dim, 1, hidden_sizes, layer_norm=layer_norm, layer_norm_eps=layer_norm_eps,
            key=key,
        )  # fmt: skip

    def __call__(self, obs: Float[Array, " obs"]) -> Float[Array, ""]:
        return self.mlp(obs)[0]

    def batched(self, obs: Float[Array, "batch obs"]) -> Float[Array, " batch"]:
        """`jax.vmap(self)(obs)`."""
        return jax.vmap(self)(obs)


def value_regression_term(
    v: Float[Array, " batch"], q: Float[Array, "batch ensemble"], batch: SequenceBatch
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Least-squares regression of `V(s)` on each critic member at the data chunk:

    ```
    L = (1 / (E B)) sum_b w_b sum_e (q_{b,e} - v_b)^2,   w_b = valid_{H-1}
    ```
    `q` is a target (no gradient). Member-wise regression has the gradient of regressing on
    `mean_e q` (the two losses differ by the ensemble variance), so `V` fits `E[mean_e Q]`.
    """
    q = jax.lax.stop_gradient(q)
    per_example = jnp.mean((q - v[:, None]) ** 2, axis=1)
    loss = jnp.mean(batch.valid[:, -1] * per_example)
    return loss, {"value_loss": loss, "v_mean": jnp.mean(v)}


def expectile_value_term(
    v: Float[Array, " batch"], q: Float[Array, " batch"], *, kappa: float
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """The expectile loss of implicit Q-learning:

    ```
    L = mean_b |kappa - 1(q_b - v_b < 0)| (q_b - v_b)^2
    ```
    weight `kappa` where `q >= v` and `1 - kappa` where `q < v`; over a distribution of `q` its
    minimiser is the `kappa`-expectile (`kappa = 0.5`: the mean; `kappa -> 1`: the maximum).
    `q` is a target (no gradient). No valid weighting (as the reference)."""
    q = jax.lax.stop_gradient(q)
    diff = q - v
    weight = jnp.where(diff < 0, 1.0 - kappa, kappa)
    loss = jnp.mean(weight * diff**2)
    return loss, {"value_loss": loss, "v_mean": jnp.mean(v)}


def advantage_weights(
    q: Float[Array, "batch ensemble"],
    v: Float[Array, " batch"],
    *,
    inv_temp: float,
    max_weight: float = 100.0,
) -> Float[Array, " batch"]:
    """Advantage-weighted-regression weights `omega_b = min(exp(inv_temp * A_b), max_weight)`
    with `A_b = mean_e q_{b,e} - v_b`. No gradient (the weights are data for the policy loss);
    the clip at 100 is the reference's (and IQL's)."""
    advantage = jnp.mean(q, axis=1) - v
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(inv_temp * advantage), max_weight))
