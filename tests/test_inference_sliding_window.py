"""Tests for inference.sliding_window: tiling, box offsets, mirroring and consolidation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from pretrain_det3d.inference.sliding_window import (
    flip_boxes,
    mirror_combinations,
    predict_case,
    tile_positions,
    tile_starts,
)




class FixedBoxDetector(nn.Module):
    """Returns the same box in every tile; the score encodes the tile's mean so every tile differs."""

    def __init__(self, box: list[float]) -> None:
        super().__init__()
        self.box = torch.tensor([box])
        self.calls: list[tuple[int, ...]] = []

    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        self.calls.append(tuple(images.shape))
        return [
            {"boxes": self.box.clone(), "scores": torch.sigmoid(image.mean()).view(1), "labels": torch.tensor([0])}
            for image in images
        ]


class BrightRegionDetector(nn.Module):
    """Boxes the voxels above 0.5 in channel 0 of each tile (a stand-in for a perfect detector)."""

    def __init__(self) -> None:
        super().__init__()
        self.counter = 0

    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            idx = torch.nonzero(image[0] > 0.5)
            self.counter += 1
            if len(idx) == 0:
                empty = {"boxes": torch.zeros(0, 6), "scores": torch.zeros(0), "labels": torch.zeros(0).long()}
                out.append(empty)
                continue
            box = torch.cat([idx.min(0).values, idx.max(0).values + 1]).float().view(1, 6)
            # a different score per call, so that NMS has a strict order
            out.append({"boxes": box, "scores": torch.tensor([0.5 + 0.01 * self.counter]), "labels": torch.tensor([1])})
        return out


def test_tile_starts_hand_worked() -> None:
    # size 100, patch 48, overlap 0.5: step <= 24 -> ceil(52 / 24) + 1 = 4 tiles, spread 52 / 3 = 17.33
    assert tile_starts(100, 48, 0.5) == [0, 17, 35, 52]
    assert tile_starts(96, 48, 0.0) == [0, 48]
    assert tile_starts(48, 48, 0.5) == [0]
    assert tile_starts(30, 48, 0.5) == [0]  # padded later
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 48, 1.0)


@pytest.mark.parametrize("shape, patch, overlap", [((37, 20, 64), (16, 20, 24), 0.5), ((50, 9, 33), (8, 8, 8), 0.25)])
def test_tiles_cover_the_image_and_stay_inside(shape, patch, overlap) -> None:
    covered = np.zeros(shape, dtype=bool)
    for z, y, x in tile_positions(shape, patch, overlap):
        assert 0 <= z <= shape[0] - patch[0] and 0 <= y <= shape[1] - patch[1] and 0 <= x <= shape[2] - patch[2]
        covered[z : z + patch[0], y : y + patch[1], x : x + patch[2]] = True
    assert covered.all()


def test_fixed_box_per_tile_comes_back_offset_by_the_tile_start() -> None:
    image = np.random.default_rng(0).normal(size=(1, 40, 24, 24)).astype(np.float32)
    detector = FixedBoxDetector([1.0, 1.0, 1.0, 3.0, 3.0, 3.0])
    result = predict_case(detector, image, patch_size=(16, 16, 16), overlap=0.5, batch_size=3)
    starts = list(itertools.product([0, 8, 16, 24], [0, 8], [0, 8]))  # hand-worked tile starts
    expected = sorted(tuple(float(v) for v in (1 + z, 1 + y, 1 + x, 3 + z, 3 + y, 3 + x)) for z, y, x in starts)
    assert sorted(tuple(b) for b in result["boxes"].tolist()) == expected
    assert np.all(np.diff(result["scores"]) <= 0)  # best first
    assert [c[0] for c in detector.calls] == [3, 3, 3, 3, 3, 1]  # 16 tiles in batches of 3
    # max_detections keeps the best ones
    top = predict_case(detector, image, patch_size=(16, 16, 16), max_detections=5)
    assert len(top["boxes"]) == 5
    np.testing.assert_array_equal(top["scores"], result["scores"][:5])


def test_small_image_is_padded_and_boxes_in_the_padding_dropped() -> None:
    image = np.zeros((1, 10, 16, 16), dtype=np.float32)
    inside = predict_case(FixedBoxDetector([2.0, 2.0, 2.0, 4.0, 4.0, 4.0]), image, patch_size=(16, 16, 16))
    assert inside["boxes"].tolist() == [[2.0, 2.0, 2.0, 4.0, 4.0, 4.0]]
    in_padding = predict_case(FixedBoxDetector([12.0, 2.0, 2.0, 14.0, 4.0, 4.0]), image, patch_size=(16, 16, 16))
    assert len(in_padding["boxes"]) == 0
    straddling = predict_case(FixedBoxDetector([8.0, 2.0, 2.0, 14.0, 4.0, 4.0]), image, patch_size=(16, 16, 16))
    assert straddling["boxes"].tolist() == [[8.0, 2.0, 2.0, 10.0, 4.0, 4.0]]  # clipped to the image


def test_flip_boxes_hand_worked_and_self_inverse() -> None:
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0, 6.0, 8.0]])
    assert flip_boxes(boxes, [0, 2], [10, 12, 14]).tolist() == [[6.0, 2.0, 6.0, 9.0, 6.0, 11.0]]
    assert torch.equal(flip_boxes(flip_boxes(boxes, [1, 2], [10, 12, 14]), [1, 2], [10, 12, 14]), boxes)
    assert mirror_combinations([2, 0]) == [(), (0,), (2,), (0, 2)]
    with pytest.raises(ValueError, match="mirror"):
        mirror_combinations([3])


def test_mirrored_predictions_flip_back_exactly() -> None:
    image = np.zeros((1, 20, 20, 20), dtype=np.float32)
    image[0, 3:7, 5:12, 10:19] = 1.0  # asymmetric: any wrong flip-back lands elsewhere
    truth = [3.0, 5.0, 10.0, 7.0, 12.0, 19.0]
    detector = BrightRegionDetector()
    # With IoU threshold 0.99 only identical boxes suppress each other: 8 flips x 1 tile -> exactly one box.
    result = predict_case(detector, image, patch_size=(20, 20, 20), mirror_axes=(0, 1, 2), nms_iou=0.99)
    assert detector.counter == 8
    assert result["boxes"].tolist() == [truth]
    assert result["labels"].tolist() == [1]
