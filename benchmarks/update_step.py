"""Benchmark: the whole QAM update step, and the offline loop that samples and updates.

What is measured, per variant (`qam`: `QAMConfig()`; `qam-fql`: `fql_alpha=30`; `qam-edit`:
`edit_scale=0.1`; every other field at the paper configuration: 4x512 networks, 10 critics,
K = 10 flow steps, chunks of H = 5, batch 256) on a synthetic 37-dim observation, 5-dim action
task, and per seed count S (`--seeds 1 8`):

- **update**: `qam.agents.qam.update` on a fixed batch (one per seed), jitted with the agent
  state donated and fed back, so each call is one real gradient step. S = 1 is the bare
  function; S > 1 is `jax.vmap` of it over S agents made by `eqx.filter_vmap(init)` of S keys
  (each seed its own batch and key). Reported in steps/s (S seeds count S steps per call).
- **loop**: the offline loop: one jitted call of a `lax.scan` over N (`--loop-steps`) steps of
  `qam.data.sample_sequence` (from an on-device `qam.data.Dataset`) followed by `update`, the
  way `qam.train` runs offline training. Reported in steps/s and as a fraction of the bare
  update's rate (target: >= 0.9, i.e. sampling costs < 10%).

For every compiled function: the compile time (trace + lower + XLA compile, timed ahead of time
with `jax.jit(f).lower(...).compile()`, reported separately from the run time), the median and
inter-quartile range of the call time over repeats (adaptive: `--repeats` calls at most, at least
`--min-repeats`, stopping once `--max-seconds` have been spent), and FLOPs per step two ways:

- `xla_gflop`: XLA's `cost_analysis()` of the compiled update. XLA counts a loop body once
  whatever its trip count, so it undercounts every `lax.scan` (the K-step ODE/SDE rollouts and
  the lean adjoint of QAM are scans).
- `gflop`: the matrix-product FLOPs of the jaxpr with each `scan` body counted `length` times
  (`_common.matmul_flops`; elementwise work, small next to the 512-wide products, is ignored).
  This is the count the efficiency uses (it is the one that matches the paper-configuration
  estimate of about 61 GFLOP per update).

Efficiency: `gflop * steps/s` divided by the machine's measured matrix-multiply rate, timed here
as the median of a jitted float32 `n x n @ n x n` product (`--matmul-size`, default 2048;
`2 n^3 / t`). Targets (benchmarked, not asserted): on CPU the authors' implementation reaches
about half the matmul rate, ours should reach >= 65%; the offline loop within 10% of the bare
update; on a GPU, 8 vmapped seeds >= 4x the total steps/s of one seed.

`--breakdown` also times the parts of one `qam` update, each jitted on its own (their sum
exceeds the fused update a little): the next-chunk sampling of the critic target (K-step ODE of
`actor_fast` + target critic), the critic TD gradient, the behaviour-cloning flow-matching
gradient, the adjoint-matching gradient (SDE rollout, terminal critic gradient, lean adjoint,
AM loss gradient) and the optimiser (clip + Adam + Polyak), each with its FLOPs and matmul-rate
fraction: where the time goes.

Defaults: on CPU one seed only (8 vmapped paper-size seeds should take about 8x one seed's
~1.2 s a step on 2 cores, not measured; ask with `--seeds 1 8`), on GPU `--seeds 1 8`. A default
CPU run of all three variants with `--breakdown` took 7 minutes on 2 shared cores.
`--quick` runs tiny networks (for the tests). Results go to
`benchmarks/results/update_step_<device>.json` and `.md` (atomic writes);
`python benchmarks/update_step.py --help` lists the options.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


VARIANT_OVERRIDES = {"qam": {}, "qam-fql": {"fql_alpha": 30.0}, "qam-edit": {"edit_scale": 0.1}}
PAPER = {
    "batch": 256,
    "width": 512,
    "depth": 4,
    "num_critics": 10,
    "flow_steps": 10,
    "horizon": 5,
    "obs_dim": 37,
    "action_dim": 5,
}
QUICK = {
    "batch": 8,
    "width": 16,
    "depth": 2,
    "num_critics": 2,
    "flow_steps": 2,
    "horizon": 2,
    "obs_dim": 4,
    "action_dim": 2,
}
TARGET_FRACTION = 0.65
TARGET_LOOP_RATIO = 0.9
TARGET_VMAP_SPEEDUP = 4.0


# --------------------------------------------------------------------------------------------
# Inputs


def make_config(variant: str, args: argparse.Namespace):
    from qam.agents import QAMConfig

    hidden = (args.width,) * args.depth
    return QAMConfig(
        actor_hidden=hidden,
        critic_hidden=hidden,
        num_qs=args.num_critics,
        flow_steps=args.flow_steps,
        horizon=args.horizon,
        **VARIANT_OVERRIDES[variant],
    )


def make_dataset(args: argparse.Namespace, seed: int):
    """A synthetic on-device dataset: Gaussian observations, actions in [-1, 1], episodes of
    `--episode-length` steps."""
    import numpy as np

    import qam.data as qd

    rng = np.random.default_rng(seed)
    n, obs_dim, action_dim = args.dataset_size, args.obs_dim, args.action_dim
    terminals = np.zeros(n, np.float32)
    terminals[args.episode_length - 1 :: args.episode_length] = 1.0
    terminals[-1] = 1.0
    observations = rng.standard_normal((n, obs_dim), dtype=np.float32)
    next_observations = np.concatenate([observations[1:], observations[-1:]], axis=0)
    return qd.dataset_from_numpy(
        {
            "observations": observations,
            "actions": rng.uniform(-1, 1, (n, action_dim)).astype(np.float32),
            "rewards": rng.standard_normal(n, dtype=np.float32),
            "masks": (rng.uniform(size=n) > 0.01).astype(np.float32),
            "terminals": terminals,
            "next_observations": next_observations,
        }
    )


def sample_batches(dataset, key, num_seeds: int, config, batch: int):
    """One `ChunkBatch` per seed (stacked on a leading axis when `num_seeds > 1`)."""
    import jax

    import qam.data as qd
    from qam.agents import ChunkBatch

    def one(k):
        b = qd.sample_sequence(dataset, k, batch, horizon=config.horizon, discount=config.discount)
        return ChunkBatch(*b)

    if num_seeds == 1:
        return one(key)
    return jax.vmap(one)(jax.random.split(key, num_seeds))


def init_states(config, args: argparse.Namespace, num_seeds: int, seed: int):
    """Agent state(s), split into (arrays, static): S = 1 plain, S > 1 `eqx.filter_vmap`.
    Every array leaf is a distinct buffer."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from qam.agents import qam as agent

    obs = jnp.zeros((args.obs_dim,), jnp.float32)
    action = jnp.zeros((args.action_dim,), jnp.float32)
    key = jax.random.PRNGKey(seed)
    init = eqx.filter_jit(lambda k: agent.init(k, obs, action, config))  # one compile, not
    if num_seeds == 1:  # hundreds of eager dispatches
        state = init(key)
    else:
        state = eqx.filter_jit(eqx.filter_vmap(init))(jax.random.split(key, num_seeds))
    dynamic, static = eqx.partition(state, eqx.is_array)
    # `init` shares buffers (target = online); copy every leaf so that the state can be donated.
    return jax.tree_util.tree_map(jnp.copy, dynamic), static


