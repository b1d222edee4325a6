"""Downloading and unpacking dataset sources: resumable, retried, verified, safe, atomic.

Why not ``pooch``: pooch verifies hashes and shows progress, but it always downloads a file whole into a fresh
temporary file, so a dataset of 100+ GB (LUNA16's subsets are ~10 GB each) restarts from zero after every
dropped connection. This module resumes with HTTP ``Range`` requests instead, on top of ``requests``; retries of
refused or failed requests are urllib3's :class:`~urllib3.util.retry.Retry`, mounted on the session.

- :func:`download_file` keeps the bytes received so far in ``{dest}.part``; a retry (in the same call or a
  later run) asks the server for the rest with ``Range: bytes={have}-`` (and ``Accept-Encoding: identity``, so
  byte offsets mean the file's own bytes). A server that ignores the range (status 200) restarts the file.
  Answers 429 and 5xx are retried with exponential backoff, waiting as long as a ``Retry-After`` header asks
  (Zenodo rate-limits bulk downloads so). Only a finished, verified file is renamed onto ``dest``; a record
  ``{dest}.verified.json`` beside it keeps the file's sha256/md5/size and the checksums it was checked against.
  When the expected checksum changes later, the file is checked again (a wrong checksum is never kept as
  verified) and fetched anew if it no longer matches.
- :func:`extract_archive` unpacks zip and tar archives and refuses any entry that would land outside the target
  folder (absolute paths, ``..``), links and device files. It unpacks into a hidden folder that is renamed into
  place only when the whole archive was read, so a truncated archive leaves nothing behind.
- :func:`fetch_source` runs both for every file of a source entry and writes ``source.json`` last: the folder
  counts as done only when that record exists. A corrupt archive is moved aside (``{archive}.corrupt``) so that
  the next run downloads it again instead of failing on the same bytes. For gated sources (``path:``) it checks
  the user's copy.

Example:
    >>> fetch_source({"name": "demo", "title": "Demo", "homepage": "https://example.org", "licence": "CC0-1.0",
    ...               "access": "open", "files": [{"url": "https://example.org/a.zip", "filename": "a.zip"}]},
    ...              "results/data/raw/demo")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tarfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

import requests
import requests.adapters
from tqdm import tqdm
from urllib3.util.retry import Retry

from pretrain_det3d.data.sources import SourceEntry, SourceFile, SourceConfigError
from pretrain_det3d.utils.atomic import atomic_directory, write_json

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 2.0  # wait before retry k is backoff * 2**(k-1)
MAX_BACKOFF_S = 300.0  # longest wait between retries without a Retry-After header
MAX_RETRY_AFTER_S = 3600  # longest wait a Retry-After header may ask for
#: answers that are retried: rate limits (Zenodo answers 429 with Retry-After) and server-side failures
RETRY_STATUS = (429, 500, 502, 503, 504)
RECORD_SUFFIX = ".verified.json"  # beside a finished download: its digests and what it was checked against
CORRUPT_SUFFIX = ".corrupt"  # an archive that failed to unpack is moved aside under this suffix
DEFAULT_TIMEOUT_S = 60.0  # per socket read, not for the whole file
CHUNK_BYTES = 1 << 20
PART_SUFFIX = ".part"
SOURCE_RECORD = "source.json"  # written last: its presence marks a finished source folder
DOWNLOADS_DIR = "downloads"
USER_AGENT = "pretrain_det3d-downloader"


class DownloadError(RuntimeError):
    """A download failed after all retries; the message names the URL and the destination."""


class ChecksumError(DownloadError):
    """A downloaded file's digest differs from the one the source entry states."""


class UnsafeArchiveError(ValueError):
    """An archive holds an entry that would be written outside the target folder, or a link or device."""


class ArchiveError(ValueError):
    """An archive is truncated, corrupt or of an unknown kind."""


class SourceCopyError(FileNotFoundError):
    """A user-provided copy (``path:``) is missing or lacks expected files."""


