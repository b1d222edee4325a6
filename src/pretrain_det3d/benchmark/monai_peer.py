"""MONAI's ``RetinaNetDetector`` as MONAI's own 3D detection tutorial sets it up: the quality benchmark's peer.

The tutorial (Project-MONAI/tutorials, ``detection/luna16_training.py`` with ``config/config_train_luna16_16g.json``)
builds, and this module builds the same, from MONAI's classes:

- backbone: ``monai.networks.nets.resnet.ResNet`` with bottleneck blocks ``[3, 4, 6, 3]`` (a 3-D ResNet-50),
  ``conv1_t_stride`` (2, 2, 1) over its image axes (x, y, z) and ``conv1_t_size = max(7, 2 * stride + 1)``;
  an FPN over ``returned_layers`` (1, 2) (``resnet_fpn_feature_extractor``), ``RetinaNet`` heads;
- anchors: ``AnchorGeneratorWithAnchorShape`` with base shapes (6, 8, 4), (8, 6, 5), (10, 10, 6) (x, y, z) at
  feature-map scales 1, 2, 4;
- matcher and sampler: ATSS with 4 candidates per level, ``center_in_gt=False``; hard-negative sampling of 64
  anchors per image, 30 % positives, pool size 20, at least 16 negatives; its default losses (focal classification,
  smooth-L1 box regression), the total weighted 1 : 1 as the tutorial's ``w_cls = 1``;
- inference: score threshold 0.05, top 1000 candidates per level, NMS at IoU 0.22, 100 detections per image.

What differs, and why: our arrays are ordered (z, y, x) where the tutorial's images are (x, y, z) after its RAS
orientation, so every per-axis tuple above is reversed here (stride (1, 2, 2), anchors (4, 8, 6), (5, 6, 8),
(6, 10, 10)); the input is our preprocessed, z-scored image rather than HU scaled to [0, 1]; the training patches,
sampling and augmentation are the benchmark's (the same batches every detector gets), and so are the optimiser
and schedule (SGD with Nesterov momentum 0.9, weight decay 3e-5, lr 0.01 as the tutorial; our poly decay with
linear warm-up where the tutorial steps its lr down every 150 epochs). A whole test volume smaller than the
tutorial's ``val_patch_size`` goes through the network at once, as the tutorial does (``use_inferer=False``).

Example:
    >>> peer = MonaiRetinaNetPeer(in_channels=1, num_classes=2)  # doctest: +SKIP
    >>> losses = peer.compute_losses(images, [{"boxes": boxes, "labels": labels}], seg)  # doctest: +SKIP
    >>> peer.predict_image(image)["boxes"].shape  # doctest: +SKIP
    (12, 6)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

# ---- the tutorial's values, in its (x, y, z) order ---------------------------------------------------------
TUTORIAL_CONV1_T_STRIDE_XYZ = (2, 2, 1)
TUTORIAL_ANCHOR_SHAPES_XYZ = ((6, 8, 4), (8, 6, 5), (10, 10, 6))
TUTORIAL_RETURNED_LAYERS = (1, 2)
TUTORIAL_RESNET_LAYERS = (3, 4, 6, 3)
TUTORIAL_ATSS_CANDIDATES = 4
TUTORIAL_SAMPLER = {"batch_size_per_image": 64, "positive_fraction": 0.3, "pool_size": 20, "min_neg": 16}
TUTORIAL_SCORE_THRESHOLD = 0.05
TUTORIAL_TOPK_PER_LEVEL = 1000
TUTORIAL_NMS_IOU = 0.22
TUTORIAL_DETECTIONS_PER_IMAGE = 100
TUTORIAL_CLS_WEIGHT = 1.0
#: training recipe of the tutorial, in this project's TrainingSettings keys
TUTORIAL_TRAINING = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 3e-5}

BOX_KEY = "box"
LABEL_KEY = "label"


def zyx(values_xyz: Sequence[Any]) -> tuple:
    """A per-axis tuple of the tutorial's (x, y, z) order in this project's array order (z, y, x)."""
    return tuple(reversed(tuple(values_xyz)))


class MonaiRetinaNetPeer(nn.Module):
    """MONAI's RetinaNet detector (tutorial set-up, axes as our arrays) behind this project's detector interface:
    ``compute_losses(images, targets, seg)`` for the trainer and ``predict_image(image)`` for evaluation.

    Labels are 0-based foreground classes, as ours and MONAI's; boxes are MONAI's standard mode over the array
    axes, as ours (``pretrain_det3d.data.boxes``), so no box conversion is needed.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        conv1_t_stride: Sequence[int] = zyx(TUTORIAL_CONV1_T_STRIDE_XYZ),
        base_anchor_shapes: Sequence[Sequence[int]] = tuple(zyx(s) for s in TUTORIAL_ANCHOR_SHAPES_XYZ),
        returned_layers: Sequence[int] = TUTORIAL_RETURNED_LAYERS,
    ) -> None:
        super().__init__()
        from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
        from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
        from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
        from monai.networks.nets import resnet

        self.num_classes = int(num_classes)
        returned_layers = [int(layer) for layer in returned_layers]
        stride = [int(s) for s in conv1_t_stride]
        anchor_generator = AnchorGeneratorWithAnchorShape(
            feature_map_scales=[2**level for level in range(len(returned_layers) + 1)],
            base_anchor_shapes=[list(shape) for shape in base_anchor_shapes],
        )
        backbone = resnet.ResNet(
            block=resnet.ResNetBottleneck,
            layers=list(TUTORIAL_RESNET_LAYERS),
            block_inplanes=resnet.get_inplanes(),
            n_input_channels=int(in_channels),
            conv1_t_stride=stride,
            conv1_t_size=[max(7, 2 * s + 1) for s in stride],
        )
        features = resnet_fpn_feature_extractor(backbone=backbone, spatial_dims=3, pretrained_backbone=False,
                                                trainable_backbone_layers=None, returned_layers=returned_layers)
        size_divisible = [s * 2 * 2 ** max(returned_layers) for s in features.body.conv1.stride]
        network = RetinaNet(spatial_dims=3, num_classes=self.num_classes,
                            num_anchors=anchor_generator.num_anchors_per_location()[0],
                            feature_extractor=features, size_divisible=size_divisible)
        detector = RetinaNetDetector(network=network, anchor_generator=anchor_generator, debug=False)
        detector.set_atss_matcher(num_candidates=TUTORIAL_ATSS_CANDIDATES, center_in_gt=False)
        detector.set_hard_negative_sampler(**TUTORIAL_SAMPLER)
        detector.set_target_keys(box_key=BOX_KEY, label_key=LABEL_KEY)
        detector.set_box_selector_parameters(score_thresh=TUTORIAL_SCORE_THRESHOLD,
                                             topk_candidates_per_level=TUTORIAL_TOPK_PER_LEVEL,
                                             nms_thresh=TUTORIAL_NMS_IOU,
                                             detections_per_img=TUTORIAL_DETECTIONS_PER_IMAGE)
        self.detector = detector
        self.build_kwargs = {"in_channels": int(in_channels), "num_classes": self.num_classes,
                             "conv1_t_stride": stride, "base_anchor_shapes": [list(s) for s in base_anchor_shapes],
                             "returned_layers": returned_layers}

    def compute_losses(self, images: Tensor, targets: list[dict[str, Tensor]], seg: Tensor | None = None
                       ) -> dict[str, Tensor]:
        """Classification and box-regression losses of one batch ``images [B, C, Z, Y, X]`` (``seg`` unused:
        MONAI's RetinaNet has no segmentation head)."""
        if len(targets) != images.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {images.shape[0]} images")
        self.detector.train()
        monai_targets = [
            {BOX_KEY: t["boxes"].to(images).reshape(-1, 6), LABEL_KEY: t["labels"].to(images.device, torch.long)}
            for t in targets
        ]
        out = self.detector([image for image in images], monai_targets)
        cls_loss = out[self.detector.cls_key]
        box_loss = out[self.detector.box_reg_key]
        return {"loss": TUTORIAL_CLS_WEIGHT * cls_loss + box_loss, "cls": cls_loss, "box_reg": box_loss}

    @torch.no_grad()
    def predict_image(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Detections on a whole image ``[C, Z, Y, X]``: numpy ``boxes [N, 6]``, ``scores [N]``, ``labels [N]``
        (voxels of the image, best score first)."""
        self.detector.eval()
        device = next(self.parameters()).device
        tensor = torch.from_numpy(np.array(image, dtype=np.float32)).to(device)  # a copy: cached arrays may be read-only
        out = self.detector([tensor], use_inferer=False)[0]
        boxes = out[self.detector.target_box_key].float().cpu().numpy().reshape(-1, 6)
        scores = out[self.detector.pred_score_key].float().cpu().numpy().reshape(-1)
        labels = out[self.detector.target_label_key].cpu().numpy().reshape(-1).astype(np.int64)
        order = np.argsort(-scores, kind="stable")
        return {"boxes": boxes[order], "scores": scores[order], "labels": labels[order]}
