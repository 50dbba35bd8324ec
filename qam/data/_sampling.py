"""The chunked sequence sampler of docs/mathematics.md §3.1, pure and jitted."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, Shaped

from ._dataset import Dataset, ReplayBuffer


class SequenceBatch(NamedTuple):
    """A batch of `B` chunks of `H` consecutive transitions (docs/mathematics.md §3.1).

    - `observations`: `s_j`, the first observation of each chunk, `(B, *obs)`;
    - `actions`: `a_{j+k}` for `k = 0..H-1`, always taken from the table, even across an
      episode end, `(B, H, A)`;
    - `rewards`: the discounted partial returns `R_k = Σ_{i≤k} γ^i · r_{j+i} · valid_i`, `(B, H)`;
    - `masks`: `mask_k = min_{i≤k, valid_i} mask_{j+i}`, `(B, H)`;
    - `valid`: `valid_k = 1 − max_{m<k} term_{j+m}` (`valid_0 = 1`), `(B, H)`;
    - `next_observations`: `s'_{j+k}` while valid, then held at the last valid one, `(B, H, *obs)`.
    """

    observations: Shaped[Array, " B *obs"]
    actions: Float[Array, "B H act"]
    rewards: Float[Array, "B H"]
    masks: Float[Array, "B H"]
    valid: Float[Array, "B H"]
    next_observations: Shaped[Array, "B H *obs"]


def _gather_chunks(
    data: Dataset,
    starts: Int[Array, " B"],
    horizon: int,
    discount: float | Float[Array, ""],
    capacity: int,
) -> SequenceBatch:
    """Chunks starting at physical rows `starts`; row indices are taken modulo `capacity`
    (a no-op for a plain dataset, the ring wrap-around for a replay buffer)."""
    steps = jnp.arange(horizon, dtype=jnp.int32)
    idx = (starts[:, None] + steps[None, :]) % capacity  # (B, H)
    term = data.terminals[idx]  # (B, H)
    # valid_k = 1 - max_{m<k} term_{j+m}; valid_0 = 1.
    ended = jax.lax.cummax(term, axis=1)  # max_{m<=k} term
    valid = jnp.concatenate([jnp.ones_like(term[:, :1]), 1.0 - ended[:, :-1]], axis=1)
    # R_k = R_{k-1} + γ^k r_{j+k} valid_k.
    powers = jnp.asarray(discount, dtype=jnp.float32) ** steps.astype(jnp.float32)
    rewards = jnp.cumsum(powers[None, :] * data.rewards[idx] * valid, axis=1)
    # mask_k = min(mask_{k-1}, mask_{j+k}) if valid_k else mask_{k-1}; valid is a prefix.
    masks = jax.lax.cummin(jnp.where(valid > 0, data.masks[idx], 1.0), axis=1)
    # next_obs_k = s'_{j + min(k, L-1)} with L the number of valid steps.
    num_valid = jnp.sum(valid, axis=1).astype(jnp.int32)  # (B,) >= 1
    last = jnp.minimum(steps[None, :], num_valid[:, None] - 1)
    next_idx = (starts[:, None] + last) % capacity
    return SequenceBatch(
        observations=data.observations[starts % capacity],
        actions=data.actions[idx],
        rewards=rewards,
        masks=masks,
        valid=valid,
        next_observations=data.next_observations[next_idx],
    )


def _check_args(horizon: int, batch_size: int) -> None:
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
        raise ValueError(f"horizon: expected a Python int >= 1, got {horizon!r}.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected a Python int >= 1, got {batch_size!r}.")


def _buffer_starts(
    buffer: ReplayBuffer, key: PRNGKeyArray, batch_size: int, horizon: int
) -> Int[Array, " B"]:
    """Physical start rows of chunks drawn uniformly over the filled part of the ring, in
    insertion order: logical offset `u ~ Uniform{0, …, size − H}` from the oldest row."""
    capacity = buffer.capacity
    size = buffer.size.astype(jnp.int32)
    oldest = (buffer.insert_index.astype(jnp.int32) - size) % capacity
    high = jnp.maximum(size - horizon + 1, 1)
    offsets = jax.random.randint(key, (batch_size,), 0, high, dtype=jnp.int32)
    return (oldest + offsets) % capacity


@functools.partial(jax.jit, static_argnames=("batch_size", "horizon"))
def sample_sequence(
    dataset: Dataset | ReplayBuffer,
    key: PRNGKeyArray,
    batch_size: int,
    *,
    horizon: int,
    discount: float | Float[Array, ""],
) -> SequenceBatch:
    r"""Sample `batch_size` chunks of `horizon` consecutive transitions (docs/mathematics.md §3.1).

    The start row is `j ~ Uniform{0, …, N−H}`; a chunk may straddle episode ends. For
    `k = 0..H−1`, with `term` the episode-boundary flags (`terminals`):

    | quantity | `k = 0` | `k ≥ 1` |
    |---|---|---|
    | `valid_k` | 1 | `1 − max_{m<k} term_{j+m}` |
    | `R_k` (`rewards`) | `r_j` | `R_{k−1} + γ^k · r_{j+k} · valid_k` |
    | `mask_k` | `mask_j` | `min(mask_{k−1}, mask_{j+k})` if `valid_k`, else `mask_{k−1}` |
    | `next_obs_k` | `s'_j` | `s'_{j+k}` if `valid_k`, else `next_obs_{k−1}` |
    | `action_k` | `a_j` | `a_{j+k}` always, even across an episode end |

    For a [`qam.data.ReplayBuffer`][] the chunk is drawn uniformly over the filled part in
    insertion order (oldest to newest), following the ring across its physical end:
    `u ~ Uniform{0, …, size − H}` rows after the oldest row.

    Pure and jitted (`batch_size` and `horizon` static), so thousands of calls can run inside
    one `jax.lax.scan` without host round trips.

    **Arguments:**

    - `dataset`: a [`qam.data.Dataset`][] with `N ≥ H` rows, or a [`qam.data.ReplayBuffer`][]
      holding at least `H` transitions (for a buffer this cannot be checked inside `jit`;
      with fewer, the chunks run past the newest row).
    - `key`: a JAX PRNG key.
    - `batch_size`: `B`, a Python int.
    - `horizon`: `H`, a Python int.
    - `discount`: `γ`.

    **Returns:**

    A [`qam.data.SequenceBatch`][] with `observations (B, *obs)`, `actions (B, H, A)`,
    `rewards (B, H)`, `masks (B, H)`, `valid (B, H)` and `next_observations (B, H, *obs)`.

    **Raises:**

    `ValueError` (at trace time) if `horizon` or `batch_size` is not a positive int, or a
    `Dataset` has fewer than `horizon` rows, or a buffer's capacity is below `horizon`.
    """
    _check_args(horizon, batch_size)
    if isinstance(dataset, ReplayBuffer):
        if dataset.capacity < horizon:
            raise ValueError(
                f"sample_sequence: the replay buffer's capacity {dataset.capacity} is below "
                f"the horizon H = {horizon}."
            )
        starts = _buffer_starts(dataset, key, batch_size, horizon)
        return _gather_chunks(dataset.data, starts, horizon, discount, dataset.capacity)
    if not isinstance(dataset, Dataset):
        raise TypeError(
            "sample_sequence: dataset: expected a qam.data.Dataset or qam.data.ReplayBuffer, "
            f"got {type(dataset).__name__}."
        )
    n = dataset.size
    if n < horizon:
        raise ValueError(
            f"sample_sequence: the dataset holds N = {n} transitions, fewer than the "
            f"horizon H = {horizon}."
        )
    starts = jax.random.randint(key, (batch_size,), 0, n - horizon + 1, dtype=jnp.int32)
    return _gather_chunks(dataset, starts, horizon, discount, n)
