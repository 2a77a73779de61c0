"""Run every benchmark comparison and write one table: ``benchmarks/results/summary.md``.

    .venv/bin/python benchmarks/run.py                 # everything, ~17 min at load ~2 (2 cores)
    .venv/bin/python benchmarks/run.py --quick         # smoke sizes, ~5 min -> results/quick/
    .venv/bin/python benchmarks/run.py --only torch --only noise
    .venv/bin/python -m benchmarks.run ...             # the same

Each bench runs as its own subprocess (``benchmarks/bench_<name>.py``, each still runnable
alone), because they set process-wide JAX options differently (``bench_lyapunov`` runs in
float64, the others in float32; ``bench_profile`` sets a compilation cache). Each writes its JSON
(``--out``) with a ``rows`` list in the common format of ``_rows.py``; this script gathers the
rows of every bench's JSON in the output folder, not only those run now (so ``--only NAME``
refreshes one bench and keeps one table), and writes ``summary.md``, ``summary.csv`` and
``summary.json`` beside them. Each bench's output is also kept in ``logs/<name>.log``.

Columns: benchmark, case, lspsde time, baseline, baseline time, ratio = lspsde / baseline (below
1 lspsde is faster), note. Times are medians of interleaved rounds inside one bench run, compile
excluded; compare ratios, not seconds: the CPUs are shared with other jobs.
"""

import argparse
import csv
import datetime
import json
import os
from pathlib import Path
import platform
import subprocess
import sys
import time

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = ROOT / "results"
DEFAULT_TORCH_PYTHON = REPO / ".venv-torch" / "bin" / "python"
COLUMNS = ("benchmark", "case", "lspsde_s", "baseline", "baseline_s", "ratio", "note")

# name -> [(json stem, script, full-size args, quick args)]; the order of the table.
BENCHES: dict[str, list[tuple[str, str, list[str], list[str]]]] = {
    "noise": [("noise", "bench_noise.py", [], ["--quick"])],
    "torch": [
        ("torch", "bench_vs_torch.py", [], ["--quick"]),
        ("torch_x64", "bench_vs_torch.py", ["--x64"], ["--x64", "--quick"]),
        # torch's default threads (2 here): what a user gets without set_num_threads
        (
            "torch_threads_default",
            "bench_vs_torch.py",
            ["--torch-threads", "0", "--repeats", "2"],
            ["--torch-threads", "0", "--quick"],
        ),
    ],
    "simulate": [("simulate", "bench_simulate.py", [], ["--quick", "--repeats", "3"])],
    "limits": [("limits", "bench_limits.py", ["--repeats", "2"], ["--quick", "--repeats", "2"])],
    "lyapunov": [("lyapunov", "bench_lyapunov.py", [], ["--quick", "--repeats", "5"])],
    "profile": [("profile", "bench_profile.py", [], ["--quick", "--no-memory", "--repeats", "3"])],
    "lipschitz": [("lipschitz", "bench_lipschitz.py", [], ["--quick"])],
    "nonsmooth": [("nonsmooth", "bench_nonsmooth.py", [], ["--quick"])],
}


