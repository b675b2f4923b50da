"""Test-wide settings: float64 for exactness checks, bounded hypothesis runs."""

import os

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)

settings.register_profile(
    "msjax",
    deadline=None,
    max_examples=int(os.environ.get("MSJAX_HYPOTHESIS_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile("msjax")