# --------------------------------------------------------------------------------------------
# The benchmarked functions: pure functions of (state arrays, ...) with the static part closed
# over, so that `jax.jit` can donate the state.


def make_update_fn(static, num_seeds: int):
    import equinox as eqx
    import jax

    from qam.agents import qam as agent

    def single(dynamic, batch, key):
        new, metrics = agent.update(eqx.combine(dynamic, static), batch, key=key)
        return eqx.filter(new, eqx.is_array), metrics["total_loss"]

    if num_seeds == 1:
        return single
    return jax.vmap(single)


def make_loop_fn(static, num_seeds: int, dataset_static, config, batch: int, num_steps: int):
    import equinox as eqx
    import jax

    import qam.data as qd
    from qam.agents import ChunkBatch

    update = make_update_fn(static, 1)

    def one_seed(dynamic, dataset_dynamic, key):
        dataset = eqx.combine(dataset_dynamic, dataset_static)

        def body(dynamic, k):
            sample_key, update_key = jax.random.split(k)
            b = qd.sample_sequence(
                dataset, sample_key, batch, horizon=config.horizon, discount=config.discount
            )
            return update(dynamic, ChunkBatch(*b), update_key)

        return jax.lax.scan(body, dynamic, jax.random.split(key, num_steps))

    if num_seeds == 1:
        return one_seed
    return jax.vmap(one_seed, in_axes=(0, None, 0))


