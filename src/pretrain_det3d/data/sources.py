"""Where each dataset comes from: the source entries of the config, as validated dataclasses.

A source entry names the publisher's files (URL, file name, checksum where the publisher gives one), the
licence, and how the data is obtained. Two kinds exist:

- ``access: open``: the files are downloaded over HTTP(S) by :func:`pretrain_det3d.data.download.fetch_source`.
- gated sources (``access: tcia`` for collections fetched with an NBIA manifest and the NBIA Data Retriever,
  ``access: registration`` for data behind a sign-up form): the workflow cannot download them. The user
  downloads them once and sets ``path:`` to that copy; the download step then only checks that the files listed
  under ``expected:`` are there.

Checksums are only ever ones the publisher states (``md5`` on Zenodo records) or ones someone actually computed
from the real file (``sha256``); an entry without either is downloaded without a check.

Example:
    >>> entry = SourceEntry.from_dict("luna16", {
    ...     "title": "LUNA16", "homepage": "https://luna16.grand-challenge.org", "licence": "CC-BY-4.0",
    ...     "access": "open",
    ...     "files": [{"url": "https://zenodo.org/records/3723295/files/annotations.csv?download=1",
    ...                "filename": "annotations.csv"}]})
    >>> entry.files[0].filename, entry.is_gated
    ('annotations.csv', False)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping

#: how a source is obtained; the gated kinds need ``path:`` (a copy the user fetched)
ACCESS_KINDS = ("open", "tcia", "registration")
GATED_ACCESS_KINDS = ("tcia", "registration")
#: checksum algorithms the downloader verifies, with the hex digest length each has
CHECKSUM_LENGTHS = {"sha256": 64, "md5": 32}
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._+\-]+$")


class SourceConfigError(ValueError):
    """A source entry of the config is malformed; the message names the entry and the key."""


def is_archive_name(filename: str) -> bool:
    """Whether ``filename`` ends like an archive the downloader can extract.

    Example:
        >>> is_archive_name("subset0.zip"), is_archive_name("annotations.csv")
        (True, False)
    """
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(filename: str) -> str:
    """File name without its archive suffix: ``subset0.zip`` -> ``subset0``, ``x.tar.gz`` -> ``x``."""
    lower = filename.lower()
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return filename[: -len(suffix)]
    return filename


@dataclass(frozen=True)
class SourceFile:
    """One file the publisher serves.

    Attributes:
        url: where to download it (http or https).
        filename: the name it is stored under in the source folder (a plain name, no folders).
        sha256 / md5: expected hex digests, only as stated by the publisher or computed from the real file.
        size: expected size in bytes, if the publisher states it.
        extract: unpack the archive after download (default: true for archive names).
        extract_to: folder (inside the source folder) the archive is unpacked into (default: the archive stem).
    """

    url: str
    filename: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    extract: bool = False
    extract_to: str | None = None

    @property
    def extract_dir(self) -> str:
        """Folder name the archive is unpacked into."""
        return self.extract_to or archive_stem(self.filename)

    @classmethod
    def from_dict(cls, where: str, data: Mapping[str, Any]) -> "SourceFile":
        if not isinstance(data, Mapping):
            raise SourceConfigError(f"{where}: must be a mapping with url and filename, got {data!r}")
        unknown = set(data) - {"url", "filename", "sha256", "md5", "size", "extract", "extract_to"}
        if unknown:
            raise SourceConfigError(f"{where}: unknown keys {sorted(unknown)}")
        url = data.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise SourceConfigError(f"{where}.url: must be an http(s) URL, got {url!r}")
        filename = data.get("filename")
        if not isinstance(filename, str) or not _SAFE_NAME.match(filename) or filename in (".", ".."):
            raise SourceConfigError(f"{where}.filename: must be a plain file name (letters, digits, ._+-), got {filename!r}")
        digests: dict[str, str | None] = {}
        for algorithm, length in CHECKSUM_LENGTHS.items():
            value = data.get(algorithm)
            if value is not None and (not isinstance(value, str) or not re.fullmatch(rf"[0-9a-fA-F]{{{length}}}", value)):
                raise SourceConfigError(f"{where}.{algorithm}: must be {length} hex digits, got {value!r}")
            digests[algorithm] = value.lower() if value else None
        size = data.get("size")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise SourceConfigError(f"{where}.size: must be a byte count >= 0, got {size!r}")
        extract_to = data.get("extract_to")
        if extract_to is not None and (not isinstance(extract_to, str) or not _SAFE_NAME.match(extract_to)):
            raise SourceConfigError(f"{where}.extract_to: must be a plain folder name, got {extract_to!r}")
        return cls(
            url=url,
            filename=filename,
            sha256=digests["sha256"],
            md5=digests["md5"],
            size=size,
            extract=bool(data.get("extract", is_archive_name(filename))),
            extract_to=extract_to,
        )


@dataclass(frozen=True)
class SourceEntry:
    """Everything the workflow knows about where one dataset comes from.

    Attributes:
        name: the dataset's config key (``luna16``, ``lidc``, ...).
        title: the publisher's name of the collection.
        homepage: the publisher's page (DOI or collection page).
        licence: the licence as the publisher states it.
        access: ``open`` (downloadable), ``tcia`` (NBIA manifest) or ``registration``.
        files: what to download for open sources.
        path: an existing copy on disk; required for gated sources, allowed for open ones (skips the download).
        expected: relative paths or glob patterns that must match inside the copy (checked for ``path:``).
        access_note: how a user obtains gated data (shown in the error when ``path:`` is missing).
        citation: what to cite.
    """

    name: str
    title: str
    homepage: str
    licence: str
    access: str
    files: tuple[SourceFile, ...] = ()
    path: str | None = None
    expected: tuple[str, ...] = ()
    access_note: str = ""
    citation: str = ""

    @property
    def is_gated(self) -> bool:
        return self.access in GATED_ACCESS_KINDS

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (for the source record written beside the data)."""
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        data["expected"] = list(self.expected)
        return data

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "SourceEntry":
        """Validate one config entry; every problem raises :class:`SourceConfigError` naming the key."""
        where = f"sources.{name}"
        if not isinstance(data, Mapping):
            raise SourceConfigError(f"{where}: must be a mapping, got {type(data).__name__}")
        known = {"name", "title", "homepage", "licence", "access", "files", "path", "expected", "access_note", "citation"}
        unknown = set(data) - known
        if unknown:
            raise SourceConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        for key in ("title", "homepage", "licence", "access"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise SourceConfigError(f"{where}.{key}: required text is missing")
        access = data["access"]
        if access not in ACCESS_KINDS:
            raise SourceConfigError(f"{where}.access: must be one of {ACCESS_KINDS}, got {access!r}")
        files_data = data.get("files", []) or []
        if not isinstance(files_data, list):
            raise SourceConfigError(f"{where}.files: must be a list")
        files = tuple(SourceFile.from_dict(f"{where}.files[{i}]", f) for i, f in enumerate(files_data))
        names = [f.filename for f in files]
        if len(set(names)) != len(names):
            raise SourceConfigError(f"{where}.files: file names repeat: {names}")
        path = data.get("path")
        if path is not None and (not isinstance(path, str) or not path):
            raise SourceConfigError(f"{where}.path: must be a folder path, got {path!r}")
        expected = data.get("expected", []) or []
        if not isinstance(expected, list) or not all(isinstance(e, str) and e for e in expected):
            raise SourceConfigError(f"{where}.expected: must be a list of relative paths or glob patterns")
        for pattern in expected:
            if pattern.startswith("/") or ".." in pattern.split("/"):
                raise SourceConfigError(f"{where}.expected: {pattern!r} must stay inside the copy (relative, no '..')")
        return cls(
            name=str(data.get("name", name)),
            title=data["title"],
            homepage=data["homepage"],
            licence=data["licence"],
            access=access,
            files=files,
            path=path,
            expected=tuple(expected),
            access_note=str(data.get("access_note", "")),
            citation=str(data.get("citation", "")),
        )


def read_sources(config: Mapping[str, Any]) -> dict[str, SourceEntry]:
    """Validate every entry of a ``sources:`` mapping (dataset name -> entry).

    Example:
        >>> read_sources({})
        {}
    """
    if not isinstance(config, Mapping):
        raise SourceConfigError(f"sources: must be a mapping of dataset name to entry, got {type(config).__name__}")
    return {name: SourceEntry.from_dict(name, entry) for name, entry in config.items()}
