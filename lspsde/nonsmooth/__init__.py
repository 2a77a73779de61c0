r"""Non-smooth learning systems (Section 6): regularisers, constraints, proximal and projected
parameter flows.

- Regularisers $R$ with ``prox(x, step)`` and ``value(x)``: [`L1`][], [`L2`][] (the squared
  norm $\frac\lambda2\|x\|^2$), [`ElasticNet`][].
- Constraints $C$ with ``project(x)``, ``contains(x)`` and ``value(x)`` $= \iota_C(x)$:
  [`Box`][], [`Ball`][], [`Simplex`][]; a constraint is also a regulariser (its indicator).
- Flows: [`ProximalGradient`][] and [`ProjectedGradient`][], ordinary parameter flows.
- [`generalized_jacobian_norm`][]: the supremum of $\|V\|_2$ over the Clarke generalised
  Jacobian of a chain of [`Affine`][] maps and [`Elementwise`][] piecewise-linear pieces.
"""

from .clarke import (
    Affine,
    Elementwise,
    GeneralizedJacobianNorm,
    generalized_jacobian_norm,
)
from .constraints import AbstractConstraint, Ball, Box, Simplex
from .flows import AbstractProximalFlow, ProjectedGradient, ProximalGradient
from .regularizers import L1, L2, AbstractRegularizer, ElasticNet

__all__ = [
    "L1",
    "L2",
    "AbstractConstraint",
    "AbstractProximalFlow",
    "AbstractRegularizer",
    "Affine",
    "Ball",
    "Box",
    "ElasticNet",
    "Elementwise",
    "GeneralizedJacobianNorm",
    "ProjectedGradient",
    "ProximalGradient",
    "Simplex",
    "generalized_jacobian_norm",
]
