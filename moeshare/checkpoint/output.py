"""Writing a directory all or nothing, for every command that writes one (consolidate, export, the zoo).

The directory is built under a hidden sibling `.NAME.tmp-PID` and renamed into place. `.NAME.lock` beside it
keeps two runs from writing one directory at once; leftovers of runs that died where no cleanup could run
(SIGKILL, power loss) are removed by the next run. `--force` replaces only what this tool made.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from moeshare.errors import MoeshareError

LEFTOVER_KINDS = ("tmp", "partial", "old")  # written, being built (the zoo), replaced and about to be removed


def leftover(target: Path, kind: str) -> Path:
    """This process's hidden sibling of `target`: `.NAME.KIND-PID`."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_leftovers(target: Path) -> None:
    """Remove the hidden siblings of `target` left by processes that are gone.

    A `.old` one with no `target` is what a run killed between its two renames had replaced: it is put back."""
    for path in target.parent.glob(f".{glob.escape(target.name)}.*-*"):
        kind, _, pid = path.name[len(target.name) + 2 :].rpartition("-")
        if kind not in LEFTOVER_KINDS or not pid.isdigit() or process_alive(int(pid)):
            continue
        if kind == "old" and not os.path.lexists(target):
            path.rename(target)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def publish(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory to `out`, replacing what was there only once it is complete."""
    if os.path.lexists(out):
        old = leftover(out, "old")
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)  # `out` stays as it was
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        tmp.rename(out)


def follow_umask(directory: Path) -> None:
    """Give files that a library wrote private (0600, as safetensors does) the mode an ordinary file gets."""
    mask = os.umask(0)
    os.umask(mask)
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask | stat.S_IMODE(path.stat().st_mode) & 0o111)


class OutputLock:
    """An exclusive flock on `.NAME.lock` beside the output, holding the writer's PID; removed on release."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = target.parent / f".{target.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise MoeshareError(
                    f"{self.target}: being written by PID {holder} (another moeshare run); "
                    "wait for it to finish or choose another --out"
                ) from None
            # the holder we raced may have removed the file after its run: then lock the one there now
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _describe(path: Path) -> str:
    if path.is_symlink():
        return "a symbolic link"
    if not path.is_dir():
        return "a file"
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"a directory holding {shown}"


def _check_target(target: Path, inputs: Iterable[Path]) -> None:
    if target.name in ("", ".", ".."):
        raise MoeshareError(f"--out {target}: name the directory to write, e.g. ./store, not {str(target)!r}")
    real = Path(os.path.realpath(target))
    if real == Path.cwd() or real in Path.cwd().parents:
        raise MoeshareError(f"--out {target}: is the current directory or holds it; choose a new directory")
    for source in inputs:
        src = Path(os.path.realpath(source))
        if src == real or real in src.parents:
            raise MoeshareError(f"--out {target}: is or holds the input {source}; choose another --out")
    for parent in target.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise MoeshareError(f"--out {target}: {parent} is a file, not a directory")
            break


def _check_replaceable(target: Path, force: bool, ours: Callable[[Path], bool], what: str) -> None:
    if not os.path.lexists(target):
        return
    if not force:
        raise MoeshareError(f"{target}: already exists; choose another --out or pass --force to replace it")
    if target.is_dir() and not target.is_symlink() and (ours(target) or not any(target.iterdir())):
        return
    raise MoeshareError(
        f"{target}: is {_describe(target)}, not {what}; --force replaces only {what} or an empty directory: "
        "choose another --out or remove it yourself"
    )


def _make_parents(directory: Path) -> Path | None:
    """mkdir -p; the topmost directory it made (to remove again if the run fails), or None."""
    missing = [p for p in (directory, *directory.parents) if not os.path.lexists(p)]
    directory.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def _remove_made(made: Path | None, directory: Path) -> None:
    """Remove the empty directories _make_parents made, from `directory` up to `made`."""
    if made is None:
        return
    for path in (directory, *directory.parents):
        try:
            path.rmdir()
        except OSError:
            return
        if path == made:
            return


def write_error(target: Path, e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{target}: no space left on the device; free some space or choose another --out (nothing was written)"
    where = e.filename if e.filename else target
    return f"{where}: {e.strerror or e} (nothing was written to {target})"


@contextlib.contextmanager
def writing(
    out: str | Path, *, force: bool, ours: Callable[[Path], bool], what: str, inputs: Iterable[Path] = ()
) -> Iterator[Path]:
    """Lock `out`, check it may be written, and yield an empty temporary directory to fill; on a clean exit it
    is published at `out`, on any error or interrupt removed (with the lock), so `out` is as it was.

    `ours(path)`: whether an existing directory is `what` (e.g. "a moeshare store") and so replaceable with
    `force`. `inputs`: paths the run reads, which `out` must neither be nor hold."""
    target = Path(out)
    _check_target(target, inputs)
    made = None
    lock = OutputLock(target)
    try:
        made = _make_parents(target.parent)
        lock.acquire()
        remove_stale_leftovers(target)
        _check_replaceable(target, force, ours, what)
        tmp = leftover(target, "tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # a reused PID's; the lock says no run of ours is writing it
        try:
            tmp.mkdir()
            yield tmp
            publish(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except BaseException as e:
        lock.release()
        _remove_made(made, target.parent)
        if isinstance(e, OSError):
            raise MoeshareError(write_error(target, e)) from None
        raise
    lock.release()
