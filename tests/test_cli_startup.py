"""The command line starts fast: building the parser and printing help imports neither torch nor transformers."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "scipy", "moeshare.engine", "moeshare.consolidate", "moeshare.zoo.build")


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["eval", "--help"], ["models", "--help"]])
def test_help_imports_no_heavy_module(argv):
    probe = (
        "import sys\n"
        "from moeshare import cli\n"
        f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "loaded:"
