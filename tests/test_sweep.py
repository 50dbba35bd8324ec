"""Studies as data, run identity, command lines, and sweeps of tiny runs under the local launcher
(killed mid-sweep and restarted) and under a local Ray cluster (a worker killed mid-run)."""

import dataclasses
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import typing

import pytest
from helpers import load_script

from qam import reference, studies
from qam.agents import AGENTS, METHOD_PRESETS


ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = ROOT / "examples" / "sweep.py"
TASK1 = "cube-double-play-singletask-task1-v0"
TASK2 = "cube-double-play-singletask-task2-v0"
P33 = "puzzle-3x3-play-singletask-task2-v0"  # QAM-E edits here (edit_scale 0.1)
# Tiny runs: 16 offline + 8 online steps, 2x8 networks, 2 critics, 2 flow steps.
TINY_SET = [
    "preset=small", "offline_steps=16", "online_steps=8", "eval_episodes=1", "eval_interval=8",
    "log_interval=8", "checkpoint_interval=8", "batch_size=8", "start_training=2",
    "max_episode_steps=10", "actor_hidden=8,8", "critic_hidden=8,8", "num_qs=2", "flow_steps=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def main_job():
    return studies.load_main_job()


@pytest.fixture(scope="module")
def sweep_cli():
    return load_script(SWEEP, "sweep")


# --- studies as data ---------------------------------------------------------------------------


def test_paper_study_counts_and_contents():
    counts = {name: len(studies.expand(study)) for name, study in studies.STUDIES.items()}
    assert counts == {"main": 16 * 50 * 12, "quality": 9 * 30 * 12, "sensitivity": 10 * 10 * 12,
                      "rlpd": 50 * 12}  # fmt: skip
    assert counts["main"] == 9_600 and len(studies.STUDIES["main"]) == 9_600
    assert studies.PAPER_SEEDS == (10001, 20002, 30003, 40004, 50005, 60006, 70007, 80008,
                                   90009, 100010, 110011, 120012)  # fmt: skip
    # The study's tasks and methods are the ones the released curves hold.
    released = set(reference.available_tasks("QAM"))
    assert set(studies.MAIN_TASKS) <= released and len(set(studies.MAIN_TASKS)) == 50
    assert set(studies.QUALITY_TASKS) <= set(reference.available_tasks("BAM"))
    names = {studies.PAPER_NAMES[m] for m in studies.PAPER_METHODS}
    assert names == set(reference.available_methods("all")) - {"RLPD"}
    assert len(names) == 16
    # Every sensitivity variant is one of the released sensitivity curves, on each of its tasks.
    for variant in studies.STUDIES["sensitivity"].variants:
        assert studies.paper_curve("all-rep", variant.label) is not None, variant.label
        for task in studies.SENSITIVITY_TASKS:
            assert studies.paper_curve(task, variant.label) is not None
    # Each spec is one (method, task, variant, seed); none twice.
    main = studies.expand(studies.STUDIES["main"])
    assert len({(s.method, s.task, s.label, s.seeds) for s in main}) == 9_600
    assert {s.seeds for s in main} == {(seed,) for seed in studies.PAPER_SEEDS}


def test_registered_methods_of_the_main_study(sweep_cli, capsys):
    """What the registry supports now: the dry run lists every registered paper method's runs."""
    registered = [m for m in studies.PAPER_METHODS if m in AGENTS]
    assert sweep_cli.main(["main", "--tasks", "cube-double-play", "--seeds", "1", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[-1] == f"{len(registered) * 5} runs"
    if len(registered) < 16:
        assert "left out" in out.err


def test_select_parse_and_user_grids(tmp_path):
    main = studies.STUDIES["main"]
    part = studies.select(main, methods=["qam", "fql"], tasks=["cube-double-play", TASK1],
                          seeds=[1, 2])  # fmt: skip
    assert part.tasks == tuple(f"cube-double-play-singletask-task{i}-v0" for i in range(1, 6))
    assert len(studies.expand(part)) == 2 * 5 * 2
    with pytest.raises(ValueError, match="`--methods`: nope not in study 'main'"):
        studies.select(main, methods=["nope"])
    with pytest.raises(ValueError, match="`--tasks`: 'walker' is neither"):
        studies.select(main, tasks=["walker"])
    assert studies.parse_set(["inv-temp=x0.1", "actor_hidden=8,8", "clip_grad=false",
                              "buffer_size=null", "num_qs=2", "lr=3e-4", "env_tag=abc",
                              "widths=[4, 4]"]) == {  # fmt: skip
        "inv_temp": studies.Times(0.1), "actor_hidden": (8, 8), "clip_grad": False,
        "buffer_size": None, "num_qs": 2, "lr": 3e-4, "env_tag": "abc", "widths": (4, 4),
    }  # fmt: skip
    with pytest.raises(ValueError, match="KEY=VALUE"):
        studies.parse_set(["offline_steps"])
    grid = tmp_path / "temps.json"
    grid.write_text(json.dumps({
        "methods": ["qam"], "tasks": ["scene-play", TASK1], "seeds": 3,
        "grid": {"inv_temp": [0.3, 1.0], "flow_steps": [5, 10, 20]},
        "variants": [{"label": "cold", "set": {"inv_temp": {"times": 0.1}}}],
    }))  # fmt: skip
    study = studies.load_study(str(grid))
    assert study.name == "temps" and study.seeds == studies.PAPER_SEEDS[:3]
    assert len(study.variants) == 2 * 3 + 1 and len(study.tasks) == 6
    assert len(studies.expand(study)) == 1 * 6 * 7 * 3
    assert study.variants[0] == studies.Variant("inv_temp=0.3, flow_steps=5",
                                                {"inv_temp": 0.3, "flow_steps": 5})  # fmt: skip
    with pytest.raises(ValueError, match="STUDY must be one of main"):
        studies.load_study("nope")


# --- resolution and identity ---------------------------------------------------------------------


def _spec(method="qam-edit", task="puzzle-4x4-play-singletask-task3-v0", study="main", **sets):
    return studies.RunSpec(study, method, task, (10001,), "paper", tuple(sorted(sets.items())))


def test_resolution_applies_the_paper_settings_of_the_domain(main_job):
    r = studies.resolve(_spec(), main=main_job)
    preset = METHOD_PRESETS["qam-edit"]["puzzle-4x4-play"]
    assert (r.agent["inv_temp"], r.agent["edit_scale"]) == (
        preset["inv_temp"],
        preset["edit_scale"],
    )
    assert (r.agent["horizon"], r.agent["discount"], r.agent["rho"]) == (5, 0.99, 0.5)
    assert r.agent["actor_hidden"] == (512,) * 4 and r.agent["num_qs"] == 10
    assert (r.job["offline_steps"], r.job["online_steps"], r.job["sparse"]) == (
        1_000_000,
        500_000,
        "yes",
    )
    # The quality study: the noisy dataset of a domain takes the play dataset's settings.
    q = studies.resolve(_spec("fql", "cube-double-noisy-singletask-task1-v0", "quality"),
                        main=main_job)  # fmt: skip
    assert q.job["env"] == "cube-double-noisy-singletask-task1-v0" and q.job["sparse"] == "no"
    assert q.agent["alpha"] == METHOD_PRESETS["fql"]["cube-double-play"]["alpha"]
    hm = studies.resolve(
        _spec("fql", "humanoidmaze-medium-stitch-singletask-task2-v0"), main=main_job
    )
    assert (hm.agent["horizon"], hm.agent["discount"], hm.agent["rho"]) == (1, 0.995, 0.0)
    # The sensitivity study: relative and absolute changes of QAM-E's domain setting.
    cold = studies.resolve(_spec("qam-edit", "cube-triple-play-singletask-task2-v0",
                                 inv_temp=studies.Times(0.1)), main=main_job)  # fmt: skip
    assert (
        cold.agent["inv_temp"] == METHOD_PRESETS["qam-edit"]["cube-triple-play"]["inv_temp"] * 0.1
    )
    # An override applies where the setting exists; elsewhere it is ignored and not "applied".
    fql = studies.resolve(_spec("fql", TASK1, inv_temp=3.0, offline_steps=10), main=main_job)
    assert fql.applied == {"offline_steps"} and fql.job["offline_steps"] == 10
    with pytest.raises(ValueError, match="fql on .*num_qs"):
        studies.resolve(_spec("fql", TASK1, num_qs=0), main=main_job)
    with pytest.raises(ValueError, match="env is set with --tasks"):
        studies.resolve(_spec("fql", TASK1, env="x"), main=main_job)


def test_command_line_parses_back_to_the_resolved_configuration(main_job):
    """The main job's own parser reads the generated command line as the resolved config."""
    for spec in (
        _spec(),
        _spec("fql", TASK1, actor_hidden=(8, 8), buffer_size=1000),
        _spec("qam-edit", TASK2, clip_grad=False, inv_temp=studies.Times(3.0)),
    ):
        r = studies.resolve(spec, main=main_job)
        job, hyper = main_job.parse_args(r.argv(out="/x/run", dataset_dir="/data"))
        _, config = main_job.build_configs(job, hyper)
        assert dataclasses.asdict(config) == r.agent
        assert {k: getattr(job, k) for k in r.job if k != "preset"} == {
            **{k: v for k, v in r.job.items() if k != "preset"}, "out": "/x/run",
            "dataset_dir": "/data", "progress": False,
        }  # fmt: skip


def test_identity_is_canonical_json_sha256_and_stable_across_processes(main_job):
    payload = {"b": 1, "a": (1.5, None, True), "c": {"y": "z", "x": 0.1}}
    text = '{"a":[1.5,null,true],"b":1,"c":{"x":0.1,"y":"z"}}'
    assert studies.canonical_json(payload) == text
    assert studies.config_hash(payload) == hashlib.sha256(text.encode()).hexdigest()
    specs = [_spec(), _spec("fql", TASK1, actor_hidden=(8, 8)), _spec(inv_temp=studies.Times(0.3))]
    here = [studies.resolve(s, main=main_job).run_id for s in specs]
    code = (
        "import json, sys; from qam import studies\n"
        "specs = [studies.RunSpec(*a[:4], a[4], tuple((k, studies.Times(v['t']) if isinstance(v, "
        "dict) else tuple(v) if isinstance(v, list) else v) for k, v in a[5])) for a in "
        "json.loads(sys.argv[1])]\n"
        "print(json.dumps([studies.resolve(s).run_id for s in specs]))\n"
    )
    encoded = json.dumps([[s.study, s.method, s.task, list(s.seeds), s.preset,
                           [[k, {"t": v.factor} if isinstance(v, studies.Times) else v]
                            for k, v in s.overrides]] for s in specs])  # fmt: skip
    env = dict(os.environ, PYTHONHASHSEED="12345")  # a different str hash than this process
    out = subprocess.run([sys.executable, "-c", code, encoded], capture_output=True, text=True,
                         env=env, check=True, timeout=300)  # fmt: skip
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here
    assert len(set(here)) == 3


def _other(cls, name, value):
    """A different value of the same kind: a flipped bool, another int/float, another choice
    of a Literal, a one-layer tuple; `None` where there is no obvious one."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.5
    if isinstance(value, tuple):
        return (7,)
    hint = typing.get_type_hints(cls, include_extras=True)[name]
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is typing.Literal:
        return next(c for c in typing.get_args(hint) if c != value)
    return None


def test_identity_changes_with_every_setting_and_only_with_settings(main_job):
    base = studies.resolve(_spec("qam-edit", P33), main=main_job)
    agent_class = AGENTS["qam-edit"].config_class
    changes = {  # one different valid value for every run and agent setting
        **{k: _other(main_job.Job, k, v) for k, v in base.job.items()
           if k not in studies._resolve.NOT_IDENTITY and k not in ("env", "agent", "seeds")},
        **{k: _other(agent_class, k, v) for k, v in base.agent.items()},
        "sparse": "no", "buffer_size": 5000, "max_episode_steps": 99, "variant": "qam",
        "edit_target_entropy": -3.0, "eval_interval": 100_000, "log_interval": 50_000,
        "checkpoint_interval": 100_000, "horizon": 3,
    }  # fmt: skip
    changes.pop("fql_alpha")  # qam-edit's distillation weight must stay 0 (its checks say so)
    ids = {base.run_id}
    for key, value in changes.items():
        if key == "variant":
            spec = _spec("qam-edit", P33, variant="qam", edit_scale=0.0)
        else:
            spec = _spec("qam-edit", P33, **{key: value})
        r = studies.resolve(spec, main=main_job)
        assert key in r.applied, key
        assert r.run_id not in ids, key
        ids.add(r.run_id)
    assert len(ids) == len(changes) + 1
    assert len(changes) >= len(base.agent) + 8 - 1
    # The same values set explicitly, where files go and how progress shows: the same run.
    same = {"inv_temp": base.agent["inv_temp"], "tensorboard": True, "progress": True}
    assert studies.resolve(_spec("qam-edit", P33, **same), main=main_job).run_id == base.run_id
    other_seed = dataclasses.replace(_spec("qam-edit", P33), seeds=(20002,))
    assert studies.resolve(other_seed, main=main_job).run_id != base.run_id


def test_dry_run_and_bad_input(sweep_cli, capsys, tmp_path):
    args = ["main", "--methods", "qam", "fql", "--tasks", "cube-double-play", "--seeds", "1", "2",
            "--out", str(tmp_path / "sw"), "--dry-run", "--set", *TINY_SET]  # fmt: skip
    assert sweep_cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("main: 20 runs in") and lines[-1] == "20 runs"
    assert sum(line.startswith("new ") for line in lines) == 20
    assert not (tmp_path / "sw").exists()  # a dry run writes nothing
    assert sweep_cli.main([*args, "--seeds-per-program", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "20 runs" and sum(line.startswith("new ") for line in lines) == 10
    for bad, match in ((["--set", "no_such_setting=1"], "no run of this sweep has the setting "
                        "no_such_setting"), (["--methods", "nope"], "nope not registered"),
                       (["--set", "offline_steps=-1"], "offline_steps"),
                       (["--set", "seeds=3"], "seeds is set with --seeds")):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            sweep_cli.main([*args, *bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err


def test_launcher_settings_and_missing_engines(monkeypatch):
    params = studies.slurm_parameters(gpus=1, cpus=8, mem_gb=64, time_min=240, partition="gpu",
                                      parallelism=100)  # fmt: skip
    assert params == {"name": "qam-sweep", "timeout_min": 240, "gpus_per_node": 1,
                      "cpus_per_task": 8, "mem_gb": 64.0, "slurm_array_parallelism": 100,
                      "nodes": 1, "tasks_per_node": 1, "slurm_partition": "gpu"}  # fmt: skip
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    with pytest.raises(ImportError, match=r"^--launcher slurm needs submitit, which is not "
                       r"installed: pip install 'qam\[slurm\]'$"):  # fmt: skip
        studies.run_slurm([], script="x", folder="x", parameters=params)
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'qam\[ray\]'$"):
        studies.run_ray([], script="x")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert studies.local_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert studies.local_gpus() == []


# --- sweeps of tiny runs ---------------------------------------------------------------------


def _sweep_env(tmp_path):
    """Children compile once: a shared persistent compilation cache for every tiny program."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")  # fmt: skip
    return env


def _wait_for(predicate, timeout, proc=None):
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.05)
    return False


def test_local_sweep_killed_mid_sweep_resumes_and_a_finished_sweep_starts_nothing(
    tiny_dataset_dir, tmp_path
):
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(SWEEP), "main", "--methods", "fql", "--tasks", TASK1, TASK2,
           "--seeds", "1", "2", "--seeds-per-program", "2", "--workers", "1", "--out", str(out),
           "--dataset-dir", tiny_dataset_dir, "--set", *TINY_SET]  # fmt: skip
    env = _sweep_env(tmp_path)
    first_log = tmp_path / "first-sweep.log"
    with open(first_log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    runs = lambda: sorted(p for p in out.glob("fql/*/*") if p.is_dir())  # noqa: E731
    finished = lambda: [p for p in runs() if (p / "summary.json").exists()]  # noqa: E731

    def second_checkpointed():
        return len(finished()) == 1 and any(
            (p / "checkpoints" / "latest.json").exists() and not (p / "summary.json").exists()
            for p in runs()
        )

    try:
        assert _wait_for(second_checkpointed, 400, proc), first_log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its running program, at once
        proc.wait()
    done_first = finished()[0]
    stamp = (done_first / "summary.json").stat().st_mtime_ns
    interrupted = [p for p in runs() if p not in finished()][0]
    saved = json.loads((interrupted / "checkpoints" / "latest.json").read_text())["step"]
    assert 0 < saved < 24
    # Rerun: the finished program is skipped, the interrupted one resumes from its checkpoint.
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "4 runs in" in rerun.stdout and "2 finished, 2 to run in 1 program" in rerun.stdout
    assert len(finished()) == 2 and len(runs()) == 2
    assert (done_first / "summary.json").stat().st_mtime_ns == stamp  # untouched
    log = pathlib.Path(str(interrupted) + ".log").read_text()
    assert f"Resuming from step {saved}" in log
    evals = [
        json.loads(line)["step"] for line in (interrupted / "eval.jsonl").read_text().splitlines()
    ]
    assert sorted(set(evals)) == [8, 16, 24]  # nothing lost, nothing twice
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["final"]["step"] == 24 and len(summary["final"]["per_seed"]) == 2
    # The process ran exactly the resolved configuration.
    record = json.loads(pathlib.Path(str(interrupted) + ".json").read_text())
    assert (
        json.loads((interrupted / "config.json").read_text())["agent"]
        == record["identity"]["agent"]
    )
    # A rerun of the finished sweep starts nothing.
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "Nothing to run" in again.stdout
    assert "4 finished, 0 to run" in again.stdout
    assert (done_first / "summary.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_ray_sweep_survives_a_killed_worker(tiny_dataset_dir, tmp_path, main_job):
    """Slow (a local Ray cluster takes ~10 s and ~1 GB to start): a worker killed mid-run is
    retried, the program resumes from its checkpoint and the sweep finishes."""
    ray = pytest.importorskip("ray")
    out = tmp_path / "sweep"
    study = studies.select(studies.STUDIES["main"], methods=["fql"], tasks=[TASK1], seeds=[1, 2])
    specs = studies.expand(study, extra=studies.parse_set(TINY_SET))
    programs, counts = studies.plan(specs, out=str(out), dataset_dir=tiny_dataset_dir,
                                    seeds_per_program=2, main=main_job)  # fmt: skip
    assert counts == {"runs": 2, "finished": 0, "duplicates": 0} and len(programs) == 1
    run_dir = pathlib.Path(programs[0].run_dir)
    os.environ.update(_sweep_env(tmp_path))
    import threading

    killed = []

    def kill_worker():  # the Ray worker running the program: the parent of the main job
        if _wait_for(lambda: (run_dir / "checkpoints" / "latest.json").exists(), 400):
            pid = int((run_dir / ".lock").read_text().strip())
            with open(f"/proc/{pid}/stat") as f:
                worker = int(f.read().rsplit(")", 1)[1].split()[1])
            os.kill(worker, signal.SIGKILL)
            killed.append(worker)

    thread = threading.Thread(target=kill_worker)
    thread.start()
    try:
        outcome = studies.run_ray(
            programs, script=str(studies.DEFAULT_SCRIPT), max_retries=2,
            init_kwargs=dict(num_cpus=2, include_dashboard=False),
        )  # fmt: skip
    finally:
        thread.join()
        ray.shutdown()
    assert killed and len(outcome["finished"]) == 1
    assert "Resuming from step" in pathlib.Path(str(run_dir) + ".log").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["final"]["step"] == 24
