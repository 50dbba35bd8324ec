"""The update-step benchmark harness (`benchmarks/update_step.py`) runs and reports sensibly
for any registered agent, through the agent interface only.

Only the harness is checked (tiny sizes via `--quick`, which also compiles with XLA's backend
optimisation level 0; no timings asserted): `--help` documents every option, an in-process
run of `main` for a QAM agent (with the per-term breakdown) and for a non-QAM agent writes a
JSON and a markdown file with positive numbers, and the QAM family's breakdown terms add up to
the whole update's matrix-product FLOPs.
"""

import ast
import dataclasses
import json
import os
import sys

import equinox as eqx
import jax
import pytest
from helpers import load_script

import qam
from qam.agents import AGENTS


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "update_step.py")


def _load_module():
    # Registered in sys.modules: tyro reads the options' doc comments through `inspect`.
    return sys.modules.setdefault("update_step_bench", load_script(SCRIPT, "update_step_bench"))


def _field_comments(path, class_name):
    """`{field: its trailing comment}` for the fields of dataclass `class_name` in `path`."""
    with open(path) as f:
        source = f.read()
    lines = source.splitlines()
    (cls,) = [n for n in ast.walk(ast.parse(source)) if getattr(n, "name", None) == class_name]
    return {
        node.target.id: lines[node.lineno - 1].partition("  # ")[2].strip()
        for node in cls.body
        if isinstance(node, ast.AnnAssign)
    }


def test_help_documents_every_option(capsys):
    bench = _load_module()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    documented = _field_comments(SCRIPT, "Options")
    for field in dataclasses.fields(bench.Options):
        assert "--" + field.name.replace("_", "-") in text, field.name
        assert documented[field.name], f"{field.name} has no doc comment"  # its help line
    assert "--no-donate" in text and "(default: 2048)" in text


