"""Settings of datasets, the pre-training corpus, synthetic phantoms and preprocessing.

Example:
    >>> DatasetEntry.parse({"source": "synthetic", "synthetic": {"num_cases": 4, "shape": [48, 48, 48],
    ...                     "spacing": [2, 1.5, 1.5]}}, where="datasets.d").synthetic.num_cases
    4
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from pretrain_det3d.settings.base import Settings

Spacing = tuple[float, float, float]
Shape = tuple[int, int, int]


class SyntheticLesionsSettings(Settings):
    """A synthetic detection dataset of CT-like phantoms with lesions (``data.synthetic``)."""

    kind: Literal["lesions"] = Field("lesions", description="'lesions' (detection) or 'organs' (segmentation).")
    num_cases: int = Field(gt=0, description="Number of phantoms.")
    shape: Shape = Field(description="Volume shape [z, y, x] in voxels (each >= 8).")
    spacing: Spacing = Field(description="Voxel spacing [z, y, x] in mm.")
    num_classes: int = Field(1, ge=1, le=2, description="1: 'lesion'; 2: hyperdense round / hypodense elongated.")
    lesions_per_case: tuple[int, int] = Field((0, 4), description="[min, max] lesions per phantom.")
    lesion_diameter: tuple[float, float] = Field((3, 20), description="[min, max] lesion diameter in voxels.")
    spacing_jitter: float = Field(0.0, ge=0, lt=1, description="Relative per-case spacing jitter.")
    num_test_cases: int = Field(0, ge=0, description="Held-out test phantoms (imagesTs/labelsTs, their own seed "
                                "stream): predicted by the ensemble of a run's folds and scored as their own target.")

    @model_validator(mode="after")
    def _check(self) -> "SyntheticLesionsSettings":
        if min(self.shape) < 8:
            raise ValueError(f"shape must be [z, y, x] with each >= 8, got {list(self.shape)}")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {list(self.spacing)}")
        for key in ("lesions_per_case", "lesion_diameter"):
            low, high = getattr(self, key)
            if low < 0 or low > high:
                raise ValueError(f"{key} must be [min, max] with 0 <= min <= max, got {[low, high]}")
        return self


class SyntheticOrgansSettings(Settings):
    """A synthetic organ-segmentation dataset (for ``multitalent``; ``pretraining.multitalent``)."""

    kind: Literal["organs"] = Field(description="'organs'.")
    organs: list[Literal["soft_tissue", "liver", "lung", "spine"]] = Field(min_length=1,
                                                                          description="Organs annotated.")
    num_cases: int = Field(gt=0, description="Number of phantoms.")
    shape: Shape = Field(description="Volume shape [z, y, x] in voxels.")
    spacing: Spacing = Field(description="Voxel spacing [z, y, x] in mm.")


class SyntheticCorpusSettings(Settings):
    """An unlabelled synthetic pre-training corpus: the lesion phantoms without labels, another seed stream."""

    num_cases: int = Field(gt=0, description="Number of phantoms.")
    shape: Shape = Field(description="Volume shape [z, y, x] in voxels.")
    spacing: Spacing = Field(description="Voxel spacing [z, y, x] in mm.")
    name: str | None = Field(None, description="Case-id prefix; default: the corpus folder name.")
    lesions_per_case: tuple[int, int] = Field((0, 4), description="[min, max] lesions per phantom.")
    lesion_diameter: tuple[float, float] = Field((3, 20), description="[min, max] lesion diameter in voxels.")
    spacing_jitter: float = Field(0.0, ge=0, lt=1, description="Relative per-case spacing jitter.")


class PreprocessingSettings(Settings):
    """Preprocessing of a labelled dataset (``data.preprocessing.run_preprocessing``): nnDetection's plan through
    nnunetv2's functions (sources per key in docs/settings.md)."""

    target_spacing: Spacing | None = Field(None, description="Target spacing [z, y, x] mm; default: nnDetection's "
                                           "rule (the median; the coarse axis of an anisotropic dataset gets the "
                                           "10th percentile of its spacings).")
    force_separate_z: bool | None = Field(False, description="Resample the coarse axis separately with order 0 "
                                          "(nnU-Net's 'separate z'): false never (nnDetection), true always, "
                                          "null by nnU-Net's rule (an axis more than anisotropy_threshold times "
                                          "coarser than the finest).")
    anisotropy_threshold: float = Field(3.0, gt=1, description="Coarse/fine spacing ratio above which a dataset "
                                        "counts as anisotropic (target spacing rule, separate z).")
    num_workers: int = Field(1, gt=0, description="Worker processes (each holds one case at a time).")
    memory_gb: float | None = Field(None, gt=0, description="Memory (GiB) the workers' cases may use together; "
                                    "default: 80 % of the SLURM job's memory, else of the machine's.")
    foreground_intensity_samples: int = Field(10_000, gt=0, description="Foreground voxels sampled per case and "
                                              "channel for the CT intensity statistics.")
    foreground_locations: int = Field(1_000, ge=0, description="Foreground locations stored per case "
                                      "(for foreground oversampling).")
    split_seed: int = Field(12345, description="Seed of the cross-validation folds (nnU-Net's "
                            "generate_crossval_split).")
    splits_file: str | None = Field(None, description="Folds fixed elsewhere instead: nnDetection's "
                                    "splits_final.pkl or a JSON list of {train, val}; every case must be validated "
                                    "exactly once and the fold count must be study.num_folds.")


