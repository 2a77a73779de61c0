r"""Experiment *lipschitz_dynamics*: the spectral-norm SDE of Luo et al. (2025) against SGD.

Luo et al. model the top singular value $\sigma_1(W_l)$ of each layer, and so the Lipschitz
upper bound $\prod_l\sigma_1(W_l)$, under SGD by an SDE driven by (i) the gradient flow
projected on $\nabla\sigma_1 = u_1v_1^\top$, (ii) the gradient noise projected on it and (iii)
the noise projected on $\nabla^2\sigma_1$ (the Itô term), and they name label noise, batch
size, initialisation and the mini-batch sampling order among the factors that shape it. Here
that claim is a hypothesis: for each factor level the SDE's predicted law of $\sigma_1(t)$ is
set beside an SGD ensemble, with its uncertainty, and every gap is reported with its size.

**Problems** (generated data, $n$ examples, common random numbers across factor levels: one
draw of inputs, teacher, label noise and initial weights, scaled by the level):

- ``teacher_student_linear``: $y = W_\star x + \varsigma\varepsilon$ (``models.teacher_student``
  with no hidden layer, $x \sim N(0, I)$), a linear student $Wx + b$, the loss
  $\frac12\|F(x) - y\|^2$. The teacher's top singular value is planted (``teacher_spike``:
  $W_\star \leftarrow W_\star + s\,\sigma_1(W_\star)u_1v_1^\top$), so that the student's
  $\sigma_1$ stands out of the bulk along the run (the SDE of $\sigma_1$ needs a simple top
  singular value; near a crossing $\sigma_1 = \sigma_2$ it has no meaning).
- ``teacher_student_mlp``: the same with a tanh teacher and a tanh student, one hidden layer
  of ``hidden`` units (two layers $W_1, W_2$).
- ``gaussian_mixture``: a two-class classifier, $x = y\mu + z$, $y = \pm1$ balanced,
  $\|\mu\| = $ ``separation``$/2$, labels flipped with probability $\varsigma$; a tanh MLP
  with one logit and the logistic loss $\log(1 + e^{-yF(x)})$.

**Factors**, one at a time around ``baseline``: label noise $\varsigma$ (the standard deviation
of the regression noise; the flip probability of the classifier), batch size $B$, the
initialisation scale ($W_{ij} \sim N(0, c^2/n_{\rm in})$, biases 0) and the sampling order:

- ``iid``: independent batches of $B$ distinct examples (``lspsde.MinibatchNoise``),
  covariance $\kappa\,C(\theta)$ with $\kappa = (n - B)/(B(n - 1))$ and $C$ the per-example
  gradient covariance;
- ``with_replacement``: $B$ independent indices ([`MinibatchWithReplacement`][]), $\kappa = 1/B$;
- ``shuffled``: epochs of a fresh random permutation cut into $n/B$ batches
  ([`ShuffledMinibatch`][], random reshuffling). One batch has the law of an ``iid`` one, but
  the batches of an epoch are dependent (they partition the data), so the noise is not a
  martingale difference sequence: the SDE, whose noise is independent across steps, is
  tested here with the one-batch covariance, its natural plug-in.

**Measured**, per case: an ensemble of ``n_paths`` SGD paths (one ``jax.vmap`` of
``lspsde.lipschitz.spectral_norm_trajectory``: warm-started power iteration, ``n_iter`` per
step, the residual reported; path $p$ from ``fold_in(key, p)``, the same keys in every case),
at the saved steps the mean and variance over paths of $\sigma_1(W_l)$ and of
$\log\prod_l\sigma_1(W_l)$ with standard errors ($s/\sqrt N$; $\sqrt{(m_4 - s^4)/N}$ for the
variance, no normality assumed). At step $T$, on the first ``lipschitz_paths`` paths: the
data-only estimate $\max_i\|J_F(x_i)\|_2$ over the training inputs
(``lspsde.lipschitz.lipschitz_estimate``), the adversarial lower bound from every training
input (``lspsde.lipschitz.adversarial_lipschitz``) and the product bound $\prod_l\sigma_1(W_l)$
(exact SVD): data $\le$ adversarial $\le L(F) \le$ product for 1-Lipschitz activations.

**Predicted**: ``lspsde.lipschitz.spectral_norm_moments``, the small-noise expansion of the SDE
about the gradient flow (mean and variance to $O(\eta^2)$, the Itô term
$\eta\operatorname{tr}(Q_lP_{ll})$ included), with $\Sigma(\theta)$ the minibatch covariance
from the per-example gradients (``gradient_noise_covariance``) along the flow. One solve per
(problem, label noise, initialisation): the expansion is linear in $\Sigma$ (the flow does
not depend on it, $P$ and the mean shift $\mu$ solve linear equations driven by it), and batch
size and order change $\Sigma = \kappa C$ only through $\kappa$, so their predictions are the
reference solve's noise terms times $\kappa/\kappa_{\rm ref}$ (checked against direct solves
in ``tests/studies/test_lipschitz_dynamics.py``).

**Compared**: $z = (\text{observed} - \text{predicted})/\text{SE}$ at every saved step $t > 0$,
for each layer's $\sigma_1$ and for $\log\prod_l\sigma_1$, mean and variance. A case agrees
when every $|z|$ is below the Bonferroni bound for all comparisons of the study at ``level``;
where it does not, the report gives the largest $|z|$, where, and the relative gap. The SE is
the ensemble's only: the prediction's own $O(\eta^2)$ error is part of what is tested.
``noise_to_gap`` ($\sqrt{\operatorname{Var}\sigma_1}/(\sigma_1 - \sigma_2)$ along the flow)
says whether the expansion's premise holds (about $\ll 1$).

**Measured** (``studies/lipschitz_dynamics.toml``: $\eta = 0.05$, 512 paths $\times$ 200 steps,
$n = 64$, 27 cases; 2 min of CPU time). The prediction agrees in 24 of 27 cases (every $|z| \le
4.64$ over 2,880 comparisons), the variance of $\log\prod\sigma_1$ at $T$ observed/predicted in
$[0.95, 1.19]$ (median 1.06, 20 of 24 above 1: the small-noise variance runs a few percent low
at this $\eta$, inside each case's interval). It fails for shuffled epochs in every problem:
the variance is 0.1-3.2% of the predicted one at epoch ends (z up to $-1.2 \cdot 10^4$) and
the mean misses by up to 0.6% (z up to 94), because within an epoch the noise sums to zero
and the Itô shift does not accumulate. Batch size moves $\operatorname{Var}$ by $\kappa$ (ratios
2.0-2.3 for $B = 4$, 0.43-0.45 for $B = 16$, predicted 2.14 and 0.43) and the mean by less than
its interval; initialisation scale and label noise move the mean through the gradient flow,
predicted to $3 \cdot 10^{-3}$. Data-only $\le$ adversarial $\le$ product on every path; for the
linear student all three are $\|W\|_2$, for the tanh networks the ascent adds 3-25% over the
data and the product bound lies 1-150% above it.
"""

