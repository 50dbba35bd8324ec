"""Benchmark: one adjoint-matching gradient against one BPTT gradient through the same rollout.

What is measured, per configuration (flow steps K, batch B, network width W):

- **AM** (QAM's actor gradient, composed from the public pieces):
  `jax.vmap(qam.memoryless_sde_sample)` with the fine velocity held fixed, the terminal adjoint
  `A_K = -inv_temp * grad_a mean_e Q_e(s, clip(a, -1, 1))` of the whole batch,
  `jax.vmap(qam.lean_adjoint)`, then `eqx.filter_value_and_grad` of the batch mean of
  `jax.vmap(qam.adjoint_matching_loss)` with respect to the fine velocity.
- **AM fused** (the headline AM number; what the agent trains with, via
  `qam.agents.adjoint_matching_term`): `jax.grad` of `qam.fused_adjoint_matching_batch_loss`
  with the batch's terminal adjoints from one batched critic gradient,
  `A_K = -inv_temp * grad_a sum_b mean_e Q_e(s_b, clip(a_b, -1, 1))`. Same loss and gradient as
  AM (checked by the tests; also the batch mean of `qam.fused_adjoint_matching_loss`), but every
  network is evaluated once per point: the rollout's `v(t_i, X_i)` are the ones differentiated,
  where AM re-evaluates them in the loss.
- **BPTT** (BAM's gradient, docs/mathematics.md §2): BAM's public term
  `qam.agents.sde_bptt_term`, the loss
  `-inv_temp * mean_b[mean_e Q_e - rho std_e Q_e](X_K) + mean_b sum_{i<K-1} C_i`, with
  `C_i = 2 ||v(t_i, X_i) - v_B(t_i, X_i)||^2 / sigma_i^2`, differentiated through the rollout
  of `qam.memoryless_sde_sample` with the noise held fixed (the base velocity's parameters
  stop-gradiented). The running cost is evaluated after the rollout, so the fine velocity runs
  twice on the rollout states.
- **BPTT-fused** (`--bptt both`, the default): the same loss and gradient computed by a
  hand-written scan here that evaluates each network once per step, as BAM's reference code
  does; the strongest BPTT baseline (the library has no such term). Both BPTT variants give the
  same gradient (checked by the tests).

Every critic is evaluated batched (`CriticEnsemble.batched`, as the agents do).

Networks are the paper's: `qam.nn.VelocityNetwork(obs_dim, action_dim, (W,) * 4)` for the fine
velocity and for the base (EMA behaviour) velocity, and `qam.nn.CriticEnsemble` with `E` critics
of the same widths. Every gradient function is jitted with `eqx.filter_jit` (nothing donated)
and every call is blocked until ready.

Reported: compile time (trace + lower + XLA compile, timed ahead of time with
`.lower(...).compile()`), the median and inter-quartile range of the steady-state call time over
repeats, XLA's static peak-memory estimate (arguments + outputs + temporaries of the compiled
executable; on GPU also the allocator's measured process peak in the JSON), XLA's FLOP count,
and how many times each function was traced and how many XLA compilations happened during the
timed calls (should be 1 and 0: nothing recompiles between calls with the same shapes).
`--breakdown` also times the four parts of the AM gradient (rollout, critic gradient, lean
adjoint, loss gradient), each jitted on its own, the fused AM loss value alone and the BPTT
forward pass alone.

K = 1 is reported as "n/a": the memoryless scheme needs at least one noisy step before its final
deterministic step (`num_steps >= 2`).

Runs unchanged on CPU and GPU; `python benchmarks/adjoint_step.py --help` lists the options
(`tyro`, from the `Options` dataclass).
Results go to `benchmarks/results/adjoint_step_<device>.json` and `.md` (atomic writes).
"""

import dataclasses
import functools
import os
import sys
import time
from typing import Any, Literal


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402


TARGET = {"num_steps": 10, "batch": 256, "width": 512}
NA_K1 = "n/a (K>=2 required)"
DEFAULTS = {"steps": (1, 2, 5, 10, 20, 50), "batch": (256, 4096), "width": (256, 512)}
QUICK = {"steps": (1, 2), "batch": (8,), "width": (16,), "num_critics": 2}


