"""Tests for inference.sliding_window: tiling, box offsets, mirroring and consolidation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.inference.sliding_window import (
    box_flip_offset,
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
    """Boxes the voxels above 0.5 in channel 0 of each tile as the training targets are boxed
    (``boxes_from_instance_map``): a stand-in for a perfect detector."""

    def __init__(self) -> None:
        super().__init__()
        self.counter = 0

    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            _, boxes = boxes_from_instance_map((image[0] > 0.5).numpy().astype(np.int16))
            self.counter += 1
            scores = torch.full((len(boxes),), 0.5 + 0.01 * self.counter)  # a different score per call
            out.append({"boxes": torch.from_numpy(boxes).float(), "scores": scores,
                        "labels": torch.ones(len(boxes), dtype=torch.long)})
        return out


class ScriptedDetector(nn.Module):
    """Returns, on its i-th tile, the i-th of a list of (boxes, scores) (in tile coordinates)."""

    def __init__(self, outputs: list[tuple[list[list[float]], list[float]]]) -> None:
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in images:
            boxes, scores = self.outputs[self.calls]
            self.calls += 1
            out.append({"boxes": torch.tensor(boxes).view(-1, 6), "scores": torch.tensor(scores),
                        "labels": torch.zeros(len(scores), dtype=torch.long)})
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
    # half-open boxes (offset 0): z [1, 4) in 10 -> [10 - 4, 10 - 1) = [6, 9); x [3, 8) in 14 -> [6, 11)
    assert flip_boxes(boxes, [0, 2], [10, 12, 14], offset=0).tolist() == [[6.0, 2.0, 6.0, 9.0, 6.0, 11.0]]
    # nnDetection's [first - 1, last + 1] boxes (offset -1): z [1, 4] -> [9 - 4, 9 - 1] = [5, 8]
    assert flip_boxes(boxes, [0], [10, 12, 14], offset=-1).tolist() == [[5.0, 2.0, 3.0, 8.0, 6.0, 8.0]]
    assert torch.equal(flip_boxes(flip_boxes(boxes, [1, 2], [10, 12, 14]), [1, 2], [10, 12, 14]), boxes)
    assert mirror_combinations([2, 0]) == [(), (0,), (2,), (0, 2)]
    with pytest.raises(ValueError, match="mirror"):
        mirror_combinations([3])


@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (0, 2), (0, 1, 2)])
def test_box_of_a_flipped_volume_returns_to_its_place(axes) -> None:
    mask = np.zeros((11, 14, 9), dtype=np.int16)
    mask[2:5, 3:11, 6:8] = 1  # asymmetric along every axis
    _, truth = boxes_from_instance_map(mask)
    _, on_flipped = boxes_from_instance_map(np.flip(mask, axis=axes).copy())
    back = flip_boxes(on_flipped, axes, mask.shape)
    np.testing.assert_allclose(back, truth, atol=1e-6)
    # the test can fail: one voxel of offset off and the box lands elsewhere
    wrong = flip_boxes(on_flipped, axes, mask.shape, offset=box_flip_offset() + 1)
    assert np.abs(wrong - truth).max() >= 1.0


def test_mirrored_predictions_map_back_exactly_and_fuse() -> None:
    image = np.zeros((1, 20, 20, 20), dtype=np.float32)
    image[0, 3:7, 5:12, 10:19] = 1.0  # asymmetric: any wrong flip-back lands elsewhere
    _, truth = boxes_from_instance_map((image[0] > 0.5).astype(np.int16))
    detector = BrightRegionDetector()
    result = predict_case(detector, image, patch_size=(20, 20, 20), mirror_axes=(0, 1, 2))  # default consolidation
    assert detector.counter == 8
    # the 8 mirrored predictions coincide after mapping back, so WBC fuses them into one box at the same place,
    # scored with their mean (IoU 1, weight 1, none missing): mean(0.51, ..., 0.58) = 0.545
    np.testing.assert_allclose(result["boxes"], truth, atol=1e-6)
    np.testing.assert_allclose(result["scores"], [0.545], atol=1e-6)
    assert result["labels"].tolist() == [1]


def test_tile_weighting_keeps_the_central_tiles_box() -> None:
    # image z 24 with tiles of 16 at overlap 0.5 -> tiles at z 0 and z 8 (y, x: one tile each)
    image = np.zeros((1, 24, 16, 16), dtype=np.float32)
    # Both tiles see one object. Tile 0 boxes it at z [13, 16), tile 1 at z [13.5, 16.5) (image coordinates),
    # y and x [12, 15) in both; their IoU is 2.5 / 3.5 > 0.1, so NMS keeps one of them.
    # Weights (tile centre (8, 8, 8), centre-to-corner distance sqrt(192) = 13.856):
    #   tile 0: box centre (14.5, 13.5, 13.5), offset (6.5, 5.5, 5.5), distance sqrt(102.75) = 10.137,
    #           ratio 0.7315 -> weight 1 - 0.2315 = 0.7685; rank 0.9 x 0.7685 = 0.692
    #   tile 1: box centre in the tile (15 - 8, 13.5, 13.5) = (7, 13.5, 13.5), offset (-1, 5.5, 5.5), distance
    #           sqrt(61.5) = 7.842, ratio 0.5660 -> weight 0.9340; rank 0.8 x 0.9340 = 0.747
    # (with a box convention whose tile centre is 7.5 the weights are 0.706 and 0.889: the same winner)
    outputs = [([[13.0, 12, 12, 16, 15, 15]], [0.9]), ([[5.5, 12, 12, 8.5, 15, 15]], [0.8])]
    weighted = predict_case(ScriptedDetector(outputs), image, patch_size=(16, 16, 16))
    np.testing.assert_allclose(weighted["boxes"], [[13.5, 12, 12, 16.5, 15, 15]], atol=1e-9)
    np.testing.assert_allclose(weighted["scores"], [0.8], atol=1e-6)  # the box's own score
    # ranked by score alone, the border tile's better score wins
    plain = predict_case(ScriptedDetector(outputs), image, patch_size=(16, 16, 16), weighted_nms=False)
    np.testing.assert_allclose(plain["boxes"], [[13.0, 12, 12, 16, 15, 15]], atol=1e-9)


def test_boxes_below_the_minimum_size_are_removed() -> None:
    image = np.zeros((1, 16, 16, 16), dtype=np.float32)
    thin = [2.0, 2.0, 2.0, 6.0, 6.0, 2.005]  # x extent 0.005 < the default minimum 0.01
    assert len(predict_case(FixedBoxDetector(thin), image, patch_size=(16, 16, 16))["boxes"]) == 0
    kept = predict_case(FixedBoxDetector(thin), image, patch_size=(16, 16, 16), min_box_size=0.001)
    np.testing.assert_allclose(kept["boxes"], [thin], atol=1e-6)


def test_several_models_are_fused_as_sources() -> None:
    image = np.zeros((1, 16, 16, 16), dtype=np.float32)
    box = [2.0, 2.0, 2.0, 6.0, 6.0, 6.0]
    one = ScriptedDetector([([box], [0.9])])
    other = ScriptedDetector([([[2.0, 2.0, 2.0, 6.0, 6.0, 5.0]], [0.6])])
    result = predict_case([one, other], image, patch_size=(16, 16, 16))
    # IoU 48/64 = 0.75 > 0.5: one cluster; m = [1, 0.75], m x s = [0.9, 0.45]; two sources expected, two found
    #   score = 1.35 / 1.75 = 0.771429; x_max = (6 * 0.9 + 5 * 0.45) / 1.35 = 7.65 / 1.35 = 5.6667
    np.testing.assert_allclose(result["scores"], [1.35 / 1.75], atol=1e-6)
    np.testing.assert_allclose(result["boxes"], [[2, 2, 2, 6, 6, 7.65 / 1.35]], atol=1e-6)
    # a model that finds nothing halves the score of the lone box: 0.9 / (1 + 1)
    empty = ScriptedDetector([([], [])])
    alone = predict_case([ScriptedDetector([([box], [0.9])]), empty], image, patch_size=(16, 16, 16))
    np.testing.assert_allclose(alone["scores"], [0.45], atol=1e-6)