@pytest.mark.standard_promotion  # optax's Adam inside the agent update
def test_quick_run_writes_results(tmp_path, capsys):
    bench = _load_module()
    out = tmp_path / "update_step_test.json"
    result = bench.main(
        ["--quick", "--agent", "qam", "--seeds", "1", "--loop-steps", "0", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    for word in ("machine", "device", "jax", "jaxlib", "equinox", "optax", "qam", "matmul"):
        assert word in printed
    assert result["out"] == str(out)

    data = json.loads(out.read_text())
    assert data["benchmark"] == "update_step"
    assert data["machine"]["versions"]["qam"] == qam.__version__
    assert data["matmul"]["gflops_per_s"] > 0 and data["matmul"]["median_s"] > 0
    (row,) = data["results"]
    assert row["agent"] == "qam" and row["seeds"] == 1
    assert row["config"]["actor_hidden"] == [16, 16] and row["config"]["num_qs"] == 2
    update = row["update"]
    for name in ("compile_s", "median_s", "ms_per_update", "steps_per_s", "gflop", "xla_gflop"):
        assert update[name] > 0, name
    assert update["fraction_of_matmul"] > 0
    assert "loop" not in row  # --loop-steps 0 (the loop is checked below)
    assert data["targets"] and data["breakdown"] == []

    md = out.with_suffix(".md").read_text()
    assert "| agent | seeds | update ms/call | update steps/s |" in md
    assert "| agent | seeds | ms/update | GFLOP/update |" in md  # the README's summary table
    assert "| qam | 1 |" in md
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic writes


@pytest.mark.standard_promotion
def test_offline_loop_takes_n_steps():
    """The offline loop (one jitted scan of N sample + update steps) advances the agent N
    steps and returns N steps of metrics."""
    bench = _load_module()
    opts = bench.resolve(bench.Options(quick=True, loop_steps=3), "cpu")
    agent = AGENTS["qam"]
    config = bench.make_config(agent, opts)
    dataset = bench.make_dataset(opts, 0)
    dynamic, static = bench.init_states(agent, config, opts, 1, 0)
    ds_dynamic, ds_static = eqx.partition(dataset, eqx.is_array)
    loop = bench.make_loop_fn(agent, static, 1, ds_static, config, opts.batch, opts.loop_steps)
    compiled, cost = bench.compile_fn(loop, (dynamic, ds_dynamic, jax.random.PRNGKey(0)), True)
    assert cost["compile_s"] > 0 and cost["matmul_flops"] > 0
    new, metrics = compiled(dynamic, ds_dynamic, jax.random.PRNGKey(0))
    assert int(eqx.combine(new, static).step) == 3
    assert all(v.shape == (3,) for v in metrics.values()) and "grad_norm" in metrics


@pytest.mark.standard_promotion
def test_breakdown_times_each_term(monkeypatch, capsys):
    """The breakdown compiles and times each part on its own, and says when the parts do not
    add up to the update (here: only the two cheapest parts are kept, to keep the test short;
    the full sum is checked on the jaxprs below)."""
    bench = _load_module()
    full = bench.breakdown_parts
    cheap = ("critic_term gradient", "optimiser")
    monkeypatch.setattr(
        bench, "breakdown_parts", lambda *a: [p for p in full(*a) if p[0].startswith(cheap)]
    )
    opts = bench.resolve(bench.Options(quick=True), "cpu")
    rows = bench.breakdown("qam", opts, bench.make_dataset(opts, 0), bench.MatmulProbe(64), 1.0)
    assert [r["part"].startswith(cheap) for r in rows] == [True, True]
    for r in rows:
        assert r["agent"] == "qam" and r["median_s"] > 0 and r["compile_s"] > 0
        assert r["fraction_of_matmul"] is not None
    assert rows[0]["gflop"] > 0 and rows[1]["gflop"] == 0  # the optimiser has no products
    assert "its update is not (only) these terms" in capsys.readouterr().out  # 1 GFLOP given


NON_QAM = [name for name in AGENTS if not name.startswith("qam")]


@pytest.mark.standard_promotion
@pytest.mark.skipif(not NON_QAM, reason="no non-QAM agent registered")
def test_quick_run_non_qam_agent(tmp_path, capsys):
    """Any registered agent runs through the interface alone (its config may lack fields the
    QAM family has, e.g. `flow_steps`); the QAM breakdown is skipped for agents without its
    terms."""
    bench = _load_module()
    name = NON_QAM[0]
    out = tmp_path / "update_step_other.json"
    result = bench.main(
        ["--quick", "--agent", name, "--loop-steps", "0", "--breakdown", "--out", str(out)]
    )
    capsys.readouterr()
    (row,) = result["results"]
    assert row["agent"] == name and "loop" not in row
    assert row["update"]["gflop"] > 0 and row["update"]["median_s"] > 0
    assert row["config"]["num_qs"] == 2  # --quick sizes applied where the fields exist
    if not result["breakdown"]:
        agent = AGENTS[name]
        state = agent.init(jax.random.PRNGKey(0), jax.numpy.zeros(4), jax.numpy.zeros(2),
                           agent.config(**row["overrides"]))  # fmt: skip
        assert not bench.has_qam_terms(state)
    assert f"| {name} | 1 |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("name", sorted(n for n in AGENTS if n.startswith("qam")))
def test_breakdown_terms_add_up_to_the_update(name):
    """For every QAM-family agent (including its one-step or edit policy term), the parts
    marked `in_sum` are the whole update's matrix products: counted on the jaxprs, nothing
    compiled."""
    bench = _load_module()
    opts = bench.resolve(bench.Options(quick=True), "cpu")
    agent = AGENTS[name]
    config = bench.make_config(agent, opts)
    dataset = bench.make_dataset(opts, 0)
    key = jax.random.PRNGKey(1)
    dynamic, static = bench.init_states(agent, config, opts, 1, 0)
    state = eqx.combine(dynamic, static)
    assert bench.has_qam_terms(state)
    batch = bench.sample_batches(dataset, key, 1, config, opts.batch)
    with jax.numpy_dtype_promotion("standard"):
        parts = bench.breakdown_parts(agent, state, batch, key)
        flops = {}
        for part, in_sum, fn, args in parts:
            dyn, stat = eqx.partition(args, eqx.is_array)
            jaxpr = jax.make_jaxpr(lambda d, fn=fn, stat=stat: fn(*eqx.combine(d, stat)))(dyn)
            flops[part] = (in_sum, bench._common.matmul_flops(jaxpr))
    update = lambda s, b, k: eqx.filter(agent.update(s, b, key=k), eqx.is_array)
    with jax.numpy_dtype_promotion("standard"):
        whole = bench._common.matmul_flops(jax.make_jaxpr(update)(state, batch, key))
    total = sum(f for in_sum, f in flops.values() if in_sum)
    assert whole > 0 and abs(total - whole) <= 1e-6 * whole, flops
    policy = [p for p in flops if "distillation" in p or "edit_policy" in p]
    assert len(policy) == (name != "qam")
