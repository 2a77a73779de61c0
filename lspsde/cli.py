"""Command line: ``lspsde run STUDY.toml --out DIR`` and ``lspsde check STUDY.toml``."""

import argparse
import sys

from .study.schema import StudyConfigError, load_study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lspsde", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a study and write results.nc, figures and report.md")
    run.add_argument("study", help="path to a study TOML file")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--force", action="store_true", help="recompute finished experiments")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    check = sub.add_parser("check", help="validate a study file without running it")
    check.add_argument("study")
    args = parser.parse_args(argv)

    try:
        config = load_study(args.study)
    except StudyConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(f"{args.study}: OK ({', '.join(config.experiments())})")
        return 0

    from .study.runner import StudyOutputError, run_study

    progress = False if args.quiet else None  # None: bars when stderr is a terminal
    try:
        result = run_study(config, args.out, progress=progress, force=args.force)
    except (StudyConfigError, StudyOutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_fail = sum(1 for c in result.checks if c.holds is False)
    print(f"wrote {len(result.files)} files to {result.out}:")
    for f in result.files:
        print(f"  {f}")
    print(
        f"{len(result.checks)} checks, {n_fail} where the predicted bound does not hold "
        "(see report.md)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
