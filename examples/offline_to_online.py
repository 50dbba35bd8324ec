"""Train an agent of `qam.agents.AGENTS` on an OGBench task, offline then online.

With no arguments it runs a small embedded default that finishes on a 2-core CPU in minutes:
it generates (once, then reuses) a cube-single play dataset in OGBench's format with OGBench's
scripted oracles (300 + 30 episodes of 200 steps), trains a small QAM-EDIT offline then online
with the dense cube reward v7 (`qam.data.dense_reward_v7`), evaluates it and the
behaviour-cloning flow, and writes logs (CSV, JSONL), checkpoints, a learning-curve PNG and a
summary to `--out`. `--demo-data task-mixture` trains on the earlier demo's dataset instead
(episodes start at task 1's cube and a quarter of the placements go to task 1's goal; OGBench's
own reward).

`--agent NAME` picks the method, and that method's hyperparameters become flags; `--preset`
sets the defaults of every flag (`--help` shows the preset's values). Every paper setting is
one flag away:

    python examples/offline_to_online.py --env cube-triple-play-singletask-task2-v0 \\
        --agent qam-edit --preset paper --seeds 0 1 2 3

An agent may bring its own training regime (`Agent.run_defaults`), applied as the defaults of
the run flags: `--agent rlpd` trains online only (`--offline-steps 0`), on batches half offline
and half online (`--balanced-sampling`), after `--start-training` uniform random steps
(`--random-warmup`); any of those flags given explicitly wins.

Rerunning with the same `--out` resumes from the last checkpoint.
"""

import argparse
import dataclasses
import json
import os
import signal
import sys
from typing import Annotated, Any, Literal, NoReturn

import jax
import tqdm
import tyro

from qam import data as qd
from qam.agents import METHOD_PRESETS
from qam.data.generate import choice_flag
from qam.logging import atomic_write_text
from qam.train import (
    AGENTS,
    RunConfig,
    RunDirectoryBusy,
    Trainer,
    TrainingInterrupted,
    latest_checkpoint_step,
)


DEFAULT_ENV = "cube-single-play-singletask-task1-v0"
DEFAULT_AGENT = "qam-edit"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "qam", "datasets")
PROG = "offline_to_online.py"
# tyro prints the description unwrapped, starting a new line where one starts with a non-letter.
DESCRIPTION = (
    "Train an agent of qam.agents.AGENTS on an OGBench task, offline then online.\n"
    "(No arguments: the CPU demo. The same --out again: resume from its last checkpoint.)\n"
    "--agent NAME makes that method's hyperparameters flags; --preset sets every default."
)

# The CPU demo's agent settings: small networks (each applied where the agent's config has the
# field), and each method's tuned values for the paper's nearest domain, cube-double. The QAM
# family takes that domain's inv_temp (1.0) but keeps its variant (the paper's QAM-EDIT and
# QAM-FQL runs on cube-double are plain QAM). The paper's are `--preset paper`, i.e.
# `AGENTS[name].paper_config(env)`.
SMALL = dict(actor_hidden=(256, 256), critic_hidden=(256, 256), num_qs=4, flow_steps=10)
DEMO_DOMAIN = "cube-double-play"
# The paper preset's run; `Job`'s defaults are the small preset's.
PAPER_RUN = dict(
    offline_steps=1_000_000, online_steps=500_000, eval_episodes=50, eval_interval=50_000,
    log_interval=1_000, batch_size=256, start_training=5_000, checkpoint_interval=50_000,
)  # fmt: skip