# ---- hashing ---------------------------------------------------------------------------------------------
def file_digests(path: str | os.PathLike, algorithms: Iterable[str] = ("sha256", "md5")) -> dict[str, str]:
    """Hex digests of a file in several algorithms, read once in chunks.

    Example:
        >>> file_digests("annotations.csv")  # doctest: +SKIP
        {'sha256': '9f86d0...', 'md5': '0cc175...'}
    """
    digests = {algorithm: hashlib.new(algorithm) for algorithm in algorithms}
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            for digest in digests.values():
                digest.update(chunk)
    return {algorithm: digest.hexdigest() for algorithm, digest in digests.items()}


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks.

    Example:
        >>> file_digest("annotations.csv")  # doctest: +SKIP
        '9f86d0...'
    """
    return file_digests(path, (algorithm,))[algorithm]


def verify_checksums(path: str | os.PathLike, sha256: str | None = None, md5: str | None = None) -> None:
    """Raise :class:`ChecksumError` (naming the file, expected and actual digest) if a stated digest differs."""
    _check_digests(os.fspath(path), file_digests(path), {"sha256": sha256, "md5": md5})


def _check_digests(name: str, actual: Mapping[str, str], expected: Mapping[str, str | None]) -> None:
    for algorithm, value in expected.items():
        if value and actual.get(algorithm) != value.lower():
            raise ChecksumError(f"{name}: {algorithm} mismatch: expected {value.lower()}, got {actual.get(algorithm)}")


# ---- verification records ---------------------------------------------------------------------------------
def record_path(dest: str | os.PathLike) -> Path:
    """Where :func:`download_file` records what ``dest`` was verified against: ``{dest}.verified.json``."""
    dest = Path(dest)
    return dest.with_name(dest.name + RECORD_SUFFIX)


def _expectation(sha256: str | None, md5: str | None, size: int | None) -> dict[str, Any]:
    return {"sha256": sha256.lower() if sha256 else None, "md5": md5.lower() if md5 else None, "size": size}


def _read_record(dest: Path) -> dict[str, Any] | None:
    path = record_path(dest)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # an unreadable record counts as none: the file is checked again
    return record if isinstance(record, dict) and isinstance(record.get("actual"), dict) else None


def _write_record(dest: Path, url: str, actual: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    write_json(record_path(dest), {"url": url, "actual": dict(actual), "expected": dict(expected),
                                   "verified_at": time.time()})


def _mismatch(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """What of ``expected`` (sha256/md5/size, each if given) the measured ``actual`` contradicts, or None."""
    for key in ("size", "sha256", "md5"):
        if expected.get(key) is not None and actual.get(key) != expected[key]:
            return f"{key} is {actual.get(key)}, expected {expected[key]}"
    return None


def _measure(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, **file_digests(path)}


def check_download(dest: str | os.PathLike, url: str, sha256: str | None = None, md5: str | None = None,
                   size: int | None = None) -> str | None:
    """Whether an earlier download still satisfies the expected checksums; None if it does, else why not.

    ``dest`` itself need not exist any more (an archive is deleted once unpacked): its record keeps the digests
    measured when it arrived. When the expectation equals the recorded one, nothing is read. When it changed, the
    file is hashed again if it is still there (else the recorded digests are compared) and the record is
    updated if it matches. A file without a record (downloaded before records existed) is hashed if it exists.

    Example:
        >>> check_download("raw/luna16/annotations.csv", url, sha256="9f86d0...")  # doctest: +SKIP
    """
    dest = Path(dest)
    expected = _expectation(sha256, md5, size)
    record = _read_record(dest)
    if record is not None and record.get("expected") == expected:
        return None
    if dest.is_file():
        actual = _measure(dest)
    elif record is not None:
        actual = record["actual"]
    else:
        return f"{dest} is missing and has no record"
    problem = _mismatch(actual, expected)
    if problem is None:
        if record is not None or any(v is not None for v in expected.values()):
            log.info("%s: verified against the checksums now stated", dest)
        _write_record(dest, url, actual, expected)
    return problem


# ---- resumable download ----------------------------------------------------------------------------------
class LoggedRetry(Retry):
    """urllib3's :class:`~urllib3.util.retry.Retry` that says in the log what it waits for and how long.

    A rate-limited download can wait minutes (``Retry-After``); without a line in the log it looks hung.
    """

    def sleep(self, response: Any = None) -> None:
        wait = self.get_retry_after(response) if (response is not None and self.respect_retry_after_header) else None
        reason = f"server answered HTTP {response.status}" if response is not None else "request failed"
        last = self.history[-1] if self.history else None
        log.warning("%s: %s; retry %d in %.1f s%s", last.url if last else "download", reason, len(self.history),
                    wait if wait is not None else self.get_backoff_time(),
                    " (as its Retry-After asks)" if wait is not None else "")
        super().sleep(response)


def retry_policy(retries: int = DEFAULT_RETRIES, backoff_s: float = DEFAULT_BACKOFF_S) -> Retry:
    """The retries of every request: connection failures, and answers 429 and 5xx (:data:`RETRY_STATUS`).

    urllib3 waits ``backoff_s * 2**(k - 1)`` before retry ``k`` (capped at :data:`MAX_BACKOFF_S`), or as long as
    a ``Retry-After`` header asks (capped at :data:`MAX_RETRY_AFTER_S`). After the last retry the answer is
    returned as it is, so the error names the status.

    Example:
        >>> retry_policy(3, 2.0).status_forcelist
        (429, 500, 502, 503, 504)
    """
    return LoggedRetry(
        total=None, connect=retries, read=retries, status=retries, other=0, redirect=10,
        status_forcelist=RETRY_STATUS, allowed_methods=frozenset({"GET"}), backoff_factor=backoff_s,
        backoff_max=MAX_BACKOFF_S, respect_retry_after_header=True, retry_after_max=MAX_RETRY_AFTER_S,
        raise_on_status=False,
    )


def _session(retries: int, backoff_s: float) -> requests.Session:
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(max_retries=retry_policy(retries, backoff_s))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _parse_content_range_start(value: str | None) -> int | None:
    """Start offset of ``Content-Range: bytes START-END/TOTAL`` (None when absent or malformed)."""
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[len("bytes "):].split("-", 1)[0])
    except ValueError:
        return None


class _BodyInterrupted(Exception):
    """The answer's body stopped early; the bytes received are kept and the next attempt resumes."""


