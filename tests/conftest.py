"""Shared test set-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# The machines are shared and noisy: never fail a property test on timing.
settings.register_profile(
    "resizer", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=200
)
settings.load_profile("resizer")


@pytest.fixture
def spill(tmp_path: Path) -> Path:
    """An empty folder for sources' downloads (temp files they must remove)."""
    folder = tmp_path / "spill"
    folder.mkdir()
    return folder
