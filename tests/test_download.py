"""Hermetic tests of adamba.data.download against a misbehaving HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adamba.data import download as dl
from adamba.data.download import (
    DownloadError,
    download_file,
    download_hf_dataset,
    hf_endpoint,
    hf_file_url,
    list_hf_parquet_files,
    validate_parquet,
)

REPO = "owner/name"
SHARDS = [f"data/train-{i:05d}.parquet" for i in range(3)]
FAST = {"backoff": 0.0, "timeout": 5.0}


@dataclass
class ServerState:
    """What the server serves, how it misbehaves, and what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)  # URL path -> body
    pages: dict[str, tuple[list, str | None]] = field(default_factory=dict)  # path?query -> (JSON, next link)
    short_bodies: int = 0  # this many responses announce the full length but send half the body
    drop_after_half: int = 0  # this many responses send half the body, then shut the socket down
    ignore_range: bool = False  # answer every request with 200 and the whole file
    status: int | None = None  # answer every file request with this error status
    extra_bytes: bytes = b""  # appended to every body (and to its Content-Length)
    no_length: bool = False  # omit Content-Length: the body ends when the connection closes
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path?query, Range header)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def file_requests(self, prefix: str = "/") -> list[tuple[str, str | None]]:
        return [r for r in self.requests if r[0].startswith(prefix) and "/api/" not in r[0]]