import math
from typing import Annotated, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree
import matplotlib.pyplot as plt
import numpy as np
from pydantic import Field, model_validator
from tqdm.auto import tqdm
import xarray as xr

import models

from .._ensemble import saved_steps
from ..lipschitz import (
    adversarial_lipschitz,
    lipschitz_estimate,
    spectral_norm_moments,
    spectral_norm_trajectory,
)
from ..noise import Assumption1, MinibatchNoise
from ..objectives import SupervisedLoss, parameters
from ..parameter import SGD
from ..system import LearningSystem
from . import _mc
from ._data import Variables
from .config import Grid, Level, NonNegativeFloat, PositiveFloat, PositiveInt, Strict
from .experiment import Check, Experiment

PROBLEMS = ("teacher_student_linear", "teacher_student_mlp", "gaussian_mixture")
ORDERS = ("iid", "with_replacement", "shuffled")
FACTORS = ("label_noise", "batch_size", "init_scale", "order")
_SHORT = {
    "teacher_student_linear": "linear",
    "teacher_student_mlp": "mlp",
    "gaussian_mixture": "mixture",
}
_LAYERS = ("W1", "W2")  # at most two weight matrices (one hidden layer)
_PREMISE = 0.5  # noise/gap above this: the small-noise expansion's premise is strained
_SHUFFLE = 0x5EED  # fold_in tag of a path's epoch permutations, disjoint from its step keys


# --------------------------------------------------------------------------------------------
# The sampling orders the library does not have: two noise models


class MinibatchWithReplacement(MinibatchNoise):
    r"""Minibatch noise with $B$ independent uniform indices (with replacement):
    $G = \frac1B\sum_{j \le B}\nabla\ell_{i_j}$, $\Sigma = \frac1B C(\theta)$ ($\kappa = 1/B$;
    ``lspsde.MinibatchNoise`` draws $B$ distinct indices, $\kappa = (n - B)/(B(n - 1))$).
    Every covariance method of ``MinibatchNoise`` (and its Assumption-1 constants) uses
    `kappa`, so they all hold."""

    @property
    def kappa(self) -> float:
        return 1.0 / self.batch_size

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> Array:
        return jax.random.randint(key, (self.batch_size,), 0, self.data_size)


class ShuffledMinibatch(MinibatchNoise):
    r"""Random reshuffling: epoch $e$ draws a permutation $\pi_e$ of the $n$ examples from
    ``fold_in(seed, e)`` and step $t = em + j$ ($m = n // B$ batches an epoch) uses the
    examples $\pi_e(jB), \dots, \pi_e(jB + B - 1)$; the last $n - mB$ examples of a
    permutation sit out that epoch. The draw depends on the step, bound by `at_time` (as the
    data streams of ``lspsde.noise.stream`` are), and on the path's `seed`, not on the step
    key: build one model per path (``jax.vmap`` over seeds). `covariance` and `kappa` are those
    of one batch (``MinibatchNoise``'s); consecutive batches of an epoch are dependent."""

    seed: PRNGKeyArray
    step: Array

    def __init__(self, batch_size: int, data_size: int, seed: PRNGKeyArray, step=0):
        super().__init__(batch_size, data_size)
        self.seed = seed
        self.step = jnp.asarray(step, dtype=int)

    def at_time(self, t) -> "ShuffledMinibatch":
        return eqx.tree_at(lambda s: s.step, self, jnp.asarray(t, self.step.dtype))

    def sample(self, key: PRNGKeyArray, theta: PyTree[Array]) -> Array:
        m = self.data_size // self.batch_size
        epoch, j = self.step // m, self.step % m
        perm = jax.random.permutation(jax.random.fold_in(self.seed, epoch), self.data_size)
        return jax.lax.dynamic_slice(perm, (j * self.batch_size,), (self.batch_size,))

    def assumption1(self, objective, *, sigma1=None) -> Assumption1:
        return Assumption1(
            None,
            None,
            None,
            "unknown: the batches of an epoch are dependent (no replacement across steps), so "
            "G is not unbiased given the past; Assumption 1 is stated for independent draws",
        )


def _kappa(order: str, batch_size: int, n: int) -> float:
    if order == "with_replacement":
        return 1.0 / batch_size
    return MinibatchNoise(batch_size, n).kappa


# --------------------------------------------------------------------------------------------
# Configuration


