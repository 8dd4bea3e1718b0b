"""The decode-once cache: reuse without decoding, invalidation, damage, concurrent builders."""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
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


def test_too_little_disk_space_is_a_clear_error_in_readable_units(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    write_tree(tmp_path / "d")
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**9, 10**9, 1234))
    with pytest.raises(DataError) as caught:
        load_dataset(cfg(tmp_path / "d", tmp_path / "c"))
    # 18 images of 3 x 16 x 16 bytes: 13.8 KB, not "0.0 GiB".
    assert str(caught.value) == (
        f"data.cache_dir: {tmp_path / 'c'} has 1.2 KB free but the decoded images need 13.8 KB "
        "(18 images of 3 x 16 x 16 bytes) plus 64.0 MB to spare; point data.cache_dir at a larger disk"
    )


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
    results = _in_four_children(_build_in_child, str(tmp_path / "d"), str(tmp_path / "c"), lock=lock)
    reference = load_dataset(cfg(tmp_path / "d", tmp_path / "fresh"))
    expected = hashlib.sha256(np.asarray(reference.images).tobytes()).hexdigest()
    assert {r[0] for r in results} == {expected}
    assert all(r[2] for r in results) and all(r[3] == reference.labels.tolist() for r in results)
    builders = sum(r[1] for r in results)
    assert builders == 1 if lock else builders >= 1
    # No temporary files left behind; exactly one entry.
    leftovers = [p.name for p in (tmp_path / "c").iterdir() if p.suffix not in (".npy", ".json", ".lock", ".verified")]
    assert leftovers == [] and len(entry_files(tmp_path / "c")) == 2


# --- checksums: a damaged entry is found and rebuilt ------------------------------------------


