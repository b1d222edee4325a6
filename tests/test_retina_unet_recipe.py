"""config/paper.yaml's Retina U-Net, built on ResEnc-L, has the structure of the authors' nnDetection release
(retinaunet_l1_focal_atss_ms_ema_for_ResEnc.yaml, RetinaUNetFocalV002_ResEnc): head levels, UFPN widths, head
depth and norm, and the loss recipe. Built on the meta device: nothing is allocated and no forward runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from pretrain_det3d.models.registry import build_detector
from pretrain_det3d.models.retina_unet import RetinaUNet
from pretrain_det3d.settings.detectors import RetinaUNetSettings

REPO = Path(__file__).resolve().parents[1]
# a spread of lesion sizes, as a plan.json would list them (anchors are planned from these)
PLAN = {"box_sizes": [[4, 4, 4], [6, 8, 8], [10, 12, 12], [16, 16, 20], [30, 28, 28], [60, 64, 50]]}


@pytest.fixture(scope="module")
def paper_model() -> RetinaUNet:
    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    entry = dict(config["detectors"]["retina_unet"])
    RetinaUNetSettings.parse(entry, where="detectors.retina_unet")  # the entry is valid as it stands
    settings = {**entry, "preset": entry.get("preset", config["backbone"])}
    assert settings["preset"] == "resenc_l"
    with torch.device("meta"):
        model = build_detector("retina_unet", settings, 1, 1, PLAN)
    return model


def test_head_levels_and_strides_are_the_releases(paper_model: RetinaUNet) -> None:
    assert paper_model.stage_strides == [1, 2, 4, 8, 16, 32]
    assert paper_model.head_levels == [2, 3, 4, 5] and paper_model.head_strides == [4, 8, 16, 32]
    assert len(paper_model.build_kwargs["anchor_shapes"]) == 4


def test_ufpn_widths_and_convs(paper_model: RetinaUNet) -> None:
    # fpn 128 on the head levels, halved per level below them (min 8): 32-64-128-128-128-128
    assert paper_model.decoder_widths == [32, 64, 128, 128, 128, 128]
    decoder = paper_model.decoder
    assert [m.out_channels for m in decoder.lateral] == [32, 64, 128, 128, 128, 128]
    assert [m.in_channels for m in decoder.lateral] == [32, 64, 128, 256, 320, 320]
    assert all(isinstance(up, torch.nn.ConvTranspose3d) and up.bias is None and up.stride == (2, 2, 2)
               for up in decoder.up)
    assert not [m for m in decoder.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.InstanceNorm3d))]
    assert paper_model.seg_head.in_channels == 32 and paper_model.seg_head.out_channels == 2


def test_heads_depth_groupnorm_and_anchors(paper_model: RetinaUNet) -> None:
    anchors = paper_model.num_anchors_per_location
    assert anchors == 27  # the release: 3 sizes per axis, all their products
    assert anchors == paper_model.build_kwargs.get("anchors_per_level", RetinaUNetSettings.default("anchors_per_level"))
    assert all(len(level) == anchors for level in paper_model.build_kwargs["anchor_shapes"])
    for head, per_anchor in ((paper_model.cls_head, 1), (paper_model.reg_head, 6)):
        convs = [m for m in head.tower if isinstance(m, torch.nn.Conv3d)]
        norms = [m for m in head.tower if isinstance(m, torch.nn.GroupNorm)]
        # nnDetection's num_convs 1: the input conv plus one more, each with GroupNorm and LeakyReLU
        assert len(convs) == 2 and all(c.in_channels == c.out_channels == 128 for c in convs)
        assert len(norms) == 2 and all(n.num_channels // n.num_groups == 16 and n.affine for n in norms)
        assert head.out.out_channels == anchors * per_anchor
    assert paper_model.reg_head.scales is not None and paper_model.reg_head.scales.shape == (4,)
    assert paper_model.cls_head.scales is None


def test_loss_recipe_is_the_releases(paper_model: RetinaUNet) -> None:
    assert paper_model.focal_gamma == 1.0 and paper_model.focal_alpha == 0.75
    assert paper_model.loss_weights == {"cls": 0.3, "reg": 1.0, "seg_ce": 0.5, "seg_dice": 0.5}
    assert paper_model.reg_smooth_l1_beta == 1.0
    ema = paper_model.positive_ema
    assert ema.beta == 0.7 and ema.bias_correction_steps == 5000
    assert paper_model.matcher.num_candidates == 4 and paper_model.matcher.center_in_gt is False
    assert paper_model.box_selector.detections_per_img == 100
    assert paper_model.dice_loss.batch and paper_model.dice_loss.smooth_nr == 0.0
    assert not hasattr(paper_model, "sampler")  # every anchor enters the classification loss


@pytest.mark.parametrize("name", ["retina_unet", "deformable_detr"])
def test_paper_training_loop_precision_and_clipping_are_the_releases(name: str) -> None:
    # gpu1_mixed16 (fp16 with loss scaling) and no gradient clipping, for both ResEnc detectors of the paper config
    from pretrain_det3d.settings.detectors import detector_settings_class

    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    settings = detector_settings_class(name).parse(config["detectors"][name], where=f"detectors.{name}")
    assert (settings.amp_dtype, settings.grad_clip, settings.warmup_start_lr) == ("float16", None, 1e-6)
