"""Copy the cases a training job reads to node-local storage first (``$TMPDIR`` on most clusters).

Random patch reads from a shared file system are slow and load it for everybody; one sequential copy per job
is cheap. Enabled per detector with ``stage_to_local: true`` in the config (off by default); the copy goes to
``$TMPDIR`` (or ``stage_dir``) and is removed when the job ends.

Example:
    >>> with staged_cases("results/data/preprocessed/luna16", ["case_1"]) as root:  # doctest: +SKIP
    ...     records = load_case_records(root, ["case_1"])
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

LOGGER = logging.getLogger(__name__)

#: files of one preprocessed case (cases/{case}{suffix})
CASE_FILE_SUFFIXES = (".npy", "_seg.npy", ".json")


@contextlib.contextmanager
def staged_cases(preprocessed_root: str | os.PathLike, case_ids: Sequence[str],
                 stage_dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a preprocessed root holding copies of ``case_ids`` on local storage; delete it afterwards.

    ``stage_dir`` defaults to ``$TMPDIR`` (SLURM sets it per job on most sites), else the system temp folder.
    Files a case does not have (``_seg.npy`` of an unlabelled corpus) are skipped.
    """
    source = Path(preprocessed_root)
    base = Path(stage_dir or os.environ.get("TMPDIR") or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f"pretrain_det3d_{source.name}_", dir=base))
    try:
        (target / "cases").mkdir()
        copied = 0
        for name in ("plan.json", "splits.json"):
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)
        for case in case_ids:
            for suffix in CASE_FILE_SUFFIXES:
                path = source / "cases" / f"{case}{suffix}"
                if path.is_file():
                    shutil.copy2(path, target / "cases" / path.name)
                    copied += path.stat().st_size
        LOGGER.info("staged %d cases (%.1f MB) from %s to %s", len(case_ids), copied / 1e6, source, target)
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)
