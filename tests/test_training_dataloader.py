"""Patch batches: foreground oversampling, boxes from the instance map, padding, determinism."""

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
    read_region,
)

PATCH = (16, 16, 16)


def _write_case(root: Path, case: str, image: np.ndarray, seg: np.ndarray, instances: dict[int, int]) -> None:
    cases = root / "cases"
    cases.mkdir(parents=True, exist_ok=True)
    np.save(cases / f"{case}.npy", image.astype(np.float32))
    np.save(cases / f"{case}_seg.npy", seg.astype(np.int16))
    locations = np.argwhere(seg > 0)[::3].tolist()
    meta = {"instances": {str(k): v for k, v in instances.items()}, "foreground_locations": locations}
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
