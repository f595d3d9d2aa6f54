"""Shared test set-up."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# The machines are shared and noisy: never fail a property test on timing.
settings.register_profile(
    "resizer", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=200
)
settings.load_profile("resizer")