def _run(cmd: list[str], log: Path) -> tuple[int, float, str]:
    """Run ``cmd``, echo and log its output; return (exit code, seconds, last lines)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tail: list[str] = []
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write("    " + line)
            sys.stdout.flush()
            f.write(line)
            tail = [*tail, line.rstrip()][-5:]
        rc = proc.wait()
    return rc, time.perf_counter() - start, "\n".join(tail)


def _fmt_s(v) -> str:
    if v is None:
        return "--"
    return f"{v:.3g} s" if v < 100 else f"{v:.0f} s"


def _fmt_ratio(v) -> str:
    if v is None:
        return "--"
    return f"**{v:.2f}x**" if v >= 0.1 else f"**{v:.3f}x**"


def _git_describe() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "lspsde"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return head + (" (lspsde/ has uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def _module(script: str):
    """Import ``benchmarks/<script>`` (only to call its ``rows``; this process runs no JAX)."""
    import importlib.util

    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gather(out_dir: Path, status: dict[str, str]) -> tuple[list[dict], list[str]]:
    rows, sources = [], []
    for name, jobs in BENCHES.items():
        for stem, script, *_ in jobs:
            path = out_dir / f"{stem}.json"
            if stem in status and status[stem] != "ok":
                rows.append(
                    {c: None for c in COLUMNS}
                    | {"benchmark": name, "case": stem, "note": status[stem]}
                )
            if not path.exists():
                continue
            data = json.loads(path.read_text())
            when = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC)
            fresh = "this run" if status.get(stem) == "ok" else "an earlier run"
            if "rows" not in data:  # written before run.py: the bench's own rows() reads it
                try:
                    data["rows"] = _module(script).rows(data)
                    fresh += ", rows from its JSON by `rows()`"
                except Exception as error:  # report it, keep the other benches
                    sources.append(f"`{path.name}`: unreadable ({error!r}); rerun it")
                    continue
            env = data.get("environment", {})
            loads = [
                env.get(k)
                for k in ("load_average_start", "load_average_before", "load_average")
                if env.get(k)
            ][:1] + [env.get(k) for k in ("load_average_end", "load_average_after") if env.get(k)][
                :1
            ]
            load = " -> ".join(f"{x[0]:.1f}" for x in loads)
            sources.append(
                f"`{path.name}`: {when:%Y-%m-%d %H:%M} UTC ({fresh})"
                + (f", load average {load}" if load else "")
            )
            rows.extend(data["rows"])
    return rows, sources


def write_summary(out_dir: Path, rows: list[dict], sources: list[str], header: list[str]):
    lines = ["# Benchmark summary", "", *header, "", "Sources:", ""]
    lines += [f"- {s}" for s in sources] + [""]
    lines += [
        "| benchmark | case | lspsde | baseline | baseline time | lspsde / baseline | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['benchmark']} | {r['case']} | {_fmt_s(r['lspsde_s'])} | {r['baseline'] or ''} "
            f"| {_fmt_s(r['baseline_s'])} | {_fmt_ratio(r['ratio'])} "
            f"| {(r['note'] or '').replace('|', chr(92) + '|')} |"
        )
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    with (out_dir / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({c: r.get(c) for c in COLUMNS} for r in rows)
    (out_dir / "summary.json").write_text(
        json.dumps({"header": header, "sources": sources, "rows": rows}, indent=2) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes, into results/quick/")
    parser.add_argument(
        "--only", action="append", choices=list(BENCHES), help="run this bench (repeatable)"
    )
    parser.add_argument(
        "--torch-python",
        type=Path,
        default=None,
        help=f"a Python with torch and torchsde (default {DEFAULT_TORCH_PYTHON.relative_to(REPO)})",
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="default results/ (quick/)")
    parser.add_argument(
        "--summary-only", action="store_true", help="run nothing; rebuild the table"
    )
    options = parser.parse_args()
    out_dir = options.out_dir or (RESULTS / "quick" if options.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_python = options.torch_python or DEFAULT_TORCH_PYTHON
    names = [] if options.summary_only else (options.only or list(BENCHES))

    started = datetime.datetime.now(datetime.UTC)
    load_start = os.getloadavg()
    status: dict[str, str] = {}
    for name in names:
        for stem, script, full, quick in BENCHES[name]:
            cmd = [sys.executable, str(ROOT / script), *(quick if options.quick else full)]
            cmd += ["--out", str(out_dir / f"{stem}.json")]
            if name == "torch":
                cmd += ["--torch-python", str(torch_python)]
            print(f"== {stem}: {' '.join(cmd[1:])}", flush=True)
            rc, seconds, tail = _run(cmd, out_dir / "logs" / f"{stem}.log")
            status[stem] = "ok" if rc == 0 else f"failed (exit {rc}): {tail.splitlines()[-1:]}"
            print(f"== {stem}: {status[stem]} in {seconds:.0f} s", flush=True)

    command = "python benchmarks/run.py" + " --quick" * options.quick
    command += "".join(f" --only {n}" for n in options.only or [])
    command += " --summary-only" * options.summary_only
    header = [
        f"Written by `{command}` at {started:%Y-%m-%d %H:%M} UTC; lspsde at git {_git_describe()}.",
        f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}"
        + (
            ""
            if options.summary_only
            else f"; load average {load_start[0]:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end"
        )
        + " (shared with other jobs: compare ratios, not seconds; differences below ~15% are "
        "noise). Each source's date and load average are listed below.",
        "ratio = lspsde time / baseline time: below 1 lspsde is faster. Times: medians of "
        "interleaved rounds within one bench run, compile excluded; `paired` = median of "
        "per-round ratios. Each bench's own JSON has every run, compile time and check.",
    ]
    rows, sources = gather(out_dir, status)
    write_summary(out_dir, rows, sources, header)
    print(f"wrote {out_dir / 'summary.md'} ({len(rows)} rows), summary.csv, summary.json")
    if any(s != "ok" for s in status.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
