"""Launch a study of the paper (or a slice of one, or your own grid) and resume it.

    python examples/sweep.py STUDY [--methods ...] [--tasks ...] [--seeds ...]
        [--launcher local|ray|slurm] [--set KEY=VALUE ...] [--dataset-dir DIR] [--out DIR]
        [--dry-run]

STUDY is `main` (16 methods x 50 tasks x 12 seeds), `quality`, `sensitivity`, `rlpd`, or a
`.json` / `.toml` grid file (see `qam.studies.study_from_dict`). `--tasks` takes task names or
domains (`cube-double-play`: its 5 tasks). `--set KEY=VALUE` overrides a run setting
(`offline_steps`, `eval_episodes`, ... : the flags of examples/offline_to_online.py) or an agent
setting (`inv_temp`, `actor_hidden=8,8`, `inv_temp=x0.1` for a tenth of the preset's value) in
every run that has it; `--set preset=small` starts from the CPU demo's settings instead of the
paper's. Each run's directory is named by the hash of its full configuration: the same command
again skips what finished and resumes what was interrupted; a changed setting is a new run.
`--dry-run` lists the runs (status `new` or `resume`) and ends with the line `N runs`.

Methods of a study that are not registered yet (`qam.agents.AGENTS`) are left out with a note.
Report the results with `python examples/report.py OUT`.
"""

import argparse
import os
import sys
from typing import NoReturn


HERE = os.path.dirname(os.path.abspath(__file__))
MAIN_SCRIPT = os.path.join(HERE, "offline_to_online.py")


