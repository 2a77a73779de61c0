"""What a study module declares: its [`Experiment`][] (the configuration table it reads, how to
run it, and how to read its dataset), and the report rows ([`Check`][]) it produces."""

from collections.abc import Callable
import dataclasses

from pydantic import BaseModel

__all__ = ["Check", "Experiment"]


@dataclasses.dataclass(frozen=True)
class Check:
    """One row of the report: a theorem's prediction next to the measurement."""

    theorem: str
    case: str
    predicted: str
    measured: str
    holds: bool | None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One kind of experiment: the study file's table ``[name]`` parses into ``config``.

    - `run`: ``(config, key, progress: bool) -> xr.Dataset``;
    - `checks`: ``(xr.Dataset) -> list[Check]``;
    - `figures`: ``(xr.Dataset) -> dict[str, matplotlib.figure.Figure]``;
    - `summary`: ``(xr.Dataset) -> str`` (a Markdown paragraph).
    """

    name: str
    config: type[BaseModel]
    run: Callable
    checks: Callable
    figures: Callable
    summary: Callable
