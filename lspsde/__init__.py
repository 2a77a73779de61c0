"""lspsde: measurable stability theory of learning systems, in JAX."""

__version__ = "0.1.0"