@dataclasses.dataclass
class Options:
    """Time and peak memory of one QAM adjoint-matching gradient (rollout + lean adjoint + loss
    + gradient; composed and fused) against one BPTT gradient through the same rollout (BAM's
    loss), over flow steps K, batch size and network width. Prints the machine, device and
    versions, writes JSON and a markdown table."""

    steps: tuple[int, ...] | None = None  # flow steps K (K=1: n/a); None: 1 2 5 10 20 50
    batch: tuple[int, ...] | None = None  # batch sizes; None: 256 4096 (--quick: 8)
    width: tuple[int, ...] | None = None  # hidden width of every network; None: 256 512
    depth: int = 4  # hidden layers per network
    obs_dim: int = 37  # observation size
    action_dim: int = 25  # flat action (chunk) size D, e.g. 5 x 5
    num_critics: int | None = None  # critic ensemble size E; None: 10 (--quick: 2)
    inv_temp: float = 1.0  # inverse temperature lambda
    rho: float = 0.5  # BAM pessimism rho (std weight)
    bptt: Literal["qam", "fused", "both"] = "both"  # BPTT baseline: sde_bptt_term, fused, both
    repeats: int = 10  # maximum timed calls per function (median taken)
    min_repeats: int = 3  # minimum timed calls, even over the budget
    max_seconds_per_config: float = 20.0  # stop repeating a function after this (>= min)
    breakdown: bool = False  # also time the AM parts, fused AM and BPTT forwards, each alone
    breakdown_only_target: bool = False  # with --breakdown: only K=10, batch 256, width 512
    seed: int = 0  # PRNG seed for weights and inputs
    platform: Literal["cpu", "gpu", "cuda", "rocm", "tpu"] | None = None  # None: JAX's choice
    out: str | None = None  # output JSON, .md beside; None: results/adjoint_step_<device>.json
    quick: bool = False  # tiny sizes (K 1 2, batch 8, width 16, 2 critics, <= 2 repeats)


def parse_options(argv: list[str] | None = None) -> Options:
    """The command line (`tyro`), with `--quick` and the grid defaults applied (explicit
    `--steps/--batch/--width/--num-critics` win over `--quick`)."""
    opts = _common.parse_options(Options, argv, prog="adjoint_step.py")
    defaults: dict[str, Any] = {**DEFAULTS, "num_critics": 10}
    fill: dict[str, Any] = {}
    if opts.quick:
        defaults = dict(QUICK)
        fill.update(repeats=min(opts.repeats, 2), min_repeats=1)
    for name, value in defaults.items():
        if getattr(opts, name) is None:
            fill[name] = value
    return dataclasses.replace(opts, **fill)


# --------------------------------------------------------------------------------------------
# The gradient functions (built per configuration; `counter` counts Python traces).


def _freeze(tree):
    """`stop_gradient` on every inexact array leaf of an Equinox module."""
    import equinox as eqx
    import jax

    dynamic, static = eqx.partition(tree, eqx.is_inexact_array)
    return eqx.combine(jax.tree_util.tree_map(jax.lax.stop_gradient, dynamic), static)


def _rollout(velocity, base, obs, noise, num_steps):
    import jax

    import qam

    def one(o, n):
        return qam.memoryless_sde_sample(velocity, base, o, noise=n, num_steps=num_steps)

    return jax.vmap(one)(obs, noise)


def _terminal_adjoint(critic, obs, action, inv_temp):
    """`-inv_temp * d/da sum_b mean_e Q_e(s_b, clip(a_b, -1, 1))`: the batch's terminal
    adjoints from one batched critic gradient (the critic frozen)."""
    import jax
    import jax.numpy as jnp

    critic = _freeze(critic)

    def reward(a):
        q = critic.batched(obs, jnp.clip(a, -1.0, 1.0))  # (B, E)
        return jnp.sum(jnp.mean(q, axis=-1))

    return -inv_temp * jax.grad(reward)(action)


def _lean(base, obs, trajectory, terminal):
    import jax

    import qam

    return jax.vmap(qam.lean_adjoint, in_axes=(None, 0, 0, 0))(base, obs, trajectory, terminal)


def _am_loss_and_grad(velocity, base, obs, trajectory, adjoint):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import qam

    def loss(v):
        per_example = jax.vmap(qam.adjoint_matching_loss, in_axes=(None, None, 0, 0, 0))(
            v, base, obs, trajectory, adjoint
        )
        return jnp.mean(per_example)

    return eqx.filter_value_and_grad(loss)(velocity)


