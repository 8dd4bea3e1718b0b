"""The decode-once cache: reuse without decoding, invalidation, damage, concurrent builders."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alpa_tune.config import DataConfig
from alpa_tune.data import DataError, cache, load_dataset


def write_tree(root: Path, per_class: int = 6, classes: int = 3) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")


def cfg(root: Path, cache_dir: Path, size: int = 16) -> DataConfig:
    return DataConfig(source="folder", path=str(root), image_size=size, cache_dir=str(cache_dir))


def entry_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if p.suffix in (".npy", ".json"))


def test_second_load_maps_the_cache_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tree(tmp_path / "d")
    first = load_dataset(cfg(tmp_path / "d", tmp_path / "c"))
    npy = next((tmp_path / "c").glob("*.npy"))
    stamp = npy.stat().st_mtime_ns

    def no_decoding(*_args: object) -> np.ndarray:
        raise AssertionError("a cache hit must not decode")

    monkeypatch.setattr(cache, "decode_image", no_decoding)
    calls = []
    second = load_dataset(cfg(tmp_path / "d", tmp_path / "c"), lambda d, t: calls.append(d))
    assert isinstance(second.images, np.memmap) and not second.images.flags.writeable
    assert Path(second.images.filename).resolve() == npy.resolve()
    np.testing.assert_array_equal(np.asarray(first.images), np.asarray(second.images))
    assert npy.stat().st_mtime_ns == stamp and calls == []
    assert second.fingerprint == first.fingerprint
    assert len(entry_files(tmp_path / "c")) == 2  # images .npy + metadata .json, nothing else


def test_changed_file_or_size_makes_a_new_entry(tmp_path: Path) -> None:
    write_tree(tmp_path / "d")
    base = load_dataset(cfg(tmp_path / "d", tmp_path / "c"))
    other_size = load_dataset(cfg(tmp_path / "d", tmp_path / "c", size=8))
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "d" / "c1" / "0.png")
    os.utime(tmp_path / "d" / "c1" / "0.png", ns=(1, 1))  # even with an odd mtime, size/mtime differ
    edited = load_dataset(cfg(tmp_path / "d", tmp_path / "c"))
    assert len({base.fingerprint, other_size.fingerprint, edited.fingerprint}) == 3
    assert tuple(edited.images[6, 5, 5]) == (1, 2, 3)
    assert len(entry_files(tmp_path / "c")) == 6


def test_damaged_or_partial_entries_are_rebuilt(tmp_path: Path) -> None:
    write_tree(tmp_path / "d")
    good = np.asarray(load_dataset(cfg(tmp_path / "d", tmp_path / "c")).images).copy()
    npy = next((tmp_path / "c").glob("*.npy"))
    npy.write_bytes(npy.read_bytes()[:200])  # truncated array
    (tmp_path / "c" / ".stale.npy.tmp").write_bytes(b"left by a killed builder")
    np.testing.assert_array_equal(load_dataset(cfg(tmp_path / "d", tmp_path / "c")).images, good)
    npy.with_suffix(".json").unlink()  # array without metadata: an unfinished build
    np.testing.assert_array_equal(load_dataset(cfg(tmp_path / "d", tmp_path / "c")).images, good)


def test_temp_files_of_killed_builders_are_removed(tmp_path: Path) -> None:
    write_tree(tmp_path / "d")
    load_dataset(cfg(tmp_path / "d", tmp_path / "c"))
    npy = next((tmp_path / "c").glob("*.npy"))
    key = npy.stem
    npy.unlink()
    stale = tmp_path / "c" / f".{key}.k1ll3d.npy.tmp"
    stale.write_bytes(b"\0" * 1000)
    other = tmp_path / "c" / ".another-key.x.npy.tmp"  # another dataset's: not ours to judge
    other.write_bytes(b"\0")
    load_dataset(cfg(tmp_path / "d", tmp_path / "c"))
    assert not stale.exists() and other.exists()


def test_too_little_disk_space_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tree(tmp_path / "d")
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(DataError, match=r"data.cache_dir: .* GiB free"):
        load_dataset(cfg(tmp_path / "d", tmp_path / "c"))


def test_default_cache_dir_is_the_user_cache_folder() -> None:
    from platformdirs import user_cache_dir

    assert cache.resolve_cache_dir(None) == Path(user_cache_dir("alpa-tune"))
    assert cache.resolve_cache_dir("~/x") == Path.home() / "x"


def _build_in_child(root: str, cache_dir: str, barrier: mp.Barrier, queue: mp.Queue, lock: bool) -> None:
    if not lock:
        # Every process decodes and renames: only the atomic rename keeps the cache valid.
        cache._build_lock = lambda _path: contextlib.nullcontext(False)
    built = []
    barrier.wait()  # start together
    data = load_dataset(cfg(Path(root), Path(cache_dir)), lambda d, t: built.append(d))
    queue.put((hashlib.sha256(np.asarray(data.images).tobytes()).hexdigest(), bool(built),
               isinstance(data.images, np.memmap), data.labels.tolist()))


@pytest.mark.parametrize("lock", [True, False], ids=["with-lock", "rename-only"])
def test_concurrent_builders_produce_one_valid_cache(tmp_path: Path, lock: bool) -> None:
    write_tree(tmp_path / "d", per_class=40)
    # fork: cheap to start, and the children only use numpy and PIL (no torch threads).
    ctx = mp.get_context("fork")
    queue, barrier, workers = ctx.Queue(), ctx.Barrier(4), 4
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path / "d"), str(tmp_path / "c"), barrier, queue, lock))
             for _ in range(workers)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    reference = load_dataset(cfg(tmp_path / "d", tmp_path / "fresh"))
    expected = hashlib.sha256(np.asarray(reference.images).tobytes()).hexdigest()
    assert {r[0] for r in results} == {expected}
    assert all(r[2] for r in results) and all(r[3] == reference.labels.tolist() for r in results)
    builders = sum(r[1] for r in results)
    assert builders == 1 if lock else builders >= 1
    # No temporary files left behind; exactly one entry.
    leftovers = [p.name for p in (tmp_path / "c").iterdir() if p.suffix not in (".npy", ".json", ".lock")]
    assert leftovers == [] and len(entry_files(tmp_path / "c")) == 2
