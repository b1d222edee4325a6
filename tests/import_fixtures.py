"""Miniature copies of a user's own data in the two layouts the import converters read, written as real files:
an nnDetection task folder (``dataset.yaml``, ``raw_splitted/``) and an nnU-Net v2 dataset (``dataset.json``
with ``channel_names``, ``labels``, ``file_ending``). Geometry is anisotropic with flipped axes, so a converter
that dropped it would fail the format check or the extents worked out in the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nifti_fixtures import make_image, write_image

SPACING_XYZ = (0.8, 0.8, 2.5)
ORIGIN_XYZ = (10.0, -20.0, 30.0)
DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)
SHAPE_ZYX = (6, 12, 14)


def _volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 400, size=SHAPE_ZYX).astype(np.int16)


def _write(path: Path, array: np.ndarray) -> None:
    write_image(path, make_image(array, SPACING_XYZ, ORIGIN_XYZ, DIRECTION))


def write_nndetection_task(root: Path) -> Path:
    """``Task100_Demo``: two modalities (CT, PET), classes nodule/mass, two training cases, one test case.

    case_a's instance map holds ids 1 and 3 (a gap) and its JSON also lists id 4, which has no voxel:
    id 1 (class 1, mass) covers z 1, y 2..4, x 3..5; id 3 (class 0, nodule) the voxel z 4, y 9, x 10.
    case_b has no instance. Test case case_t: id 1 (class 0) at z 2..3, y 5, x 6..7.
    """
    task = root / "Task100_Demo"
    (task).mkdir(parents=True)
    (task / "dataset.yaml").write_text(
        "task: Task100_Demo\nname: Demo\ndim: 3\ntarget_class: 1\ntest_labels: true\n"
        "labels:\n  \"0\": nodule\n  \"1\": mass\nmodalities:\n  \"0\": CT\n  \"1\": PET\n")
    raw = task / "raw_splitted"
    a = np.zeros(SHAPE_ZYX, np.uint8)
    a[1, 2:5, 3:6] = 1
    a[4, 9, 10] = 3
    t = np.zeros(SHAPE_ZYX, np.uint8)
    t[2:4, 5, 6:8] = 1
    for folder, case, label, instances in (("Tr", "case_a", a, {"1": 1, "3": 0, "4": 0}),
                                           ("Tr", "case_b", np.zeros(SHAPE_ZYX, np.uint8), {}),
                                           ("Ts", "case_t", t, {"1": 0})):
        for channel in (0, 1):
            _write(raw / f"images{folder}" / f"{case}_{channel:04d}.nii.gz", _volume(channel + len(case)))
        _write(raw / f"labels{folder}" / f"{case}.nii.gz", label)
        (raw / f"labels{folder}" / f"{case}.json").write_text(json.dumps({"instances": instances}))
    return task


def write_nnunetv2_dataset(root: Path, name: str = "Dataset500_Demo") -> Path:
    """An nnU-Net v2 dataset: labels background 0, organ 1, tumour 2, cyst 3; two training cases, one labelled
    test case and one test image without a label.

    case_a: organ fills z 0, y 0..11, x 0..13; tumour A z 2..4, y 2..4, x 2..4 (3 x 3 x 3); tumour B the single
    voxel z 2, y 8, x 8; tumour C the voxels (z 4, y 8, x 11) and (z 5, y 9, x 12), touching by a corner only
    (one object with 26-connectivity, two with 6); cyst z 3, y 6..7, x 10..12.
    case_b: only organ. Test case case_t: tumour z 1..2, y 3..4, x 3..4.
    """
    dataset = root / name
    dataset.mkdir(parents=True)
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "tumour": 2, "cyst": 3},
        "numTraining": 2, "file_ending": ".nii.gz", "name": "Demo"}))
    a = np.zeros(SHAPE_ZYX, np.uint8)
    a[0] = 1
    a[2:5, 2:5, 2:5] = 2
    a[2, 8, 8] = 2
    a[4, 8, 11] = 2
    a[5, 9, 12] = 2
    a[3, 6:8, 10:13] = 3
    b = np.zeros(SHAPE_ZYX, np.uint8)
    b[0] = 1
    t = np.zeros(SHAPE_ZYX, np.uint8)
    t[1:3, 3:5, 3:5] = 2
    for folder, case, label in (("Tr", "case_a", a), ("Tr", "case_b", b), ("Ts", "case_t", t), ("Ts", "case_u", None)):
        _write(dataset / f"images{folder}" / f"{case}_0000.nii.gz", _volume(len(case)))
        if label is not None:
            _write(dataset / f"labels{folder}" / f"{case}.nii.gz", label)
    return dataset
