r"""Lipschitz dynamics under SGD: the perturbation theory of the spectral norm $\sigma_1(W)$.

Luo et al. (2025, *Optimization-Induced Dynamics of Lipschitz Continuity in Neural Networks*)
drive $\sigma_1(W_l)$ of each layer by three terms: the gradient projected on the operator-norm
Jacobian $\nabla\sigma_1 = u_1 v_1^\top$, the gradient noise projected on it, and the noise
projected on the operator-norm Hessian $\nabla^2\sigma_1$ (the Itô term). This package gives
those terms exactly, from one full SVD $W = U \operatorname{diag}(\sigma) V^\top$
($U \in O(m)$, $V \in O(n)$, $r = \min(m, n)$, $\sigma_1 \ge \dots \ge \sigma_r \ge 0$):

- :func:`top_singular_expansion`: $\sigma_1(W + \varepsilon E) = \sigma_1 + \varepsilon\,
  \text{first} + \varepsilon^2\,\text{second} + O(\varepsilon^3)$;
- :func:`top_singular_hessian`: $\nabla^2\sigma_1$ in closed form (dense);
- :func:`expected_second_order`: $\mathbb{E}[\text{second}]$ for Gaussian $E$;
- :func:`spectral_step_decomposition`: one SGD step split into drift, noise, second-order
  (Itô) term and an $O(\eta^3)$ residual.

The SDE model of $\sigma_1(t)$ over training (``lipschitz.sde``, ``lipschitz.covariance``):
:func:`spectral_sde_coefficients` (the drift, Itô and diffusion coefficients of
$d\sigma_1(W_l)$ and $d\log\prod_l\sigma_1(W_l)$ at one $\theta$), :func:`spectral_norm_moments`
(the small-noise prediction of their mean and variance after $t$ steps, $O(\eta^2)$),
:func:`spectral_norm_sde` (the weights' SDE integrated jointly with the three terms, path by
path), and the noise covariance they need, exact for the library's noise models or a low-rank
factor of per-example gradients (:func:`gradient_noise_covariance`,
:func:`minibatch_covariance`, :func:`spectral_noise_terms`, :class:`NoiseCovariance`).

Tracking $\sigma_1$ of large layers needs only the top pair, matrix-free
(``lipschitz.tracking``): :func:`spectral_norm_trajectory` (every 2-D floating leaf of $\theta$
is a layer; warm-started power iteration along an SGD run, the product bound
$\prod_l \sigma_1(W_l)$ and a convergence residual per step), :func:`spectral_norms` (one step,
for a hand-written loop), :func:`spectral_norms_along` (a stored trajectory) and
:func:`lipschitz_estimate` (the data-dependent $\max_i \|\partial F/\partial x(x_i)\|_2$);
:func:`adversarial_lipschitz` (``lipschitz.adversarial``) moves the data points by projected
ascent to where $\|\partial F/\partial x\|_2$ is largest, a lower bound of the true Lipschitz
constant between the data-only estimate and the product bound. The exact second-order term
needs every pair.

**§1 The dilation.** $H(W) = \begin{pmatrix} 0 & W \\ W^\top & 0 \end{pmatrix}$ is symmetric,
linear in $W$, and has the eigenpairs $\pm\sigma_j$, $(u_j, \pm v_j)/\sqrt2$ ($j \le r$), and $0$,
$(u_k, 0)$ ($r < k \le m$, the left null directions) and $(0, v_k)$ ($r < k \le n$, the right
null directions). So $\sigma_1(W + \varepsilon E) = \lambda_{\max}(H(W) + \varepsilon H(E))$,
and $\sigma_1$ is a simple eigenvalue of $H(W)$ iff $\sigma_1 > \sigma_2$ and $\sigma_1 > 0$
(the latter separates it from $0$ and $-\sigma_1$).

**§2 The expansion.** For a simple eigenvalue $\lambda$ with unit eigenvector $x$ of a symmetric
$H$, $\lambda(H + \varepsilon D) = \lambda + \varepsilon\, x^\top D x + \varepsilon^2 \sum_y
(y^\top D x)^2 / (\lambda - \mu_y) + O(\varepsilon^3)$ over the other eigenpairs $(\mu_y, y)$
(Rayleigh–Schrödinger; Kato, *Perturbation Theory*, II.§2). With $x = (u_1, v_1)/\sqrt2$,
$D = H(E)$, $D x = (E v_1, E^\top u_1)/\sqrt2$, and $a_j = u_j^\top E v_1$, $b_j = u_1^\top E
v_j$ ($a_1 = b_1$):

| $y$ | $y^\top D x$ | $\lambda - \mu_y$ |
| --- | --- | --- |
| $(u_j, v_j)/\sqrt2$, $2 \le j \le r$ | $(a_j + b_j)/2$ | $\sigma_1 - \sigma_j$ |
| $(u_j, -v_j)/\sqrt2$, $j \le r$ | $(a_j - b_j)/2$ ($0$ for $j = 1$) | $\sigma_1 + \sigma_j$ |
| $(u_k, 0)$, $k > r$ | $a_k / \sqrt2$ | $\sigma_1$ |
| $(0, v_k)$, $k > r$ | $b_k / \sqrt2$ | $\sigma_1$ |

hence $\text{first} = u_1^\top E v_1$ and

$$\text{second} = \sum_{j=2}^{r} \Big[\frac{(a_j + b_j)^2}{4(\sigma_1 - \sigma_j)} +
\frac{(a_j - b_j)^2}{4(\sigma_1 + \sigma_j)}\Big] + \frac{1}{2\sigma_1}\Big[\sum_{k=r+1}^{m}
a_k^2 + \sum_{k=r+1}^{n} b_k^2\Big].$$

Zero singular values inside $j \le r$ need no special case: their two terms add up to
$(a_j^2 + b_j^2) / (2\sigma_1)$, as null directions do. A $1 \times 1$ matrix has no term:
$|w + \varepsilon e|$ is linear near $w \ne 0$.

**§3 The Hessian.** $\text{second} = \operatorname{vec}(E)^\top Q \operatorname{vec}(E)$,
$Q = \frac12 \nabla^2\sigma_1 = \sum_k w_k g_k g_k^\top$ over the $m + n - 2$ rows of the table
but $j = 1$: $g_k = \operatorname{vec}$ of $(u_j v_1^\top \pm u_1 v_j^\top)/2$,
$u_k v_1^\top/\sqrt2$, $u_1 v_k^\top/\sqrt2$, and $w_k = 1/(\sigma_1 \mp \sigma_j)$, $1/\sigma_1$,
$1/\sigma_1$ ($\operatorname{vec}$ row-major, `E.reshape(-1)`). Every $\|g_k\| = 1/\sqrt2$.

**§4 Degenerate top singular values.** Where $\sigma_1 - \sigma_2 \le$ `gap_tol` $\sigma_1$, or
$\sigma_1 = 0$, the flag `degenerate` is set, nothing is divided by a gap, and every second-order
quantity is NaN ($\sigma_1$ is not twice differentiable there). `first` is then the one-sided
directional derivative $\lim_{\varepsilon \downarrow 0}(\sigma_1(W + \varepsilon E) -
\sigma_1)/\varepsilon$: $\lambda_{\max}$ is convex and its directional derivative is
$\lambda_{\max}$ of $D$ compressed to the top eigenspace (Overton 1992), here
$\operatorname{span}\{(u_j, v_j)/\sqrt2 : j \in c\}$, $c = \{j : \sigma_1 - \sigma_j \le
\text{gap\_tol}\,\sigma_1\}$, which gives $\lambda_{\max}(\operatorname{sym}(U_c^\top E V_c))$;
for $W = 0$ the eigenspace is everything and the derivative is $\sigma_1(E)$. For a cluster that
is close but not exactly equal this is the derivative at the resolution `gap_tol`. With concrete
inputs the functions raise a `ValueError` naming the gap unless `on_degenerate="fallback"`; under
`jit`/`vmap` they return the fallback and the flag (a result value, so one degenerate matrix of an
ensemble does not stop it).

**§5 The Gaussian mean (Itô coefficient).** For $\operatorname{vec} E \sim N(0, \Sigma)$,
$\mathbb{E}[\text{second}] = \operatorname{tr}(Q \Sigma) = \frac12 \operatorname{tr}(\Sigma\,
\nabla^2\sigma_1)$. For $\Sigma = s^2 I$ the $a_j, b_j$ ($j \ge 2$) are independent
$N(0, s^2)$ ($\operatorname{cov}(a_j, b_j) = s^2 (u_j^\top u_1)(v_1^\top v_j) = 0$), so
$\mathbb{E}(a_j \pm b_j)^2 = 2 s^2$ and

$$\mathbb{E}[\text{second}] = s^2 \Big[\sum_{j=2}^{r} \frac{\sigma_1}{\sigma_1^2 - \sigma_j^2}
+ \frac{(m - r) + (n - r)}{2\sigma_1}\Big]$$

($\frac{1}{2(\sigma_1 - \sigma_j)} + \frac{1}{2(\sigma_1 + \sigma_j)} =
\frac{\sigma_1}{\sigma_1^2 - \sigma_j^2}$, evaluated as the sum for accuracy at close pairs).

**§6 One SGD step.** $W' = W - \eta(G + \xi)$ is §2 with $\varepsilon = \eta$, $E = -(G + \xi)$:

$$\sigma_1(W') - \sigma_1(W) = -\eta\,u_1^\top G v_1 - \eta\,u_1^\top \xi v_1 + \eta^2\,
\text{second}(G + \xi) + O(\eta^3),$$

and, $\text{second}$ being a quadratic form, $\mathbb{E}_\xi[\text{second}(G + \xi)] =
\text{second}(G) + \operatorname{tr}(Q\Sigma)$ for $\xi \sim N(0, \Sigma)$ (the cross term
$2 \operatorname{vec}(G)^\top Q \operatorname{vec}(\xi)$ has mean $0$). The noise part
$\eta^2 \operatorname{tr}(Q\Sigma) = \frac{\eta^2}{2}\operatorname{tr}(\Sigma\,\nabla^2\sigma_1)$
is the Itô term $\frac12 \eta \operatorname{tr}(\Sigma_W \nabla^2\sigma_1)\,dt$ of the SDE for
$\sigma_1$ with $dt = \eta$. The residual of the mean is $O(\eta^3)$ too (the third-order
coefficient of $G + \xi$ has a nonzero mean in general), so a Monte Carlo check must keep
$\eta^3$ below its standard error.
"""

