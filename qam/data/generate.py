"""Command line: `python -m qam.data.generate --env cube-double-v0 --dataset-type play ...`.

Generates an OGBench manipulation dataset locally with OGBench's scripted oracles; see
[`qam.data.generate_dataset`][].
"""

import argparse
import sys

from ._generate import DATASET_TYPES, GENERATABLE_ENVS, generate_dataset


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qam.data.generate",
        description=(
            "Generate an OGBench manipulation dataset (cube-*, scene, puzzle-*) locally with "
            "OGBench's scripted oracles, in OGBench's file format: writes "
            "DIR/<env>-<type>-v0.npz and DIR/<env>-<type>-v0-val.npz atomically. No network. "
            "Locomotion datasets need OGBench's expert policies and cannot be generated."
        ),
        epilog=(
            "Example (about 1M transitions, like the official file):\n"
            "  python -m qam.data.generate --env cube-double-v0 --dataset-type play "
            "--episodes 1000 --dir ~/.ogbench/data"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--env",
        required=True,
        choices=GENERATABLE_ENVS,
        metavar="ENV",
        help=f"environment: one of {', '.join(GENERATABLE_ENVS)}",
    )
    p.add_argument(
        "--dataset-type",
        required=True,
        choices=DATASET_TYPES,
        help="play: plan oracle with smoothed noise; noisy: Markov oracle with "
        "Gaussian noise and random actions",
    )
    p.add_argument(
        "--episodes",
        type=int,
        required=True,
        help="training episodes (OGBench: 1000 for single/double/scene/3x3/4x4)",
    )
    p.add_argument("--dir", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--max-episode-steps",
        type=int,
        default=None,
        help="steps per episode (default OGBench's 1001); small values for tests",
    )
    p.add_argument(
        "--val-episodes",
        type=int,
        default=None,
        help="validation episodes (default episodes // 10, at least 1)",
    )
    p.add_argument("--noise", type=float, default=0.1, help="oracle noise level (default 0.1)")
    p.add_argument(
        "--noise-smoothing",
        type=float,
        default=0.5,
        help="plan-oracle noise smoothing (default 0.5)",
    )
    p.add_argument(
        "--min-norm",
        type=float,
        default=0.4,
        help="Markov-oracle minimum action norm (default 0.4)",
    )
    p.add_argument(
        "--p-random-action",
        type=float,
        default=None,
        help="random-action probability (default: 0 for play; 0.1 noisy cube/scene, "
        "0.2 noisy puzzle)",
    )
    p.add_argument(
        "--task",
        type=int,
        default=None,
        help="the evaluation task (1-5) of --task-goal-fraction and --task-start-fraction",
    )
    p.add_argument(
        "--task-goal-fraction",
        type=float,
        default=0.0,
        help="cube-* only, not in OGBench: probability that each oracle target is moved to "
        "its block's goal in --task (default 0: OGBench's datasets)",
    )
    p.add_argument(
        "--task-start-fraction",
        type=float,
        default=0.0,
        help="cube-* only, not in OGBench: probability that an episode starts with the cubes "
        "at --task's initial positions (default 0)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="number of processes generating episodes (default 1); the output does not "
        "depend on it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result = generate_dataset(
        args.env,
        args.dataset_type,
        num_episodes=args.episodes,
        out_dir=args.dir,
        seed=args.seed,
        max_episode_steps=args.max_episode_steps,
        num_val_episodes=args.val_episodes,
        noise=args.noise,
        noise_smoothing=args.noise_smoothing,
        min_norm=args.min_norm,
        p_random_action=args.p_random_action,
        progress=not args.no_progress,
        workers=args.workers,
        task=args.task,
        task_goal_fraction=args.task_goal_fraction,
        task_start_fraction=args.task_start_fraction,
    )
    print(f"wrote {result.train_path} ({result.num_train_steps} steps)")
    print(f"wrote {result.val_path} ({result.num_val_steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
