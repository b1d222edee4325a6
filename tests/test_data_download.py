"""Downloading against a local HTTP server started by the test (127.0.0.1 only, nothing leaves the machine).

The server honours ``Range`` requests and can be told to drop a response half-way, so resuming is tested with
a real interrupted transfer; the archives are built in the test (truncated, with ``../`` entries, absolute paths
and links) to check that extraction refuses them and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from pretrain_det3d.data.download import (
    ArchiveError, ChecksumError, DownloadError, SourceCopyError, UnsafeArchiveError, download_file, extract_archive,
    fetch_source, record_path, resolve_source_root,
)
from pretrain_det3d.data.sources import SourceConfigError, SourceEntry

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes


class FileServer:
    """Serves ``files`` (path -> bytes); ``drops`` (path -> count) makes the next responses stop half-way;
    ``refusals`` (path -> [(status, headers), ...]) answers the next requests with those statuses first."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drops: dict[str, int] = {}
        self.refusals: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.times: list[float] = []  # when each request arrived (time.monotonic)
        self.headers: list[dict[str, str]] = []  # each request's headers
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                range_header = self.headers.get("Range")
                server.requests.append((self.path, range_header))
                server.times.append(time.monotonic())
                server.headers.append(dict(self.headers.items()))
                if server.refusals.get(self.path):
                    status, headers = server.refusals[self.path].pop(0)
                    body = b"busy, try later"
                    self.send_response(status)
                    for key, value in {**headers, "Content-Length": str(len(body))}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                if match:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if server.drops.get(self.path, 0) > 0:
                    server.drops[self.path] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True  # hang up mid-body, as a dropped connection does
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server() -> Iterator[FileServer]:
    instance = FileServer()
    instance.thread.start()
    yield instance
    instance.httpd.shutdown()
    instance.httpd.server_close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as handle:
        for name, data in entries.items():
            handle.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members: list[tarfile.TarInfo], payloads: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as handle:
        for info in members:
            data = payloads.get(info.name)
            if data is not None:
                info.size = len(data)
            handle.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


