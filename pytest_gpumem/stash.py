"""The plugin's keys in pytest's stashes: what the hooks and the fixtures share."""

from __future__ import annotations

import pytest

from pytest_gpumem.config.settings import Settings
from pytest_gpumem.measured import MeasuredTest

SETTINGS = pytest.StashKey[Settings]()
"""The run's resolved settings, in ``config.stash`` while the plugin is configured."""

MEASURED = pytest.StashKey[MeasuredTest]()
"""An item's :class:`~pytest_gpumem.measured.MeasuredTest`, in ``item.stash`` from its setup to its last report."""


def settings_of(config: pytest.Config) -> Settings:
    """The run's resolved settings (for fixtures); the defaults where the plugin is disabled."""
    return config.stash.get(SETTINGS, None) or Settings()
