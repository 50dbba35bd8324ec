"""Benchmark: the whole update step of every registered agent, and the offline loop.

Only the agent interface is used (`qam.agents.AGENTS[name]`: `config`, `init`, `update`,
`act`), so every method registered there is benchmarked the same way, without naming it here.
Per agent (`--agent NAME [NAME ...]`, default: every registered one) at its paper
configuration, `AGENTS[name].config()` (the shared defaults: 4x512 networks, 10 critics, chunks
of H = 5; the method's own fields, e.g. K = 10 flow steps, at their defaults), batch 256, on a
synthetic 37-dim observation, 5-dim action task, and per seed count S (`--seeds 1 8`):

- **update**: `agent.update` on a fixed `qam.data.SequenceBatch` (one per seed), jitted with
  the agent state donated and fed back, so each call is one real gradient step. S = 1 is the
  bare function; S > 1 is `jax.vmap` of it over S agents made by `eqx.filter_vmap(agent.init)`
  of S keys (each seed its own batch and key). Reported in ms per call and steps/s (S seeds
  count S steps per call).
- **loop**: the offline loop: one jitted call of a `lax.scan` over N (`--loop-steps`) steps of
  `qam.data.sample_sequence` (from an on-device `qam.data.Dataset`) followed by `update`, the
  way `qam.train` runs offline training. Reported in steps/s and as a fraction of the bare
  update's rate (target: >= 0.9, i.e. sampling costs < 10%).

For every compiled function: the compile time (trace + lower + XLA compile, timed ahead of
time with `jax.jit(f).trace(...).lower().compile()`, reported separately from the run time),
the median and inter-quartile range of the call time over repeats (adaptive: `--repeats` calls
at most, at least `--min-repeats`, stopping once `--max-seconds` have been spent), and FLOPs
per update two ways:

- `xla_gflop`: XLA's `cost_analysis()` of the compiled update. XLA counts a loop body once
  whatever its trip count, so it undercounts every `lax.scan` (e.g. QAM's K-step ODE/SDE
  rollouts and lean adjoint).
- `gflop`: the matrix-product FLOPs of the jaxpr with each `scan` body counted `length` times
  (`_common.matmul_flops`; elementwise work, small next to the 512-wide products, is ignored).
  This is the count the efficiency uses.

Efficiency ("% of matmul"): `gflop * steps/s` divided by the machine's measured matrix-multiply
rate, timed as the median of a jitted float32 `n x n @ n x n` product (`--matmul-size`, default
2048; `2 n^3 / t`), interleaved with the timed calls because a shared machine drifts. Targets
(benchmarked, not asserted): >= 65% of the matmul rate on CPU; the offline loop within 10% of
the bare update; on a GPU, 8 vmapped seeds >= 4x the total steps/s of one seed.

`--breakdown` also times the parts of one update, each jitted on its own (their sum exceeds
the fused update a little), for every selected agent whose state exposes QAM's pieces (a
`critic`, `actor_slow` and `actor_fast` in `params`, Polyak targets of the critic and
`actor_slow`, and the config fields the terms need; the QAM family today): the next chunk of
the critic target (`agent.act`), and the gradients of the public terms the update sums,
`qam.agents.critic_term`, `flow_term` and `adjoint_matching_term` (its value alone too), plus
the one-step or edit policy's `one_step_distillation_term` / `edit_policy_term` with the
flow actions they are trained on, and the optimiser (`qam.agents.gradient_step`: clip + Adam +
Polyak); each with its FLOPs and matmul-rate fraction. The stages inside the adjoint-matching
term (rollout, terminal critic gradient, lean adjoint) are broken down by
`benchmarks/adjoint_step.py --breakdown`.

Defaults: on CPU one seed (ask for 8 with `--seeds 1 8`), on GPU `--seeds 1 8`. `--quick` runs
tiny networks (for the tests). Results go to `benchmarks/results/update_step_<device>.json` and
`.md` (atomic writes); the `.md` ends with the summary table of `benchmarks/README.md`.
`python benchmarks/update_step.py --help` lists the options.
"""

