"""box_iou_unchecked against MONAI's box_iou (bit for bit) and MONAI's NMS kept boxes with either metric."""

import pytest
import torch
from monai.data.box_utils import batched_nms, box_iou

from pretrain_det3d.models.box_overlap import box_iou_unchecked


def random_boxes(generator: torch.Generator, count: int, dims: int = 3, size: float = 20.0) -> torch.Tensor:
    low = torch.rand(count, dims, generator=generator) * 40
    extent = torch.rand(count, dims, generator=generator) * size
    extent[: count // 10] = 0  # some flat boxes: zero volume
    return torch.cat([low, low + extent], dim=1)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_identical_to_monai_box_iou(dims, dtype):
    generator = torch.Generator().manual_seed(dims)
    a = random_boxes(generator, 50, dims).to(dtype)
    b = random_boxes(generator, 70, dims).to(dtype)
    ours, monai = box_iou_unchecked(a, b), box_iou(a, b)
    assert ours.dtype == monai.dtype == dtype
    assert torch.equal(ours, monai)
    assert (ours > 0.1).sum() > 20  # the set has real overlaps, not only zeros


def test_integer_boxes_give_float32_as_monai():
    a = torch.tensor([[0, 0, 0, 2, 2, 2]])
    b = torch.tensor([[1, 1, 1, 3, 3, 3], [0, 0, 0, 2, 2, 1]])
    ours = box_iou_unchecked(a, b)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, box_iou(a, b))
    assert ours[0, 0].item() == pytest.approx(1 / 15)  # hand-worked: 1 / (8 + 8 - 1)
    assert ours[0, 1].item() == pytest.approx(0.5)


@pytest.mark.parametrize("threshold", [0.1, 0.5])
def test_nms_keeps_the_same_boxes(threshold):
    generator = torch.Generator().manual_seed(3)
    boxes = random_boxes(generator, 800)
    scores = torch.rand(800, generator=generator)
    labels = torch.randint(0, 2, (800,), generator=generator)
    reference = batched_nms(boxes, scores, labels, threshold, max_proposals=100)
    ours = batched_nms(boxes, scores, labels, threshold, max_proposals=100, box_overlap_metric=box_iou_unchecked)
    assert len(reference) == 100
    assert torch.equal(ours, reference)


def test_retina_unet_uses_it():
    from pretrain_det3d.models.retina_unet import RetinaUNet

    net = RetinaUNet("resenc_demo", 1, 1, anchor_shapes=[[[4, 4, 4]], [[8, 8, 8]]], head_strides=[4, 8])
    assert net.box_selector.box_overlap_metric is box_iou_unchecked
