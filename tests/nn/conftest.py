"""Shared fixtures for the lptrain.nn tests (helpers live in lptrain.testing)."""

from __future__ import annotations

import pytest

from lptrain.testing import Problem


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem()
