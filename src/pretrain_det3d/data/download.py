"""Downloading and unpacking dataset sources: resumable, verified, safe, atomic.

Why not ``pooch``: pooch verifies hashes and shows progress, but it always downloads a file whole into a fresh
temporary file, so a dataset of 100+ GB (LUNA16's subsets are ~10 GB each) restarts from zero after every
dropped connection. This module resumes with HTTP ``Range`` requests instead, on top of ``requests``.

- :func:`download_file` keeps the bytes received so far in ``{dest}.part``; a retry (in the same call or a
  later run) asks the server for the rest with ``Range: bytes={have}-``. A server that ignores the range (status
  200) restarts the file. Only a finished, verified file is renamed onto ``dest``.
- :func:`extract_archive` unpacks zip and tar archives and refuses any entry that would land outside the target
  folder (absolute paths, ``..``), links and device files. It unpacks into a hidden folder that is renamed into
  place only when the whole archive was read, so a truncated archive leaves nothing behind.
- :func:`fetch_source` runs both for every file of a source entry and writes ``source.json`` last: the folder
  counts as done only when that record exists. For gated sources (``path:``) it checks the user's copy.

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
from tqdm import tqdm

from pretrain_det3d.data.sources import SourceEntry, SourceFile, SourceConfigError
from pretrain_det3d.utils.atomic import atomic_directory, write_json

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 2.0  # wait before retry k is backoff * 2**(k-1)
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
def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks.

    Example:
        >>> file_digest("annotations.csv")  # doctest: +SKIP
        '9f86d0...'
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksums(path: str | os.PathLike, sha256: str | None = None, md5: str | None = None) -> None:
    """Raise :class:`ChecksumError` (naming the file, expected and actual digest) if a stated digest differs."""
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected:
            actual = file_digest(path, algorithm)
            if actual != expected.lower():
                raise ChecksumError(f"{os.fspath(path)}: {algorithm} mismatch: expected {expected.lower()}, got {actual}")


# ---- resumable download ----------------------------------------------------------------------------------
def _parse_content_range_start(value: str | None) -> int | None:
    """Start offset of ``Content-Range: bytes START-END/TOTAL`` (None when absent or malformed)."""
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[len("bytes "):].split("-", 1)[0])
    except ValueError:
        return None


def _stream_once(url: str, part: Path, timeout: float, session: requests.Session, show_progress: bool) -> None:
    """One attempt: append the missing bytes to ``part`` (or restart it if the server ignores the range)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    with session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True) as response:
        if response.status_code == 416 and have:
            # Range beyond the end: either the part is already whole or it is longer than the file. The
            # checksum / size check after the loop decides; an over-long part fails there and is removed.
            return
        if response.status_code not in (200, 206):
            raise DownloadError(f"{url}: server answered HTTP {response.status_code} {response.reason}")
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
        with open(part, mode) as handle, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name[: -len(PART_SUFFIX)], disable=not show_progress, leave=False,
        ) as bar:
            for chunk in response.iter_content(chunk_size=CHUNK_BYTES):
                handle.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if length is not None and length.isdigit() and received < int(length):
            # requests does not always raise when a server closes a keep-alive body early; check ourselves.
            raise requests.exceptions.ChunkedEncodingError(
                f"connection closed after {received} of {length} bytes")


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

    ``dest`` appears only when the whole file arrived and matched ``size``/``sha256``/``md5`` (each if given).
    A checksum mismatch removes the part file (the bytes are wrong, resuming them cannot help) and raises
    :class:`ChecksumError`; running out of retries keeps the part file for the next run and raises
    :class:`DownloadError`.

    Example:
        >>> download_file("https://zenodo.org/records/3723295/files/annotations.csv?download=1",
        ...               "raw/luna16/annotations.csv")  # doctest: +SKIP
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + PART_SUFFIX)
    last_error: Exception | None = None
    with requests.Session() as session:
        for attempt in range(1, retries + 2):
            try:
                _stream_once(url, part, timeout_s, session, show_progress)
                last_error = None
                break
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    requests.exceptions.ChunkedEncodingError) as error:
                last_error = error
                if attempt <= retries:
                    wait = backoff_s * 2 ** (attempt - 1)
                    have = part.stat().st_size if part.exists() else 0
                    log.warning("%s: attempt %d failed (%s); resuming from byte %d in %.1f s", url, attempt, error, have, wait)
                    time.sleep(wait)
    if last_error is not None:
        raise DownloadError(f"{url} -> {dest}: gave up after {retries + 1} attempts ({last_error}); "
                            f"the {part.stat().st_size if part.exists() else 0} bytes received are kept in {part} "
                            f"and the next run resumes from there") from last_error
    if not part.exists():
        raise DownloadError(f"{url} -> {dest}: nothing was received")
    if size is not None and part.stat().st_size != size:
        actual = part.stat().st_size
        part.unlink()
        raise DownloadError(f"{dest}: expected {size} bytes, received {actual}; the partial file was removed")
    try:
        verify_checksums(part, sha256=sha256, md5=md5)
    except ChecksumError as error:
        part.unlink()
        raise ChecksumError(f"{dest} (from {url}): {str(error).split(': ', 1)[1]}; the file was removed") from None
    os.replace(part, dest)
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


def extract_archive(archive: str | os.PathLike, target: str | os.PathLike, show_progress: bool = True) -> Path:
    """Unpack a zip or tar archive into ``target`` (which must not exist yet), refusing unsafe entries.

    Every entry is checked before anything is written; the archive is unpacked into a hidden sibling folder
    that replaces ``target`` only when all entries were read in full. Truncated or corrupt archives raise
    :class:`ArchiveError`, unsafe entries :class:`UnsafeArchiveError`; in both cases ``target`` is not created.

    Example:
        >>> extract_archive("raw/luna16/downloads/subset0.zip", "raw/luna16/subset0")  # doctest: +SKIP
    """
    archive, target = Path(archive), Path(target)
    if target.exists():
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


def _fetch_file(item: SourceFile, out_dir: Path, keep_archives: bool, show_progress: bool, **download_options: Any) -> None:
    if item.extract:
        target = out_dir / item.extract_dir
        if target.exists():  # only a whole extraction is ever renamed into place
            return
        archive = download_file(item.url, out_dir / DOWNLOADS_DIR / item.filename, sha256=item.sha256, md5=item.md5,
                                size=item.size, show_progress=show_progress, **download_options)
        extract_archive(archive, target, show_progress=show_progress)
        if not keep_archives:
            archive.unlink()
    else:
        download_file(item.url, out_dir / item.filename, sha256=item.sha256, md5=item.md5, size=item.size,
                      show_progress=show_progress, **download_options)


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
    and then unpacked into ``out_dir/{extract_to}``. With ``path:`` (required for gated sources) nothing is
    downloaded; the copy must exist and match ``expected:``. Either way ``out_dir/source.json`` is written last,
    recording the entry and ``root`` (the folder converters read); rerunning a finished source does nothing.

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
        return resolve_source_root(out_dir)
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
        for item in tqdm(source.files, desc=f"fetch {source.name}", unit="file", disable=not show_progress):
            _fetch_file(item, out_dir, keep_archives, show_progress, **download_options)
        root = check_copy(out_dir, source.expected, where=f"the download of sources.{source.name}").resolve()
        downloads = out_dir / DOWNLOADS_DIR
        if downloads.is_dir() and not any(downloads.iterdir()):
            shutil.rmtree(downloads)
    write_json(out_dir / SOURCE_RECORD, {"root": str(root), "entry": source.to_dict(), "fetched_at": time.time()})
    return root
