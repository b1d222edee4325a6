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
without nodules are kept as negatives.

``annotations_excluded.csv`` (the LIDC readers' other findings, which LUNA16's own score ignores; it comes in the
record's ``evaluationScript.zip``) is not used for the labels. The converter keeps it beside them, with the
reference nodules, for :mod:`pretrain_det3d.evaluation.luna16_cpm`: ``labelsTr/annotations.csv`` and
``labelsTr/annotations_excluded.csv`` hold the source's rows of the converted scans, as written there.

Example:
    >>> LUNA16Converter().convert("raw/luna16", "converted/luna16")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from pretrain_det3d.data.converters.base import CONVERTERS, ConvertedCase, ConversionError, DatasetConverter, case_from_sitk
from pretrain_det3d.data.errors import DatasetFormatError
from pretrain_det3d.data.io import LABELS_DIR, list_case_ids, read_image
from pretrain_det3d.settings.converters import LUNA16ConvertSettings

ANNOTATIONS_FILE = "annotations.csv"
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
#: where the scans lie relative to the source root (the subsets' zips hold a folder named like the zip)
DEFAULT_IMAGE_GLOBS = LUNA16ConvertSettings.default("image_globs")
DEFAULT_EXCLUDED_GLOB = LUNA16ConvertSettings.default("excluded_findings")
#: LUNA16's reference tables, kept in the converted dataset's labelsTr/ (rows of the converted scans only)
REFERENCE_ANNOTATIONS = "annotations.csv"
REFERENCE_EXCLUDED = "annotations_excluded.csv"


def reference_tables(converted_root: str | Path) -> tuple[Path, Path | None]:
    """The reference nodules and excluded findings a LUNA16 conversion kept (the second is None if it kept none).

    Example:
        >>> reference_tables("results/data/converted/luna16")  # doctest: +SKIP
        (PosixPath('.../labelsTr/annotations.csv'), PosixPath('.../labelsTr/annotations_excluded.csv'))
    """
    labels = Path(converted_root) / LABELS_DIR
    annotations, excluded = labels / REFERENCE_ANNOTATIONS, labels / REFERENCE_EXCLUDED
    if not annotations.is_file():
        raise ConversionError.for_file(annotations, "missing: LUNA16's score needs the reference nodules that the "
                                                    "luna16 converter keeps (convert the dataset again)")
    return annotations, excluded if excluded.is_file() else None


def find_excluded_findings(source_dir: Path, pattern: str) -> Path:
    """The one ``annotations_excluded.csv`` below ``source_dir`` matching ``pattern`` (identical copies count once)."""
    found = sorted(path for path in source_dir.glob(pattern) if path.is_file())
    if not found:
        raise ConversionError.for_file(
            source_dir, f"no file matches convert.excluded_findings {pattern!r}: LUNA16's excluded findings come in "
            "evaluationScript.zip of Zenodo record 3723295 (add it to the source's files:), or set "
            "convert.excluded_findings: null to convert without them (LUNA16's score then counts hits on them as "
            "false positives)")
    if len({path.read_bytes() for path in found}) > 1:
        raise ConversionError.for_file(found[0], f"differs from {found[1:]}; which excluded findings to use is "
                                                 "unclear: set convert.excluded_findings to one of them")
    return found[0]


def _copy_rows(source: Path, target: Path, seriesuids: set[str]) -> int:
    """Copy the header and the rows of ``seriesuids`` of a LUNA16 CSV, text unchanged; return the rows copied."""
    with open(source, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or any(c not in rows[0] for c in ANNOTATION_COLUMNS):
        raise ConversionError.for_file(source, f"missing columns; expected {list(ANNOTATION_COLUMNS)}")
    column = rows[0].index("seriesuid")
    kept = [row for row in rows[1:] if row and row[column] in seriesuids]
    with open(target, "w", newline="") as handle:
        csv.writer(handle).writerows([rows[0], *kept])
    return len(kept)


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
    """Settings: ``image_globs`` (list of glob patterns under the source root, default :data:`DEFAULT_IMAGE_GLOBS`),
    ``excluded_findings`` (glob of ``annotations_excluded.csv``, default :data:`DEFAULT_EXCLUDED_GLOB`; null: none)."""

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

    def write_extra_files(self, source_dir: Path, root: Path) -> None:
        """LUNA16's reference tables, restricted to the converted scans, into ``labelsTr/``."""
        pattern = self.settings.get("excluded_findings", DEFAULT_EXCLUDED_GLOB)
        excluded = find_excluded_findings(source_dir, pattern) if pattern is not None else None
        uids = set(list_case_ids(root))
        _copy_rows(source_dir / ANNOTATIONS_FILE, root / LABELS_DIR / REFERENCE_ANNOTATIONS, uids)
        if excluded is not None:
            _copy_rows(excluded, root / LABELS_DIR / REFERENCE_EXCLUDED, uids)
        self._reference = {"annotations": f"{LABELS_DIR}/{REFERENCE_ANNOTATIONS}",
                           "annotations_excluded": f"{LABELS_DIR}/{REFERENCE_EXCLUDED}" if excluded else None}

    def dataset_extra(self) -> dict:
        return {"conversion": "nodules of annotations.csv as spheres (diameter_mm) around world centres; "
                              "case id = seriesuid; geometry of the .mhd kept",
                "luna16_reference": getattr(self, "_reference", None)}
