"""Batches of training patches from preprocessed cases, with object-balanced foreground oversampling.

Sampling follows nnDetection's ``offsetV2_obj_bal`` (``DataLoader3DOffsetObjectBalanced``, the authors' release):

- of each batch, the first ``round(batch_size * (1 - foreground_fraction))`` samples are background samples, the
  rest foreground samples (with the default 0.5 and a batch of 4: exactly two of each);
- a background sample takes a case uniformly and a patch position uniformly where the patch lies inside it;
- a foreground sample takes a class uniformly among the classes with objects, then an object of that class
  uniformly among all objects of the dataset (so a 3^3 nodule is picked as often as a 40^3 one, and a case with
  many objects more often than a case with one), then a patch position around that object: on each axis the
  object stays inside the patch at a random offset whose range is shrunk by ``OFFSET_MAGNITUDE`` towards the
  centred position; along an axis where the object spans at least ``MAX_OBJECT_FRACTION`` of the patch the patch
  centre is a random voxel of the object, and along an axis where the case is not larger than the extracted region
  the patch is centred on the case;
- cases without objects take part in background samples only; a dataset without any object gives background
  samples only.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.data.io import load_npy
from pretrain_det3d.training.augmentation import AugmentationParams, PatchAugmenter

FOREGROUND_FRACTION = 0.5
# nnDetection's offsetV2_obj_bal (dataloader_kwargs): offset_magn 0.7 shrinks the range of offsets of the object
# inside the patch by 30 % towards the centred position; max_size_pct 0.7: along an axis where the object's box
# spans at least 70 % of the patch, the patch centre is a random voxel of the object instead
OFFSET_MAGNITUDE = 0.7
MAX_OBJECT_FRACTION = 0.7
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
    # the objects the foreground sampler picks from: their ids [K] and voxel extents [K, 6]
    # (start z, y, x, stop z, y, x: the slice of the object's voxels, whatever the box convention)
    object_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    object_extents: np.ndarray = field(default_factory=lambda: np.zeros((0, 6), dtype=np.int64))


def object_extents(seg: np.ndarray, ids: Sequence[int], boxes: Sequence[Sequence[float]] | None = None) -> np.ndarray:
    """Voxel extents ``[K, 6]`` (start, stop per axis) of the instances ``ids`` in the instance map ``seg``.

    ``boxes`` (the case metadata's boxes, one per id in order) only tell where to look: each object is found in
    its box grown by one voxel, so only that part of a memory-mapped map is read and the box convention does not
    matter. Without boxes, or where a box does not hold its whole object, the whole map is scanned.

    Example:
        >>> m = np.zeros((4, 5, 6), np.int16); m[1:3, 2, 1:4] = 2; m[0, 0, 0] = 1
        >>> object_extents(m, [1, 2]).tolist()
        [[0, 0, 0, 1, 1, 1], [1, 2, 1, 3, 3, 4]]
        >>> object_extents(m, [1, 2], boxes=[[0, 0, 0, 1, 1, 1], [1, 2, 1, 3, 3, 4]]).tolist()
        [[0, 0, 0, 1, 1, 1], [1, 2, 1, 3, 3, 4]]
    """
    ids = [int(i) for i in ids]
    shape = seg.shape
    if boxes is not None and len(boxes) == len(ids):
        extents = []
        for instance_id, box in zip(ids, boxes):
            lo = [max(int(np.floor(v)) - 1, 0) for v in box[:3]]
            hi = [min(int(np.ceil(v)) + 1, n) for v, n in zip(box[3:], shape)]
            if any(b <= a for a, b in zip(lo, hi)):
                break
            found = ndimage.find_objects((np.asarray(seg[tuple(slice(a, b) for a, b in zip(lo, hi))]) == instance_id)
                                         .astype(np.int8))
            if not found or found[0] is None:
                break
            start = [a + sl.start for a, sl in zip(lo, found[0])]
            stop = [a + sl.stop for a, sl in zip(lo, found[0])]
            # an object reaching the window's edge (inside the map) may go on beyond it: the box was not its own
            if any((b0 == a and a > 0) or (b1 == b and b < n) for b0, b1, a, b, n in zip(start, stop, lo, hi, shape)):
                break
            extents.append(start + stop)
        else:
            return np.asarray(extents, dtype=np.int64).reshape(-1, 6)
    slices = ndimage.find_objects(np.asarray(seg), max_label=max(ids, default=0))  # ignores labels <= 0
    extents = []
    for instance_id in ids:
        sl = slices[instance_id - 1] if 0 < instance_id <= len(slices) else None
        if sl is None:
            raise ValueError(f"instance {instance_id} has no voxels in the instance map")
        extents.append([s.start for s in sl] + [s.stop for s in sl])
    return np.asarray(extents, dtype=np.int64).reshape(-1, 6)


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
        seg = load_npy(seg_path, mmap_mode="r")
        boxes = meta.get("boxes")
        present = sorted(instances)
        try:
            extents = object_extents(seg, present, boxes)
        except ValueError as error:  # an instance listed in the metadata that the map does not hold
            raise ValueError(f"{seg_path}: {error} (listed in {meta_path.name})") from None
        records.append(CaseRecord(case, image_path, seg_path, instances, locations,
                                  np.asarray(present, dtype=np.int64), extents))
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


def choose_patch_centre(shape: Sequence[int], patch_size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Centre voxel of a background patch: uniform where the whole patch lies inside the case, or the middle of an
    axis shorter than the patch (nnDetection's ``RandomBGCrop3D``).

    Example:
        >>> choose_patch_centre((10, 4, 32), (8, 8, 8), np.random.default_rng(0)).tolist()  # 4..6, 2, 4..28
        [6, 2, 19]
    """
    centre = np.empty(3, dtype=np.int64)
    for axis, (extent, size) in enumerate(zip(shape, patch_size)):
        lo, hi = size // 2, extent - (size - size // 2)  # patch [c - size//2, c - size//2 + size) inside
        centre[axis] = extent // 2 if hi < lo else rng.integers(lo, hi + 1)
    return centre


def object_patch_centre(
    shape: Sequence[int],
    patch_size: Sequence[int],
    region_size: Sequence[int],
    extent: Sequence[int],
    rng: np.random.Generator,
    offset_magnitude: float = OFFSET_MAGNITUDE,
    max_object_fraction: float = MAX_OBJECT_FRACTION,
) -> np.ndarray:
    """Centre voxel of a foreground patch around the object with voxel extent ``extent`` (start, stop per axis).

    As nnDetection's ``OffsetFGCrop3DV2``, per axis, with the object's box ``[lo, hi] = [first - 1, last + 1]``
    (nnDetection's box of a mask) and the patch's first voxel ``p``:

    - box size ``hi - lo`` at least ``max_object_fraction`` of the patch: the centre is a uniform voxel of the object;
    - else, a case no larger than ``region_size`` (what is read for augmentation) along the axis: centred on the case;
    - else ``p`` is uniform in ``[low, high)`` (``low`` itself when the range is empty), where ``[low, high]`` is
      ``[hi - patch, lo]`` (the object inside the patch) clipped to ``[-1, shape - patch]`` (the patch inside the
      case, give or take a voxel), both ends moved ``1 - offset_magnitude`` of the way towards the ``p`` that
      centres the box, and rounded.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> # object voxels 20..22 of a 64-voxel axis, patch 16: box [19, 23]; [23 - 16, 19] = [7, 19], moved 30 %
        >>> # towards the centring p = 13: [9, 17]; p uniform in [9, 17), so the centre p + 8 is in 17..24
        >>> sorted({int(object_patch_centre((64, 64, 64), (16,) * 3, (16,) * 3, (20, 0, 0, 23, 64, 64), rng)[0])
        ...         for _ in range(200)})
        [17, 18, 19, 20, 21, 22, 23, 24]
    """
    centre = np.empty(3, dtype=np.int64)
    for axis in range(3):
        size, length, region = int(patch_size[axis]), int(shape[axis]), int(region_size[axis])
        first, last = int(extent[axis]), int(extent[axis + 3]) - 1
        lo, hi = first - 1, last + 1
        box_size = hi - lo
        if box_size >= max_object_fraction * size:
            centre[axis] = rng.integers(first, last + 1)
            continue
        if length <= region:
            centre[axis] = length // 2
            continue
        top = length - size
        low, high = min(max(hi - size, -1), top), min(max(lo, -1), top)
        if offset_magnitude < 1.0:
            centred = lo - size / 2 + box_size / 2
            low += round((1.0 - offset_magnitude) * (centred - low))
            high -= round((1.0 - offset_magnitude) * (high - centred))
        start = low if high <= low else int(rng.integers(low, high))
        centre[axis] = start + size // 2
    return centre


class PatchBatchStream(IterableDataset):
    """An endless (or ``num_batches`` long) stream of batches, starting at ``start_batch``.

    The last ``batch_size - round(batch_size * (1 - foreground_fraction))`` samples of every batch are placed
    around an object (class uniform, then object uniform; see the module docs); the others at a uniform random
    position of a uniformly drawn case.
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
        # nnDetection's object-balanced cache: class -> every (case, object) of that class in the dataset
        by_class: dict[int, list[tuple[int, int]]] = {}
        if with_labels:
            for case_index, record in enumerate(self.records):
                for object_index, instance_id in enumerate(record.object_ids):
                    by_class.setdefault(record.instances[int(instance_id)], []).append((case_index, object_index))
        self._objects_by_class = [by_class[c] for c in sorted(by_class)]
        self.num_background = round(self.batch_size * (1.0 - self.foreground_fraction))
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
        region = self.augmenter.input_size
        foreground = self.is_foreground_slot(sample_index) and bool(self._objects_by_class)
        if foreground:
            objects = self._objects_by_class[rng.integers(len(self._objects_by_class))]
            case_index, object_index = objects[rng.integers(len(objects))]
            record = self.records[case_index]
        else:
            record = self.records[rng.integers(len(self.records))]
        image_file = self.open_array(record.image_path)
        if image_file.ndim != 4:
            raise ValueError(f"{record.image_path}: expected a [C, Z, Y, X] array, got shape {image_file.shape}")
        if foreground:
            centre = object_patch_centre(image_file.shape[1:], self.patch_size, region,
                                         record.object_extents[object_index], rng)
        else:
            centre = choose_patch_centre(image_file.shape[1:], self.patch_size, rng)
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

    def is_foreground_slot(self, sample_index: int) -> bool:
        """Whether sample ``sample_index`` of a batch is a foreground sample (nnDetection: the last ones)."""
        return self.with_labels and sample_index >= self.num_background

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

    Boxes are made from the patch's own map in the convention of :mod:`pretrain_det3d.data.boxes` (nnDetection's
    ``Instances2Boxes`` on the batch): ``[first - 1, last + 1]`` in patch voxels, not clipped, so an object cut by
    the patch border gets the box of its part inside, reaching ``-1`` or the patch size. Ids cut away by cropping
    are absent from the map and so get no box.
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