# --------------------------------------------------------------------------------------------
# Measurement


def _quiet_donation():
    """Backends that cannot use a donated buffer warn; that changes nothing measured here."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message=".*[Dd]onat.*")
    return ctx


COMPILER_OPTIONS: dict[str, Any] = {}  # `--fast-compile`: XLA options for every compile


def compile_fn(fn, example_args, donate: bool) -> tuple[Any, dict[str, Any]]:
    """AOT-compile `fn` (timed), and count its FLOPs (XLA's and the loop-aware jaxpr count)."""
    import jax

    jitted = jax.jit(fn, donate_argnums=(0,) if donate else ())
    start = time.perf_counter()
    lowered = jitted.lower(*example_args)
    compiled = lowered.compile(dict(COMPILER_OPTIONS)) if COMPILER_OPTIONS else lowered.compile()
    compile_s = time.perf_counter() - start
    stats = _common.compile_stats(compiled)
    try:
        matmul = _common.matmul_flops(jax.make_jaxpr(fn)(*example_args))
    except Exception:  # noqa: BLE001 - the count is informative only
        matmul = None
    return compiled, {
        "compile_s": compile_s,
        "xla_flops": stats.get("flops"),
        "matmul_flops": matmul,
        "peak_estimate_bytes": stats.get("peak_estimate_bytes"),
    }


class Stateful:
    """`compiled(state, *rest_fn(i))` as a zero-argument call that feeds the (donated) state
    back, so that every call is one more real step."""

    def __init__(self, compiled, dynamic, rest_fn):
        self.compiled, self.state, self.rest_fn, self.i = compiled, dynamic, rest_fn, 0

    def __call__(self):
        self.i += 1
        self.state, out = self.compiled(self.state, *self.rest_fn(self.i))
        return self.state, out


class MatmulProbe:
    """The machine's float32 matrix-multiply rate: a jitted `n x n @ n x n`, `2 n^3 / t`."""

    def __init__(self, n: int):
        import jax
        import jax.numpy as jnp

        ka, kb = jax.random.split(jax.random.PRNGKey(0))
        self.n, self.flops = n, 2.0 * n**3
        self.a = jax.random.normal(ka, (n, n), jnp.float32)
        self.b = jax.random.normal(kb, (n, n), jnp.float32)
        self.f = jax.jit(lambda x, y: x @ y)
        _common.block(self.f(self.a, self.b))

    def __call__(self):
        return self.f(self.a, self.b)


def interleaved(calls: dict[str, Any], probe: MatmulProbe, args) -> dict[str, dict[str, Any]]:
    """Time every call of `calls` (one untimed warm-up each), round-robin with `--probe-calls`
    matmul-probe calls per round, for `--repeats` rounds at most (at least `--min-repeats`,
    stopping once `--max-seconds` have been spent). On a shared machine the load drifts;
    interleaving compares each call with the matmul rate (and with each other) under the same
    load. Returns a timing summary per name, and `"matmul"` with its `gflops_per_s`."""
    for fn in calls.values():
        _common.block(fn())
    times: dict[str, list[float]] = {name: [] for name in [*calls, "matmul"]}
    spent = 0.0
    for i in range(max(args.repeats, 1)):
        for _ in range(args.probe_calls):
            start = time.perf_counter()
            _common.block(probe())
            times["matmul"].append(time.perf_counter() - start)
        for name, fn in calls.items():
            start = time.perf_counter()
            _common.block(fn())
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            spent += elapsed
        if i + 1 >= args.min_repeats and spent >= args.max_seconds:
            break
    out = {name: _common.summarize(t) for name, t in times.items()}
    out["matmul"]["gflops_per_s"] = probe.flops / out["matmul"]["median_s"] / 1e9
    return out


def matmul_rate(probe: MatmulProbe, args: argparse.Namespace) -> dict[str, Any]:
    """A standalone measurement of the probe's rate (median of at least 10 calls)."""
    timing = _common.time_calls(
        probe, repeats=max(args.repeats, 10), min_repeats=3, max_seconds=10.0
    )
    return {
        **timing,
        "size": probe.n,
        "flops": probe.flops,
        "gflops_per_s": probe.flops / timing["median_s"] / 1e9,
    }


def _rate(flops, steps_per_s, peak) -> float | None:
    if flops is None or peak is None:
        return None
    return flops * steps_per_s / peak


def _gflop(flops, per=1):
    return flops / per / 1e9 if flops is not None else None


def bench_variant(variant: str, num_seeds: int, args, dataset, probe) -> dict[str, Any]:
    import equinox as eqx
    import jax

    config = make_config(variant, args)
    key = jax.random.PRNGKey(args.seed + 1)
    dynamic, static = init_states(config, args, num_seeds, args.seed)
    batches = sample_batches(dataset, key, num_seeds, config, args.batch)
    step_keys = (
        (lambda i: jax.random.fold_in(key, i))
        if num_seeds == 1
        else (lambda i: jax.random.split(jax.random.fold_in(key, i), num_seeds))
    )
    row: dict[str, Any] = {"variant": variant, "seeds": num_seeds}

    # Bare update on a fixed batch.
    update = make_update_fn(static, num_seeds)
    compiled_u, cost_u = compile_fn(update, (dynamic, batches, step_keys(0)), args.donate)
    calls = {"update": Stateful(compiled_u, dynamic, lambda i: (batches, step_keys(i)))}

    # Offline loop: N x (sample + update) in one jitted scan, on its own copy of the state.
    if args.loop_steps > 0:
        import jax.numpy as jnp

        ds_dynamic, ds_static = eqx.partition(dataset, eqx.is_array)
        loop = make_loop_fn(static, num_seeds, ds_static, config, args.batch, args.loop_steps)
        loop_state = jax.tree_util.tree_map(jnp.copy, dynamic)
        compiled_l, cost_l = compile_fn(loop, (loop_state, ds_dynamic, step_keys(0)), args.donate)
        calls["loop"] = Stateful(compiled_l, loop_state, lambda i: (ds_dynamic, step_keys(i)))

    timings = interleaved(calls, probe, args)
    peak = probe.flops / timings["matmul"]["median_s"]
    row["matmul_gflops_per_s"] = timings["matmul"]["gflops_per_s"]
    timing = timings["update"]
    steps_per_s = num_seeds / timing["median_s"]
    flops = cost_u["matmul_flops"]
    row["update"] = {
        "compile_s": cost_u["compile_s"],
        **timing,
        "steps_per_s": steps_per_s,
        "gflop": _gflop(flops, num_seeds),
        "xla_gflop": _gflop(cost_u["xla_flops"], num_seeds),
        "peak_estimate_bytes": cost_u["peak_estimate_bytes"],
        "fraction_of_matmul": _rate(_gflop(flops, num_seeds), steps_per_s, peak / 1e9),
        "fraction_of_matmul_xla_count": _rate(
            _gflop(cost_u["xla_flops"], num_seeds), steps_per_s, peak / 1e9
        ),
    }
    if args.loop_steps > 0:
        timing = timings["loop"]
        loop_rate = num_seeds * args.loop_steps / timing["median_s"]
        row["loop"] = {
            "steps": args.loop_steps,
            "compile_s": cost_l["compile_s"],
            **timing,
            "steps_per_s": loop_rate,
            "ratio_to_update": loop_rate / steps_per_s,
            "fraction_of_matmul": _rate(_gflop(flops, num_seeds), loop_rate, peak / 1e9),
        }
    jax.block_until_ready([c.state for c in calls.values()])
    return row


# --------------------------------------------------------------------------------------------
# Per-part breakdown of one `qam` update (single seed)


def breakdown(args, dataset, probe) -> list[dict[str, Any]]:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import qam
    from qam._adjoint import _fused_loss, _fused_rollout
    from qam._sde import _prepare_rollout
    from qam.agents import critic_loss, make_optimizer, polyak_update, qam as agent

    config = make_config("qam", args)
    key = jax.random.PRNGKey(args.seed + 2)
    dynamic, static = init_states(config, args, 1, args.seed)
    state = eqx.combine(dynamic, static)
    batch = sample_batches(dataset, key, 1, config, args.batch)
    b = args.batch
    dim = state.action_dim
    obs = batch.observations
    actions = batch.actions.reshape(b, -1)
    sg = lambda t: eqx.combine(jax.lax.stop_gradient(eqx.filter(t, eqx.is_array)), t)  # noqa: E731

    def next_action(state, batch, k):
        next_obs = batch.next_observations[:, -1]
        a = jax.vmap(lambda o, kk: agent.act(state, o, key=kk))(next_obs, jax.random.split(k, b))
        return state.target_critic.batched(next_obs, a)

    def critic_grad(state, batch, k):
        del k
        next_q = jnp.zeros((b, config.num_qs), jnp.float32)

        def loss(c):
            q = c.batched(obs, actions)
            return critic_loss(q, batch, next_q, discount=config.discount, rho=config.rho)[0]

        return eqx.filter_grad(loss)(state.critic)

    def flow_grad(state, batch, k):
        def loss(v):
            per = jax.vmap(lambda o, a, kk: qam.flow_matching_loss(v, o, a, key=kk))(
                obs, actions, jax.random.split(k, b)
            )
            return jnp.mean(per)

        return eqx.filter_grad(loss)(state.actor_slow)

    def am_parts(state, k, upto):
        # The agent's adjoint-matching term, cut after each stage (as `agent._losses`
        # computes it: fused rollout, one batched terminal critic gradient, fused loss).
        base, critic = sg(state.target_actor_slow), sg(state.target_critic)

        def loss(fast):
            def rollout_one(o, kk):
                noise, h, ts, _ = _prepare_rollout("bench", kk, None, dim, config.flow_steps, base)
                return _fused_rollout(fast, base, o, noise, h, ts, residual=False)

            traj, controls = jax.vmap(rollout_one)(obs, jax.random.split(k, b))
            if upto == "rollout":
                return jnp.sum(controls), traj

            def q_mean_sum(a):
                return jnp.sum(jnp.mean(critic.batched(obs, jnp.clip(a, -1.0, 1.0)), axis=1))

            term = -config.inv_temp * jax.grad(q_mean_sum)(traj.action)
            if upto == "terminal":
                return jnp.sum(controls), (traj, term)
            if upto == "adjoint":  # without the backward pass through the fine velocity
                controls = jax.lax.stop_gradient(controls)
            per = jax.vmap(_fused_loss, in_axes=(None, 0, 0, 0, 0))(base, obs, traj, controls, term)
            return jnp.mean(per), None

        if upto in ("rollout", "terminal", "adjoint"):
            return loss(sg(state.actor_fast))
        return eqx.filter_grad(lambda f: loss(f)[0])(state.actor_fast)

    def optimiser(state, batch, k):
        del batch, k
        params = agent._trainable(state)
        dyn = eqx.filter(params, eqx.is_inexact_array)
        opt = make_optimizer(config.learning_rate, clip_grad=config.clip_grad)
        updates, opt_state = opt.update(dyn, state.opt_state, dyn)
        new = optax.apply_updates(dyn, updates)
        targets = (
            polyak_update(state.target_critic, state.critic, tau=config.tau),
            polyak_update(state.target_actor_slow, state.actor_slow, tau=config.tau),
        )
        return new, opt_state, eqx.filter(targets, eqx.is_array)

    def whole(state, batch, k):
        return eqx.filter(agent.update(state, batch, key=k), eqx.is_array)

    parts = [
        ("critic target: next chunk (K-step ODE) + target critic", next_action),
        ("critic TD gradient", critic_grad),
        ("BC flow-matching gradient", flow_grad),
        ("AM: SDE rollout (fine + base velocity)", lambda s, bt, k: am_parts(s, k, "rollout")),
        ("AM: + batched terminal critic gradient", lambda s, bt, k: am_parts(s, k, "terminal")),
        ("AM: + lean adjoint + loss", lambda s, bt, k: am_parts(s, k, "adjoint")),
        ("AM: whole gradient (+ fine velocity backward)", lambda s, bt, k: am_parts(s, k, "grad")),
        ("optimiser: clip + Adam + Polyak", optimiser),
        ("whole update (no donation)", whole),
    ]
    rows = []
    for name, fn in parts:

        def f(dyn, batch, k, fn=fn):
            return fn(eqx.combine(dyn, static), batch, k)

        compiled, cost = compile_fn(f, (dynamic, batch, key), donate=False)
        timings = interleaved(
            {"part": lambda compiled=compiled: compiled(dynamic, batch, key)}, probe, args
        )
        timing = timings["part"]
        flops = cost["matmul_flops"]
        rows.append(
            {
                "part": name,
                "compile_s": cost["compile_s"],
                **timing,
                "gflop": _gflop(flops),
                "xla_gflop": _gflop(cost["xla_flops"]),
                "matmul_gflops_per_s": timings["matmul"]["gflops_per_s"],
                "fraction_of_matmul": _rate(
                    _gflop(flops), 1.0 / timing["median_s"], timings["matmul"]["gflops_per_s"]
                ),
            }
        )
        print(f"  breakdown: {parts_table(rows[-1:]).splitlines()[-1]}", flush=True)
        del compiled
    return rows


# --------------------------------------------------------------------------------------------
# Reporting


def _f(x, fmt="{:.3g}"):
    return "–" if x is None else fmt.format(x)


def _pct(x):
    return "–" if x is None else f"{100 * x:.0f}%"


def table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "variant",
        "seeds",
        "update ms/call",
        "update steps/s",
        "GFLOP/step",
        "XLA GFLOP/step",
        "% of matmul",
        "matmul GFLOP/s",
        "compile s",
        "loop steps/s",
        "loop / update",
        "loop compile s",
        "vmap speed-up",
    ]
    out = []
    one_seed = {r["variant"]: r["update"]["steps_per_s"] for r in rows if r["seeds"] == 1}
    for r in rows:
        u, lp = r["update"], r.get("loop")
        speedup = (
            u["steps_per_s"] / one_seed[r["variant"]]
            if r["seeds"] > 1 and r["variant"] in one_seed
            else None
        )
        half_iqr = 1e3 * u["iqr_s"] / 2
        out.append(
            [
                r["variant"],
                r["seeds"],
                f"{1e3 * u['median_s']:.4g} ± {half_iqr:.2g}",
                _f(u["steps_per_s"]),
                _f(u["gflop"]),
                _f(u["xla_gflop"]),
                _pct(u["fraction_of_matmul"]),
                _f(r.get("matmul_gflops_per_s"), "{:.1f}"),
                _f(u["compile_s"], "{:.1f}"),
                _f(lp["steps_per_s"] if lp else None),
                _f(lp["ratio_to_update"] if lp else None, "{:.2f}"),
                _f(lp["compile_s"] if lp else None, "{:.1f}"),
                _f(speedup, "{:.2f}x"),
            ]
        )
    return _common.markdown_table(headers, out)


