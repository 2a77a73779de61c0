"""Command line for studies.

- ``lspsde run STUDY.toml --out DIR [--size NAME]``: run a study (resumes an interrupted run),
  at a named size of the file (``--size ci``: the reduced grids the tests run);
- ``lspsde validate STUDY.toml [--size NAME] [--calibrate]`` (alias ``check``): check a study
  file and say what it would run; ``--calibrate`` times each experiment once at its ``ci`` size
  and extrapolates a rough time estimate;
- ``lspsde list [STUDIES_DIR]``: the experiment kinds and the study files there are;
- ``lspsde status DIR``: what a (possibly interrupted) run directory holds;
- ``lspsde report DIR``: rebuild ``report.md`` and the figures from saved results.

Exit codes: 0 done, 2 a user error (a bad study file, an unusable output directory, a run
that is not finished), reported in one line on stderr; 130 interrupted (Ctrl-C).
"""

import argparse
from collections.abc import Callable
from pathlib import Path
import socket
import sys

from ._ensemble import _format_bytes, available_memory
from .distributed import ClusterError
from .study import registry
from .study.runner import (
    ExperimentPlan,
    StudyInterrupted,
    StudyOutputError,
    StudyResult,
    _duration,
    calibrate,
    plan_study,
    rebuild_report,
    run_study,
)
from .study.schema import FULL, StudyConfig, StudyConfigError, load_study
from .study.status import LockState, RunStatus, resume_command, run_status

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``lspsde`` command line with `argv` (default: ``sys.argv[1:]``); the exit code."""
    args = _parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (StudyConfigError, StudyOutputError, ClusterError) as e:
        _error(e)
        return 2

    except KeyboardInterrupt as e:  # StudyInterrupted says what was kept
        msg = str(e) if isinstance(e, StudyInterrupted) else "Interrupted."
        print(msg, file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lspsde",
        description="Declarative stability studies: run, check, list and inspect them.",
        epilog="Exit codes: 0 done, 2 a user error (one line on stderr), 130 interrupted.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a study and write results.nc, figures and report.md (resumes)",
        description="Run a study into DIR. Finished experiments (DIR/parts) are loaded, not "
        "recomputed, so rerunning an interrupted command resumes it.",
    )
    run.add_argument("study", help="path to a study TOML file")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument(
        "--force",
        action="store_true",
        help="recompute finished experiments; run into a directory holding another study",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    _size_option(run, "run the study at")
    where = run.add_mutually_exclusive_group()
    where.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run the ensembles' pieces on a dask LocalCluster of N worker processes",
    )
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run the pieces on an existing dask cluster (e.g. tcp://host:8786); DIR must be "
        "on storage every worker shares",
    )
    run.add_argument(
        "--chunk-size",
        type=int,
        metavar="N",
        help="at most N paths per stored piece (a killed run loses at most one piece per "
        "worker; the numbers do not depend on it)",
    )
    run.set_defaults(handler=_cmd_run)

    validate = sub.add_parser(
        "validate",
        aliases=["check"],
        help="check a study file and say what it would run, without running it",
        description="Parse a study file, build every experiment's configuration, and report "
        "each experiment's grid, sizes and (for ensembles) memory per grid point.",
    )
    validate.add_argument("study", help="path to a study TOML file")
    _size_option(validate, "check the study at")
    validate.add_argument(
        "--calibrate",
        action="store_true",
        help="time each experiment once at its ci size (in a temporary directory) and print a "
        "rough time estimate for --size by linear extrapolation in path-steps",
    )
    validate.set_defaults(handler=_cmd_validate)

    lst = sub.add_parser(
        "list",
        help="the experiment kinds and the study files in STUDIES_DIR",
        description="List the experiment kinds (the tables a study file may hold) and the "
        "study files in STUDIES_DIR, one line each.",
    )
    lst.add_argument(
        "studies_dir",
        nargs="?",
        metavar="STUDIES_DIR",
        help="a directory of study TOML files (default: ./studies, else the shipped studies)",
    )
    lst.set_defaults(handler=_cmd_list)

    status = sub.add_parser(
        "status",
        help="what a run directory holds: done, missing and damaged experiments, the lock",
        description="Show, without changing anything, which experiments of a run directory "
        "are done, missing or damaged, whether a run holds its lock, and whether results.nc "
        "and report.md are there.",
    )
    status.add_argument("dir", metavar="DIR", help="a run's output directory (--out)")
    status.set_defaults(handler=_cmd_status)

    report = sub.add_parser(
        "report",
        help="rebuild report.md and the figures from saved results, computing nothing",
        description="Rebuild report.md and the figures of DIR from its finished experiments "
        "(parts, or results.nc), without recomputing any.",
    )
    report.add_argument("dir", metavar="DIR", help="a run's output directory (--out)")
    report.set_defaults(handler=_cmd_report)
    return parser


def _size_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--size",
        default=FULL,
        metavar="NAME",
        help=f"{what} a size the file declares ([EXPERIMENT.sizes.NAME] tables; the shipped "
        "studies declare ci, the reduced grids the tests run); default full, the file as "
        "written",
    )


def _without_size(config: StudyConfig) -> list[str]:
    """The experiments of `config` that do not declare the size it was parsed at (they run as
    written); none at size full."""
    if config.size == FULL:
        return []
    return [n for n in config.experiments() if not config.has_size(n, config.size)]


# --- run ------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    """``lspsde run``: the files written and the count of checks that fail."""
    for option, value in (("--workers", args.workers), ("--chunk-size", args.chunk_size)):
        if value is not None and value < 1:
            _error(
                ValueError(
                    f"{option} must be at least 1, got {value} (leave it out to run in this "
                    "process)."
                )
            )
            return 2
    config = load_study(args.study, size=args.size)
    for name in _without_size(config):
        print(
            f"[{name}] declares no [{name}.sizes.{config.size}] table: it runs as written",
            file=sys.stderr,
        )
    progress = False if args.quiet else None  # None: bars on a terminal, not under CI
    result = run_study(
        config,
        args.out,
        progress=progress,
        force=args.force,
        source=args.study,
        workers=args.workers,
        scheduler=args.scheduler,
        chunk_size=args.chunk_size,
    )
    _print_written(result)
    return 0


def _print_written(result: StudyResult) -> None:
    n_fail = sum(1 for c in result.checks if c.holds is False)
    print(f"wrote {len(result.files)} files to {result.out} (size {result.size}):")
    for f in result.files:
        print(f"  {f}")
    print(
        f"{len(result.checks)} checks, {n_fail} where the predicted bound does not hold "
        "(see report.md)"
    )


# --- validate -------------------------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    """``lspsde validate``: what each experiment would run (and, with ``--calibrate``, a rough
    time estimate); 2 when one grid point of an ensemble cannot fit in memory."""
    config = load_study(args.study, size=args.size)
    plans = plan_study(config)
    n = len(plans)
    print(
        f"{args.study}: study {config.study.name!r} (seed {config.study.seed}), "
        f"{n} experiment{'s' * (n != 1)}: {', '.join(p.name for p in plans)}"
    )
    print(_size_line(config))
    limit = available_memory()
    for plan in plans:
        grid = " × ".join(f"{k} {v}" for k, v in plan.grid.items()) or "a single point"
        combos = plan.combinations
        line = f"  {plan.name}: grid {grid} ({combos} combination{'s' * (combos != 1)})"
        if plan.sizes:
            line += "; " + ", ".join(f"{k} {v}" for k, v in plan.sizes.items())
        print(line.rstrip())
        if config.size != FULL:
            print(f"    {_experiment_size_line(config, plan.name)}")
        if plan.path_steps is not None:
            s = plan.sizes
            print(
                f"    {combos} × {s['n_paths']} paths × {s['n_steps']} steps = "
                f"{plan.path_steps:,} path-steps"
            )
        if plan.result_bytes is not None and plan.work_bytes is not None:
            print(
                f"    memory per grid point: {_format_bytes(plan.result_bytes)} result, "
                f"{_format_bytes(plan.work_bytes)} working set (simulate's memory plan, "
                f"float64, save='summary'); {_format_bytes(limit)} available"
            )
            need = max(plan.result_bytes, plan.work_bytes)
            if need > limit:
                raise StudyConfigError(
                    f"{args.study}: [{plan.name}] one grid point needs {_format_bytes(need)}, "
                    f"more than the {_format_bytes(limit)} available; lower {plan.name}.n_paths "
                    f"or {plan.name}.n_steps (or raise {plan.name}.save_every)."
                )
            if combos * plan.result_bytes > limit:
                print(
                    f"    warning: all {combos} grid points at once need "
                    f"{_format_bytes(combos * plan.result_bytes)}, more than is available"
                )
    if not args.calibrate:
        size = "" if config.size == FULL else f" --size {config.size}"
        print(
            f"time: `lspsde validate {args.study}{size} --calibrate` gives a rough estimate (it "
            f"runs each experiment once at its {_CALIBRATION} size)"
        )
        print("OK (nothing was run)")
        return 0
    _print_calibration(args.study, config, plans)
    print("OK (the calibration ran in a temporary directory; nothing was written beside the study)")
    return 0


def _size_line(config: StudyConfig) -> str:
    """What the size `config` was parsed at means, and the sizes its file declares."""
    others = ", ".join(config.declared_sizes)
    if config.size == FULL:
        declared = f"it also declares {others} (--size NAME)" if others else "no other size"
        return f"size: {FULL} (the file as written); {declared}"
    return (
        f"size: {config.size} (each [EXPERIMENT.sizes.{config.size}] table merged into its "
        f"experiment's table); the file declares {others}, and {FULL} (as written)"
    )


def _experiment_size_line(config: StudyConfig, name: str) -> str:
    size = config.size
    if not config.has_size(name, size):
        return f"size {size}: no [{name}.sizes.{size}] table, so it runs as written"
    keys = list(config.size_tables[name][size])
    if not keys:
        return f"size {size}: [{name}.sizes.{size}] is empty, so it runs as written"
    return f"size {size}: [{name}.sizes.{size}] sets {', '.join(keys)}"


_CALIBRATION = "ci"  # the size --calibrate runs


def _count(n: int) -> str:
    """``950``, ``12.3k``, ``1.2M``, ``3.4G`` (path-steps)."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _print_calibration(source: str, config: StudyConfig, plans: list[ExperimentPlan]) -> None:
    """``--calibrate``: run each experiment that can give an estimate once at its ci size and
    extrapolate its time to `config`'s size linearly in path-steps."""
    ci = _CALIBRATION
    small_config = config
    if config.size != ci and any(config.has_size(p.name, ci) for p in plans):
        small_config = load_study(source, size=ci)
    small = {p.name: p for p in plan_study(small_config)}
    why: dict[str, str] = {}
    for plan in plans:
        if not config.has_size(plan.name, ci):
            why[plan.name] = f"no [{plan.name}.sizes.{ci}] table to calibrate at"
        elif plan.path_steps is None or small[plan.name].path_steps is None:
            why[plan.name] = "no path-step count (not an ensemble with n_paths and n_steps)"
    todo = [p.name for p in plans if p.name not in why]
    print(
        f"time (--calibrate: each experiment with a {ci} size and a path-step count run once at "
        f"its {ci} size, in a temporary directory):"
    )
    times: dict[str, float] = {}
    for name in todo:
        print(f"  {name}: calibrating at size {ci} ...", flush=True)
        times.update(calibrate(small_config, [name]))
    total = 0.0
    for plan in plans:
        if plan.name in why:
            print(f"  {plan.name}: no estimate available ({why[plan.name]})")
            continue
        seconds, steps = times[plan.name], small[plan.name].path_steps
        target = plan.path_steps
        assert steps is not None and target is not None  # checked above
        estimate = seconds * target / steps
        total += estimate
        head = f"  {plan.name}: calibrated at size {ci}: {_duration(seconds)} for {_count(steps)}"
        if config.size == ci:
            print(f"{head} path-steps (the size asked for: the estimate is this time)")
            continue
        print(
            f"{head} path-steps; estimated {_duration(estimate)} for {_count(target)} "
            f"path-steps (size {config.size})"
        )
    if times:
        n = len(times)
        print(
            f"  estimated total: {_duration(total)} for the {n} experiment{'s' * (n != 1)} with "
            "an estimate"
        )
        print(
            "  (a rough linear extrapolation in path-steps from one short run: the calibration "
            "time includes JIT compilation, figures and the report, which do not grow with the "
            "paths and steps and dominate small runs, so the estimate leans high; grid axes and "
            "sizes that are not paths or steps are not accounted for)"
        )


