"""Predictions in LUNA16's own evaluation format: ``seriesuid,coordX,coordY,coordZ,probability`` (world mm).

LUNA16's evaluation script (``noduleCADEvaluationLUNA16.py``) reads one CSV of candidates for all scans; a
candidate counts as a hit when its world centre lies inside a reference nodule's sphere. Our predictions are
boxes in converted-image voxels (MONAI standard mode over array axes z, y, x, in the convention of
:mod:`pretrain_det3d.data.boxes`), so each box centre is mapped to world coordinates through the converted
image's own geometry (origin, spacing, direction), read from ``imagesTr/{case}_0000.nii.gz``. Box coordinates
are continuous voxel indices (voxel ``i``'s centre at ``i``; a mask's box is padded by one voxel on both sides,
which leaves its centre in place), so a box's centre ``(min + max) / 2`` is already SimpleITK's continuous
index. Only centres are exported (LUNA16 scores candidates by their centre); a diameter read off a box made
from a mask would be ``(max - min - 1) * spacing`` (``data.boxes.box_voxel_counts``).

Example:
    >>> export_luna16_csv("results/predictions/retina_unet/mae/luna16/fold0", "results/data/converted/luna16",
    ...                   ["1.3.6.1.4.1.14519.5.2.1.6279.6001.1008..."], "luna16_fold0.csv")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from pretrain_det3d.data.boxes import box_centre_indices
from pretrain_det3d.data.io import image_path
from pretrain_det3d.utils.atomic import atomic_path

LUNA16_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")


def box_centres_to_world(boxes: np.ndarray, image: sitk.Image) -> np.ndarray:
    """World centres ``[N, 3]`` (x, y, z mm) of boxes ``[N, 6]`` (z0, y0, x0, z1, y1, x1) in ``image``'s voxels.

    Example:
        >>> img = sitk.Image(4, 4, 4, sitk.sitkInt16); img.SetOrigin((10.0, 0.0, 0.0))
        >>> box_centres_to_world(np.array([[-1, -1, 0, 1, 1, 2]]), img).tolist()  # the box of voxel (z=0, y=0, x=1)
        [[11.0, 0.0, 0.0]]
    """
    centres_zyx = box_centre_indices(boxes)  # continuous voxel index of each box centre
    return np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in c[::-1]))
                     for c in centres_zyx]).reshape(-1, 3)


def _reference_image(converted_root: Path, case: str) -> sitk.Image:
    path = image_path(converted_root, case, 0)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: converted image of case {case!r} is missing (needed for its geometry)")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # geometry only; the voxels are not needed
    image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    image.SetOrigin(reader.GetOrigin())
    image.SetSpacing(reader.GetSpacing())
    image.SetDirection(reader.GetDirection())
    return image


def export_luna16_csv(
    predictions_dir: str | os.PathLike,
    converted_root: str | os.PathLike,
    case_ids: Sequence[str],
    out_csv: str | os.PathLike,
    seriesuids: Mapping[str, str] | None = None,
) -> int:
    """Write every case's predicted boxes as LUNA16 candidates; return the number of rows written.

    ``seriesuids`` maps case ids to LUNA16 seriesuids; by default the case id is the seriesuid (the LUNA16
    converter names cases so). Rows are sorted by case, then by decreasing probability.
    """
    predictions_dir, converted_root = Path(predictions_dir), Path(converted_root)
    rows: list[tuple[str, float, float, float, float]] = []
    for case in case_ids:
        path = predictions_dir / f"{case}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: predictions of case {case!r} are missing")
        record = json.loads(path.read_text())
        boxes = np.asarray(record.get("boxes", []), dtype=np.float64).reshape(-1, 6)
        scores = np.asarray(record.get("scores", []), dtype=np.float64).reshape(-1)
        if len(boxes) != len(scores):
            raise ValueError(f"{path}: {len(boxes)} boxes but {len(scores)} scores")
        centres = box_centres_to_world(boxes, _reference_image(converted_root, case))
        uid = (seriesuids or {}).get(case, case)
        for index in np.argsort(-scores, kind="stable"):
            x, y, z = centres[index]
            rows.append((uid, float(x), float(y), float(z), float(scores[index])))
    with atomic_path(out_csv) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(LUNA16_COLUMNS)
            writer.writerows((uid, f"{x:.6f}", f"{y:.6f}", f"{z:.6f}", f"{p:.6f}") for uid, x, y, z, p in rows)
    return len(rows)
