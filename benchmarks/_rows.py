"""The benchmarks' common row format: one row per (case, baseline), read by ``run.py``.

Every ``bench_*.py`` stores ``rows(results)`` under ``"rows"`` in the JSON it writes, so
``run.py`` can gather one table from benches that otherwise keep their own layout. ``ratio`` is
always ``lspsde_s / baseline_s``: below 1, lspsde is faster; above 1, the baseline is.
"""

COLUMNS = ("benchmark", "case", "lspsde_s", "baseline", "baseline_s", "ratio", "note")


def row(
    benchmark: str,
    case: str,
    lspsde_s: float | None,
    baseline: str,
    baseline_s: float | None,
    note: str = "",
    ratio: float | None = None,
) -> dict:
    """One row; ``ratio`` defaults to ``lspsde_s / baseline_s`` (pass it for a per-path-step or
    paired ratio that the two medians alone do not give)."""
    if ratio is None and lspsde_s is not None and baseline_s is not None and baseline_s > 0:
        ratio = lspsde_s / baseline_s
    return {
        "benchmark": benchmark,
        "case": case,
        "lspsde_s": lspsde_s,
        "baseline": baseline,
        "baseline_s": baseline_s,
        "ratio": ratio,
        "note": note,
    }


def environment(**extra) -> dict:
    """The machine facts every bench stores beside its timings (JAX imported here, so that the
    torch-only benches can import this module without it), updated with ``extra``."""
    import os
    import platform

    import jax
    import jax.numpy as jnp

    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "python": platform.python_version(),
        "dtype": str(jnp.zeros(()).dtype),
        **extra,
    }
