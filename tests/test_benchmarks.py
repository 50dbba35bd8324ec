"""The benchmark harness (`benchmarks/adjoint_step.py`) runs and reports sensibly.

Only the harness is checked (tiny sizes, no timings asserted): the script's `--help` (every
option documented), a `--quick` run with its JSON and markdown output, that the benchmark's
fused BPTT baseline computes the same loss and gradient as BAM's public term
(`qam.agents.sde_bptt_term`) and `qam.basic_adjoint`'s definition, and that the fused AM
gradient (`qam.fused_adjoint_matching_batch_loss`) equals the composed one.
"""

import ast
import dataclasses
import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import load_script

import qam


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "adjoint_step.py")


def _run(*args, timeout=120):
    env = dict(os.environ)
    # Tiny graphs: skip LLVM's optimisations to keep XLA compile time (most of the run) short.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        check=False,
    )


def _load_module():
    # Registered in sys.modules: tyro reads the options' doc comments through `inspect`.
    return sys.modules.setdefault("adjoint_step_bench", load_script(SCRIPT, "adjoint_step_bench"))


def test_help_documents_options():
    proc = _run("--help")  # the script as run from the command line
    assert proc.returncode == 0, proc.stderr
    with open(SCRIPT) as f:
        source = f.read()
    lines = source.splitlines()
    (options,) = [n for n in ast.walk(ast.parse(source)) if getattr(n, "name", "") == "Options"]
    documented = {
        node.target.id: lines[node.lineno - 1].partition("  # ")[2].strip()
        for node in options.body
        if isinstance(node, ast.AnnAssign)
    }
    for field in dataclasses.fields(_load_module().Options):
        assert "--" + field.name.replace("_", "-") in proc.stdout, field.name
        assert documented[field.name], f"{field.name} has no doc comment"  # its help line
    assert "(default: 10)" in proc.stdout  # --repeats, with its default


def test_quick_run_writes_results(tmp_path, capsys):
    bench = _load_module()
    out = tmp_path / "adjoint_step_test.json"
    bench.main(["--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    for word in ("machine", "device", "jax", "equinox", "qam", "| K |"):
        assert word in printed

    data = json.loads(out.read_text())
    assert data["machine"]["versions"]["qam"] == qam.__version__
    rows = {r["num_steps"]: r for r in data["results"]}
    assert set(rows) == {1, 2}
    assert "n/a" in rows[1]["note"]  # K = 1 is reported, not run
    row = rows[2]
    for method in ("am", "am_fused", "bptt", "bptt_fused"):
        m = row[method]
        assert m["n"] >= 1 and m["median_s"] > 0 and m["compile_s"] > 0
        assert m["traces"] == 1  # traced once, reused by every call
        assert m["traces_during_timed_calls"] == 0
        assert m["compiles_during_timed_calls"] == 0
        assert m["peak_estimate_bytes"] is None or m["peak_estimate_bytes"] > 0
        assert m["flops"] > 0

    md = out.with_suffix(".md").read_text()
    assert "| K | batch | width | AM ms | BPTT ms | ratio |" in md
    for column in ("AM fused ms", "fused/BPTT ratio", "AM fused MB", "AM fused GFLOP"):
        assert f"| {column} |" in md
    assert "| 1/1/1/1 | 0 |" in md  # AM, AM fused and both BPTT variants traced once each
    assert "n/a (K>=2 required)" in md
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic writes


# Float64 comparisons of two evaluation orders of the same losses: rounding ~1e-15 relative.
F64_RTOL, F64_ATOL = 1e-10, 1e-12


@pytest.mark.parametrize("num_steps", [3])
def test_bptt_variants_agree(getkey, x64, num_steps):
    bench = _load_module()
    obs_dim, action_dim, batch, hidden = 3, 2, 4, (8, 8)
    velocity = qam.nn.VelocityNetwork(obs_dim, action_dim, hidden, key=getkey())
    base = qam.nn.VelocityNetwork(obs_dim, action_dim, hidden, key=getkey())
    critic = qam.nn.CriticEnsemble(obs_dim, action_dim, hidden, num_critics=3, key=getkey())
    obs = jax.random.normal(getkey(), (batch, obs_dim))
    noise = jax.random.normal(getkey(), (batch, num_steps, action_dim))
    args = (velocity, base, critic, obs, noise)
    kwargs = {"num_steps": num_steps, "inv_temp": 2.0, "rho": 0.5}

    # Jitted: op-by-op, the unrolled rollouts dispatch thousands of small operations.
    value_and_grad = lambda f: eqx.filter_jit(eqx.filter_value_and_grad(f))
    loss_a, grad_a = value_and_grad(bench.bam_loss_term)(*args, **kwargs)  # sde_bptt_term
    loss_b, grad_b = value_and_grad(bench.bam_loss_fused)(*args, **kwargs)
    assert loss_a.dtype == loss_b.dtype == jnp.float64
    assert jnp.allclose(loss_a, loss_b, rtol=F64_RTOL, atol=0)
    for a, b in zip(jax.tree_util.tree_leaves(grad_a), jax.tree_util.tree_leaves(grad_b)):
        assert jnp.allclose(a, b, rtol=F64_RTOL, atol=F64_ATOL)

    # The running-cost term is BAM's: with rho = 0 and inv_temp = 0 only sum_{i<K-1} C_i is left.
    zero = {"num_steps": num_steps, "inv_temp": 0.0, "rho": 0.0}

    @eqx.filter_jit  # op-by-op, the rollout dispatches thousands of small operations
    def running_cost(velocity, base, obs, noise):
        trajectory = jax.vmap(
            lambda o, n: qam.memoryless_sde_sample(velocity, base, o, noise=n, num_steps=num_steps)
        )(obs, noise)
        h = 1.0 / num_steps
        expected = 0.0
        for i in range(num_steps - 1):
            t = jnp.asarray(i * h)
            sigma2 = qam.memoryless_sigma(t, h) ** 2
            diff = jax.vmap(lambda o, x, t=t: velocity(t, x, o) - base(t, x, o))(
                obs, trajectory.xs[:, i]
            )
            expected = expected + jnp.mean(2.0 * jnp.sum(diff**2, axis=-1) / sigma2)
        return expected

    expected = running_cost(velocity, base, obs, noise)
    running = eqx.filter_jit(bench.bam_loss_fused)(*args, **zero)
    assert jnp.allclose(running, expected, rtol=F64_RTOL, atol=0)


def test_am_gradient_matches_parts(getkey, x64):
    bench = _load_module()
    obs_dim, action_dim, batch, hidden, num_steps = 3, 2, 4, (8, 8), 3
    velocity = qam.nn.VelocityNetwork(obs_dim, action_dim, hidden, key=getkey())
    base = qam.nn.VelocityNetwork(obs_dim, action_dim, hidden, key=getkey())
    critic = qam.nn.CriticEnsemble(obs_dim, action_dim, hidden, num_critics=2, key=getkey())
    obs = jax.random.normal(getkey(), (batch, obs_dim))
    noise = jax.random.normal(getkey(), (batch, num_steps, action_dim))
    counter = {"traces": 0}
    am = bench.make_am_grad(num_steps, 1.5, counter)
    loss, grads = eqx.filter_jit(am)(velocity, base, critic, obs, noise)  # op-by-op is slow
    assert counter["traces"] == 1

    @eqx.filter_jit
    def expected(velocity, base, critic, obs, noise):
        trajectory = jax.vmap(
            lambda o, n: qam.memoryless_sde_sample(velocity, base, o, noise=n, num_steps=num_steps)
        )(obs, noise)

        def reward(a):
            q = jax.vmap(critic)(obs, jnp.clip(a, -1.0, 1.0))
            return jnp.sum(jnp.mean(q, axis=-1))

        terminal = -1.5 * jax.grad(reward)(trajectory.action)
        lean = jax.vmap(qam.lean_adjoint, in_axes=(None, 0, 0, 0))
        adjoint = lean(base, obs, trajectory, terminal)

        def am_loss(v):
            per = jax.vmap(qam.adjoint_matching_loss, in_axes=(None, None, 0, 0, 0))(
                v, base, obs, trajectory, adjoint
            )
            return jnp.mean(per)

        return eqx.filter_value_and_grad(am_loss)(velocity)

    expected_loss, expected_grads = expected(velocity, base, critic, obs, noise)
    assert loss.dtype == jnp.float64
    assert jnp.allclose(loss, expected_loss, rtol=F64_RTOL, atol=0)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected_grads)):
        assert jnp.allclose(a, b, rtol=F64_RTOL, atol=F64_ATOL)