# The embedded default's datasets, generated once into the cache (`--demo-data`):
# - `play`: OGBench's own play data (the format and oracles of `cube-single-play-v0`, a
#   smaller number of episodes), trained on with the dense reward v7 (see `DEMO_DENSE`);
# - `task-mixture` (not OGBench's; see `qam.data.generate_dataset`'s task mixture): play data
#   whose episodes start from task 1's initial cube and whose oracle carries the cube to task
#   1's goal a quarter of the time, elsewhere otherwise. Behaviour cloning reproduces that
#   mixture; the critic steers QAM toward the rewarded placement.
DEMO_DATASETS: dict[str, dict[str, Any]] = {
    "play": dict(
        env="cube-single-v0", dataset_type="play", episodes=300, max_episode_steps=200,
        task=None, task_goal_fraction=0.0, task_start_fraction=0.0, seed=0,
    ),
    "task-mixture": dict(
        env="cube-single-v0", dataset_type="play", episodes=100, max_episode_steps=200, task=1,
        task_goal_fraction=0.25, task_start_fraction=1.0, seed=0,
    ),
}  # fmt: skip
# `--dense-reward-version auto`: the reward each demo dataset is trained with when it is used.
DEMO_DENSE = {"play": "v7", "task-mixture": "none"}


def demo_dataset_dir(cache: str | None = None, kind: str = "play") -> str:
    """The demo dataset's own directory in the cache, named by its settings, so a cached file
    made with other settings (or by an older version) is never mistaken for it."""
    d = DEMO_DATASETS[kind]
    mixture = (
        "" if d["task"] is None
        else f"-task{d['task']}-goal{d['task_goal_fraction']}-start{d['task_start_fraction']}"
    )  # fmt: skip
    name = (f"{d['env'].removesuffix('-v0')}-{d['dataset_type']}{mixture}"
            f"-ep{d['episodes']}x{d['max_episode_steps']}-seed{d['seed']}")  # fmt: skip
    return os.path.join(DEFAULT_CACHE if cache is None else cache, name)


@dataclasses.dataclass(frozen=True)
class Job:
    """The run. The defaults shown are the preset's: `small` (the CPU demo) unless `--preset
    paper` is given. Without `--dataset-dir` or an official file, the default env trains on the
    demo dataset (`--demo-data`), generated once into ~/.cache/qam/datasets."""

    env: str = DEFAULT_ENV  # OGBench single-task name
    agent: Annotated[str, choice_flag(tuple(AGENTS))] = DEFAULT_AGENT  # the method to train
    # paper: the paper's values for the env's domain (4x512 nets, 1M+500K steps); small: a CPU run
    preset: Literal["small", "paper"] = "small"
    # where <dataset>.npz lives; None: $QAM_DATASET_DIR, $OGBENCH_DATASET_DIR or ~/.ogbench/data
    dataset_dir: Annotated[str | None, tyro.conf.arg(metavar="DIR")] = None
    out: Annotated[str | None, tyro.conf.arg(metavar="DIR")] = None  # None: runs/<env>/<agent>
    seeds: tuple[int, ...] = (0,)  # seeds trained together in one program (vmapped)
    # the paper's sparse reward transform, r <- -1[r != 0] (auto: on for scene and puzzle)
    sparse: Literal["auto", "yes", "no"] = "auto"
    # the embedded default's generated dataset (default env, no --dataset-dir or --shard-dir):
    # OGBench-format play data, or the task mixture
    demo_data: Literal["play", "task-mixture"] = "play"
    # dense cube reward (qam.data.dense_reward_v1..v9), alike offline, online and in evaluation;
    # auto: the embedded default's (v7 with --demo-data play), none for any other run
    dense_reward_version: Literal[
        "auto", "none", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9"
    ] = "auto"
    cube_success_threshold: float = 0.04  # metres; success check and dense rewards (cube tasks)
    offline_steps: int = 9_000  # offline gradient steps
    online_steps: int = 3_000  # online environment steps
    eval_episodes: int = 20  # evaluation episodes per seed
    eval_interval: int = 3_000  # steps between evaluations
    log_interval: int = 500  # steps between log rows (= offline updates per jitted call)
    checkpoint_interval: int = 3_000  # steps between checkpoints
    batch_size: int = 128  # batch size of every update
    start_training: int = 250  # online steps before updates start
    utd: int = 1  # updates per online environment step
    # replay buffer rows (None: dataset + online steps, online steps alone with balanced
    # sampling; a cap overwrites the oldest rows first)
    buffer_size: int | None = None
    max_episode_steps: int | None = None  # cap on episode length (None: the environment's)
    # half of every online batch from the dataset, half from a buffer of online rows only
    balanced_sampling: bool = False
    random_warmup: bool = False  # uniform random single actions before --start-training
    # a directory of dataset shards (*.npz, *-val.npz ignored; e.g. the 100M datasets), read
    # instead of --dataset-dir's file, one shard on the device at a time
    shard_dir: Annotated[str | None, tyro.conf.arg(metavar="DIR")] = None
    dataset_replace_interval: int = 1000  # steps per shard before the next one (--shard-dir)
    # train on the leading fraction of the data: of the dataset (each shard), and of the shards
    dataset_proportion: float = 1.0
    multi_device: bool = True  # spread the seeds over the local devices when there are several
    tensorboard: bool = False  # also log to TensorBoard
    wandb: bool = False  # also log to Weights & Biases
    progress: bool = True  # show a progress bar (steps/s, latest success rate, critic loss)