class Baseline(Strict):
    """The level of every factor while another one varies."""

    label_noise: NonNegativeFloat = 0.1
    batch_size: PositiveInt = 8
    init_scale: PositiveFloat = 1.0
    order: Literal["iid", "with_replacement", "shuffled"] = "iid"


class LipschitzDynamics(Strict):
    """Predicted (the spectral-norm SDE) against observed (SGD ensembles) sigma_1(W_l) and
    log prod sigma_1 for each level of label noise, batch size, initialisation scale and
    sampling order, on a teacher-student regression and a Gaussian-mixture classifier."""

    problems: list[Literal["teacher_student_linear", "teacher_student_mlp", "gaussian_mixture"]] = (
        list(PROBLEMS)
    )
    label_noise: Grid(NonNegativeFloat) = [0.0, 0.1, 0.3]
    batch_size: Grid(PositiveInt) = [4, 8, 16]
    init_scale: Grid(PositiveFloat) = [0.5, 1.0, 2.0]
    order: list[Literal["iid", "with_replacement", "shuffled"]] = list(ORDERS)
    baseline: Baseline = Baseline()
    n_examples: Annotated[int, Field(ge=4)] = 64
    d_in: PositiveInt = 5
    d_out: PositiveInt = 3
    hidden: PositiveInt = 8
    teacher_spike: NonNegativeFloat = 1.0
    mixture_dim: PositiveInt = 2
    separation: PositiveFloat = 3.0
    eta: PositiveFloat = 0.05
    n_steps: Annotated[int, Field(ge=10)] = 200
    save_every: PositiveInt = 10
    n_paths: Annotated[int, Field(ge=50)] = 512
    n_iter: PositiveInt = 6
    lipschitz_paths: PositiveInt = 4
    adversarial_steps: PositiveInt = 40
    adversarial_step_size: PositiveFloat = 0.5
    level: Level = 0.99

    @model_validator(mode="after")
    def _consistent(self):
        if not self.problems or len(set(self.problems)) != len(self.problems):
            raise ValueError(f"problems must list distinct problems, got {self.problems}")
        if not self.order or len(set(self.order)) != len(self.order):
            raise ValueError(f"order must list distinct orders, got {self.order}")
        for factor in FACTORS:
            if getattr(self.baseline, factor) not in getattr(self, factor):
                raise ValueError(
                    f"baseline.{factor} = {getattr(self.baseline, factor)!r} is not one of the "
                    f"levels {factor} = {getattr(self, factor)}; add it (every factor varies "
                    "around the baseline)"
                )
        n = self.n_examples
        for b in self.batch_size:
            if b > n:
                raise ValueError(f"batch_size {b} exceeds n_examples = {n}")
            if "shuffled" in self.order and n % b:
                raise ValueError(
                    f"n_examples = {n} is not a multiple of batch_size {b}: shuffled epochs "
                    "would leave examples out of every epoch; pick sizes that divide n_examples"
                )
        if "gaussian_mixture" in self.problems and max(self.label_noise) >= 0.5:
            raise ValueError(
                "label_noise is the flip probability of the classifier: keep it below 0.5 "
                f"(got {max(self.label_noise)})"
            )
        if self.n_steps < 2 * self.save_every:
            raise ValueError(
                f"n_steps = {self.n_steps} gives fewer than 2 saved steps after step 0 with "
                f"save_every = {self.save_every}"
            )
        if self.lipschitz_paths > self.n_paths:
            raise ValueError(f"lipschitz_paths = {self.lipschitz_paths} exceeds n_paths")
        return self


def cases(cfg: LipschitzDynamics) -> list[dict]:
    """Every (problem, factor level) case: the baseline and each factor's other levels, the
    rest at the baseline. Keys: ``label``, ``problem``, ``factor``, ``level`` and the four
    factors."""
    base = cfg.baseline.model_dump()
    out = []
    for problem in cfg.problems:
        out.append({"problem": problem, "factor": "baseline", "level": "-", **base})
        for factor in FACTORS:
            for value in getattr(cfg, factor):
                if value == base[factor]:
                    continue
                level = value if isinstance(value, str) else f"{value:g}"
                out.append(
                    {"problem": problem, "factor": factor, "level": level, **base, factor: value}
                )
    for c in out:
        what = "baseline" if c["factor"] == "baseline" else f"{c['factor']}={c['level']}"
        c["label"] = f"{_SHORT[c['problem']]}: {what}"
    return out


# --------------------------------------------------------------------------------------------
# Problems


def _logistic(pred, y):
    return jnp.sum(jax.nn.softplus(-y * pred))


class _FiniteSum(SupervisedLoss):
    """``SupervisedLoss`` as the finite sum ``MinibatchNoise`` samples."""

    @property
    def n_examples(self) -> int:
        return self.inputs.shape[0]

    def per_example_loss(self, theta, i):
        return self.loss_fn(self.network(theta)(self.inputs[i]), self.targets[i])


class _Problem(eqx.Module):
    """One problem's draws: inputs, noise-free targets and a unit label-noise draw."""

    inputs: Array
    clean: Array
    noise: Array  # regression: N(0, 1) per target; classifier: U(0, 1) per example
    widths: tuple[int, ...] = eqx.field(static=True)
    activation: str = eqx.field(static=True)
    classifier: bool = eqx.field(static=True)

    def objective(self, label_noise: float, student) -> _FiniteSum:
        if self.classifier:
            targets = jnp.where(self.noise < label_noise, -self.clean, self.clean)
            return _FiniteSum(student, self.inputs, targets, loss_fn=_logistic)
        return _FiniteSum(student, self.inputs, self.clean + label_noise * self.noise)


