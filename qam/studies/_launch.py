"""Planning a sweep and launching its runs: locally (a pool of processes), on Ray or on SLURM.

Each program is one process of the main job (`examples/offline_to_online.py`) with its full
command line (see `qam.studies.resolve`), training one or several seeds of one (method, task,
variant) together (the trainer's vmapped seeds). Its directory is named by its identity:

```
OUT/<method>/<task>/s<seeds>-<id[:12]>/      the main job's run directory (--out)
OUT/<method>/<task>/s<seeds>-<id[:12]>.json  the sweep's record: spec, ids, command line
OUT/<method>/<task>/s<seeds>-<id[:12]>.log   the process's output
```

A seed-run is finished when a finished program (one whose run directory has `summary.json`,
written only at the very end) lists it among its members: the identity of each seed alone is
recorded, so changing how seeds are grouped into programs does not redo finished seeds. An
unfinished program is started again with the same command on the same directory, and the
trainer resumes it from its last checkpoint; a changed configuration has another identity, so
another directory.
"""

import concurrent.futures
import dataclasses
import glob
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from .._io import atomic_write_json
from ._resolve import load_main_job, resolve
from ._study import RunSpec


__all__ = [
    "Program", "ProgramFailed", "finished_members", "local_gpus", "plan", "program_env",
    "read_records", "require", "run_local", "run_ray", "run_slurm", "slurm_parameters",
]  # fmt: skip


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import an optional dependency, or raise `ImportError` with one line saying how to get
    it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{what} needs {module}, which is not installed: pip install 'qam[{extra}]'"
        ) from None


@dataclasses.dataclass(frozen=True)
class Program:
    """One process to run: `spec` (with its seeds), `run_id`, the members' ids (seed -> id of
    that seed alone), its run directory, command line and `status` (`new` or `resume`)."""

    spec: RunSpec
    run_id: str
    members: dict[int, str]
    run_dir: str
    argv: tuple[str, ...]
    status: str
    identity: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def record_path(self) -> str:
        return self.run_dir + ".json"

    @property
    def log_path(self) -> str:
        return self.run_dir + ".log"

    def describe(self) -> str:
        seeds = ",".join(str(s) for s in self.spec.seeds)
        sets = " ".join(f"{k}={v}" for k, v in self.spec.overrides)
        return (f"{self.status:<7} {self.run_id[:12]}  {self.spec.name:<20} {self.spec.task}  "
                f"seeds {seeds}" + (f"  [{sets}]" if sets else ""))  # fmt: skip


def _finished(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "summary.json"))


