"""The shared-memory mirror when things go wrong: full tmpfs, truncated, replaced or
odd files, bad payloads. Each case ends in a KflashError (or a repaired mirror), never
in a signal or a hang.

The full-tmpfs cases mount real tmpfs filesystems of a few dozen KiB (root needed:
without it these tests fail and say so).
"""

import os
import struct
import subprocess
import sys
import zlib

import pytest

import kflash
from kflash import snapshot

HEADER = 64
MIN_CAPACITY = 64 * 1024


def small_tmpfs(path, size):
    if os.geteuid() != 0:
        pytest.fail("mounting a small tmpfs needs root (these tests run as root here)")
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    return path


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(size):
        where = small_tmpfs(tmp_path / f"tmpfs{len(mounted)}", size)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_tmpfs_at_creation_is_an_error_that_leaves_nothing(tmpfs):
    where = tmpfs("32k")
    with pytest.raises(kflash.KflashError, match="No space left"):
        kflash.SnapshotStore(where / "status")
    assert os.listdir(where) == [], "no temporary file left behind"


def test_a_full_tmpfs_at_growth_turns_the_mirror_off(tmpfs):
    where = tmpfs("160k")  # room for the first file, not for a bigger one
    path = where / "status"
    store = kflash.SnapshotStore(path)
    store.publish({"small": 1}, 1.0)
    assert store.mirror_error is None
    big = {f"key{i}": "x" * 100 for i in range(1000)}  # ~110 KB of JSON
    with pytest.raises(kflash.KflashError, match="No space left"):
        store.publish(big, 2.0)
    assert "No space left" in store.mirror_error
    assert store.version == 2, "the in-process store went on"
    assert store.get_status(2.0) == big
    store.publish({"later": 3}, 3.0)  # no longer raises: the mirror is off
    assert store.get_status(3.0) == {"later": 3}
    doc = snapshot.read(path)
    assert doc["version"] == 1 and doc["status"] == {"small": 1}, "last good one"
    assert sorted(os.listdir(where)) == ["status"]


def test_a_mirror_truncated_under_its_reader_is_reported_then_repaired(tmp_path):
    path = tmp_path / "status"
    store = kflash.SnapshotStore(path)
    store.publish({"a": "x" * 500}, 1.0)
    reader = snapshot.Reader(str(path))
    assert reader.read()["version"] == 1
    for size in (HEADER + 10, 8, 0):
        os.truncate(path, size)
        with pytest.raises(kflash.KflashError, match="truncated"):
            reader.read()
    store.publish({"a": "y"}, 2.0)  # the writer notices and sizes the file again
    assert os.path.getsize(path) == HEADER + MIN_CAPACITY
    assert reader.read()["status"] == {"a": "y"}
    assert store.mirror_error is None


def test_a_mirror_taken_over_by_another_writer_stops_the_first(tmp_path):
    path = tmp_path / "status"
    first = kflash.SnapshotStore(path)
    first.publish({"who": "first"}, 1.0)
    reader = snapshot.Reader(str(path))
    second = kflash.SnapshotStore(path)  # e.g. a second klippy with the same shm_path
    second.publish({"who": "second"}, 1.0)
    with pytest.raises(kflash.KflashError, match="replaced by another process"):
        first.publish({"who": "first"}, 2.0)
    assert "replaced" in first.mirror_error
    first.publish({"who": "first"}, 3.0)
    assert reader.read()["status"] == {"who": "second"}


def test_the_mirror_mode_is_0644_whatever_the_umask(tmp_path):
    path = tmp_path / "status"
    code = (
        "import os, sys, kflash; os.umask(0o077); "
        "kflash.SnapshotStore(sys.argv[1]).publish({'a': 1}, 1.0)"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # A blocking open would hang here forever (pytest-timeout would end it).
    with pytest.raises(kflash.KflashError, match="FIFO"):
        snapshot.read(fifo)
    with pytest.raises(kflash.KflashError, match="character device"):
        snapshot.read("/dev/zero")
    with pytest.raises(kflash.KflashError, match="directory"):
        snapshot.read(tmp_path)


def mirror_file(path, payload, version=1):
    """A mirror in the documented layout (src/snapshot/shm.rs) holding `payload`."""
    fields = struct.pack("=QQdQQ", len(payload), version, 1.5, 0, MIN_CAPACITY)
    crc = zlib.crc32(fields + payload)
    header = b"KFSNAP2\0" + struct.pack("=Q", 2) + fields + struct.pack("=II", crc, 0)
    assert len(header) == HEADER
    path.write_bytes(header + payload + b"\0" * (MIN_CAPACITY - len(payload)))


@pytest.mark.parametrize(
    "payload, what",
    [(b'{"a": "\xff\xfe"}', "not UTF-8 JSON"), (b'{"a": ', "not UTF-8 JSON")],
)
def test_a_payload_that_is_not_json_is_a_kflash_error(tmp_path, payload, what):
    path = tmp_path / "status"
    mirror_file(path, payload)
    with pytest.raises(kflash.KflashError, match=what) as info:
        snapshot.read(path)
    assert str(path) in str(info.value)
    mirror_file(path, b'{"a": 1}')  # the same layout with a good payload reads fine
    assert snapshot.read(path)["status"] == {"a": 1}
