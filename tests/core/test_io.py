"""clex.core.io: atomic writes leave the old file or the new one, never a part, and no temporary behind."""

import os

import pytest

from clex.core.io import atomic_write_bytes, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "r.json"
    assert atomic_write_text(path, "old") == path and path.read_text() == "old"
    atomic_write_bytes(path, b"new")
    assert path.read_text() == "new" and os.listdir(path.parent) == ["r.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.md"
    path.write_text("old")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.md"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    """A result or an exported config is as readable as any file the user writes (mkstemp's 0600 is not)."""
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "r.json", "{}")
        atomic_write_text(path, "{}")  # replacing keeps the umask's mode too
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_follow_umask_opens_what_other_writers_left_private(tmp_path):
    from clex.core.io import follow_umask

    (tmp_path / "sub").mkdir(mode=0o700)
    (tmp_path / "sub" / "model.safetensors").write_bytes(b"x")
    os.chmod(tmp_path / "sub" / "model.safetensors", 0o600)  # what safetensors writes
    old = os.umask(0o022)
    try:
        follow_umask(tmp_path)
    finally:
        os.umask(old)
    assert (tmp_path / "sub" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "sub").stat().st_mode & 0o777 == 0o755
