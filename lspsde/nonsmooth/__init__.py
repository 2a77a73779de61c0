r"""Non-smooth learning systems (Section 6): regularisers, constraints, proximal and projected
parameter flows.

- Regularisers $R$ with ``prox(x, step)`` and ``value(x)``: [`L1`][], [`L2`][] (the squared
  norm $\frac\lambda2\|x\|^2$), [`ElasticNet`][].
- Constraints $C$ with ``project(x)``, ``contains(x)`` and ``value(x)`` $= \iota_C(x)$:
  [`Box`][], [`Ball`][], [`Simplex`][]; a constraint is also a regulariser (its indicator).
- Flows: [`ProximalGradient`][] and [`ProjectedGradient`][], ordinary parameter flows.
- Variational energies (Section 6.4–6.6): [`CompositeEnergy`][] ($\Phi = \mathcal{L} + R$),
  [`RepresentationEnergy`][] ($\frac12\|X_L\|^2$), [`FunctionEnergy`][]; along trajectories
  ([`energy_trace`][]) the checks of Assumption 3 ([`coercivity`][]), Assumption 4
  ([`variational_dissipation`][]), the sufficient decrease of Section 6.6
  ([`sufficient_decrease`][]) and Theorem 6.4 both ways ([`variational_stability`][]).
- [`generalized_jacobian_norm`][]: the supremum of $\|V\|_2$ over the Clarke generalised
  Jacobian of a chain of [`Affine`][] maps, [`Elementwise`][] piecewise-linear pieces,
  [`MaxPool`][] and the projections ``Box``, ``Ball``, ``Simplex``; [`prox_chain`][]: the
  prox of a regulariser as such pieces.
"""

from .clarke import (
    Affine,
    Elementwise,
    GeneralizedJacobianNorm,
    MaxPool,
    generalized_jacobian_norm,
    prox_chain,
)
from .constraints import AbstractConstraint, Ball, Box, Simplex
from .energy import (
    AbstractVariationalEnergy,
    Coercivity,
    CompositeEnergy,
    DissipationCheck,
    EnergyTrace,
    FunctionEnergy,
    ImplicationCheck,
    RepresentationEnergy,
    VariationalStability,
    coercivity,
    composite_minimizer,
    energy_trace,
    mean_trace,
    prox_gradient_contraction,
    prox_gradient_decrease,
    step_signatures,
    sufficient_decrease,
    variational_dissipation,
    variational_stability,
)
from .flows import AbstractProximalFlow, ProjectedGradient, ProximalGradient
from .regularizers import L1, L2, AbstractRegularizer, ElasticNet

__all__ = [
    "L1",
    "L2",
    "AbstractConstraint",
    "AbstractProximalFlow",
    "AbstractRegularizer",
    "AbstractVariationalEnergy",
    "Affine",
    "Ball",
    "Box",
    "Coercivity",
    "CompositeEnergy",
    "DissipationCheck",
    "ElasticNet",
    "Elementwise",
    "EnergyTrace",
    "FunctionEnergy",
    "GeneralizedJacobianNorm",
    "ImplicationCheck",
    "MaxPool",
    "ProjectedGradient",
    "ProximalGradient",
    "RepresentationEnergy",
    "Simplex",
    "VariationalStability",
    "coercivity",
    "composite_minimizer",
    "energy_trace",
    "generalized_jacobian_norm",
    "mean_trace",
    "prox_chain",
    "prox_gradient_contraction",
    "prox_gradient_decrease",
    "step_signatures",
    "sufficient_decrease",
    "variational_dissipation",
    "variational_stability",
]
