"""One atomic writer and one write probe for every output file; TOML written by tomli-w, read by tomllib.

The full and the read-only disks are real tmpfs mounts (root only; skipped otherwise)."""

from __future__ import annotations

import errno
import math
import tomllib
from pathlib import Path

import pytest
from conftest import fill_up, small_tmpfs

from alpa_tune.config import to_toml
from alpa_tune.export import render_records
from alpa_tune.files import OutputDiskFull, check_writable, write_atomically
from alpa_tune.units import DiskFull

TRICKY = ['say "hi"', "back\\slash", "C:\\new\\table", "two\nlines", "tab\there", "cr\rlf\r\n", "ünïcødé ✓ 日本",
          "# not a comment", "'single'", '"""triple"""', "del\x7fbell\x07", "", "  spaces  ", "[not.a.table]"]
TRICKY_KEYS = ["dotted.key", "with space", "quote\"key", "ü", "#hash", "", "a=b", "back\\slash"]


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


def _tricky_table() -> dict:
    return {"name": TRICKY[0], "strings": TRICKY, **{key: value for key, value in zip(TRICKY_KEYS, TRICKY)},
            "nested": {key: {"value": value, "list": [value, 1, 2.5, True]} for key, value in zip(TRICKY_KEYS, TRICKY)}}


def test_config_writer_round_trips_tricky_strings_and_keys() -> None:
    data = _tricky_table()
    assert tomllib.loads(to_toml(data)) == data


def test_config_writer_leaves_out_none_and_writes_nan_in_arrays() -> None:
    back = tomllib.loads(to_toml({"kept": 1, "unset": None, "table": {"unset": None, "xs": [0.5, None]}}))
    assert back["kept"] == 1 and "unset" not in back and "unset" not in back["table"]
    assert back["table"]["xs"][0] == 0.5 and math.isnan(back["table"]["xs"][1])


@pytest.mark.parametrize("count", [1, 2])
def test_export_writer_round_trips_tricky_strings_and_keys(count: int) -> None:
    records = [{"loss": "alpa", "params": {"alpha": 1.5, "variant": "alpa"}, "value": 0.5, "study": study, "trial": k,
                "metrics": {"class_names": TRICKY, "per_fold": [{"fold": 0, "note": TRICKY[3]}]}, "config": _tricky_table()}
               for k, study in enumerate(TRICKY[:count])]
    text = render_records(records, "toml")
    assert text.startswith("# alpa-tune export of study ") and text.count("\n#") == 0  # one header line
    back = tomllib.loads(text)
    assert (back if count == 1 else back["trials"]) == (records[0] if count == 1 else records)
