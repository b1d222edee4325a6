"""The batched evaluation (``match_cases`` + flat pooling) against a plain reference written out here.

The reference is the evaluation as it was computed case by case and class by class before it was batched:
nnDetection's greedy loop over predictions and ground truth per threshold, pooling by concatenation and a stable
sort, COCO's 101-point AP and the FROC operating points, one dictionary per case for the table. Every number of
``evaluate_cases`` (all metrics, the FROC curves, the per-case table) must equal it exactly (``==``), on seeded
random studies with empty cases, cases without predictions or without ground truth, several classes, a class
without ground truth, tied scores, integer boxes (tied IoUs), duplicates and more than MaxDet predictions.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pretrain_det3d.data.boxes import pairwise_box_iou
from pretrain_det3d.evaluation import matching
from pretrain_det3d.evaluation.froc import FP_PER_SCAN, FROC_IOU_THRESHOLDS, compute_froc_metrics
from pretrain_det3d.evaluation.matching import (
    BatchMatches,
    greedy_match_padded,
    match_case,
    match_cases,
    match_class,
    paired_box_iou,
)
from pretrain_det3d.evaluation.metrics import (
    AP_IOU_THRESHOLDS,
    MAP_IOU_RANGE,
    compute_ap_metrics,
    evaluation_iou_thresholds,
    iou_range_thresholds,
)
from pretrain_det3d.evaluation.run import CASE_TABLE_COLUMNS, CASE_TABLE_IOU, CaseBoxes, evaluate_cases


# ------------------------------------------------------------------------------------------------ the reference
def reference_greedy(ious: np.ndarray, threshold: float) -> list[int]:
    """nnDetection's loop: predictions in score order; the best unmatched ground truth at or above the threshold,
    a later column replacing an equal IoU."""
    assignment, taken = [], [False] * ious.shape[1]
    for row in ious.tolist():
        best_iou, best = min(threshold, 1 - 1e-10), -1
        for column, value in enumerate(row):
            if taken[column] or value < best_iou:
                continue
            best_iou, best = value, column
        if best >= 0:
            taken[best] = True
        assignment.append(best)
    return assignment


def reference_match_case(pred: CaseBoxes, gt: CaseBoxes, thresholds, max_det: int) -> dict:
    """{class: (scores, pred_matched [T, D], num_gt, pred_order)} for one case."""
    out = {}
    pred_labels, gt_labels = np.asarray(pred.labels, dtype=np.int64), np.asarray(gt.labels, dtype=np.int64)
    for class_id in sorted(set(pred_labels.tolist()) | set(gt_labels.tolist())):
        boxes = np.asarray(pred.boxes, dtype=np.float64).reshape(-1, 6)[pred_labels == class_id]
        scores = np.asarray(pred.scores, dtype=np.float64)[pred_labels == class_id]
        truth = np.asarray(gt.boxes, dtype=np.float64).reshape(-1, 6)[gt_labels == class_id]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:max_det]  # Python's sort is stable
        matched = np.zeros((len(thresholds), len(order)), dtype=bool)
        if order and len(truth):
            ious = pairwise_box_iou(boxes[order], truth)
            for t, threshold in enumerate(thresholds):
                matched[t] = np.asarray(reference_greedy(ious, float(threshold))) >= 0
        out[class_id] = (scores[order], matched, len(truth), np.asarray(order, dtype=np.int64))
    return out


def reference_pool(case_matches: list[dict], class_ids, t: int):
    scores, hits, num_gt = [], [], 0
    for matches in case_matches:
        for class_id, (s, m, g, _) in matches.items():
            if class_id in class_ids:
                scores += s.tolist()
                hits += m[t].tolist()
                num_gt += g
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return np.asarray([scores[i] for i in order]), np.asarray([hits[i] for i in order], dtype=bool), num_gt


def reference_ap(hits: np.ndarray, num_gt: int) -> float:
    if num_gt == 0:
        return -1.0
    tp = np.cumsum(hits).astype(np.float32)  # float32 counts, as nnDetection
    fp = np.cumsum(~hits).astype(np.float32)
    recall = tp / num_gt
    precision = tp.astype(np.float64) / (tp.astype(np.float64) + fp)
    sampled = []
    for point in np.linspace(0.0, 1.0, 101):
        reached = [i for i in range(len(recall)) if recall[i] >= point]
        sampled.append(max(precision[reached[0]:]) if reached else 0.0)
    return float(np.mean(np.asarray(sampled, dtype=np.float64)))


def reference_froc(scores: np.ndarray, hits: np.ndarray, num_gt: int, num_scans: int) -> np.ndarray:
    if num_gt == 0:
        return np.full(len(FP_PER_SCAN), -1.0)
    fps, sens, tp, fp = [0.0], [0.0], 0, 0
    for i in range(len(scores)):
        tp, fp = tp + int(hits[i]), fp + int(not hits[i])
        if i == len(scores) - 1 or scores[i + 1] != scores[i]:  # tied scores enter together
            fps.append(fp / num_scans)
            sens.append(tp / num_gt)
    return np.interp(np.asarray(FP_PER_SCAN), np.asarray(fps), np.asarray(sens))


def class_mean(values):
    defined = [v for v in values if v != -1.0]
    return float(np.mean(defined)) if defined else -1.0


def reference_evaluate(case_ids, gts, preds, class_ids, ap_thresholds=AP_IOU_THRESHOLDS, max_det=100):
    extra = np.round(np.r_[np.asarray(FROC_IOU_THRESHOLDS, dtype=np.float64), CASE_TABLE_IOU], 2)
    thresholds = np.union1d(evaluation_iou_thresholds(ap_thresholds, MAP_IOU_RANGE), extra).tolist()
    matches = [reference_match_case(p, g, thresholds, max_det) for p, g in zip(preds, gts)]
    index = {round(t, 2): i for i, t in enumerate(thresholds)}
    metrics = {}
    ap = {c: {t: reference_ap(*reference_pool(matches, [c], index[round(t, 2)])[1:]) for t in thresholds}
          for c in class_ids}
    range_t = iou_range_thresholds(MAP_IOU_RANGE).tolist()
    class_map = {c: -1.0 if ap[c][range_t[0]] == -1.0 else float(np.mean([ap[c][t] for t in range_t]))
                 for c in class_ids}
    start, stop, step = MAP_IOU_RANGE
    metrics[f"mAP_IoU_{start:.2f}_{stop:.2f}_{step:.2f}_MaxDet_{max_det}"] = class_mean(list(class_map.values()))
    for c in class_ids:
        metrics[f"{c}_mAP_IoU_{start:.2f}_{stop:.2f}_{step:.2f}_MaxDet_{max_det}"] = class_map[c]
    for t in ap_thresholds:
        values = [ap[c][thresholds[index[round(t, 2)]]] for c in class_ids]
        metrics[f"AP_IoU_{t:.2f}_MaxDet_{max_det}"] = class_mean(values)
        for c, v in zip(class_ids, values):
            metrics[f"{c}_AP_IoU_{t:.2f}_MaxDet_{max_det}"] = v
    for t in FROC_IOU_THRESHOLDS:
        scores, hits, num_gt = reference_pool(matches, class_ids, index[round(t, 2)])
        curve = reference_froc(scores, hits, num_gt, len(case_ids))
        metrics[f"FROC_score_IoU_{t:.2f}"] = -1.0 if num_gt == 0 else float(np.mean(curve))
        metrics[f"FROC_curve_IoU_{t:.2f}"] = [float(v) for v in curve]
        if round(t, 2) == 0.1:
            for rate, v in zip(FP_PER_SCAN, curve):
                metrics[f"FROC_sens_IoU_{t:.2f}_FPI_{rate:g}"] = float(v)
        per_class = []
        for c in class_ids:
            s, h, g = reference_pool(matches, [c], index[round(t, 2)])
            value = -1.0 if g == 0 else float(np.mean(reference_froc(s, h, g, len(case_ids))))
            metrics[f"{c}_FROC_score_IoU_{t:.2f}"] = value
            if value != -1.0:
                per_class.append(value)
        metrics[f"mc_FROC_score_IoU_{t:.2f}"] = float(np.mean(per_class)) if per_class else -1.0
    metrics["FROC_fpi_thresholds"] = [float(r) for r in FP_PER_SCAN]
    metrics["FROC_num_images"] = len(case_ids)
    metrics.update(num_cases=len(case_ids), num_gt=sum(len(g.labels) for g in gts),
                   num_pred=sum(len(p.labels) for p in preds), classes=[int(c) for c in class_ids])
    rows, t = [], index[round(CASE_TABLE_IOU, 2)]
    for case, gt, pred, m in zip(case_ids, gts, preds, matches):
        tp_scores = [s for (sc, mm, _, _) in m.values() for s, hit in zip(sc.tolist(), mm[t]) if hit]
        fp_scores = [s for (sc, mm, _, _) in m.values() for s, hit in zip(sc.tolist(), mm[t]) if not hit]
        rows.append({"case": case, "num_gt": len(gt.labels), "num_pred": len(pred.labels),
                     "num_evaluated": sum(len(sc) for sc, *_ in m.values()), "tp": len(tp_scores),
                     "fp": len(fp_scores), "fn": len(gt.labels) - len(tp_scores),
                     "best_score": float(np.max(pred.scores)) if len(pred.scores) else math.nan,
                     "best_tp_score": max(tp_scores) if tp_scores else math.nan,
                     "best_fp_score": max(fp_scores) if fp_scores else math.nan})
    return metrics, pd.DataFrame(rows, columns=list(CASE_TABLE_COLUMNS))


# ------------------------------------------------------------------------------------------------ random studies
def random_study(seed: int, num_cases: int, num_classes: int, max_pred: int, integer: bool):
    rng = np.random.default_rng(seed)
    ids, gts, preds = [], [], []
    for i in range(num_cases):
        kind = int(rng.integers(0, 6))  # 0: no ground truth, 1: no predictions
        n_gt = 0 if kind == 0 else int(rng.integers(1, 8))
        n_pred = 0 if kind == 1 else int(rng.integers(0, max_pred))
        if integer:  # small integer boxes: many equal IoUs
            starts = rng.integers(0, 20, (n_gt, 3)).astype(float)
            gt = np.hstack([starts, starts + rng.integers(1, 7, (n_gt, 3))]).reshape(-1, 6)
        else:
            starts = rng.uniform(0, 40, (n_gt, 3))
            gt = np.hstack([starts, starts + rng.uniform(2, 12, (n_gt, 3))]).reshape(-1, 6)
        gt_labels = rng.integers(0, num_classes, n_gt)
        source = gt[rng.integers(0, max(n_gt, 1), n_pred)] if n_gt else np.zeros((n_pred, 6))
        noise = rng.integers(-2, 3, (n_pred, 6)) if integer else rng.normal(0, 1.5, (n_pred, 6))
        boxes = source + noise * (rng.random((n_pred, 1)) < 0.7)  # 30 % exact duplicates of a true box
        random_rows = rng.random(n_pred) < 0.4
        s = rng.integers(0, 25, (int(random_rows.sum()), 3)).astype(float)
        boxes[random_rows] = np.hstack([s, s + rng.integers(1, 8, (int(random_rows.sum()), 3))])
        boxes[:, 3:] = np.maximum(boxes[:, 3:], boxes[:, :3] + 1)
        scores = rng.integers(0, 8, n_pred) / 8.0 if rng.random() < 0.5 else rng.random(n_pred)  # ties
        pred_labels = np.where(rng.random(n_pred) < 0.7, np.r_[gt_labels, 0][rng.integers(0, n_gt + 1, n_pred)],
                               rng.integers(0, num_classes, n_pred))
        ids.append(f"case_{i}")
        gts.append(CaseBoxes(gt, gt_labels))
        preds.append(CaseBoxes(boxes, pred_labels.astype(np.int64), scores))
    return ids, gts, preds


def assert_identical(ours: tuple, reference: tuple) -> None:
    (metrics, table), (ref_metrics, ref_table) = ours, reference
    assert list(metrics) == list(ref_metrics)
    for key, value in ref_metrics.items():
        assert type(metrics[key]) is type(value) and metrics[key] == value, key
    pd.testing.assert_frame_equal(table, ref_table, check_exact=True)
    assert list(table.dtypes) == list(ref_table.dtypes)


STUDIES = [  # seed, cases, classes, class ids evaluated, max predictions, integer boxes, MaxDet, AP thresholds
    (0, 20, 1, [0], 60, True, 100, AP_IOU_THRESHOLDS),
    (1, 20, 2, [0, 1], 120, False, 100, AP_IOU_THRESHOLDS),
    (2, 16, 3, [0, 1, 2, 3], 50, True, 100, AP_IOU_THRESHOLDS),  # class 3 has no ground truth
    (3, 16, 2, [0, 1], 60, True, 7, (0.1, 0.5, 1.0)),  # MaxDet 7; threshold 1.0 (capped, identical boxes match)
    (4, 12, 1, [0], 140, False, 100, AP_IOU_THRESHOLDS),  # over MaxDet 100 per class and case
]


@pytest.mark.parametrize("seed,cases,classes,class_ids,max_pred,integer,max_det,ap_thresholds", STUDIES)
def test_evaluate_cases_equals_the_reference_exactly(seed, cases, classes, class_ids, max_pred, integer, max_det,
                                                     ap_thresholds):
    ids, gts, preds = random_study(seed, cases, classes, max_pred, integer)
    ours = evaluate_cases(ids, gts, preds, class_ids, ap_thresholds=ap_thresholds, max_detections=max_det)
    reference = reference_evaluate(ids, gts, preds, class_ids, ap_thresholds, max_det)
    assert_identical(ours, reference)
    metrics, table = ours
    # the study is not trivial: true and false positives, ties among scores, empty cases
    assert table["tp"].sum() > 0 and table["fp"].sum() > 0 and (table["num_pred"] == 0).any()
    assert any(len(np.unique(p.scores)) < len(p.scores) for p in preds)
    assert 0 < metrics[f"AP_IoU_0.10_MaxDet_{max_det}"] < 1


def test_ground_truth_of_a_class_outside_the_evaluated_ones_is_left_out_as_before():
    ids, gts, preds = random_study(5, 10, 3, 40, True)
    gts = [CaseBoxes(g.boxes, np.where(g.labels == 2, 5, g.labels)) for g in gts]  # class 5 is not evaluated
    preds = [CaseBoxes(p.boxes[p.labels != 2], p.labels[p.labels != 2], p.scores[p.labels != 2]) for p in preds]
    assert any((g.labels == 5).any() for g in gts)
    assert_identical(evaluate_cases(ids, gts, preds, [0, 1]), reference_evaluate(ids, gts, preds, [0, 1]))


def test_no_cases_and_all_empty_cases():
    empty = CaseBoxes(np.zeros((0, 6)), np.zeros(0, dtype=np.int64), np.zeros(0))
    assert_identical(evaluate_cases(["a", "b"], [empty, empty], [empty, empty], [0]),
                     reference_evaluate(["a", "b"], [empty, empty], [empty, empty], [0]))
    with pytest.raises(ValueError, match="at least one scan"):  # FROC needs scans, as before batching
        evaluate_cases([], [], [], [0])


def test_small_blocks_give_the_same_matches(monkeypatch):
    """Groups are padded in blocks; one group per block must not change anything."""
    ids, gts, preds = random_study(6, 15, 2, 80, True)
    whole = evaluate_cases(ids, gts, preds, [0, 1])
    monkeypatch.setattr(matching, "MATCH_BLOCK_ELEMENTS", 1)
    assert_identical(evaluate_cases(ids, gts, preds, [0, 1]), whole)


# ------------------------------------------------------------------------------------------------ the parts
def test_paired_iou_is_bit_identical_to_the_matrix():
    rng = np.random.default_rng(7)
    a = np.vstack([np.hstack([s := rng.uniform(0, 30, (200, 3)), s + rng.uniform(0.1, 15, (200, 3))]),
                   np.hstack([s := rng.integers(0, 9, (100, 3)).astype(float), s + rng.integers(1, 5, (100, 3))])])
    b = np.vstack([a[::3] + rng.normal(0, 1, (100, 6)) * (rng.random((100, 1)) < 0.5), a[:20]])
    b[:, 3:] = np.maximum(b[:, 3:], b[:, :3] + 0.5)
    matrix = pairwise_box_iou(a, b)
    rows, columns = np.meshgrid(np.arange(len(a)), np.arange(len(b)), indexing="ij")
    paired = paired_box_iou(a[rows.ravel()], b[columns.ravel()])
    assert paired.dtype == matrix.dtype and np.array_equal(paired, matrix.ravel())
    assert (matrix > 0).mean() > 0.01 and (matrix == 1).any()
    with pytest.raises(ValueError, match="not finite"):
        paired_box_iou(np.array([[0, 0, 0, np.nan, 1, 1]]), a[:1])


@pytest.mark.parametrize("seed", range(3))
def test_match_cases_equals_match_class_per_case_and_class(seed):
    ids, gts, preds = random_study(10 + seed, 12, 3, 50, bool(seed % 2))
    thresholds = [0.1, 0.3, 0.5, 0.7]
    batch = match_cases([p.boxes for p in preds], [p.scores for p in preds], [p.labels for p in preds],
                        [g.boxes for g in gts], [g.labels for g in gts], thresholds, max_detections=9)
    per_case = batch.case_matches()
    assert len(per_case) == len(ids)
    for result, pred, gt in zip(per_case, preds, gts):
        assert sorted(result) == sorted(set(pred.labels.tolist()) | set(gt.labels.tolist()))
        for class_id, got in result.items():
            p, g = pred.labels == class_id, gt.labels == class_id
            want = match_class(pred.boxes[p], pred.scores[p], gt.boxes[g], thresholds, max_detections=9)
            for name in ("scores", "pred_matched", "gt_matched", "pred_order"):
                value, expected = getattr(got, name), getattr(want, name)
                assert value.dtype == expected.dtype and np.array_equal(value, expected), name
    # the flat form built from per-case dictionaries gives the same metrics
    thresholds = evaluation_iou_thresholds()
    batch = match_cases([p.boxes for p in preds], [p.scores for p in preds], [p.labels for p in preds],
                        [g.boxes for g in gts], [g.labels for g in gts], thresholds)
    dicts = [match_case(p.boxes, p.scores, p.labels, g.boxes, g.labels, thresholds) for p, g in zip(preds, gts)]
    assert compute_ap_metrics(batch, [0, 1, 2], thresholds) == compute_ap_metrics(dicts, [0, 1, 2], thresholds)
    assert (compute_froc_metrics(batch, [0, 1, 2], thresholds, [0.1, 0.5])
            == compute_froc_metrics(dicts, [0, 1, 2], thresholds, [0.1, 0.5]))
    flat = BatchMatches.from_case_matches(dicts, len(thresholds))
    assert np.array_equal(flat.det_matched, batch.det_matched) and np.array_equal(flat.det_score, batch.det_score)


def test_padded_greedy_equals_the_loop_per_matrix_and_threshold():
    rng = np.random.default_rng(3)
    matrices = [np.round(rng.random((rng.integers(1, 9), rng.integers(1, 6))), 1) for _ in range(30)]  # ties
    thresholds = np.array([0.0, 0.2, 0.5, 0.9, 1 - 1e-10])
    padded = np.full((30, 8, 5), -np.inf)
    for k, m in enumerate(matrices):
        padded[k, : m.shape[0], : m.shape[1]] = m
    got = greedy_match_padded(padded, thresholds)
    for k, m in enumerate(matrices):
        for t, threshold in enumerate(thresholds):
            assert got[k, t, : m.shape[0]].tolist() == reference_greedy(m, threshold)
            assert (got[k, t, m.shape[0]:] == -1).all()


def test_labels_far_apart_and_float_labels():
    gt = np.array([[0, 0, 0, 4, 4, 4.], [10, 10, 10, 14, 14, 14.]])
    pred = gt + 0.5
    big = match_cases([pred, pred], [[0.9, 0.8], [0.7, 0.6]], [[2**61, -2**61], [0.0, 1.0]], [gt, gt],
                      [[2**61, -2**61], [0, 1]], [0.1]).case_matches()
    assert sorted(big[0]) == [-2**61, 2**61] and sorted(big[1]) == [0, 1]
    assert all(r.pred_matched.all() and r.gt_matched.all() for case in big for r in case.values())


def test_hand_worked_tie_and_inclusive_threshold():
    """Prediction 1 (score 0.9) overlaps A and B equally (IoU 1/3 each); prediction 2 (0.8) overlaps only A.
    The later column wins the tie, so 1 takes B and 2 takes A: two true positives (first-column-wins: one).
    A third prediction has IoU exactly 0.5 with C: a match at threshold 0.5, which is inclusive."""
    a, b, c = [0, 0, 0, 2, 2, 2.], [2, 0, 0, 4, 2, 2.], [10, 0, 0, 12, 2, 2.]
    one, two, three = [1, 0, 0, 3, 2, 2.], [0, 0, 0, 2, 2, 2.5], [10, 0, 0, 12, 2, 1.]
    tie = pairwise_box_iou(np.array([one]), np.array([a, b]))[0]
    assert tie[0] == tie[1] and tie[0] == pytest.approx(1 / 3)
    assert pairwise_box_iou(np.array([three]), np.array([c]))[0, 0] == 0.5
    gt = CaseBoxes(np.array([a, b, c]), np.array([0, 0, 0]))
    pred = CaseBoxes(np.array([one, two, three]), np.array([0, 0, 0]), np.array([0.9, 0.8, 0.7]))
    metrics, table = evaluate_cases(["x"], [gt], [pred], [0])
    assert table.loc[0, "tp"] == 3 and table.loc[0, "fn"] == 0
    assert metrics["AP_IoU_0.30_MaxDet_100"] == 1.0  # at 0.3 all three match as well
    # lowest threshold 0.5, met exactly by prediction 3 (rows below every threshold skip the greedy loop)
    result = match_case(pred.boxes, pred.scores, pred.labels, gt.boxes, gt.labels, [0.5, 0.6])[0]
    assert result.pred_matched.tolist() == [[False, True, True], [False, True, False]]
    assert_identical((metrics, table), reference_evaluate(["x"], [gt], [pred], [0]))
