"""Generate the Python stubs of the gRPC API from protos/ into moeshare/v1/ (committed; a test checks that
they match the protos). Run after editing a .proto:  python scripts/gen_protos.py"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The stubs refuse an older grpcio than this. grpcio-tools writes its own version here; the GPU image has
# grpcio 1.84, and the stubs use nothing newer (the server runs there), so the floor is lowered to it.
MIN_GRPCIO = "1.84.0"


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
    for stub in (out / "moeshare" / "v1").glob("*_pb2_grpc.py"):
        text = re.sub(
            r"GRPC_GENERATED_VERSION = '[^']*'", f"GRPC_GENERATED_VERSION = '{MIN_GRPCIO}'", stub.read_text()
        )
        stub.write_text(text)
    return sorted(p for p in (out / "moeshare" / "v1").glob("*") if p.suffix in (".py", ".pyi"))


def main() -> int:
    files = generate(ROOT)
    print("\n".join(str(f.relative_to(ROOT)) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
