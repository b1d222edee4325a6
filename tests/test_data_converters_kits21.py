"""KiTS21 converter on a miniature copy of the ``neheller/kits21`` repository layout.

Fixture: ``kits21/kits21/data/case_0000{0,2}/`` with ``imaging.nii.gz``, ``segmentations/`` holding one binary
mask per instance and annotator (``{kidney,tumor,cyst}_instance-k_annotation-a.nii.gz``, three annotators),
``aggregated_{MAJ,AND,OR}_seg.nii.gz``, plus ``kits.json``. As in KiTS, SimpleITK's x axis is the slice axis:
size (x, y, z) = (6, 14, 12), spacing (3.0, 0.78, 0.78) mm, origin (112.5, -20.0, 340.25) and a permuted,
flipped direction; so the *last* array axis is the 3 mm one.

Per-instance annotations of case_00000 (array axes z, y, x; boxes (z0, y0, x0, z1, y1, x1), max exclusive),
voted by >= 2 of 3 annotators:

- tumour 1: a1 = z 2..5, a2 = z 3..6 (both y 2..5, x 1..2), a3 = z 0..1, y 0..1, x 0 (elsewhere) -> votes >= 2
  on a1 n a2 = z 3..5, y 2..5, x 1..2 (24 voxels), box (3, 2, 1, 6, 6, 3); cyst 2 later takes 4 of them
- tumour 2: all three: z 7..10, y 8..12, x 4..5 -> (7, 8, 4, 11, 13, 6)
- tumour 3: a1 and a2: z 7..10, y 6..7, x 4..5, touching tumour 2 -> its own instance (7, 6, 4, 11, 8, 6)
- tumour 4: only a1 marked z 10, y 0..1, x 0 (a2 and a3 files empty) -> no voxel reaches 2 votes: dropped
- cyst 1: all three: z 2..5, y 9..12, x 0..1 -> (2, 9, 0, 6, 13, 2), class cyst
- cyst 2: a2 and a3: z 5, y 2..3, x 1..2, inside tumour 1's voted voxels -> painted after the tumours, it takes
  them: cyst (5, 2, 1, 6, 4, 3); tumour 1 keeps 24 - 4 = 20 voxels and its box
- kidney 1: ignored
So the instances are, in order, tumours 1, 2, 3 (class 0) then cysts 1, 2 (class 1).

Aggregated majority map of case_00000 (for ``instances: aggregated``; 1 kidney, 2 tumour, 3 cyst):

- tumour A: block z 2..5, y 2..5, x 1..2 plus one voxel (6, 6, 3) touching it only at a corner
  -> 26-connected: one instance, box (2, 2, 1, 7, 7, 4); padded in-plane sides 6 x 0.78 = 4.68 mm > 3 mm
- tumour B: block z 7..10, y 8..12, x 4..5 -> box (7, 8, 4, 11, 13, 6)
- tumour speck C: voxel (10, 2, 0) -> padded sides 2 x 0.78 = 1.56 mm: dropped at 3 mm (box (10, 2, 0, 11, 3, 1))
- tumour sheet E: z 11 only, y 0..5, x 4..5 -> 1.56 mm along array axis z (a fine axis): dropped at 3 mm,
  although it spans 4.68 mm along y and 6 mm along the slice axis x (box (11, 0, 4, 12, 6, 6))
- cyst: block z 2..5, y 9..12, x 0..1 -> box (2, 9, 0, 6, 13, 2)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nifti_fixtures import boxes_and_classes, make_image, write_image
from pretrain_det3d.data.converters.base import ConversionError
from pretrain_det3d.data.converters.kits21 import KiTS21Converter
from pretrain_det3d.data.dataset_format import check_converted_dataset
from pretrain_det3d.data.io import read_case, read_dataset_json

SIZE_XYZ = (6, 14, 12)
SHAPE_ZYX = SIZE_XYZ[::-1]
SPACING_XYZ = (3.0, 0.78, 0.78)
ORIGIN_XYZ = (112.5, -20.0, 340.25)
DIRECTION = (0.0, 0.0, -1.0, 0.0, -1.0, 0.0, -1.0, 0.0, 0.0)

# per-instance annotations (instances: annotations)
BOX_T1 = (3, 2, 1, 6, 6, 3)
BOX_T2 = (7, 8, 4, 11, 13, 6)
BOX_T3 = (7, 6, 4, 11, 8, 6)
BOX_C1 = (2, 9, 0, 6, 13, 2)
BOX_C2 = (5, 2, 1, 6, 4, 3)
# aggregated map (instances: aggregated)
BOX_A = (2, 2, 1, 7, 7, 4)
BOX_B = (7, 8, 4, 11, 13, 6)
BOX_SPECK = (10, 2, 0, 11, 3, 1)
BOX_SHEET = (11, 0, 4, 12, 6, 6)
BOX_CYST = (2, 9, 0, 6, 13, 2)

Region = tuple[slice, slice, slice]
#: (structure, instance) -> the region each annotator 1, 2, 3 marked (None: that annotator's file is empty)
ANNOTATIONS: dict[tuple[str, int], tuple[Region | None, Region | None, Region | None]] = {
    ("kidney", 1): ((slice(1, 11), slice(1, 13), slice(0, 6)),) * 3,
    ("tumor", 1): ((slice(2, 6), slice(2, 6), slice(1, 3)), (slice(3, 7), slice(2, 6), slice(1, 3)),
                   (slice(0, 2), slice(0, 2), slice(0, 1))),
    ("tumor", 2): ((slice(7, 11), slice(8, 13), slice(4, 6)),) * 3,
    ("tumor", 3): ((slice(7, 11), slice(6, 8), slice(4, 6)),) * 2 + (None,),
    ("tumor", 4): ((slice(10, 11), slice(0, 2), slice(0, 1)), None, None),
    ("cyst", 1): ((slice(2, 6), slice(9, 13), slice(0, 2)),) * 3,
    ("cyst", 2): (None,) + ((slice(5, 6), slice(2, 4), slice(1, 3)),) * 2,
}


def _image(array_zyx: np.ndarray) -> sitk.Image:
    return make_image(array_zyx, SPACING_XYZ, ORIGIN_XYZ, DIRECTION)


def _ct(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(40, 300, SHAPE_ZYX).astype(np.float32)


def _majority_map(with_tumour_b: bool = True) -> np.ndarray:
    seg = np.zeros(SHAPE_ZYX, dtype=np.uint8)  # [Z, Y, X]
    seg[1:11, 1:13, 0:6] = 1  # kidney
    seg[2:6, 2:6, 1:3] = 2  # tumour A ...
    seg[6, 6, 3] = 2  # ... and its corner-touching voxel
    if with_tumour_b:
        seg[7:11, 8:13, 4:6] = 2
    seg[10, 2, 0] = 2  # speck
    seg[11, 0:6, 4:6] = 2  # sheet, thin along a fine axis
    seg[2:6, 9:13, 0:2] = 3  # cyst
    return seg


def _write_annotations(segmentations: Path) -> None:
    for (structure, instance), regions in ANNOTATIONS.items():
        for annotator, region in enumerate(regions, start=1):
            mask = np.zeros(SHAPE_ZYX, dtype=np.uint8)
            if region is not None:
                mask[region] = 1
            write_image(segmentations / f"{structure}_instance-{instance}_annotation-{annotator}.nii.gz", _image(mask))


@pytest.fixture
def kits_source(tmp_path: Path) -> Path:
    repo = tmp_path / "kits21"
    data = repo / "kits21" / "data"
    case = data / "case_00000"
    write_image(case / "imaging.nii.gz", _image(_ct(0)))
    _write_annotations(case / "segmentations")
    write_image(case / "aggregated_MAJ_seg.nii.gz", _image(_majority_map()))
    write_image(case / "aggregated_AND_seg.nii.gz", _image(_majority_map(with_tumour_b=False)))
    write_image(case / "aggregated_OR_seg.nii.gz", _image(_majority_map()))
    kidney_only = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    kidney_only[2:9, 2:9, 1:5] = 1
    write_image(data / "case_00002" / "imaging.nii.gz", _image(_ct(2)))
    for annotator in (1, 2, 3):
        write_image(data / "case_00002" / "segmentations" / f"kidney_instance-1_annotation-{annotator}.nii.gz",
                    _image(kidney_only))
    write_image(data / "case_00002" / "aggregated_MAJ_seg.nii.gz", _image(kidney_only))
    write_image(data / "case_00002" / "aggregated_AND_seg.nii.gz", _image(kidney_only))
    (data / "kits.json").write_text(json.dumps([{"case_id": "case_00000"}, {"case_id": "case_00002"}]))
    return repo


def test_instances_voted_per_annotated_instance(kits_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    KiTS21Converter().convert(kits_source, out, show_progress=False)
    summary = check_converted_dataset(out)
    assert summary.case_ids == ["case_00000", "case_00002"] and summary.class_names == ["tumour", "cyst"]
    assert boxes_and_classes(out, "case_00000") == ([BOX_T1, BOX_T2, BOX_T3, BOX_C1, BOX_C2], [0, 0, 0, 1, 1])
    instance_map = read_case(out, "case_00000").instance_map
    assert [int((instance_map == i).sum()) for i in range(1, 6)] == [20, 40, 16, 32, 4]
    # tumour 1's voxel (2, 3, 1) has one vote (annotator 1) only; cyst 2 took (5, 2, 1) from tumour 1
    assert instance_map[2, 3, 1] == 0 and instance_map[3, 3, 1] == 1 and instance_map[5, 2, 1] == 5
    assert boxes_and_classes(out, "case_00002") == ([], [])  # kidney only: a negative case
    record = read_dataset_json(out)["conversion"]
    assert record["instances"] == "annotations" and record["min_annotators"] == 2
    assert record["dropped"]["case_00000"] == [
        {"structure": "tumor", "instance": 4, "annotators": [1, 2, 3], "reason": "no voxel marked by >= 2 annotators"}]


def test_cysts_can_be_left_out_and_one_annotator_suffices_on_request(kits_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "no_cysts"
    KiTS21Converter({"include_cysts": False}).convert(kits_source, out, show_progress=False)
    assert check_converted_dataset(out).class_names == ["tumour"]
    # without cyst 2, tumour 1 keeps all 24 voted voxels; the box is the same
    assert boxes_and_classes(out, "case_00000") == ([BOX_T1, BOX_T2, BOX_T3], [0, 0, 0])
    assert int((read_case(out, "case_00000").instance_map == 1).sum()) == 24
    out = tmp_path / "any_annotator"
    KiTS21Converter({"min_annotators": 1}).convert(kits_source, out, show_progress=False)
    boxes, classes = boxes_and_classes(out, "case_00000")
    # tumour 1 is now a1 u a2 u a3: z 0..6, y 0..5, x 0..2; tumour 4 appears; cyst 2 (two annotators) unchanged
    assert boxes == [(0, 0, 0, 7, 6, 3), BOX_T2, BOX_T3, (10, 0, 0, 11, 2, 1), BOX_C1, BOX_C2]
    assert classes == [0, 0, 0, 0, 1, 1]


def test_size_filter_applies_to_voted_instances(kits_source: Path, tmp_path: Path) -> None:
    # padded in-plane sides (axes z, y; x is the 3 mm slice axis): tumour 3 spans 4 x 2 voxels -> y side
    # (2 + 1) x 0.78 = 2.34 mm, not > 3 mm; cyst 2 spans 1 x 2 -> z side 1.56 mm; tumour 1 spans 3 x 4 ->
    # 3.12 and 3.9 mm, kept (the old rule, n x spacing >= 3 mm, dropped it: 3 x 0.78 = 2.34)
    out = tmp_path / "converted"
    KiTS21Converter({"min_extent_mm": 3.0}).convert(kits_source, out, show_progress=False)
    assert boxes_and_classes(out, "case_00000") == ([BOX_T1, BOX_T2, BOX_C1], [0, 0, 1])
    dropped = read_dataset_json(out)["conversion"]["dropped"]["case_00000"]
    assert [(d["structure"], d["instance"], d["reason"]) for d in dropped] == [
        ("tumor", 3, "size filter"), ("tumor", 4, "no voxel marked by >= 2 annotators"), ("cyst", 2, "size filter")]
    assert dropped[0]["sides_mm"] == [3.9, 2.34, 9.0]  # x: 2 voxels of 3 mm, (2 + 1) x 3


def test_aggregated_rule_merges_touching_tumours(kits_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    KiTS21Converter({"instances": "aggregated"}).convert(kits_source, out, show_progress=False)
    assert check_converted_dataset(out).class_names == ["tumour", "cyst"]
    # no size filter by default: speck and sheet stay; cyst label 3 follows the tumours
    assert boxes_and_classes(out, "case_00000") == ([BOX_A, BOX_B, BOX_SPECK, BOX_SHEET, BOX_CYST], [0, 0, 0, 0, 1])
    out = tmp_path / "filtered"
    KiTS21Converter({"instances": "aggregated", "min_extent_mm": 3.0, "include_cysts": False}).convert(
        kits_source, out, show_progress=False)
    assert boxes_and_classes(out, "case_00000") == ([BOX_A, BOX_B], [0, 0])
    record = read_dataset_json(out)["conversion"]
    assert record["segmentation"] == "aggregated_MAJ_seg.nii.gz"
    assert [d["box"] for d in record["dropped"]["case_00000"]] == [list(BOX_SPECK), list(BOX_SHEET)]


def test_face_connectivity_splits_the_corner_voxel(kits_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    KiTS21Converter({"instances": "aggregated", "connectivity": 6, "include_cysts": False}).convert(
        kits_source, out, show_progress=False)
    boxes, _ = boxes_and_classes(out, "case_00000")
    assert boxes == [(2, 2, 1, 6, 6, 3), (6, 6, 3, 7, 7, 4), BOX_B, BOX_SPECK, BOX_SHEET]


def test_other_aggregation_can_be_chosen(kits_source: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    KiTS21Converter({"instances": "aggregated", "segmentation": "aggregated_AND_seg.nii.gz", "min_extent_mm": 3.0,
                     "include_cysts": False}).convert(kits_source, out, show_progress=False)
    assert boxes_and_classes(out, "case_00000") == ([BOX_A], [0])


def test_geometry_is_kept_and_data_folder_found_from_any_level(kits_source: Path, tmp_path: Path) -> None:
    for level, source in enumerate((kits_source, kits_source / "kits21", kits_source / "kits21" / "data")):
        out = tmp_path / f"converted{level}"
        KiTS21Converter().convert(source, out, show_progress=False)
        converted = read_case(out, "case_00000")
        np.testing.assert_allclose(converted.spacing, SPACING_XYZ[::-1], rtol=1e-6)
        np.testing.assert_allclose(converted.origin, ORIGIN_XYZ, atol=1e-4)
        np.testing.assert_allclose(converted.direction, DIRECTION, atol=1e-6)
        np.testing.assert_allclose(converted.image[0], _ct(0), rtol=1e-6)


def test_missing_imaging_asks_for_get_imaging(kits_source: Path, tmp_path: Path) -> None:
    case = kits_source / "kits21" / "data" / "case_00001"
    _write_annotations(case / "segmentations")
    out = tmp_path / "converted"
    with pytest.raises(ConversionError, match=r"case_00001/imaging\.nii\.gz: CT volume is missing.*get_imaging"):
        KiTS21Converter().convert(kits_source, out, show_progress=False)
    assert not out.exists()


def test_bad_annotation_files_and_settings_are_refused(kits_source: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"'convert \(kits21\)\.include_cyst': unknown key; did you mean "
                                              r"'include_cysts'"):
        KiTS21Converter({"include_cyst": True})
    with pytest.raises(ConversionError, match=r"'convert \(kits21\)\.instances': Input should be "):
        KiTS21Converter({"instances": "majority"})
    segmentations = kits_source / "kits21" / "data" / "case_00000" / "segmentations"
    mask = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    mask[0, 0, 0] = 2
    write_image(segmentations / "tumor_instance-2_annotation-3.nii.gz", _image(mask))
    with pytest.raises(ConversionError, match=r"tumor_instance-2_annotation-3\.nii\.gz: annotation mask holds values "
                                              r"\[2\]"):
        KiTS21Converter().convert(kits_source, tmp_path / "converted", show_progress=False)
    shifted = make_image(np.zeros(SHAPE_ZYX, np.uint8), SPACING_XYZ, (0.0, 0.0, 0.0), DIRECTION)
    write_image(segmentations / "tumor_instance-2_annotation-3.nii.gz", shifted)
    with pytest.raises(ConversionError, match=r"tumor_instance-2_annotation-3\.nii\.gz: origin .* differs"):
        KiTS21Converter().convert(kits_source, tmp_path / "converted", show_progress=False)
    assert not (tmp_path / "converted").exists()


def test_unknown_label_value_in_aggregated_map_is_refused(kits_source: Path, tmp_path: Path) -> None:
    seg = _majority_map()
    seg[0, 0, 0] = 7
    write_image(kits_source / "kits21" / "data" / "case_00000" / "aggregated_MAJ_seg.nii.gz", _image(seg))
    with pytest.raises(ConversionError, match=r"aggregated_MAJ_seg\.nii\.gz: unknown label values \[7\]"):
        KiTS21Converter({"instances": "aggregated"}).convert(kits_source, tmp_path / "converted", show_progress=False)


def test_download_layout_with_publisher_image_names(kits_source: Path, tmp_path: Path) -> None:
    # what the workflow's download leaves: the repository archive unpacked into kits21/kits21-master/ and the CT
    # volumes under their server names master_{id}.nii.gz in the source root
    root = tmp_path / "raw_kits21"
    (root / "kits21").mkdir(parents=True)
    (kits_source).rename(root / "kits21" / "kits21-master")
    data = root / "kits21" / "kits21-master" / "kits21" / "data"
    for case in ("case_00000", "case_00002"):
        (data / case / "imaging.nii.gz").rename(root / f"master_{case[-5:]}.nii.gz")
    out = tmp_path / "converted"
    KiTS21Converter().convert(root, out, show_progress=False)
    assert check_converted_dataset(out).case_ids == ["case_00000", "case_00002"]
    assert boxes_and_classes(out, "case_00000") == ([BOX_T1, BOX_T2, BOX_T3, BOX_C1, BOX_C2], [0, 0, 0, 1, 1])
    np.testing.assert_allclose(read_case(out, "case_00000").image[0], _ct(0), rtol=1e-6)
