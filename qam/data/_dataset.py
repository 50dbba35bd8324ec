"""The on-device offline dataset and its conversion from OGBench-style numpy dicts."""

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Shaped


_FIELDS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")


class Dataset(eqx.Module):
    """A flat table of `N` transitions living on the JAX device.

    Row `i` is the transition `(s_i, a_i, r_i, mask_i, term_i, s'_i)`:

    - `observations`: `s_i`, shape `(N, *obs)`;
    - `actions`: `a_i`, shape `(N, A)`, float32;
    - `rewards`: `r_i`, shape `(N,)`, float32;
    - `masks`: `mask_i = 1 - success_i` (0 where the task is complete), shape `(N,)`, float32;
    - `terminals`: `term_i = 1` on the last transition of a trajectory (episode boundary),
      shape `(N,)`, float32;
    - `next_observations`: `s'_i`, shape `(N, *obs)`.

    Consecutive rows of one trajectory are consecutive in the table, so `s'_i = s_{i+1}`
    whenever `term_i = 0`. A `Dataset` is a pytree: pass it straight into `jax.jit`-ed
    functions such as [`qam.data.sample_sequence`][].
    """

    observations: Shaped[Array, " N *obs"]
    actions: Float[Array, "N act"]
    rewards: Float[Array, " N"]
    masks: Float[Array, " N"]
    terminals: Float[Array, " N"]
    next_observations: Shaped[Array, " N *obs"]

    @property
    def size(self) -> int:
        """The number of transitions `N`."""
        return self.observations.shape[0]

    @property
    def observation_shape(self) -> tuple[int, ...]:
        return tuple(self.observations.shape[1:])

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]


def _shape_error(name: str, key: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"{name}[{key!r}]: expected {expected}, got {got}.")


def dataset_from_numpy(
    data: Mapping[str, Any],
    *,
    name: str = "data",
    observation_dtype: Any = None,
) -> Dataset:
    """Validate an OGBench-style dict of arrays and move it onto the JAX device.

    **Arguments:**

    - `data`: a mapping with at least the keys `observations` `(N, *obs)`, `actions` `(N, A)`,
      `rewards` `(N,)`, `masks` `(N,)`, `terminals` `(N,)` and `next_observations` `(N, *obs)`
      (the *regular* format of `ogbench.load_dataset(..., compact_dataset=False)` after
      single-task relabelling). Extra keys (`qpos`, `qvel`, `button_states`, ...) are ignored.
    - `name`: how the argument is called in error messages.
    - `observation_dtype`: the dtype the observations are stored with on the device. Defaults
      to `uint8` for `uint8` (pixel) observations and `float32` otherwise.

    **Returns:**

    A [`qam.data.Dataset`][]: actions, rewards, masks and terminals as float32 arrays.

    **Raises:**

    `ValueError` naming the key, the expected shape or dtype and what was given, when a key is
    missing, the leading sizes disagree, a shape is wrong, a dtype is not numeric (bool is
    accepted for `terminals` and `masks`) or a value is not finite.
    """
    missing = [k for k in _FIELDS if k not in data]
    if missing:
        raise ValueError(
            f"{name}: missing key(s) {missing}; expected keys {list(_FIELDS)}, "
            f"got {sorted(data.keys())}."
        )
    arrays = {k: np.asarray(data[k]) for k in _FIELDS}
    obs = arrays["observations"]
    if obs.ndim < 1:
        raise _shape_error(name, "observations", "shape (N, *obs)", f"shape {obs.shape}")
    n = obs.shape[0]
    if n == 0:
        raise ValueError(f"{name}: expected at least one transition, got N = 0.")
    for k, arr in arrays.items():
        if arr.ndim == 0 or arr.shape[0] != n:
            raise _shape_error(
                name, k, f"leading size N = {n} (from 'observations')", f"shape {arr.shape}"
            )
    if arrays["next_observations"].shape != obs.shape:
        raise _shape_error(
            name,
            "next_observations",
            f"shape {obs.shape} (as 'observations')",
            f"shape {arrays['next_observations'].shape}",
        )
    if arrays["actions"].ndim != 2:
        raise _shape_error(name, "actions", f"shape ({n}, A)", f"shape {arrays['actions'].shape}")
    for k in ("rewards", "masks", "terminals"):
        if arrays[k].ndim != 1:
            raise _shape_error(name, k, f"shape ({n},)", f"shape {arrays[k].shape}")
    for k, arr in arrays.items():
        ok = np.issubdtype(arr.dtype, np.number) or (
            k in ("terminals", "masks") and arr.dtype == np.bool_
        )
        if not ok:
            raise _shape_error(name, k, "a numeric dtype", f"dtype {arr.dtype}")
    for k in ("actions", "rewards", "masks", "terminals"):
        if not np.all(np.isfinite(arrays[k])):
            raise _shape_error(name, k, "finite values", "NaN or inf")

    if observation_dtype is None:
        observation_dtype = np.uint8 if obs.dtype == np.uint8 else np.float32
    out = {}
    for k in _FIELDS:
        dtype = observation_dtype if k in ("observations", "next_observations") else np.float32
        out[k] = jnp.asarray(np.asarray(arrays[k], dtype=dtype))
    return Dataset(**out)


def concatenate_datasets(*datasets: Dataset) -> Dataset:
    """Stack datasets row-wise (e.g. train and validation splits, or several shards).

    Each input keeps its own episode boundaries; the last transition of an input is expected
    to be terminal (true for OGBench files), so no chunk spans two inputs.
    """
    if not datasets:
        raise ValueError("concatenate_datasets: expected at least one dataset, got none.")
    return Dataset(
        **{k: jnp.concatenate([getattr(d, k) for d in datasets], axis=0) for k in _FIELDS}
    )


class ReplayBuffer(eqx.Module):
    """A fixed-capacity functional ring buffer of transitions on the JAX device.

    - `data`: a [`qam.data.Dataset`][] of `capacity` rows (only the filled part is meaningful);
    - `size`: the number of filled rows, `0 ≤ size ≤ capacity` (int32 scalar array);
    - `insert_index`: the row the next transition is written to (int32 scalar array).

    In insertion order the rows are `(insert_index − size) mod capacity, …,
    (insert_index − 1) mod capacity`, oldest to newest. Create one with
    [`qam.data.replay_buffer_from_dataset`][] or [`qam.data.empty_replay_buffer`][], add
    transitions with [`qam.data.add_transition`][] and sample it with
    [`qam.data.sample_sequence`][]. All of these are pure: they return a new buffer.
    """

    data: Dataset
    size: Int[Array, ""]
    insert_index: Int[Array, ""]

    @property
    def capacity(self) -> int:
        return self.data.size
