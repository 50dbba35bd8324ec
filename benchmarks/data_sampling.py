"""Data-layer benchmark: on-device chunked sampling and OGBench-file load time.

    python benchmarks/data_sampling.py [--transitions 1000000] [--skip-load]

Prints the median time of one `qam.data.sample_sequence` call (256 x 5 chunks over 1M
synthetic transitions), the amortised time per call inside a `lax.scan`, and the time to load
a synthetic 1M-transition file in OGBench's format through `qam.data.load_ogbench`
(`ogbench.load_dataset`, single-task relabelling, transfer to the device).
"""

import argparse
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import qam.data as qd


def _versions() -> str:
    import importlib.metadata as md

    out = [f"python {platform.python_version()}", f"jax {jax.__version__}"]
    for pkg in ("jaxlib", "equinox", "numpy", "ogbench", "mujoco"):
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


def _synthetic(n: int, obs_dim: int, act_dim: int, episode: int) -> qd.Dataset:
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((n, obs_dim), dtype=np.float32)
    terminals = np.zeros(n, np.float32)
    terminals[episode - 1 :: episode] = 1.0
    terminals[-1] = 1.0
    return qd.dataset_from_numpy(
        {
            "observations": obs,
            "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
            "rewards": -rng.integers(0, 3, n).astype(np.float32),
            "masks": np.ones(n, np.float32),
            "terminals": terminals,
            "next_observations": np.roll(obs, -1, axis=0),
        }
    )


def bench_sampling(n: int, batch: int, horizon: int, repeats: int) -> None:
    ds = _synthetic(n, 37, 5, 1000)
    key = jax.random.key(0)
    jax.block_until_ready(qd.sample_sequence(ds, key, batch, horizon=horizon, discount=0.99))
    times = []
    for i in range(repeats):
        k = jax.random.fold_in(key, i)
        t = time.perf_counter()
        jax.block_until_ready(qd.sample_sequence(ds, k, batch, horizon=horizon, discount=0.99))
        times.append(time.perf_counter() - t)
    print(
        f"sample_sequence {batch}x{horizon} over {n:,} transitions: median "
        f"{1e6 * statistics.median(times):.1f} us per call (host dispatch included)"
    )

    steps = 1000

    @jax.jit
    def scan(ds, key):
        def body(c, k):
            b = qd.sample_sequence(ds, k, batch, horizon=horizon, discount=0.99)
            return c + b.rewards[0, 0] + b.observations[0, 0], None

        return jax.lax.scan(body, jnp.zeros(()), jax.random.split(key, steps))[0]

    jax.block_until_ready(scan(ds, key))
    times = []
    for i in range(5):
        t = time.perf_counter()
        jax.block_until_ready(scan(ds, jax.random.fold_in(key, i)))
        times.append(time.perf_counter() - t)
    print(
        f"inside lax.scan ({steps} calls): median {1e6 * statistics.median(times) / steps:.1f} "
        "us per call"
    )


def bench_load(n_episodes: int) -> None:
    steps = 1001
    n = n_episodes * steps
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        qpos = rng.standard_normal((n, 28)).astype(np.float32)
        arrays = {
            "observations": rng.standard_normal((n, 37)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, 5)).astype(np.float32),
            "terminals": np.zeros(n, bool),
            "qpos": qpos,
            "qvel": np.zeros((n, 26), np.float32),
        }
        arrays["terminals"][steps - 1 :: steps] = True
        for name in ("cube-double-play-v0.npz", "cube-double-play-v0-val.npz"):
            small = name.endswith("-val.npz")
            with open(os.path.join(d, name), "wb") as f:
                np.savez_compressed(
                    f, **{k: v[: steps * 2] if small else v for k, v in arrays.items()}
                )
        del arrays, qpos
        t = time.perf_counter()
        out = qd.load_ogbench("cube-double-play-singletask-task2-v0", dataset_dir=d)
        jax.block_until_ready(out.train)
        dt = time.perf_counter() - t
        print(
            f"load_ogbench, {out.train.size:,} transitions (compressed synthetic file, relabel, "
            f"to device): {dt:.2f} s"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transitions", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--horizon", type=int, default=5)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--skip-load", action="store_true")
    args = p.parse_args()
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs; "
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})"
    )
    print(_versions())
    bench_sampling(args.transitions, args.batch, args.horizon, args.repeats)
    if not args.skip_load:
        bench_load(max(args.transitions // 1000, 1))


if __name__ == "__main__":
    main()
