"""moeshare: many fine-tuned variants of one MoE LLM served from one consolidated expert bank."""

import os as _os

# kernels/ sits at the top of the repository (the design's layout) and installs as moeshare.kernels; when the
# package is used straight from a checkout (PYTHONPATH=.), the same import finds it there.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isdir(
    _os.path.join(_here, "..", "kernels")
):
    __path__.append(_os.path.dirname(_here))  # type: ignore[name-defined]  # noqa: F821
