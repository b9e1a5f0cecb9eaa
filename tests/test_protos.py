"""The committed stubs in moeshare/v1 are what protos/ generates (run scripts/gen_protos.py after an edit)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_protos(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = gen.generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for f in fresh:
        committed = ROOT / "moeshare" / "v1" / f.name
        assert committed.read_text() == f.read_text(), (
            f"{committed} is stale: run python scripts/gen_protos.py"
        )
