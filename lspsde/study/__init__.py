"""Declarative studies: one module and one TOML file each.

A study module in this package declares ``EXPERIMENT = Experiment(name=..., config=...,
run=..., checks=..., figures=..., summary=...)`` with its configuration class (a
``lspsde.study.config.Strict`` model); [`registry`][] discovers every such module, the schema
builds the study file's model from them, and the runner runs them. A new study is one module
here and one TOML file in ``studies/``: nothing else to edit.
"""

import functools
import importlib
import pkgutil

from .experiment import Check, Experiment

__all__ = ["Check", "Experiment", "registry"]

_NOT_STUDIES = {"config", "experiment", "runner", "schema"}


@functools.cache
def registry() -> dict[str, Experiment]:
    """``{table name: Experiment}`` for every study module of this package, sorted by name.

    **Raises:** ``TypeError`` for a module whose ``EXPERIMENT`` is not an ``Experiment``, and
    ``ValueError`` when two modules declare the same table name.
    """
    found: dict[str, Experiment] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in _NOT_STUDIES:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        exp = getattr(module, "EXPERIMENT", None)
        if exp is None:
            continue
        if not isinstance(exp, Experiment):
            raise TypeError(
                f"{module.__name__}.EXPERIMENT must be an lspsde.study.Experiment, got "
                f"{type(exp).__name__}."
            )
        if exp.name in found:
            raise ValueError(f"Two study modules declare the experiment table [{exp.name}].")
        found[exp.name] = exp
    return dict(sorted(found.items()))