import ast
import dataclasses
import os
import sys
import time
import warnings
from typing import Any, Literal


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


# The synthetic task and batch (not agent config fields): paper-sized and `--quick` sizes.
PAPER_TASK = {"batch": 256, "obs_dim": 37, "action_dim": 5}
QUICK = {
    "batch": 8,
    "obs_dim": 4,
    "action_dim": 2,
    "width": 16,
    "depth": 2,
    "num_critics": 2,
    "flow_steps": 2,
    "horizon": 2,
}
TARGET_FRACTION = 0.65
TARGET_LOOP_RATIO = 0.9
TARGET_VMAP_SPEEDUP = 4.0


@dataclasses.dataclass
class Options:
    """Time the whole update step of every registered agent (qam.agents.AGENTS) at its paper
    configuration, for one seed and S vmapped seeds, and the offline sample+update loop; report
    ms and GFLOP per update and the fraction of the measured matmul rate."""

    agent: tuple[str, ...] = ()  # registered agents to run (qam.agents.AGENTS); empty: all
    seeds: tuple[int, ...] | None = None  # seed counts S (S > 1: vmapped); None: 1 on CPU, 1 8 else
    batch: int | None = None  # batch size B; None: 256 (--quick: 8)
    width: int | None = None  # width of every *_hidden network of the config; None: agent's
    depth: int | None = None  # hidden layers of those networks; None: the agent's
    num_critics: int | None = None  # critic ensemble size (config num_qs); None: the agent's
    flow_steps: int | None = None  # flow steps K, where the config has flow_steps; None: agent's
    horizon: int | None = None  # action chunk length H; None: the agent's
    override: tuple[str, ...] = ()  # more config FIELD=VALUE (Python literal), where FIELD exists
    obs_dim: int | None = None  # observation size of the synthetic task; None: 37 (--quick: 4)
    action_dim: int | None = None  # action size of the synthetic task; None: 5 (--quick: 2)
    loop_steps: int | None = None  # N steps per offline-loop scan, 0 skips; None: 10 (CPU), 50
    dataset_size: int = 100_000  # rows of the synthetic dataset
    episode_length: int = 1000  # episode length of the synthetic dataset
    repeats: int = 5  # timed rounds per measurement (max)
    min_repeats: int = 2  # timed rounds per measurement (min)
    max_seconds: float = 45.0  # stop a measurement once its timed calls took this long
    matmul_size: int = 2048  # n of the n x n float32 matmul-rate probe
    probe_calls: int = 2  # matmul-probe calls before each round of timed calls
    breakdown: bool = False  # also time the parts of one update (agents with QAM's terms)
    donate: bool = True  # donate the agent state to the jitted update
    seed: int = 0  # PRNG seed for weights and data
    platform: Literal["cpu", "gpu", "tpu"] | None = None  # JAX platform; None: JAX's choice
    out: str | None = None  # JSON path, .md beside; None: results/update_step_<device>.json
    fast_compile: bool = False  # XLA backend optimisation level 0 (smoke tests; --quick implies)
    quick: bool = False  # tiny sizes, <= 2 repeats, fast compile: a harness test, not a benchmark


def parse_options(argv: list[str] | None = None) -> Options:
    """The command line (`tyro`) with the backend-dependent defaults left as `None`."""
    return _common.parse_options(Options, argv, prog="update_step.py")


def resolve(opts: Options, backend: str) -> Options:
    """`opts` with every default filled in (`--quick` sizes, backend-dependent defaults)."""
    fill: dict[str, Any] = {}
    sizes = QUICK if opts.quick else PAPER_TASK
    for name, value in sizes.items():
        if getattr(opts, name) is None:
            fill[name] = value
    if opts.quick:
        fill.update(
            repeats=min(opts.repeats, 2),
            min_repeats=1,
            dataset_size=min(opts.dataset_size, 1000),
            episode_length=min(opts.episode_length, 50),
            matmul_size=min(opts.matmul_size, 256),
            fast_compile=True,
        )
    if opts.seeds is None:
        fill["seeds"] = (1,) if backend == "cpu" else (1, 8)
    if opts.loop_steps is None:
        fill["loop_steps"] = 3 if opts.quick else (10 if backend == "cpu" else 50)
    return dataclasses.replace(opts, **fill)