# ---- resumable download ----------------------------------------------------------------------------------
def test_resume_after_interrupted_transfer(server: FileServer, tmp_path: Path) -> None:
    server.files["/data.bin"] = PAYLOAD
    server.drops["/data.bin"] = 1
    dest = download_file(server.url("/data.bin"), tmp_path / "data.bin", sha256=sha256(PAYLOAD),
                         backoff_s=0, show_progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", None), ("/data.bin", f"bytes={len(PAYLOAD) // 2}-")]
    assert not (tmp_path / "data.bin.part").exists()


def test_resume_across_runs_keeps_part_file(server: FileServer, tmp_path: Path) -> None:
    server.files["/data.bin"] = PAYLOAD
    server.drops["/data.bin"] = 2  # the first run gives up after two broken attempts
    with pytest.raises(DownloadError, match=r"gave up after 2 attempts.*next run resumes"):
        download_file(server.url("/data.bin"), tmp_path / "data.bin", retries=1, backoff_s=0, show_progress=False)
    part = tmp_path / "data.bin.part"
    assert not (tmp_path / "data.bin").exists()
    kept = part.stat().st_size
    assert kept == len(PAYLOAD) // 2 + (len(PAYLOAD) - len(PAYLOAD) // 2) // 2  # half, then half of the rest
    download_file(server.url("/data.bin"), tmp_path / "data.bin", sha256=sha256(PAYLOAD), backoff_s=0, show_progress=False)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/data.bin", f"bytes={kept}-")


def test_checksum_mismatch_removes_file(server: FileServer, tmp_path: Path) -> None:
    server.files["/data.bin"] = PAYLOAD
    wrong = sha256(b"something else")
    with pytest.raises(ChecksumError, match=rf"data\.bin \(from http://127\.0\.0\.1:\d+/data\.bin\): sha256 mismatch: expected {wrong}"):
        download_file(server.url("/data.bin"), tmp_path / "data.bin", sha256=wrong, backoff_s=0, show_progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ChecksumError, match="md5 mismatch"):
        download_file(server.url("/data.bin"), tmp_path / "data.bin", md5="0" * 32, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_error_is_clear(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"/missing\.bin: server answered HTTP 404"):
        download_file(server.url("/missing.bin"), tmp_path / "missing.bin", show_progress=False)
    assert not (tmp_path / "missing.bin").exists()


# ---- retries on refusals, re-verification -----------------------------------------------------------------
def test_429_then_success(server: FileServer, tmp_path: Path) -> None:
    server.files["/data.bin"] = PAYLOAD
    server.refusals["/data.bin"] = [(429, {}), (429, {})]  # rate-limited twice, no Retry-After
    dest = download_file(server.url("/data.bin"), tmp_path / "data.bin", sha256=sha256(PAYLOAD), retries=2,
                         backoff_s=0, show_progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", None)] * 3
    # resumable ranges count the file's own bytes: no compression is asked for
    assert all(h.get("Accept-Encoding") == "identity" for h in server.headers)


def test_503_with_retry_after_waits_as_asked(server: FileServer, tmp_path: Path, caplog) -> None:
    server.files["/data.bin"] = PAYLOAD
    server.drops["/data.bin"] = 1  # the first real answer breaks off: the retry after 503 must resume it
    server.refusals["/data.bin"] = [(503, {"Retry-After": "2"})]
    with caplog.at_level("WARNING", logger="pretrain_det3d.data.download"):
        download_file(server.url("/data.bin"), tmp_path / "data.bin", sha256=sha256(PAYLOAD), backoff_s=0,
                      show_progress=False)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", None), ("/data.bin", None), ("/data.bin", f"bytes={len(PAYLOAD) // 2}-")]
    assert server.times[1] - server.times[0] >= 1.9  # the backoff is 0: only Retry-After makes it wait
    assert server.times[2] - server.times[1] < 1.5
    assert any("HTTP 503" in r.getMessage() and "Retry-After" in r.getMessage() for r in caplog.records)


def test_refusals_beyond_the_retries_name_the_status(server: FileServer, tmp_path: Path) -> None:
    server.files["/data.bin"] = PAYLOAD
    server.refusals["/data.bin"] = [(429, {})] * 3 + [(502, {})] * 3
    with pytest.raises(DownloadError, match=r"/data\.bin: server answered HTTP 429 Too Many Requests after 2 retries"):
        download_file(server.url("/data.bin"), tmp_path / "data.bin", retries=2, backoff_s=0, show_progress=False)
    assert len(server.requests) == 3 and not (tmp_path / "data.bin").exists()
    with pytest.raises(DownloadError, match=r"HTTP 502 Bad Gateway after 2 retries"):
        download_file(server.url("/data.bin"), tmp_path / "data.bin", retries=2, backoff_s=0, show_progress=False)
    assert len(server.requests) == 6
    server.refusals["/data.bin"] = [(403, {})]  # not retried: a refusal that waiting does not change
    with pytest.raises(DownloadError, match=r"HTTP 403 Forbidden$"):
        download_file(server.url("/data.bin"), tmp_path / "data.bin", retries=2, backoff_s=0, show_progress=False)
    assert len(server.requests) == 7


def test_checksum_changed_after_completion(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    server.files["/data.bin"] = PAYLOAD
    download_file(server.url("/data.bin"), dest, show_progress=False)  # no checksum stated yet
    record = json.loads(record_path(dest).read_text())
    assert record["actual"]["sha256"] == sha256(PAYLOAD) and record["expected"]["sha256"] is None
    assert len(server.requests) == 1

    # the right checksum is stated afterwards: the file is checked against it, not fetched again
    download_file(server.url("/data.bin"), dest, sha256=sha256(PAYLOAD), show_progress=False)
    assert len(server.requests) == 1
    assert json.loads(record_path(dest).read_text())["expected"]["sha256"] == sha256(PAYLOAD)

    # a wrong checksum is never recorded as verified: the file is fetched again, fails, and the old copy stays
    wrong = sha256(b"other")
    with pytest.raises(ChecksumError, match=rf"sha256 mismatch: expected {wrong}"):
        download_file(server.url("/data.bin"), dest, sha256=wrong, backoff_s=0, show_progress=False)
    assert len(server.requests) == 2
    assert dest.read_bytes() == PAYLOAD
    assert json.loads(record_path(dest).read_text())["expected"]["sha256"] == sha256(PAYLOAD)
    with pytest.raises(ChecksumError):  # and again on the next run, never silently accepted
        download_file(server.url("/data.bin"), dest, sha256=wrong, backoff_s=0, show_progress=False)
    assert len(server.requests) == 3

    # the publisher replaced the file and the config states its new checksum: the new file replaces the old
    new_payload = PAYLOAD[::-1]
    server.files["/data.bin"] = new_payload
    download_file(server.url("/data.bin"), dest, md5=hashlib.md5(new_payload).hexdigest(), show_progress=False)
    assert dest.read_bytes() == new_payload and len(server.requests) == 4
    assert not (tmp_path / "data.bin.part").exists()


def test_changed_checksum_rechecks_an_unpacked_archive(server: FileServer, tmp_path: Path) -> None:
    old_zip = zip_bytes({"subset0/a.mhd": b"old"})
    server.files["/annotations.csv"] = b"x"
    server.files["/subset0.zip"] = old_zip
    out = tmp_path / "raw" / "demo"
    entry = open_entry(server, sha256(b"x"))
    fetch_source(entry, out, show_progress=False)
    seen = len(server.requests)
    assert not (out / "downloads" / "subset0.zip").exists()  # deleted once unpacked

    # the checksum of the (deleted) archive is stated now: its record answers, nothing is fetched
    entry["files"][1]["md5"] = hashlib.md5(old_zip).hexdigest()
    fetch_source(entry, out, show_progress=False)
    assert len(server.requests) == seen
    assert json.loads((out / "source.json").read_text())["entry"]["files"][1]["md5"] == hashlib.md5(old_zip).hexdigest()

    # a new archive with a new checksum: fetched again, unpacked in place of the old folder
    new_zip = zip_bytes({"subset0/b.mhd": b"new"})
    server.files["/subset0.zip"] = new_zip
    entry["files"][1]["md5"] = hashlib.md5(new_zip).hexdigest()
    fetch_source(entry, out, show_progress=False)
    assert [r[0] for r in server.requests[seen:]] == ["/subset0.zip"]
    assert sorted(p.name for p in (out / "subset0" / "subset0").iterdir()) == ["b.mhd"]

    # a stated checksum that the publisher's file does not have: the unpacked folder is not replaced
    entry["files"][1]["md5"] = "0" * 32
    with pytest.raises(ChecksumError, match="md5 mismatch"):
        fetch_source(entry, out, show_progress=False)
    assert sorted(p.name for p in (out / "subset0" / "subset0").iterdir()) == ["b.mhd"]
    assert not (out / "source.json").exists()  # not done until it matches


def test_corrupt_archive_is_moved_aside_and_fetched_again(server: FileServer, tmp_path: Path) -> None:
    good = zip_bytes({"subset0/a.mhd": b"header", "subset0/a.raw": PAYLOAD})
    server.files["/annotations.csv"] = b"x"
    server.files["/subset0.zip"] = good[: len(good) // 2]  # the server sends a damaged copy once
    out = tmp_path / "raw" / "demo"
    with pytest.raises(ArchiveError) as info:
        fetch_source(open_entry(server, sha256(b"x")), out, show_progress=False)
    aside = out / "downloads" / "subset0.zip.corrupt"
    message = str(info.value)
    assert f"It was moved to {aside}; the next run downloads it again" in message
    assert r"check sources.demo.files[1].url" in message and "md5 or sha256 in sources.demo.files[1]" in message
    assert aside.is_file() and not (out / "downloads" / "subset0.zip").exists()
    assert not record_path(out / "downloads" / "subset0.zip").exists()
    assert not (out / "subset0").exists() and not (out / "source.json").exists()
    server.files["/subset0.zip"] = good
    fetch_source(open_entry(server, sha256(b"x")), out, show_progress=False)
    assert (out / "subset0" / "subset0" / "a.raw").read_bytes() == PAYLOAD
    assert [r for r in server.requests if r[0] == "/subset0.zip"] == [("/subset0.zip", None)] * 2


# ---- extraction ------------------------------------------------------------------------------------------
def test_truncated_archives_leave_nothing(server: FileServer, tmp_path: Path) -> None:
    good_zip = zip_bytes({"subset0/a.mhd": b"header", "subset0/a.raw": PAYLOAD})
    info = tarfile.TarInfo("cases/a.raw")
    good_tar = tar_bytes([info], {"cases/a.raw": PAYLOAD})
    for name, data in (("subset0.zip", good_zip), ("cases.tar.gz", good_tar)):
        server.files[f"/{name}"] = data[: len(data) // 2]  # the publisher's copy is cut short
        archive = download_file(server.url(f"/{name}"), tmp_path / "downloads" / name, show_progress=False)
        with pytest.raises(ArchiveError, match=rf"{re.escape(name)}: (truncated or corrupt archive|neither a zip nor a tar)"):
            extract_archive(archive, tmp_path / "out" / name, show_progress=False)
        assert not (tmp_path / "out" / name).exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("kind", ["zip_dotdot", "tar_dotdot", "tar_absolute", "zip_absolute", "tar_symlink", "zip_symlink", "tar_hardlink"])
def test_unsafe_archive_entries_are_refused(kind: str, tmp_path: Path) -> None:
    archive = tmp_path / ("evil.zip" if kind.startswith("zip") else "evil.tar.gz")
    if kind == "zip_dotdot":
        archive.write_bytes(zip_bytes({"ok.txt": b"1", "../evil.txt": b"2"}))
    elif kind == "zip_absolute":
        archive.write_bytes(zip_bytes({"/tmp/evil.txt": b"2"}))
    elif kind == "zip_symlink":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as handle:
            link = zipfile.ZipInfo("link")
            link.external_attr = (0o120777 << 16)  # a symbolic link as unix zip tools store it
            handle.writestr(link, "/etc/passwd")
        archive.write_bytes(buffer.getvalue())
    else:
        members = {"tar_dotdot": tarfile.TarInfo("cases/../../evil.txt"),
                   "tar_absolute": tarfile.TarInfo("/tmp/evil.txt"),
                   "tar_symlink": tarfile.TarInfo("link"), "tar_hardlink": tarfile.TarInfo("hard")}
        info = members[kind]
        payloads = {info.name: b"2"}
        if kind == "tar_symlink":
            info.type, info.linkname, payloads = tarfile.SYMTYPE, "/etc/passwd", {}
        if kind == "tar_hardlink":
            info.type, info.linkname, payloads = tarfile.LNKTYPE, "../outside", {}
        archive.write_bytes(tar_bytes([info], payloads))
    expected = {"dotdot": "escapes the target folder with '..'", "absolute": "has an absolute path",
                "symlink": "(is a symbolic link|is a link)", "hardlink": "is a link"}[kind.split("_")[1]]
    with pytest.raises(UnsafeArchiveError, match=rf"{re.escape(str(archive))}: entry .* {expected}"):
        extract_archive(archive, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]  # no hidden half-extracted folder either


# ---- sources ---------------------------------------------------------------------------------------------
def open_entry(server: FileServer, digest: str) -> dict:
    return {"name": "demo", "title": "Demo", "homepage": "https://example.org", "licence": "CC0-1.0", "access": "open",
            "files": [{"url": server.url("/annotations.csv"), "filename": "annotations.csv", "sha256": digest},
                      {"url": server.url("/subset0.zip"), "filename": "subset0.zip"}],
            "expected": ["annotations.csv", "subset0/subset0/*.mhd"]}


def test_fetch_open_source_is_atomic_and_idempotent(server: FileServer, tmp_path: Path) -> None:
    csv = b"seriesuid,coordX,coordY,coordZ,diameter_mm\n"
    server.files["/annotations.csv"] = csv
    server.files["/subset0.zip"] = zip_bytes({"subset0/a.mhd": b"header", "subset0/a.raw": PAYLOAD})
    out = tmp_path / "raw" / "demo"
    root = fetch_source(open_entry(server, sha256(csv)), out, show_progress=False)
    assert root == out.resolve()
    assert (out / "subset0" / "subset0" / "a.raw").read_bytes() == PAYLOAD
    # the archive is removed once unpacked; its record (what it was checked against) stays
    assert sorted(p.name for p in (out / "downloads").iterdir()) == ["subset0.zip.verified.json"]
    record = json.loads((out / "source.json").read_text())
    assert record["root"] == str(out.resolve()) and record["entry"]["files"][0]["sha256"] == sha256(csv)
    seen = len(server.requests)
    assert fetch_source(open_entry(server, sha256(csv)), out, show_progress=False) == root
    assert len(server.requests) == seen  # a finished source is not fetched again
    assert resolve_source_root(out) == root


def test_fetch_with_failed_checksum_is_not_done(server: FileServer, tmp_path: Path) -> None:
    server.files["/annotations.csv"] = b"x"
    server.files["/subset0.zip"] = zip_bytes({"subset0/a.mhd": b"header"})
    out = tmp_path / "raw" / "demo"
    with pytest.raises(ChecksumError):
        fetch_source(open_entry(server, sha256(b"y")), out, show_progress=False)
    assert not (out / "source.json").exists()
    with pytest.raises(SourceCopyError, match="source was not fetched"):
        resolve_source_root(out)


def test_gated_source_needs_path_and_checks_copy(tmp_path: Path) -> None:
    entry = {"name": "lidc", "title": "LIDC-IDRI", "homepage": "https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX",
             "licence": "CC-BY-3.0", "access": "tcia", "access_note": "Download it with the NBIA Data Retriever.",
             "expected": ["LIDC-IDRI/*"]}
    with pytest.raises(SourceConfigError, match=r"sources\.lidc\.path: LIDC-IDRI cannot be downloaded.*NBIA Data Retriever"):
        fetch_source(entry, tmp_path / "raw" / "lidc", show_progress=False)
    copy = tmp_path / "copy"
    copy.mkdir()
    with pytest.raises(SourceCopyError, match=r"copy: the copy given as sources\.lidc\.path lacks \['LIDC-IDRI/\*'\]"):
        fetch_source({**entry, "path": str(copy)}, tmp_path / "raw" / "lidc", show_progress=False)
    (copy / "LIDC-IDRI" / "LIDC-IDRI-0001").mkdir(parents=True)
    assert fetch_source({**entry, "path": str(copy)}, tmp_path / "raw" / "lidc", show_progress=False) == copy.resolve()
    assert resolve_source_root(tmp_path / "raw" / "lidc") == copy.resolve()


def test_source_entry_errors_name_the_key() -> None:
    base = {"title": "T", "homepage": "https://x.org", "licence": "L", "access": "open"}
    with pytest.raises(SourceConfigError, match=r"sources\.x\.files\[0\]\.sha256: must be 64 hex digits"):
        SourceEntry.from_dict("x", {**base, "files": [{"url": "https://x.org/a", "filename": "a", "sha256": "abc"}]})
    with pytest.raises(SourceConfigError, match=r"sources\.x\.files\[0\]\.filename: must be a plain file name"):
        SourceEntry.from_dict("x", {**base, "files": [{"url": "https://x.org/a", "filename": "../a"}]})
    with pytest.raises(SourceConfigError, match=r"sources\.x\.access: must be one of"):
        SourceEntry.from_dict("x", {**base, "access": "ftp"})
    with pytest.raises(SourceConfigError, match=r"sources\.x: lists no files: to download and no path:"):
        fetch_source(SourceEntry.from_dict("x", base), "unused", show_progress=False)


def test_errors_name_the_config_key_when_the_entry_comes_without_its_name(tmp_path: Path, capsys) -> None:
    """The workflow passes ``sources.<name>`` without its key and fetches it into ``{data}/raw/<name>``."""
    from pretrain_det3d.cli import main

    entry = {"title": "LIDC-IDRI", "homepage": "https://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX", "licence": "CC-BY-3.0",
             "access": "tcia", "access_note": "Download it with the NBIA Data Retriever.", "expected": ["LIDC-IDRI/*"]}
    with pytest.raises(SourceConfigError) as info:
        fetch_source(entry, tmp_path / "raw" / "lidc", show_progress=False)
    assert str(info.value).startswith("sources.lidc.path: LIDC-IDRI cannot be downloaded by the workflow")
    assert "Then set sources.lidc.path to the folder" in str(info.value)
    assert "sources.source" not in str(info.value)

    missing = tmp_path / "no_copy_here"
    with pytest.raises(SourceCopyError) as info:
        fetch_source({**entry, "path": str(missing)}, tmp_path / "raw" / "lidc", show_progress=False)
    assert str(info.value) == f"{missing}: the folder given as sources.lidc.path does not exist"

    with pytest.raises(SourceCopyError, match=r"given as sources\.lidc_v2\.path"):  # an explicit name wins
        fetch_source({**entry, "name": "x", "path": str(missing)}, tmp_path / "raw" / "y", show_progress=False,
                     name="lidc_v2")

    # the rule's own command line, as download_source runs it
    assert main(["download", "--source-json", json.dumps({**entry, "path": str(missing)}),
                 "--out", str(tmp_path / "raw" / "lidc")]) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == f"pretrain_det3d download: error: {missing}: the folder given as sources.lidc.path does not exist"
