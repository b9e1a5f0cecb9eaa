"""Shared fixtures. `tiny_zoo` is the one place the tests build the zoo (or reuse it from the cache)."""

import os
from pathlib import Path

import pytest

# The tests run tiny models, as fast on one CPU thread as on several; one thread per process (this one and every
# server it starts) never waits at a barrier on a core that another process holds, so a busy machine slows the
# suite down about in proportion instead of many times over.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tiny_zoo() -> Path:
    """The tiny zoo, both archs, base + 4 variants each; cached in $MOESHARE_ZOO_DIR/tiny."""
    from moeshare.zoo import build_zoo

    return build_zoo(size="tiny", arch="all")
