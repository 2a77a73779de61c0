"""The study file schema: TOML parsed once into typed, validated objects.

A study file has a ``[study]`` table and one table per experiment it runs::

    [study]
    name = "quickstart"
    seed = 0

    [feedforward_spectral]
    rho = [0.5, 0.9, 1.1]
    depth = [2, 8]

    [feedforward_spectral.sizes.ci]   # `--size ci`: the reduced grid the tests run
    rho = [0.5, 1.1]

Unknown keys and wrong types are errors that name the key, the value and the allowed keys.

*Named sizes.* An experiment table may hold a ``sizes`` table with one table per size name
(``[EXPERIMENT.sizes.NAME]``). Parsing at size ``NAME`` merges that table into the experiment's
(sub-tables key by key; lists and scalars replaced) before validation; an experiment without
that size runs as written. The size ``"full"`` is always the file as written (no table may
redefine it). Unknown keys in a size table are errors naming the key and the size table.
"""

import copy
from pathlib import Path
import tomllib
from typing import Any

from pydantic import BaseModel, PrivateAttr, ValidationError, create_model

from . import registry
from .config import Strict, StudyConfigError, StudyMeta

__all__ = [
    "EXPERIMENTS",
    "FULL",
    "StudyConfig",
    "StudyConfigError",
    "load_study",
    "parse_study",
]

FULL = "full"  # the size that is the study file as written


class _StudyFile(Strict):
    study: StudyMeta
    _size: str = PrivateAttr(FULL)
    _size_tables: dict[str, dict[str, dict]] = PrivateAttr(default_factory=dict)

    def experiments(self) -> dict[str, Strict]:
        """The experiment tables present in the file, in the registry's (name) order."""
        names = [n for n in type(self).model_fields if n != "study"]
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def size(self) -> str:
        """The size the file was parsed at (``"full"``: as written)."""
        return self._size

    @property
    def size_tables(self) -> dict[str, dict[str, dict]]:
        """``{experiment: {size: its size table, as written}}`` for each experiment table of
        the file that declares sizes (a copy)."""
        return copy.deepcopy(self._size_tables)

    @property
    def declared_sizes(self) -> tuple[str, ...]:
        """Every size some experiment table declares, sorted (``"full"`` is not among them:
        it is always there)."""
        return tuple(sorted({s for sizes in self._size_tables.values() for s in sizes}))

    def has_size(self, experiment: str, size: str) -> bool:
        """Whether the table ``[experiment]`` declares ``[experiment.sizes.<size>]``."""
        return size in self._size_tables.get(experiment, {})


StudyConfig = create_model(
    "StudyConfig",
    __base__=_StudyFile,
    __doc__="A study file: the [study] table and any of the registered experiment tables.",
    **{name: (exp.config | None, None) for name, exp in registry().items()},
)


EXPERIMENTS = tuple(n for n in StudyConfig.model_fields if n != "study")


