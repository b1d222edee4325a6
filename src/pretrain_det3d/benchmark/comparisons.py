"""Side-by-side runs against the reference pipelines, reported as ratios (ours / theirs; above 1 = we are faster).

- Data loading: our ``PatchBatchStream`` against nnU-Net's ``nnUNetDataLoader`` (batchgenerators +
  batchgeneratorsv2 transforms from ``nnUNetTrainer.get_training_transforms``), both reading the same
  preprocessed ``.npy`` arrays through memory maps, same patch size, batch size, foreground fraction and
  number of worker processes (nnU-Net's ``NonDetMultiThreadedAugmenter`` for workers > 0). nnU-Net gets our
  arrays through a small ``nnUNetBaseDataset`` adapter (``NnUNetArrayDatasetFactory``); its pipeline does a little
  more augmentation (blur, low-resolution simulation) and ours a little more bookkeeping (boxes per patch).
- Training step: our Retina U-Net ``train_step`` against MONAI's ``RetinaNetDetector`` built on the very same
  ResEnc encoder + UFPN features (``ResEncFeatures``), same anchors, ATSS matcher and focal terms over all anchors,
  same optimiser, clipping and autocast. MONAI's heads (4 convs) and losses differ from ours (2 convs with
  GroupNorm, the EMA-normalised losses, plus the auxiliary segmentation loss), which is part of what the ratio
  measures.

Example:
    >>> compare_loaders(records, (32, 32, 32), batch_size=2, num_workers=0, seed=0)["ratio"]  # doctest: +SKIP
    1.3
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pretrain_det3d.benchmark.loading import DEFAULT_LOADER_BATCHES, DEFAULT_LOADER_WARMUP, measure_loading
from pretrain_det3d.benchmark.timing import summarize, time_repeats
from pretrain_det3d.data.io import load_npy
from pretrain_det3d.training.augmentation import AugmentationParams
from pretrain_det3d.training.dataloader import FOREGROUND_FRACTION, CaseRecord
from pretrain_det3d.training.trainer import IterationTrainer, move_to_device

# nnU-Net's own 3D defaults for the comparison pipeline
NNUNET_ROTATION_DEGREES = 30.0
NNUNET_SCALE_RANGE_FOR_PATCH = (0.85, 1.25)  # what nnU-Net passes to get_patch_size
NNUNET_MIRROR_AXES = (0, 1, 2)


# ---------------------------------------------------------------------------------------------- data loading
def NnUNetArrayDatasetFactory() -> type:
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset

    class NnUNetArrayDataset(nnUNetBaseDataset):
        """Our preprocessed cases seen through nnU-Net's dataset interface (memory-mapped, like its numpy one)."""

        def __init__(self, records: Sequence[CaseRecord]) -> None:
            self.records = {r.case_id: r for r in records}
            super().__init__(folder="", identifiers=list(self.records))

        def load_case(self, identifier: str):
            record = self.records[identifier]
            # copy-on-write maps: nnU-Net's loader hands a crop that lies inside the image to its transforms as a
            # view, and they modify it in place; a read-only map then segfaults (seen here), a "c" map stays private
            data = load_npy(record.image_path, mmap_mode="c")  # [C, Z, Y, X]
            seg = load_npy(record.seg_path, mmap_mode="c")[None]  # [1, Z, Y, X], still a memory map
            locations = record.foreground_locations
            # nnU-Net's class_locations carry the channel index first: [N, 4]
            with_channel = np.hstack([np.zeros((len(locations), 1), dtype=np.int64), locations])
            return data, seg, None, {"class_locations": {1: with_channel}}

        @staticmethod
        def save_case(*args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("read-only adapter")

        @staticmethod
        def get_identifiers(folder: str) -> list[str]:
            raise NotImplementedError("identifiers come from the records")

    return NnUNetArrayDataset


def build_nnunet_loader(
    records: Sequence[CaseRecord],
    patch_size: Sequence[int],
    batch_size: int,
    foreground_fraction: float = FOREGROUND_FRACTION,
):
    """nnU-Net's training data loader (with its training transforms) over our preprocessed records."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    patch = tuple(int(p) for p in patch_size)
    rotation = (-np.deg2rad(NNUNET_ROTATION_DEGREES), np.deg2rad(NNUNET_ROTATION_DEGREES))
    initial_patch = get_patch_size(patch, rotation, rotation, rotation, NNUNET_SCALE_RANGE_FOR_PATCH)
    labels = LabelManager({"background": 0, "lesion": 1}, None)
    transforms = nnUNetTrainer.get_training_transforms(
        patch, rotation, None, NNUNET_MIRROR_AXES, False, foreground_labels=labels.foreground_labels
    )
    return nnUNetDataLoader(NnUNetArrayDatasetFactory()(records), batch_size, initial_patch, patch, labels,
                            oversample_foreground_percent=foreground_fraction, probabilistic_oversampling=True,
                            transforms=transforms)


def measure_nnunet_loading(
    records: Sequence[CaseRecord],
    patch_size: Sequence[int],
    batch_size: int,
    num_workers: int,
    seed: int,
    num_batches: int = DEFAULT_LOADER_BATCHES,
    warmup: int = DEFAULT_LOADER_WARMUP,
) -> dict[str, Any]:
    """Batches per second of nnU-Net's loader (in-process for 0 workers, else NonDetMultiThreadedAugmenter)."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

    np.random.seed(seed % 2**32)  # batchgenerators draws from the global generators
    torch.manual_seed(seed)
    loader = build_nnunet_loader(records, patch_size, batch_size)
    source = loader
    if num_workers > 0:
        source = NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=num_workers,
                                              num_cached=max(6, num_workers // 2), seeds=None, pin_memory=False,
                                              wait_time=0.002)
    try:
        for _ in range(warmup):
            next(source)
        started = time.perf_counter()
        for _ in range(num_batches):
            next(source)
        seconds = time.perf_counter() - started
    finally:
        if source is not loader:
            source._finish()
    return {"batches_per_second": num_batches / seconds, "seconds": seconds, "num_batches": num_batches,
            "num_workers": int(num_workers)}


def compare_loaders(
    records: Sequence[CaseRecord],
    patch_size: Sequence[int],
    batch_size: int,
    num_workers: int,
    seed: int,
    num_batches: int = DEFAULT_LOADER_BATCHES,
    warmup: int = DEFAULT_LOADER_WARMUP,
) -> dict[str, Any]:
    """Our loader and nnU-Net's on the same arrays; ``ratio`` = our batches/s over nnU-Net's."""
    ours = measure_loading(records, patch_size, batch_size, num_workers, seed, augmentation=AugmentationParams(),
                           num_batches=num_batches, warmup=warmup)
    theirs = measure_nnunet_loading(records, patch_size, batch_size, num_workers, seed, num_batches, warmup)
    return {"ours": ours, "nnunet": theirs, "ratio": ours["batches_per_second"] / theirs["batches_per_second"]}


# ---------------------------------------------------------------------------------------------- training step
class ResEncFeatures(nn.Module):
    """The head-level FPN features of a Retina U-Net (its encoder and decoder, no heads), for MONAI's RetinaNet.

    Shares the modules (and so the weights) of ``retina``; ``out_channels`` is what MONAI's heads read.
    """

    def __init__(self, retina: nn.Module) -> None:
        super().__init__()
        self.retina = retina
        self.out_channels = int(retina.decoder_widths[retina.head_levels[0]])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        decoded = self.retina.decode(images)  # the same encoder + UFPN pass as RetinaUNet.forward
        return [decoded[level] for level in self.retina.head_levels]


def build_monai_detector(retina: nn.Module):
    """MONAI ``RetinaNetDetector`` on ``retina``'s features, anchors, ATSS settings and focal terms (all anchors)."""
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.losses import FocalLoss

    network = RetinaNet(spatial_dims=3, num_classes=retina.num_classes, num_anchors=retina.num_anchors_per_location,
                        feature_extractor=ResEncFeatures(retina), size_divisible=retina.stage_strides[-1])
    detector = RetinaNetDetector(network, retina.anchor_generator)
    detector.set_atss_matcher(num_candidates=retina.matcher.num_candidates, center_in_gt=retina.matcher.center_in_gt)
    # no sampler: like ours (the release's recipe), the classification loss covers every anchor
    detector.set_cls_loss(FocalLoss(reduction="mean", gamma=retina.focal_gamma, alpha=retina.focal_alpha))
    detector.set_target_keys(box_key="boxes", label_key="labels")
    return detector


def compare_train_steps(
    trainer: IterationTrainer,
    batch: dict[str, Any],
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Median train-step seconds of ``trainer`` (a Retina U-Net) and of MONAI's detector on the same features.

    The MONAI step mirrors ``IterationTrainer.train_step``: same optimiser settings, autocast, loss scaling and
    gradient clipping. ``ratio`` = MONAI's step time over ours (above 1 = ours is faster).
    """
    from pretrain_det3d.training.schedule import build_optimizer

    device = trainer.device
    batch = move_to_device(batch, device)
    ours = summarize(time_repeats(lambda: trainer.train_step(batch), warmup, repeats, device))

    detector = build_monai_detector(trainer.model).to(device)
    detector.train()
    optimizer = build_optimizer(detector.network.parameters(), trainer.settings.model_dump())
    scaler = torch.amp.GradScaler(device.type, enabled=trainer.scaler.is_enabled())
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in batch["targets"]]
    amp = trainer.amp_dtype

    def monai_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        context = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with context:
            losses = detector(batch["images"], targets)
        total = losses[detector.cls_key] + losses[detector.box_reg_key]
        scaler.scale(total).backward()
        if trainer.settings.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(detector.network.parameters(), trainer.settings.grad_clip)
        scaler.step(optimizer)
        scaler.update()

    theirs = summarize(time_repeats(monai_step, warmup, repeats, device))
    return {"ours_step": ours, "monai_step": theirs, "ratio": theirs["median_s"] / ours["median_s"],
            "ours_iterations_per_second": 1.0 / ours["median_s"],
            "monai_iterations_per_second": 1.0 / theirs["median_s"]}
