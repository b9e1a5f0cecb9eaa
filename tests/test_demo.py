"""`make demo` end to end (scripts/demo.py), from a scratch directory so the checkout is left as it was."""

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"


def test_demo_serves_every_variant_and_says_what_a_tiny_model_writes(tiny_zoo, tmp_path):
    done = subprocess.run(
        [sys.executable, str(DEMO)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "expect the look of the domain" in out  # the completions of a 40-second model are explained
    for variant in ("kjv", "fortunes-en", "fortunes-de", "python", "llama-kjv"):
        assert f"\n[{variant}] " in out
    assert "server stopped (exit 0)" in out
    assert (tmp_path / "build" / "demo" / "mixtral-store" / "manifest.json").is_file()
