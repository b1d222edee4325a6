"""Duke-Breast-Cancer-MRI converter on a miniature copy in the real format.

DICOM series in TCIA's descriptive folder layout, ``Annotation_Boxes.xlsx`` with the collection's columns, and
``Breast-Cancer-MRI-filepath_filename-mapping.xlsx`` linking each slice's SOPInstanceUID to its original file
name (whose number is the slice number the boxes use). The original slice numbers run against the stacking
order, so a converter that used array indices directly would put the box on the wrong slices.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dicom_fixtures import write_dicom_series
from pretrain_det3d.data.boxes import instance_voxel_extents
from pretrain_det3d.data.converters import ConversionError, convert_dataset
from pretrain_det3d.data.dataset_format import check_converted_dataset
from pretrain_det3d.data.io import read_case

PATIENT = "Breast_MRI_001"
NUM_SLICES, ROWS, COLS = 8, 12, 14
SPACING_XYZ = (0.7, 0.7, 1.1)
ORIGIN_XYZ = (-171.5, 142.3, 88.0)
ROW_COSINES, COLUMN_COSINES = (1.0, 0.0, 0.0), (0.0, -1.0, 0.0)  # normal (0, 0, -1)
SERIES = {"pre": "1.3.6.1.4.1.14519.5.2.1.186051521067863971269584893740842397538.3",
          "post_1": "1.3.6.1.4.1.14519.5.2.1.186051521067863971269584893740842397538.4"}
FOLDERS = {"pre": "3.000000-ax dyn pre-93877", "post_1": "4.000000-ax dyn 1st pass-27440"}


def original_slice_number(k: int) -> int:
    """Slice numbers of the original file names run opposite to the array (position) order."""
    return NUM_SLICES - k


def sop(sequence: str, k: int) -> str:
    return f"{SERIES[sequence]}.{100 + k}"


@pytest.fixture
def duke_source(tmp_path: Path) -> Path:
    root = tmp_path / "duke"
    study = root / "Duke-Breast-Cancer-MRI" / PATIENT / "01-01-1990-NA-MRI BREAST BILATERAL W  WO-97538"
    rng = np.random.default_rng(2)
    mapping = []
    for sequence in ("pre", "post_1"):
        array = rng.integers(0, 900, size=(NUM_SLICES, ROWS, COLS)).astype(np.int16)
        names = [f"1-{original_slice_number(k):03d}.dcm" for k in range(NUM_SLICES)]
        write_dicom_series(study / FOLDERS[sequence], array, SPACING_XYZ, ORIGIN_XYZ, ROW_COSINES, COLUMN_COSINES,
                           SERIES[sequence], [sop(sequence, k) for k in range(NUM_SLICES)],
                           [original_slice_number(k) for k in range(NUM_SLICES)], names, modality="MR", patient_id=PATIENT)
        for k in range(NUM_SLICES):
            n = original_slice_number(k)
            mapping.append({
                "original_path_and_filename": f"DICOM_Images/{PATIENT}/{sequence}/{PATIENT}_{sequence}_{n:03d}.dcm",
                "classic_path": f"Duke-Breast-Cancer-MRI/{PATIENT}/1.3.6.1.4.1.14519.5.2.1.1/{SERIES[sequence]}/1-{n:03d}.dcm",
                "descriptive_path": f"Duke-Breast-Cancer-MRI/{PATIENT}/{study.name}/{FOLDERS[sequence]}/1-{n:03d}.dcm",
                "sop_instance_UID": sop(sequence, k),
            })
    pd.DataFrame(mapping).to_excel(root / "Breast-Cancer-MRI-filepath_filename-mapping.xlsx", index=False)
    boxes = pd.DataFrame([
        {"Patient ID": PATIENT, "Start Row": 4, "End Row": 7, "Start Column": 2, "End Column": 6,
         "Start Slice": 3, "End Slice": 5},
        {"Patient ID": "Breast_MRI_002", "Start Row": 1, "End Row": 2, "Start Column": 1, "End Column": 2,
         "Start Slice": 1, "End Slice": 2},  # images not downloaded: not a case
    ])
    boxes.to_excel(root / "Annotation_Boxes.xlsx", index=False)
    return root


def test_duke_box_matches_hand_worked(duke_source: Path, tmp_path: Path) -> None:
    out = convert_dataset("duke_breast", duke_source, tmp_path / "converted", show_progress=False)
    summary = check_converted_dataset(out)
    assert summary.case_ids == [PATIENT] and summary.modalities == ["MRI"]
    case = read_case(out, PATIENT)
    # Rows 4..7 (1-based, inclusive) -> y [3, 7); columns 2..6 -> x [1, 6); slices 3..5 are the original numbers
    # 8 - k, i.e. array slices k = 5, 4, 3 -> z [3, 6).
    ids, boxes = instance_voxel_extents(case.instance_map)
    np.testing.assert_array_equal(ids, [1])
    np.testing.assert_array_equal(boxes, [[3, 3, 1, 6, 7, 6]])
    assert int((case.instance_map == 1).sum()) == 3 * 4 * 5  # the whole box is the instance
    assert case.image.shape == (1, NUM_SLICES, ROWS, COLS)
    np.testing.assert_allclose(case.direction, (1, 0, 0, 0, -1, 0, 0, 0, -1), atol=1e-6)
    np.testing.assert_allclose(case.origin, ORIGIN_XYZ, atol=1e-4)
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"0": "tumour"}


def test_duke_two_sequences_become_channels(duke_source: Path, tmp_path: Path) -> None:
    out = convert_dataset("duke_breast", duke_source, tmp_path / "converted",
                          settings={"sequences": ["pre", "post_1"]}, show_progress=False)
    case = read_case(out, PATIENT)
    assert case.image.shape == (2, NUM_SLICES, ROWS, COLS)
    assert json.loads((out / "dataset.json").read_text())["modality"] == {"0": "MRI", "1": "MRI"}


def test_duke_box_outside_scan_is_named(duke_source: Path, tmp_path: Path) -> None:
    table = pd.read_excel(duke_source / "Annotation_Boxes.xlsx")
    table.loc[0, "End Row"] = ROWS + 1
    table.to_excel(duke_source / "Annotation_Boxes.xlsx", index=False)
    with pytest.raises(ConversionError, match=r"Annotation_Boxes\.xlsx: box of Breast_MRI_001 .* lies outside"):
        convert_dataset("duke_breast", duke_source, tmp_path / "converted", show_progress=False)
    assert not (tmp_path / "converted").exists()


def test_duke_missing_column_is_named(duke_source: Path, tmp_path: Path) -> None:
    table = pd.read_excel(duke_source / "Annotation_Boxes.xlsx").rename(columns={"Start Slice": "Slice"})
    (duke_source / "Annotation_Boxes.xlsx").unlink()
    table.to_csv(duke_source / "Annotation_Boxes.csv", index=False)  # the csv export is accepted too
    with pytest.raises(ConversionError, match=r"Annotation_Boxes\.csv: missing columns \['Start Slice'\]"):
        convert_dataset("duke_breast", duke_source, tmp_path / "converted", show_progress=False)