def parts_table(rows: list[dict[str, Any]]) -> str:
    headers = ["part", "ms", "GFLOP", "XLA GFLOP", "% of matmul", "matmul GFLOP/s", "compile s"]
    out = [
        [
            r["part"],
            f"{1e3 * r['median_s']:.4g} ± {1e3 * r['iqr_s'] / 2:.2g}",
            _f(r["gflop"]),
            _f(r["xla_gflop"]),
            _pct(r["fraction_of_matmul"]),
            _f(r.get("matmul_gflops_per_s"), "{:.1f}"),
            _f(r["compile_s"], "{:.1f}"),
        ]
        for r in rows
    ]
    return _common.markdown_table(headers, out)


def targets(rows, mm, backend: str) -> list[str]:
    lines = [f"- matmul rate ({mm['size']}^3 float32): {mm['gflops_per_s']:.1f} GFLOP/s"]
    for r in rows:
        u, lp = r["update"], r.get("loop")
        tag = f"{r['variant']} x{r['seeds']}"
        if u["gflop"] is not None and r["seeds"] == 1:
            lines.append(f"- {tag}: {u['gflop']:.3g} GFLOP per update (paper estimate ~61)")
        if u["fraction_of_matmul"] is not None:
            ok = u["fraction_of_matmul"] >= TARGET_FRACTION
            lines.append(
                f"- {tag}: update at {_pct(u['fraction_of_matmul'])} of the matmul rate "
                f"(target >= {_pct(TARGET_FRACTION)} on CPU): {'met' if ok else 'NOT met'}"
            )
        if lp:
            ok = lp["ratio_to_update"] >= TARGET_LOOP_RATIO
            lines.append(
                f"- {tag}: offline loop at {lp['ratio_to_update']:.2f}x the bare update "
                f"(target >= {TARGET_LOOP_RATIO}): {'met' if ok else 'NOT met'}"
            )
    one_seed = {r["variant"]: r["update"]["steps_per_s"] for r in rows if r["seeds"] == 1}
    for r in rows:
        if r["seeds"] == 8 and r["variant"] in one_seed:
            speedup = r["update"]["steps_per_s"] / one_seed[r["variant"]]
            verdict = "met" if speedup >= TARGET_VMAP_SPEEDUP else "NOT met"
            if backend == "cpu":
                verdict += " (the target is for GPUs)"
            lines.append(
                f"- {r['variant']}: 8 vmapped seeds at {speedup:.2f}x the steps/s of one "
                f"(target >= {TARGET_VMAP_SPEEDUP:.0f}x on GPU): {verdict}"
            )
    return lines


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Time the whole QAM update step (qam, qam-fql, qam-edit) at the paper configuration, "
            "one seed and S vmapped seeds, and the offline sample+update loop; report steps/s, "
            "FLOPs per step, and the fraction of the measured matmul rate."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANT_OVERRIDES),
        default=list(VARIANT_OVERRIDES),
        help="which agents: qam = QAMConfig(), qam-fql = fql_alpha 30, qam-edit = edit_scale 0.1",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="seed counts to run (S > 1: agents vmapped over S init keys); default 1 on CPU "
        "(8 paper-size seeds are slow there), 1 8 on GPU",
    )
    parser.add_argument("--batch", type=int, default=None, help="batch size B (paper: 256)")
    parser.add_argument("--width", type=int, default=None, help="hidden width (paper: 512)")
    parser.add_argument("--depth", type=int, default=None, help="hidden layers (paper: 4)")
    parser.add_argument(
        "--num-critics", type=int, default=None, help="critic ensemble size (paper: 10)"
    )
    parser.add_argument("--flow-steps", type=int, default=None, help="flow steps K (paper: 10)")
    parser.add_argument(
        "--horizon", type=int, default=None, help="action chunk length H (paper: 5)"
    )
    parser.add_argument("--obs-dim", type=int, default=None, help="observation size (paper: 37)")
    parser.add_argument("--action-dim", type=int, default=None, help="action size (paper: 5)")
    parser.add_argument(
        "--loop-steps",
        type=int,
        default=None,
        help="N: sample+update steps per jitted lax.scan of the offline loop; 0 skips the loop "
        "(default 10 on CPU, 50 on GPU)",
    )
    parser.add_argument(
        "--dataset-size", type=int, default=100_000, help="rows of the synthetic dataset"
    )
    parser.add_argument(
        "--episode-length", type=int, default=1000, help="episode length of the synthetic dataset"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (max)")
    parser.add_argument(
        "--min-repeats", type=int, default=2, help="timed rounds per measurement (min)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=45.0,
        help="stop a measurement once its timed calls took this long (after --min-repeats); "
        "a round of a variant calls the update once and the N-step loop once",
    )
    parser.add_argument(
        "--matmul-size", type=int, default=2048, help="n of the n x n float32 matmul-rate probe"
    )
    parser.add_argument(
        "--probe-calls",
        type=int,
        default=2,
        help="matmul-probe calls before each round of timed calls (the '%% of matmul' of a row "
        "uses the probe's median rate over that row's rounds, as the machine may be shared)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the parts of one qam update (critic target, critic/flow/AM gradients, "
        "optimiser), each jitted on its own",
    )
    parser.add_argument(
        "--no-donate",
        dest="donate",
        action="store_false",
        help="do not donate the agent state to the jitted update (donated by default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for weights and data")
    parser.add_argument(
        "--platform",
        choices=["cpu", "gpu", "tpu"],
        default=None,
        help="JAX platform (default: JAX's choice, i.e. the accelerator if there is one)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON output path (markdown beside it, .md); default "
        "benchmarks/results/update_step_<device>.json",
    )
    parser.add_argument(
        "--fast-compile",
        action="store_true",
        help="compile with XLA's backend optimisation level 0 (shorter compiles, slower code: "
        "for smoke tests only; implied by --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (2x16 networks, 2 critics, K=2, H=2, batch 8, 256^3 matmul, 3 loop "
        "steps), at most 2 repeats, --fast-compile: a smoke test of the harness, not a benchmark",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    sizes = QUICK if args.quick else PAPER
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.repeats, args.min_repeats = min(args.repeats, 2), 1
        args.dataset_size = min(args.dataset_size, 1000)
        args.episode_length = min(args.episode_length, 50)
        args.matmul_size = min(args.matmul_size, 256)
        args.fast_compile = True
    COMPILER_OPTIONS.clear()
    if args.fast_compile:
        COMPILER_OPTIONS["xla_backend_optimization_level"] = 0

    import jax

    if args.platform is not None:
        jax.config.update("jax_platforms", "cuda" if args.platform == "gpu" else args.platform)
    backend = jax.default_backend()
    if args.seeds is None:
        args.seeds = [1] if backend == "cpu" else [1, 8]
    if args.loop_steps is None:
        args.loop_steps = 3 if args.quick else (10 if backend == "cpu" else 50)

    info = _common.machine_info()
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"update_step_{_common.device_tag()}.json",
    )
    config = {k: v for k, v in vars(args).items() if k != "out"}
    print(_common.format_machine_info(info))
    print(f"config  : {config}", flush=True)

    ctx = _quiet_donation()
    try:
        probe = MatmulProbe(args.matmul_size)
        mm = matmul_rate(probe, args)
        print(
            f"matmul  : {args.matmul_size}^3 float32 in {1e3 * mm['median_s']:.2f} ms "
            f"-> {mm['gflops_per_s']:.1f} GFLOP/s (median of {mm['n']})",
            flush=True,
        )
        dataset = make_dataset(args, args.seed)
        rows: list[dict[str, Any]] = []
        parts: list[dict[str, Any]] = []

        def save():
            payload = {
                "benchmark": "update_step",
                "machine": info,
                "config": config,
                "matmul": mm,
                "results": rows,
                "breakdown": parts,
                "targets": targets(rows, mm, backend),
            }
            _common.write_json_atomic(out, payload)
            md = [
                "# update_step benchmark",
                "",
                "```",
                _common.format_machine_info(info),
                f"config  : {config}",
                "```",
                "",
                f"Matmul rate: {mm['gflops_per_s']:.1f} GFLOP/s ({args.matmul_size}^3 float32, "
                "median). Times: median ± half the inter-quartile range over repeats. "
                "GFLOP/step: matrix-product FLOPs with scan bodies counted per iteration (used "
                "for '% of matmul'); XLA GFLOP/step: `cost_analysis()`, which counts each scan "
                "body once. Steps/s count every seed. Loop: N sample+update steps in one jitted "
                "lax.scan.",
                "",
                table(rows) if rows else "(no results yet)",
                "",
                "Targets (benchmarked, not asserted):",
                "",
                *targets(rows, mm, backend),
                "",
            ]
            if parts:
                md += ["Parts of one qam update, each jitted on its own:", "", parts_table(parts)]
            _common.write_text_atomic(os.path.splitext(out)[0] + ".md", "\n".join(md))

        for variant in args.variants:
            for num_seeds in args.seeds:
                start = time.perf_counter()
                row = bench_variant(variant, num_seeds, args, dataset, probe)
                row["wall_s"] = time.perf_counter() - start
                rows.append(row)
                print(f"[{row['wall_s']:.0f}s] {table([row]).splitlines()[-1]}", flush=True)
                save()
        if args.breakdown:
            parts.extend(breakdown(args, dataset, probe))
        save()
    finally:
        ctx.__exit__(None, None, None)

    print()
    print(table(rows))
    print("\n".join(targets(rows, mm, backend)))
    if parts:
        print("\nParts of one qam update, each jitted on its own:\n")
        print(parts_table(parts))
    print(f"wrote {out} and {os.path.splitext(out)[0]}.md")
    return {
        "machine": info,
        "config": config,
        "matmul": mm,
        "results": rows,
        "breakdown": parts,
        "out": out,
    }


if __name__ == "__main__":
    main()
