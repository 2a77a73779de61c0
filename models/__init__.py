"""The lspsde model zoo: feedforward and residual networks, convex objectives."""

from .mlp import mlp, orthogonal_matrix, spectral_normalize
from .objectives import (
    LeastSquares,
    LogisticRegression,
    Quadratic,
    RegressionData,
    TeacherStudentData,
    synthetic_regression,
    teacher_student,
)
from .residual import (
    LinearDissipativeBlock,
    NonlinearDissipativeBlock,
    linear_dissipative_block,
    nonlinear_dissipative_block,
    random_skew,
    residual_network,
    residual_network_constants,
)

__all__ = [
    "LeastSquares",
    "LinearDissipativeBlock",
    "LogisticRegression",
    "NonlinearDissipativeBlock",
    "Quadratic",
    "RegressionData",
    "TeacherStudentData",
    "linear_dissipative_block",
    "mlp",
    "nonlinear_dissipative_block",
    "orthogonal_matrix",
    "random_skew",
    "residual_network",
    "residual_network_constants",
    "spectral_normalize",
    "synthetic_regression",
    "teacher_student",
]
