"""The zoo's text: four domains of real text, each split into train and held-out by document hash.

Full set (Debian packages bible-kjv, fortunes, fortunes-de): kjv, fortunes-en, fortunes-de, python.
Fallback (text that ships with Python): python, pydoc-topics, docstrings, unicode-names.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import unicodedata
from dataclasses import dataclass
from pathlib import Path

DEBIAN_PACKAGES = "bible-kjv bible-kjv-text fortunes fortunes-de"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
HELDOUT_PERCENT = 5
HELDOUT_BYTES = 64 * 1024
DOC_SEPARATOR = "\n\n"
SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Domain:
    name: str
    source: str
    documents: int
    train: str
    heldout: str

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "source": self.source,
            "documents": self.documents,
            "train_bytes": len(self.train.encode("utf-8")),
            "heldout_bytes": len(self.heldout.encode("utf-8")),
        }


@dataclass(frozen=True)
class Corpora:
    kind: str  # "debian" or "python-fallback"
    domains: list[Domain]

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]


def load_corpora(prefer_debian: bool = True) -> Corpora:
    if prefer_debian:
        kjv = kjv_documents()
        english = fortune_documents(FORTUNES_DIR)
        german = fortune_documents(FORTUNES_DIR / "de")
        if kjv and english and german:
            return Corpora(
                "debian",
                [
                    split_domain("kjv", "bible-kjv: bible -l 1000 gen1:1-rev22:21", kjv),
                    split_domain("fortunes-en", f"fortunes: {FORTUNES_DIR}", english),
                    split_domain("fortunes-de", f"fortunes-de: {FORTUNES_DIR / 'de'}", german),
                    split_domain("python", f"python stdlib: {stdlib_dir()}", stdlib_documents()),
                ],
            )
        print(
            f"moeshare zoo: Debian corpora not found; using text shipped with Python instead "
            f"(apt-get install {DEBIAN_PACKAGES} gives the full set)",
            file=sys.stderr,
        )
    return Corpora(
        "python-fallback",
        [
            split_domain("python", f"python stdlib: {stdlib_dir()}", stdlib_documents()),
            split_domain("pydoc-topics", "pydoc_data.topics", pydoc_topic_documents()),
            split_domain("docstrings", "docstrings of the python stdlib", docstring_documents()),
            split_domain("unicode-names", f"unicodedata {unicodedata.unidata_version}", unicode_documents()),
        ],
    )


def split_domain(name: str, source: str, documents: list[str]) -> Domain:
    """About HELDOUT_PERCENT of documents, chosen by content hash, are held out (the file capped)."""
    digests = [hashlib.sha256(doc.encode("utf-8")).hexdigest() for doc in documents]
    held = {i for i, h in enumerate(digests) if int(h[:8], 16) % 100 < HELDOUT_PERCENT}
    if not held:
        held = {min(range(len(documents)), key=digests.__getitem__)}
    train = DOC_SEPARATOR.join(doc for i, doc in enumerate(documents) if i not in held)
    ordered = sorted(held, key=digests.__getitem__)
    heldout = DOC_SEPARATOR.join(documents[i] for i in ordered).encode("utf-8")
    if len(heldout) > HELDOUT_BYTES:
        cut = heldout[:HELDOUT_BYTES]
        heldout = cut[: cut.rfind(b"\n") + 1] or cut
    return Domain(name, source, len(documents), train, heldout.decode("utf-8", errors="ignore"))


def kjv_documents() -> list[str]:
    """One document per chapter: its heading line, then one line per verse (verse numbers dropped)."""
    program = shutil.which("bible") or ("/usr/games/bible" if os.path.exists("/usr/games/bible") else None)
    if program is None:
        return []
    try:
        dump = subprocess.run(
            [program, "-l", "1000", "gen1:1-rev22:21"], capture_output=True, check=True, timeout=120
        ).stdout.decode("utf-8", errors="replace")
    except (OSError, subprocess.SubprocessError):
        return []
    chapters: list[list[str]] = []
    for line in dump.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            chapters.append([line.strip()])
        elif chapters:
            number, _, verse = line.strip().partition(" ")
            chapters[-1].append(verse if number.isdigit() else line.strip())
    return ["\n".join(chapter) for chapter in chapters if len(chapter) > 1]


def fortune_documents(directory: Path) -> list[str]:
    """Entries of the plain fortune files in `directory` (not its subdirectories), separated by '%' lines."""
    if not directory.is_dir():
        return []
    entries: list[str] = []
    for path in sorted(directory.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        entry: list[str] = []
        for line in text.splitlines():
            if line.strip() == "%":
                entries.append("\n".join(entry).strip("\n"))
                entry = []
            else:
                entry.append(line.rstrip())
        entries.append("\n".join(entry).strip("\n"))
    return [e for e in entries if e.strip()]


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    files: list[Path] = []
    for root, dirs, names in os.walk(stdlib_dir()):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_STDLIB_DIRS and not d.endswith("_test"))
        files.extend(Path(root) / n for n in sorted(names) if n.endswith(".py"))
    return sorted(files)


def stdlib_documents() -> list[str]:
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()]
    return [d for d in docs if d.strip()]


def pydoc_topic_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def docstring_documents() -> list[str]:
    """Per stdlib module, its module, class and function docstrings."""
    docs: list[str] = []
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        nodes = [n for n in ast.walk(tree) if isinstance(n, _DOCUMENTED)]
        strings = [ast.get_docstring(n) for n in nodes]
        text = DOC_SEPARATOR.join(s for s in strings if s)
        if text:
            docs.append(text)
    return docs


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def unicode_documents() -> list[str]:
    """One document per block of 256 code points: 'U+0041 LATIN CAPITAL LETTER A' lines."""
    docs: list[str] = []
    for start in range(0, sys.maxunicode + 1, 256):
        named = [(cp, unicodedata.name(chr(cp), "")) for cp in range(start, start + 256)]
        lines = [f"U+{cp:04X} {label}" for cp, label in named if label]
        if lines:
            docs.append("\n".join(lines))
    return docs
