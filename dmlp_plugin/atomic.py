"""Atomic file writes: write a temporary file beside the target, fsync, then rename over it.

A reader (or a rerun after ``kill -9``) sees either the old file or the complete new one, never half.
Files get the user's umask (0644 under umask 022), as ``open`` would give them. Also: whole folders
replaced by one atomic exchange (:func:`replace_folder`), deletes confined to a root (:func:`remove_tree`),
and lock files that keep two runs off one checkpoint (:func:`exclusive`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dmlp_plugin.errors import UserError


def umask() -> int:
    """The process's umask (read without changing it where /proc tells it, else set and restored)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600; a plain open would honour the umask
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Save arrays as an uncompressed ``.npz`` atomically (no object arrays: loadable without pickle)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    write_bytes(path, buf.getvalue())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------------------------------------------------
# confinement: nothing outside a root is written or deleted


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` unchanged when it resolves (links followed) strictly below ``root``; else UserError."""
    real_root, real = Path(root).resolve(), Path(path).resolve()
    if real_root not in real.parents:
        raise UserError(f"{str(path)!r} resolves to {str(real)!r}, outside {str(root)!r}; dmlp writes and deletes "
                        f"only inside its output folder: remove the link or the name that leads out of it")
    return Path(path)


def remove_tree(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """``shutil.rmtree(path)`` (missing is fine), only after checking that ``path`` lies inside ``root``."""
    path = inside(root, path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------------
# a folder replaced as a whole


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def staging_folder(dest: Path) -> Path:
    """A new empty folder beside ``dest`` to build its replacement in (named after this process)."""
    return Path(tempfile.mkdtemp(prefix=f".{dest.name[:100]}.partial-{os.getpid()}-", dir=dest.parent))


def replace_folder(staged: Path, dest: Path) -> None:
    """Put the complete folder ``staged`` (beside ``dest``) at ``dest``, replacing what was there as a whole:
    a reader or a kill at any moment sees the old folder or the new one, never files of both. One atomic
    exchange where the file system has it; else two renames, and a kill between them leaves ``dest`` missing
    with the old folder beside it, which :func:`clean_stale` puts back. The new folder keeps the old one's
    permissions (else the umask's)."""
    os.chmod(staged, (dest.stat().st_mode & 0o7777) if dest.is_dir() else 0o777 & ~umask())
    if not dest.exists():
        os.rename(staged, dest)
        return
    if _exchange(staged, dest):
        shutil.rmtree(staged, ignore_errors=True)  # (the old folder, now at the staged path)
        return
    old = staged.with_name(staged.name.replace(".partial-", ".old-", 1))
    os.rename(dest, old)
    try:
        os.rename(staged, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dest: Path) -> None:
    """Remove the staging folders a killed run left beside ``dest`` (those of live processes stay); when a
    kill came between :func:`replace_folder`'s two renames, put the old folder back at ``dest`` first."""
    import re  # noqa: PLC0415

    pattern = re.compile(rf"\.{re.escape(dest.name[:100])}\.(partial|old)-(\d+)-[a-z0-9_]+")
    try:
        found = [(m.group(1), p) for p in dest.parent.iterdir() if (m := pattern.fullmatch(p.name))
                 and ((m.group(1) == "old" and int(m.group(2)) == os.getpid()) or not _alive(int(m.group(2))))]
    except OSError:
        return
    for kind, p in sorted(found, key=lambda kp: kp[0] != "old"):  # old folders first
        if kind == "old" and not dest.exists() and not dest.is_symlink():
            os.rename(p, dest)
        else:
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# one run at a time on a checkpoint


def _holder(lock: Path) -> str | None:
    """Who holds ``lock`` ('pid N on HOST'), or None when its holder is gone (a stale lock)."""
    try:
        text = lock.read_text().split()
        age = time.time() - lock.stat().st_mtime
    except (OSError, UnicodeDecodeError):
        return None
    if len(text) != 2 or not text[0].isdigit():
        return None if age > 60 else "a run that is starting"  # (created, not yet written: give it a minute)
    pid, host = int(text[0]), text[1]
    if host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
        return None  # dead, or this very process: a block of it that never finished (an exception kept alive)
    return f"pid {pid} on {host}"


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the lock file ``lock`` (created with O_EXCL, holding 'pid host') while the block runs. Held by a
    live process: UserError naming it and ``what`` it protects; left by a dead one, or by this process (a
    block that never reached its end, e.g. its frame kept alive by a stored traceback): taken over."""
    lock = Path(lock)
    made = not lock.parent.exists()  # (a folder made for the lock alone goes with it)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            holder = _holder(lock)
            if holder is not None:
                raise UserError(f"another dmlp run ({holder}) is working on {what} (lock {str(lock)!r}); wait "
                                f"for it to finish and rerun, or delete the lock if no such run is alive") from None
            lock.unlink(missing_ok=True)  # its holder died: take it over
    else:
        raise UserError(f"could not take the lock {str(lock)!r} on {what}; rerun")
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()} {socket.gethostname()}\n")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text().split()[:1] == [str(os.getpid())]:
                lock.unlink()
            if made:
                lock.parent.rmdir()  # (only when empty)