def _problem(cfg: LipschitzDynamics, problem: str, key) -> _Problem:
    k_data, k_noise = jax.random.split(key)
    n = cfg.n_examples
    if problem == "gaussian_mixture":
        d = cfg.mixture_dim
        y = jnp.where(jnp.arange(n) < n // 2, 1.0, -1.0)[:, None]
        mu = jnp.zeros(d).at[0].set(cfg.separation / 2)
        x = y * mu[None, :] + jax.random.normal(k_data, (n, d))
        u = jax.random.uniform(k_noise, (n, 1))
        return _Problem(x, y, u, (d, cfg.hidden, 1), "tanh", True)
    hidden = () if problem == "teacher_student_linear" else (cfg.hidden,)
    data = models.teacher_student(k_data, n, cfg.d_in, cfg.d_out, hidden=hidden)
    teacher = data.teacher
    W = teacher.weights[-1]
    U, s, Vt = jnp.linalg.svd(W)
    W = W + cfg.teacher_spike * s[0] * jnp.outer(U[:, 0], Vt[0])
    teacher = eqx.tree_at(lambda t: t.weights, teacher, (*teacher.weights[:-1], W))
    clean = jax.vmap(teacher)(data.inputs)
    eps = jax.random.normal(k_noise, clean.shape)
    act = "identity" if problem == "teacher_student_linear" else "tanh"
    return _Problem(data.inputs, clean, eps, (cfg.d_in, *hidden, cfg.d_out), act, False)


def _student(prob: _Problem, key, init_scale: float):
    return models.mlp(
        key,
        list(prob.widths),
        activation=prob.activation,
        init="gaussian",
        sigma_w=init_scale,
        final_activation=False,
    )


# --------------------------------------------------------------------------------------------
# The ensemble and the estimates at the end of training


@eqx.filter_jit
def _ensemble(objective, theta0, keys, eta, order, batch_size, n_steps, n_iter):
    n = objective.n_examples

    def one(k):
        if order == "shuffled":
            noise = ShuffledMinibatch(batch_size, n, jax.random.fold_in(k, _SHUFFLE))
        elif order == "with_replacement":
            noise = MinibatchWithReplacement(batch_size, n)
        else:
            noise = MinibatchNoise(batch_size, n)
        system = LearningSystem(objective, SGD(eta), noise)
        return spectral_norm_trajectory(system, theta0, key=k, n_steps=n_steps, n_iter=n_iter)

    tr = jax.vmap(one)(keys)
    loss = jax.vmap(objective.loss)(tr.final_theta)
    return tr.sigma, tr.log_bound, tr.residual, tr.final_theta, loss


@eqx.filter_jit
def _estimates(objective, thetas, key, n_steps, step_size):
    def one(theta):
        net = objective.network(theta)
        data = lipschitz_estimate(net, objective.inputs, rtol=1e-10)
        adv = adversarial_lipschitz(
            objective, theta, objective.inputs, n_steps=n_steps, step_size=step_size, key=key
        )
        return data.value, adv.value

    return jax.vmap(one)(thetas)


def _moments(x: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, SE, variance, SE of the variance over the leading (path) axis."""
    n = x.shape[0]
    mean = x.mean(0)
    c = x - mean
    var = (c**2).sum(0) / (n - 1)
    m4 = (c**4).mean(0)
    return {
        "mean": mean,
        "mean_se": x.std(0, ddof=1) / math.sqrt(n),
        "var": var,
        "var_se": np.sqrt(np.maximum(m4 - var**2, 0) / n),
    }


def _z(observed: np.ndarray, predicted: np.ndarray, se: np.ndarray) -> np.ndarray:
    """(observed - predicted) / se; NaN at step 0 (deterministic: se = 0) and where either is
    NaN (an absent layer, a degenerate prediction)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (observed - predicted) / se
    z[0] = np.nan
    return np.where(np.isfinite(z), z, np.nan)


def _pad(x: np.ndarray, n_layers: int) -> np.ndarray:
    """(..., layer) padded with NaN to the two layers of the layer axis."""
    pad = np.full((*x.shape[:-1], len(_LAYERS) - n_layers), np.nan)
    return np.concatenate([np.asarray(x, float), pad], axis=-1)


# --------------------------------------------------------------------------------------------
# run


_LONG = {
    "sigma1_mean": ("MC mean over paths of sigma_1(W_l) (tracked)", "1"),
    "sigma1_mean_se": ("standard error of the MC mean of sigma_1(W_l)", "1"),
    "sigma1_var": ("MC variance over paths of sigma_1(W_l)", "1"),
    "sigma1_var_se": ("standard error of the MC variance of sigma_1(W_l)", "1"),
    "sigma1_pred_mean": ("SDE prediction of E sigma_1(W_l) (small-noise, with Ito term)", "1"),
    "sigma1_pred_var": ("SDE prediction of Var sigma_1(W_l) (term ii)", "1"),
    "sigma1_flow": ("sigma_1(W_l) along the gradient flow (term i integrated)", "1"),
    "sigma1_ito": ("Ito (Hessian) term eta tr(Q_l P_ll) of the predicted mean (term iii)", "1"),
    "sigma1_z_mean": ("z-score (observed - predicted mean) / SE", "1"),
    "sigma1_z_var": ("z-score (observed - predicted variance) / SE", "1"),
    "noise_to_gap": ("predicted sd of sigma_1 over the gap sigma_1 - sigma_2 along the flow", "1"),
    "tracking_residual": ("largest power-iteration residual over paths at the saved step", "1"),
    "log_bound_mean": ("MC mean of log prod_l sigma_1(W_l)", "1"),
    "log_bound_mean_se": ("standard error of the MC mean of log prod_l sigma_1(W_l)", "1"),
    "log_bound_var": ("MC variance of log prod_l sigma_1(W_l)", "1"),
    "log_bound_var_se": ("standard error of the MC variance of log prod_l sigma_1(W_l)", "1"),
    "log_bound_pred_mean": ("SDE prediction of E log prod_l sigma_1(W_l)", "1"),
    "log_bound_pred_var": ("SDE prediction of Var log prod_l sigma_1(W_l)", "1"),
    "log_bound_flow": ("log prod_l sigma_1(W_l) along the gradient flow", "1"),
    "log_bound_z_mean": ("z-score of the mean of log prod_l sigma_1(W_l)", "1"),
    "log_bound_z_var": ("z-score of the variance of log prod_l sigma_1(W_l)", "1"),
    "lipschitz_data": ("data-only estimate max_i ||J_F(x_i)||_2 at step T", "1"),
    "lipschitz_adversarial": ("adversarial lower bound of Lip(F) at step T", "1"),
    "product_bound": ("product bound prod_l sigma_1(W_l) at step T (exact SVD)", "1"),
    "tracking_error": ("max relative error of tracked sigma_1 at step T against an SVD", "1"),
    "final_loss": ("MC mean of the training loss at step T", "1"),
    "kappa": ("covariance factor kappa: Sigma = kappa C(theta)", "1"),
    "n_layers": ("number of weight matrices of the student", "1"),
    "problem": ("problem (teacher-student regression or Gaussian-mixture classifier)", "1"),
    "factor": ("the factor varied in this case (baseline: none)", "1"),
    "level": ("the level of the varied factor", "1"),
    "label_noise": ("label noise: regression noise sd, or classifier flip probability", "1"),
    "batch_size": ("minibatch size B", "1"),
    "init_scale": ("initialisation scale c: W_ij ~ N(0, c^2 / n_in)", "1"),
    "order": ("sampling order: iid, with_replacement, shuffled (epochs)", "1"),
}


def _prediction(pred, factor: float, n_layers: int) -> dict[str, np.ndarray]:
    """The reference solve's prediction with its noise terms scaled by ``factor`` =
    kappa / kappa_ref (module docstring)."""
    flow = np.asarray(pred.sigma1_flow)
    noise_mean = np.asarray(pred.mean) - flow
    return {
        "sigma1_pred_mean": _pad(flow + factor * noise_mean, n_layers),
        "sigma1_pred_var": _pad(factor * np.asarray(pred.variance), n_layers),
        "sigma1_flow": _pad(flow, n_layers),
        "sigma1_ito": _pad(factor * np.asarray(pred.hessian_term), n_layers),
        "noise_to_gap": _pad(math.sqrt(factor) * np.asarray(pred.noise_to_gap), n_layers),
        "log_bound_pred_mean": np.asarray(pred.log_bound_flow)
        + factor * (np.asarray(pred.log_bound_mean) - np.asarray(pred.log_bound_flow)),
        "log_bound_pred_var": factor * np.asarray(pred.log_bound_variance),
        "log_bound_flow": np.asarray(pred.log_bound_flow),
    }


def run(cfg: LipschitzDynamics, key, progress: bool) -> xr.Dataset:
    k_problem, k_init, k_paths, k_adv = jax.random.split(key, 4)
    steps = saved_steps(cfg.n_steps, cfg.save_every)
    path_keys = jax.random.split(k_paths, cfg.n_paths)
    eta = jnp.asarray(cfg.eta)
    all_cases = cases(cfg)
    problems = {
        p: _problem(cfg, p, jax.random.fold_in(k_problem, i))
        for i, p in enumerate(PROBLEMS)
        if p in cfg.problems
    }
    ref_b = cfg.baseline.batch_size
    kappa_ref = _kappa("iid", ref_b, cfg.n_examples)
    predictions: dict[tuple, object] = {}
    rows: dict[str, list] = {}

    def put(name, value):
        rows.setdefault(name, []).append(np.asarray(value))

    for case in tqdm(all_cases, disable=not progress, desc="lipschitz_dynamics"):
        prob = problems[case["problem"]]
        student = _student(prob, k_init, case["init_scale"])
        objective = prob.objective(case["label_noise"], student)
        theta0 = parameters(student)
        n_layers = len(prob.widths) - 1
        ref = (case["problem"], case["label_noise"], case["init_scale"])
        if ref not in predictions:
            predictions[ref] = spectral_norm_moments(
                objective,
                MinibatchNoise(ref_b, cfg.n_examples),
                theta0,
                cfg.eta,
                n_steps=cfg.n_steps,
                save_every=cfg.save_every,
                on_degenerate="fallback",
            )
        kappa = _kappa(case["order"], case["batch_size"], cfg.n_examples)
        pred = _prediction(predictions[ref], kappa / kappa_ref, n_layers)
        sigma, log_bound, residual, final, loss = _ensemble(
            objective,
            theta0,
            path_keys,
            eta,
            case["order"],
            case["batch_size"],
            cfg.n_steps,
            cfg.n_iter,
        )
        sigma, log_bound = np.asarray(sigma)[:, steps], np.asarray(log_bound)[:, steps]
        obs = _moments(sigma)
        obs_log = _moments(log_bound)
        for part in ("mean", "mean_se", "var", "var_se"):
            put(f"sigma1_{part}", _pad(obs[part], n_layers))
            put(f"log_bound_{part}", obs_log[part])
        for name, value in pred.items():
            put(name, value)
        put(
            "sigma1_z_mean",
            _z(rows["sigma1_mean"][-1], pred["sigma1_pred_mean"], rows["sigma1_mean_se"][-1]),
        )
        put(
            "sigma1_z_var",
            _z(rows["sigma1_var"][-1], pred["sigma1_pred_var"], rows["sigma1_var_se"][-1]),
        )
        put(
            "log_bound_z_mean", _z(obs_log["mean"], pred["log_bound_pred_mean"], obs_log["mean_se"])
        )
        put("log_bound_z_var", _z(obs_log["var"], pred["log_bound_pred_var"], obs_log["var_se"]))
        put("tracking_residual", _pad(np.asarray(residual)[:, steps].max(0), n_layers))
        # at step T: exact SVDs, the data-only and the adversarial estimates
        weights = [np.asarray(w) for w in final.weights]
        exact = np.stack([np.linalg.svd(w, compute_uv=False)[:, 0] for w in weights], -1)
        put("tracking_error", float(np.max(np.abs(sigma[:, -1] / exact - 1))))
        first = jax.tree.map(lambda a: a[: cfg.lipschitz_paths], final)
        data, adv = _estimates(
            objective, first, k_adv, cfg.adversarial_steps, jnp.asarray(cfg.adversarial_step_size)
        )
        put("lipschitz_data", np.asarray(data))
        put("lipschitz_adversarial", np.asarray(adv))
        put("product_bound", np.prod(exact[: cfg.lipschitz_paths], axis=-1))
        put("final_loss", float(np.mean(np.asarray(loss))))
        put("kappa", kappa)
        put("n_layers", n_layers)

    v = Variables()
    dims = {
        "sigma1": ("case", "step", "layer"),
        "log_bound": ("case", "step"),
        "noise_to_gap": ("case", "step", "layer"),
        "tracking_residual": ("case", "step", "layer"),
        "lipschitz": ("case", "lipschitz_path"),
        "product_bound": ("case", "lipschitz_path"),
    }
    for name, values in rows.items():
        stem = next((k for k in dims if name.startswith(k)), None)
        long_name, units = _LONG[name]
        v.add(name, dims.get(stem, ("case",)), np.stack(values), long_name, units)
    for name in ("problem", "factor", "level", "order"):
        v.add(name, ("case",), np.asarray([str(c[name]) for c in all_cases]), *_LONG[name])
    for name in ("label_noise", "batch_size", "init_scale"):
        v.add(name, ("case",), np.asarray([c[name] for c in all_cases]), *_LONG[name])
    n_tests = _n_tests(len(all_cases), steps.size - 1, rows)
    return v.dataset(
        coords={
            "case": ([c["label"] for c in all_cases], "problem and factor level", "1"),
            "step": (steps, "training step t", "step"),
            "layer": (list(_LAYERS), "weight matrix of the student (input side first)", "1"),
            "lipschitz_path": (np.arange(cfg.lipschitz_paths), "path index (first paths)", "1"),
        },
        attrs={
            "theorem": "Luo et al. (2025), the SDE of sigma_1 under SGD (drift, noise, Ito)",
            "eta": cfg.eta,
            "n_paths": cfg.n_paths,
            "n_steps": cfg.n_steps,
            "n_examples": cfg.n_examples,
            "level": cfg.level,
            "n_comparisons": n_tests,
            "z_bound": _mc.z_value(cfg.level, n_tests),
            "baseline": str(cfg.baseline.model_dump()),
        },
    )


def _n_tests(n_cases: int, n_steps: int, rows: dict) -> int:
    """Every (case, saved step t > 0, quantity, moment) comparison of the study: the
    Bonferroni family of the agreement checks."""
    layers = sum(int(k) for k in rows["n_layers"])
    return 2 * n_steps * (layers + n_cases)


# --------------------------------------------------------------------------------------------
# Reading the dataset


def _worst(s: xr.Dataset, moment: str) -> dict:
    """The largest |z| of one case over the saved steps t > 0, the layers and the log bound
    for ``moment`` ('mean' or 'var'), where it is, and the observed and predicted values."""
    best = {"z": 0.0}
    k = slice(1, None)
    n_layers = int(s.n_layers)
    for j, layer in enumerate(_LAYERS[:n_layers]):
        z = s[f"sigma1_z_{moment}"].values[k, j]
        if np.any(np.isfinite(z)) and np.nanmax(np.abs(z)) > abs(best["z"]):
            i = int(np.nanargmax(np.abs(z)))
            best = {
                "z": float(z[i]),
                "where": f"sigma_1({layer})",
                "step": int(s.step[1 + i]),
                "observed": float(s[f"sigma1_{moment}"].values[1 + i, j]),
                "predicted": float(s[f"sigma1_pred_{moment}"].values[1 + i, j]),
            }
    z = s[f"log_bound_z_{moment}"].values[k]
    if np.any(np.isfinite(z)) and np.nanmax(np.abs(z)) > abs(best["z"]):
        i = int(np.nanargmax(np.abs(z)))
        best = {
            "z": float(z[i]),
            "where": "log prod sigma_1",
            "step": int(s.step[1 + i]),
            "observed": float(s[f"log_bound_{moment}"].values[1 + i]),
            "predicted": float(s[f"log_bound_pred_{moment}"].values[1 + i]),
        }
    if "where" not in best:
        best = {
            "z": math.nan,
            "where": "-",
            "step": -1,
            "observed": math.nan,
            "predicted": math.nan,
        }
    return best


def _gap(w: dict, moment: str) -> str:
    rel = w["observed"] / w["predicted"] - 1 if w["predicted"] else math.nan
    what = "mean" if moment == "mean" else "variance"
    return (
        f"{what} of {w['where']} at step {w['step']}: observed {w['observed']:.5g}, predicted "
        f"{w['predicted']:.5g} ({rel:+.1%}, z = {w['z']:+.1f})"
    )


def agreement(ds: xr.Dataset) -> dict[str, dict[str, dict]]:
    """``{case: {"mean": worst, "var": worst}}``, each with ``agrees`` (|z| below the bound)."""
    bound = float(ds.attrs["z_bound"])
    out = {}
    for label in map(str, ds.case.values):
        s = ds.sel(case=label)
        out[label] = {}
        for moment in ("mean", "var"):
            w = _worst(s, moment)
            w["agrees"] = bool(np.isfinite(w["z"]) and abs(w["z"]) <= bound)
            w["noise_to_gap"] = float(np.nanmax(s.noise_to_gap.values))
            out[label][moment] = w
    return out


def checks(ds: xr.Dataset) -> list[Check]:
    rows = []
    bound = float(ds.attrs["z_bound"])
    agree = agreement(ds)
    for label in map(str, ds.case.values):
        s = ds.sel(case=label)
        for moment, name in (
            ("mean", "E sigma_1, E log prod"),
            ("var", "Var sigma_1, Var log prod"),
        ):
            w = agree[label][moment]
            ratio = w["noise_to_gap"]
            note = f"noise/gap <= {ratio:.2f}" + (
                " (the expansion's premise is strained: sigma_1 close to sigma_2)"
                if ratio > _PREMISE
                else ""
            )
            if not w["agrees"]:
                note = "DISAGREE: " + _gap(w, moment) + "; " + note
            rows.append(
                Check(
                    f"SDE of sigma_1: {name}",
                    label,
                    f"|z| <= {bound:.2f} at every saved step",
                    f"max |z| = {abs(w['z']):.2f} ({w['where']}, step {w['step']})",
                    w["agrees"],
                    note,
                )
            )
        data, adv = s.lipschitz_data.values, s.lipschitz_adversarial.values
        prod = s.product_bound.values
        tol = 1e-9
        ordered = bool(np.all(data <= adv * (1 + tol)) and np.all(adv <= prod * (1 + tol)))
        rows.append(
            Check(
                "Lipschitz bounds at step T",
                label,
                "data-only <= adversarial <= product",
                f"{data.mean():.4g} <= {adv.mean():.4g} <= {prod.mean():.4g} (means over "
                f"{data.size} paths)",
                ordered,
                f"adversarial / data = {np.mean(adv / data):.3g}, product / adversarial = "
                f"{np.mean(prod / adv):.3g}; tracking error at T {float(s.tracking_error):.1e}",
            )
        )
    return rows


def _fmt(x: float, se: float) -> str:
    return f"{x:.4g} ± {2 * se:.2g}"


def summary(ds: xr.Dataset) -> str:
    agree = agreement(ds)
    n_cases = ds.sizes["case"]
    held = sum(a["mean"]["agrees"] and a["var"]["agrees"] for a in agree.values())
    head = (
        f"SGD (eta = {ds.attrs['eta']:g}, {ds.attrs['n_paths']} paths x {ds.attrs['n_steps']} "
        f"steps, n = {ds.attrs['n_examples']} examples) against the small-noise prediction of "
        "the spectral-norm SDE (drift, noise and Itô terms; minibatch covariance from the "
        f"per-example gradients). Each factor varies around the baseline {ds.attrs['baseline']}."
        f" The prediction agrees with the ensemble (every |z| <= {ds.attrs['z_bound']:.2f}, "
        f"Bonferroni over {ds.attrs['n_comparisons']} comparisons at {ds.attrs['level']:.0%}) "
        f"in {held} of {n_cases} cases.\n\n"
    )
    gaps = []
    for label, a in agree.items():
        for moment in ("mean", "var"):
            if not a[moment]["agrees"]:
                gaps.append(f"- **{label}**: " + _gap(a[moment], moment))
    if gaps:
        head += "Where prediction and observation disagree (largest gap per case):\n\n"
        head += "\n".join(gaps) + "\n\n"
    else:
        head += "No disagreement at this size.\n\n"
    ok = [str(c) for c, a in agree.items() if a["mean"]["agrees"] and a["var"]["agrees"]]
    if ok:
        last = ds.isel(step=-1).sel(case=ok)
        ratio = (last.log_bound_var / last.log_bound_pred_var).values
        head += (
            "Where they agree, the observed / predicted Var log Π σ1 at step T lies in "
            f"[{np.nanmin(ratio):.3g}, {np.nanmax(ratio):.3g}] (median {np.nanmedian(ratio):.3g}"
            f"; {int(np.sum(ratio > 1))} of {ratio.size} above 1).\n\n"
        )
    table = [
        "| case | log Π σ1 at T: observed ± 2SE | predicted (flow) | Var: observed / "
        "predicted | max abs z (mean, var) | data / adversarial / product Lipschitz | loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in map(str, ds.case.values):
        s = ds.sel(case=label).isel(step=-1)
        a = agree[label]
        var_ratio = float(s.log_bound_var) / float(s.log_bound_pred_var)
        table.append(
            f"| {label} | {_fmt(float(s.log_bound_mean), float(s.log_bound_mean_se))} | "
            f"{float(s.log_bound_pred_mean):.4g} ({float(s.log_bound_flow):.4g}) | "
            f"{var_ratio:.3g} | {abs(a['mean']['z']):.1f}, {abs(a['var']['z']):.1f} | "
            f"{float(s.lipschitz_data.mean()):.3g} / {float(s.lipschitz_adversarial.mean()):.3g}"
            f" / {float(s.product_bound.mean()):.3g} | {float(s.final_loss):.3g} |"
        )
    effects = _effects(ds)
    return head + "\n".join(table) + ("\n\n" + effects if effects else "")


def _effects(ds: xr.Dataset) -> str:
    """Each factor level's effect at step T against its problem's baseline: the change of
    E log Π σ1 (observed with a 2 SE interval, errors taken as independent, beside predicted)
    and the ratio of Var log Π σ1 (observed, predicted)."""
    lines = []
    last = ds.isel(step=-1)
    problem, factor = ds.problem.values.astype(str), ds.factor.values.astype(str)
    for p in dict.fromkeys(problem):
        labels = ds.case.values[problem == p]
        base = ds.case.values[(problem == p) & (factor == "baseline")]
        if base.size != 1:
            continue
        b = last.sel(case=base[0])
        for label in labels:
            if label == base[0]:
                continue
            s = last.sel(case=label)
            d_obs = float(s.log_bound_mean - b.log_bound_mean)
            se = math.hypot(float(s.log_bound_mean_se), float(b.log_bound_mean_se))
            d_pred = float(s.log_bound_pred_mean - b.log_bound_pred_mean)
            r_obs = float(s.log_bound_var / b.log_bound_var)
            r_pred = float(s.log_bound_pred_var / b.log_bound_pred_var)
            lines.append(
                f"| {label} | {d_obs:+.4f} ± {2 * se:.2g} | {d_pred:+.4f} | {r_obs:.3g} | "
                f"{r_pred:.3g} |"
            )
    if not lines:
        return ""
    return (
        "Effect of each factor level at step T, against its problem's baseline:\n\n"
        "| case | Δ E log Π σ1 observed ± 2SE | predicted | Var ratio observed | predicted |\n"
        "|---|---|---|---|---|\n" + "\n".join(lines)
    )


def _panels(ds: xr.Dataset, curves, title: str, log: bool = False):
    """One panel per (problem, factor): for each level, ``curves(s)`` = (steps, observed,
    its 2 SE, predicted) as points with error bars and a line."""
    problems = list(dict.fromkeys(map(str, ds.problem.values)))
    factors = [f for f in FACTORS if f in set(map(str, ds.factor.values))] or ["baseline"]
    fig, axes = plt.subplots(
        len(problems),
        len(factors),
        squeeze=False,
        figsize=(3.4 * len(factors), 2.8 * len(problems)),
    )
    problem, factor_of = ds.problem.values.astype(str), ds.factor.values.astype(str)
    for i, p in enumerate(problems):
        for j, factor in enumerate(factors):
            ax = axes[i, j]
            mask = (problem == p) & ((factor_of == factor) | (factor_of == "baseline"))
            for c, label in enumerate(ds.case.values[mask]):
                t, obs, err, pred = curves(ds.sel(case=label))
                short = str(label).split(": ", 1)[1]
                ax.errorbar(t, obs, yerr=err, fmt="o", ms=2.5, color=f"C{c}", lw=0.8, label=short)
                ax.plot(t, pred, "-", color=f"C{c}", lw=1.0)
            if log:
                ax.set_yscale("log")
            ax.set_title(f"{_SHORT.get(p, p)}: {factor}", fontsize=8)
            ax.set_xlabel("step t", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=5)
    fig.suptitle(f"{title}: SGD ensembles (points, ±2 SE) and the SDE prediction (lines)")
    fig.tight_layout()
    return fig


def figures(ds: xr.Dataset) -> dict:
    figs = {}
    figs["log_bound"] = _panels(
        ds,
        lambda s: (
            s.step.values,
            s.log_bound_mean.values,
            2 * s.log_bound_mean_se.values,
            s.log_bound_pred_mean.values,
        ),
        "E log Π σ1",
    )
    # the noise-induced part: the mean minus the gradient flow's value (Itô term + mean shift)
    figs["log_bound_noise_shift"] = _panels(
        ds,
        lambda s: (
            s.step.values,
            (s.log_bound_mean - s.log_bound_flow).values,
            2 * s.log_bound_mean_se.values,
            (s.log_bound_pred_mean - s.log_bound_flow).values,
        ),
        "E log Π σ1 minus its gradient-flow value",
    )
    figs["log_bound_variance"] = _panels(
        ds.isel(step=slice(1, None)),  # step 0 is deterministic
        lambda s: (
            s.step.values,
            s.log_bound_var.values,
            2 * s.log_bound_var_se.values,
            s.log_bound_pred_var.values,
        ),
        "Var log Π σ1",
        log=True,
    )

    fig, ax = plt.subplots(figsize=(max(6, 0.45 * ds.sizes["case"]), 3.6))
    x = np.arange(ds.sizes["case"])
    for var, marker, label in (
        ("lipschitz_data", "o", "data-only"),
        ("lipschitz_adversarial", "^", "adversarial"),
        ("product_bound", "s", "product bound"),
    ):
        ax.plot(x, ds[var].mean("lipschitz_path").values, marker, ms=5, label=label)
    ax.set_xticks(x, list(map(str, ds.case.values)), rotation=75, fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("Lipschitz estimate at step T")
    ax.set_title("data-only <= adversarial <= L(F) <= product (mean over paths)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    figs["lipschitz"] = fig

    agree = agreement(ds)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * ds.sizes["case"]), 3.2))
    zm = [abs(agree[str(c)]["mean"]["z"]) for c in ds.case.values]
    zv = [abs(agree[str(c)]["var"]["z"]) for c in ds.case.values]
    ax.bar(x - 0.2, zm, 0.4, label="mean")
    ax.bar(x + 0.2, zv, 0.4, label="variance")
    ax.axhline(float(ds.attrs["z_bound"]), color="k", lw=0.8, ls="--", label="Bonferroni bound")
    ax.set_yscale("log")
    ax.set_xticks(x, list(map(str, ds.case.values)), rotation=75, fontsize=6)
    ax.set_ylabel("max |z| over steps")
    ax.set_title("SDE prediction against SGD: largest |z| per case")
    ax.legend(fontsize=7)
    fig.tight_layout()
    figs["z_scores"] = fig
    return figs


EXPERIMENT = Experiment(
    name="lipschitz_dynamics",
    config=LipschitzDynamics,
    run=run,
    checks=checks,
    figures=figures,
    summary=summary,
)
