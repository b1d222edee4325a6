"""MultiTalent: supervised multi-dataset segmentation pre-training (Ulrich et al., MICCAI 2023), as the v2 code
behind the authors' ResEnc-L checkpoint (``MIC-DKFZ/ResEncL-MissingPiece-MultiTalent``).

Several labelled segmentation datasets, each annotating its own classes, train one ResEnc U-Net: the encoder and
decoder are shared, every dataset has its own segmentation head (and, by default, its own input stem), so a case
is only ever asked about the classes its dataset annotates. What follows the authors' v2 code (MIC-DKFZ/MultiTalent
``multitalent/training/nnUNetTrainer/project_specific/MultiTalent_native/MultiTalent_trainer.py`` and
``MultiTalent_multistem.py``, ``multitalent/utilities/MultiTalent/``):

- heads: one head per dataset, a 1x1x1 conv per decoder resolution (``decoder.seg_layers.<head>.<stage>``); a
  dataset with more than ``max_classes_per_head`` classes (the release: 20) gets one head per group of that many
  classes, ids ``<dataset>_<group>`` (the release's ``351_0``), classes of other groups count as background there.
  A sample runs only through its own head, so a head gets gradients only from its own dataset's cases;
- loss (``loss: ce``, the release's ``DC_and_CE_loss`` for label datasets): per sample, softmax cross-entropy over
  the head's classes plus background, and soft Dice over its foreground classes (nnU-Net's
  ``MemoryEfficientSoftDiceLoss``: smooth 0, denominator clipped at 1e-8, mean over classes), each weight 1; the
  batch loss is the *sum* over samples, as the release adds up the per-sample losses. ``loss: bce`` is the first
  MultiTalent paper's variant: one sigmoid per class, BCE + Dice over all of the head's channels;
- deep supervision: every decoder resolution has an output; weights ``1/2^i`` (``i = 0`` the full resolution),
  the lowest resolution 0, normalised to sum 1; targets are the label map resized with nearest-exact
  interpolation (batchgeneratorsv2's ``DownsampleSegForDSTransform``); zero-weight outputs are not computed;
- sampling: a case of dataset ``d`` (``n_d`` cases) is drawn with probability proportional to
  ``n_d ** -case_weight_exponent`` (the release: ``1 / sqrt(n_d)``), so dataset ``d`` is drawn with probability
  ``sqrt(n_d) / sum_j sqrt(n_j)``: small datasets are seen more often than their share of cases, large ones
  less, but a larger dataset is still seen more often than a smaller one. A split dataset's groups are then drawn
  uniformly. Each sample independently is a foreground sample with probability ``foreground_fraction`` (0.33,
  the release's probabilistic oversampling): a class of the head present in the case is drawn uniformly, then one
  of its voxels (up to 10,000 kept per class and case, as nnU-Net's ``class_locations``) becomes the patch centre;
- stems (``stems: per_dataset``, the release's multi-stem network): one stem per head, ``encoder.stem.<head>``.

Checkpoint (nnssl's schema, ``models.checkpoint``): ``network_weights`` holds every tensor of the network
(``encoder.stem.<head>.convs.0.{conv,norm}.{weight,bias}`` and their ``all_modules.{0,1}`` aliases per stem,
``encoder.stages.*``, ``decoder.*`` with ``decoder.seg_layers.<head>.<stage>.{weight,bias}``, and the decoder's
``decoder.encoder.*`` alias of the encoder as in every ``dynamic_network_architectures`` U-Net);
``nnssl_adaptation_plan.key_to_stem`` is ``encoder.stem.<default_stem>`` and ``keys_to_in_proj`` its
``convs.0.conv`` / ``convs.0.all_modules.0``, as the authors' file names ``encoder.stem.351_0``, so a loader
reads ours like theirs, and any other stem is chosen by its prefix (the release's ``stem_override``, e.g.
``encoder.stem.004``). With ``stems: shared`` the stem is ``encoder.stem`` as for every other method. The plan's
``multitalent`` entry lists the heads (dataset, classes) and stems.

Data: each entry of ``settings["datasets"]`` is ``{"name": str, "root": path, "classes": [names]}`` where
``root`` is a *preprocessed* dataset folder (``plan.json`` + ``cases/``, what
``data.preprocessing.run_preprocessing`` writes from a dataset in the converted format). The semantic label of
a voxel is the class of the instance it belongs to (``cases/{case}_seg.npy`` + ``cases/{case}.json``), so a
segmentation dataset in the converted format stores each labelled structure as an instance of its class.
``classes`` (default: every class of the dataset's ``plan.json``) picks the classes learnt; a class left out
counts as background. All cases of every dataset are used; the corpus of the other methods is not read.

For the demo, :func:`write_synthetic_organ_dataset` writes organ segmentation datasets in the converted format
from the synthetic phantoms (``soft_tissue``, ``liver``, ``lung``, ``spine`` compartments).

Example:
    >>> settings = {"preset": "resenc_demo", "patch_size": [32, 32, 32], "iterations": 100, "datasets": [
    ...     {"name": "organs_a", "root": "results/data/preprocessed/organs_a", "classes": ["liver", "lung"]},
    ...     {"name": "organs_b", "root": "results/data/preprocessed/organs_b", "classes": ["lung", "spine"]}]}
    >>> run_pretraining(None, "multitalent", settings, "results/pretrain/multitalent/checkpoint_final.pth",
    ...                 seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pretrain_det3d.models.checkpoint import adaptation_plan, multitalent_stem_prefix
from pretrain_det3d.pretraining.trainer import METHODS, PretrainingTrainer
from pretrain_det3d.settings.pretraining import MultiTalentSettings
from pretrain_det3d.settings.pretraining import training_defaults as method_training_defaults
from pretrain_det3d.training.dataloader import (
    CaseRecord,
    PatchBatchStream,
    choose_patch_centre,
    load_case_records,
    read_region,
    IMAGE_PAD_VALUE,
    SEG_PAD_VALUE,
)
from pretrain_det3d.utils.atomic import save_torch

DATASETS_KEY = "datasets"
CASE_SEPARATOR = "/"  # record case ids are "{dataset}/{case}": case ids of different datasets may coincide
# a head id is a state-dict key segment (encoder.stem.<id>, decoder.seg_layers.<id>): no "." inside
FORBIDDEN_NAME_CHARACTERS = (CASE_SEPARATOR, ".")
PLAN_FILE = "plan.json"
LOSSES = ("ce", "bce")
STEM_CHOICES = ("per_dataset", "shared")
DICE_DENOMINATOR_MIN = 1e-8  # nnU-Net's MemoryEfficientSoftDiceLoss (smooth 0) clips its denominator here
MAX_CLASS_VOXELS = 10_000  # nnU-Net keeps up to 10,000 voxels per class as foreground-sampling locations

# ---- synthetic organ datasets (demo) ---------------------------------------------------------------------
#: organ name -> compartment labels of ``data.synthetic``'s anatomy (1 body soft tissue, 2 liver, 3 and 4 the
#: lungs, 5 the spine); each compartment becomes one instance of its organ's class
ORGAN_COMPARTMENTS: dict[str, tuple[int, ...]] = {"soft_tissue": (1,), "liver": (2,), "lung": (3, 4), "spine": (5,)}
ORGAN_STREAM = 2  # seed stream of organ datasets (0 and 1 are the lesion dataset and the corpus)
REPLAY_TOLERANCE_HU = 60.0  # mean |phantom - anatomy| outside lesions; the phantom's noise std is 8-20 HU
ORGAN_LICENCE = "CC0-1.0 (synthetic phantoms generated by pretrain_det3d)"


# ---- datasets and heads ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelledDataset:
    """One dataset of the MultiTalent mix: where it lives, its classes (``class_names``, the plan's class-index
    order) and those learnt (``classes``, in the settings' order)."""

    name: str
    root: Path
    classes: tuple[str, ...]
    class_names: tuple[str, ...]
    case_ids: tuple[str, ...]
    num_input_channels: int


@dataclass(frozen=True)
class HeadSpec:
    """One segmentation head: a dataset, or one group of classes of a dataset with many classes.

    ``class_labels[c]`` is the label of the dataset's class index ``c`` in this head (``k + 1`` for
    ``classes[k]``; 0, background, for a class the head does not learn).
    """

    id: str
    dataset: int
    classes: tuple[str, ...]
    class_labels: tuple[int, ...]


def _read_plan(root: Path, where: str) -> dict[str, Any]:
    path = root / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {where}.root must be a preprocessed dataset folder (no {PLAN_FILE})")
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: is not valid JSON ({error})") from None
    if not isinstance(plan, dict) or not all(isinstance(plan.get(key), list) and plan[key]
                                             for key in ("class_names", "modalities")):
        raise ValueError(f"{path}: not a preprocessing plan with non-empty 'class_names' and 'modalities' lists")
    return plan


def parse_datasets(settings: Mapping[str, Any]) -> list[LabelledDataset]:
    """Validate ``settings["datasets"]`` and read each dataset's plan.

    Example:
        >>> [d.classes for d in parse_datasets({"datasets": [
        ...     {"name": "a", "root": "pre/a", "classes": ["liver", "lung"]},
        ...     {"name": "b", "root": "pre/b"}]})]  # doctest: +SKIP
        [('liver', 'lung'), ('lung', 'spine')]
    """
    entries = settings.get(DATASETS_KEY)
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ValueError(f"settings key {DATASETS_KEY!r} must be a non-empty list of {{name, root, classes}}")
    datasets: list[LabelledDataset] = []
    for index, entry in enumerate(entries):
        where = f"{DATASETS_KEY}[{index}]"
        if not isinstance(entry, Mapping) or "name" not in entry or "root" not in entry:
            raise ValueError(f"settings key {where} must be a mapping with 'name' and 'root', got {entry!r}")
        name = str(entry["name"])
        if not name or any(ch in name for ch in FORBIDDEN_NAME_CHARACTERS) or any(d.name == name for d in datasets):
            raise ValueError(f"settings key {where}.name must be unique, non-empty and free of "
                             f"{' and '.join(repr(c) for c in FORBIDDEN_NAME_CHARACTERS)}, got {name!r}")
        root = Path(entry["root"])
        plan = _read_plan(root, where)
        available = [str(c) for c in plan["class_names"]]
        classes = [str(c) for c in entry.get("classes") or available]
        unknown = [c for c in classes if c not in available]
        if unknown or len(set(classes)) != len(classes):
            raise ValueError(f"settings key {where}.classes must name distinct classes of {root / PLAN_FILE} "
                             f"{available}, got {classes}")
        case_ids = plan.get("case_ids") or sorted(
            p.stem for p in (root / "cases").glob("*.npy") if not p.stem.endswith("_seg")
        )
        datasets.append(LabelledDataset(
            name=name, root=root, classes=tuple(classes), class_names=tuple(available),
            case_ids=tuple(str(c) for c in case_ids), num_input_channels=len(plan["modalities"]),
        ))
    channels = {d.num_input_channels for d in datasets}
    if len(channels) != 1:
        raise ValueError(f"settings key {DATASETS_KEY!r}: datasets must share one number of input channels, got "
                         f"{ {d.name: d.num_input_channels for d in datasets} }")
    return datasets


def plan_heads(datasets: Sequence[LabelledDataset], max_classes_per_head: int) -> list[HeadSpec]:
    """One head per dataset, or one per group of ``max_classes_per_head`` classes (ids ``<name>_<group>``).

    Example:
        >>> d = LabelledDataset("351", Path("x"), ("a", "b", "c"), ("c", "b", "a"), (), 1)
        >>> [(h.id, h.classes, h.class_labels) for h in plan_heads([d], 2)]
        [('351_0', ('a', 'b'), (0, 2, 1)), ('351_1', ('c',), (1, 0, 0))]
    """
    if max_classes_per_head < 1:
        raise ValueError(f"settings key 'max_classes_per_head' must be >= 1, got {max_classes_per_head}")
    heads: list[HeadSpec] = []
    for index, dataset in enumerate(datasets):
        size = int(max_classes_per_head)
        groups = [dataset.classes[i:i + size] for i in range(0, len(dataset.classes), size)]
        for number, group in enumerate(groups):
            head_id = dataset.name if len(groups) == 1 else f"{dataset.name}_{number}"
            labels = tuple(group.index(c) + 1 if c in group else 0 for c in dataset.class_names)
            heads.append(HeadSpec(head_id, index, tuple(group), labels))
    ids = [h.id for h in heads]
    clashes = sorted({i for i in ids if ids.count(i) > 1})
    if clashes:
        raise ValueError(f"settings key {DATASETS_KEY!r}: head ids {clashes} occur twice (a dataset named like "
                         f"another's class group '<name>_<group>'); rename one dataset")
    return heads


def head_lookup(instances: Mapping[int, int], class_labels: Sequence[int]) -> torch.Tensor:
    """Label in one head of every instance id ``[max_id + 1]`` (0 for id 0 and classes the head does not learn).

    Example:
        >>> head_lookup({1: 0, 2: 1, 3: 0}, class_labels=(2, 0)).tolist()
        [0, 2, 0, 2]
    """
    lookup = torch.zeros(max(instances, default=0) + 1, dtype=torch.long)
    for instance_id, class_index in instances.items():
        if not 0 <= class_index < len(class_labels):
            raise ValueError(f"instance {instance_id} has class {class_index}, outside the dataset's "
                             f"{len(class_labels)} classes")
        lookup[instance_id] = class_labels[class_index]
    return lookup


# ---- sampling --------------------------------------------------------------------------------------------
def case_probabilities(dataset_of_case: Sequence[int], exponent: float) -> np.ndarray:
    """Probability of drawing each case: ``n_d ** -exponent`` for a case of dataset ``d`` (``n_d`` cases),
    normalised; dataset ``d`` then has probability ``n_d ** (1 - exponent) / sum_j n_j ** (1 - exponent)``.

    Example:
        >>> case_probabilities([0, 0, 0, 0, 1], 0.5).round(4).tolist()  # 1/sqrt(4) = 0.5 and 1/sqrt(1) = 1
        [0.1667, 0.1667, 0.1667, 0.1667, 0.3333]
    """
    datasets = np.asarray(dataset_of_case, dtype=np.int64)
    if datasets.size == 0:
        raise ValueError("no cases to sample from")
    counts = np.bincount(datasets)
    weights = counts[datasets].astype(np.float64) ** -float(exponent)
    return weights / weights.sum()


def clamp_centre(voxel: Sequence[int], shape: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
    """Centre a patch on ``voxel``, moved just enough that the patch stays inside the case (an axis shorter than
    the patch: the middle), the range :func:`choose_patch_centre` draws from.

    Example:
        >>> clamp_centre((1, 30, 5), (40, 40, 6), (16, 16, 16)).tolist()
        [8, 30, 3]
    """
    centre = np.empty(3, dtype=np.int64)
    for axis, (position, extent, size) in enumerate(zip(voxel, shape, patch_size)):
        lo, hi = size // 2, extent - (size - size // 2)
        centre[axis] = extent // 2 if hi < lo else min(max(int(position), lo), hi)
    return centre


class MultiTalentPatchStream(PatchBatchStream):
    """Batches of MultiTalent samples: a case by :func:`case_probabilities`, one of its dataset's heads uniformly,
    a foreground sample with probability ``foreground_fraction``; every sample a pure function of
    ``(seed, batch_index, sample_index)`` as in :class:`PatchBatchStream`.

    A batch holds ``images [B, C, Z, Y, X]``, ``labels [B, Z, Y, X]`` (each sample's labels in its own head:
    0 background, ``k + 1`` the head's class ``k``), ``heads [B]`` (head indices), ``instance_maps``,
    ``case_ids``, ``foreground_sampled`` and ``origins``.
    """

    def __init__(
        self,
        records: Sequence[CaseRecord],
        dataset_of_case: Sequence[int],
        heads: Sequence[HeadSpec],
        case_weight_exponent: float,
        patch_size: Sequence[int],
        batch_size: int,
        seed: int,
        foreground_fraction: float,
        augmentation: Any = None,
        start_batch: int = 0,
        num_batches: int | None = None,
        memory_map: bool = True,
    ) -> None:
        super().__init__(records, patch_size, batch_size, seed, foreground_fraction=foreground_fraction,
                         augmentation=augmentation, start_batch=start_batch, num_batches=num_batches,
                         with_labels=True, memory_map=memory_map)
        if len(dataset_of_case) != len(self.records):
            raise ValueError(f"{len(dataset_of_case)} dataset indices for {len(self.records)} cases")
        self.dataset_of_case = [int(d) for d in dataset_of_case]
        self.heads = list(heads)
        self.heads_of_dataset = {d: [i for i, h in enumerate(self.heads) if h.dataset == d]
                                 for d in set(self.dataset_of_case)}
        headless = sorted(d for d, options in self.heads_of_dataset.items() if not options)
        if headless:
            raise ValueError(f"datasets {headless} have cases but no head")
        self.case_cdf = np.cumsum(case_probabilities(self.dataset_of_case, case_weight_exponent))
        self._class_voxels: dict[tuple[int, int], np.ndarray] = {}

    def choose(self, rng: np.random.Generator) -> tuple[int, int, bool]:
        """``(case index, head index, foreground)`` of one sample."""
        case = min(int(np.searchsorted(self.case_cdf, rng.random() * self.case_cdf[-1], side="right")),
                   len(self.records) - 1)
        options = self.heads_of_dataset[self.dataset_of_case[case]]
        head = options[int(rng.integers(len(options)))]
        return case, head, bool(rng.random() < self.foreground_fraction)

    def class_voxels(self, case_index: int, class_index: int) -> np.ndarray:
        """Voxels ``[N, 3]`` of dataset class ``class_index`` in a case: all of them, or a fixed random subset of
        ``MAX_CLASS_VOXELS`` (seeded by case and class, so every process keeps the same ones)."""
        key = (case_index, class_index)
        if key not in self._class_voxels:
            record = self.records[case_index]
            seg = self.open_array(record.seg_path)
            found = []
            for instance_id, extent in zip(record.object_ids, record.object_extents):
                if record.instances.get(int(instance_id)) != class_index:
                    continue
                window = tuple(slice(int(a), int(b)) for a, b in zip(extent[:3], extent[3:]))
                found.append(np.argwhere(np.asarray(seg[window]) == instance_id) + extent[:3])
            voxels = np.concatenate(found) if found else np.zeros((0, 3), dtype=np.int64)
            if len(voxels) > MAX_CLASS_VOXELS:
                rng = np.random.default_rng([zlib.crc32(record.case_id.encode()), class_index])
                voxels = voxels[np.sort(rng.choice(len(voxels), MAX_CLASS_VOXELS, replace=False))]
            self._class_voxels[key] = voxels
        return self._class_voxels[key]

    def sample(self, batch_index: int, sample_index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, batch_index, sample_index])
        case_index, head_index, foreground = self.choose(rng)
        record, head = self.records[case_index], self.heads[head_index]
        image_file = self.open_array(record.image_path)
        if image_file.ndim != 4:
            raise ValueError(f"{record.image_path}: expected a [C, Z, Y, X] array, got shape {image_file.shape}")
        shape = image_file.shape[1:]
        centre = None
        if foreground:
            present = sorted({c for c in record.instances.values()
                              if 0 <= c < len(head.class_labels) and head.class_labels[c] > 0})
            if present:  # nnU-Net: a class of the case uniformly, then one of its voxels uniformly
                voxels = self.class_voxels(case_index, present[int(rng.integers(len(present)))])
                if len(voxels):
                    centre = clamp_centre(voxels[int(rng.integers(len(voxels)))], shape, self.patch_size)
        if centre is None:  # a background sample, or a case without any of the head's classes
            foreground = False
            centre = choose_patch_centre(shape, self.patch_size, rng)
        region = self.augmenter.input_size
        start = [int(c) - r // 2 for c, r in zip(centre, region)]
        image = torch.from_numpy(read_region(image_file, start, region, IMAGE_PAD_VALUE).astype(np.float32, copy=False))
        seg_file = self.open_array(record.seg_path)
        if seg_file.shape != shape:
            raise ValueError(f"{record.seg_path}: shape {seg_file.shape} differs from the image's {shape}")
        instance_map = torch.from_numpy(read_region(seg_file, start, region, SEG_PAD_VALUE).astype(np.int16))
        augment_seed = int(np.random.SeedSequence([self.seed, batch_index, sample_index, 1]).generate_state(1)[0])
        image, instance_map = self.augmenter(image, instance_map, augment_seed)
        lookup = head_lookup(record.instances, head.class_labels)
        ids = instance_map.long()
        if ids.numel() and int(ids.max()) >= len(lookup):
            raise ValueError(f"{record.seg_path}: instance id {int(ids.max())} has no class in {record.case_id}.json")
        return {
            "image": image, "case_id": record.case_id, "foreground_sampled": foreground, "head": head_index,
            "origin": [b + (r - p) // 2 for b, r, p in zip(start, region, self.patch_size)],
            "instance_map": instance_map, "labels": lookup[ids],
        }

    def make_batch(self, batch_index: int) -> dict[str, Any]:
        samples = [self.sample(batch_index, i) for i in range(self.batch_size)]
        return {
            "images": torch.stack([s["image"] for s in samples]),
            "labels": torch.stack([s["labels"] for s in samples]),
            "heads": torch.tensor([s["head"] for s in samples], dtype=torch.long),
            "instance_maps": torch.stack([s["instance_map"] for s in samples]),
            "case_ids": [s["case_id"] for s in samples],
            "foreground_sampled": torch.tensor([bool(s["foreground_sampled"]) for s in samples]),
            "origins": torch.tensor([s["origin"] for s in samples], dtype=torch.int64),
        }


# ---- network ---------------------------------------------------------------------------------------------
class MultiTalentUNet(nn.Module):
    """A ``dynamic_network_architectures`` ResEnc U-Net with one segmentation head per head id (and optionally one
    stem per head id): ``decoder.seg_layers.<head>.<stage>`` and ``encoder.stem.<head>``.

    ``forward(images, heads, levels)`` runs every sample through the shared trunk and its own stem and head and
    returns, per sample, the logits ``[1, K_head, ...]`` of each requested output level (0 = full resolution,
    ``i`` = the decoder output ``2^i`` coarser on strided axes), so heads with different class counts share a batch.

    Example:
        >>> from pretrain_det3d.models.backbone import build_resenc_unet
        >>> net = MultiTalentUNet(build_resenc_unet("resenc_demo", 1, 1), {"a": 3, "b": 2}, per_head_stems=True)
        >>> out = net(torch.zeros(2, 1, 16, 16, 16), torch.tensor([1, 0]), levels=[0, 1])
        >>> [tuple(o.shape) for o in out[0]], sorted(net.encoder.stem)
        ([(1, 2, 16, 16, 16), (1, 2, 8, 8, 8)], ['a', 'b'])
    """

    def __init__(self, unet: nn.Module, head_channels: Mapping[str, int], per_head_stems: bool) -> None:
        super().__init__()
        self.encoder = unet.encoder
        self.decoder = unet.decoder  # keeps its .encoder alias (decoder.encoder.* keys), as every dna U-Net
        self.head_ids = [str(h) for h in head_channels]
        template = unet.decoder.seg_layers  # one 1x1x1 conv per decoder stage, lowest resolution first
        self.decoder.seg_layers = nn.ModuleDict({
            head: nn.ModuleList([type(layer)(layer.in_channels, int(n), 1, 1, 0, bias=True) for layer in template])
            for head, n in head_channels.items()
        })
        if per_head_stems:
            stems = {}
            for head in self.head_ids:
                stem = copy.deepcopy(self.encoder.stem)
                for module in stem.modules():  # an independent initial draw per stem
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
                stems[head] = stem
            self.encoder.stem = nn.ModuleDict(stems)

    @property
    def num_outputs(self) -> int:
        """Number of output levels (decoder stages)."""
        return len(self.decoder.stages)

    def forward(self, images: torch.Tensor, heads: torch.Tensor, levels: Sequence[int] = (0,)) -> list[list[torch.Tensor]]:
        head_of = [int(h) for h in heads.tolist()]
        groups = {h: [b for b, hb in enumerate(head_of) if hb == h] for h in sorted(set(head_of))}
        if isinstance(self.encoder.stem, nn.ModuleDict):
            parts: list[torch.Tensor | None] = [None] * len(head_of)
            for h, members in groups.items():
                out = self.encoder.stem[self.head_ids[h]](images[members])
                for j, b in enumerate(members):
                    parts[b] = out[j:j + 1]
            x = torch.cat(parts)  # type: ignore[arg-type]
        else:
            x = self.encoder.stem(images)
        skips = []
        for stage in self.encoder.stages:
            x = stage(x)
            skips.append(x)
        features, below = [], skips[-1]
        for s in range(len(self.decoder.stages)):
            y = torch.cat((self.decoder.transpconvs[s](below), skips[-(s + 2)]), 1)
            below = self.decoder.stages[s](y)
            features.append(below)
        outputs: list[list[torch.Tensor]] = [[None] * len(levels) for _ in head_of]  # type: ignore[list-item]
        last = len(features) - 1
        for h, members in groups.items():
            layers = self.decoder.seg_layers[self.head_ids[h]]
            for j, level in enumerate(levels):
                logits = layers[last - level](features[last - level][members])
                for k, b in enumerate(members):
                    outputs[b][j] = logits[k:k + 1]
        return outputs


# ---- loss ------------------------------------------------------------------------------------------------
def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's deep-supervision weights: ``1/2^i`` for output ``i`` (0 = full resolution), the lowest resolution
    0, normalised to sum 1 (one output: weight 1).

    Example:
        >>> [round(w, 4) for w in deep_supervision_weights(3)]  # [1, 1/2, 0] / 1.5
        [0.6667, 0.3333, 0.0]
    """
    if num_outputs < 1:
        raise ValueError(f"need at least one output, got {num_outputs}")
    if num_outputs == 1:
        return [1.0]
    raw = [1.0 / 2**i for i in range(num_outputs)]
    raw[-1] = 0.0
    return [w / sum(raw) for w in raw]


def resize_labels(labels: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A label map ``[Z, Y, X]`` at ``shape`` by nearest-exact interpolation (batchgeneratorsv2's
    ``DownsampleSegForDSTransform``)."""
    if tuple(labels.shape) == tuple(shape):
        return labels
    return F.interpolate(labels[None, None].float(), size=tuple(shape), mode="nearest-exact")[0, 0].long()


def soft_dice(probabilities: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Dice per channel ``[K]`` of ``[K, ...]`` maps: ``2 sum(p t) / max(sum p + sum t, 1e-8)`` (smooth 0)."""
    axes = tuple(range(1, probabilities.ndim))
    intersection = (probabilities * onehot).sum(axes)
    total = probabilities.sum(axes) + onehot.sum(axes)
    return 2.0 * intersection / total.clamp_min(DICE_DENOMINATOR_MIN)


def segmentation_terms(logits: torch.Tensor, labels: torch.Tensor, loss: str = "ce") -> tuple[torch.Tensor, torch.Tensor]:
    """``(cross-entropy, 1 - mean Dice)`` of one sample's logits ``[1, K, ...]`` against labels ``[...]``.

    ``loss="ce"``: ``K = classes + 1``, softmax CE over all channels, Dice over the foreground channels
    ``1..K-1``. ``loss="bce"``: ``K = classes``, channel ``k`` is label ``k + 1``; BCE and Dice over all channels.

    Example:
        >>> ce, dice = segmentation_terms(torch.zeros(1, 2, 1, 1, 2), torch.tensor([[[0, 1]]]))
        >>> round(ce.item(), 4), round(dice.item(), 4)  # ln 2; Dice 2 * 0.5 / (1 + 1) = 0.5
        (0.6931, 0.5)
    """
    logits = logits.float()
    if loss == "ce":
        foreground = torch.arange(1, logits.shape[1], device=labels.device)
        onehot = (labels[None] == foreground.view(-1, *([1] * labels.ndim))).float()
        ce = F.cross_entropy(logits, labels[None])
        dice = soft_dice(torch.softmax(logits, 1)[0, 1:], onehot)
    elif loss == "bce":
        channels = torch.arange(1, logits.shape[1] + 1, device=labels.device)
        onehot = (labels[None] == channels.view(-1, *([1] * labels.ndim))).float()
        ce = F.binary_cross_entropy_with_logits(logits[0], onehot)
        dice = soft_dice(torch.sigmoid(logits[0]), onehot)
    else:
        raise ValueError(f"settings key 'loss' must be one of {LOSSES}, got {loss!r}")
    return ce, 1.0 - dice.mean()


def multitalent_losses(
    outputs: Sequence[Sequence[torch.Tensor]],
    labels: torch.Tensor,
    level_weights: Sequence[float],
    loss: str = "ce",
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Deep-supervised loss of a batch, summed over samples (the release adds the per-sample losses).

    ``outputs[b][j]`` are sample ``b``'s logits at level ``j`` (weight ``level_weights[j]``), ``labels [B, Z, Y,
    X]`` its full-resolution labels. Returns ``loss = ce_weight * ce + dice_weight * dice`` with ``ce`` and ``dice``
    the weighted sums of the terms of :func:`segmentation_terms`.
    """
    ce_total = labels.new_zeros((), dtype=torch.float32)
    dice_total = labels.new_zeros((), dtype=torch.float32)
    for sample_outputs, sample_labels in zip(outputs, labels):
        for logits, weight in zip(sample_outputs, level_weights):
            ce, dice = segmentation_terms(logits, resize_labels(sample_labels, logits.shape[2:]), loss)
            ce_total = ce_total + weight * ce
            dice_total = dice_total + weight * dice
    total = ce_weight * ce_total + dice_weight * dice_total
    return {"loss": total, "ce": ce_total, "dice": dice_total}


# ---- checkpoint ------------------------------------------------------------------------------------------
def multitalent_adaptation_plan(
    preset: str,
    in_channels: int,
    patch_size: Sequence[int],
    heads: Sequence[HeadSpec],
    datasets: Sequence[LabelledDataset],
    per_head_stems: bool,
    default_stem: str,
    loss: str = "ce",
    pretrain_plan: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """nnssl's adaptation plan of a MultiTalent checkpoint (``models.checkpoint.adaptation_plan``): with per-head
    stems ``key_to_stem`` names ``encoder.stem.<default_stem>`` and ``keys_to_in_proj`` that stem's first conv (the
    release's layout); ``multitalent`` (ignored by nnssl readers) lists heads, stems and the loss.

    Example:
        >>> d = LabelledDataset("a", Path("a"), ("x",), ("x",), (), 1)
        >>> plan = multitalent_adaptation_plan("resenc_demo", 1, [32] * 3, plan_heads([d], 20), [d], True, "a")
        >>> plan["key_to_stem"], plan["keys_to_in_proj"]
        ('encoder.stem.a', ['encoder.stem.a.convs.0.conv', 'encoder.stem.a.convs.0.all_modules.0'])
    """
    ids = [h.id for h in heads]
    if per_head_stems and default_stem not in ids:
        raise ValueError(f"settings key 'default_stem' must be a head id {ids}, got {default_stem!r}")
    plan = adaptation_plan(preset, in_channels, patch_size, MultiTalentTrainer.method, pretrain_plan,
                           stem=default_stem if per_head_stems else None)
    plan["multitalent"] = {
        "heads": {h.id: {"dataset": datasets[h.dataset].name, "classes": list(h.classes)} for h in heads},
        "stems": {h: multitalent_stem_prefix(h) for h in ids} if per_head_stems else None,
        "default_stem": default_stem if per_head_stems else None,
        "loss": loss,
    }
    return plan


# ---- trainer ---------------------------------------------------------------------------------------------
def _setting(settings: Mapping[str, Any], key: str) -> Any:
    value = settings.get(key)
    return MultiTalentSettings.default(key) if value is None else value


@METHODS.register("multitalent")
class MultiTalentTrainer(PretrainingTrainer):
    """MultiTalent pre-training (see the module docstring). Settings besides the training loop's: ``preset``,
    ``datasets``, ``loss``, ``ce_weight``, ``dice_weight``, ``deep_supervision``, ``case_weight_exponent``,
    ``max_classes_per_head``, ``stems``, ``default_stem`` (``settings.pretraining.MultiTalentSettings``); the
    loop's defaults differ from pre-training's in lr (1e-3), iterations, augmentation and foreground fraction."""

    method = "multitalent"
    with_labels = True
    training_defaults = method_training_defaults("multitalent")

    def __init__(self, settings: dict[str, Any], records: Sequence[CaseRecord], *args: Any, **kwargs: Any) -> None:
        self.datasets = parse_datasets(settings)
        self.loss_kind = str(_setting(settings, "loss"))
        if self.loss_kind not in LOSSES:
            raise ValueError(f"settings key 'loss' must be one of {LOSSES}, got {self.loss_kind!r}")
        stems = str(_setting(settings, "stems"))
        if stems not in STEM_CHOICES:
            raise ValueError(f"settings key 'stems' must be one of {STEM_CHOICES}, got {stems!r}")
        self.per_head_stems = stems == "per_dataset"
        self.ce_weight = float(_setting(settings, "ce_weight"))
        self.dice_weight = float(_setting(settings, "dice_weight"))
        self.deep_supervision = bool(_setting(settings, "deep_supervision"))
        self.case_weight_exponent = float(_setting(settings, "case_weight_exponent"))
        self.heads = plan_heads(self.datasets, int(_setting(settings, "max_classes_per_head")))
        self.default_stem = str(settings.get("default_stem") or self.heads[0].id)
        if self.default_stem not in [h.id for h in self.heads]:
            raise ValueError(f"settings key 'default_stem' must be a head id {[h.id for h in self.heads]}, got "
                             f"{self.default_stem!r}")
        index_of = {d.name: i for i, d in enumerate(self.datasets)}
        self.dataset_of_case: list[int] = []
        for record in records:
            dataset_name = record.case_id.split(CASE_SEPARATOR, 1)[0]
            if dataset_name not in index_of:
                raise ValueError(f"case {record.case_id!r} is not '{{dataset}}{CASE_SEPARATOR}{{case}}' of a "
                                 f"dataset in settings key {DATASETS_KEY!r} (use MultiTalentTrainer.load_corpus)")
            self.dataset_of_case.append(index_of[dataset_name])
        super().__init__(settings, records, *args, **kwargs)
        outputs = self.model.num_outputs
        weights = deep_supervision_weights(outputs) if self.deep_supervision else [1.0] + [0.0] * (outputs - 1)
        # outputs of weight 0 (the lowest resolution) are not computed: they add nothing to loss or gradient
        self.levels = [i for i, w in enumerate(weights) if w > 0]
        self.level_weights = [weights[i] for i in self.levels]

    @classmethod
    def load_corpus(
        cls, corpus_root: str | os.PathLike | None, settings: Mapping[str, Any]
    ) -> tuple[list[CaseRecord], int]:
        """Records of every case of every dataset in ``settings["datasets"]``; ``corpus_root`` is not used."""
        records: list[CaseRecord] = []
        datasets = parse_datasets(settings)
        for dataset in datasets:
            for record in load_case_records(dataset.root, dataset.case_ids, with_labels=True):
                records.append(dataclasses.replace(record, case_id=f"{dataset.name}{CASE_SEPARATOR}{record.case_id}"))
        return records, datasets[0].num_input_channels

    def head_channels(self) -> dict[str, int]:
        """Output channels per head id: classes + background (``ce``) or one per class (``bce``)."""
        extra = 1 if self.loss_kind == "ce" else 0
        return {h.id: len(h.classes) + extra for h in self.heads}

    def build_network(self) -> torch.nn.Module:
        from pretrain_det3d.models.backbone import build_resenc_unet

        return MultiTalentUNet(build_resenc_unet(self.preset, self.in_channels, out_channels=1),
                               self.head_channels(), per_head_stems=self.per_head_stems)

    def make_stream(self, start_batch: int) -> MultiTalentPatchStream:
        s = self.settings
        return MultiTalentPatchStream(
            self.records, self.dataset_of_case, self.heads, self.case_weight_exponent,
            patch_size=s.patch_size, batch_size=s.batch_size, seed=self.seed,
            foreground_fraction=s.foreground_fraction, augmentation=s.augmentation_params(),
            start_batch=start_batch, num_batches=s.iterations - start_batch, memory_map=s.memory_map,
        )

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        outputs = self.model(batch["images"], batch["heads"], self.levels)
        return multitalent_losses(outputs, batch["labels"], self.level_weights, self.loss_kind,
                                  self.ce_weight, self.dice_weight)

    def save_final(self) -> None:
        patch_size = list(self.settings.patch_size)
        plan = multitalent_adaptation_plan(
            self.preset, self.in_channels, patch_size, self.heads, self.datasets, self.per_head_stems,
            self.default_stem, self.loss_kind, pretrain_plan=self.pretrain_plan(patch_size),
        )
        state = {key: tensor.detach().cpu().clone() for key, tensor in self.model.state_dict().items()}
        save_torch(self.out_path, {"network_weights": state, "nnssl_adaptation_plan": plan})


def _organ_instances(compartments: np.ndarray, organs: Sequence[str]) -> tuple[np.ndarray, dict[int, int]]:
    """Instance map (one instance per present compartment of a requested organ) and instance -> class."""
    instance_map = np.zeros(compartments.shape, dtype=np.int16)
    instances: dict[int, int] = {}
    for class_index, organ in enumerate(organs):
        for compartment in ORGAN_COMPARTMENTS[organ]:
            voxels = compartments == compartment
            if voxels.any():
                instance_id = len(instances) + 1  # consecutive ids over the compartments present
                instance_map[voxels] = instance_id
                instances[instance_id] = class_index
    return instance_map, instances


def write_synthetic_organ_dataset(
    root: str | os.PathLike, name: str, settings: Mapping[str, Any], seed: int
) -> None:
    """Write an organ segmentation dataset of synthetic phantoms in the converted format, atomically.

    Settings: ``organs`` (names of ``ORGAN_COMPARTMENTS``, in class order) plus those of
    ``data.synthetic.write_synthetic_dataset`` (``num_cases``, ``shape``, ``spacing``, lesion keys). Each
    compartment of a requested organ is one instance of that organ's class (the two lungs are two instances of
    ``lung``); lesions keep the label of the compartment they lie in. Phantoms come from their own seed stream
    per dataset name, so datasets with different names hold different phantoms. Case ids are
    ``f"{name}_{i:04d}"``.

    Example:
        >>> write_synthetic_organ_dataset("results/data/converted/organs_a", "organs_a",
        ...     {"organs": ["liver", "lung"], "num_cases": 8, "shape": [48, 48, 48], "spacing": [2, 1.5, 1.5]},
        ...     seed=0)  # doctest: +SKIP
    """
    from pretrain_det3d.data import synthetic
    from pretrain_det3d.data.io import write_case, write_dataset_json
    from pretrain_det3d.utils.atomic import atomic_directory

    organs = [str(o) for o in settings.get("organs") or []]
    if not organs or len(set(organs)) != len(organs) or any(o not in ORGAN_COMPARTMENTS for o in organs):
        raise ValueError(f"synthetic settings key 'organs' must list distinct names of {sorted(ORGAN_COMPARTMENTS)}, "
                         f"got {settings.get('organs')!r}")
    if "num_cases" not in settings or int(settings["num_cases"]) < 1:
        raise ValueError(f"synthetic settings key 'num_cases' must be >= 1, got {settings.get('num_cases')!r}")
    num_cases = int(settings["num_cases"])
    stream = zlib.crc32(name.encode())  # a stable per-name stream (Python's hash() is salted per process)
    with atomic_directory(root) as tmp:
        for index in tqdm(range(num_cases), desc=f"synthetic organs {name}", unit="case"):
            sequence = np.random.SeedSequence(seed, spawn_key=(ORGAN_STREAM, stream, index))
            phantom = synthetic.make_phantom(settings, np.random.default_rng(sequence))  # validates settings
            # make_phantom draws its anatomy first: replaying the same generator gives the compartments
            anatomy, compartments = synthetic._anatomy(np.random.default_rng(sequence), phantom.image.shape)
            outside_lesions = phantom.instance_map == 0
            deviation = float(np.abs(phantom.image[outside_lesions] - anatomy[outside_lesions]).mean())
            if deviation > REPLAY_TOLERANCE_HU:
                raise RuntimeError(f"data.synthetic.make_phantom no longer draws its anatomy first (replayed anatomy "
                                   f"differs by {deviation:.0f} HU on average); update write_synthetic_organ_dataset")
            instance_map, instances = _organ_instances(compartments, organs)
            write_case(tmp, f"{name}_{index:04d}", phantom.image[None], instance_map, instances,
                       spacing=phantom.spacing, origin=phantom.origin)
        write_dataset_json(
            tmp, name=name, modalities=["CT"], class_names=organs, licence=ORGAN_LICENCE,
            source=f"pretrain_det3d.pretraining.multitalent.write_synthetic_organ_dataset(seed={seed})",
            num_cases=num_cases,
        )