def _make_handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):
            """Keep pytest output clean."""

        def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            rng = self.headers.get("Range")
            with state.lock:
                state.requests.append((self.path, rng))
                short = state.short_bodies > 0
                state.short_bodies -= short
                drop = not short and state.drop_after_half > 0
                state.drop_after_half -= drop
            if self.path in state.pages:
                entries, next_link = state.pages[self.path]
                headers = {"Content-Type": "application/json"}
                if next_link:
                    headers["Link"] = f'<{next_link}>; rel="next"'
                body = json.dumps(entries).encode()
                self._send(200, body, {**headers, "Content-Length": str(len(body))})
                return
            path = urlsplit(self.path).path
            if state.status is not None:
                self._send(state.status, b"nope", {"Content-Length": "4"})
                return
            if path not in state.files:
                self._send(404, b"missing", {"Content-Length": "7"})
                return
            data = state.files[path] + state.extra_bytes
            start = 0
            if rng and not state.ignore_range:
                start = int(rng.removeprefix("bytes=").removesuffix("-"))
            body = data[start:]
            headers = {} if state.no_length else {"Content-Length": str(len(body))}
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self.send_response(206 if start else 200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if short or drop:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                if drop:
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server():
    """A fresh local server per test: yields (base URL, state) and shuts down afterwards."""
    state = ServerState()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Stream in 1 KiB chunks so the few-KB test files span many reads."""
    monkeypatch.setattr(dl, "CHUNK_SIZE", 1024)


def _parquet_bytes(tmp_path: Path, seed: int, rows: int = 600) -> bytes:
    table = pa.table(
        {"id": list(range(seed, seed + rows)), "text": [f"doc {seed}-{i} " * 3 for i in range(rows)]}
    )
    path = tmp_path / f"src_{seed}.parquet"
    pq.write_table(table, path, compression="none")
    return path.read_bytes()


@pytest.fixture
def served(server, tmp_path):
    """A server holding one parquet file at /files/a.parquet: yields (url, bytes, state)."""
    base, state = server
    data = _parquet_bytes(tmp_path, 0)
    assert len(data) > 8 * 1024
    state.files["/files/a.parquet"] = data
    return f"{base}/files/a.parquet", data, state


def test_clean_download(served, tmp_path):
    url, data, state = served
    dest = tmp_path / "out" / "a.parquet"
    got = download_file(url, dest, expected_size=len(data), validate=validate_parquet, **FAST)
    assert got == dest
    assert dest.read_bytes() == data
    assert not (tmp_path / "out" / "a.parquet.part").exists()
    assert len(state.file_requests()) == 1


def test_dropped_connection_resumes_with_range(served, tmp_path):
    url, data, state = served
    state.drop_after_half = 1
    dest = tmp_path / "a.parquet"
    download_file(url, dest, **FAST)
    assert dest.read_bytes() == data
    reqs = state.file_requests()
    assert len(reqs) == 2
    assert reqs[0][1] is None
    assert reqs[1][1] == f"bytes={len(data) // 2}-"


def test_truncated_body_retried_until_complete(served, tmp_path):
    url, data, state = served
    state.short_bodies = 2
    dest = tmp_path / "a.parquet"
    download_file(url, dest, expected_size=len(data), validate=validate_parquet, **FAST)
    assert dest.read_bytes() == data
    reqs = state.file_requests()
    assert len(reqs) == 3
    half = len(data) // 2
    assert [r[1] for r in reqs] == [None, f"bytes={half}-", f"bytes={half + (len(data) - half) // 2}-"]


def test_truncated_body_without_retries_fails(served, tmp_path):
    url, data, state = served
    state.short_bodies = 1
    dest = tmp_path / "a.parquet"
    with pytest.raises(DownloadError) as exc:
        download_file(url, dest, expected_size=len(data), retries=1, **FAST)
    assert url in str(exc.value)
    assert not dest.exists()
    # The good prefix is kept for the next run to resume from.
    assert (tmp_path / "a.parquet.part").read_bytes() == data[: len(data) // 2]
    download_file(url, dest, expected_size=len(data), retries=1, **FAST)
    assert dest.read_bytes() == data
    assert state.file_requests()[-1][1] == f"bytes={len(data) // 2}-"


def test_server_ignoring_range_restarts_from_zero(served, tmp_path):
    url, data, state = served
    state.short_bodies = 1
    state.ignore_range = True
    dest = tmp_path / "a.parquet"
    download_file(url, dest, expected_size=len(data), validate=validate_parquet, **FAST)
    assert dest.read_bytes() == data
    reqs = state.file_requests()
    assert len(reqs) == 2 and reqs[1][1] is not None  # it did ask to resume, and got the whole file


def test_always_500_gives_up_after_retries(served, tmp_path):
    url, _, state = served
    state.status = 500
    dest = tmp_path / "a.parquet"
    with pytest.raises(DownloadError, match="after 3 attempts") as exc:
        download_file(url, dest, retries=3, **FAST)
    assert url in str(exc.value)
    assert len(state.file_requests()) == 3
    assert not dest.exists()


def test_404_fails_immediately(server, tmp_path):
    base, state = server
    url = f"{base}/files/missing.parquet"
    with pytest.raises(DownloadError, match="not found") as exc:
        download_file(url, tmp_path / "m.parquet", retries=5, **FAST)
    assert url in str(exc.value)
    assert len(state.file_requests()) == 1


def test_corrupt_parquet_is_rejected(server, tmp_path):
    base, state = server
    state.files["/files/bad.parquet"] = b"<html>not parquet</html>" * 200
    url = f"{base}/files/bad.parquet"
    dest = tmp_path / "bad.parquet"
    with pytest.raises(DownloadError) as exc:
        download_file(url, dest, validate=validate_parquet, retries=2, **FAST)
    assert str(dest) in str(exc.value) and url in str(exc.value)
    assert "not a readable parquet file" in str(exc.value)
    assert not dest.exists()
    assert not (tmp_path / "bad.parquet.part").exists()
    assert [r[1] for r in state.file_requests()] == [None, None]  # retried from scratch


def test_longer_than_expected_is_discarded(served, tmp_path):
    url, data, state = served
    state.extra_bytes = b"junk"
    state.no_length = True
    dest = tmp_path / "a.parquet"
    with pytest.raises(DownloadError, match="more than the expected"):
        download_file(url, dest, expected_size=len(data), retries=2, **FAST)
    assert not dest.exists()
    assert not (tmp_path / "a.parquet.part").exists()
    assert [r[1] for r in state.file_requests()] == [None, None]  # retried from zero


def test_announced_size_mismatch_fails_fast(served, tmp_path):
    url, data, state = served
    dest = tmp_path / "a.parquet"
    with pytest.raises(DownloadError, match=f"{len(data) + 1} were expected") as exc:
        download_file(url, dest, expected_size=len(data) + 1, retries=3, **FAST)
    assert url in str(exc.value)
    assert len(state.file_requests()) == 1
    assert not dest.exists()


def test_complete_part_file_is_finished_without_network(served, tmp_path):
    url, data, state = served
    dest = tmp_path / "a.parquet"
    (tmp_path / "a.parquet.part").write_bytes(data)
    download_file(url, dest, expected_size=len(data), validate=validate_parquet, **FAST)
    assert dest.read_bytes() == data
    assert state.file_requests() == []


def _serve_hf_repo(state: ServerState, tmp_path: Path) -> dict[str, bytes]:
    """Three shards under /datasets/owner/name/resolve/main/, listed over two API pages, out of order."""
    shards = {p: _parquet_bytes(tmp_path, 1000 * i, rows=200) for i, p in enumerate(SHARDS)}
    for p, data in shards.items():
        state.files[f"/datasets/{REPO}/resolve/main/{p}"] = data

    def entry(p: str) -> dict:
        return {"type": "file", "path": p, "size": len(shards[p]), "oid": "x"}

    first = f"/api/datasets/{REPO}/tree/main?recursive=true"
    second = f"/api/datasets/{REPO}/tree/main?recursive=true&cursor=abc"
    state.pages[first] = (
        [
            {"type": "directory", "path": "data"},
            entry(SHARDS[2]),
            {"type": "file", "path": "README.md", "size": 5},
        ],
        second,
    )
    state.pages[second] = ([entry(SHARDS[1]), entry(SHARDS[0])], None)
    return shards


def test_list_hf_parquet_files_follows_pagination(server, tmp_path):
    base, state = server
    shards = _serve_hf_repo(state, tmp_path)
    files = list_hf_parquet_files(REPO, endpoint=base)
    assert files == [(p, len(shards[p])) for p in SHARDS]
    assert len([r for r in state.requests if "/api/" in r[0]]) == 2


def test_download_hf_dataset_end_to_end_and_resume(server, tmp_path, monkeypatch):
    base, state = server
    shards = _serve_hf_repo(state, tmp_path)
    monkeypatch.setenv("ADAMBA_HF_ENDPOINT", base)
    out = tmp_path / "dataset"
    paths = download_hf_dataset(REPO, out, max_shards=2, progress=False, **FAST)
    assert paths == [out / "data" / "train-00000.parquet", out / "data" / "train-00001.parquet"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == SHARDS[:2]
    for path, rel in zip(paths, SHARDS[:2], strict=True):
        assert pq.read_table(path).equals(pq.read_table(pa.BufferReader(shards[rel])))
    resolve = f"/datasets/{REPO}/resolve/"
    assert len(state.file_requests(resolve)) == 2
    again = download_hf_dataset(REPO, out, max_shards=2, progress=False, **FAST)
    assert again == paths
    assert len(state.file_requests(resolve)) == 2


def test_listing_missing_dataset_is_not_found(server):
    base, state = server
    with pytest.raises(DownloadError, match="not found") as exc:
        list_hf_parquet_files("owner/missing", endpoint=base, backoff=0.0)
    assert "owner/missing" in str(exc.value)
    assert len(state.requests) == 1


def test_bad_repo_name_is_value_error():
    with pytest.raises(ValueError, match="not-a-repo"):
        list_hf_parquet_files("not-a-repo", endpoint="http://127.0.0.1:9")


def test_endpoint_and_url(monkeypatch):
    monkeypatch.delenv("ADAMBA_HF_ENDPOINT", raising=False)
    assert hf_endpoint() == "https://huggingface.co"
    monkeypatch.setenv("ADAMBA_HF_ENDPOINT", "http://127.0.0.1:1234/")
    assert hf_file_url(REPO, "data/a b.parquet") == (
        "http://127.0.0.1:1234/datasets/owner/name/resolve/main/data/a%20b.parquet"
    )
    assert hf_file_url(REPO, "x.parquet", revision="refs/convert/parquet", endpoint="http://h") == (
        "http://h/datasets/owner/name/resolve/refs%2Fconvert%2Fparquet/x.parquet"
    )


def test_hf_corpus_spec_downloads_and_reads_documents(server, tmp_path, monkeypatch, adamba_home):
    from adamba.data.corpus import open_corpus

    base, state = server
    shards = _serve_hf_repo(state, tmp_path)
    monkeypatch.setenv("ADAMBA_HF_ENDPOINT", base)
    corpus = open_corpus(f"hf:{REPO}:2")
    expected = [t for p in SHARDS[:2] for t in pq.read_table(pa.BufferReader(shards[p])).column("text").to_pylist()]
    assert list(corpus.documents()) == expected
    assert all(str(adamba_home / "datasets") in str(p) for p in (adamba_home / "datasets").rglob("*.parquet"))
    with pytest.raises(ValueError, match="not of the form hf:"):
        open_corpus("hf:no-slash")
