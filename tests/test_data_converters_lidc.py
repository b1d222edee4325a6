"""LIDC-IDRI converter on a miniature copy in the real format: DICOM CT series and LidcReadMessage XMLs.

Series 1 of patient LIDC-IDRI-0007 (6 slices of 16 x 18 pixels), four readers (R1-R4), outlines as rectangles
(rows y0..y1, cols x0..x1, inclusive), malignancy ratings in brackets:

- nodule A: R1 [5] slices 2-3, rows 5-9, cols 6-10; R2 [4] slices 3-4, rows 6-10, cols 7-11; R4 [3] slices 2-3,
  rows 4-8, cols 5-9 with a hole (inclusion FALSE) rows 4-5, cols 5-6 on slice 3. Pairwise overlaps R1-R2 and
  R1-R4 are 16 voxels (> 10): one nodule.
- nodule C: R2 [5] slice 0, rows 1-4, cols 12-16; R3 [5] slice 0, rows 1-4, cols 13-17 (16 shared voxels).
- nodule B: R3 [1] alone, slice 1, rows 11-14, cols 1-4.
- nodule D: R1 [2] slice 5, rows 11-14, cols 10-14; R4 [2] slice 5, rows 13-15, cols 10-14: they share 10
  voxels, not more than 10, so they are two one-reader nodules.
- R1 also marks a < 3 mm nodule (one point) and R3 a non-nodule: neither counts.

With the default rule (a voxel needs 2 of the 4 readers) A and C survive, B and D do not; the boxes and voxel
counts are worked out in the tests. A second series of the same patient carries its own XML with no nodules.
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
SERIES_UID_2 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.300000000000000000000000000002"
SOP_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001.4000000000000000000000000000"
SOP_PREFIX_2 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.5000000000000000000000000000"
NUM_SLICES, ROWS, COLS = 6, 16, 18
SPACING_XYZ = (0.7, 0.75, 2.5)
ORIGIN_XYZ = (165.2, -180.4, -52.5)
ROW_COSINES = (-1.0, 0.0, 0.0)  # columns run towards -x
COLUMN_COSINES = (0.0, 1.0, 0.0)  # normal = row x column = (0, 0, -1): slices go down in z
SERIES_PATH = ("LIDC-IDRI-0007", "01-01-2000-NA-NA-30178", "3000566.000000-NA-03192")
SERIES_2_PATH = ("LIDC-IDRI-0007", "01-01-2001-NA-NA-41120", "3000611.000000-NA-55017")

# hand-worked results (boxes over z, y, x, max exclusive)
# A: 3 outlines; slice 2: R1 n R4 = rows 5-8, cols 6-9 (16 voxels). Slice 3: R1 n R2 = rows 6-9, cols 7-10;
# R1 n R4' adds row 5 cols 7-9 and rows 6-8 col 6; the corners (5, 6) [R4's hole], (5, 10) and (9, 6) have one
# vote -> 25 - 3 = 22 voxels. Slice 4: R2 alone -> none. Box z 2..3, y 5..9, x 6..10.
BOX_A, VOXELS_A = [2, 5, 6, 4, 10, 11], 16 + 22
# C: R2 n R3 = slice 0, rows 1-4, cols 13-16 -> 16 voxels
BOX_C, VOXELS_C = [0, 1, 13, 1, 5, 17], 16


def sop(k: int, prefix: str = SOP_PREFIX) -> str:
    return f"{prefix}{k:02d}"


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


def nodule_xml(nodule_id: str, rois: list[str], malignancy: int | None = 3) -> str:
    chars = (f"<characteristics><subtlety>5</subtlety><malignancy>{malignancy}</malignancy></characteristics>"
             if malignancy is not None else "")
    return f"<unblindedReadNodule><noduleID>{nodule_id}</noduleID>{chars}{''.join(rois)}</unblindedReadNodule>"


def session_xml(reader: int, nodules: list[str], extra: str = "") -> str:
    return (f"<readingSession><annotationVersion>3.12</annotationVersion>"
            f"<servicingRadiologistID>anon{reader}</servicingRadiologistID>{''.join(nodules)}{extra}</readingSession>")


def xml_text(sessions: list[str], series_uid: str = SERIES_UID) -> str:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<LidcReadMessage uid="1.3.6.1.4.1.14519.5.2.1.6279.6001.1" xmlns="http://www.nih.gov" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
            "<ResponseHeader><Version>1.8.1</Version><MessageId>-421198203</MessageId>"
            "<TaskDescription>Second unblinded read</TaskDescription>"
            f"<SeriesInstanceUid>{series_uid}</SeriesInstanceUid>"
            "<StudyInstanceUID>1.3.6.1.4.1.14519.5.2.1.6279.6001.2</StudyInstanceUID></ResponseHeader>"
            + "".join(sessions) + "</LidcReadMessage>\n")


def sessions() -> list[str]:
    """The four readers' sessions of series 1 (module docstring)."""
    reader1 = session_xml(1, [
        nodule_xml("Nodule 001", [roi_xml(2, rectangle(5, 9, 6, 10)), roi_xml(3, rectangle(5, 9, 6, 10))], 5),
        nodule_xml("Nodule 002", [roi_xml(5, rectangle(11, 14, 10, 14))], 2),
        nodule_xml("5", [roi_xml(1, [(15, 2)])], None),  # < 3 mm: a single point
    ])
    reader2 = session_xml(2, [
        nodule_xml("IL057_1", [roi_xml(3, rectangle(6, 10, 7, 11)), roi_xml(4, rectangle(6, 10, 7, 11))], 4),
        nodule_xml("IL057_2", [roi_xml(0, rectangle(1, 4, 12, 16))], 5),
    ])
    reader3 = session_xml(3, [nodule_xml("B", [roi_xml(1, rectangle(11, 14, 1, 4))], 1),
                              nodule_xml("C", [roi_xml(0, rectangle(1, 4, 13, 17))], 5)],
                          extra=f"<nonNodule><nonNoduleID>N1</nonNoduleID><imageZposition>{slice_z(0):.6f}</imageZposition>"
                                f"<imageSOP_UID>{sop(0)}</imageSOP_UID><locus><xCoord>3</xCoord><yCoord>3</yCoord></locus></nonNodule>")
    reader4 = session_xml(4, [
        nodule_xml("0", [roi_xml(2, rectangle(4, 8, 5, 9)), roi_xml(3, rectangle(4, 8, 5, 9)),
                         roi_xml(3, rectangle(4, 5, 5, 6), inclusion=False)], 3),  # a hole, removed from R4's nodule
        nodule_xml("1", [roi_xml(5, rectangle(13, 15, 10, 14))], 2),
    ])
    return [reader1, reader2, reader3, reader4]


