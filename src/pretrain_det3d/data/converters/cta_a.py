"""CTA-A (intracranial aneurysms, CT angiography; Zenodo record 6801398): NIfTI volumes with aneurysm masks.

NOTE: the record's file list could not be checked while this converter was written (no network, and no copy of
its description was found), so the layout below is the most defensible reading, not a verified one, and every
part of it is a setting that a user adjusts to the record's actual layout:

    {images_dir}/{case}{image_suffix}     CTA volume (default ``images/``, ``.nii.gz``)
    {labels_dir}/{case}{label_suffix}     aneurysm mask on the same grid (default ``labels/``, ``.nii.gz``)

Instances (setting ``instances``): ``components`` (default) makes each 26-connected component of the voxels
``> 0`` one aneurysm, as is usual when a mask marks several aneurysms with one value; ``values`` makes each
distinct positive label value one aneurysm (for masks that number their aneurysms). Every instance has class
``aneurysm``. The geometry of the NIfTI volume is kept; a mask whose grid differs from its image is an error.

Example:
    >>> CTAAConverter({"labels_dir": "masks"}).convert("raw/cta_a", "converted/cta_a")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pretrain_det3d.data.converters.base import CONVERTERS, ConvertedCase, ConversionError, DatasetConverter, case_from_sitk
from pretrain_det3d.data.converters.label_maps import read_nifti
from pretrain_det3d.settings.converters import CTAAConvertSettings

DEFAULTS = {key: CTAAConvertSettings.default(key) for key in CTAAConvertSettings.keys()}
INSTANCE_RULES = ("components", "values")
GEOMETRY_TOLERANCE = 1e-4  # relative, for spacing / origin / direction agreement of image and mask


def mask_to_instances(mask: np.ndarray, rule: str) -> np.ndarray:
    """Instance map ``[Z, Y, X]`` (1..N) from an aneurysm mask, by connected components or by label values.

    Example:
        >>> m = np.zeros((1, 1, 5), np.uint8); m[0, 0, [0, 1, 3]] = 1
        >>> mask_to_instances(m, "components")[0, 0].tolist()
        [1, 1, 0, 2, 0]
    """
    if rule == "components":
        labels, _ = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), dtype=bool))  # 26-connectivity
        return labels.astype(np.int16)
    if rule == "values":
        values = np.unique(mask[mask > 0])
        instance_map = np.zeros(mask.shape, dtype=np.int16)
        for instance_id, value in enumerate(values, start=1):
            instance_map[mask == value] = instance_id
        return instance_map
    raise ValueError(f"convert.instances must be one of {INSTANCE_RULES}, got {rule!r}")


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return a.GetSize() == b.GetSize() and all(
        np.allclose(x, y, rtol=GEOMETRY_TOLERANCE, atol=GEOMETRY_TOLERANCE)
        for x, y in ((a.GetSpacing(), b.GetSpacing()), (a.GetOrigin(), b.GetOrigin()), (a.GetDirection(), b.GetDirection())))


@CONVERTERS.register("cta_a")
class CTAAConverter(DatasetConverter):
    """Settings: ``images_dir``, ``labels_dir``, ``image_suffix``, ``label_suffix``, ``instances`` (see module doc)."""

    dataset_name = "cta_a"
    modalities = ("CT",)
    class_names = ("aneurysm",)
    licence = "as stated on Zenodo record 6801398 (not verified offline)"
    source = "https://doi.org/10.5281/zenodo.6801398"

    def option(self, key: str) -> str:
        return str(self.settings.get(key, DEFAULTS[key]))

    def _pair(self, source_dir: Path, case_id: str) -> tuple[Path, Path]:
        return (source_dir / self.option("images_dir") / f"{case_id}{self.option('image_suffix')}",
                source_dir / self.option("labels_dir") / f"{case_id}{self.option('label_suffix')}")

    def list_cases(self, source_dir: Path) -> list[str]:
        images_dir, suffix = source_dir / self.option("images_dir"), self.option("image_suffix")
        if not images_dir.is_dir():
            raise ConversionError.for_file(images_dir, "image folder is missing (see convert.images_dir)")
        cases = sorted(p.name[: -len(suffix)] for p in images_dir.iterdir() if p.name.endswith(suffix))
        for case in cases:
            label = self._pair(source_dir, case)[1]
            if not label.is_file():
                raise ConversionError.for_file(label, f"mask of case {case!r} is missing (see convert.labels_dir)")
        return cases

    def load_case(self, source_dir: Path, case_id: str) -> ConvertedCase:
        image_file, label_file = self._pair(source_dir, case_id)
        image, mask = read_nifti(image_file), read_nifti(label_file)  # checked reads: truncation is an error
        if not _same_grid(image, mask):
            raise ConversionError.for_file(label_file, f"grid {mask.GetSize()} / spacing {mask.GetSpacing()} / origin "
                                                       f"{mask.GetOrigin()} differs from the image {image_file.name}")
        instance_map = mask_to_instances(sitk.GetArrayFromImage(mask), self.option("instances"))
        count = int(instance_map.max())
        return case_from_sitk(case_id, [image], instance_map, {i: 0 for i in range(1, count + 1)})

    def dataset_extra(self) -> dict:
        return {"conversion": {**{k: self.option(k) for k in DEFAULTS},
                               "note": "layout of Zenodo 6801398 assumed, see pretrain_det3d.data.converters.cta_a"}}
