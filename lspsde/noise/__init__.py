r"""Update noise $u^t$ and the stochastic gradient $G(\theta, u)$ (Section 5, eq. 5.1).

A noise model draws $u^t$ from a key and says how it enters the gradient oracle. Keeping the
noise source apart from the update rule (as diffrax keeps drift, diffusion and the Brownian
path apart) lets the same model feed the discrete update and, later, its continuous-time limit
through [`AbstractNoise.covariance`][] $\Sigma(\theta)$. Keys are derived per step with
``jax.random.fold_in(key, t)``, so a path does not depend on how a run is chunked.

$u$ is the *driving* randomness (standard innovations, or data indices), not the realised
perturbation: state dependence lives in $G(\theta, u)$, so that $\partial G/\partial\theta$ at
fixed $u$ is the Lipschitz constant $L_G$ of (5.2), and $\partial G / \partial u$ gives $L^G_u$.

Every model declares the noise half of Assumption 1,
$\mathbb{E}[G \mid \theta] = \nabla\mathcal{L}(\theta)$ and
$\mathbb{E}[\|G - \nabla\mathcal{L}(\theta)\|^2 \mid \theta] \le \sigma_0^2 +
\sigma_1^2\|\theta - \theta^*\|^2$, through [`AbstractNoise.assumption1`][].

**Families** (one module each):

- ``lspsde.noise.base``: the interface [`AbstractNoise`][], the declaration [`Assumption1`][],
  and exact gradients [`NoNoise`][].
- ``lspsde.noise.gaussian``: $G = \nabla\mathcal{L} + B(\theta)\xi$, $\xi \sim N(0, I)$
  ([`IsotropicGaussian`][], [`AnisotropicGaussian`][], [`GaussianNoise`][]); their SDE limit is
  driven by the same draws.
- ``lspsde.noise.data``: sampling noise of a finite data set, $u$ integer indices
  ([`CurvatureNoise`][], [`MinibatchNoise`][]).
- ``lspsde.noise.heavy_tailed``: i.i.d. heavy-tailed entries ([`StudentTNoise`][],
  [`AlphaStableNoise`][]), where Assumption 1 and the diffusion limit can fail.
- ``lspsde.noise.stream``: non-stationary data, fresh minibatches from a law $P_t$ that drifts
  over training time ([`StreamNoise`][] on a [`DataStream`][]: [`RotatingTeacher`][],
  [`CovariateShift`][], [`Piecewise`][] label-noise schedules).
- ``lspsde.noise.helpers``: the building blocks of all of them, public for new models.

| model | $u$ | $\mathbb{E}\|G - \nabla\mathcal{L}\|^2$ | Assumption 1 |
|---|---|---|---|
| [`NoNoise`][] | $0$ | $0$ | $\sigma_0 = \sigma_1 = 0$ |
| [`IsotropicGaussian`][] | $\xi \sim N(0, I)$ | $\sigma^2$ | $\sigma_0 = \sigma$, $\sigma_1 = 0$ |
| [`AnisotropicGaussian`][] | $\xi \sim N(0, I)$ | $\operatorname{tr}CC^\top$ | $\sigma_0^2 = \operatorname{tr}\Sigma$ |
| [`GaussianNoise`][] | $(\xi_0, \xi_1)$ | $\sigma_0^2 + \sigma_1^2\|\theta-\theta^*\|^2$ | exact |
| [`CurvatureNoise`][] | row indices | quadratic in $\theta - \theta^*$ | frontier (see class) |
| [`MinibatchNoise`][] | example indices | finite-population formula | frontier if quadratic |
| [`StudentTNoise`][] | $t_\nu$ draws | $\sigma^2\nu/(\nu-2)$ or $\infty$ | fails for $\nu \le 2$ |
| [`AlphaStableNoise`][] | $S\alpha S$ draws | $\infty$ for $\alpha < 2$ | fails for $\alpha < 2$ |

**Naming.** A model's magnitude is its array field `scale` (``IsotropicGaussian(scale)``,
``AnisotropicGaussian(scale)``, ``StudentTNoise(scale, df)``, ``AlphaStableNoise(scale,
alpha)``), so that a study can match and sweep it by one name; ``GaussianNoise(sigma0,
sigma1)`` is the exception, its two constants being Assumption 1's own.

**Comparing models at one level.** ``noise.matched(objective, theta, variance)`` returns the
model with its magnitude (the field named by the class variable ``magnitude``, ``"scale"`` by
default) set so that $\mathbb{E}\|G - \nabla\mathcal{L}(\theta)\|^2 =$ ``variance``; the
default is exact for any model whose variance is quadratic in its magnitude, and heavy-tailed
models match their Gaussian limit where the variance is infinite. ``noise.tail_index`` is the
tail index of the noise (``inf``: light tails; NaN: not known in advance).

**In a study file** a noise model is a table ``{ kind = "StudentTNoise", scale = 1.0, df = 5.0
}``: ``kind`` is the class name (any subclass of [`AbstractNoise`][] imported so far, or
``"package.module:Class"``) and the other keys its constructor's arguments
(``lspsde.study.config.parse_noise``), so a new model is usable from a TOML file as soon as it
is defined.

**A new model** is one final subclass of [`AbstractNoise`][]: array fields for its
hyperparameters (so they can be swept with ``lspsde.Sweep`` and differentiated), ``sample``
(the law of $u$, from a key) and ``gradient`` ($G(\theta, u)$), then as much theory as it has:
``covariance``/``variance``, ``assumption1``, and for an SDE limit ``is_additive`` and
``diffusion``. Built from [`helpers`][lspsde.noise.helpers] (all re-exported here) it
accepts pytree parameters. With the $1/\sqrt d$ of the isotropic models, `scale` is the size
of the whole perturbation and Assumption 1's $\sigma_0$ does not depend on $d$:

```python
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
from lspsde.noise import (AbstractNoise, Assumption1, additive_gradient, as_float_array,
                          check_positive, flat_size, iid_like, scaled_identity)

class LaplaceNoise(AbstractNoise):
    # G = grad L + (b / sqrt d) u, u i.i.d. Laplace(0, 1) (variance 2): E||G - grad L||^2 = 2 b^2.
    scale: Float[Array, ""]

    def __init__(self, scale):
        check_positive("scale", scale, allow_zero=True, fix="Use scale >= 0.")
        self.scale = as_float_array(scale)

    def sample(self, key, theta):
        return iid_like(jax.random.laplace, key, theta)

    def gradient(self, objective, theta, u):
        return additive_gradient(objective, theta, u, self.scale)

    def covariance(self, objective, theta):
        d = flat_size(theta)
        return 2 * self.scale**2 / d * jnp.eye(d)

    def assumption1(self, objective):
        return Assumption1(True, jnp.sqrt(2.0) * self.scale, as_float_array(0.0), "exact")

    def is_additive(self):
        return True

    def diffusion(self, objective, theta):
        return scaled_identity(theta, self.scale * jnp.sqrt(2.0 / flat_size(theta)))
```

Parameters $\theta$ may be pytrees; covariances are over ``jax.flatten_util.ravel_pytree``'s
flat order, and $d$ is the total number of entries.
"""  # noqa: E501

from . import helpers
from .base import AbstractNoise, Assumption1, NoNoise
from .data import CurvatureNoise, MinibatchNoise
from .gaussian import AnisotropicGaussian, GaussianNoise, IsotropicGaussian
from .heavy_tailed import AlphaStableNoise, StudentTNoise
from .helpers import *  # noqa: F403  (the public helpers: helpers.__all__ is their one list)
from .stream import (
    AbstractInputs,
    AbstractTeacher,
    CovariateShift,
    DataStream,
    GaussianInputs,
    LinearTeacher,
    Piecewise,
    RotatingTeacher,
    StreamNoise,
)

__all__ = [
    "AbstractNoise",
    "AlphaStableNoise",
    "AnisotropicGaussian",
    "Assumption1",
    "CurvatureNoise",
    "GaussianNoise",
    "IsotropicGaussian",
    "MinibatchNoise",
    "NoNoise",
    "StudentTNoise",
    "StreamNoise",
    "DataStream",
    "AbstractInputs",
    "AbstractTeacher",
    "GaussianInputs",
    "CovariateShift",
    "LinearTeacher",
    "RotatingTeacher",
    "Piecewise",
    *helpers.__all__,
]