def write_series(root: Path, parts: tuple[str, ...], series_uid: str, sop_prefix: str, seed: int) -> Path:
    series_dir = root.joinpath(*parts)
    array = np.random.default_rng(seed).integers(-1000, 500, size=(NUM_SLICES, ROWS, COLS)).astype(np.int16)
    order = [3, 0, 5, 1, 4, 2]  # file names and instance numbers deliberately not in position order
    write_dicom_series(series_dir, array, SPACING_XYZ, ORIGIN_XYZ, ROW_COSINES, COLUMN_COSINES, series_uid,
                       sop_uids=[sop(k, sop_prefix) for k in range(NUM_SLICES)],
                       instance_numbers=[order[k] + 1 for k in range(NUM_SLICES)],
                       file_names=[f"1-{order[k] + 1:03d}.dcm" for k in range(NUM_SLICES)], patient_id="LIDC-IDRI-0007")
    return series_dir


@pytest.fixture
def lidc_source(tmp_path: Path) -> Path:
    root = tmp_path / "LIDC-IDRI"
    series_dir = write_series(root, SERIES_PATH, SERIES_UID, SOP_PREFIX, seed=1)
    (series_dir / "069.xml").write_text(xml_text(sessions()))
    return root


def boxes_of(out: Path, case: str) -> tuple[list[list[int]], list[int], dict[int, int]]:
    converted = read_case(out, case)
    ids, boxes = instance_voxel_extents(converted.instance_map)
    return boxes.tolist(), [int((converted.instance_map == i).sum()) for i in ids], converted.instances


def test_xml_is_parsed_with_namespace_and_ratings(lidc_source: Path) -> None:
    message = parse_lidc_xml(next(lidc_source.rglob("069.xml")))
    assert message is not None and message.series_uid == SERIES_UID and message.num_readers == 4
    assert [(n.reader, n.has_outline, n.malignancy) for n in message.nodules] == [
        (0, True, 5), (0, True, 2), (0, False, None), (1, True, 4), (1, True, 5), (2, True, 1), (2, True, 5),
        (3, True, 3), (3, True, 2)]


