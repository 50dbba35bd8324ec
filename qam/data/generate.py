"""Command line: `python -m qam.data.generate --env cube-double-v0 --dataset-type play ...`.

Generates an OGBench manipulation dataset locally with OGBench's scripted oracles; see
[`qam.data.generate_dataset`][]. The flags are the fields of `Options` (tyro); `--help` lists
them with their defaults, which are `generate_dataset`'s.
"""

import dataclasses
import inspect
import sys
from typing import Annotated, Any

import tyro

from ._generate import DATASET_TYPES, GENERATABLE_ENVS, generate_dataset


_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(generate_dataset).parameters.items()
}
# tyro prints the description unwrapped, starting a new line where one starts with a non-letter.
DESCRIPTION = (
    "Generate an OGBench manipulation dataset (cube-*, scene, puzzle-*) locally with OGBench's "
    "scripted oracles, in OGBench's file format.\n"
    "(Writes DIR/<env>-<type>-v0.npz and DIR/<env>-<type>-v0-val.npz atomically; no network. "
    "Locomotion datasets need OGBench's expert policies and cannot be generated.)\n"
    "  python -m qam.data.generate --env cube-double-v0 --dataset-type play --episodes 1000 "
    "--dir ~/.ogbench/data  # about 1M transitions, like the official file"
)


def choice_flag(values: tuple[str, ...]) -> Any:
    """A tyro constructor for a string flag that takes one of `values` (anything else is tyro's
    usage error); annotate a field `Annotated[str, choice_flag(values)]`. Also used by the
    example's command line."""
    return tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar="{" + ",".join(values) + "}", instance_from_str=lambda args: args[0],
        is_instance=lambda x: isinstance(x, str), str_from_instance=lambda x: [x],
        choices=values,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Options:
    """What to generate; the defaults are `qam.data.generate_dataset`'s."""

    env: Annotated[str, choice_flag(GENERATABLE_ENVS)]  # the goal-conditioned environment
    # play: plan oracle with smoothed noise; noisy: Markov oracle with noise and random actions
    dataset_type: Annotated[str, choice_flag(DATASET_TYPES)]
    episodes: int  # training episodes (OGBench: 1000 for single/double/scene/3x3/4x4)
    dir: Annotated[str, tyro.conf.arg(metavar="DIR")]  # output directory
    seed: int = _DEFAULTS["seed"]  # random seed
    # steps per episode (None: OGBench's 1001); small values for tests
    max_episode_steps: int | None = _DEFAULTS["max_episode_steps"]
    # validation episodes (None: episodes // 10, at least 1)
    val_episodes: int | None = _DEFAULTS["num_val_episodes"]
    noise: float = _DEFAULTS["noise"]  # oracle noise level
    noise_smoothing: float = _DEFAULTS["noise_smoothing"]  # plan-oracle noise smoothing
    min_norm: float = _DEFAULTS["min_norm"]  # Markov-oracle minimum action norm
    # random-action probability (None: 0 for play; 0.1 noisy cube and scene, 0.2 noisy puzzle)
    p_random_action: float | None = _DEFAULTS["p_random_action"]
    # the evaluation task (1-5) of --task-goal-fraction and --task-start-fraction
    task: int | None = _DEFAULTS["task"]
    # cube-* only, not in OGBench: probability each oracle target goes to its block's goal in --task
    task_goal_fraction: float = _DEFAULTS["task_goal_fraction"]
    # cube-* only, not in OGBench: probability an episode starts with --task's initial cubes
    task_start_fraction: float = _DEFAULTS["task_start_fraction"]
    # processes generating episodes; the output does not depend on it
    workers: Annotated[int, tyro.conf.arg(metavar="N")] = _DEFAULTS["workers"]
    progress: bool = _DEFAULTS["progress"]  # show a progress bar


def parse_args(argv: list[str] | None = None) -> Options:
    """The options of the command line `argv` (default: `sys.argv[1:]`); an unknown flag or a
    malformed value is tyro's usage error (exit status 2)."""
    return tyro.cli(
        Options, args=argv, prog="python -m qam.data.generate", description=DESCRIPTION,
        use_underscores=False,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        result = generate_dataset(
            options.env,
            options.dataset_type,
            num_episodes=options.episodes,
            out_dir=options.dir,
            seed=options.seed,
            max_episode_steps=options.max_episode_steps,
            num_val_episodes=options.val_episodes,
            noise=options.noise,
            noise_smoothing=options.noise_smoothing,
            min_norm=options.min_norm,
            p_random_action=options.p_random_action,
            progress=options.progress,
            workers=options.workers,
            task=options.task,
            task_goal_fraction=options.task_goal_fraction,
            task_start_fraction=options.task_start_fraction,
        )
    except ValueError as error:  # a value the library rejects: one line, argparse's status
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {result.train_path} ({result.num_train_steps} steps)")
    print(f"wrote {result.val_path} ({result.num_val_steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