def zero_block(path: Path, offset: int, length: int) -> None:
    """Overwrite ``length`` bytes at ``offset`` with zeros in place: same size, as a bad disk block."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * length)
    assert path.stat().st_size == size


def big_tree(root: Path) -> DataConfig:
    """40 noisy images at 32 px: a 123 KB cache, room for a 100 KB hole."""
    write_tree(root / "d", per_class=20, classes=2)
    return cfg(root / "d", root / "c", size=32)


def test_zeroed_block_inside_the_cache_is_found_and_rebuilt_with_one_line(tmp_path: Path) -> None:
    config = big_tree(tmp_path)
    good = np.asarray(load_dataset(config).images).copy()
    npy = next((tmp_path / "c").glob("*.npy"))
    zero_block(npy, 10_000, 100_000)  # the reported failure: 100 KB of zeros, same size
    assert not np.array_equal(np.load(npy), good)
    lines: list[str] = []
    again = load_dataset(config, log=lines.append)
    np.testing.assert_array_equal(again.images, good)
    assert len(lines) == 1, lines
    assert lines[0] == (
        f"data cache {npy} is damaged: 1 of 1 chunks of 16.8 MB differ from the checksums recorded when it "
        f"was built (first at byte 0); rebuilding it"
    )
    np.testing.assert_array_equal(np.load(npy), good)  # rebuilt in place, same key
    assert len(entry_files(tmp_path / "c")) == 2
    lines.clear()
    load_dataset(config, log=lines.append, verify="full")
    assert lines == []  # the rebuilt entry passes


def test_damage_is_named_by_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "CHECKSUM_CHUNK", 16 << 10)
    config = big_tree(tmp_path)
    load_dataset(config)
    npy = next((tmp_path / "c").glob("*.npy"))
    meta = json.loads(npy.with_suffix(".json").read_text())
    assert meta["checksum"]["chunk_bytes"] == 16 << 10 and len(meta["checksum"]["chunks"]) == 8
    zero_block(npy, 40_000, 100)
    lines: list[str] = []
    load_dataset(config, log=lines.append)
    assert len(lines) == 1 and "is damaged: 1 of 8 chunks of 16.4 KB" in lines[0]
    assert "(first at byte 32,768)" in lines[0]


def test_without_a_log_the_line_goes_to_the_data_logger(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = big_tree(tmp_path)
    load_dataset(config)
    zero_block(next((tmp_path / "c").glob("*.npy")), 500, 1000)
    with caplog.at_level("WARNING", logger="alpa_tune.data"):
        load_dataset(config)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "is damaged" in caplog.records[0].getMessage() and "rebuilding it" in caplog.records[0].getMessage()


def test_entry_of_the_old_format_is_rebuilt_in_place(tmp_path: Path) -> None:
    config = big_tree(tmp_path)
    good = np.asarray(load_dataset(config).images).copy()
    meta_path = next((tmp_path / "c").glob("*.json"))
    meta = json.loads(meta_path.read_text())
    del meta["checksum"]
    meta["version"] = 1  # what alpa-tune wrote before checksums
    meta_path.write_text(json.dumps(meta))
    lines: list[str] = []
    np.testing.assert_array_equal(load_dataset(config, log=lines.append).images, good)
    assert len(lines) == 1
    assert lines[0].endswith(" was written by an older alpa-tune (cache format 1, no checksums); rebuilding it")
    assert json.loads(meta_path.read_text())["version"] == cache.CACHE_VERSION
    assert len(entry_files(tmp_path / "c")) == 2  # same key: no orphaned copy left behind


def test_fingerprints_do_not_change_with_the_cache_format() -> None:
    # best.json records the fingerprint: a new cache format must not make old results "other data".
    as_before = hashlib.sha256(b"v1" + b"\0folder" + b"\0sig" + b"\0" + b"16").hexdigest()[:20]
    assert cache.CACHE_VERSION == 2 and cache.make_fingerprint("folder", "sig", 16) == as_before


class CountingChecksums:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.real = cache._checksums
        monkeypatch.setattr(cache, "_checksums", self)

    def __call__(self, *args: object) -> list[int]:
        self.calls += 1
        return self.real(*args)


def test_a_recent_check_spares_the_next_loads_and_any_write_voids_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "_RACY_S", 0.05)
    config = big_tree(tmp_path)
    load_dataset(config)  # build: checksums taken, no stamp
    counter = CountingChecksums(monkeypatch)
    time.sleep(0.1)
    load_dataset(config)  # the run that prepares the data: hashes, writes the stamp
    assert counter.calls == 1 and next((tmp_path / "c").glob("*.verified")).exists()
    load_dataset(config)  # a worker a moment later: trusts the stamp
    load_dataset(config)
    assert counter.calls == 1
    load_dataset(config, verify="full")  # always hashes
    assert counter.calls == 2
    npy = next((tmp_path / "c").glob("*.npy"))
    zero_block(npy, 10_000, 100_000)  # any write changes mtime/ctime: the stamp no longer applies
    lines: list[str] = []
    load_dataset(config, log=lines.append)
    assert len(lines) == 1 and "is damaged" in lines[0]


def test_stamp_expires_and_a_racy_stamp_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = big_tree(tmp_path)
    load_dataset(config)
    time.sleep(0.05)
    counter = CountingChecksums(monkeypatch)
    monkeypatch.setattr(cache, "_RACY_S", 3600.0)  # every stamp is "too close" to the file's last change
    load_dataset(config)
    load_dataset(config)
    assert counter.calls == 2
    monkeypatch.setattr(cache, "_RACY_S", 0.01)  # the same stamp, now clearly after the change
    load_dataset(config)
    assert counter.calls == 2
    monkeypatch.setattr(cache, "VERIFY_TTL_S", 0.0)  # expired
    load_dataset(config)
    assert counter.calls == 3


def _load_and_count(root: str, cache_dir: str, barrier: mp.Barrier, queue: mp.Queue) -> None:
    counter = [0]
    real = cache._checksums

    def counting(*args: object) -> list[int]:
        counter[0] += 1
        return real(*args)

    cache._checksums = counting
    barrier.wait()
    load_dataset(cfg(Path(root), Path(cache_dir), size=32))
    queue.put(counter[0])


def test_workers_starting_together_hash_once(tmp_path: Path) -> None:
    config = big_tree(tmp_path)
    load_dataset(config)
    time.sleep(cache._RACY_S + 0.1)  # past the racy window after the build
    counts = _in_four_children(_load_and_count, str(tmp_path / "d"), str(tmp_path / "c"))
    assert sorted(counts) == [0, 0, 0, 1]  # one hashed under the lock; the others trusted its stamp


def _in_four_children(target, *args, **kwargs) -> list:
    """Run ``target(*args, barrier, queue, **kwargs)`` in 4 processes released together; their results.

    fork: cheap to start, and the children only use numpy and PIL (no torch threads).
    """
    ctx = mp.get_context("fork")
    queue, barrier = ctx.Queue(), ctx.Barrier(4)
    procs = [ctx.Process(target=target, args=(*args, barrier, queue), kwargs=kwargs) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results
