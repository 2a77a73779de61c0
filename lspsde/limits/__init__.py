r"""Continuous-time limits of parameter flows, integrated with diffrax.

SGD with a constant step $\eta$ (eq. 5.1) is, to first order in $\eta$, a sample of the Itô SDE
(the stochastic modified equation, Li, Tai & E 2017)

$$d\Theta = -\nabla\mathcal{L}(\Theta)\,dt + \sqrt\eta\,B(\Theta)\,dW_t, \qquad
B B^\top = \Sigma(\Theta), \qquad t = k\eta,$$

and gradient descent of the gradient flow $d\theta/dt = -\nabla\mathcal{L}(\theta)$. With
``order=2`` the drift gets the first correction of backward error analysis,
$-\nabla(\mathcal{L} + \frac\eta4\|\nabla\mathcal{L}\|^2) = -\nabla\mathcal{L} -
\frac\eta2\nabla^2\mathcal{L}\,\nabla\mathcal{L}$.

Both limits here are parameter flows: they plug into ``lspsde.simulate`` (and
``learning_profile``) wherever ``lspsde.SGD`` does. One step of the flow integrates over one
step's worth of time, $[k\eta, (k+1)\eta]$, so step $k$ of SGD and step $k$ of its limit are
saved at the same time $t = k\eta$.

**Brownian paths.** For fixed steps (the default) each step $[k\eta, (k+1)\eta]$ first draws its
whole Brownian increment, $W((k+1)\eta) - W(k\eta) = \sqrt\eta\,\xi_k$, where $\xi_k$ is the
draw SGD itself would make at step $k$ (for models with ``gaussian_draws``:
``IsotropicGaussian``, ``AnisotropicGaussian``, ``GaussianNoise``), and then fills in the $n$
sub-steps as an exact sequential Brownian bridge pinned to it: with $R$ the part not yet used and
$j$ sub-steps left,

$$\Delta W_i = R/j + \sqrt{\delta (j - 1)/j}\; z_i, \qquad z_i \sim N(0, I), \quad
\delta = \eta/n.$$

(The $\Delta W_i$ are i.i.d. $N(0, \delta I)$ and sum to $\sqrt\eta\,\xi_k$.) So with the same key
an SGD path and its SDE-limit path are *coupled*: Euler–Maruyama with one sub-step reproduces SGD,
and strong errors between the two are meaningful. The sub-steps are a ``lax.scan`` of the diffrax
solver's own ``step`` over diffrax terms, each sub-step drawing its bridge increment as it goes:
no adaptive loop, no Brownian tree search, no pre-sampled block (drawing the $n \times m$ block up
front measured up to 1.6x slower on CPU), so a fixed-step ensemble takes 0.9–1.25x the time of
a hand-written scan (``benchmarks/bench_limits.py``). Space-time(-time) Lévy areas, for ``ShARK``,
``SRA1``, ``SEA`` and the like, are drawn independently per sub-step ($H_i \sim N(0, \delta/12)$,
$K_i \sim N(0, \delta/720)$), which is their exact joint law. [`SGDLimit.increments`][] returns
the sub-step increments of a draw, and ``step`` also accepts explicit
[`BrownianIncrements`][] (any Brownian path you construct).

With a ``stepsize_controller`` the step is a ``diffrax.diffeqsolve`` over
$[k\eta, (k+1)\eta]$ driven by a ``VirtualBrownianTree`` (what adaptive steps need); that mode is
not coupled to SGD's draws.
"""

from ._common import DEFAULT_SUBSTEPS as DEFAULT_SUBSTEPS
from ._common import AbstractContinuousLimit
from .brownian import BrownianIncrements, BrownianStep
from .errors import ErrorCurve, OrderFit, convergence_order, strong_error, weak_error
from .gradient_flow import GradientFlow
from .neural_ode import NeuralODE, euler_residual
from .sgd_limit import SGDLimit

__all__ = [
    "AbstractContinuousLimit",
    "BrownianIncrements",
    "BrownianStep",
    "ErrorCurve",
    "GradientFlow",
    "NeuralODE",
    "OrderFit",
    "SGDLimit",
    "convergence_order",
    "euler_residual",
    "strong_error",
    "weak_error",
]