def make_am_grad(num_steps: int, inv_temp: float, counter: dict[str, int]):
    """The whole AM gradient: rollout + critic gradient + lean adjoint + loss gradient."""

    def am_grad(velocity, base, critic, obs, noise):
        counter["traces"] += 1
        trajectory = _rollout(_freeze(velocity), base, obs, noise, num_steps)
        terminal = _terminal_adjoint(critic, obs, trajectory.action, inv_temp)
        adjoint = _lean(base, obs, trajectory, terminal)
        return _am_loss_and_grad(velocity, base, obs, trajectory, adjoint)

    return am_grad


def make_am_fused_grad(num_steps: int, inv_temp: float, counter: dict[str, int]):
    """The same AM gradient through `qam.fused_adjoint_matching_batch_loss` (what the agent
    trains with): the batch's terminal adjoints from one batched gradient of the frozen
    critic."""
    import equinox as eqx

    def am_fused_grad(velocity, base, critic, obs, noise):
        counter["traces"] += 1
        return eqx.filter_value_and_grad(am_fused_loss)(
            velocity, base, critic, obs, noise, num_steps, inv_temp
        )

    return am_fused_grad


def am_fused_loss(velocity, base, critic, obs, noise, num_steps, inv_temp):
    """`qam.fused_adjoint_matching_batch_loss` on the fixed `noise`; differentiable in
    `velocity` (the critic is frozen, the base is stop-gradiented inside the fused loss)."""
    import qam

    loss, _ = qam.fused_adjoint_matching_batch_loss(
        velocity, base, obs, lambda a: _terminal_adjoint(critic, obs, a, inv_temp),
        noise=noise, num_steps=num_steps,
    )  # fmt: skip
    return loss


def _bam_reward(critic, obs, action, inv_temp, rho):
    import jax.numpy as jnp

    q = critic.batched(obs, action)  # (B, E); online critic, pessimistic, no clip
    return -inv_temp * jnp.mean(jnp.mean(q, axis=-1) - rho * jnp.std(q, axis=-1))


def bam_loss_term(velocity, base, critic, obs, noise, num_steps, inv_temp, rho):
    """BAM's loss as the agent computes it, `qam.agents.sde_bptt_term` (the rollout of
    `qam.memoryless_sde_sample`, differentiable in `velocity`, and the running cost evaluated
    on the returned states)."""
    from qam.agents import sde_bptt_term

    loss, _ = sde_bptt_term(
        velocity, base, critic, obs, num_steps=num_steps, inv_temp=inv_temp, rho=rho, noise=noise
    )
    return loss


def bam_loss_fused(velocity, base, critic, obs, noise, num_steps, inv_temp, rho):
    """The same loss with the running cost accumulated inside the rollout scan (each network is
    evaluated once per step, as in BAM's reference implementation; the library's
    `sde_bptt_term` evaluates the fine velocity twice per noisy step)."""
    import jax
    import jax.numpy as jnp

    import qam

    critic, base = _freeze(critic), _freeze(base)
    h = 1.0 / num_steps
    ts = qam.time_grid(num_steps, noise.dtype)

    def one(o, n):
        def step(carry, inputs):
            x, cost = carry
            t, xi = inputs
            v = velocity(t, x, o)
            sigma = qam.memoryless_sigma(t, h)
            cost = cost + 2.0 * jnp.sum((v - base(t, x, o)) ** 2) / sigma**2
            x = x + h * (2.0 * v - x / (t + h)) + jnp.sqrt(h) * sigma * xi
            return (x, cost), None

        init = (n[0], jnp.zeros((), n.dtype))
        (x, cost), _ = jax.lax.scan(step, init, (ts[: num_steps - 1], n[1:]))
        return x + h * base(ts[num_steps - 1], x, o), cost

    action, running = jax.vmap(one)(obs, noise)
    return _bam_reward(critic, obs, action, inv_temp, rho) + jnp.mean(running)


def make_bptt_grad(loss_fn, num_steps: int, inv_temp: float, rho: float, counter):
    import equinox as eqx

    def bptt_grad(velocity, base, critic, obs, noise):
        counter["traces"] += 1
        loss = functools.partial(loss_fn, num_steps=num_steps, inv_temp=inv_temp, rho=rho)
        return eqx.filter_value_and_grad(loss)(velocity, base, critic, obs, noise)

    return bptt_grad


# --------------------------------------------------------------------------------------------
# Measurement.


