"""Patch batches: object-balanced foreground oversampling, boxes from the instance map, padding, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.training.augmentation import AugmentationParams
from pretrain_det3d.training.dataloader import (
    PatchBatchStream,
    build_loader,
    list_corpus_cases,
    load_case_records,
    object_extents,
    object_patch_centre,
    read_region,
)

PATCH = (16, 16, 16)


def _write_case(root: Path, case: str, image: np.ndarray, seg: np.ndarray, instances: dict[int, int],
                boxes: list | None = None) -> None:
    cases = root / "cases"
    cases.mkdir(parents=True, exist_ok=True)
    np.save(cases / f"{case}.npy", image.astype(np.float32))
    np.save(cases / f"{case}_seg.npy", seg.astype(np.int16))
    locations = np.argwhere(seg > 0)[::3].tolist()
    meta = {"instances": {str(k): v for k, v in instances.items()}, "foreground_locations": locations}
    if boxes is not None:
        meta["boxes"] = boxes
    (cases / f"{case}.json").write_text(json.dumps(meta))


@pytest.fixture
def preprocessed(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    # a large case with two small objects: random patches rarely hit them
    seg = np.zeros((40, 48, 56), dtype=np.int16)
    seg[4:7, 5:9, 40:44] = 1
    seg[30:34, 36:41, 6:9] = 2
    _write_case(tmp_path, "big", rng.normal(size=(2, 40, 48, 56)), seg, {1: 0, 2: 1})
    # smaller than the patch along two axes: needs padding
    seg = np.zeros((10, 20, 12), dtype=np.int16)
    seg[2:5, 3:9, 4:8] = 1
    _write_case(tmp_path, "small", rng.normal(size=(2, 10, 20, 12)) + 5, seg, {1: 1})
    # no objects at all
    _write_case(tmp_path, "empty", rng.normal(size=(2, 24, 24, 24)), np.zeros((24, 24, 24)), {})
    return tmp_path


def _records(root: Path):
    return load_case_records(root, ["big", "small", "empty"])


def test_foreground_fraction_is_about_half_and_foreground_patches_hit_objects(preprocessed):
    stream = PatchBatchStream(_records(preprocessed), PATCH, batch_size=4, seed=1, foreground_fraction=0.5)
    flags, hits = [], []
    for index in range(50):
        batch = stream.make_batch(index)
        flags += batch["foreground_sampled"].tolist()
        hits += [bool(s.any()) for s in batch["seg"]]
    fraction = np.mean(flags)
    assert 0.4 < fraction < 0.6  # 200 Bernoulli(0.5) draws: 2.8 standard deviations either side
    assert all(hit for flag, hit in zip(flags, hits) if flag), "a foreground patch must contain foreground"
    random_hits = np.mean([hit for flag, hit in zip(flags, hits) if not flag])
    assert random_hits < 0.8  # the objects are small, so oversampling is what brings them in


def test_foreground_fraction_zero_and_one(preprocessed):
    for fraction, expected in ((0.0, False), (1.0, True)):
        stream = PatchBatchStream(_records(preprocessed), PATCH, batch_size=8, seed=0, foreground_fraction=fraction)
        assert stream.make_batch(0)["foreground_sampled"].tolist() == [expected] * 8


def test_each_batch_holds_round_b_times_one_minus_f_background_samples_first(preprocessed):
    # nnDetection: sample i of a batch is background when i < round(B (1 - f)) (Python rounds half to even)
    for batch_size, fraction, background in ((4, 0.5, 2), (3, 0.5, 2), (5, 0.33, 3), (2, 0.75, 0), (6, 0.25, 4)):
        stream = PatchBatchStream(_records(preprocessed), PATCH, batch_size, seed=2, foreground_fraction=fraction)
        for index in range(3):
            flags = stream.make_batch(index)["foreground_sampled"].tolist()
            assert flags == [False] * background + [True] * (batch_size - background), (batch_size, fraction)


def _two_object_cases(root: Path, num_cases: int = 3) -> list[str]:
    """Cases with one 40^3 and one 3^3 object of the same class, far apart along x (no patch holds both)."""
    for index in range(num_cases):
        seg = np.zeros((48, 48, 96), dtype=np.int16)
        seg[4:44, 3 + index:43 + index, 2:42] = 1
        seg[20 + index:23 + index, 30:33, 80:83] = 2
        # the preprocessing writes boxes; one case states them as nnDetection does ([min - 1, max + 1]), one as
        # slices, one not at all: the sampler must find the same objects in each
        boxes = [None, [[4, 3 + index, 2, 44, 43 + index, 42], [20 + index, 30, 80, 23 + index, 33, 83]],
                 [[3, 2 + index, 1, 44, 43 + index, 42], [19 + index, 29, 79, 23 + index, 33, 83]]][index % 3]
        _write_case(root, f"two_{index}", np.zeros((1, *seg.shape)), seg, {1: 0, 2: 0}, boxes)
    return [f"two_{index}" for index in range(num_cases)]


def count_sampled_objects(stream_class, records, num_batches: int, batch_size: int = 8) -> np.ndarray:
    """How often foreground patches of ``stream_class`` hold the large (id 1) and the small (id 2) object."""
    stream = stream_class(records, PATCH, batch_size=batch_size, seed=0, foreground_fraction=1.0)
    counts = np.zeros(2, dtype=np.int64)
    for index in range(num_batches):
        batch = stream.make_batch(index)
        for instance_map in batch["instance_maps"]:
            present = set(torch.unique(instance_map).tolist()) - {0}
            assert len(present) == 1, f"a foreground patch must hold exactly one of the objects, got {present}"
            counts[present.pop() - 1] += 1
    return counts


def test_foreground_patches_are_balanced_over_objects_not_voxels(tmp_path):
    # the 40^3 object has 2370 times the voxels of the 3^3 one; picking an object first gives both the same share
    records = load_case_records(tmp_path, _two_object_cases(tmp_path))
    assert [r.object_extents.tolist() for r in records] == [
        [[4, 3 + i, 2, 44, 43 + i, 42], [20 + i, 30, 80, 23 + i, 33, 83]] for i in range(3)]
    counts = count_sampled_objects(PatchBatchStream, records, num_batches=400)
    n = counts.sum()
    assert n == 3200
    assert abs(counts[1] - n / 2) < 4 * np.sqrt(n / 4), f"large / small object: {counts.tolist()}"


def test_classes_are_balanced_then_objects_within_a_class(tmp_path):
    # class 0: three objects, class 1: one; nnDetection draws the class uniformly, so the class-1 object is in half
    # of the foreground patches (uniform over objects would give a quarter)
    seg = np.zeros((24, 24, 96), dtype=np.int16)
    for k, x in enumerate((4, 28, 52, 76)):
        seg[10:13, 10:13, x:x + 3] = k + 1
    _write_case(tmp_path, "classes", np.zeros((1, *seg.shape)), seg, {1: 0, 2: 0, 3: 0, 4: 1})
    stream = PatchBatchStream(load_case_records(tmp_path, ["classes"]), PATCH, batch_size=8, seed=3,
                              foreground_fraction=1.0)
    labels = [int(t["labels"][0]) for index in range(100) for t in stream.make_batch(index)["targets"]]
    n = len(labels)
    assert abs(sum(labels) - n / 2) < 4 * np.sqrt(n / 4), sum(labels)


def test_object_patch_keeps_the_object_inside_the_patch():
    rng = np.random.default_rng(0)
    patch = (16, 16, 16)
    for _ in range(300):
        shape = tuple(int(v) for v in rng.integers(20, 60, size=3))
        size = rng.integers(1, 11, size=3)  # box = size + 1 < 0.7 * 16: the offset rule applies
        start = [int(rng.integers(0, n - s + 1)) for n, s in zip(shape, size)]
        extent = start + [a + int(s) for a, s in zip(start, size)]
        centre = object_patch_centre(shape, patch, patch, extent, rng)
        first = centre - 8
        assert (first <= start).all() and (first + 16 >= np.add(start, size)).all(), "object outside the patch"
        # the patch stays inside the case give or take a voxel, except that (as in nnDetection) the bounds are moved
        # 30 % towards the centring position after clipping: for an object at the case's edge that position lies
        # outside, at most 16/2 - 1 voxels (box of 2 at -1..1), so the patch can stick out round(0.3 * 7) = 2 more
        assert (first >= -3).all() and (first + 16 <= np.add(shape, 2)).all(), "patch too far outside the case"


def test_object_patch_centre_rules_for_large_objects_and_small_cases():
    rng = np.random.default_rng(1)
    # box size 12 + 1 >= 0.7 * 16 along axis 0: the centre is a voxel of the object; axis 1: the case (12) is not
    # larger than the region read (20), so the patch is centred on it; axis 2: the offset rule
    centres = np.array([object_patch_centre((64, 12, 64), (16, 16, 16), (20, 20, 20), (30, 2, 40, 42, 5, 43), rng)
                        for _ in range(500)])
    assert set(centres[:, 0].tolist()) == set(range(30, 42))
    assert set(centres[:, 1].tolist()) == {6}
    # axis 2, by hand: box [39, 43], [43 - 16, 39] = [27, 39], 30 % towards the centring 33: [29, 37) + 8
    assert set(centres[:, 2].tolist()) == set(range(37, 45))


def test_cases_without_objects_give_background_patches_only(tmp_path):
    _write_case(tmp_path, "none_a", np.zeros((1, 20, 20, 20)), np.zeros((20, 20, 20)), {})
    _write_case(tmp_path, "none_b", np.zeros((1, 20, 20, 20)), np.zeros((20, 20, 20)), {})
    stream = PatchBatchStream(load_case_records(tmp_path, ["none_a", "none_b"]), PATCH, batch_size=4, seed=0)
    assert stream.make_batch(0)["foreground_sampled"].tolist() == [False] * 4


def test_object_extents_ignore_the_box_convention_and_name_missing_instances():
    seg = np.zeros((10, 10, 10), dtype=np.int16)
    seg[2:5, 3:4, 0:10] = 1
    seg[7:9, 7:9, 7:9] = 2
    exact = [[2, 3, 0, 5, 4, 10], [7, 7, 7, 9, 9, 9]]
    assert object_extents(seg, [1, 2]).tolist() == exact
    assert object_extents(seg, [1, 2], exact).tolist() == exact
    assert object_extents(seg, [1, 2], [[1, 2, -1, 5, 4, 10], [6, 6, 6, 9, 9, 9]]).tolist() == exact
    # a box that is not the object's (here: swapped) falls back to scanning the map
    assert object_extents(seg, [1, 2], exact[::-1]).tolist() == exact
    with pytest.raises(ValueError, match="instance 3"):
        object_extents(seg, [1, 2, 3])


def test_patch_equals_case_region_and_boxes_match_instance_map(preprocessed):
    records = {r.case_id: r for r in _records(preprocessed)}
    stream = PatchBatchStream(list(records.values()), PATCH, batch_size=6, seed=3)
    for index in range(4):
        batch = stream.make_batch(index)
        assert batch["images"].shape == (6, 2, *PATCH) and batch["images"].dtype == torch.float32
        assert batch["seg"].shape == (6, 1, *PATCH) and batch["seg"].dtype == torch.long
        for i, case in enumerate(batch["case_ids"]):
            image = np.load(preprocessed / "cases" / f"{case}.npy")
            seg = np.load(preprocessed / "cases" / f"{case}_seg.npy")
            origin = batch["origins"][i].tolist()
            # reference crop with numpy padding (zeros outside the case)
            pad = [(0, 0)] + [(32, 32)] * 3
            ref_image = np.pad(image, pad)[(slice(None),) + tuple(slice(o + 32, o + 32 + p) for o, p in zip(origin, PATCH))]
            ref_seg = np.pad(seg, pad[1:])[tuple(slice(o + 32, o + 32 + p) for o, p in zip(origin, PATCH))]
            np.testing.assert_array_equal(batch["images"][i].numpy(), ref_image)
            np.testing.assert_array_equal(batch["instance_maps"][i].numpy(), ref_seg)
            ids, boxes = boxes_from_instance_map(ref_seg)
            np.testing.assert_array_equal(batch["targets"][i]["boxes"].numpy(), boxes.astype(np.float32))
            expected_labels = [records[case].instances[int(k)] for k in ids]
            assert batch["targets"][i]["labels"].tolist() == expected_labels
            assert batch["targets"][i]["labels"].dtype == torch.long
            np.testing.assert_array_equal(batch["seg"][i, 0].numpy(), (ref_seg > 0).astype(np.int64))


def test_boxes_follow_the_augmented_instance_map(preprocessed):
    params = AugmentationParams(p_rotation=1.0, p_scaling=1.0)
    stream = PatchBatchStream(_records(preprocessed), PATCH, batch_size=4, seed=0, augmentation=params)
    for index in range(3):
        batch = stream.make_batch(index)
        assert batch["images"].shape == (4, 2, *PATCH)
        for i in range(4):
            ids, boxes = boxes_from_instance_map(batch["instance_maps"][i].numpy())
            np.testing.assert_array_equal(batch["targets"][i]["boxes"].numpy(), boxes.astype(np.float32))
            assert len(batch["targets"][i]["labels"]) == len(ids)


def test_small_case_is_padded(preprocessed):
    records = [r for r in _records(preprocessed) if r.case_id == "small"]
    batch = PatchBatchStream(records, PATCH, batch_size=2, seed=0).make_batch(0)
    # the case is 10 voxels deep: 6 slices of the 16-voxel patch are padding (image 0; its values are ~5)
    depth_padding = (batch["images"][:, :, :, 8, 8] == 0).sum(dim=2)
    assert (depth_padding == 6).all()
    assert batch["targets"][0]["labels"].tolist() == [1]


def test_stream_is_deterministic_and_independent_of_workers(preprocessed):
    def batches(seed: int, workers: int) -> list:
        stream = PatchBatchStream(_records(preprocessed), PATCH, batch_size=2, seed=seed, num_batches=4,
                                  augmentation=AugmentationParams())
        return list(build_loader(stream, num_workers=workers, seed=seed))

    first, again, other = batches(7, 0), batches(7, 2), batches(8, 0)
    assert len(first) == len(again) == 4
    for a, b in zip(first, again):
        assert torch.equal(a["images"], b["images"]) and a["case_ids"] == b["case_ids"]
        assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a["targets"], b["targets"]))
    assert not all(torch.equal(a["images"], c["images"]) for a, c in zip(first, other))


def test_resumed_stream_continues_where_it_stopped(preprocessed):
    full = PatchBatchStream(_records(preprocessed), PATCH, batch_size=2, seed=4, num_batches=5)
    tail = PatchBatchStream(_records(preprocessed), PATCH, batch_size=2, seed=4, start_batch=3, num_batches=2)
    full_batches, tail_batches = list(full)[3:], list(tail)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(full_batches, tail_batches))


def test_read_region_matches_numpy_padding():
    array = np.arange(2 * 5 * 6 * 7).reshape(2, 5, 6, 7)
    start, size = (-2, 3, 4), (6, 5, 5)
    padded = np.pad(array, [(0, 0), (2, 4), (0, 2), (0, 2)], constant_values=-1)
    expected = padded[:, 0:6, 3:8, 4:9]
    np.testing.assert_array_equal(read_region(array, start, size, -1), expected)


def test_unlabelled_corpus_and_missing_files(preprocessed, tmp_path):
    assert list_corpus_cases(preprocessed) == ["big", "empty", "small"]
    records = load_case_records(preprocessed, ["big"], with_labels=False)
    batch = PatchBatchStream(records, PATCH, batch_size=2, seed=0, with_labels=False).make_batch(0)
    assert "targets" not in batch and batch["images"].shape == (2, 2, *PATCH)
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        load_case_records(preprocessed, ["nope"])
