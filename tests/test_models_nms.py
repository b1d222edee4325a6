"""models.nms against MONAI: greedy_nms keeps what MONAI's non_max_suppression keeps, class_wise_greedy_nms what its
batched_nms keeps, and FastNMSBoxSelector selects what MONAI's BoxSelector selects; plus hand-worked cases."""

import pytest
import torch
from monai.apps.detection.utils.box_selector import BoxSelector
from monai.data.box_utils import batched_nms, non_max_suppression

from pretrain_det3d.models import nms
from pretrain_det3d.models.nms import FastNMSBoxSelector, class_wise_greedy_nms, greedy_nms


def random_boxes(generator: torch.Generator, count: int, dims: int = 3, size: float = 20.0) -> torch.Tensor:
    low = torch.rand(count, dims, generator=generator) * 40
    extent = torch.rand(count, dims, generator=generator) * size
    extent[: count // 10] = 0  # some flat boxes: zero volume
    return torch.cat([low, low + extent], dim=1)


def test_hand_worked():
    boxes = torch.tensor([[0., 0, 0, 4, 4, 4],    # IoU with box 1: 48 / 64 = 0.75
                          [0., 0, 0, 4, 4, 3],
                          [3., 3, 3, 7, 7, 7],    # IoU with box 0: 1 / 127 < 0.1, with box 1: 0
                          [20., 20, 20, 21, 21, 21]])
    scores = torch.tensor([0.5, 0.9, 0.4, 0.1])
    assert greedy_nms(boxes, scores, 0.1).tolist() == [1, 2, 3]
    assert greedy_nms(boxes, scores, 0.8).tolist() == [1, 0, 2, 3]
    assert greedy_nms(boxes, scores, 0.1, max_keep=2).tolist() == [1, 2]
    # two classes: box 0 is not suppressed by box 1 of the other class
    labels = torch.tensor([0, 1, 0, 0])
    assert class_wise_greedy_nms(boxes, scores, labels, 0.1).tolist() == [1, 0, 2, 3]
    # an IoU equal to the threshold (4 / 8, exact in float32) does not suppress, as in MONAI
    half = torch.tensor([[0., 0, 0, 2, 2, 2], [0., 0, 0, 2, 2, 1]])
    assert greedy_nms(half, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert non_max_suppression(half, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert greedy_nms(half, torch.tensor([0.9, 0.8]), 0.49).tolist() == [0]


def test_empty_and_mismatched_input():
    assert greedy_nms(torch.zeros(0, 6), torch.zeros(0), 0.1).tolist() == []
    assert class_wise_greedy_nms(torch.zeros(0, 6), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.1).tolist() \
        == []
    with pytest.raises(ValueError, match="3 boxes but 2 scores"):
        greedy_nms(torch.zeros(3, 6), torch.zeros(2), 0.1)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.5])
def test_greedy_nms_is_monai_non_max_suppression(dims, dtype, threshold):
    generator = torch.Generator().manual_seed(dims * 10 + int(threshold * 10))
    boxes = random_boxes(generator, 600, dims).to(dtype)
    scores = torch.rand(600, generator=generator)
    scores[100:150] = scores[50:100]  # ties: the earlier box ranks first in both
    kept = {}
    for max_keep in (-1, 40):
        kept[max_keep] = non_max_suppression(boxes, scores, threshold, max_proposals=max_keep)
        assert torch.equal(greedy_nms(boxes, scores, threshold, max_keep=max_keep), kept[max_keep])
    assert 40 < len(kept[-1]) < 600  # the set has overlaps that suppress and boxes that survive
    assert len(kept[40]) == 40


@pytest.mark.parametrize("threshold", [0.1, 0.5])
@pytest.mark.parametrize("block_rows", [1, 7, nms.BLOCK_ROWS])
def test_class_wise_is_monai_batched_nms(threshold, block_rows, monkeypatch):
    monkeypatch.setattr(nms, "BLOCK_ROWS", block_rows)  # the block-wise scan equals the one-box-at-a-time one
    generator = torch.Generator().manual_seed(3)
    boxes = random_boxes(generator, 2000)
    scores = torch.rand(2000, generator=generator)
    labels = torch.randint(0, 3, (2000,), generator=generator)
    for max_keep in (-1, 100):
        reference = batched_nms(boxes, scores, labels, threshold, max_proposals=max_keep)
        ours = class_wise_greedy_nms(boxes, scores, labels, threshold, max_keep=max_keep)
        assert torch.equal(ours, reference)
    assert len(class_wise_greedy_nms(boxes, scores, labels, threshold, max_keep=100)) == 100


@pytest.mark.parametrize("score_thresh", [0.0, 0.3])
def test_selector_is_monai_box_selector(score_thresh):
    generator = torch.Generator().manual_seed(5)
    kwargs = dict(apply_sigmoid=True, score_thresh=score_thresh, topk_candidates_per_level=300, nms_thresh=0.1,
                  detections_per_img=100)
    spatial_size = [32, 32, 32]
    boxes = [random_boxes(generator, n, size=12.0) - 4 for n in (2000, 400, 60)]  # some reach outside the patch
    logits = [torch.randn(n, 2, generator=generator) * 2 for n in (2000, 400, 60)]
    reference = BoxSelector(**kwargs).select_boxes_per_image(boxes, logits, spatial_size)
    ours = FastNMSBoxSelector(**kwargs).select_boxes_per_image(boxes, logits, spatial_size)
    assert len(reference[0]) > 20
    for mine, theirs in zip(ours, reference):
        assert mine.dtype == theirs.dtype
        assert torch.equal(mine, theirs)


def test_retina_unet_uses_it():
    from pretrain_det3d.models.retina_unet import RetinaUNet

    net = RetinaUNet("resenc_demo", 1, 1, anchor_shapes=[[[4, 4, 4]], [[8, 8, 8]]], head_strides=[4, 8])
    assert isinstance(net.box_selector, FastNMSBoxSelector)