# --- list -----------------------------------------------------------------------------------


_WIDTH = 120  # the listing's lines are cut to this many characters


def _first_sentence(text: str, limit: int = _WIDTH) -> str:
    """The first sentence of the first paragraph of `text`, on one line, at most `limit`
    characters."""
    para = " ".join((text or "").strip().split("\n\n")[0].split())
    end = para.find(". ")
    return _clip(para[: end + 1] if end >= 0 else para, limit)


def _clip(line: str, limit: int) -> str:
    """`line`, cut to `limit` characters (an ellipsis marks the cut)."""
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _default_studies() -> Path | None:
    """``./studies`` when it exists, else the ``studies/`` of the source checkout the package
    is installed from (an editable install), else ``None``."""
    for d in (Path("studies"), Path(__file__).resolve().parents[1] / "studies"):
        if d.is_dir():
            return d
    return None


def _cmd_list(args: argparse.Namespace) -> int:
    """``lspsde list``: the experiment kinds, then each study file (invalid ones say why)."""
    kinds = registry()
    width = max(map(len, kinds))
    print("Experiment kinds (the tables a study file may hold):")
    for name, exp in kinds.items():
        head = f"  {name:<{width}}  "
        print(head + _first_sentence(exp.config.__doc__ or "", _WIDTH - len(head)))
    if args.studies_dir is not None:
        directory = Path(args.studies_dir)
        if not directory.is_dir():
            raise StudyConfigError(f"No study directory at {str(directory)!r}.")
    else:
        directory = _default_studies()
        if directory is None:
            print("\nNo studies/ directory here: pass one, `lspsde list STUDIES_DIR`.")
            return 0
    files = sorted(directory.glob("*.toml"))
    print(f"\nStudies in {directory}/ ({len(files)}):")
    width = max((len(f.name) for f in files), default=0)
    valid = []
    for path in files:
        head = f"  {path.name:<{width}}  "
        try:
            config = load_study(path)
        except StudyConfigError as e:
            head += "invalid: "
            print(head + _clip(_one_line(e).replace(str(path), path.name), _WIDTH - len(head)))
            continue
        valid.append(path)
        tables = list(config.experiments())
        what = config.study.description or "(no description)"
        if tables != [path.stem]:
            head += f"[{', '.join(tables)}] "
        print(head + _first_sentence(what, max(40, _WIDTH - len(head))))
    if valid:
        first = next((f for f in valid if f.stem == "quickstart"), valid[0])
        print(f"\nRun one: lspsde run {first} --out results/{first.stem}")
    return 0


