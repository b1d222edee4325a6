"""DatasetFormatError: the message starts with the offending file's path."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain_det3d.data.dataset_format import DatasetFormatError as ReExported
from pretrain_det3d.data.errors import DatasetFormatError


def test_message_starts_with_path_then_problem(tmp_path: Path) -> None:
    path = tmp_path / "labelsTr" / "case_0000.json"
    error = DatasetFormatError.for_file(path, "instance ids [1, 3] are not consecutive")
    assert str(error) == f"{path}: instance ids [1, 3] are not consecutive"
    assert isinstance(error, ValueError)


def test_dataset_format_reexports_the_same_class() -> None:
    assert ReExported is DatasetFormatError
    with pytest.raises(ReExported):
        raise DatasetFormatError.for_file("x.nii.gz", "broken")
