"""Writes that leave either the old state or the new one, never half of either.

A checkpoint, a distilled model or a results file can take minutes to hours to compute and is
written last; an interrupted write (Ctrl-C, ``kill``, a full disk) must not leave something that
looks like a result. Everything here writes into a temporary name beside the target, on the same
file system, and renames it into place at the end (``rename(2)`` is atomic within a file system):

* ``atomic_directory(target)``: a folder is staged as ``.<name>.partial-<pid>-<random>`` and renamed
  to ``target`` when the ``with`` block ends without an exception; on an exception (including
  ``KeyboardInterrupt``) the staging folder is deleted. A process killed outright leaves only the
  hidden staging folder, which nothing loads and the next write to the same target removes.
* ``atomic_write_text(path, text)``: the same for one file.

Replacing an existing target is explicit (``overwrite=True``): the old folder is first renamed
aside, the new one renamed into place, then the old one deleted, so at every instant ``target``
is either the complete old folder or the complete new one (or, for an instant between the two
renames, absent).

What is renamed into place has the permissions an ordinary write gives under the user's umask
(files ``0o666 & ~umask``, folders ``0o777 & ~umask``): some writers stage through private
temporary files (safetensors' serializer creates its file ``0o600``), which would otherwise leave a
checkpoint that another account, e.g. a serving process, cannot read. ``ordinary_permissions``
does that for writes that do not go through this module.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_directory", "atomic_write_text", "check_can_create", "check_new_directory", "check_not_an_input",
           "ordinary_permissions"]

_PARTIAL = ".partial-"
_OLD = ".old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(target: Path) -> None:
    """Delete staging folders of earlier writes to ``target`` whose process no longer runs."""
    prefix = f".{target.name}{_PARTIAL}"
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _relation(path: Path, other: Path) -> str | None:
    """How ``path`` overlaps ``other``: ``"is"``, ``"contains"`` (``other`` lies inside ``path``, so
    replacing ``path`` deletes it), ``"is inside"`` (writing ``path`` writes into ``other``), or None."""
    path, other = path.resolve(), other.resolve()
    if path == other:
        return "is"
    if path in other.parents:
        return "contains"
    if other in path.parents:
        return "is inside"
    return None


def check_not_an_input(path: str | os.PathLike, what: str, inputs) -> None:
    """``ValueError`` when the output ``path`` is, contains or lies inside one of ``inputs``
    (``(label, path)`` pairs, ``None`` paths skipped): an output never overwrites an input or writes
    into an input's folder, whatever ``overwrite`` says."""
    for label, other in inputs:
        if other is None:
            continue
        relation = _relation(Path(path).expanduser(), Path(other).expanduser())
        if relation is not None:
            raise ValueError(f"{what} {path} {relation} the {label} {other}; write to a folder outside every input: "
                             "an input is never overwritten or written into")


def check_new_directory(target: str | os.PathLike, overwrite: bool = False, what: str = "output folder",
                        inputs=(), overwrite_option: str = "overwrite=True") -> Path:
    """``target`` as a ``Path`` if a folder can be written there, else an error that says why.

    Accepted: a path that does not exist (its parent is created if needed) or an empty folder;
    an existing non-empty folder only with ``overwrite=True``; never an empty path, never a file, and
    never a folder that is, contains or lies inside one of ``inputs`` (``(label, path)`` pairs: what
    the command reads), whatever ``overwrite`` says. ``overwrite_option`` is how the caller's user
    says "overwrite" (``--overwrite`` on the command line). The check creates and removes a staging
    folder beside ``target``, so an unwritable place (a read-only file system, ``/proc``, a missing
    permission) is found before any work is done.
    """
    if not str(target).strip():
        raise ValueError(f"{what} is an empty path ({str(target)!r}); pass the folder to write, e.g. 'pruned-model'")
    path = Path(target).expanduser()
    check_not_an_input(target, what, inputs)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{what} {target} is an existing file; pass a folder path")
        if any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{what} {target} exists and is not empty; choose a new folder, or pass "
                                  f"{overwrite_option} to replace it")
    check_can_create(path, what)
    return path


def check_can_create(path: Path, what: str = "output") -> None:
    """Create and remove a staging entry beside ``path``: raises ``OSError`` naming ``path`` if impossible."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}{_PARTIAL}{os.getpid()}-probe-{secrets.token_hex(4)}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        reason = e.strerror or str(e)
        raise OSError(e.errno or errno.EACCES,
                      f"cannot write the {what} {path}: {reason} (in {path.parent}); choose a writable location") from None


def _umask() -> int:
    """The process's umask. Linux reports it in ``/proc/self/status``; elsewhere it can only be read by
    setting it and putting it back (``os.umask`` returns the old value), which a thread creating a
    file at that instant would see, hence the second choice."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions an ordinary write
    gives under the umask: ``0o666 & ~umask`` for files (``0o777 & ~umask`` for those with an
    execute bit), ``0o777 & ~umask`` for folders. Links are left alone."""
    mask = _umask()
    path = Path(path)
    entries = [path] + (sorted(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    for entry in entries:
        if entry.is_symlink():
            continue
        mode = entry.stat().st_mode
        executable = entry.is_dir() or mode & 0o111
        wanted = (0o777 if executable else 0o666) & ~mask
        if mode & 0o7777 != wanted:
            os.chmod(entry, wanted)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Stage a folder and rename it to ``target`` at the end of the ``with`` block (see the module doc).

    ``target`` may be absent or an empty folder; a non-empty folder is replaced only with
    ``overwrite=True`` (``FileExistsError`` otherwise, raised before the block runs).
    """
    target = check_new_directory(target, overwrite)
    _remove_stale_partials(target)
    staging = target.parent / f".{target.name}{_PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        ordinary_permissions(staging)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_directory(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    if not any(target.iterdir()):
        target.rmdir()
        os.rename(staging, target)
        return
    old = target.parent / f".{target.name}{_OLD}{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)  # put the old folder back: the target is never left missing
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it and ``os.replace``."""
    path = Path(path)
    tmp = path.parent / f".{path.name}{_PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path
