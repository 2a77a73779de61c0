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
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1)]


def _distinct_sorted(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"grid values must be distinct, got {values}")
    return sorted(values)


def Grid(item, min_length: int = 1):
    """A non-empty list of distinct grid values, returned sorted."""
    return Annotated[list[item], Field(min_length=min_length), AfterValidator(_distinct_sorted)]


class StudyConfigError(ValueError):
    """A study file that cannot be run as written."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StudyMeta(_Strict):
    name: str
    seed: Annotated[int, Field(ge=0)] = 0
    description: str = ""


class NormConfig(_Strict):
    method: Literal["auto", "lanczos", "power", "dense"] = "auto"
    max_steps: PositiveInt = 64
    rtol: Annotated[float, Field(gt=0, lt=1)] = 1e-8


class FeedforwardSpectral(_Strict):
    """Theorem 4.1: measured forward exponent against log(rho) over a grid of rho and depth."""

    rho: Grid(PositiveFloat)
    depth: Grid(PositiveInt)
    activation: list[Literal["relu", "tanh", "identity", "leaky_relu", "hard_tanh"]] = [
        "identity",
        "relu",
        "tanh",
    ]
    width: PositiveInt = 32
    n_probes: Annotated[int, Field(ge=2)] = 16
    init: Literal["orthogonal", "spectral"] = "orthogonal"
    norm: NormConfig = NormConfig()


class ResidualCFL(_Strict):
    """Lemma 4.2 / Theorem 4.3 / Corollary 4.4: sweep h across h_max and over dissipativity m."""

    m: Grid(PositiveFloat)
    M_g: PositiveFloat = 2.0
    h_over_hmax: Grid(PositiveFloat, min_length=2)
    kind: list[Literal["linear_shared", "linear", "nonlinear"]] = [
        "linear_shared",
        "linear",
        "nonlinear",
    ]
    dim: PositiveInt = 16
    depth: PositiveInt = 32
    n_probes: PositiveInt = 8
    nonlinear_fraction: Annotated[float, Field(ge=0, le=1)] = 0.5
    norm: NormConfig = NormConfig()


class StudyConfig(_Strict):
    study: StudyMeta
    feedforward_spectral: FeedforwardSpectral | None = None
    residual_cfl: ResidualCFL | None = None

    def experiments(self) -> dict[str, _Strict]:
        """The experiment tables present in the file, in file order of the schema."""
        names = [n for n in type(self).model_fields if n != "study"]
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


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
    """Read and validate a study TOML file."""
    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"No study file at {str(path)!r}.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise StudyConfigError(f"{path} is not valid TOML: {e}") from None
    return parse_study(data, source=str(path))
