"""LIDC-IDRI converter on a miniature copy in the real format: a DICOM CT series and a LidcReadMessage XML.

Four readers: three outline nodule A (overlapping rectangles), one outlines nodule B alone, one marks a < 3 mm
nodule with a single point and a non-nodule. With the documented consensus rule (>= 2 readers, voxels covered by
>= 50 % of the group's outlines) only nodule A survives; its box is worked out by hand in the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicom_fixtures import write_dicom_series
from pretrain_det3d.data.boxes import instance_voxel_extents
from pretrain_det3d.data.converters import ConversionError, convert_dataset
from pretrain_det3d.data.converters.lidc import parse_lidc_xml
from pretrain_det3d.data.dataset_format import check_converted_dataset
from pretrain_det3d.data.io import read_case

SERIES_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.300000000000000000000000000001"
SOP_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001.4000000000000000000000000000"
NUM_SLICES, ROWS, COLS = 6, 16, 18
SPACING_XYZ = (0.7, 0.75, 2.5)
ORIGIN_XYZ = (165.2, -180.4, -52.5)
ROW_COSINES = (-1.0, 0.0, 0.0)  # columns run towards -x
COLUMN_COSINES = (0.0, 1.0, 0.0)  # normal = row x column = (0, 0, -1): slices go down in z


def sop(k: int) -> str:
    return f"{SOP_PREFIX}{k:02d}"


def slice_z(k: int) -> float:
    return ORIGIN_XYZ[2] - k * SPACING_XYZ[2]


def rectangle(y0: int, y1: int, x0: int, x1: int) -> list[tuple[int, int]]:
    """Outline pixels (x, y) of the rectangle rows y0..y1, columns x0..x1 (inclusive), as readers draw them."""
    points = [(x, y0) for x in range(x0, x1 + 1)] + [(x1, y) for y in range(y0 + 1, y1 + 1)]
    points += [(x, y1) for x in range(x1 - 1, x0 - 1, -1)] + [(x0, y) for y in range(y1 - 1, y0, -1)]
    return points


def roi_xml(k: int, points: list[tuple[int, int]], inclusion: bool = True) -> str:
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in points)
    return (f"<roi><imageZposition>{slice_z(k):.6f}</imageZposition><imageSOP_UID>{sop(k)}</imageSOP_UID>"
            f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>{edges}</roi>")


def nodule_xml(nodule_id: str, rois: list[str], characteristics: bool = True) -> str:
    chars = "<characteristics><subtlety>5</subtlety><malignancy>3</malignancy></characteristics>" if characteristics else ""
    return f"<unblindedReadNodule><noduleID>{nodule_id}</noduleID>{chars}{''.join(rois)}</unblindedReadNodule>"


def session_xml(reader: int, nodules: list[str], extra: str = "") -> str:
    return (f"<readingSession><annotationVersion>3.12</annotationVersion>"
            f"<servicingRadiologistID>anon{reader}</servicingRadiologistID>{''.join(nodules)}{extra}</readingSession>")


def write_xml(path: Path, sessions: list[str]) -> None:
    path.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<LidcReadMessage uid="1.3.6.1.4.1.14519.5.2.1.6279.6001.1" xmlns="http://www.nih.gov" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        "<ResponseHeader><Version>1.8.1</Version><MessageId>-421198203</MessageId>"
        "<TaskDescription>Second unblinded read</TaskDescription>"
        f"<SeriesInstanceUid>{SERIES_UID}</SeriesInstanceUid>"
        "<StudyInstanceUID>1.3.6.1.4.1.14519.5.2.1.6279.6001.2</StudyInstanceUID></ResponseHeader>"
        + "".join(sessions) + "</LidcReadMessage>\n")


@pytest.fixture
def lidc_source(tmp_path: Path) -> Path:
    root = tmp_path / "LIDC-IDRI"
    series_dir = root / "LIDC-IDRI-0007" / "01-01-2000-NA-NA-30178" / "3000566.000000-NA-03192"
    array = np.random.default_rng(1).integers(-1000, 500, size=(NUM_SLICES, ROWS, COLS)).astype(np.int16)
    order = [3, 0, 5, 1, 4, 2]  # file names and instance numbers deliberately not in position order
    write_dicom_series(series_dir, array, SPACING_XYZ, ORIGIN_XYZ, ROW_COSINES, COLUMN_COSINES, SERIES_UID,
                       sop_uids=[sop(k) for k in range(NUM_SLICES)], instance_numbers=[order[k] + 1 for k in range(NUM_SLICES)],
                       file_names=[f"1-{order[k] + 1:03d}.dcm" for k in range(NUM_SLICES)], patient_id="LIDC-IDRI-0007")
    reader1 = session_xml(1, [
        nodule_xml("Nodule 001", [roi_xml(2, rectangle(5, 9, 6, 10)), roi_xml(3, rectangle(5, 9, 6, 10))]),
        nodule_xml("5", [roi_xml(1, [(15, 2)])], characteristics=False),  # < 3 mm: a single point
    ])
    reader2 = session_xml(2, [nodule_xml("IL057_1", [roi_xml(3, rectangle(6, 10, 7, 11)), roi_xml(4, rectangle(6, 10, 7, 11))])])
    reader3 = session_xml(3, [nodule_xml("B", [roi_xml(1, rectangle(11, 14, 1, 4))])],  # nodule B: one reader only
                          extra=f"<nonNodule><nonNoduleID>N1</nonNoduleID><imageZposition>{slice_z(0):.6f}</imageZposition>"
                                f"<imageSOP_UID>{sop(0)}</imageSOP_UID><locus><xCoord>3</xCoord><yCoord>3</yCoord></locus></nonNodule>")
    reader4 = session_xml(4, [nodule_xml("0", [
        roi_xml(2, rectangle(4, 8, 5, 9)), roi_xml(3, rectangle(4, 8, 5, 9)),
        roi_xml(3, rectangle(4, 5, 5, 6), inclusion=False),  # a hole, removed from reader 4's nodule
    ])])
    write_xml(series_dir / "069.xml", [reader1, reader2, reader3, reader4])
    return root


def test_xml_is_parsed_with_namespace(lidc_source: Path) -> None:
    message = parse_lidc_xml(next(lidc_source.rglob("069.xml")))
    assert message is not None and message.series_uid == SERIES_UID and message.num_readers == 4
    assert [(n.reader, n.has_outline) for n in message.nodules] == [(0, True), (0, False), (1, True), (2, True), (3, True)]


def test_lidc_consensus_box_matches_hand_worked(lidc_source: Path, tmp_path: Path) -> None:
    out = convert_dataset("lidc", lidc_source, tmp_path / "converted", show_progress=False)
    summary = check_converted_dataset(out)
    assert summary.case_ids == ["LIDC-IDRI-0007"]
    case = read_case(out, "LIDC-IDRI-0007")
    # Nodule A: R1 = slices 2-3, rows 5-9, cols 6-10; R2 = slices 3-4, rows 6-10, cols 7-11;
    # R4 = slices 2-3, rows 4-8, cols 5-9 minus the hole rows 4-5, cols 5-6 on slice 3.
    # 3 outlines -> a voxel needs >= ceil(0.5 * 3) = 2 of them.
    # Slice 2: R1 n R4 = rows 5-8, cols 6-9 (16 voxels). Slice 3: (R1 n R2) u (R1 n R4') u (R2 n R4') spans rows
    # 5-9, cols 6-10: R1 n R2 is rows 6-9, cols 7-10; R1 n R4' adds row 5 cols 7-9 and rows 6-8 col 6; the corners
    # (5, 6) [the hole], (5, 10) and (9, 6) have one vote only -> 25 - 3 = 22 voxels. Slice 4: R2 alone -> none.
    # Box over (z, y, x), max exclusive: z 2..3 -> [2, 4), y 5..9 -> [5, 10), x 6..10 -> [6, 11).
    ids, boxes = instance_voxel_extents(case.instance_map)
    np.testing.assert_array_equal(ids, [1])
    np.testing.assert_array_equal(boxes, [[2, 5, 6, 4, 10, 11]])
    assert case.instances == {1: 0}
    # voxel-level checks of the 50 % rule: (slice 3, row 5, col 6) lies in R1 only once R4's hole is cut out
    assert case.instance_map[3, 5, 6] == 0 and case.instance_map[3, 5, 7] == 1 and case.instance_map[2, 9, 10] == 0
    assert int((case.instance_map == 1).sum()) == 16 + 22
    # geometry: direction from the orientation tags, origin = position of the first slice in array order
    np.testing.assert_allclose(case.direction, (-1, 0, 0, 0, 1, 0, 0, 0, -1), atol=1e-6)
    np.testing.assert_allclose(case.origin, ORIGIN_XYZ, atol=1e-4)
    np.testing.assert_allclose(case.spacing, SPACING_XYZ[::-1], atol=1e-4)
    assert json.loads((out / "dataset.json").read_text())["conversion"]["min_readers"] == 2


def test_lidc_single_reader_setting_keeps_nodule_b(lidc_source: Path, tmp_path: Path) -> None:
    out = convert_dataset("lidc", lidc_source, tmp_path / "converted", settings={"min_readers": 1}, show_progress=False)
    _, boxes = instance_voxel_extents(read_case(out, "LIDC-IDRI-0007").instance_map)
    # nodule B: slice 1, rows 11-14, cols 1-4 -> [1, 11, 1, 2, 15, 5]
    assert [1, 11, 1, 2, 15, 5] in boxes.tolist() and len(boxes) == 2


def test_lidc_roi_outside_series_is_named(lidc_source: Path, tmp_path: Path) -> None:
    xml = next(lidc_source.rglob("069.xml"))
    xml.write_text(xml.read_text().replace(f"<imageZposition>{slice_z(4):.6f}</imageZposition><imageSOP_UID>{sop(4)}",
                                           "<imageZposition>999.0</imageZposition><imageSOP_UID>1.2.3"))
    with pytest.raises(ConversionError, match=r"069\.xml: nodule 'IL057_1' of reader 2: slice 1\.2\.3"):
        convert_dataset("lidc", lidc_source, tmp_path / "converted", show_progress=False)
    assert not (tmp_path / "converted").exists()