def _to_float64(tree):
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, tree
    )


@pytest.mark.parametrize("num_steps", [2, 4])
def test_am_fused_matches_composed(getkey, num_steps):
    """In the benchmark's setting (critic ensemble, clipped actions, batch vmap), the fused AM
    gradient gives the composed gradient's loss and gradient.

    The two are the same mathematics evaluated in a different order, so they are compared in
    float64, where they agree to ~1e-14; in float32 their rounding differs by ~1e-6 on gradients
    of size ~10, which says nothing about correctness either way."""
    bench = _load_module()
    obs_dim, action_dim, batch, hidden = 3, 2, 5, (8, 8)
    velocity = qam.nn.VelocityNetwork(obs_dim, action_dim, hidden, key=getkey())
    base = qam.nn.VelocityNetwork(obs_dim, action_dim, hidden, key=getkey())
    critic = qam.nn.CriticEnsemble(obs_dim, action_dim, hidden, num_critics=3, key=getkey())
    obs = jax.random.normal(getkey(), (batch, obs_dim))
    # Scaled so that some terminal actions leave [-1, 1] and the clip matters.
    noise = 2.0 * jax.random.normal(getkey(), (batch, num_steps, action_dim))

    with jax.enable_x64(True):
        args = _to_float64((velocity, base, critic, obs, noise))
        counters = {"traces": 0}, {"traces": 0}
        composed = eqx.filter_jit(bench.make_am_grad(num_steps, 1.5, counters[0]))
        fused = eqx.filter_jit(bench.make_am_fused_grad(num_steps, 1.5, counters[1]))
        loss_c, grad_c = composed(*args)
        loss_f, grad_f = fused(*args)
        assert counters == ({"traces": 1}, {"traces": 1})
        assert loss_f.dtype == jnp.float64
        assert jnp.isfinite(loss_f) and loss_f > 0
        assert jnp.allclose(loss_c, loss_f, rtol=1e-10, atol=0)
        leaves_c, leaves_f = jax.tree_util.tree_leaves(grad_c), jax.tree_util.tree_leaves(grad_f)
        assert len(leaves_c) == len(leaves_f) > 0
        assert jax.tree_util.tree_structure(grad_c) == jax.tree_util.tree_structure(grad_f)
        for a, b in zip(leaves_c, leaves_f):
            assert a.dtype == b.dtype == jnp.float64
            assert jnp.allclose(a, b, rtol=1e-9, atol=1e-11)
        # The gradient is not trivially zero (both paths would then agree vacuously).
        assert any(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in leaves_f)