def _stream_once(url: str, part: Path, timeout: float, session: requests.Session, show_progress: bool,
                 retries: int) -> None:
    """One attempt: append the missing bytes to ``part`` (or restart it if the server ignores the range)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}  # ranges count the file's own bytes
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True)
    except requests.exceptions.RequestException as error:  # urllib3 has retried already
        raise DownloadError(f"{url}: no answer after {retries} retries ({error})") from error
    with response:
        if response.status_code == 416 and have:
            # Range beyond the end: either the part is already whole or it is longer than the file. The
            # checksum / size check after the loop decides; an over-long part fails there and is removed.
            return
        if response.status_code not in (200, 206):
            retried = f" after {retries} retries" if response.status_code in RETRY_STATUS else ""
            raise DownloadError(f"{url}: server answered HTTP {response.status_code} {response.reason}{retried}")
        encoding = response.headers.get("Content-Encoding", "identity").lower()
        if response.status_code == 206 and encoding not in ("", "identity"):
            # a compressed range cannot be appended to the file's bytes: start the file again
            part.unlink()
            raise _BodyInterrupted(f"server compressed a range ({encoding}) although identity was asked")
        if response.status_code == 206 and _parse_content_range_start(response.headers.get("Content-Range")) != have:
            raise DownloadError(f"{url}: server sent Content-Range {response.headers.get('Content-Range')!r} "
                                f"for a request from byte {have}")
        mode = "ab" if response.status_code == 206 else "wb"
        start = have if response.status_code == 206 else 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None and length.isdigit() else None
        received = 0
        # urllib3 would raise on a short body *before* handing over the bytes it did receive, losing them; with
        # the check off it returns them, they are written, and the length check below triggers the resume.
        if hasattr(response.raw, "enforce_content_length"):
            response.raw.enforce_content_length = False
        try:
            with open(part, mode) as handle, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name[: -len(PART_SUFFIX)], disable=not show_progress, leave=False,
            ) as bar:
                for chunk in response.iter_content(chunk_size=CHUNK_BYTES):
                    handle.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                requests.exceptions.ChunkedEncodingError) as error:
            raise _BodyInterrupted(str(error)) from error
        if length is not None and length.isdigit() and received < int(length) and encoding in ("", "identity"):
            # requests does not always raise when a server closes a keep-alive body early; check ourselves.
            raise _BodyInterrupted(f"connection closed after {received} of {length} bytes")


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    show_progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` from earlier attempts, and verify it.

    ``dest`` appears only when the whole file arrived and matched ``size``/``sha256``/``md5`` (each if given);
    ``{dest}.verified.json`` records its digests and what it was checked against. An existing ``dest`` is kept
    when it satisfies the expectation (checked again whenever the expectation changed, see
    :func:`check_download`); otherwise it is downloaded anew and replaced only once the new file verifies.
    Answers 429/5xx and failed connections are retried ``retries`` times by urllib3 (:func:`retry_policy`); a
    body that breaks off is resumed up to ``retries`` times. A checksum mismatch removes the part file (the bytes
    are wrong, resuming them cannot help) and raises :class:`ChecksumError`; running out of retries keeps the
    part file for the next run and raises :class:`DownloadError`.

    Example:
        >>> download_file("https://zenodo.org/records/3723295/files/annotations.csv?download=1",
        ...               "raw/luna16/annotations.csv")  # doctest: +SKIP
    """
    dest = Path(dest)
    expected = _expectation(sha256, md5, size)
    if dest.exists():
        problem = check_download(dest, url, sha256=sha256, md5=md5, size=size)
        if problem is None:
            return dest
        log.warning("%s: no longer matches the checksums stated for it (%s); downloading it again from %s",
                    dest, problem, url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    last_error: Exception | None = None
    with _session(retries, backoff_s) as session:
        for attempt in range(1, retries + 2):
            try:
                _stream_once(url, part, timeout_s, session, show_progress, retries)
                last_error = None
                break
            except _BodyInterrupted as error:
                last_error = error
                if attempt <= retries:
                    wait = backoff_s * 2 ** (attempt - 1)
                    have = part.stat().st_size if part.exists() else 0
                    log.warning("%s: attempt %d broke off (%s); resuming from byte %d in %.1f s", url, attempt, error,
                                have, wait)
                    time.sleep(wait)
    if last_error is not None:
        raise DownloadError(f"{url} -> {dest}: gave up after {retries + 1} attempts ({last_error}); "
                            f"the {part.stat().st_size if part.exists() else 0} bytes received are kept in {part} "
                            f"and the next run resumes from there") from last_error
    if not part.exists():
        raise DownloadError(f"{url} -> {dest}: nothing was received")
    actual = _measure(part)
    if size is not None and actual["size"] != size:
        part.unlink()
        raise DownloadError(f"{dest}: expected {size} bytes, received {actual['size']}; the partial file was removed")
    try:
        _check_digests(os.fspath(dest), actual, {"sha256": sha256, "md5": md5})
    except ChecksumError as error:
        part.unlink()
        raise ChecksumError(f"{dest} (from {url}): {str(error).split(': ', 1)[1]}; the file was removed") from None
    os.replace(part, dest)
    _write_record(dest, url, actual, expected)
    return dest

# ---- safe extraction -------------------------------------------------------------------------------------
def _check_member_name(archive: Path, name: str) -> None:
    """Refuse names that are absolute, carry a drive letter, or climb out with ``..``."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has an absolute path; refusing to extract")
    if ".." in PurePosixPath(posix).parts:
        raise UnsafeArchiveError(f"{archive}: entry {name!r} escapes the target folder with '..'; refusing to extract")


def _zip_members(archive: Path, handle: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    members = handle.infolist()
    for info in members:
        _check_member_name(archive, info.filename)
        mode = info.external_attr >> 16  # the unix mode, stored by zip tools that run on unix
        if stat.S_ISLNK(mode):
            raise UnsafeArchiveError(f"{archive}: entry {info.filename!r} is a symbolic link; refusing to extract")
        # many zip writers store permission bits without a file type; only a stated type other than file/folder fails
        if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UnsafeArchiveError(f"{archive}: entry {info.filename!r} is not a plain file or folder")
    return members


def _tar_members(archive: Path, handle: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = handle.getmembers()  # reads the whole archive: a truncated one fails here, before any write
    for info in members:
        _check_member_name(archive, info.name)
        if info.issym() or info.islnk():
            raise UnsafeArchiveError(f"{archive}: entry {info.name!r} is a link (to {info.linkname!r}); refusing to extract")
        if not (info.isfile() or info.isdir()):
            raise UnsafeArchiveError(f"{archive}: entry {info.name!r} is not a plain file or folder")
    return members


def extract_archive(archive: str | os.PathLike, target: str | os.PathLike, show_progress: bool = True,
                    replace_existing: bool = False) -> Path:
    """Unpack a zip or tar archive into ``target`` (which must not exist yet), refusing unsafe entries.

    Every entry is checked before anything is written; the archive is unpacked into a hidden sibling folder
    that replaces ``target`` only when all entries were read in full. Truncated or corrupt archives raise
    :class:`ArchiveError`, unsafe entries :class:`UnsafeArchiveError`; in both cases ``target`` is not created
    (with ``replace_existing``, an existing ``target`` is replaced by a successful extraction and kept otherwise).

    Example:
        >>> extract_archive("raw/luna16/downloads/subset0.zip", "raw/luna16/subset0")  # doctest: +SKIP
    """
    archive, target = Path(archive), Path(target)
    if target.exists() and not replace_existing:
        raise FileExistsError(f"{target}: extraction target already exists")
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as handle, atomic_directory(target) as tmp:
                members = _zip_members(archive, handle)
                for info in tqdm(members, desc=f"unzip {archive.name}", disable=not show_progress, leave=False):
                    handle.extract(info, tmp)  # raises BadZipFile on a CRC mismatch, so corrupt data never counts
            return target
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as handle:
                members = _tar_members(archive, handle)
                with atomic_directory(target) as tmp:
                    for info in tqdm(members, desc=f"untar {archive.name}", disable=not show_progress, leave=False):
                        # the "data" filter repeats our checks inside tarfile itself and drops odd permissions
                        handle.extract(info, tmp, filter="data")
            return target
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
        if isinstance(error, (FileExistsError, PermissionError)):
            raise
        raise ArchiveError(f"{archive}: truncated or corrupt archive ({type(error).__name__}: {error})") from error
    raise ArchiveError(f"{archive}: neither a zip nor a tar archive (it may be truncated, or an HTML error page)")


# ---- sources ---------------------------------------------------------------------------------------------
def check_copy(root: str | os.PathLike, expected: Iterable[str], where: str = "path") -> Path:
    """Check that ``root`` exists and every pattern of ``expected`` matches at least one path inside it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SourceCopyError(f"{root}: the folder given as {where} does not exist")
    missing = [pattern for pattern in expected if next(iter(root.glob(pattern)), None) is None]
    if missing:
        raise SourceCopyError(f"{root}: the copy given as {where} lacks {missing}")
    return root


def is_fetched(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a finished source (its ``source.json`` record was written)."""
    return (Path(out_dir) / SOURCE_RECORD).is_file()


def resolve_source_root(out_dir: str | os.PathLike) -> Path:
    """The folder a converter reads: ``root`` of ``source.json`` (the user's copy or ``out_dir`` itself).

    Example:
        >>> resolve_source_root("results/data/raw/lidc")  # doctest: +SKIP
        PosixPath('/data/TCIA/LIDC-IDRI')
    """
    record_path = Path(out_dir) / SOURCE_RECORD
    if not record_path.is_file():
        raise SourceCopyError(f"{record_path}: missing; the source was not fetched (run the download step first)")
    record = json.loads(record_path.read_text())
    return Path(record["root"])


def _move_aside(archive: Path, error: ArchiveError, where: str) -> ArchiveError:
    """Move an archive that failed to unpack to ``{archive}.corrupt`` (and drop its record), so that the next run
    downloads it again rather than failing on the same bytes; return the error to raise, saying what to do."""
    aside = archive.with_name(archive.name + CORRUPT_SUFFIX)
    os.replace(archive, aside)
    record_path(archive).unlink(missing_ok=True)
    return ArchiveError(
        f"{error}. It was moved to {aside}; the next run downloads it again. If that fails the same way, the "
        f"server sends a damaged file or an error page instead of the archive: check {where}.url in a browser, and "
        f"state the publisher's md5 or sha256 in {where} so that a bad download is caught before unpacking.")


def _fetch_file(item: SourceFile, out_dir: Path, keep_archives: bool, show_progress: bool, where: str,
                **download_options: Any) -> None:
    if not item.extract:
        download_file(item.url, out_dir / item.filename, sha256=item.sha256, md5=item.md5, size=item.size,
                      show_progress=show_progress, **download_options)
        return
    target = out_dir / item.extract_dir
    archive = out_dir / DOWNLOADS_DIR / item.filename
    stale = False
    if target.exists():  # only a whole extraction is ever renamed into place
        if not record_path(archive).is_file() and not archive.exists():
            if item.sha256 or item.md5 or item.size is not None:
                log.warning("%s: unpacked before download records were kept, so it cannot be checked against %s's "
                            "checksums; delete the folder to download and check it again", target, where)
            return
        problem = check_download(archive, item.url, sha256=item.sha256, md5=item.md5, size=item.size)
        if problem is None:
            return
        stale = True
        log.warning("%s: unpacked from an archive that does not match %s (%s); downloading it again", target, where,
                    problem)
        if archive.exists():  # kept (keep_archives) but wrong: fetch a fresh copy
            archive.unlink()
    archive = download_file(item.url, archive, sha256=item.sha256, md5=item.md5, size=item.size,
                            show_progress=show_progress, **download_options)
    try:
        extract_archive(archive, target, show_progress=show_progress, replace_existing=stale)
    except ArchiveError as error:
        raise _move_aside(archive, error, where) from error
    if not keep_archives:
        archive.unlink()  # its record stays: it says what the unpacked folder came from


def fetch_source(
    entry: Mapping[str, Any] | SourceEntry,
    out_dir: str | os.PathLike,
    keep_archives: bool = False,
    show_progress: bool = True,
    name: str | None = None,
    **download_options: Any,
) -> Path:
    """Obtain one dataset source into ``out_dir`` (or check the user's copy) and return the folder to convert.

    Open sources: each file is downloaded (resumably) into ``out_dir``, archives into ``out_dir/downloads/``
    and then unpacked into ``out_dir/{extract_to}`` (the archive is deleted then; its ``.verified.json`` record
    stays). With ``path:`` (required for gated sources) nothing is downloaded; the copy must exist and match
    ``expected:``. Either way ``out_dir/source.json`` is written last, recording the entry and ``root`` (the
    folder converters read). Rerunning a finished source with the same entry does nothing; when the entry
    changed (a checksum stated or corrected), every file is checked against it again and fetched anew where it
    no longer matches. An archive that fails to unpack is moved to ``downloads/{name}.corrupt``.

    Messages name the entry as ``sources.<name>``: ``name``, else the entry's own ``name`` key, else the name of
    ``out_dir`` (the workflow fetches ``sources.<name>`` into ``{data}/raw/<name>`` and passes the entry without
    its key).

    Example:
        >>> fetch_source(config["sources"]["lidc"], "results/data/raw/lidc")  # doctest: +SKIP
        PosixPath('/data/TCIA/LIDC-IDRI')
    """
    out_dir = Path(out_dir)
    if not isinstance(entry, SourceEntry):
        # a config entry does not hold its own key: without this, messages read "sources.source.path"
        entry = SourceEntry.from_dict(name or str(entry.get("name") or out_dir.resolve().name), entry)
    source = entry if name is None else replace(entry, name=name)
    if is_fetched(out_dir):
        recorded = json.loads((out_dir / SOURCE_RECORD).read_text()).get("entry")
        if recorded == source.to_dict():
            return resolve_source_root(out_dir)
        log.info("%s: sources.%s changed since it was fetched; checking its files again", out_dir, source.name)
        (out_dir / SOURCE_RECORD).unlink()  # done again only once the files match the entry as it is now
    if source.path is not None:
        root = check_copy(source.path, source.expected, where=f"sources.{source.name}.path").resolve()
    elif source.is_gated:
        raise SourceConfigError(
            f"sources.{source.name}.path: {source.title} cannot be downloaded by the workflow ({source.access} access). "
            f"{source.access_note} Then set sources.{source.name}.path to the folder holding it."
        )
    elif not source.files:
        raise SourceConfigError(
            f"sources.{source.name}: lists no files: to download and no path: to an existing copy. {source.access_note}"
        )
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        for index, item in enumerate(tqdm(source.files, desc=f"fetch {source.name}", unit="file",
                                          disable=not show_progress)):
            _fetch_file(item, out_dir, keep_archives, show_progress, f"sources.{source.name}.files[{index}]",
                        **download_options)
        root = check_copy(out_dir, source.expected, where=f"the download of sources.{source.name}").resolve()
        downloads = out_dir / DOWNLOADS_DIR
        if downloads.is_dir() and not any(downloads.iterdir()):
            shutil.rmtree(downloads)
    write_json(out_dir / SOURCE_RECORD, {"root": str(root), "entry": source.to_dict(), "fetched_at": time.time()})
    return root