# --------------------------------------------------------------------------------------------
# Inputs


def registered_agents() -> dict[str, Any]:
    from qam.agents import AGENTS

    return dict(AGENTS)


def config_overrides(agent, opts: Options) -> dict[str, Any]:
    """The config fields the options set, only where `agent.config_class` has them: `--width`
    / `--depth` on every `*_hidden` tuple field, `--num-critics` on `num_qs`, `--flow-steps`,
    `--horizon`, then `--override FIELD=VALUE`."""
    defaults = agent.config()
    fields = {f.name for f in dataclasses.fields(defaults)}
    out: dict[str, Any] = {}
    for name in fields:
        hidden = getattr(defaults, name)
        if name.endswith("_hidden") and isinstance(hidden, tuple) and hidden:
            width = opts.width if opts.width is not None else hidden[0]
            depth = opts.depth if opts.depth is not None else len(hidden)
            if (opts.width, opts.depth) != (None, None):
                out[name] = (width,) * depth
    for option, field in (("num_critics", "num_qs"), ("flow_steps", "flow_steps")):
        if getattr(opts, option) is not None and field in fields:
            out[field] = getattr(opts, option)
    if opts.horizon is not None and "horizon" in fields:
        out["horizon"] = opts.horizon
    for item in opts.override:
        field, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--override {item!r}: expected FIELD=VALUE.")
        if field in fields:
            try:
                out[field] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                out[field] = text  # a bare string, e.g. a variant name
    return out


def make_config(agent, opts: Options):
    return agent.config(**config_overrides(agent, opts))


def make_dataset(opts: Options, seed: int):
    """A synthetic on-device dataset: Gaussian observations, actions in [-1, 1], episodes of
    `--episode-length` steps."""
    import numpy as np

    import qam.data as qd

    rng = np.random.default_rng(seed)
    n, obs_dim, action_dim = opts.dataset_size, opts.obs_dim, opts.action_dim
    terminals = np.zeros(n, np.float32)
    terminals[opts.episode_length - 1 :: opts.episode_length] = 1.0
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
    """One `qam.data.SequenceBatch` per seed (stacked on a leading axis when `num_seeds > 1`)."""
    import jax

    import qam.data as qd

    def one(k):
        return qd.sample_sequence(
            dataset, k, batch, horizon=config.horizon, discount=config.discount
        )

    if num_seeds == 1:
        return one(key)
    return jax.vmap(one)(jax.random.split(key, num_seeds))


