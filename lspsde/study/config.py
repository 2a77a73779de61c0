"""The pieces every study's configuration is made of: strict pydantic models, grid and range
types, the ``[study]`` table, and the settings shared by several studies.

A study module declares its own configuration class (a subclass of [`Strict`][]) next to its
experiment; the schema (``lspsde.study.schema``) assembles the study file's model from them.
"""

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "FitConfig",
    "Grid",
    "Level",
    "NonNegativeFloat",
    "NormConfig",
    "PositiveFloat",
    "PositiveInt",
    "QuadraticSGD",
    "Strict",
    "StudyConfigError",
    "StudyMeta",
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
