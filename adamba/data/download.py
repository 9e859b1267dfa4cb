"""Fetch the parquet shards of a Hugging Face dataset over plain HTTP, robustly.

Pretraining corpora are tens of gigabytes spread over many shards, fetched over connections that drop,
stall and get throttled. Rather than pull in ``huggingface_hub``, this module speaks the two endpoints it
needs (the repo tree listing and ``resolve`` downloads) with the standard library, and makes every download
resumable (HTTP ``Range`` into a ``.part`` file), retried with exponential backoff, size-checked, validated
and atomically renamed, so a file under its final name is always complete and a rerun picks up where the
last one stopped.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TypeVar
from urllib.parse import quote, urljoin

import pyarrow.parquet as pq
from tqdm import tqdm

from ..common import replace_file

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK_SIZE = 1 << 20  # bytes per read/write while streaming; tests shrink it to exercise many chunks
MAX_BACKOFF = 60.0  # seconds; caps the exponential wait so a long retry budget never sleeps for hours
USER_AGENT = "adamba-download/1"

_T = TypeVar("_T")
_REPO_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE_RE = re.compile(r"bytes\s+\*/(\d+)")
_NEXT_LINK_RE = re.compile(r'<([^>]+)>\s*;[^,]*\brel="?next"?')


class DownloadError(RuntimeError):
    """A download or listing that failed for good: the message names the URL, the local file and the cause."""


class _RetryableError(Exception):
    """A failure worth another attempt (short body, bad resume, corrupt file) that is no HTTP/socket error."""


def hf_endpoint() -> str:
    """Base URL of the Hub; $ADAMBA_HF_ENDPOINT redirects it (a mirror, or a local server in tests)."""
    return (os.environ.get("ADAMBA_HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _is_transient(code: int) -> bool:
    """Server errors and throttling may clear up on their own; any other 4xx will not."""
    return code >= 500 or code == 429


def _backoff_sleep(attempt: int, backoff: float) -> None:
    """Wait before retry number `attempt` (1-based), doubling each time so a struggling server gets room."""
    delay = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF)
    if delay > 0:
        time.sleep(delay)


def _with_retries(
    fn: Callable[[], _T], *, what: str, url: str, retries: int, backoff: float, not_found: str
) -> _T:
    """Run one network attempt `fn` until it succeeds, retrying only failures that might be transient.

    `what` describes the operation for the final error; `not_found` is the message for a 404 (and 401/403,
    which the Hub also answers for repos that do not exist or are private), raised at once without retrying.
    """
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")
    last: BaseException | None = None
    for attempt in range(retries):
        if attempt:
            _backoff_sleep(attempt, backoff)
        try:
            return fn()
        except urllib.error.HTTPError as e:
            e.close()
            if _is_transient(e.code):
                last = e
                continue
            if e.code in (401, 403, 404):
                raise DownloadError(f"{not_found}: {url} (HTTP {e.code} {e.reason})") from e
            raise DownloadError(f"{what} failed: {url} (HTTP {e.code} {e.reason})") from e
        except (_RetryableError, OSError, http.client.HTTPException) as e:
            last = e
    plural = "s" if retries != 1 else ""
    raise DownloadError(f"{what} failed after {retries} attempt{plural}: {last}") from last


def _request(url: str, timeout: float, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    """Open `url`; identity encoding so byte offsets for Range and sizes refer to the file itself."""
    req = urllib.request.Request(
        url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {})}
    )
    return urllib.request.urlopen(req, timeout=timeout)


def _check_repo(repo: str) -> None:
    if not _REPO_RE.fullmatch(repo):
        raise ValueError(f"invalid dataset repo {repo!r}: expected 'owner/name'")


def list_hf_parquet_files(
    repo: str,
    revision: str = "main",
    endpoint: str | None = None,
    timeout: float = 30,
    *,
    retries: int = 5,
    backoff: float = 0.5,
) -> list[tuple[str, int]]:
    """Sorted (repo-relative path, size in bytes) of every parquet file in a Hub dataset at `revision`.

    Sizes come back so downloads can be checked against them; the Hub paginates large trees with a
    ``Link: <...>; rel="next"`` header, which is followed until the last page.
    """
    _check_repo(repo)
    base = (endpoint or hf_endpoint()).rstrip("/")
    url: str | None = f"{base}/api/datasets/{repo}/tree/{quote(revision, safe='')}?recursive=true"
    not_found = f"dataset {repo!r} (revision {revision!r}) not found or not accessible"
    files: list[tuple[str, int]] = []
    seen: set[str] = set()

    def fetch_page(page_url: str) -> tuple[list, str | None]:
        with _request(page_url, timeout, {"Accept": "application/json"}) as resp:
            body = resp.read()
            link = resp.headers.get("Link")
        try:
            entries = json.loads(body)
        except ValueError as e:
            raise _RetryableError(f"invalid JSON listing ({len(body)} bytes): {e}") from e
        match = _NEXT_LINK_RE.search(link or "")
        return entries, urljoin(page_url, match.group(1)) if match else None

    while url is not None and url not in seen:
        seen.add(url)
        entries, next_url = _with_retries(
            lambda u=url: fetch_page(u),
            what=f"listing {url}",
            url=url,
            retries=retries,
            backoff=backoff,
            not_found=not_found,
        )
        if not isinstance(entries, list):
            raise DownloadError(f"unexpected listing from {url}: expected a JSON list, got {type(entries)}")
        files += [
            (e["path"], int(e["size"]))
            for e in entries
            if e.get("type") == "file" and str(e.get("path", "")).endswith(".parquet")
        ]
        url = next_url
    return sorted(files)


def hf_file_url(repo: str, path: str, revision: str = "main", endpoint: str | None = None) -> str:
    """Direct download URL of one file in a Hub dataset (the Hub redirects it to its CDN)."""
    base = (endpoint or hf_endpoint()).rstrip("/")
    return f"{base}/datasets/{repo}/resolve/{quote(revision, safe='')}/{quote(path, safe='/')}"


def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    """(first byte, total size or None) of a 206 response; anything unparseable makes resuming unsafe."""
    match = _CONTENT_RANGE_RE.fullmatch((value or "").strip())
    if match is None:
        raise _RetryableError(f"206 response with unusable Content-Range {value!r}")
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


def _fetch_into(url: str, part: Path, expected_size: int | None, timeout: float) -> None:
    """One attempt at completing `part`: resume from its current length, or restart when that is impossible.

    Raises on anything short of a part file of the right size, leaving whatever good prefix it has for the
    next attempt, and deleting it when it can no longer be trusted (too long, or resumed at the wrong offset).
    """
    have = part.stat().st_size if part.exists() else 0
    if expected_size is not None and have > expected_size:
        part.unlink()
        have = 0
    if expected_size is not None and have == expected_size and have > 0:
        return
    try:
        resp = _request(url, timeout, {"Range": f"bytes={have}-"} if have else None)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        e.close()
        match = _UNSATISFIED_RANGE_RE.fullmatch((e.headers.get("Content-Range") or "").strip())
        if match and int(match.group(1)) == have and expected_size in (None, have):
            return
        part.unlink()
        raise _RetryableError(f"server refused to resume at byte {have} (HTTP 416)") from e
    with resp:
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise _RetryableError(f"asked to resume at byte {have} but the server sent from byte {start}")
            if total is None and length is not None:
                total = have + int(length)
            mode = "ab"
        elif resp.status == 200:
            total = int(length) if length is not None else None
            have, mode = 0, "wb"
        else:
            raise _RetryableError(f"unexpected HTTP status {resp.status}")
        if total is not None and expected_size is not None and total != expected_size:
            raise DownloadError(f"{url}: server reports {total} bytes but {expected_size} were expected")
        target = expected_size if expected_size is not None else total
        with open(part, mode) as f:
            while chunk := resp.read(CHUNK_SIZE):
                f.write(chunk)
                have += len(chunk)
                if target is not None and have > target:
                    break
    if target is not None and have > target:
        part.unlink()
        raise _RetryableError(f"received more than the expected {target} bytes; discarded {part}")
    if target is not None and have < target:
        raise _RetryableError(f"connection ended after {have} of {target} bytes")


def download_file(
    url: str,
    dest: Path,
    *,
    expected_size: int | None = None,
    retries: int = 5,
    backoff: float = 0.5,
    timeout: float = 30.0,
    validate: Callable[[Path], object] | None = None,
) -> Path:
    """Download `url` to `dest`, resuming, retrying and validating, and return `dest`.

    Bytes stream into ``dest.name + ".part"`` next to `dest`, which survives failures so the next attempt (or
    the next run) resumes with a Range request. Only a complete, validated, fsynced part file is renamed onto
    `dest`, atomically, so an existing `dest` is always whole and is returned without touching the network.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    def attempt() -> Path:
        _fetch_into(url, part, expected_size, timeout)
        if validate is not None:
            try:
                validate(part)
            except Exception as e:
                part.unlink(missing_ok=True)
                raise _RetryableError(f"downloaded file failed validation: {e}") from e
        replace_file(part, dest)
        return dest

    return _with_retries(
        attempt,
        what=f"downloading {url} to {dest}",
        url=url,
        retries=retries,
        backoff=backoff,
        not_found=f"not found (while downloading to {dest})",
    )