from .adversarial import AdversarialLipschitz, adversarial_lipschitz
from .covariance import (
    NoiseCovariance,
    SpectralNoiseTerms,
    gradient_noise_covariance,
    minibatch_covariance,
    spectral_noise_terms,
)
from .expansion import (
    TopSingularExpansion,
    expected_second_order,
    top_singular_expansion,
    top_singular_hessian,
)
from .sde import (
    MonteCarloMoments,
    SpectralNormMoments,
    SpectralNormSDE,
    SpectralSDECoefficients,
    spectral_norm_moments,
    spectral_norm_sde,
    spectral_sde_coefficients,
)
from .step import SpectralStep, spectral_step_decomposition
from .tracking import (
    LipschitzEstimate,
    SpectralNorms,
    SpectralNormTrajectory,
    init_vectors,
    lipschitz_estimate,
    spectral_norm_trajectory,
    spectral_norms,
    spectral_norms_along,
    weight_matrices,
)

__all__ = [
    "AdversarialLipschitz",
    "LipschitzEstimate",
    "MonteCarloMoments",
    "NoiseCovariance",
    "SpectralNoiseTerms",
    "SpectralNormMoments",
    "SpectralNormSDE",
    "SpectralNormTrajectory",
    "SpectralNorms",
    "SpectralSDECoefficients",
    "SpectralStep",
    "TopSingularExpansion",
    "adversarial_lipschitz",
    "expected_second_order",
    "gradient_noise_covariance",
    "init_vectors",
    "lipschitz_estimate",
    "minibatch_covariance",
    "spectral_noise_terms",
    "spectral_norm_moments",
    "spectral_norm_sde",
    "spectral_norm_trajectory",
    "spectral_norms",
    "spectral_norms_along",
    "spectral_sde_coefficients",
    "spectral_step_decomposition",
    "top_singular_expansion",
    "top_singular_hessian",
    "weight_matrices",
]