class UsageError(SystemExit):
    """Bad input: `error: <message>` on stderr and exit status 2 (argparse's and tyro's)."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")
        self.code = 2


def _usage_error(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise UsageError(message)


class _PreParseFailed(Exception):
    pass


class _PreParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # leave malformed input to tyro's message
        raise _PreParseFailed


def _preparse(argv: list[str]) -> tuple[str, str, str]:
    """`--agent`, `--preset` and `--env` as given (the defaults where absent or malformed)."""
    p = _PreParser(add_help=False, allow_abbrev=False)
    p.add_argument("--agent", default=DEFAULT_AGENT)
    p.add_argument("--preset", default="small")
    p.add_argument("--env", default=DEFAULT_ENV)
    try:
        known, _ = p.parse_known_args(argv)
    except _PreParseFailed:
        return DEFAULT_AGENT, "small", DEFAULT_ENV
    return known.agent, known.preset, known.env


# `RunConfig` fields an agent's `run_defaults` may name whose `Job` flag has another name.
RUN_TO_JOB = {"utd_ratio": "utd"}


def agent_job(job: Job, agent_name: str) -> Job:
    """`job` with the run settings the agent's training regime needs (`Agent.run_defaults`,
    e.g. RLPD: no offline phase, balanced batches, random warm-up); flags still override."""
    regime = AGENTS[agent_name].run_defaults
    return dataclasses.replace(job, **{RUN_TO_JOB.get(k, k): v for k, v in regime.items()})


def preset_defaults(agent_name: str, preset: str, env: str) -> tuple[Job, Any]:
    """The job and agent config `--preset` starts from (with the agent's `run_defaults` on
    top); raises `ValueError` where the paper has no configuration for `env`'s domain."""
    agent = AGENTS[agent_name]
    if preset == "paper":
        job = dataclasses.replace(Job(), preset="paper", **PAPER_RUN)
        return agent_job(job, agent_name), agent.paper_config(env)
    fields = {f.name for f in dataclasses.fields(agent.config_class)}
    small = {k: v for k, v in SMALL.items() if k in fields}
    if "variant" in fields:  # the QAM family
        small["inv_temp"] = METHOD_PRESETS["qam"][DEMO_DOMAIN]["inv_temp"]
    else:
        small.update(METHOD_PRESETS.get(agent_name, {}).get(DEMO_DOMAIN, {}))
    return agent_job(Job(), agent_name), agent.config(**small)


def _init_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _unchecked(cls: type) -> type:
    """`cls` with its `__post_init__` checks switched off, for tyro to fill in; `build_configs`
    then builds the real `cls`, so a bad value is one `error:` line rather than tyro's box."""
    namespace = dict(__post_init__=lambda self: None, __doc__=cls.__doc__,
                     __module__=cls.__module__, __qualname__=cls.__qualname__)  # fmt: skip
    return type(cls.__name__, (cls,), namespace)


