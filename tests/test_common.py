"""The one atomic writer every file of adamba goes through (common.py)."""

import os

import pytest

from adamba.common import atomic_directory, atomic_writer, write_atomic


class Crash(Exception):
    pass


@pytest.fixture
def fsynced(monkeypatch):
    """Record what os.fsync was called on (as the paths of the descriptors), then really sync."""
    calls, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd)))
    return calls


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, fsynced):
    target = tmp_path / "report.md"
    write_atomic(target, "old contents\n")
    assert fsynced  # the completed write was made durable before the rename
    fsynced.clear()
    with pytest.raises(Crash), atomic_writer(target, "w") as f:
        f.write("new contents, half of th")
        f.flush()  # the partial bytes reach a file on disk, just not `target`
        raise Crash
    assert target.read_text() == "old contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
    assert not fsynced  # nothing to make durable for a write that never lands


def test_a_completed_write_replaces_the_file_after_fsyncing_it(tmp_path, fsynced):
    target = tmp_path / "cache.npz"
    target.write_bytes(b"old")
    with atomic_writer(target) as f:
        f.write(b"new ")
        assert target.read_bytes() == b"old"  # readers see the old file until the writer is done
        f.write(b"bytes")
    assert target.read_bytes() == b"new bytes" and [p.name for p in tmp_path.iterdir()] == ["cache.npz"]
    assert len(fsynced) == 1 and fsynced[0].startswith(str(tmp_path / ".cache.npz."))  # the temporary, pre-rename


def test_text_is_utf8_and_bytes_are_bytes(tmp_path):
    assert write_atomic(tmp_path / "a.md", "bpb ≤ 1\n").read_bytes() == "bpb ≤ 1\n".encode()
    assert write_atomic(tmp_path / "b.bin", b"\x00\xff").read_bytes() == b"\x00\xff"


def test_a_folder_that_fails_midway_leaves_the_old_folder(tmp_path, fsynced):
    target = tmp_path / "step_000001"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("old a")
    # its file was fsynced before the rename, under the temporary folder's name
    assert len(fsynced) == 1 and fsynced[0].endswith("/a") and "/.step_000001.tmp-" in fsynced[0]
    with pytest.raises(Crash), atomic_directory(target) as tmp:
        (tmp / "a").write_text("new a")
        raise Crash
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"] and (target / "a").read_text() == "old a"
    with atomic_directory(target) as tmp:  # replacing an existing folder swaps it out whole
        (tmp / "b").write_text("new b")
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"] and sorted(os.listdir(target)) == ["b"]
