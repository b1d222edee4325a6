"""Batches of training patches from preprocessed cases, with foreground oversampling.

Every batch is a pure function of ``(seed, batch_index)``: the patch positions come from a numpy generator
seeded with ``[seed, batch_index, sample]`` and the augmentation from the same triple. Workers split the
batch indices round-robin (worker ``w`` of ``W`` makes batches ``w, w + W, ...``), and the DataLoader hands
them back in that same order, so the stream is identical for every worker count, and resuming at iteration
``i`` only needs ``start_batch=i`` (that number is the whole sampler state kept in checkpoints).

Images are read with ``np.load(mmap_mode="r")`` and only the patch region is copied out of the file; each
process opens a case's memory map once and keeps it (``memory_map=False`` loads whole cases instead: the plain
path, kept to check that both give the same batches).

Example:
    >>> stream = PatchBatchStream(load_case_records(root, ["case_000"]), patch_size=(32, 32, 32),
    ...                           batch_size=2, seed=0)  # doctest: +SKIP
    >>> batch = stream.make_batch(0)  # doctest: +SKIP
    >>> batch["images"].shape, batch["seg"].shape  # doctest: +SKIP
    (torch.Size([2, 1, 32, 32, 32]), torch.Size([2, 1, 32, 32, 32]))
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.data.io import load_npy
from pretrain_det3d.training.augmentation import AugmentationParams, PatchAugmenter

FOREGROUND_FRACTION = 0.5
# a foreground patch is centred on a foreground voxel shifted by up to this fraction of the patch per axis,
# so objects are not always in the middle of the patch
FOREGROUND_JITTER = 0.25
IMAGE_PAD_VALUE = 0.0  # images are normalised, so 0 is the mean intensity
SEG_PAD_VALUE = 0  # background
DEFAULT_PREFETCH_FACTOR = 2  # batches each loader process prepares ahead


@dataclass(frozen=True)
class CaseRecord:
    """Where a preprocessed case lives and what the sampler needs to know about it."""

    case_id: str
    image_path: Path
    seg_path: Path | None
    instances: dict[int, int]  # instance id -> class index
    foreground_locations: np.ndarray  # [N, 3] voxel indices (z, y, x) inside instances


def load_case_records(preprocessed_root: str | Path, case_ids: Sequence[str], with_labels: bool = True) -> list[CaseRecord]:
    """Read the metadata of ``case_ids`` from ``{preprocessed_root}/cases``.

    ``with_labels=False`` (pre-training corpora) needs only ``cases/{case}.npy``.
    """
    cases_dir = Path(preprocessed_root) / "cases"
    records = []
    for case in case_ids:
        image_path = cases_dir / f"{case}.npy"
        if not image_path.is_file():
            raise FileNotFoundError(f"{image_path}: preprocessed image of case {case!r} is missing")
        if not with_labels:
            records.append(CaseRecord(case, image_path, None, {}, np.zeros((0, 3), dtype=np.int64)))
            continue
        seg_path = cases_dir / f"{case}_seg.npy"
        meta_path = cases_dir / f"{case}.json"
        for path in (seg_path, meta_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: preprocessed label file of case {case!r} is missing")
        meta = json.loads(meta_path.read_text())
        try:
            instances = {int(k): int(v) for k, v in meta["instances"].items()}
            locations = np.asarray(meta.get("foreground_locations", []), dtype=np.int64).reshape(-1, 3)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{meta_path}: malformed 'instances' or 'foreground_locations' ({error})") from None
        records.append(CaseRecord(case, image_path, seg_path, instances, locations))
    if not records:
        raise ValueError(f"{cases_dir}: no cases to sample patches from")
    return records


def list_corpus_cases(preprocessed_root: str | Path) -> list[str]:
    """Case ids of a preprocessed corpus: every ``cases/{case}.npy`` that is not a ``_seg`` file."""
    cases_dir = Path(preprocessed_root) / "cases"
    cases = sorted(p.stem for p in cases_dir.glob("*.npy") if not p.stem.endswith("_seg"))
    if not cases:
        raise FileNotFoundError(f"{cases_dir}: no preprocessed volumes (*.npy) found")
    return cases


def read_region(array: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float) -> np.ndarray:
    """Copy ``array[..., start:start+size]`` over the last three axes, padding where it leaves the array.

    Only the overlapping part is read, so a memory-mapped array stays mostly on disk.

    Example:
        >>> read_region(np.arange(4).reshape(1, 1, 4), (0, 0, 2), (1, 1, 4), -1).tolist()
        [[[2, 3, -1, -1]]]
    """
    spatial = array.shape[-3:]
    out = np.full(array.shape[:-3] + tuple(size), pad_value, dtype=array.dtype)
    src, dst = [], []
    for begin, length, extent in zip(start, size, spatial):
        lo, hi = max(begin, 0), min(begin + length, extent)
        if hi <= lo:  # the region misses the array along this axis
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - begin, hi - begin))
    lead = (Ellipsis,)
    out[lead + tuple(dst)] = array[lead + tuple(src)]
    return out


def choose_patch_centre(
    shape: Sequence[int], patch_size: Sequence[int], rng: np.random.Generator, anchor: np.ndarray | None
) -> np.ndarray:
    """Centre voxel of a patch: uniform where the patch fits, or near ``anchor`` (a foreground voxel).

    The centre is kept where the whole patch lies inside the image (or in the middle of an axis shorter than
    the patch), so a jittered foreground anchor always stays inside the patch.
    """
    centre = np.empty(3, dtype=np.int64)
    for axis, (extent, size) in enumerate(zip(shape, patch_size)):
        lo, hi = size // 2, extent - (size - size // 2)  # patch [c - size//2, c - size//2 + size) inside
        if hi < lo:
            centre[axis] = extent // 2
            continue
        if anchor is None:
            centre[axis] = rng.integers(lo, hi + 1)
        else:
            jitter = int(size * FOREGROUND_JITTER)
            wanted = int(anchor[axis]) + int(rng.integers(-jitter, jitter + 1))
            centre[axis] = min(max(wanted, lo), hi)
    return centre


class PatchBatchStream(IterableDataset):
    """An endless (or ``num_batches`` long) stream of batches, starting at ``start_batch``.

    ``foreground_fraction`` of the samples (drawn per sample) are centred near a foreground voxel of a case
    that has any; the others at a uniform random position of a uniformly drawn case.
    """

    def __init__(
        self,
        records: Sequence[CaseRecord],
        patch_size: Sequence[int],
        batch_size: int,
        seed: int,
        foreground_fraction: float = FOREGROUND_FRACTION,
        augmentation: AugmentationParams | None = None,
        start_batch: int = 0,
        num_batches: int | None = None,
        with_labels: bool = True,
        memory_map: bool = True,
    ) -> None:
        super().__init__()
        if len(patch_size) != 3 or any(int(s) <= 0 for s in patch_size):
            raise ValueError(f"settings key 'patch_size' must be three positive integers, got {patch_size}")
        if batch_size <= 0:
            raise ValueError(f"settings key 'batch_size' must be positive, got {batch_size}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"settings key 'foreground_fraction' must lie in [0, 1], got {foreground_fraction}")
        self.records = list(records)
        self.patch_size = tuple(int(s) for s in patch_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.foreground_fraction = float(foreground_fraction)
        self.augmenter = PatchAugmenter(self.patch_size, augmentation)
        self.start_batch = int(start_batch)
        self.num_batches = num_batches
        self.with_labels = with_labels
        self._foreground_cases = [i for i, r in enumerate(self.records) if len(r.foreground_locations)]
        self.memory_map = bool(memory_map)
        self._open_arrays: dict[Path, np.ndarray] = {}  # per process: memory maps opened so far

    def __getstate__(self) -> dict[str, Any]:
        # worker processes open their own memory maps (pickling one would copy the whole array)
        state = self.__dict__.copy()
        state["_open_arrays"] = {}
        return state

    def open_array(self, path: Path) -> np.ndarray:
        """The array in ``path``: a memory map opened once per process, or (``memory_map=False``) loaded whole."""
        if not self.memory_map:
            return load_npy(path)  # load_npy names a truncated file and how to regenerate it
        array = self._open_arrays.get(path)
        if array is None:
            array = self._open_arrays[path] = load_npy(path, mmap_mode="r")
        return array

    def sample(self, batch_index: int, sample_index: int) -> dict[str, Any]:
        """One augmented sample; a pure function of ``(seed, batch_index, sample_index)``."""
        rng = np.random.default_rng([self.seed, batch_index, sample_index])
        wants_foreground = self.with_labels and rng.random() < self.foreground_fraction
        foreground = wants_foreground and bool(self._foreground_cases)
        if foreground:
            record = self.records[self._foreground_cases[rng.integers(len(self._foreground_cases))]]
            anchor = record.foreground_locations[rng.integers(len(record.foreground_locations))]
        else:
            record = self.records[rng.integers(len(self.records))]
            anchor = None
        image_file = self.open_array(record.image_path)
        if image_file.ndim != 4:
            raise ValueError(f"{record.image_path}: expected a [C, Z, Y, X] array, got shape {image_file.shape}")
        centre = choose_patch_centre(image_file.shape[1:], self.patch_size, rng, anchor)
        region = self.augmenter.input_size
        start = [int(c) - r // 2 for c, r in zip(centre, region)]
        image = torch.from_numpy(read_region(image_file, start, region, IMAGE_PAD_VALUE).astype(np.float32, copy=False))
        instance_map = None
        if self.with_labels:
            seg_file = self.open_array(record.seg_path)
            if seg_file.shape != image_file.shape[1:]:
                raise ValueError(
                    f"{record.seg_path}: shape {seg_file.shape} differs from the image's {image_file.shape[1:]}"
                )
            instance_map = torch.from_numpy(read_region(seg_file, start, region, SEG_PAD_VALUE).astype(np.int16))
        augment_seed = int(np.random.SeedSequence([self.seed, batch_index, sample_index, 1]).generate_state(1)[0])
        image, instance_map = self.augmenter(image, instance_map, augment_seed)
        # voxel of the case at the patch's first corner (before augmentation moves content around)
        origin = [b + (r - p) // 2 for b, r, p in zip(start, region, self.patch_size)]
        out: dict[str, Any] = {"image": image, "case_id": record.case_id, "foreground_sampled": foreground,
                               "origin": origin}
        if instance_map is not None:
            out.update(detection_targets(instance_map.numpy(), record))
        return out

    def make_batch(self, batch_index: int) -> dict[str, Any]:
        """Batch ``batch_index`` of the stream, collated."""
        samples = [self.sample(batch_index, i) for i in range(self.batch_size)]
        return collate_samples(samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        index = self.start_batch + worker
        stop = None if self.num_batches is None else self.start_batch + self.num_batches
        while stop is None or index < stop:
            yield self.make_batch(index)
            index += workers


def detection_targets(instance_map: np.ndarray, record: CaseRecord) -> dict[str, Any]:
    """Boxes and labels of the instances present in an (augmented) patch, and its foreground mask.

    Ids cut away by cropping are absent from the map and so get no box.
    """
    ids, boxes = boxes_from_instance_map(instance_map)
    missing = [int(i) for i in ids if int(i) not in record.instances]
    if missing:
        raise ValueError(f"{record.case_id}.json: instance ids {missing} of the instance map have no class in 'instances'")
    labels = np.asarray([record.instances[int(i)] for i in ids], dtype=np.int64)
    return {
        "instance_map": torch.from_numpy(np.ascontiguousarray(instance_map)),
        "boxes": torch.from_numpy(boxes.astype(np.float32)),  # [N, 6] (z0, y0, x0, z1, y1, x1)
        "labels": torch.from_numpy(labels),  # [N]
        "seg": torch.from_numpy((instance_map > 0).astype(np.int64))[None],  # [1, Z, Y, X]
    }


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into ``images [B,C,Z,Y,X]``, ``targets`` (list of boxes/labels), ``seg [B,1,Z,Y,X]``."""
    batch: dict[str, Any] = {
        "images": torch.stack([s["image"] for s in samples]),
        "case_ids": [s["case_id"] for s in samples],
        "foreground_sampled": torch.tensor([bool(s["foreground_sampled"]) for s in samples]),
        "origins": torch.tensor([s["origin"] for s in samples], dtype=torch.int64),  # [B, 3]
    }
    if "boxes" in samples[0]:
        batch["targets"] = [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples]
        batch["seg"] = torch.stack([s["seg"] for s in samples]).long()
        batch["instance_maps"] = torch.stack([s["instance_map"] for s in samples])
    return batch