def parse_args(argv: list[str] | None = None) -> tuple[Job, Any]:
    """The job and the agent's hyperparameters (not yet checked: see `build_configs`).

    `--agent`, `--preset` and `--env` are read first: the agent's config class gives the
    hyperparameter flags, and the preset (for the paper's, the env's domain) their defaults.
    An unknown flag or a malformed value is tyro's usage error; an unknown agent or a domain
    without paper settings is one `error:` line; both exit with status 2.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    agent_name, preset, env = _preparse(argv)
    if agent_name not in AGENTS:
        _usage_error(f"--agent {agent_name!r} is not a registered agent; choose one of "
                     f"{', '.join(AGENTS)}.")  # fmt: skip
    try:  # tyro reports an unknown preset itself
        job, config = preset_defaults(agent_name, preset if preset == "paper" else "small", env)
    except ValueError as error:  # no paper settings for the env's domain
        _usage_error(f"--preset paper: {error}")
    config_class = AGENTS[agent_name].config_class
    clash = {f.name for f in dataclasses.fields(Job)} & _init_fields(config_class)
    if clash:  # a programming error: one flag would mean two things
        raise RuntimeError(f"{config_class.__name__}'s fields {sorted(clash)} clash with Job's")
    hyper_class = _unchecked(config_class)
    hyper = hyper_class(**{name: getattr(config, name) for name in _init_fields(config_class)})
    about = (
        f"{agent_name}'s hyperparameters ({config_class.__name__}), defaults: preset {job.preset}"
    )
    hyper_field = Annotated[hyper_class, tyro.conf.arg(name=agent_name, help=about)]
    command = dataclasses.make_dataclass("Command", [("run", Job), ("hyper", hyper_field)])
    parsed = tyro.cli(command, args=argv, prog=PROG, description=DESCRIPTION,
                      default=command(job, hyper), config=(tyro.conf.OmitArgPrefixes,),
                      use_underscores=False)  # fmt: skip
    return parsed.run, parsed.hyper


def build_configs(job: Job, hyper: Any) -> tuple[RunConfig, Any]:
    """The run and agent configurations of a parsed command line; raises `ValueError` with a
    clear message for anything impossible, before any work starts."""
    agent = AGENTS[job.agent]
    agent_config = agent.config_class(
        **{name: getattr(hyper, name) for name in _init_fields(agent.config_class)}
    )
    sparse = {"auto": None, "yes": True, "no": False}[job.sparse]
    dense = job.dense_reward_version
    if dense == "auto":
        dense = DEMO_DENSE[job.demo_data] if is_embedded_default(job) else "none"
    run = RunConfig(
        env_name=job.env, agent=job.agent, seeds=tuple(job.seeds),
        out_dir=job.out or os.path.join("runs", job.env, job.agent), dataset_dir=job.dataset_dir,
        offline_steps=job.offline_steps, online_steps=job.online_steps,
        eval_episodes=job.eval_episodes, eval_interval=job.eval_interval,
        log_interval=job.log_interval, checkpoint_interval=job.checkpoint_interval,
        batch_size=job.batch_size, start_training=job.start_training, utd_ratio=job.utd,
        buffer_size=job.buffer_size, sparse=sparse, max_episode_steps=job.max_episode_steps,
        balanced_sampling=job.balanced_sampling, random_warmup=job.random_warmup,
        dense_reward_version=None if dense == "none" else dense,
        cube_success_threshold=job.cube_success_threshold, shard_dir=job.shard_dir,
        dataset_replace_interval=job.dataset_replace_interval,
        dataset_proportion=job.dataset_proportion, multi_device=job.multi_device,
    )  # fmt: skip
    return run, agent_config


def is_embedded_default(job: Job) -> bool:
    """Whether `job` trains the embedded default's task without naming its data (no
    `--dataset-dir` or `--shard-dir`): then the demo dataset (`--demo-data`) is used, unless an
    official file of the task is found, and `--dense-reward-version auto` is the demo's."""
    return job.dataset_dir is None and job.env == DEFAULT_ENV and job.shard_dir is None


