"""One atomic writer and one write probe for every output file.

The full and the read-only disks are real tmpfs mounts (root only; skipped otherwise)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from conftest import fill_up, small_tmpfs

from alpa_tune.files import OutputDiskFull, check_writable, write_atomically
from alpa_tune.units import DiskFull

def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_atomically_replaces_the_content_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "out.json"
    assert write_atomically(path, "first\n") == path  # the folder is created
    write_atomically(path, "second ü\n")
    assert path.read_text(encoding="utf-8") == "second ü\n"
    write_atomically(path, b"\x00\xffbytes")
    assert path.read_bytes() == b"\x00\xffbytes"
    assert _leftovers(path.parent) == []


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_atomically(path, 12345)  # type: ignore[arg-type]  # fails mid-write, the temporary file made
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError) as caught:
        write_atomically(blocker / "out.txt", "x")  # the folder is a file: not a full disk, the OSError itself
    assert caught.value.errno in (errno.ENOTDIR, errno.EEXIST) and not isinstance(caught.value, DiskFull)
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_a_full_disk_keeps_the_old_file_and_names_the_path(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "mnt", size="1m") as mnt:
        path = mnt / "best.json"
        write_atomically(path, "old contents\n")
        fill_up(mnt)
        with pytest.raises(OutputDiskFull) as caught:
            write_atomically(path, "x" * 200_000)
        assert isinstance(caught.value, DiskFull)  # the CLI exits 5 on it
        message = str(caught.value)
        assert message.startswith(f"{path}: the disk is full (") and " free); the previous file is unchanged" in message
        assert path.read_text() == "old contents\n"
        assert sorted(p.name for p in mnt.iterdir()) == ["best.json", "filler"]  # no temporary file left
        with pytest.raises(OutputDiskFull, match=r"nothing was written"):
            write_atomically(mnt / "new.json", "x" * 200_000)
        assert not (mnt / "new.json").exists()


def test_check_writable_creates_the_folder_and_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    assert check_writable(folder) == folder
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_check_writable_refuses_a_read_only_folder_even_for_root(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "ro", size="1m", read_only=True) as ro:
        with pytest.raises(OSError) as caught:
            check_writable(ro)
        assert caught.value.errno == errno.EROFS and caught.value.filename == str(ro)
        assert str(ro) in str(caught.value) and "Read-only file system" in str(caught.value)
        with pytest.raises(OSError) as caught:
            check_writable(ro / "sub")  # a folder that cannot even be created
        assert caught.value.errno == errno.EROFS
