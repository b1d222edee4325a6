"""PN9 converter on a miniature copy of the published ``.npy`` release and SANet's annotation tables.

Fixture (layout of SANet's ``config.py``): ``full/{pid:05d}_zoom.npy`` uint8 arrays of shape [1, D, H, W] =
[1, 20, 24, 28] (z, y, x all different, to catch an axis mix-up), ``split_full_with_nodule_9classes/`` with
``train_anno.csv`` / ``test_anno.csv`` (columns of SANet's published ``test_anno_center.csv``:
``pid,nodule_class,xmin,xmax,ymin,ymax,zmin,zmax,nodule_id,center_x,center_y,center_z,diameter,x_size,y_size``,
pid without zero padding, max inclusive), ``test_anno_center.csv`` and the split lists.

Hand-worked boxes (z0, y0, x0, z1, y1, x1), max exclusive = CSV max + 1, for scan 00001:

- A  0-3SN   x 3..5,   y 10..12, z 7..7    -> (7, 10, 3, 8, 13, 6)      single slice
- B  >5GGN   x 15..26, y 4..15,  z 2..11   -> (2, 4, 15, 12, 16, 27)
- C  CN      x 18..19, y 6..7,   z 4..5    -> (4, 6, 18, 6, 8, 20)       inside B: painted after B, kept whole
- D  = A (duplicate row)                   -> painted once
- E  3-10SN  x 25..30, y 20..23, z 15..19  -> x clipped to 27 (W = 28): (15, 20, 25, 20, 24, 28)
- F  10-30SN x 2..6,   y 18..22, z 14..18  -> its z = 18 face is covered by G: (14, 18, 2, 18, 23, 7)
- G  0-5PSN  x 2..6,   y 18..22, z 18..19  -> (18, 18, 2, 20, 23, 7)
- H  >30SN   x 40..45 (outside the scan)   -> dropped
Scan 00805 (test_anno.csv): 10-30SN x 1..9, y 2..8, z 3..6 -> (3, 2, 1, 7, 9, 10). Scan 00007: no nodules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nifti_fixtures import boxes_and_classes
from pretrain_det3d.data.converters.base import ConversionError
from pretrain_det3d.data.converters.pn9 import PN9_CLASSES, PN9Converter
from pretrain_det3d.data.dataset_format import check_converted_dataset
from pretrain_det3d.data.io import read_case, read_dataset_json

SHAPE_ZYX = (20, 24, 28)
HEADER = "pid,nodule_class,xmin,xmax,ymin,ymax,zmin,zmax,nodule_id,center_x,center_y,center_z,diameter,x_size,y_size"
# (class, xmin, xmax, ymin, ymax, zmin, zmax) of scan 1 in file order
SCAN1_ROWS = [
    ("0-3SN", 3, 5, 10, 12, 7, 7),
    (">5GGN", 15, 26, 4, 15, 2, 11),
    ("CN", 18, 19, 6, 7, 4, 5),
    ("0-3SN", 3, 5, 10, 12, 7, 7),
    ("3-10SN", 25, 30, 20, 23, 15, 19),
    ("10-30SN", 2, 6, 18, 22, 14, 18),
    ("0-5PSN", 2, 6, 18, 22, 18, 19),
    (">30SN", 40, 45, 3, 5, 3, 5),
]
SCAN805_ROWS = [("10-30SN", 1, 9, 2, 8, 3, 6)]
EXPECTED_SCAN1 = [
    ((7, 10, 3, 8, 13, 6), "0-3SN"),
    ((2, 4, 15, 12, 16, 27), ">5GGN"),
    ((4, 6, 18, 6, 8, 20), "CN"),
    ((15, 20, 25, 20, 24, 28), "3-10SN"),
    ((14, 18, 2, 18, 23, 7), "10-30SN"),
    ((18, 18, 2, 20, 23, 7), "0-5PSN"),
]


def _csv_lines(pid: int, rows: list[tuple]) -> list[str]:
    lines = []
    for nodule_id, (cls, x0, x1, y0, y1, z0, z1) in enumerate(rows):
        diameter = max(x1 - x0, y1 - y0)
        lines.append(f"{pid},{cls},{x0},{x1},{y0},{y1},{z0},{z1},{nodule_id},{(x0 + x1) / 2},{(y0 + y1) / 2},"
                     f"{(z0 + z1) / 2},{diameter},{x1 - x0},{y1 - y0}")
    return lines


def _volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, *SHAPE_ZYX)).astype(np.uint8)


@pytest.fixture
def pn9_source(tmp_path: Path) -> Path:
    root = tmp_path / "process_zoom"
    (root / "full").mkdir(parents=True)
    for pid in (1, 7, 805):
        np.save(root / "full" / f"{pid:05d}_zoom.npy", _volume(pid))
    split = root / "split_full_with_nodule_9classes"
    split.mkdir()
    train = _csv_lines(1, SCAN1_ROWS) + _csv_lines(9999, [("CN", 1, 2, 1, 2, 1, 2)])  # 9999: no image here
    (split / "train_anno.csv").write_text("\n".join([HEADER, *train]) + "\n")
    (split / "test_anno.csv").write_text("\n".join([HEADER, *_csv_lines(805, SCAN805_ROWS)]) + "\n")
    (split / "test_anno_center.csv").write_text("\n".join([HEADER, *_csv_lines(805, SCAN805_ROWS)]) + "\n")
    (split / "train.txt").write_text("00001\n00007\n")
    (split / "val.txt").write_text("00007\n")
    (split / "test.txt").write_text("00805\n")
    return root


def test_boxes_become_solid_instances_with_exact_boxes(pn9_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    PN9Converter().convert(pn9_source, out, show_progress=False)
    summary = check_converted_dataset(out)
    assert summary.case_ids == ["00001", "00007", "00805"] and summary.class_names == ["nodule"]
    assert boxes_and_classes(out, "00001") == ([box for box, _ in EXPECTED_SCAN1], [0] * 6)
    assert boxes_and_classes(out, "00805") == ([(3, 2, 1, 7, 9, 10)], [0])
    assert boxes_and_classes(out, "00007") == ([], [])
    record = read_dataset_json(out)["conversion"]
    assert record["duplicate_rows"] == {"00001": ["train_anno.csv:5"]}  # row D (line 5 of the file)
    assert record["boxes_clipped"] == {"00001": [[15, 19, 20, 23, 25, 30]]}  # inclusive z0 z1 y0 y1 x0 x1
    assert record["boxes_outside"] == {"00001": [[3, 5, 3, 5, 40, 45]]}
    assert record["boxes_changed_by_overlap"] == {"00001": [[14, 18, 18, 22, 2, 6]]}  # F lost its z = 18 face
    assert record["annotated_scans_without_image"] == [9999]
    assert record["official_split"] == {"train": ["00001", "00007"], "val": ["00007"], "test": ["00805"]}


def test_nine_classes(pn9_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    PN9Converter({"classes": "types"}).convert(pn9_source, out, show_progress=False)
    assert check_converted_dataset(out).class_names == list(PN9_CLASSES)
    boxes, classes = boxes_and_classes(out, "00001")
    assert classes == [PN9_CLASSES.index(name) for _, name in EXPECTED_SCAN1]
    assert classes == [0, 5, 8, 1, 2, 6]  # by hand from PN9_CLASSES' order


def test_geometry_and_values(pn9_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    PN9Converter({"exclude": ["00007"]}).convert(pn9_source, out, show_progress=False)
    assert check_converted_dataset(out).case_ids == ["00001", "00805"]
    converted = read_case(out, "00805")
    assert converted.spacing == (1.0, 1.0, 1.0) and converted.origin == (0.0, 0.0, 0.0)
    assert converted.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    np.testing.assert_array_equal(converted.image, _volume(805))  # [1, Z, Y, X], values as published


def test_bad_tables_and_arrays_name_the_file(pn9_source: Path, tmp_path: Path) -> None:
    split = pn9_source / "split_full_with_nodule_9classes"
    (split / "test_anno.csv").write_text("pid,nodule_class,xmin,xmax\n805,CN,1,2\n")
    with pytest.raises(ConversionError, match=r"test_anno\.csv: missing columns \['ymin', 'ymax', 'zmin', 'zmax'\]"):
        PN9Converter().convert(pn9_source, tmp_path / "a", show_progress=False)
    (split / "test_anno.csv").write_text("\n".join([HEADER, *_csv_lines(805, [("7SN", 1, 2, 1, 2, 1, 2)])]) + "\n")
    with pytest.raises(ConversionError, match=r"test_anno\.csv: unknown nodule_class \['7SN'\]"):
        PN9Converter().convert(pn9_source, tmp_path / "b", show_progress=False)
    (split / "test_anno.csv").write_text("\n".join([HEADER, *_csv_lines(805, [("CN", 4, 2, 1, 2, 1, 2)])]) + "\n")
    with pytest.raises(ConversionError, match=r"test_anno\.csv: line 2: xmin > xmax"):
        PN9Converter().convert(pn9_source, tmp_path / "c", show_progress=False)
    (split / "test_anno.csv").write_text("\n".join([HEADER, *_csv_lines(805, SCAN805_ROWS)]) + "\n")
    np.save(pn9_source / "full" / "00007_zoom.npy", np.zeros((2, 3, 4, 5), np.uint8))
    out = tmp_path / "d"
    with pytest.raises(ConversionError, match=r"00007_zoom\.npy: expected shape \[1, D, H, W\]"):
        PN9Converter().convert(pn9_source, out, show_progress=False)
    assert not out.exists()
    (split / "train_anno.csv").unlink()
    with pytest.raises(ConversionError, match=r"train_anno\.csv: expected exactly one train_anno\.csv"):
        PN9Converter().convert(pn9_source, tmp_path / "e", show_progress=False)
