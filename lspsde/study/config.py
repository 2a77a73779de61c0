"""The pieces every study's configuration is made of: strict pydantic models, grid and range
types, the ``[study]`` table, and the settings shared by several studies.

A study module declares its own configuration class (a subclass of [`Strict`][]) next to its
experiment; the schema (``lspsde.study.schema``) assembles the study file's model from them.
"""

import importlib
import inspect
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    model_validator,
)

__all__ = [
    "FitConfig",
    "Grid",
    "Level",
    "NoiseModel",
    "NonNegativeFloat",
    "NormConfig",
    "PositiveFloat",
    "PositiveInt",
    "QuadraticSGD",
    "Strict",
    "StudyConfigError",
    "StudyMeta",
    "noise_classes",
    "noise_parameters",
    "noise_table",
    "parse_noise",
]

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# A confidence level for Monte Carlo intervals (and the posterior probability that flags a
# violation).
Level = Annotated[float, Field(gt=0.5, lt=1)]


def _distinct_sorted(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"grid values must be distinct, got {values}")
    return sorted(values)


def Grid(item, min_length: int = 1):
    """A non-empty list of distinct grid values, returned sorted."""
    return Annotated[list[item], Field(min_length=min_length), AfterValidator(_distinct_sorted)]


class StudyConfigError(ValueError):
    """A study file that cannot be run as written."""


class Strict(BaseModel):
    """A configuration table: unknown keys and wrong types are errors; frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StudyMeta(Strict):
    name: str
    seed: Annotated[int, Field(ge=0)] = 0
    description: str = ""


class NormConfig(Strict):
    method: Literal["auto", "lanczos", "power", "dense"] = "auto"
    max_steps: PositiveInt = 64
    rtol: Annotated[float, Field(gt=0, lt=1)] = 1e-8


class FitConfig(Strict):
    """NumPyro fit of the recursion m_{t+1} = q m_t + c (``lspsde.fit_recursion``)."""

    max_points: Annotated[int, Field(ge=3, le=200)] = 30
    num_warmup: PositiveInt = 200
    num_samples: PositiveInt = 400
    num_chains: PositiveInt = 1  # each chain costs a NUTS compile (seconds)


class QuadraticSGD(Strict):
    """The system shared by the Section-5 studies: SGD on a d-dimensional quadratic with Hessian
    eigenvalues spaced evenly in [mu, L] (randomly rotated) and ``GaussianNoise``."""

    dim: PositiveInt = 10
    mu: PositiveFloat = 0.5
    L: PositiveFloat = 2.0
    sigma0: PositiveFloat = 1.0
    initial_distance: PositiveFloat = 3.0
    n_paths: Annotated[int, Field(ge=50)] = 1000
    level: Level = 0.99
    divergence_threshold: Annotated[float, Field(gt=0, le=1e100)] = 1e8

    @model_validator(mode="after")
    def _mu_le_L(self):
        if self.mu > self.L:
            raise ValueError(
                f"mu = {self.mu} exceeds L = {self.L}; the Hessian eigenvalues lie in [mu, L], "
                "so mu <= L (mu = L: an isotropic quadratic, where Lemma 5.1 is attained)"
            )
        return self


# --- noise models from a study file -----------------------------------------------------------


def noise_classes() -> dict[str, type]:
    """Every concrete noise model class defined so far (``lspsde.noise`` and any module that
    subclasses ``lspsde.noise.AbstractNoise``), by class name: the ``kind``\\ s a study file's
    noise table may name."""
    from ..noise import AbstractNoise

    found: dict[str, type] = {}
    stack = [AbstractNoise]
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            if not inspect.isabstract(sub) and not sub.__name__.startswith("_"):
                found.setdefault(sub.__name__, sub)
    return dict(sorted(found.items()))


def _noise_class(kind: str) -> type:
    from ..noise import AbstractNoise

    if ":" in kind:  # "package.module:Class": a model defined outside lspsde
        module, _, name = kind.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"noise kind {kind!r} cannot be imported: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, AbstractNoise)):
            raise ValueError(f"noise kind {kind!r} is not a subclass of lspsde.AbstractNoise")
        return cls
    classes = noise_classes()
    if kind not in classes:
        raise ValueError(
            f"unknown noise kind {kind!r}; known kinds: {', '.join(classes)} (or "
            "'package.module:Class' for a model defined elsewhere)"
        )
    return classes[kind]


def noise_parameters(kind: str | type) -> dict[str, inspect.Parameter]:
    """The constructor arguments of the noise model ``kind`` (a study file's table keys);
    ``kind`` is a name as [`parse_noise`][] takes it, or the class itself."""
    cls = kind if isinstance(kind, type) else _noise_class(kind)
    params = inspect.signature(cls).parameters
    return {k: p for k, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD}


def parse_noise(table: object):
    """A noise table ``{kind = "StudentTNoise", scale = 0.5, df = 3.0}`` as the noise model
    it names (``StudentTNoise(scale=0.5, df=3.0)``): ``kind`` is the class name and the other
    keys are its constructor's arguments. An existing noise model passes through.

    Studies run in float64, so the model's arrays are built in float64 (0.3 in a study file
    is the double 0.3, not its float32 rounding)."""
    import jax

    from ..noise import AbstractNoise

    if isinstance(table, AbstractNoise):
        return table
    if not isinstance(table, dict) or not isinstance(table.get("kind"), str):
        raise ValueError(
            f"a noise model is a table with a string `kind` (a class name such as "
            f"'IsotropicGaussian') and its arguments, got {table!r}"
        )
    params = dict(table)
    kind = params.pop("kind")
    cls = _noise_class(kind)
    allowed = noise_parameters(cls)
    unknown = sorted(set(params) - set(allowed))
    missing = [k for k, p in allowed.items() if p.default is p.empty and k not in params]
    if unknown or missing:
        what = f"unknown keys {unknown}" if unknown else f"missing keys {missing}"
        raise ValueError(f"noise kind {kind!r}: {what}; its arguments are {list(allowed)}")
    # TOML arrays are lists: the models take arrays (an anisotropic scale, a covariance)
    params = {
        k: np.asarray(v, dtype=float) if isinstance(v, list) else v for k, v in params.items()
    }
    try:
        with jax.enable_x64(True):
            return cls(**params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"noise kind {kind!r} with {params}: {e}") from None


def noise_table(noise) -> dict:
    """The study-file table of a noise model (the inverse of [`parse_noise`][]): ``kind`` and
    every constructor argument, read from the field of the same name."""
    table: dict = {"kind": type(noise).__name__}
    for name in noise_parameters(type(noise)):
        value = getattr(noise, name)
        table[name] = value.tolist() if hasattr(value, "tolist") else value
    return table


NoiseModel = Annotated[
    Any, PlainValidator(parse_noise), PlainSerializer(noise_table, return_type=dict)
]
"""A study-file field holding a noise model: a table parsed by [`parse_noise`][]."""
