"""Train a QAM-family agent on an OGBench task, offline then online.

With no arguments it runs a small embedded default that finishes on a 2-core CPU in minutes:
it generates (once, then reuses) a small cube-single dataset with OGBench's scripted oracles
(with a task mixture: episodes start at task 1's cube and a quarter of the placements go to
task 1's goal), trains a small QAM-EDIT offline then online, evaluates it and the
behaviour-cloning flow, and writes logs (CSV, JSONL), checkpoints, a learning-curve PNG and a
summary to `--out`.

Every paper setting is one flag away:

    python examples/offline_to_online.py --env cube-triple-play-singletask-task2-v0 \\
        --agent qam-edit --preset paper --seeds 0 1 2 3

Rerunning with the same `--out` resumes from the last checkpoint.
"""

import argparse
import dataclasses
import json
import os
import signal
import sys

import jax
import tqdm

from qam import data as qd
from qam.agents import QAMConfig
from qam.logging import atomic_write_text
from qam.train import AGENTS, RunConfig, Trainer, TrainingInterrupted, latest_checkpoint_step


DEFAULT_ENV = "cube-single-play-singletask-task1-v0"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "qam", "datasets")

# The CPU demo: small networks, a short run; the paper's values are `--preset paper`.
SMALL = dict(
    actor_hidden=(256, 256), critic_hidden=(256, 256), num_qs=4, flow_steps=10,
)  # fmt: skip
SMALL_RUN = dict(
    offline_steps=9_000, online_steps=3_000, eval_episodes=20, eval_interval=3_000,
    log_interval=500, batch_size=128, start_training=250, checkpoint_interval=3_000,
    max_episode_steps=None,
)  # fmt: skip
PAPER_RUN = dict(
    offline_steps=1_000_000, online_steps=500_000, eval_episodes=50, eval_interval=50_000,
    log_interval=1_000, batch_size=256, start_training=5_000, checkpoint_interval=50_000,
)  # fmt: skip
# The demo's dataset (not OGBench's; see `qam.data.generate_dataset`'s task mixture): play data
# whose episodes start from task 1's initial cube and whose oracle carries the cube to task 1's
# goal a quarter of the time, elsewhere otherwise. Behaviour cloning reproduces that mixture;
# the critic steers QAM toward the rewarded placement.
DEMO_DATA = dict(
    env="cube-single-v0", dataset_type="play", episodes=100, max_episode_steps=200, task=1,
    task_goal_fraction=0.25, task_start_fraction=1.0, seed=0,
)  # fmt: skip


