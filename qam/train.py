"""Offline-to-online training: jitted offline loops, open-loop chunked online interaction,
evaluation, several seeds in one program, atomic checkpoints and exact resume.

Seeds are batched: every agent state and replay buffer carries a leading seed axis and `update`
runs under `eqx.filter_vmap`; each seed has its own environment. All randomness is derived from
`(seed, step)`, environments are reset with seeds derived from `(seed, episode index)`, and an
online checkpoint records how far into its episode each environment is, so a resumed run rebuilds
the environment by replaying that episode's stored actions and ends exactly as an uninterrupted
run would (bit-identical on CPU).

Sharded (100M-transition) datasets are read one shard at a time and rotated on a fixed
schedule of steps, and the seeds can be spread over several local devices; see `Trainer`.
"""

import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import re
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import data as qd
from ._io import atomic_write_json, atomic_write_with
from .agents import AGENTS


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What to run; the agent's hyperparameters live in its own config."""

    env_name: str
    agent: str = "qam-edit"
    offline_steps: int = 1_000_000
    online_steps: int = 500_000
    eval_episodes: int = 50
    eval_interval: int = 50_000
    log_interval: int = 1_000  # also the number of offline updates per jitted call
    seeds: tuple[int, ...] = (0,)
    out_dir: str = "runs/default"
    dataset_dir: str | None = None
    batch_size: int = 256
    start_training: int = 5_000  # online env steps before updates start
    utd_ratio: int = 1
    # None: dataset + online steps, so no offline row is ever evicted (the reference's
    # sizing). An int caps the replay buffer at max(buffer_size, dataset size) rows; past the
    # cap each online transition overwrites the oldest row, offline rows first.
    buffer_size: int | None = None
    checkpoint_interval: int = 50_000
    sparse: bool | None = None  # None: the paper's default for the domain
    max_episode_steps: int | None = None  # None: the environment's own limit
    # RLPD's regime (an agent's `run_defaults` name what it needs; the CLI applies them):
    # balanced_sampling: the replay buffer holds only online transitions (capacity
    # `buffer_size`, None: `online_steps`) and every online update's batch is batch_size / 2
    # offline chunks followed by batch_size / 2 buffer chunks (`qam.data.sample_balanced`).
    balanced_sampling: bool = False
    # random_warmup: for online steps t < start_training each action is one uniform draw
    # from [-1, 1]^A (a single action, not a chunk) instead of the agent's policy.
    random_warmup: bool = False
    # Dense cube rewards (`qam.data.DENSE_REWARD_VERSIONS`, None: the task's own reward) and the
    # cube success threshold in metres (OGBench's 0.04), used alike offline, online and in
    # evaluation; the shaping discount is the agent's `discount`.
    dense_reward_version: str | None = None
    cube_success_threshold: float = 0.04
    # Sharded datasets (the paper's 100M cube-quadruple and puzzle-4x4 data): a directory of
    # OGBench `.npz` shards (`*-val.npz` ignored), read instead of `dataset_dir`'s single file,
    # one shard on the device at a time, the next every `dataset_replace_interval` steps,
    # offline and online (the exact schedule is in `Trainer`'s docstring).
    shard_dir: str | None = None
    dataset_replace_interval: int = 1000  # steps per shard (only with `shard_dir`)
    # The leading fraction of the data trained on, as the reference applies it: the first
    # int(p * N) transitions of the dataset (of each shard), and with `shard_dir` only the
    # first max(1, int(p * #shards)) shards. 1.0: everything.
    dataset_proportion: float = 1.0
    # Spread the seeds over the local devices (a 1-D mesh, the seed axis sharded): used when
    # more than one device is present; see `Trainer`. False: everything on the default device.
    multi_device: bool = True

    def __post_init__(self):
        if self.agent not in AGENTS:
            raise ValueError(f"`agent={self.agent!r}` is not one of {', '.join(AGENTS)}.")
        for name in ("offline_steps", "online_steps", "start_training"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0; got {getattr(self, name)}.")
        for name in ("eval_episodes", "eval_interval", "log_interval", "batch_size", "utd_ratio",
                     "checkpoint_interval"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1; got {getattr(self, name)}.")
        if self.buffer_size is not None and self.buffer_size < 1:
            raise ValueError(f"`buffer_size` must be >= 1 or None; got {self.buffer_size}.")
        if self.balanced_sampling and self.batch_size % 2:
            raise ValueError(
                f"`batch_size` must be even with `balanced_sampling=True` (half offline, half "
                f"online chunks); got {self.batch_size}."
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"`seeds` must be distinct and non-empty; got {self.seeds}.")
        if not all(0 <= s < 2**32 for s in self.seeds):
            raise ValueError(
                f"`seeds` must be in [0, 2**32) (a PRNG key holds 32 bits; larger seeds would "
                f"wrap onto smaller ones); got {self.seeds}."
            )
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ValueError(
                f"`max_episode_steps` must be >= 1 or None; got {self.max_episode_steps}."
            )
        qd.check_dense_reward_version(self.dense_reward_version, "`dense_reward_version`")
        interval = self.dataset_replace_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(
                f"`dataset_replace_interval` must be an int >= 1 (steps per shard); got "
                f"{interval!r}."
            )
        p = self.dataset_proportion
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 < p <= 1.0:
            raise ValueError(
                f"`dataset_proportion` must be a number in (0, 1] (the leading fraction of the "
                f"data to train on); got {p!r}."
            )
        if self.shard_dir is not None and self.dataset_dir is not None:
            raise ValueError(
                f"`shard_dir` ({self.shard_dir!r}) and `dataset_dir` ({self.dataset_dir!r}) "
                "name two datasets; give one: `shard_dir` for a directory of shards, "
                "`dataset_dir` for the single-file dataset."
            )
        for name in ("eval_interval", "checkpoint_interval"):
            if getattr(self, name) % self.log_interval:
                raise ValueError(
                    f"`{name}` ({getattr(self, name)}) must be a multiple of `log_interval` "
                    f"({self.log_interval}), the number of offline updates per jitted call."
                )


def _seed_key(seed: int, stream: int, *path: int) -> jax.Array:
    """The key of `seed` for one use: a `stream` (0 offline, 1 online acting, 2 evaluation,
    3 BC evaluation, 4 online updates, 5 random warm-up actions) and a path of counters
    (step, episode, ...), each folded in separately so no counter can overflow."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), stream)
    for counter in path:
        key = jax.random.fold_in(key, counter)
    return key


def _keys(seeds: tuple[int, ...], stream: int, *path: int) -> jax.Array:
    return jnp.stack([_seed_key(s, stream, *path) for s in seeds])


def _to_host(tree: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in tree.items()}


class RunDirectoryBusy(RuntimeError):
    """Another process holds the output directory's lock."""


class TrainingInterrupted(Exception):
    """`Trainer.train` stopped after `Trainer.request_stop()`; a checkpoint of `step` was
    written, so running the same configuration on the same `out_dir` resumes from it."""

    def __init__(self, step: int):
        super().__init__(f"training stopped at step {step}; a checkpoint of it was written")
        self.step = step


class Trainer:
    """Runs one `RunConfig` with an agent config; see `examples/offline_to_online.py`.

    **Steps.** Step `g` is the `g`-th update offline (`0 <= g < offline_steps`) and the
    `(g - offline_steps)`-th environment step online, counted from 0 over the whole run.

    **Leading fraction** (`dataset_proportion = p`, as the reference's `main.py`): the dataset
    trained on is the first `int(p * N)` transitions of the loaded dataset (of each shard, see
    below), in file order; the cut's last transition is marked as an episode end (`terminal =
    1`, its mask unchanged, i.e. a truncation), so no chunk runs past the cut into the online
    rows that follow it in the replay buffer (sampling inside the dataset is unchanged by it:
    a chunk never starts past `N - H`).

    **Sharded datasets** (`shard_dir`; the paper's 100M cube-quadruple and puzzle-4x4 data,
    horizon-reduction's layout of ~1M-transition `*.npz` files beside `*-val.npz` ones, which
    are ignored). The shards are the directory's `*.npz` files sorted by name; with `p < 1`
    only the first `M = max(1, int(p * #shards))` are used (the reference applies `p` to the
    shard list and to each shard, so about `p**2` of the rows are seen). At start-up every
    shard's archive directory, array headers and `terminals` are checked
    (`inspect_ogbench_shards`), so a missing array, a truncated archive or a file of another
    task fails at once naming the shard; damaged array bytes fail, naming the shard, when it
    is loaded. Exactly one shard is resident on the device: before step `g` it is shard
    `(min(g, T - 1) // dataset_replace_interval) % M` (`T` = offline + online steps), i.e. the
    schedule rotates every `dataset_replace_interval` steps through the offline and the
    online phase alike, cycling after the last shard. The next shard is loaded right after
    the step that completes an interval, so offline chunks of `log_interval` updates are split
    there (each part draws its batches from the key of its own first step) and the resident
    shard at a checkpoint of step `g` is the one step `g` trains on. Loaded shards get the
    relabelling, sparse/dense rewards and action clip of single-file datasets. Online, with
    balanced sampling the offline half of every batch comes from the resident shard;
    otherwise, as in the reference, the replay buffer's first `N` rows hold the resident
    shard and are overwritten by the next shard when it is loaded, while the online rows
    after them are kept, so all used shards must have the same number of transitions
    (checked at start-up) and no online row may evict them (`buffer_size` None or >= `N +
    online_steps`). A checkpoint records the shard set (names, sizes, rows, transitions and a
    fingerprint of the arrays' CRC-32s, all from the files' headers), the proportion, the
    resident shard's position and the SHA-256 of its arrays as loaded; a resumed run loads
    the shard of its step (the reference restarts at shard 0) and refuses a changed shard
    set, naming what changed. Departures from the reference's schedule: its offline loop
    counts updates from 1 and loads the next shard before update `i` when `i % interval ==
    0` (so its first shard serves `interval - 1` updates), and its online loop restarts that
    count at the first online step; here one step count runs through both phases. The action
    clip `±(1 - 1e-5)` is applied to shards as to single files (the reference skips it on
    this path).

    **Several devices** (`multi_device`, on by default). With more than one local device and
    more than one seed, the seeds are spread over a 1-D mesh of `d` devices (axis `seeds`),
    `d` the largest number of devices (at most all of them) that divides the seed count: the
    leading seed axis of the agent states, replay buffers and PRNG keys is sharded over it
    (each device holds `S / d` seeds) and the offline dataset is replicated. When the seeds
    cannot use every device (more seeds than devices, not a multiple of their number), a
    warning says how many are used. Every seed computes the same mathematics with the same
    keys, but XLA compiles the per-device program for `S / d` seeds instead of `S` and may
    lower its dots differently (e.g. dropping a unit batch dimension), so float32 sums can be
    accumulated in another order: results agree with the single-device run's to rounding,
    not bit for bit (on CPU after 16 updates, within a few dozen ulps of each array's
    magnitude; tests/test_multidevice.py). Resume stays bit-identical on the same devices.
    `multi_device=False` keeps everything on the default device.
    """

    def __init__(self, run: RunConfig, agent_config: Any, *, log: Callable[[int, dict, str], None],
                 progress: Callable[[int, dict], None] | None = None):  # fmt: skip
        self._started = time.time()
        self._stop = False
        self.run = run
        self.config = agent_config
        self.agent = AGENTS[run.agent]
        self.log = log
        self.progress = progress or (lambda step, info: None)
        self.dense_reward = qd.dense_reward_options(
            run.dense_reward_version, run.cube_success_threshold, discount=agent_config.discount
        )
        self.num_seeds = len(run.seeds)
        self.mesh = _seed_mesh(run.multi_device, self.num_seeds)
        # `shards`: the shards trained on (all of `shard_headers` when p = 1); None: one file.
        self.shard_headers: list[qd.ShardHeader] | None = None
        self.shards: list[qd.ShardHeader] | None = None
        self.shard_index: int | None = None
        self.dataset: qd.Dataset  # the resident dataset (shard), replicated over the mesh
        self.data: qd.OGBenchData  # its environment and `DatasetInfo`
        if run.shard_dir is None:
            # make_env=False: training makes its own environments (online, evaluation), so
            # the dataset's would only hold a few hundred MB (relabelling builds one and
            # closes it).
            data = qd.load_ogbench(
                run.env_name, dataset_dir=run.dataset_dir, sparse=run.sparse, load_val=False,
                make_env=False, **self.dense_reward,
            )  # fmt: skip
            self.dataset = self._replicate(_leading_fraction(data.train, run.dataset_proportion))
            self.data = data._replace(train=self.dataset)  # `data.train` is what is trained on
            self._check_dataset(self.dataset, "the dataset")
        else:
            self._open_shards()
        capacity = self.buffer_capacity()
        if run.balanced_sampling and run.online_steps and capacity < agent_config.horizon:
            raise ValueError(
                f"with `balanced_sampling=True` the replay buffer holds only online transitions "
                f"and its capacity (`buffer_size`, or `online_steps` when None) must be >= the "
                f"action chunk length `horizon={agent_config.horizon}`; got {capacity}."
            )
        self.sparse = self.data.info.sparse
        self.action_dim = self.dataset.action_dim
        obs_example = self.dataset.observations[0].astype(jnp.float32)
        action_example = jnp.zeros((self.action_dim,), jnp.float32)
        self.states = self._place(eqx.filter_vmap(
            lambda k: self.agent.init(k, obs_example, action_example, agent_config)
        )(jnp.stack([jax.random.PRNGKey(s) for s in run.seeds])))  # fmt: skip
        self._read_latest()  # refuse a mismatched earlier run before anything is written

    def _check_dataset(self, dataset: Any, what: str) -> None:
        """Refuse a dataset (or shard, `what` naming it) that cannot give one valid chunk."""
        horizon = self.config.horizon
        if self.run.balanced_sampling and dataset.size == 0:
            raise ValueError(
                "`balanced_sampling=True` draws half of every batch from the offline dataset, "
                "but the dataset is empty (0 transitions); train without it or load data."
            )
        if dataset.size < horizon:
            raise ValueError(
                f"{what} has {dataset.size} transitions, fewer than the action chunk "
                f"length `horizon={horizon}`."
            )
        ends = np.flatnonzero(np.asarray(dataset.terminals))
        longest = int(np.max(np.diff(np.concatenate([[-1], ends])), initial=0))
        if ends.size and longest < horizon:
            raise ValueError(
                f"every episode of {what} is shorter than the action chunk length "
                f"`horizon={horizon}` (the longest has {longest} steps), so every "
                "chunk crosses an episode end and no TD target would be valid; lower `horizon`."
            )

    # ----------------------------------------------------------------- shards and devices
    def _open_shards(self) -> None:
        """Check every shard's header, choose the shards trained on, and load the one the run
        starts (or resumes) at."""
        run = self.run
        assert run.shard_dir is not None
        env = qd.make_env(run.env_name, **self.dense_reward)  # relabels every shard
        self.data = qd.OGBenchData(env=env, train=None, val=None, info=None)  # pyright: ignore
        try:
            self._choose_shards(env)
        except BaseException:
            env.close()
            raise

    def _choose_shards(self, env: Any) -> None:
        run = self.run
        assert run.shard_dir is not None
        headers = qd.inspect_ogbench_shards(run.env_name, run.shard_dir, env=env)
        self.shard_headers = headers
        self.shards = headers[: max(1, int(run.dataset_proportion * len(headers)))]
        if not run.balanced_sampling and run.online_steps > 0:
            kept = {h.name: int(h.transitions * run.dataset_proportion) for h in self.shards}
            if len(set(kept.values())) > 1:
                listing = ", ".join(f"{name}: {n}" for name, n in kept.items())
                raise ValueError(
                    f"the shards in {run.shard_dir} hold different numbers of transitions "
                    f"(after `dataset_proportion`: {listing}); online, the replay buffer's "
                    "first rows hold the resident shard and each next shard overwrites them, "
                    "so every shard must have the same size. Use equal shards, or "
                    "`balanced_sampling=True` (the offline half of each batch is drawn from the "
                    "resident shard directly)."
                )
            n = next(iter(kept.values()))
            if run.buffer_size is not None and run.buffer_size < n + run.online_steps:
                raise ValueError(
                    f"with `shard_dir` the replay buffer's first {n} rows hold the resident "
                    f"shard, replaced on every rotation, so no online row may overwrite them: "
                    f"`buffer_size` must be None or >= {n} + online_steps = "
                    f"{n + run.online_steps}; got {run.buffer_size}."
                )
        record = usable_checkpoint(run.out_dir)
        self._rotate(0 if record is None else int(record["step"]))

    def _shard_position(self, step: int) -> int:
        """The index (into `shards`) of the shard resident before step `step`."""
        assert self.shards is not None
        total = self.run.offline_steps + self.run.online_steps
        return (min(step, max(total - 1, 0)) // self.run.dataset_replace_interval) % len(
            self.shards
        )

    def _next_rotation(self, step: int) -> int | float:
        """The first step after `step` at which another shard becomes resident (inf if none)."""
        if self.shards is None or len(self.shards) == 1:
            return float("inf")
        interval = self.run.dataset_replace_interval
        return (step // interval + 1) * interval

    def _rotate(self, step: int) -> bool:
        """Make the shard of step `step` resident (loading it if another one is); True if it
        was loaded. A no-op without shards."""
        if self.shards is None:
            return False
        index = self._shard_position(step)
        if index == self.shard_index:
            return False
        header = self.shards[index]
        # Drop the resident shard first: one shard on the device at a time.
        self.dataset = None  # pyright: ignore[reportAttributeAccessIssue]
        self.data = self.data._replace(train=None)  # pyright: ignore[reportArgumentType]
        self._dataset_sha256 = None
        dataset, info = qd.load_ogbench_shard(
            self.run.env_name, header.path, env=self.data.env, sparse=self.run.sparse,
            shard_index=index, num_shards=len(self.shards), **self.dense_reward,
        )  # fmt: skip
        if dataset.size != header.transitions:
            raise qd.DatasetFileError(
                f"OGBench dataset shard {header.path} holds {dataset.size} transitions, but "
                f"{header.transitions} at start-up: the file changed during the run."
            )
        dataset = self._replicate(_leading_fraction(dataset, self.run.dataset_proportion))
        self._check_dataset(dataset, f"the dataset shard {header.name}")
        self.dataset = dataset
        self.data = self.data._replace(train=dataset, info=info)
        self.shard_index = index
        return True

    @property
    def devices(self) -> list[Any]:
        """The devices the seeds run on (one without a mesh)."""
        if self.mesh is None:
            return [jax.local_devices()[0]]
        return list(self.mesh.devices.flat)

    def _place(self, tree: Any) -> Any:
        """`tree` (leading seed axis on every array) sharded over the mesh's seed axis."""
        if self.mesh is None:
            return tree
        sharding = NamedSharding(self.mesh, PartitionSpec("seeds"))
        return jax.tree.map(lambda x: jax.device_put(x, sharding) if eqx.is_array(x) else x, tree)

    def _replicate(self, tree: Any) -> Any:
        """`tree` replicated on every device of the mesh (the offline dataset)."""
        if self.mesh is None:
            return tree
        sharding = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(lambda x: jax.device_put(x, sharding) if eqx.is_array(x) else x, tree)

    def _seed_keys(self, stream: int, *path: int) -> jax.Array:
        return self._place(_keys(self.run.seeds, stream, *path))

    def close(self) -> None:
        """Close the environments this trainer made (evaluation, and the shards' relabelling
        one); each MuJoCo environment holds a few hundred MB. The agent states stay usable."""
        for env in getattr(self, "_eval_env_list", []):
            env.close()
        self._eval_env_list = []
        if self.data.env is not None:
            self.data.env.close()
        self._unlock()

    def _unlock(self) -> None:
        lock_file = getattr(self, "_lock_file", None)
        if lock_file is not None:
            lock_file.close()  # releases the flock
            self._lock_file = None

    def lock(self) -> None:
        """Take `out_dir/.lock` (an exclusive `flock`, released when this trainer is closed or
        the process ends), creating `out_dir`; raises `RuntimeError` naming the holder's pid if
        another process is running in the same directory. `train` takes it itself."""
        if getattr(self, "_lock_file", None) is not None:
            return
        os.makedirs(self.run.out_dir, exist_ok=True)
        path = os.path.join(self.run.out_dir, ".lock")
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise RunDirectoryBusy(
                f"another run (pid {holder}) is using {self.run.out_dir}; wait for it to finish "
                "or choose another output directory."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f
        weakref.finalize(self, f.close)  # a trainer dropped without `close` releases it too

    def request_stop(self) -> None:
        """Ask `train` to stop at the next point where a checkpoint keeps resume exact (after
        the current offline chunk of `log_interval` updates, or the current online step): it
        writes that checkpoint and raises `TrainingInterrupted`. Safe to call from a signal
        handler."""
        self._stop = True

    @property
    def stop_requested(self) -> bool:
        return self._stop

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, states: Any, step: int, *, bc: bool = False) -> dict[str, np.ndarray]:
        """`eval_episodes` episodes per seed with the deployed policy (chunks open-loop).
        Returns per-seed `success` and `return` arrays."""
        run = self.run
        act = self.agent.bc_act if bc else self.agent.act
        if act is None:
            raise ValueError(f"agent {self.agent.name!r} has no behaviour-cloning policy")
        envs = self._eval_envs()
        successes = np.zeros((self.num_seeds, run.eval_episodes))
        returns = np.zeros((self.num_seeds, run.eval_episodes))
        stream = 3 if bc else 2
        for episode in range(run.eval_episodes):
            obs = np.stack([
                env.reset(seed=_episode_seed(s, 10_000_000 + episode))[0]
                for s, env in zip(run.seeds, envs)
            ])  # fmt: skip
            done = np.zeros(self.num_seeds, bool)
            queues: list[list[np.ndarray]] = [[] for _ in envs]
            t = 0
            while not done.all():
                if any(not q for q, d in zip(queues, done) if not d):
                    keys = self._seed_keys(stream, step, episode, t)
                    chunks = np.asarray(_act_all(states, jnp.asarray(obs), keys, act=act))
                    for i, q in enumerate(queues):
                        if not q:
                            q.extend(chunks[i].reshape(-1, self.action_dim))
                for i, env in enumerate(envs):
                    if done[i]:
                        continue
                    o, r, terminated, truncated, info = env.step(queues[i].pop(0))
                    obs[i] = o
                    returns[i, episode] += r
                    if terminated or truncated or self._truncate(t + 1):
                        done[i] = True
                        successes[i, episode] = float(info.get("success", 0.0))
                t += 1
        return {"success": successes.mean(1), "return": returns.mean(1)}

    def _truncate(self, t: int) -> bool:
        return self.run.max_episode_steps is not None and t >= self.run.max_episode_steps

    def _make_env(self):
        """An environment of the task, with the run's reward (dense, threshold) and chunks."""
        horizon = self.config.horizon
        return qd.make_env(self.run.env_name, chunk_length=horizon, **self.dense_reward)

    def _eval_envs(self):
        if not hasattr(self, "_eval_env_list"):
            self._eval_env_list = [self._make_env() for _ in self.run.seeds]
        return self._eval_env_list

    # ----------------------------------------------------------------- checkpoints
    def _checkpoint_paths(self) -> tuple[str, str]:
        return _checkpoint_paths(self.run.out_dir)

    def buffer_capacity(self) -> int:
        """Rows of each seed's replay buffer: the dataset plus every online step (nothing is
        evicted), or `max(buffer_size, N)` when `RunConfig.buffer_size` caps it. With
        `balanced_sampling` the buffer holds online rows only: `buffer_size`, or `online_steps`
        when None (at least 1)."""
        if self.run.balanced_sampling:
            size = self.run.online_steps if self.run.buffer_size is None else self.run.buffer_size
            return max(size, 1)
        if self.run.buffer_size is None:
            return self.dataset.size + self.run.online_steps
        return max(self.run.buffer_size, self.dataset.size)

    def dataset_reference(self) -> dict[str, Any]:
        """What a checkpoint records of the offline dataset instead of a copy of it: the files
        it was read from and the SHA-256 of the arrays as loaded (after relabelling, the
        transforms and `dataset_proportion`), which a resumed run must reproduce.

        With `shard_dir`: `shards`, every shard of the directory (name, bytes, rows,
        transitions, fingerprint: what `inspect_ogbench_shards` reads from the headers),
        `used` (how many are trained on), `proportion`, `position` (index and name of the
        resident shard) and `rows` / `sha256` of the resident shard as loaded."""
        if getattr(self, "_dataset_sha256", None) is None:
            digest = hashlib.sha256()
            for leaf in jax.tree.leaves(self.dataset):
                array = np.ascontiguousarray(np.asarray(leaf))
                digest.update(f"{array.dtype}{array.shape}".encode())
                digest.update(array.tobytes())
            self._dataset_sha256 = digest.hexdigest()
        if self.shards is None:
            files = [{"path": f["path"], "bytes": f["bytes"]} for f in self.data.info.files]
            return {"files": files, "rows": self.dataset.size, "sha256": self._dataset_sha256}
        assert self.shard_headers is not None and self.shard_index is not None
        return {
            "shard_dir": os.path.abspath(os.path.expanduser(str(self.run.shard_dir))),
            "shards": [h.to_dict() for h in self.shard_headers], "used": len(self.shards),
            "proportion": self.run.dataset_proportion,
            "position": {"index": self.shard_index, "name": self.shards[self.shard_index].name},
            "rows": self.dataset.size, "sha256": self._dataset_sha256,
        }  # fmt: skip

    def _buffer_start(self) -> int:
        """The row the ring writes its first online transition to: N after the offline rows,
        0 in a buffer of online rows only (`balanced_sampling`)."""
        return 0 if self.run.balanced_sampling else self.dataset.size

    def _online_positions(self, written: int) -> np.ndarray:
        """Physical buffer rows of the online transitions still in the buffer after `written`
        appends, oldest first (the ring starts writing at row `_buffer_start()`)."""
        capacity = self.buffer_capacity()
        kept = min(written, capacity)
        return (self._buffer_start() + np.arange(written - kept, written)) % capacity

    def save_checkpoint(self, step: int, meta: dict[str, Any], buffers: Any) -> None:
        """Write `ckpt-<step>.eqx` (agent states and, online, the replay buffers' online rows)
        and its record `ckpt-<step>.json` (the metadata, the file's size and SHA-256), then
        `latest.json` (a copy of the record), each atomically; the two newest checkpoints are
        kept, so a damaged newest one falls back to the one before.

        The offline dataset is not copied into checkpoints: the record holds a reference to it
        (`dataset_reference`) and only the rows written online are saved, so a checkpoint is
        the size of the agent state plus the online data."""
        directory, _ = self._checkpoint_paths()
        name = f"ckpt-{step:09d}.eqx"
        online_rows = None
        written = 0
        if buffers is not None:
            written = step - self.run.offline_steps
            expected = (self._buffer_start() + written) % self.buffer_capacity()
            if not np.all(np.asarray(buffers.insert_index) == expected):  # pragma: no cover
                raise AssertionError("replay buffer position does not match the step count")
            positions = jnp.asarray(self._online_positions(written))
            online_rows = jax.tree.map(lambda x: x[:, positions], buffers.data)
        digest = _HashingWriter()
        atomic_write_with(
            os.path.join(directory, name),
            lambda f: eqx.tree_serialise_leaves(digest.wrap(f), (self.states, online_rows)),
        )
        self._record: dict[str, Any] = dict(
            file=name, file_bytes=digest.size, file_sha256=digest.hexdigest(),
            phase_buffers=buffers is not None, online_written=written,
            dataset=self.dataset_reference(),
        )  # fmt: skip
        self._record_step = step
        self._write_record(step, meta)
        files = [f for f in os.listdir(directory) if _CHECKPOINT_FILE.fullmatch(f)]
        kept = sorted({f.split(".")[0] for f in files if f.endswith(".eqx")})[-2:]
        for old in files:
            if old.split(".")[0] not in kept:
                os.remove(os.path.join(directory, old))

    def _write_record(self, step: int, meta: dict[str, Any]) -> None:
        """(Re)write the record of the checkpoint of `step` with the current `meta` (after an
        evaluation of that step, so its results survive a crash before the next checkpoint)."""
        directory, latest = self._checkpoint_paths()
        record = dict(meta, wall_time_s=self._wall_time(meta), step=step, **self._record)
        stem = str(self._record["file"]).removesuffix(".eqx")
        _atomic_json(os.path.join(directory, stem + ".json"), record)
        _atomic_json(latest, record)

    def _read_latest(self) -> dict[str, Any] | None:
        """The record of the checkpoint an earlier run in `out_dir` resumes from (the newest
        whose file is intact), checked against this run's configuration and dataset; `None`
        for a fresh run."""
        directory, _ = self._checkpoint_paths()
        meta = usable_checkpoint(self.run.out_dir)
        if meta is None:
            return None
        if meta.get("run") != _run_signature(self.run, self.config):
            raise ValueError(
                f"the checkpoint in {directory} was written by a different configuration; use "
                "another `--out` directory or delete the old one.\n"
                f"  checkpoint: {meta.get('run')}\n"
                f"  this run:   {_run_signature(self.run, self.config)}"
            )
        self._rotate(int(meta["step"]))  # the shard the checkpoint's step trains on
        saved, current = meta.get("dataset"), self.dataset_reference()
        change = None if saved is None else _shard_change(saved, current)
        if change is not None:
            raise ValueError(
                f"the offline dataset changed since the checkpoint in {directory} was written: "
                f"{change}. Restore the shards to resume, or start a new run with another "
                "`--out`."
            )
        if saved is not None and saved["sha256"] != current["sha256"]:
            paths = ", ".join(f["path"] for f in saved["files"]) or "?"
            raise ValueError(
                f"the offline dataset changed since the checkpoint in {directory} was written "
                f"(it was read from {paths}: {saved['rows']} rows, sha256 {saved['sha256']}; "
                f"now {current['rows']} rows, sha256 {current['sha256']}). Restore that "
                "dataset to resume, or start a new run with another `--out`."
            )
        return meta

    def load_checkpoint(self) -> tuple[dict[str, Any], Any] | None:
        """The latest checkpoint's metadata and replay buffers (`None` offline); restores the
        agent states in place. `None` for a fresh run."""
        meta = self._read_latest()
        if meta is None:
            return None
        directory, _ = self._checkpoint_paths()
        written = int(meta.get("online_written", 0))
        positions = jnp.asarray(self._online_positions(written))
        rows_like = None
        if meta["phase_buffers"]:
            rows_like = jax.tree.map(
                lambda x: jnp.zeros((self.num_seeds, len(positions), *x.shape[1:]), x.dtype),
                self.dataset,
            )
        path = os.path.join(directory, meta["file"])
        try:
            states, rows = eqx.tree_deserialise_leaves(path, (self.states, rows_like))
            self.states = self._place(states)
        except Exception as error:  # intact by its hash, but not this run's structure
            raise ValueError(
                f"checkpoint file {path} does not hold this run's agent states ({error}); use "
                "another `--out` directory or delete the old one."
            ) from error
        self._record = {k: meta[k] for k in _RECORD_KEYS if k in meta}
        self._record_step = int(meta["step"])
        buffers = None
        if rows is not None:
            buffers = self._new_buffers()
            data = jax.tree.map(lambda b, r: b.at[:, positions].set(r), buffers.data, rows)
            capacity = self.buffer_capacity()
            seeds = (self.num_seeds,)
            start = self._buffer_start()
            size = jnp.full(seeds, min(start + written, capacity), jnp.int32)
            insert = jnp.full(seeds, (start + written) % capacity, jnp.int32)
            # tree_at, not the constructor: the buffers carry a leading seed axis.
            buffers = self._place(eqx.tree_at(
                lambda b: (b.data, b.size, b.insert_index), buffers, (data, size, insert)
            ))  # fmt: skip
        return meta, buffers

    def _new_buffers(self) -> Any:
        if self.run.balanced_sampling:  # online rows only; the dataset is sampled beside it
            one = qd.empty_replay_buffer(
                self.buffer_capacity(), observation_shape=self.dataset.observations.shape[1:],
                action_dim=self.action_dim, observation_dtype=self.dataset.observations.dtype,
            )  # fmt: skip
        else:
            one = qd.replay_buffer_from_dataset(self.dataset, capacity=self.buffer_capacity())
        return self._place(
            jax.tree.map(lambda x: jnp.broadcast_to(x, (self.num_seeds, *x.shape)), one)
        )

    def _wall_time(self, meta: dict[str, Any]) -> float:
        """Seconds spent on this run: earlier sessions' (up to their last checkpoint) plus
        this one's."""
        return float(meta.get("wall_time_s", 0.0)) + time.time() - self._started

    # ----------------------------------------------------------------- the run
    def train(self) -> dict[str, Any]:
        """Offline then online training with evaluation, logging and checkpoints; resumes from
        the latest checkpoint in `out_dir` if there is one. Returns the final results."""
        run = self.run
        loaded = self.load_checkpoint()
        meta: dict[str, Any] = {"run": _run_signature(run, self.config), "evals": [], "bc": None}
        buffers = None
        step = 0
        if loaded is not None:
            meta, buffers = loaded
            step = meta["step"]
        held = getattr(self, "_lock_file", None) is not None
        self.lock()
        try:
            return self._train(step, meta, buffers, loaded)
        finally:
            if not held:  # taken here: released here (a caller's own `lock` stays held)
                self._unlock()

    def _train(self, step: int, meta: dict[str, Any], buffers: Any, loaded: Any) -> dict:
        run = self.run
        offline_end = run.offline_steps
        if loaded is not None:  # an evaluation of the resumed step may not have finished
            final = step in (offline_end, offline_end + run.online_steps)
            bc = step == offline_end and self.agent.bc_act is not None
            self._maybe_eval(step, meta, final=final, bc=bc)
        # Offline: `log_interval` updates per jitted call (split where the next shard is due).
        while step < offline_end:
            end = min(step + run.log_interval, offline_end)
            metrics: Any = None
            while step < end:
                n = int(min(end, self._next_rotation(step))) - step
                self.states, metrics = _offline_chunk(
                    self.states, self._seed_keys(0, step), self.dataset, n,
                    update=self.agent.update, batch_size=run.batch_size,
                )  # fmt: skip
                step += n
                self._rotate(step)
            metrics = _to_host(metrics)
            _check_finite(metrics, step, getattr(self, "_record_step", None))
            self.log(step, metrics, "train")
            self.progress(step, metrics)
            # Checkpoint first, so a failing evaluation loses no training; the evaluation's
            # results are then added to that checkpoint's record.
            if step % run.checkpoint_interval == 0 or step == offline_end or self._stop:
                self.save_checkpoint(step, meta, None)
            bc = step == offline_end and self.agent.bc_act is not None
            self._maybe_eval(step, meta, final=step == offline_end, bc=bc)
            if self._stop:
                raise TrainingInterrupted(step)
        if run.online_steps > 0:
            self._online(step, meta, buffers)
        return dict(meta, wall_time_s=self._wall_time(meta))

    def _maybe_eval(self, step: int, meta: dict[str, Any], *, final: bool, bc: bool = False):
        """Evaluate when due (every `eval_interval` steps and at the end of each phase) and,
        with `bc`, the behaviour-cloning policy once; one `eval` log row per step."""
        row: dict[str, Any] = {}
        due = not (step % self.run.eval_interval and not final)
        if due and not any(e["step"] == step for e in meta["evals"]):
            result = self.evaluate(self.states, step)
            meta["evals"].append({"step": step, "success": result["success"].tolist(),
                                  "return": result["return"].tolist()})  # fmt: skip
            row.update(result)
        if bc and meta["bc"] is None:
            result = self.evaluate(self.states, step, bc=True)
            meta["bc"] = result["success"].tolist()
            row.update(bc_success=result["success"], bc_return=result["return"])
        if row and getattr(self, "_record_step", None) == step:
            self._write_record(step, meta)
        if row:
            self.log(step, row, "eval")
        if "success" in row:
            self.progress(step, {"success": row["success"]})

    def _online(self, step: int, meta: dict[str, Any], buffers: Any) -> None:
        envs = [self._make_env() for _ in self.run.seeds]
        try:
            self._online_loop(step, meta, buffers, envs)
        finally:
            for env in envs:
                env.close()

    def _online_loop(self, step: int, meta: dict[str, Any], buffers: Any, envs: list) -> None:
        run = self.run
        offline_end = run.offline_steps
        online = meta.get("online")
        if buffers is None:
            buffers = self._new_buffers()
        if online is None:
            online = {"episode": [0] * self.num_seeds, "episode_step": [0] * self.num_seeds,
                      "queue": [[] for _ in run.seeds]}  # fmt: skip
        obs = []
        for i, (seed, env) in enumerate(zip(run.seeds, envs)):
            o, _ = env.reset(seed=_episode_seed(seed, online["episode"][i]))
            # Rebuild the environment's state by replaying this episode's stored actions.
            n = online["episode_step"][i]
            capacity = buffers.data.actions.shape[1]
            insert = int(buffers.insert_index[i])
            for j in range(n):
                action = np.asarray(buffers.data.actions[i, (insert - n + j) % capacity])
                o, *_ = env.step(action)
            obs.append(np.asarray(o))
        queues = [[np.asarray(a, np.float32) for a in q] for q in online["queue"]]
        total = offline_end + run.online_steps
        metrics = None
        while step < total:
            t = step - offline_end
            warmup = run.random_warmup and t < run.start_training
            uniform = None
            if warmup:  # one uniform action per env step (not a chunk); the queues stay empty
                uniform = np.asarray(
                    _uniform_actions(self._seed_keys(5, step), action_dim=self.action_dim)
                )
            elif any(not q for q in queues):
                keys = self._seed_keys(1, step)
                chunks = np.asarray(
                    _act_all(self.states, jnp.asarray(np.stack(obs)), keys, act=self.agent.act)
                )
                for i, q in enumerate(queues):
                    if not q:
                        q.extend(chunks[i].reshape(-1, self.action_dim))
            transitions = []
            ended = []
            for i, env in enumerate(envs):
                action = queues[i].pop(0) if uniform is None else uniform[i]
                next_obs, reward, terminated, truncated, _ = env.step(action)
                online["episode_step"][i] += 1
                truncated = truncated or self._truncate(online["episode_step"][i])
                if self.sparse:
                    reward = -1.0 if reward != 0 else 0.0
                transitions.append(qd.online_transition(
                    obs[i], action, np.float32(reward), next_obs,
                    terminated=bool(terminated), truncated=bool(truncated),
                ))  # fmt: skip
                obs[i] = np.asarray(next_obs)
                ended.append(terminated or truncated)
            stacked = jax.tree.map(lambda *x: jnp.stack(x), *transitions)
            buffers = _add_all(buffers, stacked)
            if t >= run.start_training:
                self.states, metrics = _online_updates(
                    self.states, buffers, self._seed_keys(4, step), update=self.agent.update,
                    batch_size=run.batch_size, utd_ratio=run.utd_ratio,
                    dataset=self.dataset if run.balanced_sampling else None,
                )  # fmt: skip
            for i, done in enumerate(ended):
                if done:
                    online["episode"][i] += 1
                    online["episode_step"][i] = 0
                    queues[i] = []
                    obs[i], _ = envs[i].reset(
                        seed=_episode_seed(run.seeds[i], online["episode"][i])
                    )
            step += 1
            if self._rotate(step) and not run.balanced_sampling:
                buffers = _replace_offline_rows(buffers, self.dataset)
            if metrics is not None and (
                (step - offline_end) % run.log_interval == 0 or step == total
            ):
                host = _to_host(metrics)
                _check_finite(host, step, getattr(self, "_record_step", None))
                self.log(step, host, "train")
                self.progress(step, host)
            if step % run.checkpoint_interval == 0 or step == total or self._stop:
                online["queue"] = [[a.tolist() for a in q] for q in queues]
                meta["online"] = online
                self.save_checkpoint(step, meta, buffers)
            self._maybe_eval(step, meta, final=step == total)
            if self._stop:
                raise TrainingInterrupted(step)


# Compiled once per (agent, shapes, static settings) and shared by every Trainer in a process.
def _sample_and_update(state, key, data, *, update, batch_size):
    """One update on a batch from `data`: a dataset or replay buffer, or a pair `(offline
    dataset, online-only buffer)` for balanced batches (`qam.data.sample_balanced`: the first
    half offline, the second half online)."""
    sample_key, update_key = jax.random.split(key)
    config = state.config
    if isinstance(data, tuple):
        batch = qd.sample_balanced(
            *data, sample_key, batch_size, horizon=config.horizon, discount=config.discount
        )
    else:
        batch = qd.sample_sequence(
            data, sample_key, batch_size, horizon=config.horizon, discount=config.discount
        )
    return update(state, batch, key=update_key)


def _scan_updates(state, key, data, num_updates, *, update, batch_size):
    body = lambda st, k: _sample_and_update(st, k, data, update=update, batch_size=batch_size)
    state, metrics = jax.lax.scan(body, state, jax.random.split(key, num_updates))
    return state, jax.tree.map(lambda m: m[-1], metrics)


@eqx.filter_jit
def _offline_chunk(states, keys, dataset, num_updates, *, update, batch_size):
    """`num_updates` sample-and-update steps per seed on the offline dataset, in one call."""
    one = lambda s, k: _scan_updates(
        s, k, dataset, num_updates, update=update, batch_size=batch_size
    )
    return eqx.filter_vmap(one)(states, keys)


@eqx.filter_jit
def _online_updates(states, buffers, keys, *, update, batch_size, utd_ratio, dataset=None):
    """`utd_ratio` updates per seed, each on a batch sampled from that seed's replay buffer,
    or with `dataset` (balanced sampling) half from `dataset` (shared by the seeds), half from
    the buffer."""

    def one(s, b, k):
        data = b if dataset is None else (dataset, b)
        return _scan_updates(s, k, data, utd_ratio, update=update, batch_size=batch_size)

    return eqx.filter_vmap(one)(states, buffers, keys)


@eqx.filter_jit
def _uniform_actions(keys, *, action_dim):
    """One action per seed, uniform on `[-1, 1]^A`, from that seed's key (random warm-up)."""
    draw = lambda k: jax.random.uniform(k, (action_dim,), jnp.float32, -1.0, 1.0)
    return jax.vmap(draw)(keys)


@eqx.filter_jit
def _act_all(states, obs, keys, *, act):
    return eqx.filter_vmap(lambda s, o, k: act(s, o, key=k))(states, obs, keys)


@eqx.filter_jit(donate="all")
def _add_all(buffers, transitions):
    """Append one transition per seed. The buffers are donated, so the append writes in place
    instead of copying every buffer (hundreds of MB at the default capacity) on each step; the
    caller must not use the old `buffers` afterwards."""
    return eqx.filter_vmap(qd.add_transition)(buffers, transitions)


@functools.partial(jax.jit, donate_argnums=0)
def _replace_offline_rows(buffers, dataset):
    """Every seed's replay buffer with its first `N` rows (the offline rows) replaced by
    `dataset`'s `N` rows (the next shard); the online rows after them, `size` and
    `insert_index` are unchanged. The buffers are donated (written in place)."""
    data = jax.tree.map(
        lambda b, d: b.at[:, : d.shape[0]].set(jnp.broadcast_to(d, (b.shape[0], *d.shape))),
        buffers.data, dataset,
    )  # fmt: skip
    return eqx.tree_at(lambda b: b.data, buffers, data)


def _leading_fraction(dataset: Any, proportion: float) -> Any:
    """The first `int(proportion * N)` transitions of `dataset`, the last of them marked as an
    episode end (`terminal = 1`, mask unchanged); `dataset` itself when `proportion == 1`."""
    if proportion == 1.0:
        return dataset
    n = int(proportion * dataset.size)
    if n < 1:
        raise ValueError(
            f"`dataset_proportion={proportion}` keeps int({proportion} * {dataset.size}) = 0 "
            "transitions of the dataset; raise it."
        )
    cut = jax.tree.map(lambda x: x[:n], dataset)
    return eqx.tree_at(lambda d: d.terminals, cut, cut.terminals.at[n - 1].set(1.0))


def _seed_mesh(multi_device: bool, num_seeds: int) -> Mesh | None:
    """The 1-D mesh (axis `seeds`) the seeds are sharded over, or None for one device: the
    first `d` local devices, `d` the largest divisor of the seed count that is at most the
    number of devices; a warning when that leaves devices unused with at least as many seeds
    as devices."""
    devices = jax.local_devices()
    if not multi_device or len(devices) < 2 or num_seeds < 2:
        return None
    d = max(k for k in range(1, min(num_seeds, len(devices)) + 1) if num_seeds % k == 0)
    if d < len(devices) and num_seeds >= len(devices):
        warnings.warn(
            f"{num_seeds} seeds run on {d} of the {len(devices)} local devices (each device "
            f"holds the same number of seeds, so the count must divide evenly); train a "
            f"multiple of {len(devices)} seeds to use them all, or set `multi_device=False` "
            "(`--no-multi-device`) for one device.",
            stacklevel=3,
        )
    if d == 1:
        return None
    return Mesh(np.array(devices[:d]), ("seeds",))


def _shard_change(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """How the sharded dataset of a checkpoint's record differs from this run's, or None
    (also when neither is sharded: the single-file check follows)."""
    if "shards" not in saved and "shards" not in current:
        return None
    if "shards" not in current:
        return (
            f"it was trained on the shards in {saved.get('shard_dir')}, this run reads one "
            "file (`dataset_dir`); give the same `shard_dir`"
        )
    if "shards" not in saved:
        paths = ", ".join(f["path"] for f in saved.get("files", [])) or "?"
        return f"it was trained on {paths}, this run reads the shards in {current['shard_dir']}"
    old = {s["name"]: s for s in saved["shards"]}
    new = {s["name"]: s for s in current["shards"]}
    problems = []
    missing = [n for n in old if n not in new]
    added = [n for n in new if n not in old]
    if missing:
        problems.append(f"shard(s) {', '.join(missing)} are missing")
    if added:
        problems.append(f"shard(s) {', '.join(added)} are new")
    for name in (n for n in old if n in new):
        diff = [f"{k} {old[name][k]} -> {new[name][k]}"
                for k in ("bytes", "rows", "transitions", "fingerprint")
                if old[name].get(k) != new[name].get(k)]  # fmt: skip
        if diff:
            problems.append(f"shard {name} changed ({', '.join(diff)})")
    if problems:
        return (
            f"the shard set in {current['shard_dir']} is not the one of the checkpoint ("
            + "; ".join(problems)
            + ")"
        )
    if saved.get("used") != current["used"] or saved.get("position") != current["position"]:
        return (
            f"the checkpoint's step trains on {saved.get('position')} of {saved.get('used')} "
            f"shards, this run on {current['position']} of {current['used']}"
        )
    if saved.get("sha256") != current["sha256"]:
        return (
            f"shard {current['position']['name']} loads differently (sha256 "
            f"{saved.get('sha256')} then, {current['sha256']} now: relabelling or transforms "
            "changed)"
        )
    return None


def _checkpoint_paths(out_dir: str) -> tuple[str, str]:
    directory = os.path.join(out_dir, "checkpoints")
    return directory, os.path.join(directory, "latest.json")


_CHECKPOINT = re.compile(r"ckpt-\d{9}")
_CHECKPOINT_FILE = re.compile(r"ckpt-\d{9}\.(eqx|json)")
_RECORD_KEYS = ("file", "file_bytes", "file_sha256", "phase_buffers", "online_written", "dataset")


class _HashingWriter:
    """Wraps a binary file so that everything written through it is hashed and counted."""

    def __init__(self):
        self._sha = hashlib.sha256()
        self.size = 0

    def wrap(self, f: Any) -> Any:
        writer = self

        class _File:
            def write(self, data: bytes) -> int:
                writer._sha.update(data)
                writer.size += len(data)
                return f.write(data)

        return _File()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: str) -> str:
    """SHA-256 of a file, remembered by (path, size, mtime): a resume checks the same
    checkpoint up to three times (the CLI, `Trainer.__init__`, `load_checkpoint`)."""
    stat = os.stat(path)
    ident = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if ident not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _SHA256_CACHE[ident] = digest.hexdigest()
    return _SHA256_CACHE[ident]


def _intact(directory: str, record: dict[str, Any]) -> str | None:
    """Why the checkpoint file of `record` cannot be used, or `None` if it is intact."""
    name = record.get("file")
    if not isinstance(name, str):
        return "its record names no file"
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return f"{name} is missing"
    if "file_bytes" in record and os.path.getsize(path) != record["file_bytes"]:
        return f"{name} has {os.path.getsize(path)} bytes, its record says {record['file_bytes']}"
    if "file_sha256" in record and _file_sha256(path) != record["file_sha256"]:
        return f"{name} does not match its recorded SHA-256"
    return None


def usable_checkpoint(out_dir: str) -> dict[str, Any] | None:
    """The record of the newest intact checkpoint in `out_dir` (`None` if there is none).

    Candidates are `latest.json` and every `ckpt-<step>.json`, newest step first; a record
    that does not parse, or whose file is missing, truncated or altered (size and SHA-256 are
    recorded), is skipped with a warning naming it, so a damaged newest checkpoint falls back
    to the previous one. Raises `ValueError` naming every problem if checkpoints exist and
    none is usable."""
    directory, latest = _checkpoint_paths(out_dir)
    if not os.path.isdir(directory):
        return None
    paths = [latest] + sorted(
        (os.path.join(directory, f) for f in os.listdir(directory)
         if f.endswith(".json") and _CHECKPOINT.fullmatch(f.removesuffix(".json"))),
        reverse=True,
    )  # fmt: skip
    records, problems = [], []
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                record = json.load(f)
            int(record["step"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            problems.append(f"{path} is unreadable ({type(error).__name__}: {error})")
            continue
        records.append(record)
    records.sort(key=lambda r: int(r["step"]), reverse=True)
    for record in records:
        why = _intact(directory, record)
        if why is None:
            for problem in problems:
                warnings.warn(f"skipped a damaged checkpoint: {problem}", stacklevel=2)
            return record
        problems.append(why)
    if problems:
        raise ValueError(
            f"no usable checkpoint in {directory}: "
            + "; ".join(dict.fromkeys(problems))
            + ". Delete the directory to start over, or restore the files."
        )
    return None


def latest_checkpoint_step(out_dir: str) -> int | None:
    """The step of the checkpoint a run in `out_dir` would resume from, or `None`."""
    record = usable_checkpoint(out_dir)
    return None if record is None else int(record["step"])


def _check_finite(metrics: dict[str, np.ndarray], step: int, saved: int | None) -> None:
    """Stop on a non-finite metric, saying what was kept (`saved`: the step of the last
    checkpoint written, or `None`)."""
    bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
    if bad:
        kept = (
            f"the checkpoint of step {saved} is kept (rerunning resumes from it, and diverges "
            "again unless a setting changes)"
            if saved is not None
            else "no checkpoint had been written yet"
        )
        raise FloatingPointError(
            f"non-finite {', '.join(bad)} at step {step}; the run stopped and {kept}. Check the "
            "settings that scale the losses (learning rate, inverse temperature, loss weights) "
            "and the data."
        )


def _run_signature(run: RunConfig, config: Any) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint: every field except where
    the data and output live (the dataset is checked by its reference) and `multi_device`
    (a run may resume on other devices; results then continue up to float32 rounding);
    `dataset_replace_interval` only with `shard_dir`, and
    `dataset_proportion` only when below 1 (so checkpoints written before these fields
    existed still resume)."""
    skip = {"out_dir", "dataset_dir", "shard_dir", "multi_device"}
    if run.shard_dir is None:
        skip.add("dataset_replace_interval")
    if run.dataset_proportion == 1.0:
        skip.add("dataset_proportion")
    keep = {k: v for k, v in dataclasses.asdict(run).items() if k not in skip}
    return json.loads(json.dumps({"run": keep, "agent": dataclasses.asdict(config)}))


def _atomic_json(path: str, payload: dict[str, Any]) -> None:
    atomic_write_json(path, payload)


def _episode_seed(seed: int, episode: int) -> int:
    return (seed * 1_000_003 + episode) % (2**31 - 1)
