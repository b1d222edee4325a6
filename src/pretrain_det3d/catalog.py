"""Names the configuration may use, and the module that registers each one.

The workflow validates a config before it builds the DAG. Importing torch and MONAI for that would cost
seconds on every dry run, so the names live here, torch-free, and each entry says which module registers the
class. ``tests/test_catalog.py`` imports every module and checks that the registries and this catalog agree,
so a new detector or method is one registered class plus one line here.
"""

from __future__ import annotations

import importlib

#: detector name -> module whose import registers it in ``models.registry.DETECTORS``
DETECTOR_MODULES: dict[str, str] = {
    "retina_unet": "pretrain_det3d.models.retina_unet",
    "deformable_detr": "pretrain_det3d.models.deformable_detr",
    "retina_unet_native": "pretrain_det3d.models.native_retina_unet",
}

#: pre-training method name -> module whose import registers it in ``pretraining.METHODS``
PRETRAINING_MODULES: dict[str, str] = {
    "mae": "pretrain_det3d.pretraining.mae",
    "spark3d": "pretrain_det3d.pretraining.spark3d",
    "models_genesis": "pretrain_det3d.pretraining.models_genesis",
    "voco": "pretrain_det3d.pretraining.voco",
    "multitalent": "pretrain_det3d.pretraining.multitalent",
}

#: backbone preset names registered in ``models.backbone.BACKBONE_PRESETS``
BACKBONE_PRESETS: tuple[str, ...] = ("resenc_l", "resenc_small", "resenc_demo")

#: the dataset source that is generated instead of downloaded (any other source names an entry of `sources:`)
SYNTHETIC_SOURCE = "synthetic"

#: dataset converter name -> module whose import registers it in ``data.converters.CONVERTERS``
CONVERTER_MODULES: dict[str, str] = {
    "luna16": "pretrain_det3d.data.converters.luna16",
    "lidc": "pretrain_det3d.data.converters.lidc",
    "duke_breast": "pretrain_det3d.data.converters.duke_breast",
    "cta_a": "pretrain_det3d.data.converters.cta_a",
    "ribfrac": "pretrain_det3d.data.converters.ribfrac",
    "kits21": "pretrain_det3d.data.converters.kits21",
    "msd_pancreas": "pretrain_det3d.data.converters.msd_pancreas",
    "pn9": "pretrain_det3d.data.converters.pn9",
    # your own data: an nnDetection task folder, an nnU-Net v2 dataset
    "nndetection_task": "pretrain_det3d.data.converters.nndetection_task",
    "nnunetv2_dataset": "pretrain_det3d.data.converters.nnunetv2_dataset",
}

#: figures of the report (``analysis.outputs.FIGURES``): results/figures/{name}.png and .pdf
REPORT_FIGURES: tuple[str, ...] = (
    "ap_by_init", "change_vs_scratch", "detection_examples", "froc", "rank_distribution", "significance_map"
)

#: tables of the report (``analysis.outputs.TABLES``) -> the formats each is written in (results/tables/{name}.{fmt})
REPORT_TABLES: dict[str, tuple[str, ...]] = {
    "main_results_ranked": ("csv", "md", "tex"),
    "baseline_tests": ("csv", "md"),
    "pairwise_tests": ("csv", "md"),
}

#: outputs of the label-efficiency curves (``study.label_fractions``; also in ``analysis.outputs``), one per detector x
#: dataset: results/figures/label_efficiency/{detector}/{dataset}.png/.pdf and
#: results/tables/labels_saved/{detector}/{dataset}.{fmt}
LABEL_FRACTION_FIGURES: tuple[str, ...] = ("label_efficiency",)
LABEL_FRACTION_TABLES: dict[str, tuple[str, ...]] = {"labels_saved": ("csv", "md")}

#: the initialisation that needs no pre-training
SCRATCH = "scratch"


def import_detector(name: str) -> None:
    """Import the module that registers detector ``name`` (a no-op for unknown names)."""
    if name in DETECTOR_MODULES:
        importlib.import_module(DETECTOR_MODULES[name])


def import_pretraining_method(name: str) -> None:
    """Import the module that registers pre-training method ``name`` (a no-op for unknown names)."""
    if name in PRETRAINING_MODULES:
        importlib.import_module(PRETRAINING_MODULES[name])