def init_states(agent, config, opts: Options, num_seeds: int, seed: int):
    """Agent state(s), split into (arrays, static): S = 1 plain, S > 1 `eqx.filter_vmap`.
    Every array leaf is a distinct buffer."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    obs = jnp.zeros((opts.obs_dim,), jnp.float32)
    action = jnp.zeros((opts.action_dim,), jnp.float32)
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


def make_update_fn(agent, static, num_seeds: int):
    import equinox as eqx
    import jax

    def single(dynamic, batch, key):
        new, metrics = agent.update(eqx.combine(dynamic, static), batch, key=key)
        return eqx.filter(new, eqx.is_array), metrics

    if num_seeds == 1:
        return single
    return jax.vmap(single)


def make_loop_fn(agent, static, num_seeds: int, dataset_static, config, batch, num_steps):
    import equinox as eqx
    import jax

    import qam.data as qd

    update = make_update_fn(agent, static, 1)

    def one_seed(dynamic, dataset_dynamic, key):
        dataset = eqx.combine(dataset_dynamic, dataset_static)

        def body(dynamic, k):
            sample_key, update_key = jax.random.split(k)
            b = qd.sample_sequence(
                dataset, sample_key, batch, horizon=config.horizon, discount=config.discount
            )
            return update(dynamic, b, update_key)

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
    traced = jitted.trace(*example_args)
    lowered = traced.lower()
    compiled = lowered.compile(dict(COMPILER_OPTIONS)) if COMPILER_OPTIONS else lowered.compile()
    compile_s = time.perf_counter() - start
    stats = _common.compile_stats(compiled)
    try:
        matmul = _common.matmul_flops(traced.jaxpr)
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


def interleaved(calls: dict[str, Any], probe: MatmulProbe, opts) -> dict[str, dict[str, Any]]:
    """Time every call of `calls` (one untimed warm-up each), round-robin with `--probe-calls`
    matmul-probe calls per round, for `--repeats` rounds at most (at least `--min-repeats`,
    stopping once `--max-seconds` have been spent). On a shared machine the load drifts;
    interleaving compares each call with the matmul rate (and with each other) under the same
    load. Returns a timing summary per name, and `"matmul"` with its `gflops_per_s`."""
    for fn in calls.values():
        _common.block(fn())
    times: dict[str, list[float]] = {name: [] for name in [*calls, "matmul"]}
    spent = 0.0
    for i in range(max(opts.repeats, 1)):
        for _ in range(max(opts.probe_calls, 1)):
            start = time.perf_counter()
            _common.block(probe())
            times["matmul"].append(time.perf_counter() - start)
        for name, fn in calls.items():
            start = time.perf_counter()
            _common.block(fn())
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            spent += elapsed
        if i + 1 >= opts.min_repeats and spent >= opts.max_seconds:
            break
    out = {name: _common.summarize(t) for name, t in times.items()}
    out["matmul"]["gflops_per_s"] = probe.flops / out["matmul"]["median_s"] / 1e9
    return out


def matmul_rate(probe: MatmulProbe, opts: Options) -> dict[str, Any]:
    """A standalone measurement of the probe's rate (median of at least 10 calls)."""
    timing = _common.time_calls(
        probe, repeats=max(opts.repeats, 10), min_repeats=3, max_seconds=10.0
    )
    return {
        **timing,
        "size": probe.n,
        "flops": probe.flops,
        "gflops_per_s": probe.flops / timing["median_s"] / 1e9,
    }


def _rate(gflop, steps_per_s, peak_gflops) -> float | None:
    if gflop is None or peak_gflops is None:
        return None
    return gflop * steps_per_s / peak_gflops


def _gflop(flops, per=1):
    return flops / per / 1e9 if flops is not None else None


