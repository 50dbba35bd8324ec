"""The chunked sequence sampler (docs/mathematics.md §3.1), the ring buffer and balanced
sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qam.data import (
    Dataset,
    ReplayBuffer,
    SequenceBatch,
    add_transition,
    concatenate_datasets,
    dataset_from_numpy,
    empty_replay_buffer,
    online_transition,
    replay_buffer_from_dataset,
    sample_balanced,
    sample_sequence,
)


# Episode ends (terminals) at rows 3, 4 (a one-step episode), 9, 15 and 19; successes
# (mask 0) inside episodes at rows 2, 7, 8 and 13.
N = 20
TERMINAL_ROWS = (3, 4, 9, 15, 19)
SUCCESS_ROWS = (2, 7, 8, 13)


def _hand_made(n: int = N, offset: float = 0.0) -> dict[str, np.ndarray]:
    rows = np.arange(n, dtype=np.float32)
    terminals = np.zeros(n, np.float32)
    terminals[[r for r in TERMINAL_ROWS if r < n]] = 1.0
    terminals[-1] = 1.0
    masks = np.ones(n, np.float32)
    masks[[r for r in SUCCESS_ROWS if r < n]] = 0.0
    rng = np.random.default_rng(0)
    return {
        # The observation encodes the row, so the start index of a chunk can be read back.
        "observations": np.stack([rows + offset, -rows], axis=1),
        "actions": np.stack([rows, 2 * rows, rows % 3], axis=1).astype(np.float32),
        "rewards": -rng.integers(0, 4, n).astype(np.float32),
        "masks": masks,
        "terminals": terminals,
        "next_observations": np.stack([rows + offset + 1000.0, rows], axis=1),
    }


def _reference(data: dict[str, np.ndarray], j: int, horizon: int, discount: float) -> dict:
    """docs/mathematics.md §3.1, transcribed step by step."""
    valid, rewards, masks, next_obs, actions = [], [], [], [], []
    for k in range(horizon):
        if k == 0:
            v = 1.0
            r = float(data["rewards"][j])
            m = float(data["masks"][j])
            s = data["next_observations"][j]
        else:
            v = 1.0 - max(float(data["terminals"][j + i]) for i in range(k))
            r = rewards[-1] + discount**k * float(data["rewards"][j + k]) * v
            m = min(masks[-1], float(data["masks"][j + k])) if v else masks[-1]
            s = data["next_observations"][j + k] if v else next_obs[-1]
        valid.append(v)
        rewards.append(r)
        masks.append(m)
        next_obs.append(s)
        actions.append(data["actions"][j + k])
    return {
        "observations": data["observations"][j],
        "actions": np.stack(actions),
        "rewards": np.array(rewards),
        "masks": np.array(masks),
        "valid": np.array(valid),
        "next_observations": np.stack(next_obs),
    }


EPS32 = float(np.finfo(np.float32).eps)


def _assert_chunk_matches(got: SequenceBatch, ref: dict, horizon: int) -> None:
    """One sampled chunk (float32) against the float64 reference. Observations, actions, masks
    and `valid` are small integers, exact in float32, so they must be equal. The discounted
    rewards `sum_k gamma^k r_{j+k}` carry float32 rounding: each term <= H + 1 roundings (the
    power and the product), the sum <= H more; the rewards are all <= 0, so |sum| bounds every
    term and a relative tolerance of (H + 2)^2 eps32 covers it (an index error is >= 0.5)."""
    for field in SequenceBatch._fields:
        value, expected = np.asarray(getattr(got, field)), np.asarray(ref[field])
        if field == "rewards":
            np.testing.assert_allclose(value, expected, rtol=(horizon + 2) ** 2 * EPS32, atol=0)
        else:
            np.testing.assert_array_equal(value, expected, err_msg=field)


def _check_against_reference(
    batch: SequenceBatch, logical: dict[str, np.ndarray], horizon: int, discount: float
) -> set[int]:
    starts = set()
    batch = jax.tree.map(np.asarray, batch)
    obs = batch.observations
    for b in range(obs.shape[0]):
        j = int(round(obs[b, 0] - logical["observations"][0, 0]))
        assert 0 <= j <= len(logical["rewards"]) - horizon
        starts.add(j)
        ref = _reference(logical, j, horizon, discount)
        _assert_chunk_matches(jax.tree.map(lambda x, b=b: x[b], batch), ref, horizon)
    return starts


@pytest.mark.parametrize("horizon", [1, 3, 5])
def test_sampler_matches_brute_force(horizon):
    data = _hand_made()
    dataset = dataset_from_numpy(data)
    discount = 0.9
    batch = sample_sequence(
        dataset, jax.random.key(horizon), 256, horizon=horizon, discount=discount
    )
    assert batch.observations.shape == (256, 2)
    assert batch.actions.shape == (256, horizon, 3)
    for f in ("rewards", "masks", "valid"):
        assert getattr(batch, f).shape == (256, horizon)
        assert getattr(batch, f).dtype == jnp.float32
    assert batch.next_observations.shape == (256, horizon, 2)
    starts = _check_against_reference(batch, data, horizon, discount)
    # Every start in {0, ..., N - H} is drawn, and nothing else.
    assert starts == set(range(N - horizon + 1))


def test_sampler_edge_cases_by_hand():
    data = _hand_made()
    # j = 2, H = 3: rows 2, 3 (terminal), 4. valid = 1, 1, 0.
    ref = _reference(data, 2, 3, 0.5)
    np.testing.assert_array_equal(ref["valid"], [1, 1, 0])
    assert ref["masks"].tolist() == [0.0, 0.0, 0.0]
    r = data["rewards"]
    np.testing.assert_allclose(ref["rewards"], [r[2], r[2] + 0.5 * r[3], r[2] + 0.5 * r[3]])
    np.testing.assert_array_equal(ref["next_observations"][2], data["next_observations"][3])
    np.testing.assert_array_equal(ref["actions"][2], data["actions"][4])  # always a_{j+k}


def test_sampler_is_pure_inside_scan():
    dataset = dataset_from_numpy(_hand_made())

    def body(carry, key):
        batch = sample_sequence(dataset, key, 8, horizon=3, discount=0.99)
        return carry + jnp.sum(batch.rewards), batch.observations[:, 0]

    keys = jax.random.split(jax.random.key(0), 50)
    total, firsts = jax.jit(lambda k: jax.lax.scan(body, jnp.zeros(()), k))(keys)
    total2, firsts2 = jax.lax.scan(body, jnp.zeros(()), keys)
    np.testing.assert_array_equal(np.asarray(firsts), np.asarray(firsts2))
    assert firsts.shape == (50, 8)
    # Same key, same batch.
    a = sample_sequence(dataset, keys[0], 8, horizon=3, discount=0.99)
    b = sample_sequence(dataset, keys[0], 8, horizon=3, discount=0.99)
    np.testing.assert_array_equal(np.asarray(a.actions), np.asarray(b.actions))


def test_sampler_errors():
    dataset = dataset_from_numpy(_hand_made(4))
    with pytest.raises(ValueError, match="fewer than the horizon H = 5"):
        sample_sequence(dataset, jax.random.key(0), 2, horizon=5, discount=0.9)
    with pytest.raises(ValueError, match="horizon"):
        sample_sequence(dataset, jax.random.key(0), 2, horizon=0, discount=0.9)


# ---------------------------------------------------------------------------------------------
# dataset_from_numpy validation


def test_dataset_from_numpy_validation():
    good = _hand_made()
    ds = dataset_from_numpy(good)
    assert isinstance(ds, Dataset) and ds.size == N and ds.action_dim == 3
    assert ds.observations.dtype == jnp.float32 and ds.terminals.dtype == jnp.float32

    bad = dict(good)
    del bad["masks"]
    with pytest.raises(ValueError, match=r"data: missing key\(s\) \['masks'\]"):
        dataset_from_numpy(bad)
    bad = dict(good, rewards=good["rewards"][:, None])
    with pytest.raises(ValueError, match=r"data\['rewards'\]: expected shape \(20,\), got"):
        dataset_from_numpy(bad)
    bad = dict(good, actions=good["actions"][:-1])
    with pytest.raises(ValueError, match=r"offline\['actions'\]: expected leading size N = 20"):
        dataset_from_numpy(bad, name="offline")
    bad = dict(good, next_observations=good["next_observations"][:, :1])
    with pytest.raises(ValueError, match=r"\['next_observations'\]: expected shape \(20, 2\)"):
        dataset_from_numpy(bad)
    bad = dict(good, rewards=np.array(["a"] * N))
    with pytest.raises(ValueError, match=r"\['rewards'\]: expected a numeric dtype, got dtype"):
        dataset_from_numpy(bad)
    nan_rewards = good["rewards"].copy()
    nan_rewards[3] = np.nan
    with pytest.raises(ValueError, match=r"\['rewards'\]: expected finite values"):
        dataset_from_numpy(dict(good, rewards=nan_rewards))
    # Bool terminals (as in OGBench files) are accepted and stored as float32.
    ds = dataset_from_numpy(dict(good, terminals=good["terminals"].astype(bool)))
    assert ds.terminals.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Replay buffer


def _transition(t: int, terminal: bool = False):
    obs = np.array([1000.0 + t, -t], np.float32)
    return online_transition(
        obs,
        np.array([t, 2 * t, t % 3], np.float32),
        -float(t % 4),
        obs + np.array([0.5, 0.0], np.float32),
        terminated=False,
        truncated=terminal,
    )


def test_online_transition_mask_and_terminal():
    obs = np.zeros(2, np.float32)
    act = np.zeros(3, np.float32)
    cases = {(False, False): (1.0, 0.0), (True, False): (0.0, 1.0), (False, True): (1.0, 1.0)}
    cases[(True, True)] = (0.0, 1.0)
    for (terminated, truncated), (mask, terminal) in cases.items():
        t = online_transition(obs, act, 0.0, obs, terminated=terminated, truncated=truncated)
        assert float(t.mask) == mask and float(t.terminal) == terminal


def test_ring_buffer_wraps_around():
    capacity = 7
    buffer = empty_replay_buffer(capacity, observation_shape=(2,), action_dim=3)
    assert int(buffer.size) == 0 and int(buffer.insert_index) == 0
    for t in range(10):
        buffer = add_transition(buffer, _transition(t, terminal=(t == 5)))
    assert isinstance(buffer, ReplayBuffer)
    assert int(buffer.size) == capacity and int(buffer.insert_index) == 10 % capacity
    # Rows hold t = 7, 8, 9 at 0, 1, 2 and t = 3..6 at 3..6.
    np.testing.assert_array_equal(
        np.asarray(buffer.data.observations[:, 0]) - 1000.0, [7, 8, 9, 3, 4, 5, 6]
    )
    # Chunks follow insertion order across the physical end: compare with the logical table.
    logical_rows = [3, 4, 5, 6, 7, 8, 9]
    order = [(r % capacity) for r in logical_rows]
    logical = {
        "observations": np.asarray(buffer.data.observations)[order],
        "actions": np.asarray(buffer.data.actions)[order],
        "rewards": np.asarray(buffer.data.rewards)[order],
        "masks": np.asarray(buffer.data.masks)[order],
        "terminals": np.asarray(buffer.data.terminals)[order],
        "next_observations": np.asarray(buffer.data.next_observations)[order],
    }
    for horizon in (1, 3, 5):
        batch = sample_sequence(buffer, jax.random.key(horizon), 256, horizon=horizon, discount=0.9)
        starts = _check_against_reference(batch, logical, horizon, 0.9)
        assert starts == set(range(capacity - horizon + 1))


def test_buffer_partially_filled_samples_filled_part_only():
    buffer = empty_replay_buffer(16, observation_shape=(2,), action_dim=3)
    for t in range(6):
        buffer = add_transition(buffer, _transition(t))
    batch = sample_sequence(buffer, jax.random.key(1), 256, horizon=3, discount=0.9)
    firsts = set(np.asarray(batch.observations[:, 0]).astype(int).tolist())
    assert firsts == {1000, 1001, 1002, 1003}
    assert float(jnp.max(batch.next_observations[..., 0])) <= 1005.5


def test_buffer_from_dataset_and_capacity_error():
    data = _hand_made()
    dataset = dataset_from_numpy(data)
    with pytest.raises(ValueError, match="capacity: expected a Python int >= the dataset size"):
        replay_buffer_from_dataset(dataset, capacity=N - 1)
    buffer = replay_buffer_from_dataset(dataset, capacity=N + 4)
    assert int(buffer.size) == N and int(buffer.insert_index) == N
    for t in range(6):  # wraps: overwrites the two oldest offline rows
        buffer = add_transition(buffer, _transition(t))
    assert int(buffer.size) == N + 4 and int(buffer.insert_index) == 2
    # Logical order: offline rows 2..19 then online t = 0..5.
    online = [_transition(t) for t in range(6)]
    logical = {
        k: np.concatenate([data[k][2:], np.stack([np.asarray(getattr(o, f)) for o in online])])
        for k, f in zip(
            ("observations", "actions", "rewards", "masks", "terminals", "next_observations"),
            ("observation", "action", "reward", "mask", "terminal", "next_observation"),
        )
    }
    logical["observations"] = np.concatenate(
        [data["observations"][2:], np.stack([np.asarray(o.observation) for o in online])]
    )
    batch = sample_sequence(buffer, jax.random.key(3), 256, horizon=3, discount=0.9)
    batch = jax.tree.map(np.asarray, batch)
    obs = batch.observations
    row_of = {float(v): i for i, v in enumerate(logical["observations"][:, 0])}
    seen = set()
    for b in range(obs.shape[0]):
        j = row_of[float(obs[b, 0])]
        seen.add(j)
        _assert_chunk_matches(
            jax.tree.map(lambda x, b=b: x[b], batch), _reference(logical, j, 3, 0.9), 3
        )
    assert seen == set(range(N + 4 - 3 + 1))


def test_add_is_jittable_in_scan():
    buffer = empty_replay_buffer(5, observation_shape=(2,), action_dim=3)
    ts = jax.tree.map(lambda *xs: jnp.stack(xs), *[_transition(t) for t in range(8)])

    def body(buf, t):
        return add_transition(buf, t), None

    buffer, _ = jax.lax.scan(body, buffer, ts)
    assert int(buffer.size) == 5 and int(buffer.insert_index) == 3
    np.testing.assert_array_equal(
        np.asarray(buffer.data.observations[:, 0]) - 1000, [5, 6, 7, 3, 4]
    )


# ---------------------------------------------------------------------------------------------
# Balanced sampling


def test_balanced_sampling_proportions():
    dataset = dataset_from_numpy(_hand_made(64))
    buffer = empty_replay_buffer(40, observation_shape=(2,), action_dim=3)
    for t in range(30):
        buffer = add_transition(buffer, _transition(t, terminal=(t % 10 == 9)))
    batch_size, horizon = 256, 3
    counts = np.zeros(30 - horizon + 1)
    n_batches = 40
    for i in range(n_batches):
        batch = sample_balanced(
            dataset, buffer, jax.random.key(i), batch_size, horizon=horizon, discount=0.9
        )
        first = np.asarray(batch.observations[:, 0])
        # Exactly half from each source, offline first.
        assert np.all(first[: batch_size // 2] < 1000) and np.all(first[batch_size // 2 :] >= 1000)
        counts += np.bincount((first[batch_size // 2 :] - 1000).astype(int), minlength=28)
    # Online starts are uniform over {0, ..., 27}: a chi-square test at a generous level
    # (fixed keys, so the outcome is deterministic; 27 dof, the 0.999 quantile is about 55).
    expected = counts.sum() / len(counts)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert counts.sum() == n_batches * batch_size // 2
    assert chi2 < 55.0, chi2


def test_balanced_sampling_falls_back_to_dataset_when_buffer_too_small():
    dataset = dataset_from_numpy(_hand_made())
    buffer = empty_replay_buffer(10, observation_shape=(2,), action_dim=3)
    buffer = add_transition(buffer, _transition(0))  # 1 < H = 3
    batch = sample_balanced(dataset, buffer, jax.random.key(0), 9, horizon=3, discount=0.9)
    assert batch.observations.shape == (9, 2)
    assert np.all(np.asarray(batch.observations[:, 0]) < 1000)
    for t in range(1, 3):
        buffer = add_transition(buffer, _transition(t))
    batch = sample_balanced(dataset, buffer, jax.random.key(0), 9, horizon=3, discount=0.9)
    first = np.asarray(batch.observations[:, 0])
    assert np.all(first[:4] < 1000) and np.all(first[4:] == 1000)


def test_concatenate_datasets_keeps_boundaries():
    a = dataset_from_numpy(_hand_made(10))
    b = dataset_from_numpy(_hand_made(12, offset=500.0))
    c = concatenate_datasets(a, b)
    assert c.size == 22 and float(c.terminals[9]) == 1.0