def _allowed(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed in the table at ``loc`` (for error messages)."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return sorted(model.model_fields)


def _split_sizes(data: dict, source: str) -> tuple[dict, dict[str, dict[str, dict]]]:
    """A copy of `data` without the experiment tables' ``sizes``, and ``{experiment: {size:
    table}}``; ``StudyConfigError`` for a ``sizes`` that is not a table of tables."""
    data = copy.deepcopy(data)
    tables: dict[str, dict[str, dict]] = {}
    for name, table in data.items():
        if name == "study" or not isinstance(table, dict) or "sizes" not in table:
            continue
        sizes = table.pop("sizes")
        fix = (
            f"write one table per size, e.g. [{name}.sizes.ci] holding the keys of [{name}] "
            "that this size changes"
        )
        if not isinstance(sizes, dict):
            raise StudyConfigError(
                f"Invalid study file {source}: {name}.sizes must be a table of size tables, "
                f"got {sizes!r}; {fix}."
            )
        for size, overlay in sizes.items():
            if not isinstance(overlay, dict):
                raise StudyConfigError(
                    f"Invalid study file {source}: [{name}.sizes.{size}] must be a table of "
                    f"keys of [{name}], got {name}.sizes.{size} = {overlay!r}; {fix}."
                )
            if size == FULL:
                raise StudyConfigError(
                    f"Invalid study file {source}: [{name}.sizes.{FULL}]: the size {FULL!r} is "
                    "always the file as written and cannot be redefined; give this size "
                    "another name."
                )
        tables[name] = sizes
    return data, tables


def _merge(base: dict, overlay: dict) -> dict:
    """`base` with `overlay` merged in: tables key by key, lists and scalars replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _from_overlay(overlay: dict, path: tuple) -> bool:
    """Whether the value at `path` (inside an experiment table) comes from the size table
    `overlay`: a key it sets, or anything inside a value it replaces."""
    node: Any = overlay
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
        if not isinstance(node, dict):
            return True  # a replaced list or scalar: all of it is the size table's
    return bool(path)


def _unknown_size(source: str, size: str, tables: dict[str, dict[str, dict]]) -> StudyConfigError:
    declared = sorted({s for sizes in tables.values() for s in sizes})
    if not declared:
        return StudyConfigError(
            f"Study file {source} declares no size {size!r}: it declares no sizes at all (no "
            f"[EXPERIMENT.sizes.NAME] table), so only {FULL}, the file as written, is there."
        )
    return StudyConfigError(
        f"Study file {source} declares no size {size!r}; its sizes are {', '.join(declared)} "
        f"(from its [EXPERIMENT.sizes.NAME] tables) and {FULL} (the file as written)."
    )


def parse_study(data: dict, *, source: str = "<study>", size: str = FULL) -> StudyConfig:
    """Validate a parsed TOML document at the named `size`; raise ``StudyConfigError`` naming
    every bad key.

    Every experiment table's ``sizes`` is removed before validation; for a `size` other than
    ``"full"`` (the file as written), ``[EXPERIMENT.sizes.<size>]`` is merged into each table
    that declares it (the others run as written). `data` is not changed. An unknown `size`
    (no table declares it) is a ``StudyConfigError`` naming the sizes the file declares."""
    data, tables = _split_sizes(data, source)
    overlays = {n: sizes[size] for n, sizes in tables.items() if size in sizes}
    if size != FULL and not overlays:
        raise _unknown_size(source, size, tables)
    for name, overlay in overlays.items():
        data[name] = _merge(data[name], overlay)
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = err["loc"]
            key = ".".join(str(p) for p in loc)
            where = ""
            if loc and loc[0] in overlays and _from_overlay(overlays[loc[0]], loc[1:]):
                key = ".".join(str(p) for p in (loc[0], "sizes", size, *loc[1:]))
                where = f" (in the size table [{loc[0]}.sizes.{size}])"
            if err["type"] == "extra_forbidden":
                allowed = _allowed(StudyConfig, loc)
                lines.append(f"  {key}: unknown key; allowed here: {', '.join(allowed)}{where}")
            else:
                lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r}){where}")
        at = f" at size {size!r}" if size != FULL else ""
        raise StudyConfigError(f"Invalid study file {source}{at}:\n" + "\n".join(lines)) from None
    if not config.experiments():
        raise StudyConfigError(
            f"Study file {source} runs no experiment; add one of the tables "
            f"{', '.join('[' + n + ']' for n in EXPERIMENTS)}."
        )
    config._size = size
    config._size_tables = tables
    return config


def load_study(path: str | Path, *, size: str = FULL) -> StudyConfig:
    """Read and validate a study TOML file at the named `size` (see [`parse_study`][]);
    ``StudyConfigError`` for a missing, unreadable, non-UTF-8 or invalid one, or a size it does
    not declare."""
    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"No study file at {str(path)!r}.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise StudyConfigError(
            f"{path} is not a UTF-8 text file (byte {e.start}: {e.reason}); a study file is TOML."
        ) from None
    except OSError as e:
        raise StudyConfigError(f"Cannot read the study file {path}: {e.strerror}.") from None
    except tomllib.TOMLDecodeError as e:
        raise StudyConfigError(f"{path} is not valid TOML: {e}") from None
    return parse_study(data, source=str(path), size=size)