def bench_agent(name: str, num_seeds: int, opts: Options, dataset, probe) -> dict[str, Any]:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    agent = registered_agents()[name]
    config = make_config(agent, opts)
    key = jax.random.PRNGKey(opts.seed + 1)
    dynamic, static = init_states(agent, config, opts, num_seeds, opts.seed)
    batches = sample_batches(dataset, key, num_seeds, config, opts.batch)
    step_keys = (
        (lambda i: jax.random.fold_in(key, i))
        if num_seeds == 1
        else (lambda i: jax.random.split(jax.random.fold_in(key, i), num_seeds))
    )
    row: dict[str, Any] = {
        "agent": name,
        "seeds": num_seeds,
        "config": dataclasses.asdict(config),
        "overrides": config_overrides(agent, opts),
    }

    # Bare update on a fixed batch.
    update = make_update_fn(agent, static, num_seeds)
    compiled_u, cost_u = compile_fn(update, (dynamic, batches, step_keys(0)), opts.donate)
    calls = {"update": Stateful(compiled_u, dynamic, lambda i: (batches, step_keys(i)))}

    # Offline loop: N x (sample + update) in one jitted scan, on its own copy of the state.
    if opts.loop_steps > 0:
        ds_dynamic, ds_static = eqx.partition(dataset, eqx.is_array)
        loop = make_loop_fn(
            agent, static, num_seeds, ds_static, config, opts.batch, opts.loop_steps
        )
        loop_state = jax.tree_util.tree_map(jnp.copy, dynamic)
        compiled_l, cost_l = compile_fn(loop, (loop_state, ds_dynamic, step_keys(0)), opts.donate)
        calls["loop"] = Stateful(compiled_l, loop_state, lambda i: (ds_dynamic, step_keys(i)))

    timings = interleaved(calls, probe, opts)
    peak = timings["matmul"]["gflops_per_s"]
    row["matmul_gflops_per_s"] = peak
    timing = timings["update"]
    steps_per_s = num_seeds / timing["median_s"]
    gflop = _gflop(cost_u["matmul_flops"], num_seeds)
    xla_gflop = _gflop(cost_u["xla_flops"], num_seeds)
    row["update"] = {
        "compile_s": cost_u["compile_s"],
        **timing,
        "ms_per_update": 1e3 * timing["median_s"] / num_seeds,
        "steps_per_s": steps_per_s,
        "gflop": gflop,
        "xla_gflop": xla_gflop,
        "peak_estimate_bytes": cost_u["peak_estimate_bytes"],
        "fraction_of_matmul": _rate(gflop, steps_per_s, peak),
        "fraction_of_matmul_xla_count": _rate(xla_gflop, steps_per_s, peak),
    }
    if opts.loop_steps > 0:
        timing = timings["loop"]
        loop_rate = num_seeds * opts.loop_steps / timing["median_s"]
        row["loop"] = {
            "steps": opts.loop_steps,
            "compile_s": cost_l["compile_s"],
            **timing,
            "steps_per_s": loop_rate,
            "ratio_to_update": loop_rate / steps_per_s,
            "fraction_of_matmul": _rate(gflop, loop_rate, peak),
        }
    jax.block_until_ready([c.state for c in calls.values()])
    return row


# --------------------------------------------------------------------------------------------
# Per-term breakdown of one update (single seed), for agents built from QAM's public terms


QAM_PARAMS = ("critic", "actor_slow", "actor_fast")
QAM_TARGETS = ("critic", "actor_slow")
QAM_CONFIG = (
    "flow_steps", "inv_temp", "residual", "clip_adj", "target_actor", "use_target_grad",
    "discount", "rho", "action_chunking",
)  # fmt: skip


def has_qam_terms(state) -> bool:
    """Whether `state` has the pieces QAM's update assembles its terms from (see the module
    docstring); the breakdown runs for such agents only."""
    return (
        all(getattr(state.params, n, None) is not None for n in QAM_PARAMS)
        and all(n in state.targets for n in QAM_TARGETS)
        and all(hasattr(state.config, n) for n in QAM_CONFIG)
    )


