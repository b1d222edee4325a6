"""Dataset converters: one module per dataset, each registering its class in :data:`CONVERTERS`.

:func:`convert_dataset` is what the workflow's ``convert`` step calls; it imports the converter modules listed
in :data:`CONVERTER_MODULES` on demand (so a dry run never pays for SimpleITK's DICOM reader), looks the name
up and writes the converted dataset.

Example:
    >>> convert_dataset("luna16", "results/data/raw/luna16", "results/data/converted/luna16")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Mapping

from pretrain_det3d import catalog
from pretrain_det3d.data.converters.base import CONVERTERS, ConvertedCase, ConversionError, DatasetConverter

#: converter name -> module whose import registers it (kept in the torch-free catalog so that config validation
#: knows the names without importing any converter)
CONVERTER_MODULES: dict[str, str] = catalog.CONVERTER_MODULES


def get_converter(name: str, settings: Mapping[str, Any] | None = None) -> DatasetConverter:
    """Instantiate the converter registered as ``name`` (importing its module first)."""
    if name in CONVERTER_MODULES:
        importlib.import_module(CONVERTER_MODULES[name])
    return CONVERTERS.get(name)(settings)


def convert_dataset(converter_name: str, source_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    settings: Mapping[str, Any] | None = None, show_progress: bool = True) -> Path:
    """Convert the source folder ``source_dir`` with converter ``converter_name`` into ``out_dir``.

    ``source_dir`` may also be a download folder holding ``source.json`` (see
    :func:`pretrain_det3d.data.download.fetch_source`); its recorded ``root`` is read then.
    """
    from pretrain_det3d.data.download import SOURCE_RECORD, resolve_source_root

    source_dir = Path(source_dir)
    if (source_dir / SOURCE_RECORD).is_file():
        source_dir = resolve_source_root(source_dir)
    return get_converter(converter_name, settings).convert(source_dir, out_dir, show_progress=show_progress)


__all__ = ["CONVERTERS", "CONVERTER_MODULES", "ConvertedCase", "ConversionError", "DatasetConverter",
           "convert_dataset", "get_converter"]
