"""Command line for studies.

- ``lspsde run STUDY.toml --out DIR``: run a study (resumes an interrupted run);
- ``lspsde validate STUDY.toml`` (alias ``check``): check a study file and say what it would run;
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
    StudyInterrupted,
    StudyOutputError,
    StudyResult,
    plan_study,
    rebuild_report,
    run_study,
)
from .study.schema import StudyConfigError, load_study
from .study.status import LockState, RunStatus, run_status

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
    config = load_study(args.study)
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
    print(f"wrote {len(result.files)} files to {result.out}:")
    for f in result.files:
        print(f"  {f}")
    print(
        f"{len(result.checks)} checks, {n_fail} where the predicted bound does not hold "
        "(see report.md)"
    )


# --- validate -------------------------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    """``lspsde validate``: what each experiment would run; 2 when one grid point of an
    ensemble cannot fit in memory."""
    config = load_study(args.study)
    plans = plan_study(config)
    n = len(plans)
    print(
        f"{args.study}: study {config.study.name!r} (seed {config.study.seed}), "
        f"{n} experiment{'s' * (n != 1)}: {', '.join(p.name for p in plans)}"
    )
    limit = available_memory()
    for plan in plans:
        grid = " × ".join(f"{k} {v}" for k, v in plan.grid.items()) or "a single point"
        combos = plan.combinations
        line = f"  {plan.name}: grid {grid} ({combos} combination{'s' * (combos != 1)})"
        if plan.sizes:
            line += "; " + ", ".join(f"{k} {v}" for k, v in plan.sizes.items())
        print(line.rstrip())
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
    print("OK (nothing was run)")
    return 0


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
            f"{st.out}: study {rec['study']!r} (seed {rec.get('seed')}){src}; "
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
    src = (rec or {}).get("source") or "STUDY.toml"
    if st.lock is not None and st.lock.alive:
        print("next: wait for the running run to finish")
    elif todo:
        print(f"next: `lspsde run {src} --out {st.out}` resumes ({', '.join(todo)})")
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
