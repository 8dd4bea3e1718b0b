"""What the machine can hold: readable sizes, bounded image and batch sizes, memory, a full disk
under the cache (a real, small tmpfs), and duplicate CSV ids; each bad input is one ``error:`` line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, fill_up, real_disk_usage, small_tmpfs, write_config
from PIL import Image

from alpa_tune.config import ConfigError, DataConfig, load_config
from alpa_tune.data import DataError, cache, load_dataset
from alpa_tune.units import format_bytes


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (13_824, "13.8 KB"), (2_097_152, "2.1 MB"),
     (73_728_128, "73.7 MB"), (23_720_000_000_000, "23.7 TB")],
)
def test_format_bytes_picks_the_readable_unit(count: int, text: str) -> None:
    assert format_bytes(count) == text


# --- image and batch sizes -----------------------------------------------------------------------


def test_absurd_image_size_is_refused_with_its_bound(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path), ["data.image_size=100000"])
    assert str(caught.value) == (
        "data.image_size: at most 1024 px, got 100000 (a decoded image takes 3 x size² bytes, 30.0 GB at "
        "100000 px, kept for every image; the paper uses 256)"
    )
    assert load_config(write_config(tmp_path), ["data.image_size=1024"]).data.image_size == 1024


def test_batch_whose_inputs_alone_exceed_the_bound_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path), ["data.image_size=1024", "training.batch_size=5000"])
    assert str(caught.value) == (
        "training.batch_size: at most 317 at data.image_size 1024, got 5,000 (one batch of float32 inputs, "
        "batch x 3 x 1024² x 4 bytes, would take 62.9 GB, over the 4.0 GB bound, before any activation)"
    )
    assert load_config(write_config(tmp_path), ["data.image_size=1024", "training.batch_size=317"])


def test_in_memory_source_larger_than_memory_is_refused_before_allocating() -> None:
    # 10^9 synthetic images would need terabytes: refused at once, nothing generated.
    with pytest.raises(DataError, match=r"^data: 1,000,000,001 synthetic images of 32 x 32 px \(held in memory\) "
                       r"need about 16\.4 TB of memory but this machine has .* available; lower data.image_size "
                       r"or data.num_samples$"):
        load_dataset(DataConfig(source="synthetic", num_samples=10**9))


def test_cli_image_size_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    done = cli("run", str(write_config(tmp_path)), "--set", "data.image_size=100000", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: data.image_size: at most 1024 px, got 100000")
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert not (tmp_path / "alpa-tune.db").exists()


# --- duplicate CSV ids ---------------------------------------------------------------------------


def write_csv(root: Path, rows: list[str]) -> Path:
    (root / "train_images").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(root / "train_images" / f"img{i}.png")
    table = root / "train.csv"
    table.write_text("\n".join(["id_code,diagnosis", *rows]) + "\n", encoding="utf-8")
    return table


def csv_cfg(table: Path, tmp_path: Path) -> DataConfig:
    return DataConfig(source="csv", path=str(table), image_size=16, cache_dir=str(tmp_path / "cache"))


def test_duplicate_id_is_refused_naming_the_first_repeat_and_both_lines(tmp_path: Path) -> None:
    rows = ["img0,0", "img1,1", "img2,0", "img1,0", "img3,1", "img2,1"]  # img1 at lines 3 and 5, under two labels
    table = write_csv(tmp_path, rows)
    with pytest.raises(DataError) as caught:
        load_dataset(csv_cfg(table, tmp_path))
    assert str(caught.value) == f"{table} line 5: id_code 'img1' repeats line 3 (each image must appear once)"
    assert not (tmp_path / "cache").exists()  # refused before any decoding


def test_two_ids_naming_one_file_are_refused(tmp_path: Path) -> None:
    table = write_csv(tmp_path, ["img0,0", "img1,1", "img1.png,0", "img2,1"])
    with pytest.raises(DataError) as caught:
        load_dataset(csv_cfg(table, tmp_path))
    assert str(caught.value) == (
        f"{table} line 4: 'img1.png' names the image img1.png of line 3 again (each image must appear once)"
    )


def test_cli_duplicate_ids_are_one_error_line_and_exit_2(tmp_path: Path) -> None:
    table = write_csv(tmp_path, ["img0,0", "img1,1", "img0,1", "img2,0"])
    config = tmp_path / "dup.toml"
    config.write_text(
        write_config(tmp_path).read_text()
        .replace('source = "synthetic"', f'source = "csv"\npath = "{table}"\ncache_dir = "{tmp_path / "cache"}"')
    )
    done = cli("run", str(config), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: {table} line 4: id_code 'img0' repeats line 2 (each image must appear once)\n"


def test_two_class_links_to_one_folder_are_refused(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "src" / name).mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(tmp_path / "src" / name / "0.png")
    root = tmp_path / "root"
    root.mkdir()
    (root / "cat").symlink_to(tmp_path / "src" / "a")
    (root / "dog").symlink_to(tmp_path / "src" / "b")
    (root / "kitten").symlink_to(tmp_path / "src" / "a")
    with pytest.raises(DataError, match=r"^data.path: class folders 'cat' and 'kitten' share images"):
        load_dataset(DataConfig(source="folder", path=str(root), image_size=16, cache_dir=str(tmp_path / "c")))


# --- a full disk under the cache: a real tmpfs ------------------------------------------------


def write_tree(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(count // 2):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")


def not_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix not in (".npy", ".json", ".lock", ".verified"))


def test_cache_larger_than_its_disk_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tree(tmp_path / "d", 60)
    monkeypatch.setattr(cache, "decode_image", lambda *_a: pytest.fail("decoded although the disk is too small"))
    with small_tmpfs(tmp_path / "mnt") as mnt:
        with pytest.raises(DataError) as caught:
            load_dataset(DataConfig(source="folder", path=str(tmp_path / "d"), image_size=128, cache_dir=str(mnt)))
        assert str(caught.value) == (
            f"data.cache_dir: {mnt} has 2.1 MB free but the decoded images need 2.9 MB "
            "(60 images of 3 x 128 x 128 bytes) plus 64.0 MB to spare; point data.cache_dir at a larger disk"
        )
        assert not_entries(mnt) == []


def test_disk_filling_up_during_the_build_is_a_clear_error_and_spares_other_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "_SPARE_BYTES", 0)  # a 2 MB disk could hold nothing with 64 MB to spare
    write_tree(tmp_path / "small", 6)
    write_tree(tmp_path / "big", 40)
    with small_tmpfs(tmp_path / "mnt") as mnt:
        small = DataConfig(source="folder", path=str(tmp_path / "small"), image_size=16, cache_dir=str(mnt))
        big = DataConfig(source="folder", path=str(tmp_path / "big"), image_size=32, cache_dir=str(mnt))
        kept = np.asarray(load_dataset(small).images).copy()
        before = {p.name: p.read_bytes() for p in mnt.iterdir() if p.suffix in (".npy", ".json")}

        # The free-space check passes, then another writer takes the space before the images are written.
        real_usage = real_disk_usage
        filler: list[Path] = []

        def usage_then_fill(path: os.PathLike[str] | str) -> object:
            result = real_usage(path)
            if not filler:
                filler.append(fill_up(mnt, leave=50_000))  # 123 KB of images will not fit
            return result

        monkeypatch.setattr(cache.shutil, "disk_usage", usage_then_fill)
        with pytest.raises(DataError) as caught:
            load_dataset(big)
        monkeypatch.setattr(cache.shutil, "disk_usage", real_usage)
        free = format_bytes(real_usage(mnt).free)
        assert str(caught.value) == (
            f"data.cache_dir: {mnt} is full ({free} free) while writing the 122.9 KB of decoded images; "
            "free space there or point data.cache_dir at a larger disk"
        )
        assert not_entries(mnt) == ["filler"]  # no temporary file left behind
        assert {p.name: p.read_bytes() for p in mnt.iterdir() if p.suffix in (".npy", ".json")} == before
        lines: list[str] = []
        np.testing.assert_array_equal(load_dataset(small, log=lines.append, verify="full").images, kept)
        assert lines == []

        filler[0].unlink()  # room again: the same build now succeeds
        assert load_dataset(big).images.shape == (40, 32, 32, 3)


def test_disk_full_when_writing_the_metadata_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "_SPARE_BYTES", 0)
    with small_tmpfs(tmp_path / "mnt") as mnt:

        def fill(out: np.ndarray, _progress: object) -> None:
            out[:] = 7
            fill_up(mnt)  # the disk fills while the images are decoded: the metadata has no room

        plan = cache.CachePlan(count=10, size=16, fill=fill, meta={"labels": list(range(10))})
        with pytest.raises(DataError, match=rf"^data.cache_dir: {mnt} is full \(0 B free\) while writing the 7.7 KB"):
            cache.load_or_build(mnt, "k", lambda: plan)
        assert not_entries(mnt) == ["filler"] and not (mnt / "k.npy").exists() and not (mnt / "k.json").exists()
