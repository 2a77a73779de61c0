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

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

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


class FitConfig(_Strict):
    """NumPyro fit of the recursion m_{t+1} = q m_t + c (``lspsde.fit_recursion``)."""

    max_points: Annotated[int, Field(ge=3, le=200)] = 30
    num_warmup: PositiveInt = 200
    num_samples: PositiveInt = 400
    num_chains: PositiveInt = 1  # each chain costs a NUTS compile (seconds)


class _QuadraticSGD(_Strict):
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


class SGDConstant(_QuadraticSGD):
    """Lemma 5.1 / Theorem 5.2: constant-step SGD over a grid of eta / eta_max across 1."""

    eta_over_etamax: Grid(PositiveFloat, min_length=2)
    sigma1: NonNegativeFloat = 0.5
    n_steps: Annotated[int, Field(ge=20)] = 1000
    save_every: PositiveInt = 1
    fit: FitConfig = FitConfig()

    @model_validator(mode="after")
    def _sizes(self):
        if self.n_steps < 20 * self.save_every:
            raise ValueError(
                f"n_steps = {self.n_steps} gives fewer than 20 saved steps with save_every = "
                f"{self.save_every}; the tail mean and the fit need more"
            )
        if self.fit.max_points * self.save_every > 1000 or self.n_steps < (
            self.fit.max_points * self.save_every
        ):
            raise ValueError(
                f"the recursion fit needs fit.max_points = {self.fit.max_points} saved steps "
                f"within the first min(1000, n_steps) steps; with save_every = "
                f"{self.save_every} and n_steps = {self.n_steps} there are not enough. Lower "
                "save_every or fit.max_points"
            )
        if self.n_paths < self.fit.max_points + 3:
            raise ValueError(
                f"n_paths = {self.n_paths} cannot estimate the {self.fit.max_points}-point "
                "covariance of the recursion fit; use n_paths >= fit.max_points + 3"
            )
        return self


class SGDDecreasing(_QuadraticSGD):
    """Theorem 5.3: Robbins-Monro steps eta_t = c/(t + t0)^p, c = c_mu / mu; the rate of
    E||theta^t - theta*||^2 and its limit constant against the closed form."""

    c_mu: Grid(PositiveFloat)
    p: Grid(Annotated[float, Field(gt=0.5, le=1)])
    sigma1: Grid(NonNegativeFloat) = [0.0]
    t0: PositiveFloat = 10.0
    n_paths: Annotated[int, Field(ge=50)] = 500
    n_steps: Annotated[int, Field(ge=100)] = 5000
    save_every: PositiveInt = 10
    n_sensitivity: Annotated[int, Field(ge=2)] = 16

    @model_validator(mode="after")
    def _sizes(self):
        if self.n_steps < 50 * self.save_every:
            raise ValueError(
                f"n_steps = {self.n_steps} gives fewer than 50 saved steps with save_every = "
                f"{self.save_every}; the log-log slope needs more"
            )
        return self


NoiseKind = Literal[
    "none",
    "isotropic",
    "anisotropic",
    "gaussian",
    "curvature",
    "minibatch",
    "student_t",
    "alpha_stable",
]


class NoiseAblation(_Strict):
    """Every noise model on one least-squares problem at a matched noise level (Section 5)."""

    noise: list[NoiseKind] = list(NoiseKind.__args__)
    dim: PositiveInt = 5
    n_examples: Annotated[int, Field(ge=2)] = 64
    data_noise: PositiveFloat = 0.5
    batch_size: PositiveInt = 8
    eta_over_etamax: Annotated[float, Field(gt=0, lt=1)] = 0.4
    initial_distance: PositiveFloat = 2.0
    gaussian_sigma1: NonNegativeFloat = 0.3
    student_df: Grid(PositiveFloat) = [5.0, 1.5]
    stable_alpha: Grid(Annotated[float, Field(gt=1, le=2)]) = [1.5]
    n_paths: Annotated[int, Field(ge=50)] = 1000
    n_steps: Annotated[int, Field(ge=20)] = 1000
    save_every: PositiveInt = 5
    n_variance_draws: Annotated[int, Field(ge=100)] = 20000
    level: Level = 0.99
    divergence_threshold: Annotated[float, Field(gt=0, le=1e100)] = 1e8

    @model_validator(mode="after")
    def _sizes(self):
        if len(set(self.noise)) != len(self.noise) or not self.noise:
            raise ValueError(f"noise must list distinct models, got {self.noise}")
        if self.n_examples < self.dim:
            raise ValueError(
                f"n_examples = {self.n_examples} < dim = {self.dim}: the least-squares "
                "Hessian A^T A / n would be singular (mu = 0); use n_examples >= dim"
            )
        if self.batch_size > self.n_examples:
            raise ValueError(
                f"batch_size = {self.batch_size} exceeds n_examples = {self.n_examples}"
            )
        if self.n_steps < 20 * self.save_every:
            raise ValueError(
                f"n_steps = {self.n_steps} gives fewer than 20 saved steps with save_every = "
                f"{self.save_every}"
            )
        return self


class ContinuousLimit(_Strict):
    """SGD against its SDE limit (Li-Tai-E) and its ODE limit over a grid of eta, with fitted
    orders; residual networks against their neural-ODE limit over a grid of depths."""

    eta_over_etamax: Grid(PositiveFloat, min_length=3) = [0.05, 0.1, 0.2, 0.4, 1.5]
    horizon: PositiveFloat = 1.0
    systems: list[Literal["quadratic", "least_squares", "two_layer", "heavy_tailed"]] = [
        "quadratic",
        "least_squares",
        "two_layer",
        "heavy_tailed",
    ]
    sigma: PositiveFloat = 0.5
    dim: Annotated[int, Field(ge=2, le=64)] = 4
    n_paths: Annotated[int, Field(ge=16)] = 2048
    residual_depths: Grid(PositiveInt, min_length=3) = [4, 8, 16, 32, 64]
    residual_horizon: PositiveFloat = 2.0
    residual_dim: PositiveInt = 4
    n_probes: PositiveInt = 8
    level: Level = 0.95

    @model_validator(mode="after")
    def _enough_stable_steps(self):
        if sum(r < 1 for r in self.eta_over_etamax) < 3:
            raise ValueError(
                f"eta_over_etamax = {self.eta_over_etamax} has fewer than 3 values below 1; an "
                "order fit needs at least 3 steps where the limit theory applies"
            )
        if not self.systems:
            raise ValueError("systems is empty; name at least one of the four systems")
        return self


class StudyConfig(_Strict):
    study: StudyMeta
    feedforward_spectral: FeedforwardSpectral | None = None
    residual_cfl: ResidualCFL | None = None
    sgd_constant: SGDConstant | None = None
    sgd_decreasing: SGDDecreasing | None = None
    noise_ablation: NoiseAblation | None = None
    continuous_limit: ContinuousLimit | None = None

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
