"""Run a study: experiments → labelled results (DataTree) → figures → Markdown report.

Each finished experiment is written at once to ``DIR/parts/<experiment>.nc`` together with the
hash of its configuration; a re-run with the same configuration loads it instead of recomputing,
so an interrupted study resumes where it stopped and never loses finished work.
"""

import dataclasses
import datetime
import hashlib
import json
from pathlib import Path
import sys
import zlib

import jax
import matplotlib
import xarray as xr

from .. import __version__
from . import Check, Experiment, registry
from .schema import StudyConfig, load_study

matplotlib.use("Agg")


def _registry() -> dict[str, Experiment]:
    """The experiments the runner knows: every study module of ``lspsde.study``."""
    return registry()


def _config_hash(name: str, cfg, seed: int) -> str:
    """What a finished part is: its table, configuration, seed, key stream and code version."""
    payload = json.dumps(
        {
            "name": name,
            "seed": seed,
            "key": "fold_in(key(seed), crc32(name))",
            "version": __version__,
            "cfg": cfg.model_dump(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclasses.dataclass
class StudyResult:
    """What a study run produced: the DataTree, the report rows and the files written."""

    tree: xr.DataTree
    checks: list[Check]
    out: Path
    files: list[Path]


def run_study(
    study: "str | Path | StudyConfig",
    out: str | Path,
    *,
    progress: bool | None = None,
    force: bool = False,
) -> StudyResult:
    """Run every experiment of a study and write ``results.nc``, figures and ``report.md``.

    **Arguments:**

    - `study`: a study file path or a parsed ``StudyConfig``.
    - `out`: output directory (created).
    - `progress`: show progress bars (default: when stderr is a terminal).
    - `force`: recompute experiments even when a finished part with the same configuration exists.
    """
    config = load_study(study) if not isinstance(study, StudyConfig) else study
    # Studies compare measurements with bounds to ~1e-8: they run in float64, and leave the
    # caller's precision as it was.
    with jax.enable_x64(True):
        return _run_study(config, Path(out), progress, force)


def experiment_key(key, name: str):
    """The PRNG key of the experiment table ``[name]``: folded in from its name, so that its
    numbers do not depend on which other tables the study file holds, or in what order."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _run_study(config: StudyConfig, out: Path, progress: bool | None, force: bool) -> StudyResult:
    (out / "parts").mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = sys.stderr.isatty()
    registry = _registry()
    key = jax.random.key(config.study.seed)
    datasets: dict[str, xr.Dataset] = {}
    for name, cfg in config.experiments().items():
        exp = registry[name]
        part = out / "parts" / f"{name}.nc"
        h = _config_hash(name, cfg, config.study.seed)
        if part.exists() and not force:
            with xr.open_dataset(part, engine="h5netcdf") as ds:
                if ds.attrs.get("config_hash") == h:
                    datasets[name] = ds.load()
                    _log(f"[{name}] loaded finished part {part}")
                    continue
        _log(f"[{name}] running")
        ds = exp.run(cfg, experiment_key(key, name), progress)
        ds.attrs.update(config_hash=h, config=json.dumps(cfg.model_dump()))
        tmp = part.with_suffix(".nc.tmp")
        ds.to_netcdf(tmp, engine="h5netcdf")
        tmp.replace(part)  # atomic: a part on disk is always complete
        datasets[name] = ds

    tree = xr.DataTree.from_dict({f"/{n}": ds for n, ds in datasets.items()})
    tree.attrs.update(
        study=config.study.name,
        description=config.study.description,
        seed=config.study.seed,
        lspsde_version=__version__,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        papers=(
            "Katende (2025) Analytic and Variational Stability in Deep Learning Systems; "
            "Luo et al. (2025) Optimization-Induced Dynamics of Lipschitz Continuity"
        ),
    )
    files = []
    results = out / "results.nc"
    tree.to_netcdf(results, engine="h5netcdf")
    files.append(results)

    checks: list[Check] = []
    sections = []
    for name, ds in datasets.items():
        exp = registry[name]
        rows = exp.checks(ds)
        checks += rows
        figs = exp.figures(ds)
        fig_names = []
        for fname, fig in figs.items():
            path = out / f"{name}_{fname}.png"
            fig.savefig(path, dpi=120, bbox_inches="tight")
            matplotlib.pyplot.close(fig)
            files.append(path)
            fig_names.append(path.name)
        sections.append((name, exp.summary(ds), rows, fig_names))
    report = out / "report.md"
    report.write_text(_report(config, sections))
    files.append(report)
    return StudyResult(tree, checks, out, files)


def _cell(value) -> str:
    """A Markdown table cell: ``|`` (as in ``|x|``) escaped so it does not split the row."""
    return str(value).replace("|", "\\|")


def _fmt_holds(h: bool | None) -> str:
    return "n/a" if h is None else ("yes" if h else "**NO**")


def _report(config: StudyConfig, sections) -> str:
    lines = [f"# Study: {config.study.name}", ""]
    if config.study.description:
        lines += [config.study.description, ""]
    lines += [
        f"lspsde {__version__}, seed {config.study.seed}. Data: `results.nc` "
        "(open with `xarray.open_datatree`).",
        "",
    ]
    for name, summary, rows, figs in sections:
        lines += [f"## {name}", "", summary, ""]
        lines += [
            "| theorem | case | predicted | measured | holds | note |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            cells = (r.theorem, r.case, r.predicted, r.measured, _fmt_holds(r.holds), r.note)
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
        lines += [f"![{f}]({f})" for f in figs]
        lines.append("")
    return "\n".join(lines)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