def measure(fn, args, *, repeats, min_repeats, max_seconds) -> dict[str, Any]:
    """Compile `eqx.filter_jit(fn)` ahead of time, then time steady-state calls of the jitted
    wrapper (the path a user takes), counting traces and XLA compilations."""
    import equinox as eqx

    counter = fn.counter
    jitted = eqx.filter_jit(fn)
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    stats = _common.compile_stats(compiled)

    # First call through the jit wrapper: may reuse the trace; XLA may compile once more here
    # (the ahead-of-time executable is not shared with the call cache).
    start_first = time.perf_counter()
    out = _common.block(jitted(*args))
    first_s = time.perf_counter() - start_first
    del out

    traces_before, compiles_before = counter["traces"], _common.CompileCounter.count()
    timing = _common.time_calls(
        lambda: jitted(*args), repeats=repeats, min_repeats=min_repeats, max_seconds=max_seconds
    )
    traces = counter["traces"]
    timed_traces = traces - traces_before
    timed_compiles = _common.CompileCounter.count() - compiles_before
    jaxpr, _, _ = eqx.filter_make_jaxpr(fn)(*args)  # traces once more, not counted below
    return {
        "trace_lower_s": lowered_at - start,
        "compile_s": compiled_at - start,
        "first_call_s": first_s,
        **timing,
        **stats,
        "xla_flops": stats.pop("flops"),  # counts each scan body once: an undercount
        "flops": _common.matmul_flops(jaxpr),
        "traces": traces,
        "traces_during_timed_calls": timed_traces,
        "compiles_during_timed_calls": timed_compiles,
        "device_peak_bytes_so_far": _common.device_peak_bytes(),
    }


def _counted(fn_factory, *a):
    counter = {"traces": 0}
    fn = fn_factory(*a, counter)
    fn.counter = counter
    return fn


def _part(fn):
    counter = {"traces": 0}

    def wrapped(*args):
        counter["traces"] += 1
        return fn(*args)

    wrapped.counter = counter
    return wrapped


def run_config(nets, args, num_steps, batch, width) -> dict[str, Any]:
    import jax

    velocity, base, critic = nets
    key = jax.random.PRNGKey(args.seed + 1000 * num_steps + batch + width)
    obs_key, noise_key = jax.random.split(key)
    obs = jax.random.normal(obs_key, (batch, args.obs_dim))
    noise = jax.random.normal(noise_key, (batch, num_steps, args.action_dim))
    inputs = (velocity, base, critic, obs, noise)
    opts = {
        "repeats": args.repeats,
        "min_repeats": args.min_repeats,
        "max_seconds": args.max_seconds_per_config,
    }
    result: dict[str, Any] = {"num_steps": num_steps, "batch": batch, "width": width}

    am = _counted(make_am_grad, num_steps, args.inv_temp)
    result["am"] = measure(am, inputs, **opts)
    am_fused = _counted(make_am_fused_grad, num_steps, args.inv_temp)
    result["am_fused"] = measure(am_fused, inputs, **opts)
    variants = {"qam": ("bptt", bam_loss_term), "fused": ("bptt_fused", bam_loss_fused)}
    chosen = ["qam", "fused"] if args.bptt == "both" else [args.bptt]
    for name in chosen:
        label, loss_fn = variants[name]
        fn = _counted(make_bptt_grad, loss_fn, num_steps, args.inv_temp, args.rho)
        result[label] = measure(fn, inputs, **opts)

    if args.breakdown:
        result["am_parts"] = breakdown(inputs, num_steps, args, opts)
    return result


