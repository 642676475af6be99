"""Writing files so that a reader never sees half of one: write a temporary sibling, then ``os.replace``.

Standard library only (no torch), so every floor may use it: result files (:mod:`clex.eval.report`), and any
other file a killed process must leave either old or new, never truncated. The files get the mode a plain
``open(path, "w")`` would give them (0666 less the user's umask): ``tempfile.mkstemp`` makes its files private
(0600), which would leave a served or shared export unreadable to other users; :func:`follow_umask` does the
same for the folders others write for clex (safetensors makes its files 0600 too).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux: /proc/self/status);
    elsewhere set and restored at once."""
    with contextlib.suppress(OSError):
        found = re.search(r"^Umask:\s*([0-7]+)$", Path("/proc/self/status").read_text(), re.M)
        if found:
            return int(found.group(1), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new file under the user's umask (0666 less it), e.g. 0644 for umask 022."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode of a new folder under the user's umask (0777 less it), e.g. 0755 for umask 022."""
    return 0o777 & ~current_umask()


def follow_umask(folder: str | Path) -> None:
    """Give every file under ``folder`` the mode of a file the user writes (:func:`file_mode`) and every folder
    :func:`folder_mode`: for what other writers left private (safetensors creates its files 0600, so a saved
    model or checkpoint would be unreadable to other users of a shared or served folder)."""
    folder = Path(folder)
    files, dirs = file_mode(), folder_mode()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, dirs if path.is_dir() else files)


def temporary_sibling(path: str | Path) -> Path:
    """A new empty file beside ``path`` (same folder, a hidden name), with :func:`file_mode`: write it, then
    ``os.replace`` it onto ``path``. The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, flushed and fsynced, then
    renamed over ``path`` with ``os.replace`` (the parent folder is created). The file's mode follows the
    user's umask. Returns the path."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded with ``encoding``."""
    return atomic_write_bytes(path, text.encode(encoding))
