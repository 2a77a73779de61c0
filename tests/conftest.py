"""Test configuration: float64 everywhere, rank promotion raises (as in diffrax / lineax)."""

import os

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# CI runs the end-to-end studies at a reduced size; correctness checks are never skipped.
STUDY_SIZE = os.environ.get("LSPSDE_STUDY_SIZE", "ci" if os.environ.get("CI") else "full")