def ensure_demo_dataset(job: Job) -> str | None:
    """For the embedded default (no `--dataset-dir`, default env, no official file), generate
    the demo dataset once into the cache and reuse it; the dataset directory to use."""
    if not is_embedded_default(job):
        return job.dataset_dir
    parsed = qd.parse_env_name(job.env)
    official_dir, _ = qd.resolve_dataset_dir(None)
    if os.path.exists(os.path.join(official_dir, parsed.dataset_name + ".npz")):
        return None
    directory = demo_dataset_dir(kind=job.demo_data)
    if not os.path.exists(os.path.join(directory, parsed.dataset_name + ".npz")):
        d = DEMO_DATASETS[job.demo_data]
        what = (
            "OGBench's play format" if d["task"] is None
            else f"task {d['task']}'s start and a {d['task_goal_fraction']:.0%} share of its goal"
        )  # fmt: skip
        print(f"Generating the demo dataset ({d['episodes']} + {d['episodes'] // 10} episodes "
              f"of {d['max_episode_steps']} steps, {parsed.dataset_name}.npz, {what}) into "
              f"{directory} (once; reused afterwards) ...")  # fmt: skip
        qd.generate_dataset(
            d["env"], d["dataset_type"], num_episodes=d["episodes"], out_dir=directory,
            seed=d["seed"], max_episode_steps=d["max_episode_steps"], task=d["task"],
            task_goal_fraction=d["task_goal_fraction"],
            task_start_fraction=d["task_start_fraction"], workers=min(os.cpu_count() or 1, 8),
        )  # fmt: skip
    return directory


def main(argv: list[str] | None = None) -> dict:
    """Run the command line `argv` (default: `sys.argv[1:]`); the trainer's result. Bad input
    exits with status 2 before any work starts (see `parse_args`; `build_configs`' checks and
    a missing dataset are one `error:` line)."""
    job, hyper = parse_args(argv)
    try:
        run, agent_config = build_configs(job, hyper)
        run = dataclasses.replace(run, dataset_dir=ensure_demo_dataset(job))
    except ValueError as error:
        _usage_error(str(error))
    from qam import logging as qlog, report as qreport

    try:
        resume_step = latest_checkpoint_step(run.out_dir)
    except ValueError as error:  # checkpoints exist but none is intact
        _usage_error(str(error))
    foreign = _foreign_files(run.out_dir) if resume_step is None else []
    if foreign:
        _usage_error(
            f"--out {run.out_dir} holds files that are not this job's run files "
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
        _usage_error(_cli_wording(str(error)))
    try:  # a missing logging backend, or a second run on --out: refused before any file
        qlog.require_backends(tensorboard=job.tensorboard, wandb=job.wandb)
        trainer.lock()
    except (ImportError, RunDirectoryBusy) as error:
        _usage_error(str(error))
    except OSError as error:  # --out is a file, under a file, or not writable
        _usage_error(f"cannot use --out {run.out_dir}: {error.strerror or error}.")
    # A fresh run may start over an earlier attempt's logs (only run files are there: checked).
    with qlog.Logger(run.out_dir, resume_step=resume_step, tensorboard=job.tensorboard,
                     wandb=job.wandb, config=config_record, overwrite=True) as logger:  # fmt: skip

        def log(step: int, metrics: dict, prefix: str) -> None:
            logger.log(step, metrics, prefix=prefix)

        trainer.log = log
        _write_json(os.path.join(run.out_dir, "dataset.json"), trainer.data.info.to_dict())
        _write_json(os.path.join(run.out_dir, "config.json"), config_record)
        if resume_step:
            print(f"Resuming from step {resume_step} in {run.out_dir}")
        total = run.offline_steps + run.online_steps
        # Off a terminal (CI logs), one line a minute.
        bar = tqdm.tqdm(total=total, initial=resume_step or 0, disable=not job.progress,
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
        except OSError as error:  # e.g. a full disk while writing a checkpoint or a log
            saved = latest_checkpoint_step(run.out_dir)
            sys.exit(f"error: {error}. The last checkpoint is at step {saved or 0:,}; fix the "
                     "cause and run the same command again to resume.")  # fmt: skip
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
    "wandb_run_id.txt", ".lock",
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
