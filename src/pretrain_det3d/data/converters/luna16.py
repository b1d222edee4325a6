"""LUNA16 (lung nodules in CT): MetaImage scans and ``annotations.csv`` of world-coordinate spheres.

Source layout (as the Zenodo records 3723295 and 4121926 unpack)::

    subset0/ ... subset9/        {seriesuid}.mhd + {seriesuid}.raw   (MetaImage, int16 HU)
    annotations.csv              seriesuid,coordX,coordY,coordZ,diameter_mm

``coordX/Y/Z`` are the nodule centre in world millimetres (the MetaImage ``Offset`` / ``TransformMatrix`` /
``ElementSpacing`` frame, x, y, z) and ``diameter_mm`` its diameter. Each nodule becomes a sphere: the voxels
whose centres lie within ``diameter_mm / 2`` of the centre (distances in mm, so anisotropic spacing and any
direction matrix are honoured; the direction is orthonormal, so ``|D (s * di)| = |s * di|``). A nodule smaller
than a voxel still marks the voxel that holds its centre. Where two spheres overlap, the voxel stays with the
first nodule in file order. Cases are named by their seriesuid (what LUNA16's evaluation expects); scans
without nodules are kept as negatives. ``annotations_excluded.csv`` (findings the LUNA16 evaluation ignores) is
not used for the labels.

Example:
    >>> LUNA16Converter().convert("raw/luna16", "converted/luna16")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from pretrain_det3d.data.converters.base import CONVERTERS, ConvertedCase, ConversionError, DatasetConverter, case_from_sitk
from pretrain_det3d.data.errors import DatasetFormatError
from pretrain_det3d.data.io import read_image
from pretrain_det3d.settings.converters import LUNA16ConvertSettings

ANNOTATIONS_FILE = "annotations.csv"
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
#: where the scans lie relative to the source root (the subsets' zips hold a folder named like the zip)
DEFAULT_IMAGE_GLOBS = LUNA16ConvertSettings.default("image_globs")


def read_luna16_annotations(path: str | Path) -> pd.DataFrame:
    """Read ``annotations.csv``, checking its columns; one row per nodule."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError.for_file(path, "LUNA16 annotations file is missing")
    table = pd.read_csv(path)
    missing = [c for c in ANNOTATION_COLUMNS if c not in table.columns]
    if missing:
        raise ConversionError.for_file(path, f"missing columns {missing}; expected {list(ANNOTATION_COLUMNS)}")
    if table["diameter_mm"].isna().any() or (table["diameter_mm"] <= 0).any():
        raise ConversionError.for_file(path, "diameter_mm must be a positive number in every row")
    return table


def sphere_mask(image: sitk.Image, centre_xyz_mm: tuple[float, float, float], diameter_mm: float) -> np.ndarray:
    """Boolean ``[Z, Y, X]`` mask of voxels whose centres lie within ``diameter_mm / 2`` of a world point.

    Example:
        >>> img = sitk.Image(8, 8, 8, sitk.sitkInt16)
        >>> int(sphere_mask(img, (4.0, 4.0, 4.0), 2.0).sum())  # centre voxel and its 6 neighbours
        7
    """
    centre_index = np.asarray(image.TransformPhysicalPointToContinuousIndex(
        tuple(float(c) for c in centre_xyz_mm)))[::-1]  # x,y,z -> z,y,x
    spacing = np.asarray(image.GetSpacing())[::-1]
    shape = np.asarray(image.GetSize())[::-1]
    radius = diameter_mm / 2.0
    grids = np.ogrid[tuple(slice(0, int(n)) for n in shape)]
    distance_sq = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre_index, spacing))
    mask = distance_sq <= radius ** 2
    if not mask.any():
        nearest = np.round(centre_index).astype(int)
        if np.all(nearest >= 0) and np.all(nearest < shape):
            mask[tuple(nearest)] = True  # a nodule smaller than a voxel keeps the voxel holding its centre
    return mask


@CONVERTERS.register("luna16")
class LUNA16Converter(DatasetConverter):
    """Settings: ``image_globs`` (list of glob patterns under the source root, default :data:`DEFAULT_IMAGE_GLOBS`)."""

    dataset_name = "luna16"
    modalities = ("CT",)
    class_names = ("nodule",)
    licence = "CC-BY-4.0 (LUNA16 Zenodo records 3723295 / 4121926; images from LIDC-IDRI, CC-BY-3.0)"
    source = "https://luna16.grand-challenge.org"

    def _images(self, source_dir: Path) -> dict[str, Path]:
        if not hasattr(self, "_image_cache"):
            found: dict[str, Path] = {}
            for pattern in self.settings.get("image_globs", DEFAULT_IMAGE_GLOBS):
                for path in sorted(source_dir.glob(pattern)):
                    if path.stem in found and found[path.stem] != path:
                        raise ConversionError.for_file(path, f"seriesuid {path.stem} also found at {found[path.stem]}")
                    found[path.stem] = path
            self._image_cache = found
            self._annotations = read_luna16_annotations(source_dir / ANNOTATIONS_FILE)
        return self._image_cache

    def list_cases(self, source_dir: Path) -> list[str]:
        return sorted(self._images(source_dir))

    def load_case(self, source_dir: Path, case_id: str) -> ConvertedCase:
        path = self._images(source_dir)[case_id]
        try:  # data.io's reader counts the voxel bytes of the .mhd/.raw pair before SimpleITK reads them
            image = read_image(path)
        except DatasetFormatError as error:
            raise ConversionError(str(error)) from None
        rows = self._annotations[self._annotations["seriesuid"] == case_id]
        instance_map = np.zeros(image.GetSize()[::-1], dtype=np.int16)  # [Z, Y, X]
        instances: dict[int, int] = {}
        for _, row in rows.iterrows():
            mask = sphere_mask(image, (row["coordX"], row["coordY"], row["coordZ"]), float(row["diameter_mm"]))
            mask &= instance_map == 0  # overlapping spheres: the earlier nodule keeps the voxel
            if not mask.any():
                raise ConversionError.for_file(
                    source_dir / ANNOTATIONS_FILE,
                    f"nodule of {case_id} at ({row['coordX']}, {row['coordY']}, {row['coordZ']}) lies outside the scan "
                    f"{path} or wholly inside another nodule")
            instance_id = len(instances) + 1
            instance_map[mask] = instance_id
            instances[instance_id] = 0
        return case_from_sitk(case_id, [image], instance_map, instances)

    def dataset_extra(self) -> dict:
        return {"conversion": "nodules of annotations.csv as spheres (diameter_mm) around world centres; "
                              "case id = seriesuid; geometry of the .mhd kept"}
