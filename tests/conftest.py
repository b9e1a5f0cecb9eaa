"""Shared fixtures. `tiny_zoo` is the one place the tests build the zoo (or reuse it from the cache)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_zoo() -> Path:
    """The tiny zoo, both archs, base + 4 variants each; cached in $MOESHARE_ZOO_DIR/tiny."""
    from moeshare.zoo import build_zoo

    return build_zoo(size="tiny", arch="all")
