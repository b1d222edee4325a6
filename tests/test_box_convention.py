"""One box convention from mask to metric: nnDetection's ``[first - 1, last + 1]`` per axis, unclipped, in the
training targets of a cropped patch and in the evaluation ground truth, and the metrics on such boxes agree with
MONAI's COCOMetric fed the same boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

from pretrain_det3d.data.boxes import boxes_from_instance_map
from pretrain_det3d.data.io import write_case
from pretrain_det3d.evaluation.matching import match_case
from pretrain_det3d.evaluation.metrics import (
    AP_IOU_THRESHOLDS,
    MAP_IOU_RANGE,
    compute_ap_metrics,
    evaluation_iou_thresholds,
)
from pretrain_det3d.evaluation.run import load_ground_truth
from pretrain_det3d.training.dataloader import CaseRecord, detection_targets


def test_training_targets_of_a_patch_cut_object_reach_past_the_patch() -> None:
    """nnDetection makes its targets from the patch's instance map without clipping: an object cut by the
    patch's low border gets min -1 there, one cut by the high border gets max = patch size."""
    patch = np.zeros((6, 6, 6), dtype=np.int16)
    patch[0:2, 2:4, 5] = 1  # cut by z = 0 and x = 5 (the last index)
    patch[3, 3, 3] = 2  # a single voxel inside
    record = CaseRecord(case_id="a", image_path=Path("a.npy"), seg_path=Path("a_seg.npy"), instances={1: 0, 2: 1},
                        foreground_locations=np.zeros((0, 3), dtype=np.int64))
    targets = detection_targets(patch, record)
    assert targets["boxes"].tolist() == [[-1, 1, 4, 2, 4, 6], [2, 2, 2, 4, 4, 4]]
    assert targets["labels"].tolist() == [0, 1]


def test_evaluation_ground_truth_is_unclipped_nndetection_boxes(tmp_path: Path) -> None:
    instance_map = np.zeros((5, 6, 7), dtype=np.int16)
    instance_map[0, 0, 0] = 1  # corner voxel: box reaches -1 on every axis
    instance_map[2:5, 1:4, 3:7] = 2  # 3 x 3 x 4 block touching the far z and x borders
    write_case(tmp_path, "a", np.zeros((1, 5, 6, 7), np.int16), instance_map, {1: 0, 2: 1}, (1.0, 1.0, 1.0))
    truth = load_ground_truth(tmp_path, "a")
    # by hand: [first - 1, last + 1] per axis
    assert truth.boxes.tolist() == [[-1, -1, -1, 1, 1, 1], [1, 0, 2, 5, 4, 7]]
    assert truth.labels.tolist() == [0, 1]


def _mask_dataset(rng: np.random.Generator, num_cases: int) -> list[tuple]:
    """Cases of ground truth made from masks (blocks, some at the volume border) and noisy predictions."""
    shape = np.array([20, 24, 24])
    cases = []
    for _ in range(num_cases):
        instance_map = np.zeros(tuple(shape), dtype=np.int16)
        for instance_id in range(1, int(rng.integers(1, 5)) + 1):
            size = rng.integers(1, 7, size=3)
            start = np.minimum(rng.integers(-2, shape), shape - size).clip(0)  # -2 piles some onto index 0
            instance_map[tuple(slice(a, a + b) for a, b in zip(start, size))] = instance_id
        ids, gt_boxes = boxes_from_instance_map(instance_map)
        gt_labels = np.zeros(len(ids), dtype=np.int64)
        num_pred = int(rng.integers(0, 12))
        source = gt_boxes[rng.integers(0, len(gt_boxes), num_pred)]
        pred_boxes = source + rng.normal(0, 1.0, (num_pred, 6))
        pred_boxes[:, 3:] = np.maximum(pred_boxes[:, 3:], pred_boxes[:, :3] + 0.5)
        cases.append((pred_boxes, rng.random(num_pred), np.zeros(num_pred, dtype=np.int64), gt_boxes, gt_labels))
    return cases


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_on_mask_boxes_agree_with_monai_coco_metric(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cases = _mask_dataset(rng, num_cases=8)
    assert any((gt[:, :3] < 0).any() for *_, gt, _ in cases), "some ground truth must touch the border"
    thresholds = evaluation_iou_thresholds()
    ours = compute_ap_metrics([match_case(*case, thresholds) for case in cases], [0], thresholds)
    coco = COCOMetric(classes=["0"], iou_list=AP_IOU_THRESHOLDS, iou_range=MAP_IOU_RANGE, max_detection=(100,),
                      verbose=False)
    pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels = (list(part) for part in zip(*cases))
    monai_matches = matching_batch(box_iou, coco.iou_thresholds, pred_boxes=pred_boxes, pred_classes=pred_labels,
                                   pred_scores=pred_scores, gt_boxes=gt_boxes, gt_classes=gt_labels,
                                   max_detections=100)
    reference = coco(monai_matches)[0]
    keys = ["mAP_IoU_0.10_0.50_0.05_MaxDet_100"] + [f"AP_IoU_{t:.2f}_MaxDet_100" for t in AP_IOU_THRESHOLDS]
    for key in keys:
        assert ours[key] == pytest.approx(reference[key], abs=1e-6), key
    assert 0.0 < ours["AP_IoU_0.10_MaxDet_100"] <= 1.0 and ours["AP_IoU_0.90_MaxDet_100"] < 1.0
