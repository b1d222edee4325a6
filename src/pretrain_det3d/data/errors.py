"""The one error type for malformed datasets, shared by the readers and the format check.

It lives in its own module so that ``io`` (which raises it while reading) and ``dataset_format`` (which
re-exports it as part of its contract) do not import each other.
"""

from __future__ import annotations

import os


class DatasetFormatError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message starts with that file's path.

    Example:
        >>> str(DatasetFormatError.for_file("/d/labelsTr/a.json", "instance ids [1, 3] are not consecutive"))
        '/d/labelsTr/a.json: instance ids [1, 3] are not consecutive'
    """

    @classmethod
    def for_file(cls, path: str | os.PathLike, problem: str) -> "DatasetFormatError":
        """Build the error with the ``"{path}: {problem}"`` message every check uses."""
        return cls(f"{os.fspath(path)}: {problem}")


class CorruptFileError(DatasetFormatError):
    """A file's bytes are incomplete or damaged (cut short by a killed copy, a full disk, a bad download).

    A subclass of :class:`DatasetFormatError`, so every caller that handles malformed data handles this too;
    its own type lets a tool tell "regenerate or re-download this file" apart from "the content is wrong".

    Example:
        >>> str(CorruptFileError.for_file("/d/cases/a.npy", "truncated"))
        '/d/cases/a.npy: truncated'
    """
