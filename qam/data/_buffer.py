"""A fixed-capacity functional ring buffer on the device, and balanced offline/online sampling."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray, Real, Shaped

from ._dataset import _FIELDS, Dataset, ReplayBuffer
from ._sampling import SequenceBatch, sample_sequence


class Transition(NamedTuple):
    """One transition `(s, a, r, mask, term, s')`, as stored in a [`qam.data.ReplayBuffer`][].

    Build online transitions with [`qam.data.online_transition`][] so that `mask` and
    `terminal` follow docs/mathematics.md §3.1.
    """

    observation: Shaped[Array, "*obs"]
    action: Float[Array, " act"]
    reward: Float[Array, ""]
    mask: Float[Array, ""]
    terminal: Float[Array, ""]
    next_observation: Shaped[Array, "*obs"]


def online_transition(
    observation: Shaped[ArrayLike, "*obs"],
    action: Real[ArrayLike, " act"],
    reward: Real[ArrayLike, ""],
    next_observation: Shaped[ArrayLike, "*obs"],
    *,
    terminated: Bool[ArrayLike, ""] | Real[ArrayLike, ""],
    truncated: Bool[ArrayLike, ""] | Real[ArrayLike, ""],
) -> Transition:
    """Package one environment step for [`qam.data.add_transition`][] (docs/mathematics.md §3.1).

    Stores `mask = 1 − terminated` and `terminal = terminated or truncated`: a time-limit
    truncation ends the chunk (no bootstrapping across episodes) without zeroing the target.

    **Arguments:** the observation `s`, action `a`, reward `r`, next observation `s'` and the
    environment's `terminated` / `truncated` flags (bools or 0/1 numbers; JAX or numpy).

    **Returns:** a [`qam.data.Transition`][] of float32 scalars and arrays.
    """
    term = jnp.asarray(terminated).astype(jnp.float32)
    trunc = jnp.asarray(truncated).astype(jnp.float32)
    obs = jnp.asarray(observation)
    next_obs = jnp.asarray(next_observation)
    if obs.dtype != jnp.uint8:
        obs = obs.astype(jnp.float32)
        next_obs = next_obs.astype(jnp.float32)
    return Transition(
        observation=obs,
        action=jnp.asarray(action).astype(jnp.float32),
        reward=jnp.asarray(reward).astype(jnp.float32),
        mask=1.0 - term,
        terminal=jnp.maximum(term, trunc),
        next_observation=next_obs,
    )


def empty_replay_buffer(
    capacity: int,
    *,
    observation_shape: tuple[int, ...],
    action_dim: int,
    observation_dtype: type | np.dtype | None = None,
) -> ReplayBuffer:
    """An empty [`qam.data.ReplayBuffer`][] of `capacity` rows (all zeros, `size = 0`).

    **Arguments:**

    - `capacity`: the number of rows, a positive Python int.
    - `observation_shape`: the shape of one observation, e.g. `(obs_dim,)`.
    - `action_dim`: the action size `A`.
    - `observation_dtype`: float32 by default; `uint8` for pixels.
    """
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity: expected a Python int >= 1, got {capacity!r}.")
    obs_dtype = jnp.float32 if observation_dtype is None else observation_dtype
    shape = tuple(int(d) for d in observation_shape)
    data = Dataset(
        observations=jnp.zeros((capacity, *shape), dtype=obs_dtype),
        actions=jnp.zeros((capacity, int(action_dim)), dtype=jnp.float32),
        rewards=jnp.zeros((capacity,), dtype=jnp.float32),
        masks=jnp.ones((capacity,), dtype=jnp.float32),
        terminals=jnp.zeros((capacity,), dtype=jnp.float32),
        next_observations=jnp.zeros((capacity, *shape), dtype=obs_dtype),
    )
    zero = jnp.zeros((), dtype=jnp.int32)
    return ReplayBuffer(data=data, size=zero, insert_index=zero)


def replay_buffer_from_dataset(dataset: Dataset, *, capacity: int) -> ReplayBuffer:
    """A [`qam.data.ReplayBuffer`][] of `capacity` rows whose first `N` rows are `dataset`.

    `size = N` and `insert_index = N mod capacity`: online transitions are appended after
    the offline data and, once the buffer is full, overwrite the oldest rows first (the
    offline data). The dataset's last row should be terminal (true for OGBench data), so no
    chunk spans the offline/online seam.

    **Raises:** `ValueError` if `capacity < N`.
    """
    n = dataset.size
    if not isinstance(capacity, int) or capacity < n:
        raise ValueError(
            f"replay_buffer_from_dataset: capacity: expected a Python int >= the dataset size "
            f"N = {n}, got {capacity!r}. Raise the capacity (e.g. N + the number of online "
            f"steps)."
        )
    pad = capacity - n

    def grow(x):
        fill = jnp.ones if x is dataset.masks else jnp.zeros
        return jnp.concatenate([x, fill((pad, *x.shape[1:]), dtype=x.dtype)], axis=0)

    data = Dataset(**{k: grow(getattr(dataset, k)) for k in _FIELDS})
    return ReplayBuffer(
        data=data,
        size=jnp.asarray(n, dtype=jnp.int32),
        insert_index=jnp.asarray(n % capacity, dtype=jnp.int32),
    )


@jax.jit
def add_transition(buffer: ReplayBuffer, transition: Transition) -> ReplayBuffer:
    """Write one transition at `insert_index` and advance the ring (pure, jitted).

    `insert_index ← (insert_index + 1) mod capacity`, `size ← min(size + 1, capacity)`; when
    full the oldest row is overwritten.
    """
    i = buffer.insert_index
    d = buffer.data
    values = dict(zip(_FIELDS, _as_row(transition, d)))
    data = Dataset(**{k: getattr(d, k).at[i].set(values[k]) for k in _FIELDS})
    capacity = buffer.capacity
    return ReplayBuffer(
        data=data,
        size=jnp.minimum(buffer.size + 1, capacity).astype(jnp.int32),
        insert_index=((i + 1) % capacity).astype(jnp.int32),
    )


def _as_row(t: Transition, d: Dataset) -> tuple:
    return (
        jnp.asarray(t.observation, dtype=d.observations.dtype),
        jnp.asarray(t.action, dtype=jnp.float32),
        jnp.asarray(t.reward, dtype=jnp.float32),
        jnp.asarray(t.mask, dtype=jnp.float32),
        jnp.asarray(t.terminal, dtype=jnp.float32),
        jnp.asarray(t.next_observation, dtype=d.next_observations.dtype),
    )


@functools.partial(jax.jit, static_argnames=("batch_size", "horizon"))
def sample_balanced(
    dataset: Dataset,
    buffer: ReplayBuffer,
    key: PRNGKeyArray,
    batch_size: int,
    *,
    horizon: int,
    discount: float | Float[Array, ""],
) -> SequenceBatch:
    """Balanced (RLPD-style) sampling: half the chunks from the offline `dataset`, half from the
    online `buffer`, each by [`qam.data.sample_sequence`][] (docs/mathematics.md §3.1).

    The first `batch_size // 2` rows of the batch come from `dataset`, the remaining
    `batch_size − batch_size // 2` from `buffer`. While the buffer holds fewer than `horizon`
    transitions, its half is drawn from `dataset` too, so this is safe to call from the first
    online step inside a `lax.scan`.

    **Arguments:** `dataset` (offline), `buffer` (online transitions only, e.g. from
    [`qam.data.empty_replay_buffer`][]), `key`, `batch_size`, `horizon`, `discount`.

    **Returns:** a [`qam.data.SequenceBatch`][] of `batch_size` chunks.
    """
    n_off = batch_size // 2
    n_on = batch_size - n_off
    k_off, k_on, k_fallback = jax.random.split(key, 3)
    online = sample_sequence(buffer, k_on, n_on, horizon=horizon, discount=discount)
    fallback = sample_sequence(dataset, k_fallback, n_on, horizon=horizon, discount=discount)
    ready = buffer.size >= horizon
    online = jax.tree.map(lambda a, b: jnp.where(ready, a, b), online, fallback)
    if n_off == 0:
        return online
    offline = sample_sequence(dataset, k_off, n_off, horizon=horizon, discount=discount)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), offline, online)