def _error(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _seeds_per_program(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1; got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sweep.py", description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )  # fmt: skip
    p.add_argument("study", metavar="STUDY", help="main, quality, sensitivity, rlpd or a grid file")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="agent names (default: all "
                   "registered methods of the study)")  # fmt: skip
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks or domains of the study")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="seeds (default: the "
                   "study's, 10001 20002 ... 120012)")  # fmt: skip
    p.add_argument("--launcher", choices=("local", "ray", "slurm"), default="local")
    p.add_argument(
        "--set",
        dest="sets",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a run or agent setting in every run",
    )
    p.add_argument("--dataset-dir", metavar="DIR", help="where the <dataset>.npz files are")
    p.add_argument("--out", metavar="DIR", help="the sweep's directory (default: "
                   "runs/sweeps/<study>)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="list the runs; start nothing")
    p.add_argument("--seeds-per-program", type=_seeds_per_program, default="auto",
                   metavar="N", help="seeds trained together in one (vmapped) program; auto: "
                   "all of a task's seeds when each program has a GPU, else 1")  # fmt: skip
    g = p.add_argument_group("local launcher")
    g.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="programs at once (default: one "
        "per GPU, each seeing only its own; without GPUs half the CPU cores)",
    )
    g = p.add_argument_group("ray launcher")
    g.add_argument("--ray-address", metavar="ADDR", default=os.environ.get("RAY_ADDRESS"),
                   help="cluster to join (auto, ray://host:10001; default $RAY_ADDRESS, or "
                   "a local cluster)")  # fmt: skip
    g.add_argument("--cpus-per-run", type=float, default=1.0, metavar="N")
    g.add_argument(
        "--gpus-per-run",
        type=float,
        default=None,
        metavar="N",
        help="GPUs per program (default 1 on a cluster with GPUs, else 0)",
    )
    g.add_argument(
        "--max-retries",
        type=int,
        default=3,
        metavar="N",
        help="retries of a program whose worker died or that crashed",
    )
    g = p.add_argument_group("slurm launcher (submitit)")
    g.add_argument("--slurm-partition", metavar="NAME")
    g.add_argument("--slurm-account", metavar="NAME")
    g.add_argument("--slurm-gpus", type=int, default=1, metavar="N", help="GPUs per program")
    g.add_argument("--slurm-cpus", type=int, default=8, metavar="N", help="CPUs per program")
    g.add_argument("--slurm-mem", type=float, default=64, metavar="GB", help="memory per program")
    g.add_argument(
        "--slurm-time",
        type=int,
        default=240,
        metavar="MIN",
        help="time limit per job (a program that runs out is requeued and resumes)",
    )
    g.add_argument(
        "--slurm-parallelism",
        type=int,
        default=256,
        metavar="N",
        help="array tasks running at once",
    )
    g.add_argument("--slurm-wait", action="store_true", help="wait for the array to finish")
    p.add_argument(
        "--no-compile-cache",
        dest="compile_cache",
        action="store_false",
        help="no shared JAX compilation cache (default: OUT/.jax-cache)",
    )
    p.add_argument("--script", default=MAIN_SCRIPT, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qam import studies

    try:
        study = studies.load_study(args.study)
        extra = studies.parse_set(args.sets)
        main_job = studies.load_main_job(args.script)
        registered = set(main_job.AGENTS)
        if args.methods:
            missing = [m for m in args.methods if m not in registered]
            if missing:
                raise ValueError(f"`--methods`: {', '.join(missing)} not registered yet "
                                 f"(registered: {', '.join(main_job.AGENTS)}).")  # fmt: skip
        study = studies.select(study, methods=args.methods, tasks=args.tasks, seeds=args.seeds)
        skipped = [m for m in study.methods if m not in registered]
        if skipped:
            kept = tuple(m for m in study.methods if m in registered)
            print(f"note: {len(kept)} of the study's {len(study.methods)} methods are "
                  f"registered; left out: {', '.join(skipped)}", file=sys.stderr)  # fmt: skip
            if not kept:
                raise ValueError(f"none of study {study.name!r}'s methods is registered yet.")
            import dataclasses

            study = dataclasses.replace(study, methods=kept)
        specs = studies.expand(study, extra=extra)
        _check_keys(specs, extra, main_job, studies)
        out = args.out or os.path.join("runs", "sweeps", study.name)
        per_program = args.seeds_per_program
        if per_program == "auto":
            gpus = {"local": bool(studies.local_gpus()), "slurm": args.slurm_gpus > 0,
                    "ray": bool(args.gpus_per_run)}[args.launcher]  # fmt: skip
            per_program = len(study.seeds) if gpus else 1
        programs, counts = studies.plan(specs, out=out, dataset_dir=args.dataset_dir,
                                        seeds_per_program=per_program, main=main_job)  # fmt: skip
    except ValueError as error:
        _error(str(error))
    todo = sum(len(p.spec.seeds) for p in programs)
    header = (
        f"{study.name}: {counts['runs']} runs in {out}, {counts['finished']} finished, "
        f"{todo} to run in {len(programs)} program{'s' if len(programs) != 1 else ''}"
    )
    if counts["duplicates"]:
        header += f" ({counts['duplicates']} duplicate configurations merged)"
    print(header, flush=True)
    if args.dry_run:
        for program in programs:
            print(program.describe())
        print(f"{todo} runs")
        return 0
    if not programs:
        print("Nothing to run: every run is finished.")
        return 0
    cache = os.path.join(out, ".jax-cache") if args.compile_cache else None
    try:
        if args.launcher == "local":
            outcome = studies.run_local(programs, script=args.script, workers=args.workers,
                                        cache_dir=cache)  # fmt: skip
        elif args.launcher == "ray":
            gpus = args.gpus_per_run if args.gpus_per_run is not None else 0.0
            outcome = studies.run_ray(programs, script=args.script, address=args.ray_address,
                                      num_cpus=args.cpus_per_run, num_gpus=gpus,
                                      max_retries=args.max_retries, cache_dir=cache)  # fmt: skip
        else:
            params = studies.slurm_parameters(
                gpus=args.slurm_gpus, cpus=args.slurm_cpus, mem_gb=args.slurm_mem,
                time_min=args.slurm_time, partition=args.slurm_partition,
                account=args.slurm_account, parallelism=args.slurm_parallelism,
            )  # fmt: skip
            outcome = studies.run_slurm(programs, script=args.script,
                                        folder=os.path.join(out, "slurm"), parameters=params,
                                        wait=args.slurm_wait, cache_dir=cache)  # fmt: skip
    except (ImportError, ValueError) as error:
        _error(str(error))
    done, failed, stopped = (len(outcome[k]) for k in ("finished", "failed", "stopped"))
    if args.launcher == "slurm" and not args.slurm_wait:
        print(f"{stopped} programs submitted. When the array has ended, run the same command "
              "again: it skips what finished and resubmits the rest.")  # fmt: skip
        return 0
    print(f"{done} finished, {failed} failed, {stopped} not finished. "
          + ("Run the same command again to resume." if failed or stopped else
             f"Report: python examples/report.py {out}"))  # fmt: skip
    if failed:
        return 1
    return 130 if stopped and args.launcher != "slurm" else 0


def _check_keys(specs, extra, main_job, studies) -> None:
    """Refuse a `--set` key that no run of the sweep has."""
    keys = {k for k in extra if k != "preset"}
    if not keys:
        return
    applied: set[str] = set()
    for spec in {(s.method, s.task, s.preset, s.overrides, s.label): s for s in specs}.values():
        applied |= studies.resolve(spec, main=main_job).applied
        if keys <= applied:
            return
    bad = sorted(keys - applied)
    raise ValueError(f"`--set`: no run of this sweep has the setting{'s' if len(bad) > 1 else ''} "
                     f"{', '.join(bad)} (run settings are the flags of offline_to_online.py; "
                     "agent settings are the fields of each method's config).")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