def breakdown_parts(agent, state, batch, key) -> list[tuple[str, bool, Any, tuple]]:
    """`(part, counted in the sum, fn, args)` for every part of one QAM-family update, each a
    call of the agent's interface or of a public term in `qam.agents`. `counted in the sum`:
    the parts whose FLOPs add up to the whole update's, `agent.update` (the others are sub-parts
    or the optimiser)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import qam
    from qam.agents import (
        adjoint_matching_term,
        critic_term,
        edit_policy_term,
        flow_term,
        gradient_step,
        one_step_distillation_term,
        target_entropy,
    )

    config, dim = state.config, state.action_dim
    params, targets = state.params, state.targets
    obs = batch.observations
    b = obs.shape[0]
    keys = jax.random.split(key, 4)
    parts: list[tuple[str, bool, Any, tuple]] = []

    def add(name: str, in_sum: bool, fn, *args):
        parts.append((name, in_sum, fn, args))

    def next_chunk(state, batch, k):
        next_obs = batch.next_observations[:, -1]
        return jax.vmap(lambda o, kk: agent.act(state, o, key=kk))(next_obs, jax.random.split(k, b))

    next_actions = eqx.filter_jit(next_chunk)(state, batch, keys[0])
    add("critic target: next chunk (agent.act)", True, next_chunk, state, batch, keys[0])

    def critic_grad(critic, target, batch, next_actions):
        def loss(c):
            return critic_term(
                c, target, batch, next_actions, discount=config.discount, rho=config.rho,
                chunked=config.action_chunking,
            )[0]  # fmt: skip

        return eqx.filter_grad(loss)(critic)

    critic_args = (params.critic, targets["critic"], batch, next_actions)
    add("critic_term gradient", True, critic_grad, *critic_args)

    def flow_grad(velocity, batch, k):
        loss = lambda v: flow_term(v, batch, key=k, chunked=config.action_chunking)[0]
        return eqx.filter_grad(loss)(velocity)

    add("flow_term gradient", True, flow_grad, params.actor_slow, batch, keys[1])

    base = targets["actor_slow"] if config.target_actor else params.actor_slow
    reward_critic = targets["critic"] if config.use_target_grad else params.critic

    def am_loss(fast, base, critic, obs, k):
        return adjoint_matching_term(
            fast, base, critic, obs, key=k, inv_temp=config.inv_temp, action_dim=dim,
            num_steps=config.flow_steps, residual=config.residual, clip_action=config.clip_adj,
        )[0]  # fmt: skip

    am_args = (params.actor_fast, base, reward_critic, obs, keys[2])
    add("adjoint_matching_term value", False, am_loss, *am_args)
    add("adjoint_matching_term gradient", True, eqx.filter_grad(am_loss), *am_args)

    one_step = getattr(params, "one_step", None)
    edit = getattr(params, "edit", None)
    if one_step is not None or edit is not None:
        noise = jax.random.normal(keys[3], (b, dim), obs.dtype)

        def flow_actions_fn(slow, fast, obs, noise):
            # What the policy is trained on: the deployed flow's Euler ODE (the behaviour flow
            # when inv_temp = 0, else the fine-tuned one, plus the behaviour flow if residual).
            if config.inv_temp == 0:
                velocity = slow
            elif config.residual:
                velocity = lambda t, x, o: fast(t, x, o) + slow(t, x, o)  # noqa: E731
            else:
                velocity = fast
            ode = lambda o, z: qam.ode_sample(velocity, o, noise=z, num_steps=config.flow_steps)
            return jax.vmap(ode)(obs, noise)

        flow_args = (params.actor_slow, params.actor_fast, obs, noise)
        flow_actions = eqx.filter_jit(flow_actions_fn)(*flow_args)
        add("policy: flow actions (K-step ODE)", True, flow_actions_fn, *flow_args)
        if one_step is not None:

            def distill_grad(policy, critic, obs, noise, flow_actions):
                loss = lambda p: one_step_distillation_term(
                    p, critic, obs, noise, flow_actions, alpha=config.fql_alpha
                )[0]
                return eqx.filter_grad(loss)(policy)

            distill_args = (one_step, params.critic, obs, noise, flow_actions)
            add("one_step_distillation_term gradient", True, distill_grad, *distill_args)
        if edit is not None:
            entropy = target_entropy(
                dim, value=config.edit_target_entropy,
                multiplier=config.edit_target_entropy_multiplier,
            )  # fmt: skip

            def edit_grad(policy_and_alpha, critic, obs, flow_actions, k):
                def loss(pa):
                    return edit_policy_term(
                        pa[0], pa[1], critic, obs, flow_actions, key=k,
                        edit_scale=config.edit_scale, entropy_target=entropy,
                    )[0]  # fmt: skip

                return eqx.filter_grad(loss)(policy_and_alpha)

            edit_args = ((edit, params.log_alpha), params.critic, obs, flow_actions, keys[3])
            add("edit_policy_term gradient", True, edit_grad, *edit_args)

    def optimiser(state):
        def constant_gradient(p):  # d/dp sum(p) = 1: the step's cost without a real loss
            leaves = jax.tree.leaves(eqx.filter(p, eqx.is_inexact_array))
            return sum(jnp.sum(x) for x in leaves), {}

        return eqx.filter(gradient_step(state, constant_gradient), eqx.is_array)

    add("optimiser: gradient_step (clip + Adam + Polyak)", False, optimiser, state)
    return parts


def breakdown(
    name: str, opts: Options, dataset, probe, whole_gflop: float | None = None
) -> list[dict[str, Any]]:
    """Time every part of `breakdown_parts` for agent `name` (none if it lacks QAM's terms);
    say so if the parts' FLOPs do not add up to `whole_gflop` (the update's, when measured)."""
    import equinox as eqx
    import jax

    agent = registered_agents()[name]
    config = make_config(agent, opts)
    key = jax.random.PRNGKey(opts.seed + 2)
    dynamic, static = init_states(agent, config, opts, 1, opts.seed)
    state = eqx.combine(dynamic, static)
    if not has_qam_terms(state):
        print(f"  breakdown: {name} has no QAM terms (critic, actor_slow, actor_fast): skipped")
        return []
    batch = sample_batches(dataset, key, 1, config, opts.batch)
    rows = []
    for part, in_sum, fn, args in breakdown_parts(agent, state, batch, key):
        dyn, stat = eqx.partition(args, eqx.is_array)

        def f(dyn, fn=fn, stat=stat):
            return fn(*eqx.combine(dyn, stat))

        compiled, cost = compile_fn(f, (dyn,), donate=False)
        timings = interleaved({"part": lambda c=compiled, d=dyn: c(d)}, probe, opts)
        timing, peak = timings["part"], timings["matmul"]["gflops_per_s"]
        gflop = _gflop(cost["matmul_flops"])
        rows.append(
            {
                "agent": name,
                "part": part,
                "in_sum": in_sum,
                "compile_s": cost["compile_s"],
                **timing,
                "gflop": gflop,
                "xla_gflop": _gflop(cost["xla_flops"]),
                "matmul_gflops_per_s": peak,
                "fraction_of_matmul": _rate(gflop, 1.0 / timing["median_s"], peak),
            }
        )
        print(f"  breakdown: {parts_table(rows[-1:]).splitlines()[-1]}", flush=True)
        del compiled
    total = sum(r["gflop"] or 0.0 for r in rows if r["in_sum"])
    if whole_gflop and abs(total - whole_gflop) > 1e-3 * whole_gflop:
        print(
            f"  breakdown: {name}'s parts add up to {total:.4g} GFLOP, its update to "
            f"{whole_gflop:.4g}: its update is not (only) these terms"
        )
    return rows


# --------------------------------------------------------------------------------------------
# Reporting


def _f(x, fmt="{:.3g}"):
    return "–" if x is None else fmt.format(x)


def _pct(x):
    return "–" if x is None else f"{100 * x:.0f}%"


def table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "agent",
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
    one_seed = {r["agent"]: r["update"]["steps_per_s"] for r in rows if r["seeds"] == 1}
    for r in rows:
        u, lp = r["update"], r.get("loop")
        speedup = (
            u["steps_per_s"] / one_seed[r["agent"]]
            if r["seeds"] > 1 and r["agent"] in one_seed
            else None
        )
        half_iqr = 1e3 * u["iqr_s"] / 2
        out.append(
            [
                r["agent"],
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


def summary_table(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The table of `benchmarks/README.md`: one row per agent and seed count."""
    headers = [
        "agent", "seeds", "ms/update", "GFLOP/update", "XLA GFLOP/update", "% of matmul rate",
        "matmul GFLOP/s", "machine",
    ]  # fmt: skip
    machine = f"{info['cpu']}, {info['cpus_usable']} CPUs ({info['backend']})"
    if info["backend"] != "cpu":
        machine = f"{', '.join(info['devices'])} ({info['backend']})"
    out = [
        [
            r["agent"],
            r["seeds"],
            f"{r['update']['ms_per_update']:.4g}",
            _f(r["update"]["gflop"]),
            _f(r["update"]["xla_gflop"]),
            _pct(r["update"]["fraction_of_matmul"]),
            _f(r.get("matmul_gflops_per_s"), "{:.0f}"),
            machine,
        ]
        for r in rows
    ]
    return _common.markdown_table(headers, out)


