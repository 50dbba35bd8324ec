"""Closed-form objects for the tests (docs/mathematics.md §6)."""

import jax.numpy as jnp
import numpy as np


def gaussian_m(t, s2):
    """`m(t) = (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2)` for a N(mu, s^2) base (per dim)."""
    return (t * s2 - (1.0 - t)) / ((1.0 - t) ** 2 + t**2 * s2)


def gaussian_velocity(mu, s2):
    """The exact flow velocity `v_B(x, t) = mu + m(t) (x - t mu)` of a diagonal Gaussian base."""
    mu = jnp.asarray(mu)
    s2 = jnp.asarray(s2)

    def velocity(t, x, obs):
        del obs
        t = jnp.asarray(t, dtype=x.dtype)
        return mu + gaussian_m(t, s2) * (x - t * mu)

    return velocity


def reference_adjoints(s2, a_terminal, num_steps):
    """`A_i = prod_{j=i}^{K-1} (1 + h (2 m(t_{j+1}) - 1/t_{j+1})) A_K` in float64 (diagonal S)."""
    h = 1.0 / num_steps
    s2 = np.asarray(s2, dtype=np.float64)
    a = np.asarray(a_terminal, dtype=np.float64)
    out = []
    for i in reversed(range(num_steps)):
        t_next = (i + 1) * h
        a = (1.0 + h * (2.0 * gaussian_m(t_next, s2) - 1.0 / t_next)) * a
        out.append(a)
    return np.stack(out[::-1])


def discrete_mean_shift(s2, inv_temp_c, num_steps):
    """ODE mean shift of the discrete AM optimum for linear Q (docs/mathematics.md §6.2), 1-D,
    float64."""
    h = 1.0 / num_steps
    adjoints = reference_adjoints(s2, -inv_temp_c, num_steps)
    shift = 0.0
    for i in range(num_steps):
        t = i * h
        sigma2 = 2.0 * (1.0 - t + h) / (t + h)
        control = -0.5 * sigma2 * adjoints[i]
        prod = 1.0
        for j in range(i + 1, num_steps):
            prod *= 1.0 + h * gaussian_m(j * h, s2)
        shift += h * control * prod
    return float(shift)


def load_script(path, name):
    """Import a script that is not in a package (`examples/`, `benchmarks/`) from its path,
    with its own folder on `sys.path` while it loads (for sibling imports like `_common`),
    registered in `sys.modules` under `name`."""
    import importlib.util
    import os
    import sys

    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # tyro reads dataclass field comments through the module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def release_memory():
    """Collect garbage (environments and trainers sit in reference cycles) and hand the freed
    heap back to the OS (glibc keeps it otherwise), so one test's peak does not carry over."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# A tiny offline-to-online run on the session's generated cube-double dataset, shared by the
# trainer and checkpoint tests (same agent shapes, so their compiled updates are the same).
TINY_ENV = "cube-double-play-singletask-task1-v0"


def tiny_agent_config():
    from qam.agents import QAMConfig

    return QAMConfig(
        actor_hidden=(16, 16), critic_hidden=(16, 16), num_qs=2, flow_steps=3, variant="qam-edit",
        edit_scale=0.1,
        inv_temp=1.0,
    )  # fmt: skip


def tiny_run(dataset_dir, out_dir, **overrides):
    """A `RunConfig` of 16 offline + 24 online steps, 2 seeds, evaluations and checkpoints every
    8 steps, 12-step episodes; `overrides` replace any field."""
    from qam.train import RunConfig

    settings = dict(
        env_name=TINY_ENV, agent="qam-edit", offline_steps=16, online_steps=24, eval_episodes=1,
        eval_interval=8, log_interval=8, seeds=(0, 3), out_dir=str(out_dir),
        dataset_dir=dataset_dir, batch_size=8, start_training=4, checkpoint_interval=8,
        max_episode_steps=12,
    )  # fmt: skip
    settings.update(overrides)
    return RunConfig(**settings)


def random_chunk_batch(key, *, batch, horizon, obs_dim, action_dim):
    """A random `qam.data.SequenceBatch` for agent updates: normal observations, uniform actions in
    [-1, 1], negative partial returns, no terminal, every step valid."""
    import jax

    from qam.data import SequenceBatch

    k = jax.random.split(key, 4)
    return SequenceBatch(
        observations=jax.random.normal(k[0], (batch, obs_dim)),
        actions=jax.random.uniform(k[1], (batch, horizon, action_dim), minval=-1, maxval=1),
        rewards=-jax.random.uniform(k[2], (batch, horizon)),
        masks=jnp.ones((batch, horizon)),
        valid=jnp.ones((batch, horizon)),
        next_observations=jax.random.normal(k[3], (batch, horizon, obs_dim)),
    )