def _synthetic_kind(value: Any) -> str:
    """The ``kind`` of a synthetic section; without one it is a lesion dataset."""
    return value.get("kind", "lesions") if isinstance(value, dict) else getattr(value, "kind", "lesions")


#: the synthetic section of a dataset: its ``kind`` picks the class (an absent kind means ``lesions``)
SyntheticSettings = Annotated[
    Union[Annotated[SyntheticLesionsSettings, Tag("lesions")], Annotated[SyntheticOrgansSettings, Tag("organs")]],
    Discriminator(_synthetic_kind),
]


class CorpusPreprocessingSettings(Settings):
    """Preprocessing of the unlabelled corpus (``data.corpus``; nnssl's ``DefaultPreprocessor`` order: normalise
    each volume, then resample it)."""

    target_spacing: Spacing | Literal["median", "none"] | None = Field(
        None, description="Target spacing: 'median' (of the corpus; also null), 'none' (every volume keeps its "
        "own spacing) or [z, y, x] mm (nnssl's planner: [1, 1, 1]).")
    normalisation: Literal["auto", "zscore", "ct_body"] = Field(
        "auto", description="'zscore': per volume (nnssl's ZScoreNormalization); 'ct_body': clip to the 0.5 / 99.5 "
        "percentiles of voxels above -500 HU pooled over the corpus, then z-score with their mean and std; "
        "'auto': zscore for the folders, ct_rate and datasets sources, and for the synthetic source the scheme "
        "its modality names (CT: ct_body), as before real sources existed.")
    num_workers: int = Field(1, gt=0, description="Worker processes (per preprocessing job).")
    foreground_intensity_samples: int = Field(10_000, gt=0, description="Body voxels sampled per volume for "
                                              "the ct_body statistics.")
    modality: str = Field("CT", description="Modality recorded in the plan; for a synthetic corpus with "
                          "normalisation 'auto' also the scheme: 'CT' ct_body, anything else zscore.")
    seed: int = Field(0, description="Seed of the intensity sampling.")


class CtRateSettings(Settings):
    """A corpus from a Hugging Face dataset repository (``pretraining.corpus.ct_rate``; CT-RATE by default).

    The repository is gated: accept its terms on the Hub and give the token in the standard ``HF_TOKEN``
    environment variable (never in the config). Downloads resume; with ``HF_HUB_OFFLINE=1`` the cache is read
    without network."""

    repo_id: str = Field("ibrahimhamamci/CT-RATE", description="Dataset repository on the Hugging Face Hub.")
    revision: str = Field("main", description="Branch, tag or commit (a commit pins the corpus).")
    include: list[str] = Field(["dataset/train/**/*.nii.gz"], min_length=1,
                               description="Files to fetch (huggingface_hub allow_patterns, fnmatch: '*' also "
                               "matches '/'); the default is CT-RATE's training split.")
    max_files: int | None = Field(None, gt=0, description="Fetch only the first N matching files (sorted by "
                                  "path), for a smaller corpus; null: all.")
    cache_dir: str | None = Field(None, description="huggingface_hub cache folder (blobs + snapshots); default: "
                                  "{data_dir}/raw/corpus_{name}/huggingface. Point it at an existing cache to reuse "
                                  "its files.")
    num_workers: int = Field(8, gt=0, description="Parallel downloads.")


