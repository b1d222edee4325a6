"""The MONAI peer: the tutorial's set-up in our axis order, behind our detector interface."""

from __future__ import annotations

import pytest
import torch

from pretrain_det3d.benchmark.monai_peer import (
    TUTORIAL_ANCHOR_SHAPES_XYZ, TUTORIAL_CONV1_T_STRIDE_XYZ, MonaiRetinaNetPeer, zyx,
)


@pytest.fixture(scope="module")
def peer() -> MonaiRetinaNetPeer:
    torch.manual_seed(0)
    return MonaiRetinaNetPeer(in_channels=1, num_classes=2)


def test_tutorial_axes_are_reversed_into_array_order(peer):
    assert zyx((2, 2, 1)) == (1, 2, 2)
    assert peer.build_kwargs["conv1_t_stride"] == [1, 2, 2]
    assert [tuple(s) for s in peer.build_kwargs["base_anchor_shapes"]] == [(4, 8, 6), (5, 6, 8), (6, 10, 10)]
    assert tuple(peer.detector.network.feature_extractor.body.conv1.stride) == zyx(TUTORIAL_CONV1_T_STRIDE_XYZ)
    # the anchors MONAI generates at the finest level have the reversed tutorial shapes as (z, y, x) extents;
    # MONAI rounds half extents half-to-even, so (5, 6, 8) becomes (4, 6, 8) there, as in the tutorial's x axis
    generator = peer.detector.anchor_generator
    extents = [tuple((a[3:] - a[:3]).tolist()) for a in generator.cell_anchors[0]]
    assert extents == [(4.0, 8.0, 6.0), (4.0, 6.0, 8.0), (6.0, 10.0, 10.0)]
    assert [tuple((a[3:] - a[:3]).tolist()) for a in generator.cell_anchors[1]] == [
        tuple(2.0 * v for v in zyx(s)) for s in TUTORIAL_ANCHOR_SHAPES_XYZ]


def test_resnet50_with_the_tutorials_sampler_and_matcher(peer):
    body = peer.detector.network.feature_extractor.body
    assert [len(getattr(body, f"layer{i}")) for i in (1, 2)] == [3, 4]  # ResNet-50's first two stages
    sampler = peer.detector.fg_bg_sampler
    assert (sampler.batch_size_per_image, sampler.positive_fraction, sampler.min_neg, sampler.pool_size) == (
        64, 0.3, 16, 20)
    assert type(peer.detector.proposal_matcher).__name__ == "ATSSMatcher"
    assert peer.detector.proposal_matcher.num_candidates == 4


def test_losses_backpropagate_and_an_empty_target_is_allowed(peer):
    torch.manual_seed(1)
    images = torch.randn(2, 1, 32, 32, 32)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 8.0, 16.0, 14.0, 18.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 6), "labels": torch.zeros(0, dtype=torch.long)}]
    peer.zero_grad()
    losses = peer.compute_losses(images, targets, torch.zeros(2, 1, 32, 32, 32))
    assert set(losses) == {"loss", "cls", "box_reg"}
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    assert losses["loss"].item() == pytest.approx(losses["cls"].item() + losses["box_reg"].item(), rel=1e-6)
    losses["loss"].backward()
    grads = [p.grad for p in peer.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="got 1 targets for a batch of 2"):
        peer.compute_losses(images, targets[:1])