def validate_parquet(path: Path) -> None:
    """Raise ValueError unless `path` has a readable parquet footer (catches HTML error pages, truncation)."""
    try:
        with pq.ParquetFile(path):  # opening parses the footer, which truncated or HTML bodies lack
            pass
    except Exception as e:
        raise ValueError(f"{path} is not a readable parquet file: {e}") from e


def download_hf_dataset(
    repo: str,
    dest_dir: Path,
    *,
    max_shards: int | None = None,
    revision: str = "main",
    endpoint: str | None = None,
    progress: bool = True,
    **download_kwargs,
) -> list[Path]:
    """Download the first `max_shards` parquet files (in sorted order) of a Hub dataset into `dest_dir`.

    Files keep their repo-relative paths; ones already present are skipped, so rerunning after an
    interruption only fetches what is missing. `download_kwargs` go to `download_file` (retries, backoff and
    timeout also apply to the listing). Returns the local paths in listing order.
    """
    if max_shards is not None and max_shards < 0:
        raise ValueError(f"max_shards must be >= 0, got {max_shards}")
    listing_kwargs = {
        k: download_kwargs[k] for k in ("retries", "backoff", "timeout") if k in download_kwargs
    }
    files = list_hf_parquet_files(repo, revision, endpoint, **listing_kwargs)
    if max_shards is not None:
        files = files[:max_shards]
    dest_dir = Path(dest_dir)
    paths = []
    for rel, size in tqdm(files, desc=f"{repo} shards", unit="shard", disable=not progress):
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise DownloadError(f"refusing to write listed path {rel!r} outside {dest_dir}")
        url = hf_file_url(repo, rel, revision, endpoint)
        local = dest_dir.joinpath(*parts)
        paths.append(
            download_file(url, local, expected_size=size, validate=validate_parquet, **download_kwargs)
        )
    return paths
