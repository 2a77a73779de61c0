"""Type aliases used in public signatures (cf. diffrax ``_custom_types.py``)."""

from typing import Any

from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree

Scalar = Float[Array, ""]
ScalarLike = float | int | Float[ArrayLike, ""]
IntScalarLike = int | Int[ArrayLike, ""]
Params = PyTree[Array]
Args = Any

__all__ = [
    "Args",
    "Array",
    "ArrayLike",
    "Bool",
    "Float",
    "Int",
    "IntScalarLike",
    "Params",
    "PyTree",
    "Scalar",
    "ScalarLike",
]
