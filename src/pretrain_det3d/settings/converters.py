"""Settings of the dataset converters: the ``convert:`` section of a dataset with a fetched source.

Each class documents the options of one converter (``data.converters.<name>``); the converter reads its
defaults from here, and both the dry run and the converter refuse unknown keys with them.

Example:
    >>> KiTS21ConvertSettings.parse({"min_extent_mm": "2"}, where="datasets.kits21.convert").min_extent_mm
    2.0
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, WithJsonSchema

from pretrain_det3d.settings.base import Settings
from pretrain_det3d.settings.training import registered

def _connectivity(value: int) -> int:
    if value not in (6, 18, 26):
        raise ValueError(f"must be 6, 18 or 26, got {value}")
    return value


#: 6-, 18- or 26-connectivity of connected components (an integer, so command-line strings convert)
Connectivity = Annotated[int, AfterValidator(_connectivity), WithJsonSchema({"enum": [6, 18, 26]})]


class LUNA16ConvertSettings(Settings):
    """LUNA16: MetaImage scans of the ten subsets plus annotations.csv."""

    image_globs: tuple[str, ...] = Field(("subset*/*.mhd", "subset*/subset*/*.mhd"),
                                         description="Where the scans lie below the source folder.")
    excluded_findings: str | None = Field(
        "**/annotations_excluded.csv", description="Glob (below the source folder) of LUNA16's excluded findings "
        "(evaluationScript.zip), kept beside the labels for LUNA16's own score; null: none.")


class LIDCConvertSettings(Settings):
    """LIDC-IDRI: DICOM series plus the readers' XML; one case per CT series, nodules by reader agreement."""

    voxel_agreement: float = Field(0.5, gt=0, le=1, description="Share of the four readers whose outlines must "
                                   "cover a voxel (nnDetection's LIDC preparation: mean of the readers' masks "
                                   ">= 0.5, i.e. 2 of 4).")
    min_overlap_voxels: int = Field(11, ge=1, description="Voxels two readers' nodules must share to be one "
                                    "nodule (MIC-DKFZ/LIDC-IDRI-processing, used by nnDetection: more than 10).")
    classes: Literal["nodule", "malignancy"] = Field("nodule", description="One class, or benign/malignant by the "
                                                     "mean malignancy rating >= 3 (nnDetection's LIDC classes).")
    malignancy_mean: Literal["four_readers", "marking_readers"] = Field(
        "four_readers", description="With classes 'malignancy': average over the four readers, those who did not "
        "mark the nodule counting 0 (nnDetection), or over the readers who rated it.")


class PN9ConvertSettings(Settings):
    """PN9: the publisher's 1 mm volumes (.npy) plus box annotations."""

    classes: Literal["nodule", "types"] = Field("nodule", description="One class, or the nine nodule types.")
    annotation_files: tuple[str, ...] = Field(("train_anno.csv", "test_anno.csv"), description="Box tables.")
    image_suffix: str = Field("_zoom.npy", description="Suffix of the volume files.")
    spacing_mm: float = Field(1.0, gt=0, description="Isotropic spacing the publisher resampled to.")
    exclude: tuple[str, ...] = Field((), description="Case ids to leave out.")


class RibFracConvertSettings(Settings):
    """RibFrac: NIfTI scans and instance labels plus the info CSVs."""

    classes: Literal["fracture", "types"] = Field("fracture", description="One class, or the four fracture types.")
    uncertain: Literal["fracture", "drop"] | None = Field(
        None, description="Instances of code -1: count as fractures or drop; default: 'fracture' with "
        "classes 'fracture', 'drop' with 'types'.")


class KiTS21ConvertSettings(Settings):
    """KiTS21: the kits21 repository's images and per-instance annotation files (or its aggregated maps)."""

    instances: Literal["annotations", "aggregated"] = Field(
        "annotations", description="Instances from segmentations/{tumor,cyst}_instance-k_annotation-a files "
        "voted per instance (nnDetection's KiTS21 preparation), or connected components of an aggregated map.")
    min_annotators: int = Field(2, ge=1, description="Annotators that must mark a voxel of an instance "
                                "(instances 'annotations'; KiTS21 has 3 per instance).")
    include_cysts: bool = Field(True, description="Cysts as a second class 'cyst' (nnDetection: yes).")
    segmentation: Literal["aggregated_MAJ_seg.nii.gz", "aggregated_AND_seg.nii.gz", "aggregated_OR_seg.nii.gz"] = \
        Field("aggregated_MAJ_seg.nii.gz", description="Aggregated segmentation to read (instances 'aggregated').")
    min_extent_mm: float = Field(0.0, ge=0, description="Size filter, nnDetection's convention: padded box sides "
                                 "(n+1) x spacing must exceed it off the slice axis; 0 keeps all (nnDetection).")
    connectivity: Connectivity = Field(26, description="Connectivity of the connected components (instances "
                                       "'aggregated').")


class MSDPancreasConvertSettings(Settings):
    """MSD Task07 Pancreas: tumours (label 2) as connected components."""

    min_extent_mm: float = Field(3.0, ge=0, description="Size filter, nnDetection's convention: padded box sides "
                                 "(n+1) x spacing must exceed it off the slice axis (nnDetection Task007: 3 mm).")
    connectivity: Connectivity = Field(26, description="Connectivity of the connected components.")


