"""Generate the Python stubs of the gRPC API from protos/ into moeshare/v1/ (committed; a test checks that
they match the protos). Run after editing a .proto:  python scripts/gen_protos.py"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted((ROOT / "protos").rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--pyi_out={out}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in (out / "moeshare" / "v1").glob("*") if p.suffix in (".py", ".pyi"))


def main() -> int:
    files = generate(ROOT)
    print("\n".join(str(f.relative_to(ROOT)) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