def parts_table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "agent", "part", "ms", "GFLOP", "XLA GFLOP", "% of matmul", "matmul GFLOP/s", "compile s",
    ]  # fmt: skip
    out = [
        [
            r["agent"],
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
        tag = f"{r['agent']} x{r['seeds']}"
        if u["gflop"] is not None and r["seeds"] == 1:
            lines.append(f"- {tag}: {u['gflop']:.3g} GFLOP per update")
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
    one_seed = {r["agent"]: r["update"]["steps_per_s"] for r in rows if r["seeds"] == 1}
    for r in rows:
        if r["seeds"] == 8 and r["agent"] in one_seed:
            speedup = r["update"]["steps_per_s"] / one_seed[r["agent"]]
            verdict = "met" if speedup >= TARGET_VMAP_SPEEDUP else "NOT met"
            if backend == "cpu":
                verdict += " (the target is for GPUs)"
            lines.append(
                f"- {r['agent']}: 8 vmapped seeds at {speedup:.2f}x the steps/s of one "
                f"(target >= {TARGET_VMAP_SPEEDUP:.0f}x on GPU): {verdict}"
            )
    return lines


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse_options(argv)

    import jax

    if opts.platform is not None:
        jax.config.update("jax_platforms", "cuda" if opts.platform == "gpu" else opts.platform)
    registered = registered_agents()
    unknown = [name for name in opts.agent if name not in registered]
    if unknown:
        raise SystemExit(
            f"--agent: {', '.join(unknown)} not registered; qam.agents.AGENTS has "
            f"{', '.join(registered)}."
        )
    names = list(opts.agent) or list(registered)
    backend = jax.default_backend()
    opts = resolve(opts, backend)
    COMPILER_OPTIONS.clear()
    if opts.fast_compile:
        COMPILER_OPTIONS["xla_backend_optimization_level"] = 0

    info = _common.machine_info()
    out = opts.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"update_step_{_common.device_tag()}.json",
    )
    config = {k: v for k, v in dataclasses.asdict(opts).items() if k != "out"}
    config["agent"] = names
    print(_common.format_machine_info(info))
    print(f"config  : {config}", flush=True)

    ctx = _quiet_donation()
    try:
        probe = MatmulProbe(opts.matmul_size)
        mm = matmul_rate(probe, opts)
        print(
            f"matmul  : {opts.matmul_size}^3 float32 in {1e3 * mm['median_s']:.2f} ms "
            f"-> {mm['gflops_per_s']:.1f} GFLOP/s (median of {mm['n']})",
            flush=True,
        )
        dataset = make_dataset(opts, opts.seed)
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
                f"Matmul rate: {mm['gflops_per_s']:.1f} GFLOP/s ({opts.matmul_size}^3 float32, "
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
                md += ["Parts of one update, each jitted on its own:", "", parts_table(parts), ""]
            if rows:
                md += [
                    "Summary (the table of benchmarks/README.md):",
                    "",
                    summary_table(rows, info),
                ]
            _common.write_text_atomic(os.path.splitext(out)[0] + ".md", "\n".join(md))

        for name in names:
            for num_seeds in opts.seeds:
                start = time.perf_counter()
                row = bench_agent(name, num_seeds, opts, dataset, probe)
                row["wall_s"] = time.perf_counter() - start
                rows.append(row)
                print(f"[{row['wall_s']:.0f}s] {table([row]).splitlines()[-1]}", flush=True)
                save()
        if opts.breakdown:
            for name in names:
                one = [r["update"]["gflop"] for r in rows if r["agent"] == name and r["seeds"] == 1]
                parts.extend(breakdown(name, opts, dataset, probe, one[0] if one else None))
        save()
    finally:
        ctx.__exit__(None, None, None)

    print()
    print(table(rows))
    print("\n".join(targets(rows, mm, backend)))
    if parts:
        print("\nParts of one update, each jitted on its own:\n")
        print(parts_table(parts))
    print("\nSummary (the table of benchmarks/README.md):\n")
    print(summary_table(rows, info))
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