def seed_worker(worker_id: int) -> None:
    """Seed python/numpy in a worker from torch's per-worker seed (itself derived from the loader's seed).

    The batches themselves do not depend on these generators; this only keeps any third-party randomness in a
    worker reproducible. One thread per worker, as the workers already run in parallel.
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    torch.set_num_threads(1)


def build_loader(
    stream: PatchBatchStream,
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int = DEFAULT_PREFETCH_FACTOR,
) -> DataLoader:
    """A DataLoader over ``stream`` (already batched) with seeded workers.

    The loader's own generator is seeded, so creating it does not consume the global torch generator (which
    would make a resumed run differ from an uninterrupted one). ``pin_memory`` puts batches in page-locked
    memory (only useful with a CUDA device, where it enables non-blocking copies); ``persistent_workers`` and
    ``prefetch_factor`` apply only with ``num_workers > 0``. None of them changes the batches.

    Example:
        >>> loader = build_loader(stream, num_workers=2, seed=0, persistent_workers=True)  # doctest: +SKIP
    """
    if num_workers < 0:
        raise ValueError(f"settings key 'num_workers' must be >= 0, got {num_workers}")
    if prefetch_factor <= 0:
        raise ValueError(f"settings key 'prefetch_factor' must be positive, got {prefetch_factor}")
    multi_process = num_workers > 0
    return DataLoader(
        stream,
        batch_size=None,  # the stream yields whole batches
        num_workers=num_workers,
        worker_init_fn=seed_worker if multi_process else None,
        generator=torch.Generator().manual_seed(int(seed)),
        pin_memory=bool(pin_memory),
        persistent_workers=bool(persistent_workers) and multi_process,
        prefetch_factor=int(prefetch_factor) if multi_process else None,
    )
