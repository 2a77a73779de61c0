"""The study file schema: TOML parsed once into typed, validated objects.

A study file has a ``[study]`` table and one table per experiment it runs::

    [study]
    name = "quickstart"
    seed = 0

    [feedforward_spectral]
    rho = [0.5, 0.9, 1.1]
    depth = [2, 8]

Unknown keys and wrong types are errors that name the key, the value and the allowed keys.
"""

from pathlib import Path
import tomllib

from pydantic import BaseModel, ValidationError, create_model

from . import registry
from .config import Strict, StudyConfigError, StudyMeta

__all__ = ["EXPERIMENTS", "StudyConfig", "StudyConfigError", "load_study", "parse_study"]


class _StudyFile(Strict):
    study: StudyMeta

    def experiments(self) -> dict[str, Strict]:
        """The experiment tables present in the file, in the registry's (name) order."""
        names = [n for n in type(self).model_fields if n != "study"]
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


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


def parse_study(data: dict, *, source: str = "<study>") -> StudyConfig:
    """Validate a parsed TOML document; raise ``StudyConfigError`` naming every bad key."""
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                allowed = _allowed(StudyConfig, err["loc"])
                lines.append(f"  {key}: unknown key; allowed here: {', '.join(allowed)}")
            else:
                lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise StudyConfigError(f"Invalid study file {source}:\n" + "\n".join(lines)) from None
    if not config.experiments():
        raise StudyConfigError(
            f"Study file {source} runs no experiment; add one of the tables "
            f"{', '.join('[' + n + ']' for n in EXPERIMENTS)}."
        )
    return config


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study TOML file; ``StudyConfigError`` for a missing, unreadable,
    non-UTF-8 or invalid one."""
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
    return parse_study(data, source=str(path))