class DukeBreastConvertSettings(Settings):
    """Duke Breast Cancer MRI: DICOM series plus the annotation-box table."""

    sequences: tuple[str, ...] = Field(("post_1",), min_length=1, description="DCE sequences, one channel each.")
    index_base: int = Field(1, ge=0, le=1, description="Whether the box table counts rows, columns and slices from "
                                      "0 or 1.")


def _with_training_cases(subsets: tuple[str, ...]) -> tuple[str, ...]:
    if "train" not in subsets:
        raise ValueError(f"must include 'train' (the study trains on imagesTr), got {list(subsets)}")
    return subsets


class CTAAConvertSettings(Settings):
    """CTA-A (Zenodo 6801398): imagesTr/labelsTr plus the internal and external test folders."""

    subsets: Annotated[tuple[Literal["train", "internal_test", "external_test"], ...],
                       AfterValidator(_with_training_cases)] = Field(
        ("train", "internal_test", "external_test"), description="Which folders to convert: imagesTr (training "
        "cases, always), imagesTs_internal and imagesTs_external (held-out test cases).")
    instances: Literal["components", "values"] = Field("components", description="Instances as connected "
                                                       "components of the foreground, or one per label value.")
    connectivity: Connectivity = Field(6, description="Connectivity of the components (nnDetection's CTA "
                                       "preparation: 6).")
    strict: bool = Field(False, description="Stop at a case whose mask does not match its image instead of "
                         "skipping it (skipped cases are listed in conversion_report.json).")

    @property
    def writes_test_cases(self) -> bool:
        """Whether the conversion writes held-out test cases (a test subset is chosen)."""
        return any(subset != "train" for subset in self.subsets)


class NNDetectionTaskConvertSettings(Settings):
    """Your own data in nnDetection's raw format: a Task folder (dataset.json or dataset.yaml, raw_splitted/)."""

    raw_folder: str | None = Field(None, description="Folder of imagesTr/labelsTr below the source folder; "
                                   "default: raw_splitted if present, else the source folder itself.")
    test_cases: bool = Field(False, description="Convert the labelled imagesTs/labelsTs cases as held-out test "
                             "cases, scored as the study's test set (nnDetection's test_labels: true).")
    name: str | None = Field(None, description="Dataset name in the converted dataset.json; default: the task's.")
    licence: str = Field("not stated", description="Licence recorded in the converted dataset.json.")

    @property
    def writes_test_cases(self) -> bool:
        """Whether the conversion writes held-out test cases."""
        return self.test_cases


class NNUNetV2DatasetConvertSettings(Settings):
    """Your own data as an nnU-Net v2 dataset (dataset.json with channel_names, labels, file_ending)."""

    instances: Literal["components", "instance_map"] = Field(
        "components", description="Instances as connected components of the chosen labels (one class per label), "
        "or the label maps are instance maps already (each value one instance, one class).")
    classes: tuple[str, ...] = Field((), description="Label names of dataset.json to detect, one class each, in "
                                     "this order (instances 'components'); empty: every label but background.")
    class_name: str = Field("lesion", description="Name of the one class (instances 'instance_map').")
    connectivity: Connectivity = Field(26, description="Connectivity of the components (instances 'components').")
    min_extent_mm: float = Field(0.0, ge=0, description="Size filter, nnDetection's convention: padded box sides "
                                 "(n+1) x spacing must exceed it off the slice axis; 0 keeps all.")
    test_cases: bool = Field(False, description="Convert the imagesTs cases that have a label in labelsTs as "
                             "held-out test cases, scored as the study's test set.")
    name: str | None = Field(None, description="Dataset name in the converted dataset.json; default: the folder's.")
    licence: str = Field("not stated", description="Licence recorded in the converted dataset.json.")

    @property
    def writes_test_cases(self) -> bool:
        """Whether the conversion writes held-out test cases."""
        return self.test_cases


#: registered converter name -> its settings class (``catalog.CONVERTER_MODULES`` names the same converters)
CONVERTER_SETTINGS: dict[str, type[Settings]] = {
    "luna16": LUNA16ConvertSettings,
    "lidc": LIDCConvertSettings,
    "pn9": PN9ConvertSettings,
    "ribfrac": RibFracConvertSettings,
    "kits21": KiTS21ConvertSettings,
    "msd_pancreas": MSDPancreasConvertSettings,
    "duke_breast": DukeBreastConvertSettings,
    "cta_a": CTAAConvertSettings,
    "nndetection_task": NNDetectionTaskConvertSettings,
    "nnunetv2_dataset": NNUNetV2DatasetConvertSettings,
}


def converter_writes_test_cases(name: str, convert: dict | None) -> bool:
    """Whether converter ``name`` with the ``convert:`` settings ``convert`` writes held-out test cases
    (``imagesTs``/``labelsTs``); a settings class says so with a ``writes_test_cases`` property.

    Example:
        >>> converter_writes_test_cases("cta_a", {"subsets": ["train"]}), converter_writes_test_cases("cta_a", {})
        (False, True)
    """
    settings_class = CONVERTER_SETTINGS.get(name)
    if settings_class is None:
        return False
    return bool(getattr(settings_class.parse(convert or {}, where=f"convert ({name})"), "writes_test_cases", False))


def converter_settings_class(name: str, where: str = "datasets") -> type[Settings]:
    """The settings class of registered converter ``name``; unknown names are a ``ConfigError``."""
    return registered(CONVERTER_SETTINGS, name, where, "converter")