def breakdown(inputs, num_steps, args, opts) -> dict[str, Any]:
    """Each part of the AM gradient jitted and timed on its own (plus BPTT's forward pass)."""
    import equinox as eqx
    import jax

    velocity, base, critic, obs, noise = inputs
    frozen = _freeze(velocity)
    rollout = _part(lambda v, b, o, n: _rollout(v, b, o, n, num_steps))
    trajectory = eqx.filter_jit(rollout)(frozen, base, obs, noise)
    critic_grad = _part(lambda c, o, a: _terminal_adjoint(c, o, a, args.inv_temp))
    terminal = eqx.filter_jit(critic_grad)(critic, obs, trajectory.action)
    lean = _part(_lean)
    adjoint = eqx.filter_jit(lean)(base, obs, trajectory, terminal)
    loss_grad = _part(_am_loss_and_grad)
    loss_fwd = _part(
        lambda v, b, o, tr, ad: jax.numpy.mean(
            jax.vmap(__import__("qam").adjoint_matching_loss, in_axes=(None, None, 0, 0, 0))(
                v, b, o, tr, ad
            )
        )
    )
    am_fused_fwd = _part(
        lambda v, b, c, o, n: am_fused_loss(v, b, c, o, n, num_steps, args.inv_temp)
    )
    bptt_fwd = _part(
        lambda v, b, c, o, n: bam_loss_fused(v, b, c, o, n, num_steps, args.inv_temp, args.rho)
    )
    parts = {
        "rollout": (rollout, (frozen, base, obs, noise)),
        "critic_grad": (critic_grad, (critic, obs, trajectory.action)),
        "lean_adjoint": (lean, (base, obs, trajectory, terminal)),
        "loss_grad": (loss_grad, (velocity, base, obs, trajectory, adjoint)),
        "loss_forward": (loss_fwd, (velocity, base, obs, trajectory, adjoint)),
        "am_fused_forward": (am_fused_fwd, inputs),
        "bptt_fused_forward": (bptt_fwd, inputs),
    }
    out = {}
    for name, (fn, fn_args) in parts.items():
        m = measure(fn, fn_args, **opts)
        out[name] = {
            k: m[k] for k in ("median_s", "iqr_s", "n", "compile_s", "flops", "peak_estimate_bytes")
        }
    return out


# --------------------------------------------------------------------------------------------
# Reporting.


def _ms(m):
    return f"{1e3 * m['median_s']:.1f} ± {1e3 * m['iqr_s'] / 2:.1f}"


def _mb(m):
    b = m.get("peak_estimate_bytes")
    return "?" if b is None else f"{b / 2**20:.1f}"


def _gflop(m):
    f = m.get("flops")
    return "?" if f is None else f"{f / 1e9:.3g}"


def table(results: list[dict[str, Any]]) -> str:
    headers = ["K", "batch", "width", "AM ms", "BPTT ms", "ratio"]
    fused = any("bptt_fused" in r for r in results)
    has_bptt = any("bptt" in r for r in results)
    am_fused = any("am_fused" in r for r in results)
    if fused:
        headers += ["BPTT-fused ms", "ratio fused"]
    headers += ["AM compile s", "BPTT compile s", "AM mem MB", "BPTT mem MB", "GFLOP AM/BPTT"]
    if am_fused:
        headers += ["AM fused ms", "fused/BPTT ratio", "AM fused MB", "AM fused GFLOP"]
    headers += ["traces AM/BPTT", "recompiles"]
    rows = []
    for r in results:
        k, b, w = r["num_steps"], r["batch"], r["width"]
        is_target = (k, b, w) == (TARGET["num_steps"], TARGET["batch"], TARGET["width"])
        bold = (lambda s: f"**{s}**") if is_target else (lambda s: s)
        if "am" not in r:
            rows.append([bold(k), b, w, r.get("note", NA_K1)] + [""] * (len(headers) - 4))
            continue
        am = r["am"]
        ref = r["bptt"] if has_bptt and "bptt" in r else r["bptt_fused"]
        row = [bold(k), b, w, _ms(am)]
        row += (
            [_ms(r["bptt"]), bold(f"{am['median_s'] / r['bptt']['median_s']:.2f}")]
            if ("bptt" in r)
            else ["", ""]
        )
        if fused:
            bf = r["bptt_fused"]
            row += [_ms(bf), bold(f"{am['median_s'] / bf['median_s']:.2f}")]
        row += [f"{am['compile_s']:.2f}", f"{ref['compile_s']:.2f}", _mb(am), _mb(ref)]
        row += [f"{_gflop(am)} / {_gflop(ref)}"]
        if am_fused:
            if "am_fused" in r:
                af = r["am_fused"]
                # Against the strongest BPTT baseline measured (the fused one when run).
                strongest = r.get("bptt_fused", r.get("bptt"))
                ratio = af["median_s"] / strongest["median_s"]
                row += [_ms(af), bold(f"{ratio:.2f}"), _mb(af), _gflop(af)]
            else:
                row += [""] * 4
        measured = [am] + [r[x] for x in ("am_fused", "bptt", "bptt_fused") if x in r]
        row += [
            "/".join(str(m["traces"]) for m in measured),
            str(
                sum(
                    m["compiles_during_timed_calls"] + m["traces_during_timed_calls"]
                    for m in measured
                )
            ),
        ]
        rows.append(row)
    return _common.markdown_table(headers, rows)


