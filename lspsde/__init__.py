"""lspsde: measurable stability theory of learning systems, in JAX.

Learning is a coupled representation–parameter dynamical system (Katende, 2025). lspsde builds
such systems from Equinox models, measures their Learning Stability Profile (operator norms of
the Jacobian blocks of the one-step learning map) and stability exponents, and puts every
closed-form prediction of the theory (``lspsde.theory``) next to the measurement.
"""

__version__ = "0.1.0"

from . import (
    constants as constants,
    explain as explain,
    limits as limits,
    linalg as linalg,
    lipschitz as lipschitz,
    nonsmooth as nonsmooth,
    theory as theory,
)
from .adaptive import HeavyBall as HeavyBall, Optax as Optax
from ._simulate import (
    Ensemble as Ensemble,
    MeanEstimate as MeanEstimate,
    simulate as simulate,
)
from .distributions import (
    exponent_distribution as exponent_distribution,
    ExponentDistribution as ExponentDistribution,
)
from .energy import (
    dissipation_rate as dissipation_rate,
    fit_recursion as fit_recursion,
    mean_square as mean_square,
    quadratic_mean_square as quadratic_mean_square,
)
from .explain import (
    AbstractExplanation as AbstractExplanation,
    Attribution as Attribution,
    explanation_sensitivity as explanation_sensitivity,
    explanation_trajectory as explanation_trajectory,
    ExplanationSensitivity as ExplanationSensitivity,
    ExplanationTrajectory as ExplanationTrajectory,
    integrated_gradients as integrated_gradients,
    IntegratedGradients as IntegratedGradients,
    model_function as model_function,
    ModelFunction as ModelFunction,
    saliency as saliency,
    Saliency as Saliency,
)
from .exponents import (
    growth_rate as growth_rate,
    stability_exponents as stability_exponents,
    StabilityExponents as StabilityExponents,
    sup_exponent as sup_exponent,
)
from .limits import (
    convergence_order as convergence_order,
    euler_residual as euler_residual,
    GradientFlow as GradientFlow,
    NeuralODE as NeuralODE,
    SGDLimit as SGDLimit,
    strong_error as strong_error,
    weak_error as weak_error,
)
from .lipschitz import (
    adversarial_lipschitz as adversarial_lipschitz,
    AdversarialLipschitz as AdversarialLipschitz,
    expected_second_order as expected_second_order,
    lipschitz_estimate as lipschitz_estimate,
    LipschitzEstimate as LipschitzEstimate,
    spectral_norm_trajectory as spectral_norm_trajectory,
    spectral_norms as spectral_norms,
    spectral_norms_along as spectral_norms_along,
    SpectralNorms as SpectralNorms,
    SpectralNormTrajectory as SpectralNormTrajectory,
    weight_matrices as weight_matrices,
    spectral_step_decomposition as spectral_step_decomposition,
    SpectralStep as SpectralStep,
    top_singular_expansion as top_singular_expansion,
    gradient_noise_covariance as gradient_noise_covariance,
    minibatch_covariance as minibatch_covariance,
    MonteCarloMoments as MonteCarloMoments,
    NoiseCovariance as NoiseCovariance,
    spectral_noise_terms as spectral_noise_terms,
    spectral_norm_moments as spectral_norm_moments,
    spectral_norm_sde as spectral_norm_sde,
    spectral_sde_coefficients as spectral_sde_coefficients,
    SpectralNoiseTerms as SpectralNoiseTerms,
    SpectralNormMoments as SpectralNormMoments,
    SpectralNormSDE as SpectralNormSDE,
    SpectralSDECoefficients as SpectralSDECoefficients,
    top_singular_hessian as top_singular_hessian,
    TopSingularExpansion as TopSingularExpansion,
)
from .lyapunov import (
    flow_map as flow_map,
    lyapunov_spectrum as lyapunov_spectrum,
    lyapunov_trace as lyapunov_trace,
)
from .noise import (
    AbstractNoise as AbstractNoise,
    AlphaStableNoise as AlphaStableNoise,
    AnisotropicGaussian as AnisotropicGaussian,
    Assumption1 as Assumption1,
    CurvatureNoise as CurvatureNoise,
    GaussianNoise as GaussianNoise,
    IsotropicGaussian as IsotropicGaussian,
    MinibatchNoise as MinibatchNoise,
    NoNoise as NoNoise,
    StreamNoise as StreamNoise,
    StudentTNoise as StudentTNoise,
)
from .nonsmooth import (
    AbstractConstraint as AbstractConstraint,
    AbstractProximalFlow as AbstractProximalFlow,
    AbstractRegularizer as AbstractRegularizer,
    Affine as Affine,
    Ball as Ball,
    Box as Box,
    ElasticNet as ElasticNet,
    Elementwise as Elementwise,
    generalized_jacobian_norm as generalized_jacobian_norm,
    MaxPool as MaxPool,
    prox_chain as prox_chain,
    AbstractVariationalEnergy as AbstractVariationalEnergy,
    Coercivity as Coercivity,
    coercivity as coercivity,
    composite_minimizer as composite_minimizer,
    CompositeEnergy as CompositeEnergy,
    DissipationCheck as DissipationCheck,
    energy_trace as energy_trace,
    EnergyTrace as EnergyTrace,
    FunctionEnergy as FunctionEnergy,
    ImplicationCheck as ImplicationCheck,
    mean_trace as mean_trace,
    prox_gradient_contraction as prox_gradient_contraction,
    prox_gradient_decrease as prox_gradient_decrease,
    RepresentationEnergy as RepresentationEnergy,
    step_signatures as step_signatures,
    sufficient_decrease as sufficient_decrease,
    variational_dissipation as variational_dissipation,
    variational_stability as variational_stability,
    VariationalStability as VariationalStability,
    GeneralizedJacobianNorm as GeneralizedJacobianNorm,
    L1 as L1,
    L2 as L2,
    ProjectedGradient as ProjectedGradient,
    ProximalGradient as ProximalGradient,
    Simplex as Simplex,
)
from .objectives import (
    AbstractObjective as AbstractObjective,
    parameters as parameters,
    SupervisedLoss as SupervisedLoss,
)
from .parameter import (
    AbstractParameterFlow as AbstractParameterFlow,
    AbstractStatefulFlow as AbstractStatefulFlow,
    FlowState as FlowState,
    GradientDescent as GradientDescent,
    SGD as SGD,
    SubgradientMethod as SubgradientMethod,
)
from .profile import (
    generalized_exponents as generalized_exponents,
    generalized_representation_profile as generalized_representation_profile,
    GeneralizedExponents as GeneralizedExponents,
    GeneralizedRepresentationProfile as GeneralizedRepresentationProfile,
    GeneralizedSignatures as GeneralizedSignatures,
    learning_profile as learning_profile,
    representation_profile as representation_profile,
    RepresentationProfile as RepresentationProfile,
    StabilityProfile as StabilityProfile,
)
from .results import to_datatree as to_datatree
from .representation import (
    AbstractRepresentationFlow as AbstractRepresentationFlow,
    Feedforward as Feedforward,
    from_equinox as from_equinox,
    LayerSequence as LayerSequence,
    Residual as Residual,
)
from .sweep import Sweep as Sweep
from .schedules import (
    AbstractSchedule as AbstractSchedule,
    Constant as Constant,
    RobbinsMonro as RobbinsMonro,
)
from .system import (
    LearningState as LearningState,
    LearningSystem as LearningSystem,
    parameter_trajectory as parameter_trajectory,
)