def read_records(out: str) -> list[dict[str, Any]]:
    """Every program record (`*.json` beside a run directory) under a sweep's `out`, with
    `finished` set; unreadable records are skipped."""
    import json

    records = []
    for path in sorted(glob.glob(os.path.join(glob.escape(out), "*", "*", "*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            record["run_dir"] = path.removesuffix(".json")
            record["finished"] = _finished(record["run_dir"])
            record["members"] = {int(k): v for k, v in record["members"].items()}
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        records.append(record)
    return records


def finished_members(out: str) -> set[str]:
    """The ids of every finished seed-run under `out`."""
    return {i for r in read_records(out) if r["finished"] for i in r["members"].values()}


def _group_key(spec: RunSpec) -> tuple:
    return (spec.study, spec.method, spec.task, spec.preset, spec.overrides, spec.label)


def plan(
    specs: Sequence[RunSpec],
    *,
    out: str,
    dataset_dir: str | None = None,
    seeds_per_program: int = 1,
    main: ModuleType | None = None,
) -> tuple[list[Program], dict[str, int]]:
    """The programs still to run for `specs` (one seed each, as `expand` gives them) under
    `out`, and counts: `runs` (distinct seed-runs), `finished`, `duplicates` (specs resolving
    to a configuration already listed). Seeds of one (method, task, variant) are grouped into
    programs of up to `seeds_per_program`; finished seed-runs are left out."""
    if seeds_per_program < 1:
        raise ValueError(f"`seeds_per_program` must be >= 1; got {seeds_per_program}.")
    main = main or load_main_job()
    done = finished_members(out)
    groups: dict[tuple, list[tuple[RunSpec, str]]] = {}
    seen: set[str] = set()
    counts = {"runs": 0, "finished": 0, "duplicates": 0}
    for spec in specs:
        for seed in spec.seeds:
            one = dataclasses.replace(spec, seeds=(seed,))
            member = resolve(one, main=main).run_id
            if member in seen:
                counts["duplicates"] += 1
                continue
            seen.add(member)
            counts["runs"] += 1
            if member in done:
                counts["finished"] += 1
                continue
            groups.setdefault(_group_key(spec), []).append((one, member))
    programs = []
    for members in groups.values():
        for i in range(0, len(members), seeds_per_program):
            chunk = members[i : i + seeds_per_program]
            spec = dataclasses.replace(chunk[0][0], seeds=tuple(s.seeds[0] for s, _ in chunk))
            resolved = resolve(spec, main=main)
            seeds = "-".join(str(s) for s in spec.seeds)
            run_dir = os.path.join(out, spec.method, spec.task, f"s{seeds}-{resolved.run_id[:12]}")
            resume = os.path.exists(os.path.join(run_dir, "checkpoints", "latest.json"))
            programs.append(Program(
                spec, resolved.run_id, {s.seeds[0]: m for s, m in chunk}, run_dir,
                tuple(resolved.argv(out=run_dir, dataset_dir=dataset_dir)),
                "resume" if resume else "new", resolved.identity,
            ))  # fmt: skip
    return programs, counts


def write_record(program: Program, script: str) -> None:
    """The program's record beside its run directory (written before it starts)."""
    spec = program.spec
    atomic_write_json(program.record_path, {
        "study": spec.study, "method": spec.method, "label": spec.name, "task": spec.task,
        "seeds": list(spec.seeds), "preset": spec.preset,
        "overrides": {k: str(v) if not isinstance(v, bool | int | float | str | None) else v
                      for k, v in spec.overrides},
        "run_id": program.run_id, "members": {str(k): v for k, v in program.members.items()},
        "command": [sys.executable, script, *program.argv],
        "identity": program.identity,
    }, indent=1)  # fmt: skip


def command(program: Program, script: str) -> list[str]:
    return [sys.executable, script, *program.argv]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGKILL when the process that started it dies (a killed Ray worker
    or sweep must not leave a run holding its directory's lock)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_program(argv: Sequence[str], log_path: str, *, env: dict[str, str] | None = None,
                on_start: Callable[[subprocess.Popen], None] | None = None) -> int:  # fmt: skip
    """Run one program to its end, appending its output to `log_path`; its exit status."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=preexec)  # fmt: skip
        if on_start is not None:
            on_start(proc)
        return proc.wait()


def program_env(cache_dir: str | None = None, gpu: str | None = None) -> dict[str, str]:
    """The environment of a program: this one's, with JAX's persistent compilation cache in
    `cache_dir` (unless `JAX_COMPILATION_CACHE_DIR` is set already; programs of the same
    method and domain then compile once) and, with `gpu`, only that GPU visible."""
    env = dict(os.environ)
    if cache_dir is not None and "JAX_COMPILATION_CACHE_DIR" not in env:
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(cache_dir)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def local_gpus() -> list[str]:
    """The GPUs of this machine, by the ids `CUDA_VISIBLE_DEVICES` takes: its own list where
    set, otherwise `nvidia-smi -L`'s; none without NVIDIA GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        lines = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                               timeout=20).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(lines) if line.startswith("GPU ")]


def _progress_line(done: int, total: int, program: Program, outcome: str, started: float) -> str:
    return (
        f"[{done}/{total}] {outcome:<8} {program.spec.name} {program.spec.task} seeds "
        f"{','.join(map(str, program.spec.seeds))}  ({time.time() - started:.0f}s)"
    )


def run_local(
    programs: Sequence[Program],
    *,
    script: str,
    workers: int | None = None,
    gpus: Sequence[str] | None = None,
    cache_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[Program]]:
    """Run `programs` in a pool of `workers` processes at a time (default: one per GPU, each
    process seeing only its own; without GPUs half the CPU cores), with `program_env`'s
    compilation cache in `cache_dir`. SIGINT/SIGTERM stop the
    sweep: every running program writes a checkpoint and stops (Ctrl-C reaches them directly;
    a SIGTERM is passed on to them), none is started after. Returns the programs by outcome:
    `finished`, `failed`, `stopped`."""
    gpus = list(local_gpus() if gpus is None else gpus)
    if workers is None:
        workers = len(gpus) or max(1, (os.cpu_count() or 1) // 2)
    slots: list[str | None] = list(gpus[:workers]) if gpus else [None] * workers
    free = list(range(workers))
    lock = threading.Lock()
    running: dict[int, subprocess.Popen] = {}
    stopping = threading.Event()
    outcome: dict[str, list[Program]] = {"finished": [], "failed": [], "stopped": []}
    started = time.time()

    def one(index: int, program: Program) -> None:
        if stopping.is_set():
            outcome["stopped"].append(program)
            return
        with lock:
            slot = free.pop()
        env = program_env(cache_dir, slots[slot % len(slots)])
        write_record(program, script)
        try:
            rc = run_program(command(program, script), program.log_path, env=env,
                             on_start=lambda p: running.__setitem__(index, p))  # fmt: skip
        finally:
            running.pop(index, None)
            with lock:
                free.append(slot)
        with lock:
            kind = ("finished" if rc == 0 and _finished(program.run_dir)
                    else "stopped" if stopping.is_set() else "failed")  # fmt: skip
            outcome[kind].append(program)
            n = sum(len(v) for v in outcome.values())
            note = "" if kind != "failed" else f" (exit {rc}; see {program.log_path})"
            log(_progress_line(n, len(programs), program, kind, started) + note)

    def stop(signum, frame):
        stopping.set()
        if signum == signal.SIGINT:  # Ctrl-C reached the programs too (one process group)
            return
        for proc in list(running.values()):  # a second signal would stop them uncheckpointed
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if main_thread:
        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(one, i, p) for i, p in enumerate(programs)]
            for future in futures:
                while True:
                    try:
                        future.result(timeout=0.5)
                        break
                    except concurrent.futures.TimeoutError:
                        continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return outcome


# ------------------------------------------------------------------------------ Ray
class ProgramFailed(RuntimeError):
    """A program exited with a failure status that a retry may cure (not a usage error)."""


def _ray_program(argv: list[str], log_path: str, cache_dir: str | None = None) -> int:
    """A Ray task: run one program; a crash raises `ProgramFailed` so Ray retries it (the
    program resumes from its checkpoint), a usage error (exit 2) is returned as it is. Ray
    sets `CUDA_VISIBLE_DEVICES` to the task's GPUs."""
    rc = run_program(argv, log_path, env=program_env(cache_dir))
    if rc not in (0, 2):
        raise ProgramFailed(f"exit status {rc}; see {log_path}")
    return rc


def run_ray(
    programs: Sequence[Program],
    *,
    script: str,
    address: str | None = None,
    num_cpus: float | int = 1.0,
    num_gpus: float | int = 0.0,
    max_retries: int = 3,
    cache_dir: str | None = None,
    log: Callable[[str], None] = print,
    init_kwargs: dict[str, Any] | None = None,
) -> dict[str, list[Program]]:
    """Run `programs` as Ray tasks, one per program, each reserving `num_cpus` CPUs and
    `num_gpus` GPUs: `ray.init(address=address)` joins a cluster (`"auto"`, `ray://...`, or
    `$RAY_ADDRESS`; `None` starts a local one). A task whose worker dies, or whose program
    crashes, is retried up to `max_retries` times (the program resumes from its checkpoint).
    Output paths must be on a file system every node sees. Prints the sweep's progress."""
    ray = require("ray", "ray", "--launcher ray")
    if not ray.is_initialized():
        ray.init(address=address, **(init_kwargs or {}))
    task = ray.remote(_ray_program).options(
        num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
        retry_exceptions=[ProgramFailed],
    )  # fmt: skip
    started = time.time()
    refs = {}
    for program in programs:
        write_record(program, script)
        refs[task.remote(command(program, script), program.log_path, cache_dir)] = program
    outcome: dict[str, list[Program]] = {"finished": [], "failed": [], "stopped": []}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        program = refs[ready[0]]
        try:
            rc = ray.get(ready[0])
            kind = "finished" if rc == 0 and _finished(program.run_dir) else "failed"
        except Exception as error:  # retries exhausted
            kind, rc = "failed", f"{type(error).__name__}"
        outcome[kind].append(program)
        n = sum(len(v) for v in outcome.values())
        note = "" if kind != "failed" else f" ({rc}; see {program.log_path})"
        log(_progress_line(n, len(programs), program, kind, started) + note)
    return outcome


# ------------------------------------------------------------------------------ SLURM
def slurm_parameters(
    *,
    gpus: int = 1,
    cpus: int = 8,
    mem_gb: float | int = 64,
    time_min: int = 4 * 60,
    partition: str | None = None,
    account: str | None = None,
    parallelism: int = 256,
    name: str = "qam-sweep",
) -> dict[str, Any]:
    """submitit's `update_parameters` for one program per array task: GPUs, CPUs, memory and
    time per task, the partition and account, and how many array tasks run at once."""
    params: dict[str, Any] = dict(
        name=name, timeout_min=int(time_min), gpus_per_node=int(gpus), cpus_per_task=int(cpus),
        mem_gb=float(mem_gb), slurm_array_parallelism=int(parallelism), nodes=1,
        tasks_per_node=1,
    )  # fmt: skip
    if partition:
        params["slurm_partition"] = partition
    if account:
        params["slurm_account"] = account
    return params


class SlurmProgram:
    """A submitit callable running one program; on preemption or time-out submitit calls
    `checkpoint`, which stops the program (SIGTERM: it writes a checkpoint) and requeues the
    same call, which resumes it."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def __call__(self, argv: list[str], log_path: str, cache_dir: str | None = None) -> int:
        rc = run_program(argv, log_path, env=program_env(cache_dir),
                         on_start=lambda p: setattr(self, "proc", p))  # fmt: skip
        if rc not in (0, 2):
            raise ProgramFailed(f"exit status {rc}; see {log_path}")
        return rc

    def checkpoint(self, argv: list[str], log_path: str, cache_dir: str | None = None) -> Any:
        import submitit

        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        return submitit.helpers.DelayedSubmission(SlurmProgram(), argv, log_path, cache_dir)

    def __getstate__(self) -> dict[str, Any]:
        return {"proc": None}


def run_slurm(
    programs: Sequence[Program],
    *,
    script: str,
    folder: str,
    parameters: dict[str, Any],
    wait: bool = False,
    cache_dir: str | None = None,
    log: Callable[[str], None] = print,
    cluster: str | None = None,
) -> dict[str, list[Program]]:
    """Submit `programs` as one SLURM job array through submitit (logs under `folder`), with
    requeue on preemption and time-out (`SlurmProgram.checkpoint`). Returns at once unless
    `wait`; rerun the sweep to see what finished and to submit what did not."""
    submitit = require("submitit", "slurm", "--launcher slurm")
    if cluster is None and shutil.which("sbatch") is None:
        raise ValueError("--launcher slurm: no SLURM on this machine (sbatch is not on PATH); "
                         "run the sweep from a SLURM login node.")  # fmt: skip
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**parameters)
    for program in programs:
        write_record(program, script)
    jobs = executor.map_array(SlurmProgram(), [command(p, script) for p in programs],
                              [p.log_path for p in programs],
                              [cache_dir] * len(programs))  # fmt: skip
    log(f"submitted {len(jobs)} array tasks (job {jobs[0].job_id.split('_')[0] if jobs else '-'}); "
        f"logs in {folder}")  # fmt: skip
    outcome: dict[str, list[Program]] = {"finished": [], "failed": [], "stopped": []}
    if not wait:
        outcome["stopped"] = list(programs)
        return outcome
    started = time.time()
    for job, program in zip(jobs, programs, strict=True):
        try:
            job.result()
            kind = "finished" if _finished(program.run_dir) else "failed"
        except Exception:
            kind = "failed"
        outcome[kind].append(program)
        log(_progress_line(sum(len(v) for v in outcome.values()), len(programs), program, kind,
                           started))  # fmt: skip
    return outcome