def test_two_of_four_readers_hand_worked(lidc_source: Path, tmp_path: Path) -> None:
    out = convert_dataset("lidc", lidc_source, tmp_path / "converted", show_progress=False)
    summary = check_converted_dataset(out)
    assert summary.case_ids == ["LIDC-IDRI-0007"] and summary.class_names == ["nodule"]
    boxes, voxels, instances = boxes_of(out, "LIDC-IDRI-0007")
    assert boxes == [BOX_A, BOX_C] and voxels == [VOXELS_A, VOXELS_C] and instances == {1: 0, 2: 0}
    case = read_case(out, "LIDC-IDRI-0007")
    # (slice 3, row 5, col 6) lies in R1 only once R4's hole is cut out; (2, 9, 10) in R1 only
    assert case.instance_map[3, 5, 6] == 0 and case.instance_map[3, 5, 7] == 1 and case.instance_map[2, 9, 10] == 0
    # geometry: direction from the orientation tags, origin = position of the first slice in array order
    np.testing.assert_allclose(case.direction, (-1, 0, 0, 0, 1, 0, 0, 0, -1), atol=1e-6)
    np.testing.assert_allclose(case.origin, ORIGIN_XYZ, atol=1e-4)
    np.testing.assert_allclose(case.spacing, SPACING_XYZ[::-1], atol=1e-4)
    conversion = json.loads((out / "dataset.json").read_text())["conversion"]
    assert conversion["voxel_agreement"] == 0.5 and conversion["series"] == {"LIDC-IDRI-0007": SERIES_UID}
    assert conversion["nodules_without_agreement"] == {"LIDC-IDRI-0007": 3}  # B and the two halves of D


def test_overlap_threshold_links_nodule_d(lidc_source: Path, tmp_path: Path) -> None:
    # with 10 shared voxels enough, R1's and R4's D are one nodule: its 2-vote voxels are the shared rows 13-14
    out = convert_dataset("lidc", lidc_source, tmp_path / "converted", settings={"min_overlap_voxels": 10},
                          show_progress=False)
    boxes, voxels, _ = boxes_of(out, "LIDC-IDRI-0007")
    assert boxes == [BOX_A, [5, 13, 10, 6, 15, 15], BOX_C] and voxels == [VOXELS_A, 10, VOXELS_C]


def test_one_reader_agreement_and_later_nodules_take_shared_voxels(lidc_source: Path, tmp_path: Path) -> None:
    out = convert_dataset("lidc", lidc_source, tmp_path / "converted", settings={"voxel_agreement": 0.25},
                          show_progress=False)
    boxes, voxels, _ = boxes_of(out, "LIDC-IDRI-0007")
    # groups in order of their first annotation: A (R1), D by R1, C (R2), B (R3), D by R4. 1 of 4 readers is
    # enough: A = R1 u R2 u R4 (slices 2-4, rows 4-10, cols 5-11); D by R4 (rows 13-15) takes rows 13-14 from D
    # by R1, which keeps rows 11-12 (10 voxels); C = R2 u R3 = rows 1-4, cols 12-17 (24); B = 4 x 4 (16)
    assert boxes == [[2, 4, 5, 5, 11, 12], [5, 11, 10, 6, 13, 15], [0, 1, 12, 1, 5, 18], [1, 11, 1, 2, 15, 5],
                     [5, 13, 10, 6, 16, 15]]
    assert voxels[1:] == [10, 24, 16, 15]


def test_malignancy_classes_as_nndetection(lidc_source: Path, tmp_path: Path) -> None:
    out = convert_dataset("lidc", lidc_source, tmp_path / "converted", settings={"classes": "malignancy"},
                          show_progress=False)
    assert check_converted_dataset(out).class_names == ["benign", "malignant"]
    # A: (5 + 4 + 3 + 0) / 4 = 3.0 -> malignant; C: (5 + 5 + 0 + 0) / 4 = 2.5 -> benign
    assert boxes_of(out, "LIDC-IDRI-0007")[2] == {1: 1, 2: 0}
    conversion = json.loads((out / "dataset.json").read_text())["conversion"]
    assert conversion["malignancy_scores"] == {"LIDC-IDRI-0007": {"1": 3.0, "2": 2.5}}
    out = convert_dataset("lidc", lidc_source, tmp_path / "marking", show_progress=False,
                          settings={"classes": "malignancy", "malignancy_mean": "marking_readers"})
    # over the readers who marked it: A 4.0, C 5.0 -> both malignant
    assert boxes_of(out, "LIDC-IDRI-0007")[2] == {1: 1, 2: 1}