def demo_dataset_dir(cache: str | None = None) -> str:
    """The demo dataset's own directory in the cache, named by its settings, so a cached file
    made with other settings (or by an older version) is never mistaken for it."""
    d = DEMO_DATA
    name = (f"{d['env'].removesuffix('-v0')}-{d['dataset_type']}-task{d['task']}"
            f"-goal{d['task_goal_fraction']}-start{d['task_start_fraction']}-ep{d['episodes']}"
            f"x{d['max_episode_steps']}-seed{d['seed']}")  # fmt: skip
    return os.path.join(DEFAULT_CACHE if cache is None else cache, name)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--env", default=DEFAULT_ENV, help=f"OGBench single-task name (default: {DEFAULT_ENV})."
    )
    p.add_argument(
        "--agent",
        default="qam-edit",
        choices=sorted(AGENTS),
        help="method to train (default: qam-edit).",
    )
    p.add_argument("--preset", default="small", choices=["small", "paper"],
                   help="`paper`: the paper's full configuration for the env's domain (4x512 "
                        "networks, 10 critics, 1M+500K steps); `small`: a CPU-sized run "
                        "(default).")  # fmt: skip
    p.add_argument("--dataset-dir", default=None,
                   help="where <dataset>.npz lives (default: $QAM_DATASET_DIR, "
                        "$OGBENCH_DATASET_DIR, ~/.ogbench/data; for the embedded default a "
                        f"generated dataset in {DEFAULT_CACHE}).")  # fmt: skip
    p.add_argument("--offline-steps", type=int, help="offline gradient steps.")
    p.add_argument("--online-steps", type=int, help="online environment steps.")
    p.add_argument("--eval-episodes", type=int, help="evaluation episodes per seed.")
    p.add_argument("--eval-interval", type=int, help="steps between evaluations.")
    p.add_argument(
        "--log-interval",
        type=int,
        help="steps between log rows (= offline updates per jitted call).",
    )
    p.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints.")
    p.add_argument("--batch-size", type=int, help="batch size.")
    p.add_argument("--start-training", type=int, help="online steps before updates start.")
    p.add_argument("--utd", type=int, default=1, help="updates per online env step.")
    p.add_argument("--buffer-size", type=int, default=None,
                   help="cap on the replay buffer's rows (default: dataset + online steps, so no "
                        "offline row is evicted; with a cap, online rows overwrite the oldest "
                        "rows, offline ones first).")  # fmt: skip
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="seeds trained together in one program (vmapped).",
    )
    p.add_argument("--out", default=None, help="output directory (default: runs/<env>/<agent>).")
    p.add_argument(
        "--sparse",
        choices=["auto", "yes", "no"],
        default="auto",
        help="the paper's sparse reward transform (auto: on for scene and puzzle).",
    )
    p.add_argument(
        "--max-episode-steps",
        type=int,
        default=None,
        help="cap episode length (online and evaluation).",
    )
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard.")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases.")
    p.add_argument("--no-progress", action="store_true", help="no progress bar.")
    hyper = p.add_argument_group("agent hyperparameters (override the preset)")
    for field in dataclasses.fields(QAMConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in (bool, "bool"):
            hyper.add_argument(flag, type=_parse_bool, metavar="{true,false}")
        elif "tuple" in str(field.type):
            hyper.add_argument(flag, type=int, nargs="+")
        elif "None" in str(field.type):
            hyper.add_argument(flag, type=float)
        else:
            hyper.add_argument(flag, type=field.type)
    return p


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_configs(args: argparse.Namespace) -> tuple[RunConfig, QAMConfig]:
    """The run and agent configurations from parsed arguments; raises `ValueError` with a
    clear message for anything impossible, before any work starts."""
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(QAMConfig)
        if getattr(args, f.name, None) is not None
    }
    for name in ("actor_hidden", "critic_hidden"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    if args.preset == "paper":
        agent_config = QAMConfig.paper(args.agent, args.env, **overrides)
    else:
        variant = {"qam": {}, "qam-fql": dict(fql_alpha=30.0), "qam-edit": dict(edit_scale=0.1)}
        small = dict(SMALL, inv_temp=1.0, **variant[args.agent])
        small.update(overrides)
        agent_config = QAMConfig(**small)
    run_defaults = PAPER_RUN if args.preset == "paper" else SMALL_RUN
    run_kwargs = dict(run_defaults)
    for name, value in [
        ("offline_steps", args.offline_steps), ("online_steps", args.online_steps),
        ("eval_episodes", args.eval_episodes), ("eval_interval", args.eval_interval),
        ("log_interval", args.log_interval), ("checkpoint_interval", args.checkpoint_interval),
        ("batch_size", args.batch_size), ("start_training", args.start_training),
        ("max_episode_steps", args.max_episode_steps),
    ]:  # fmt: skip
        if value is not None:
            run_kwargs[name] = value
    out = args.out or os.path.join("runs", args.env, args.agent)
    sparse = {"auto": None, "yes": True, "no": False}[args.sparse]
    run = RunConfig(
        env_name=args.env, agent=args.agent, seeds=tuple(args.seeds), out_dir=out,
        dataset_dir=args.dataset_dir, utd_ratio=args.utd, buffer_size=args.buffer_size,
        sparse=sparse, **run_kwargs,
    )  # fmt: skip
    return run, agent_config


def ensure_demo_dataset(args: argparse.Namespace) -> str | None:
    """For the embedded default (no `--dataset-dir`, default env, no official file), generate
    the demo dataset once into the cache and reuse it."""
    if args.dataset_dir is not None or args.env != DEFAULT_ENV:
        return args.dataset_dir
    parsed = qd.parse_env_name(args.env)
    official_dir, _ = qd.resolve_dataset_dir(None)
    if os.path.exists(os.path.join(official_dir, parsed.dataset_name + ".npz")):
        return None
    directory = demo_dataset_dir()
    if not os.path.exists(os.path.join(directory, parsed.dataset_name + ".npz")):
        d = DEMO_DATA
        print(f"Generating the demo dataset ({d['episodes']} + {d['episodes'] // 10} episodes "
              f"of {d['max_episode_steps']} steps, {parsed.dataset_name}.npz with task "
              f"{d['task']}'s start and a {d['task_goal_fraction']:.0%} share of its goal) "
              f"into {directory} (once; reused afterwards) ...")  # fmt: skip
        qd.generate_dataset(
            d["env"], d["dataset_type"], num_episodes=d["episodes"], out_dir=directory,
            seed=d["seed"], max_episode_steps=d["max_episode_steps"], task=d["task"],
            task_goal_fraction=d["task_goal_fraction"],
            task_start_fraction=d["task_start_fraction"], workers=min(os.cpu_count() or 1, 8),
        )  # fmt: skip
    return directory


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    try:
        dataset_dir = ensure_demo_dataset(args)
        args.dataset_dir = dataset_dir
        run, agent_config = build_configs(args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    from qam import logging as qlog, report as qreport

    resume_step = latest_checkpoint_step(run.out_dir)
    foreign = _foreign_files(run.out_dir) if resume_step is None else []
    if foreign:
        sys.exit(
            f"error: --out {run.out_dir} holds files that are not this job's run files "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}) and no checkpoint "
            "to resume from; a fresh run would overwrite its logs there. Choose another --out."
        )
    config_record = {"run": dataclasses.asdict(run), "agent": dataclasses.asdict(agent_config),
                     "versions": qlog.package_versions()}  # fmt: skip
    bar = None
    shown = {}  # the bar's postfix: each value stays until it is updated
    last = [resume_step or 0]

    def progress(step, info):
        if bar is not None:
            shown.update(_postfix(info))
            bar.set_postfix(shown, refresh=False)
            bar.update(step - last[0])
        last[0] = step

    try:  # loads and checks the dataset before anything is written to `--out`
        trainer = Trainer(run, agent_config, log=lambda *a: None, progress=progress)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {_cli_wording(str(error))}")
    with qlog.Logger(run.out_dir, resume_step=resume_step, tensorboard=args.tensorboard,
                     wandb=args.wandb, config=config_record) as logger:  # fmt: skip
        trainer.log = lambda step, metrics, prefix: logger.log(step, metrics, prefix=prefix)
        _write_json(os.path.join(run.out_dir, "dataset.json"), trainer.data.info.to_dict())
        _write_json(os.path.join(run.out_dir, "config.json"), config_record)
        if resume_step:
            print(f"Resuming from step {resume_step} in {run.out_dir}")
        total = run.offline_steps + run.online_steps
        # Off a terminal (CI logs), one line a minute.
        bar = tqdm.tqdm(total=total, initial=resume_step or 0, disable=args.no_progress,
                        unit="step", unit_scale=total >= 100_000, dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 60.0)  # fmt: skip

        def stop(signum, frame):  # the first signal stops cleanly, a second one at once
            if trainer.stop_requested:
                raise KeyboardInterrupt
            trainer.request_stop()

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            result = trainer.train()
        except KeyboardInterrupt:
            bar.close()
            saved = latest_checkpoint_step(run.out_dir)
            sys.exit(f"\nInterrupted twice: stopped without a new checkpoint; the last one is "
                     f"at step {saved or 0:,}. Run the same command again to resume.")  # fmt: skip
        except TrainingInterrupted as interrupted:
            bar.close()
            print(f"\nInterrupted: checkpoint written at step {interrupted.step:,} in "
                  f"{run.out_dir}. Run the same command again to resume.",
                  file=sys.stderr)  # fmt: skip
            sys.exit(130)
        except (FloatingPointError, ValueError) as error:
            sys.exit(f"error: {_cli_wording(str(error))}")
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    plot = os.path.join(run.out_dir, "learning_curve.png")
    qreport.plot_learning_curve(os.path.join(run.out_dir, "eval.csv"), plot, task=run.env_name,
                                method=run.agent, offline_steps=run.offline_steps)  # fmt: skip
    text = qreport.summary(
        run.out_dir, task=run.env_name, method=run.agent, seeds=list(run.seeds),
        evals=result["evals"], bc_success=result["bc"], offline_steps=run.offline_steps,
        online_steps=run.online_steps, wall_time=result["wall_time_s"],
    )  # fmt: skip
    print(text)
    return result


# What a run writes into `--out`; a fresh run may start over a directory holding only these
# (an earlier attempt that died before its first checkpoint).
RUN_FILES = {
    "train.csv", "train.jsonl", "eval.csv", "eval.jsonl", "config.json", "dataset.json",
    "learning_curve.png", "summary.txt", "summary.json", "checkpoints", "tensorboard", "wandb",
    "wandb_run_id.txt",
}  # fmt: skip


def _foreign_files(out_dir: str) -> list[str]:
    if not os.path.isdir(out_dir):
        return []
    return sorted(name for name in os.listdir(out_dir) if name not in RUN_FILES)


def _cli_wording(message: str) -> str:
    """Library messages name keyword arguments (`dataset_dir=...`); say the flag instead."""
    return message.replace("the `dataset_dir` argument", "`--dataset-dir`")


def _postfix(info: dict) -> dict:
    """The progress bar's postfix: the mean success (in percent) and critic loss over seeds."""
    out = {}
    if "success" in info:
        out["success"] = f"{100 * float(jax.numpy.mean(info['success'])):.1f}%"
    if "critic_loss" in info:
        out["critic"] = f"{float(jax.numpy.mean(info['critic_loss'])):.4g}"
    return out


def _write_json(path: str, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
