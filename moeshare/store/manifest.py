"""manifest.json read into typed records, its format and version checked first."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moeshare.errors import MoeshareError
from moeshare.store.format import FORMAT, MANIFEST, VERSION


@dataclass(frozen=True)
class VariantEntry:
    name: str
    config: dict
    tables: dict[str, list[int]]  # MoE layer -> bank slot of each local expert
    tensors: dict[str, list[str]]  # non-expert tensor name -> [file in the store, key in that file]
    order: list[str]  # every tensor name of the source checkpoint, in its order


@dataclass(frozen=True)
class BankLayer:
    layer: str
    slots: int


@dataclass(frozen=True)
class StoredFile:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    architecture: str
    config: dict  # the base config (the first variant's)
    roles: tuple[str, ...]  # the bank's roles, in the fused layout
    layers: dict[str, BankLayer]  # MoE layer -> its part of the bank, in layer order
    variants: dict[str, VariantEntry]
    files: dict[str, StoredFile]  # every file but the manifest, by path in the store; empty in old stores
    raw: dict  # the whole JSON, for reports (members, merge errors, sizes, how it was made)


def read_version(path: Path, raw: object) -> None:
    """Refuse a manifest of another format, or of a version this moeshare does not read."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise MoeshareError(f"{path}: not a {FORMAT} manifest; make a store with moeshare consolidate")
    version = raw.get("version")
    if version == VERSION:
        return
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise MoeshareError(
            f"{path}: store format version {version} is newer than this moeshare reads ({VERSION}): "
            "upgrade moeshare, or consolidate the store again with this one"
        )
    raise MoeshareError(
        f"{path}: unknown store format version {version!r} (this moeshare reads {VERSION}); "
        "consolidate the store again"
    )


def parse_manifest(path: Path, raw: object) -> Manifest:
    read_version(path, raw)
    assert isinstance(raw, dict)
    try:
        variants = {
            v["name"]: VariantEntry(v["name"], v["config"], v["tables"], v["tensors"], v["order"])
            for v in raw["variants"]
        }
        layers = {x["layer"]: BankLayer(x["layer"], int(x["slots"])) for x in raw["bank"]["layers"]}
        files = {rel: StoredFile(int(f["bytes"]), f["sha256"]) for rel, f in raw.get("files", {}).items()}
        return Manifest(
            raw["architecture"], raw["config"], tuple(raw["bank"]["roles"]), layers, variants, files, raw
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MoeshareError(
            f"{path}: malformed ({type(e).__name__}: {e}); consolidate the store again"
        ) from None


def read_manifest(store: Path) -> Manifest:
    path = Path(store) / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MoeshareError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except OSError as e:
        raise MoeshareError(f"{path}: cannot read it ({e.strerror or e})") from None
    return parse_manifest(path, raw)


def write_manifest(store: Path, manifest: dict) -> None:
    (Path(store) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