class DatasetEntry(Settings):
    """One dataset: generated (``source: synthetic``) or fetched from a ``sources`` entry and converted."""

    source: str = Field(description="'synthetic' or the name of an entry under 'sources'.")
    modality: str | None = Field(None, description="Imaging modality ('CT', 'MRI', ...).")
    seed: int | None = Field(None, description="Seed of the synthesis; default: the top-level seed.")
    converter: str | None = Field(None, description="Registered converter (datasets with a fetched source).")
    convert: dict[str, Any] = Field(default_factory=dict, description="Converter settings (each converter "
                                    "documents and checks its own; see docs/datasets.md).")
    synthetic: SyntheticSettings | None = Field(None, description="Phantom settings of a synthetic dataset.")
    preprocessing: PreprocessingSettings = Field(default_factory=PreprocessingSettings,
                                                 description="Preprocessing settings.")

    @model_validator(mode="after")
    def _source_matches(self) -> "DatasetEntry":
        if self.source == "synthetic" and self.synthetic is None:
            raise ValueError("a synthetic dataset needs a 'synthetic' section")
        if self.source != "synthetic" and self.converter is None:
            raise ValueError(f"dataset with source {self.source!r} needs a 'converter'")
        return self


class CorpusEntry(Settings):
    """The unlabelled pre-training corpus of the self-supervised methods (``data.corpus``)."""

    name: str = Field(description="Folder name of the corpus under the data directory.")
    source: Literal["synthetic", "folders", "ct_rate", "datasets"] = Field(
        description="Where the volumes come from: 'synthetic' phantoms, 'folders' of NIfTI / MHA / MHD / NRRD "
        "files and DICOM series, 'ct_rate' (a Hugging Face dataset repository), or 'datasets' (the images of "
        "the study's own datasets' training cases, labels unused).")
    seed: int | None = Field(None, description="Seed of the synthesis; default: the top-level seed + 1000.")
    synthetic: SyntheticCorpusSettings | None = Field(None, description="Phantom settings of a synthetic corpus.")
    folders: list[str] | None = Field(None, description="Source folders (searched recursively) of the 'folders' "
                                      "source.")
    ct_rate: CtRateSettings | None = Field(None, description="Repository, revision and files of the 'ct_rate' "
                                           "source (defaults: CT-RATE's training split).")
    datasets: list[str] | None = Field(None, description="Datasets (names under 'datasets') whose imagesTr "
                                       "volumes (every channel; never the held-out imagesTs) form the 'datasets' "
                                       "source.")
    shards: int = Field(1, ge=1, description="Preprocessing jobs (shard i takes every shards-th volume from i).")
    max_failure_fraction: float = Field(0.05, ge=0, le=1, description="Share of unreadable volumes above which "
                                        "the corpus fails (each failure is skipped and listed in failures.json).")
    preprocessing: CorpusPreprocessingSettings = Field(default_factory=CorpusPreprocessingSettings,
                                                       description="Preprocessing settings.")

    @model_validator(mode="after")
    def _source_section(self) -> "CorpusEntry":
        if self.source == "synthetic" and self.synthetic is None:
            raise ValueError("a synthetic corpus needs a 'synthetic' section")
        if self.source == "folders" and not self.folders:
            raise ValueError("source 'folders' needs 'folders': a list of folders to search")
        if self.source == "datasets" and not self.datasets:
            raise ValueError("source 'datasets' needs 'datasets': names of datasets under 'datasets'")
        return self  # 'ct_rate' without a section: CT-RATE's training split (CtRateSettings' defaults)