# --- status ---------------------------------------------------------------------------------


def _lock_line(lock: LockState | None) -> str:
    if lock is None:
        return "none (no run is using this directory)"
    if lock.pid is None:
        return f"{lock.path.name} holds no pid (a run may be starting; else delete it)"
    if lock.alive and lock.host is not None and lock.host != socket.gethostname():
        return (
            f"held by pid {lock.pid} on {lock.host} (another host: it cannot be checked from "
            "here; if no such run exists, delete the lock)"
        )
    if lock.alive:
        return f"held by pid {lock.pid}, which is running: a run is using this directory"
    return f"stale (pid {lock.pid} is not running; the next run takes it over)"


def _cmd_status(args: argparse.Namespace) -> int:
    """``lspsde status``: per experiment done / missing / damaged / outdated, the lock, and
    the study's outputs. Changes nothing."""
    st: RunStatus = run_status(args.dir)
    rec = st.record
    if rec is not None:
        src = f", from {rec['source']}" if rec.get("source") else ""
        print(
            f"{st.out}: study {rec['study']!r} (seed {rec.get('seed')}){src}; size {st.size}; "
            f"lspsde {rec.get('lspsde_version')}, study hash {rec.get('study_hash')}"
        )
    else:
        print(
            f"{st.out}: no study.json (not a run directory, or one written before lspsde "
            "recorded the study): the parts found are listed, each checked on its own"
        )
    print(f"lock: {_lock_line(st.lock)}")
    print(f"experiments: {len(st.done)} of {len(st.parts)} done")
    width = max((len(n) for n in st.parts), default=0)
    for name, part in st.parts.items():
        line = f"  {name:<{width}}  {part.state:<8}"
        if part.state == "done":
            line += f"  {part.path.relative_to(st.out)} ({_format_bytes(part.path.stat().st_size)})"
        elif part.state == "damaged":
            line += f"  {part.why}; the next run recomputes it"
        elif part.state == "outdated":
            line += "  a finished part for another configuration; the next run recomputes it"
        print(line.rstrip())
    report = "present" if st.report else "missing"
    print(f"results.nc: {st.results}; report.md: {report}")
    todo = [n for n, p in st.parts.items() if p.state != "done"]
    if st.lock is not None and st.lock.alive:
        print("next: wait for the running run to finish")
    elif todo:
        print(f"next: `{resume_command(rec, st.out)}` resumes ({', '.join(todo)})")
    elif st.parts and not st.complete:
        print(f"next: `lspsde report {st.out}` writes the report from the finished parts")
    elif st.complete:
        print("complete")
    return 0


# --- report ---------------------------------------------------------------------------------


def _cmd_report(args: argparse.Namespace) -> int:
    """``lspsde report``: the files rewritten; nothing is recomputed."""
    result = rebuild_report(args.dir)
    print("rebuilt from the saved results (no experiment was recomputed)")
    _print_written(result)
    return 0


# --- errors ---------------------------------------------------------------------------------


def _one_line(e: Exception) -> str:
    """An error message on one line: its first line, then the others joined by ``;``."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(e).__name__
    return f"{lines[0]} {'; '.join(lines[1:])}"


def _error(e: Exception) -> None:
    print(f"error: {_one_line(e)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