def test_two_xmls_of_one_series_make_one_case(lidc_source: Path, tmp_path: Path) -> None:
    # the TCIA download keeps 069.xml in the series folder; LIDC-XML-only.zip holds the same message again,
    # formatted differently; a third copy splits the readers over two files (R1, R2 | R2 again, R3, R4)
    text = xml_text(sessions())
    copy = lidc_source / "LIDC-XML-only" / "tcia-lidc-xml" / "157" / "069.xml"
    copy.parent.mkdir(parents=True)
    copy.write_text(text.replace("><", ">\n  <"))
    out = convert_dataset("lidc", lidc_source, tmp_path / "duplicate", show_progress=False)
    assert check_converted_dataset(out).case_ids == ["LIDC-IDRI-0007"]
    assert boxes_of(out, "LIDC-IDRI-0007")[:2] == ([BOX_A, BOX_C], [VOXELS_A, VOXELS_C])
    files = json.loads((out / "dataset.json").read_text())["conversion"]["xml_files"][SERIES_UID]
    # files are read in path order: the series folder's copy first, so the zip's adds no session
    assert files == {str(next(lidc_source.glob("LIDC-IDRI-0007/*/*/069.xml"))): 4, str(copy): 0}

    copy.unlink()
    (lidc_source / "LIDC-IDRI-0007").joinpath(*SERIES_PATH[1:], "069.xml").write_text(xml_text(sessions()[:2]))
    copy.write_text(xml_text(sessions()[1:]))
    out = convert_dataset("lidc", lidc_source, tmp_path / "split", show_progress=False)
    assert boxes_of(out, "LIDC-IDRI-0007")[:2] == ([BOX_A, BOX_C], [VOXELS_A, VOXELS_C])
    files = json.loads((out / "dataset.json").read_text())["conversion"]["xml_files"][SERIES_UID]
    assert sorted(files.values()) == [2, 2]  # the repeated R2 session is read once


def test_each_ct_series_of_a_patient_is_its_own_case(lidc_source: Path, tmp_path: Path) -> None:
    series_2 = write_series(lidc_source, SERIES_2_PATH, SERIES_UID_2, SOP_PREFIX_2, seed=2)
    (series_2 / "071.xml").write_text(xml_text([session_xml(r, []) for r in (1, 2, 3, 4)], SERIES_UID_2))
    copy = lidc_source / "LIDC-XML-only" / "tcia-lidc-xml" / "157" / "071.xml"
    copy.parent.mkdir(parents=True)
    copy.write_text((series_2 / "071.xml").read_text())
    out = convert_dataset("lidc", lidc_source, tmp_path / "converted", show_progress=False)
    assert check_converted_dataset(out).case_ids == ["LIDC-IDRI-0007_1", "LIDC-IDRI-0007_2"]  # not 3 cases
    assert json.loads((out / "dataset.json").read_text())["conversion"]["series"] == {
        "LIDC-IDRI-0007_1": SERIES_UID, "LIDC-IDRI-0007_2": SERIES_UID_2}
    assert boxes_of(out, "LIDC-IDRI-0007_1")[0] == [BOX_A, BOX_C] and boxes_of(out, "LIDC-IDRI-0007_2")[0] == []


def test_lidc_roi_outside_series_is_named(lidc_source: Path, tmp_path: Path) -> None:
    xml = next(lidc_source.rglob("069.xml"))
    xml.write_text(xml.read_text().replace(f"<imageZposition>{slice_z(4):.6f}</imageZposition><imageSOP_UID>{sop(4)}",
                                           "<imageZposition>999.0</imageZposition><imageSOP_UID>1.2.3"))
    with pytest.raises(ConversionError, match=r"069\.xml: nodule 'IL057_1' of reader 2: slice 1\.2\.3"):
        convert_dataset("lidc", lidc_source, tmp_path / "converted", show_progress=False)
    assert not (tmp_path / "converted").exists()


def test_unknown_setting_is_refused(lidc_source: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"'convert \(lidc\)\.min_readers': unknown key"):
        convert_dataset("lidc", lidc_source, tmp_path / "converted", settings={"min_readers": 2}, show_progress=False)
