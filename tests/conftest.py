"""Test configuration: float64 everywhere, rank promotion raises (as in diffrax / lineax)."""

import os

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# A persistent compilation cache: compile time dominates the suite, the two xdist workers
# compile many of the same programs, and reruns on the same machine reuse the entries (the
# key covers the program, the JAX version and the backend, so a stale entry cannot be hit).
# LSPSDE_JAX_CACHE= (empty) turns it off.
_cache = os.environ.get("LSPSDE_JAX_CACHE", os.path.expanduser("~/.cache/lspsde/jax-tests"))
if _cache:
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# CI runs the end-to-end studies at a reduced size; correctness checks are never skipped.
STUDY_SIZE = os.environ.get("LSPSDE_STUDY_SIZE", "ci" if os.environ.get("CI") else "full")
