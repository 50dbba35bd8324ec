"""The update-step benchmark harness (`benchmarks/update_step.py`) runs and reports sensibly.

Only the harness is checked (tiny sizes via `--quick`, which also compiles with XLA's backend
optimisation level 0; no timings asserted): `--help` documents the options, and one in-process
run of `main` writes a JSON and a markdown file with positive numbers.
"""

import json
import os

import pytest
from helpers import load_script

import qam


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "update_step.py")


def _load_module():
    return load_script(SCRIPT, "update_step_bench")


def test_help_documents_every_option():
    bench = _load_module()
    text = bench.build_parser().format_help()
    for option in (
        "--variants",
        "--seeds",
        "--batch",
        "--width",
        "--num-critics",
        "--flow-steps",
        "--horizon",
        "--loop-steps",
        "--repeats",
        "--matmul-size",
        "--breakdown",
        "--out",
        "--quick",
        "--platform",
    ):
        assert option in text
    for action in bench.build_parser()._actions:
        assert action.help, action.option_strings  # every option is documented


@pytest.mark.standard_promotion  # optax's Adam inside the agent update
def test_quick_run_writes_results(tmp_path, capsys):
    bench = _load_module()
    out = tmp_path / "update_step_test.json"
    result = bench.main(
        ["--quick", "--variants", "qam", "--seeds", "1", "--loop-steps", "2", "--breakdown",
         "--out", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    for word in ("machine", "device", "jax", "jaxlib", "equinox", "optax", "qam", "matmul"):
        assert word in printed
    assert result["out"] == str(out)

    data = json.loads(out.read_text())
    assert data["benchmark"] == "update_step"
    assert data["machine"]["versions"]["qam"] == qam.__version__
    assert data["matmul"]["gflops_per_s"] > 0 and data["matmul"]["median_s"] > 0
    (row,) = data["results"]
    assert row["variant"] == "qam" and row["seeds"] == 1
    update = row["update"]
    for name in ("compile_s", "median_s", "steps_per_s", "gflop", "xla_gflop"):
        assert update[name] > 0, name
    assert update["fraction_of_matmul"] > 0
    loop = row["loop"]
    assert loop["steps"] == 2
    for name in ("compile_s", "median_s", "steps_per_s", "ratio_to_update"):
        assert loop[name] > 0, name
    assert data["targets"]
    # The breakdown rebuilds the agent's pieces; its stages nest (each adds work to the last)
    # and its whole update is the benchmarked one.
    parts = {p["part"]: p for p in data["breakdown"]}
    am = [p["gflop"] for name, p in parts.items() if name.startswith("AM:")]
    assert len(am) == 4 and am == sorted(am) and am[0] > 0
    assert parts["whole update (no donation)"]["gflop"] == update["gflop"]
    # Critic target + TD gradient + flow gradient + AM gradient are the whole update's products.
    pieces = ["critic target", "critic TD gradient", "BC flow-matching gradient", "AM: whole"]
    total = sum(p["gflop"] for name, p in parts.items() if name.startswith(tuple(pieces)))
    assert abs(total - update["gflop"]) <= 1e-3 * update["gflop"]

    md = out.with_suffix(".md").read_text()
    assert "| variant | seeds | update ms/call | update steps/s |" in md
    assert "| qam | 1 |" in md
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic writes
