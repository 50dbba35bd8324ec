"""The tables and plots of a sweep: `python examples/report.py DIR`.

Reads the run directories a sweep (`examples/sweep.py`) wrote under DIR and prints the paper's
Table 1 layout as markdown: methods x domains (and `all`), mean success at the offline end and
after the online phase, with 95% stratified-bootstrap intervals and the IQM (rliable), the
paper's released numbers beside them, and `†` where our interval and the paper's do not
overlap. Writes `table.md`, `table.csv` and one `curves-<domain>.png` per domain (our curves
with their bands beside the paper's) into `--out` (default DIR/report). For the sensitivity
study the rows are its variants and `curves-all.png` holds its curves.
"""

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="report.py", description=(__doc__ or "").split("\n\n")[0],
                                allow_abbrev=False)  # fmt: skip
    p.add_argument("dir", metavar="DIR", help="a sweep's --out directory")
    p.add_argument("--out", metavar="DIR", help="where the files go (default: DIR/report)")
    p.add_argument(
        "--reps",
        type=int,
        default=2000,
        metavar="N",
        help="bootstrap resamples per interval (rliable's default is 50000)",
    )
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    args = p.parse_args(argv)
    if not os.path.isdir(args.dir):
        print(f"error: DIR {args.dir!r} is not a directory.", file=sys.stderr)
        return 2
    if args.reps < 100:
        print(f"error: --reps must be >= 100; got {args.reps}.", file=sys.stderr)
        return 2
    from qam.studies import write_report

    try:
        result = write_report(args.dir, args.out, reps=args.reps, plots=args.plots,
                              seed=args.seed)  # fmt: skip
    except (ImportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result["markdown"], end="")
    files = [result["files"]["markdown"], result["files"]["csv"], *result["files"]["png"]]
    print("\nwrote " + "  ".join(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