def parts_table(results: list[dict[str, Any]]) -> str:
    names = ["rollout", "critic_grad", "lean_adjoint", "loss_grad", "loss_forward"]
    headers = ["K", "batch", "width", "AM ms"] + [f"{n} ms" for n in names]
    headers += ["sum of parts ms", "AM fused fwd ms", "AM fused ms"]
    headers += ["BPTT-fused fwd ms", "BPTT-fused ms"]
    rows = []
    for r in results:
        if "am_parts" not in r:
            continue
        p = r["am_parts"]
        row = [r["num_steps"], r["batch"], r["width"], f"{1e3 * r['am']['median_s']:.1f}"]
        row += [f"{1e3 * p[n]['median_s']:.1f}" for n in names]
        total = sum(p[n]["median_s"] for n in names[:4])
        row += [f"{1e3 * total:.1f}"]
        row += [f"{1e3 * p['am_fused_forward']['median_s']:.1f}" if "am_fused_forward" in p else ""]
        row += [f"{1e3 * r['am_fused']['median_s']:.1f}" if "am_fused" in r else ""]
        row += [f"{1e3 * p['bptt_fused_forward']['median_s']:.1f}"]
        row += [f"{1e3 * r['bptt_fused']['median_s']:.1f}" if "bptt_fused" in r else ""]
        rows.append(row)
    return _common.markdown_table(headers, rows) if rows else ""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_options(argv)

    import jax

    if args.platform is not None:
        jax.config.update("jax_platforms", "cuda" if args.platform == "gpu" else args.platform)
    import qam

    _common.CompileCounter.install()
    info = _common.machine_info()
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"adjoint_step_{_common.device_tag()}.json",
    )
    config = {k: v for k, v in dataclasses.asdict(args).items() if k != "out"}
    print(_common.format_machine_info(info))
    print(f"config  : {config}", flush=True)

    results: list[dict[str, Any]] = []

    def save():
        payload = {
            "benchmark": "adjoint_step",
            "machine": info,
            "config": config,
            "results": results,
        }
        _common.write_json_atomic(out, payload)
        md = [
            "# adjoint_step benchmark",
            "",
            "```",
            _common.format_machine_info(info),
            f"config  : {config}",
            "```",
            "",
            "Times: median ± half the inter-quartile range over repeats. Memory: XLA's static "
            "peak estimate (arguments + outputs + temporaries). Ratio: AM (composed) / BPTT "
            "time; fused/BPTT ratio: AM fused / BPTT-fused time (the strongest baseline).",
            "",
            table(results),
        ]
        parts = parts_table(results)
        if parts:
            md += ["", "AM parts, each jitted on its own:", "", parts]
        _common.write_text_atomic(os.path.splitext(out)[0] + ".md", "\n".join(md))

    for width in args.width:
        keys = jax.random.split(jax.random.PRNGKey(args.seed), 3)
        hidden = (width,) * args.depth
        nets = (
            qam.nn.VelocityNetwork(args.obs_dim, args.action_dim, hidden, key=keys[0]),
            qam.nn.VelocityNetwork(args.obs_dim, args.action_dim, hidden, key=keys[1]),
            qam.nn.CriticEnsemble(
                args.obs_dim, args.action_dim, hidden, num_critics=args.num_critics, key=keys[2]
            ),
        )
        for batch in args.batch:
            for num_steps in args.steps:
                if num_steps < 2:
                    results.append(
                        {"num_steps": num_steps, "batch": batch, "width": width, "note": NA_K1}
                    )
                    continue
                is_target = (num_steps, batch, width) == tuple(TARGET.values())
                this = dataclasses.replace(
                    args, breakdown=args.breakdown and (is_target or not args.breakdown_only_target)
                )
                start = time.perf_counter()
                result = run_config(nets, this, num_steps, batch, width)
                result["wall_s"] = time.perf_counter() - start
                results.append(result)
                line = table([result]).splitlines()[-1]
                print(f"[{result['wall_s']:.0f}s] {line}", flush=True)
                save()
    save()
    print()
    print(table(results))
    parts = parts_table(results)
    if parts:
        print("AM parts, each jitted on its own:\n")
        print(parts)
    print(f"wrote {out} and {os.path.splitext(out)[0]}.md")
    return {"machine": info, "config": config, "results": results, "out": out}


if __name__ == "__main__":
    main()
