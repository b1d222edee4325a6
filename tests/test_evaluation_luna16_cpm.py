"""LUNA16's CPM on hand-worked cases: hits strictly inside the sphere, one hit per nodule, excluded findings
ignored, the 100-candidate cap, tied probabilities, and the files the rule writes.

The main case (three scans, three nodules, two excluded findings, eight candidates) is worked out in the
docstring of :func:`test_hand_worked_three_scans`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pretrain_det3d.evaluation.luna16_cpm import (
    LUNA16InputError, Point, cap_candidates, evaluate_luna16_csv, luna16_cpm,
)

RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

NODULES = [Point("A", (0.0, 0.0, 0.0), 10.0),   # N1, radius 5
           Point("A", (50.0, 0.0, 0.0), 6.0),   # N2, radius 3
           Point("B", (0.0, 0.0, 0.0), 8.0)]    # N3, radius 4
EXCLUDED = [Point("A", (100.0, 0.0, 0.0), -1.0),  # no diameter: counts as 10 mm
            Point("A", (0.0, 50.0, 0.0), 4.0)]
CANDIDATES = [Point("A", (1.0, 0.0, 0.0), 0.9),     # c1 in N1
              Point("A", (0.0, 2.0, 0.0), 0.6),     # c2 in N1 too: a second hit, ignored
              Point("A", (53.0, 0.0, 0.0), 0.8),    # c3 exactly on N2's surface: not inside -> FP
              Point("A", (104.0, 0.0, 0.0), 0.7),   # c4 4 mm from E1 (radius 5 by default) -> ignored
              Point("A", (0.0, 51.5, 0.0), 0.95),   # c5 1.5 mm from E2 (radius 2) -> ignored
              Point("A", (200.0, 0.0, 0.0), 0.3),   # c6 -> FP
              Point("B", (0.0, 0.0, 3.9), 0.4),     # c7 in N3
              Point("B", (10.0, 10.0, 10.0), 0.8)]  # c8 -> FP, tied with c3
SCANS = ["A", "B", "C"]  # C: no nodule, no candidate, still a scan


def test_hand_worked_three_scans() -> None:
    """Detected: N1 (score 0.9, max of c1 and c2), N3 (0.4); N2 missed. False positives 0.8, 0.8, 0.3.

    Walking the threshold down: 0.9 -> (0 FP, 1 TP); 0.8 (both FPs at once) -> (2, 1); 0.4 -> (2, 2);
    0.3 -> (3, 2). Per scan (3 scans) and per nodule (3): points (0, 0), (0, 1/3), (2/3, 1/3), (2/3, 2/3),
    (1, 2/3). Sensitivity at 1/8, 1/4, 1/2: 1/3 (flat from 0 to 2/3); at 1, 2, 4, 8: 2/3.
    CPM = (3 * 1/3 + 4 * 2/3) / 7 = 11/21.
    """
    result = luna16_cpm(CANDIDATES, NODULES, EXCLUDED, SCANS)
    assert result.sensitivities == pytest.approx(dict(zip(RATES, [1 / 3] * 3 + [2 / 3] * 4)))
    assert result.cpm == pytest.approx(11 / 21)
    assert (result.num_scans, result.num_nodules, result.num_candidates) == (3, 3, 8)
    assert (result.detected_nodules, result.false_positives) == (2, 3)
    assert (result.ignored_on_excluded, result.ignored_double_hits, result.dropped_by_cap) == (2, 1, 0)
    np.testing.assert_allclose(result.fps, [0, 0, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(result.sens, [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert result.thresholds == [np.inf, 0.9, 0.8, 0.4, 0.3]


def test_without_excluded_findings_the_hits_on_them_are_false_positives() -> None:
    """c4 (0.7) and c5 (0.95) become FPs: 0.95 FP, 0.9 TP, 0.8 FP x2, 0.7 FP, 0.4 TP, 0.3 FP; points (0, 0),
    (1/3, 0), (1/3, 1/3), (1, 1/3), (4/3, 1/3), (4/3, 2/3), (5/3, 2/3). At 1/8 and 1/4: 0 (on the segment from
    (0, 0) to (1/3, 0)); 1/2 and 1: 1/3; 2, 4, 8: 2/3. CPM = (2/3 + 3 * 2/3) / 7 = 8/21."""
    result = luna16_cpm(CANDIDATES, NODULES, [], SCANS)
    assert result.sensitivities == pytest.approx(dict(zip(RATES, [0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3])))
    assert result.cpm == pytest.approx(8 / 21)
    assert result.false_positives == 5 and result.ignored_on_excluded == 0


def test_tied_hit_and_false_positive_enter_together() -> None:
    """One scan, one nodule; a hit and a false positive share probability 0.5: the curve jumps from (0, 0)
    straight to (1, 1), and the sensitivity at r < 1 FP is r. CPM = (1/8 + 1/4 + 1/2 + 4) / 7."""
    candidates = [Point("s", (0.0, 0.0, 0.0), 0.5), Point("s", (30.0, 0.0, 0.0), 0.5)]
    result = luna16_cpm(candidates, [Point("s", (0.0, 0.0, 0.0), 5.0)], [], ["s"])
    np.testing.assert_allclose(result.fps, [0, 1])
    np.testing.assert_allclose(result.sens, [0, 1])
    assert list(result.sensitivities.values()) == pytest.approx([0.125, 0.25, 0.5, 1, 1, 1, 1])
    assert result.cpm == pytest.approx((0.125 + 0.25 + 0.5 + 4) / 7)


def test_one_candidate_inside_two_nodules_counts_for_both() -> None:
    nodules = [Point("s", (0.0, 0.0, 0.0), 10.0), Point("s", (4.0, 0.0, 0.0), 10.0)]
    result = luna16_cpm([Point("s", (2.0, 0.0, 0.0), 0.7)], nodules, [], ["s"])
    assert result.detected_nodules == 2 and result.false_positives == 0 and result.cpm == pytest.approx(1.0)


def test_hit_on_a_nodule_and_an_excluded_finding_is_a_hit() -> None:
    candidate = [Point("s", (0.0, 0.0, 0.0), 0.7)]
    result = luna16_cpm(candidate, [Point("s", (1.0, 0.0, 0.0), 4.0)], [Point("s", (0.0, 0.0, 0.0), 4.0)], ["s"])
    assert (result.detected_nodules, result.ignored_on_excluded, result.false_positives) == (1, 0, 0)


def test_cap_keeps_those_strictly_above_the_101st() -> None:
    """101 candidates: 100 distinct probabilities 1.00, 0.99, ... 0.01 and one more 0.01. The 101st highest is
    0.01, so both 0.01 go and 99 are kept."""
    probs = [round(1.0 - i / 100, 2) for i in range(100)] + [0.01]
    kept = cap_candidates([Point("s", (float(i), 0.0, 0.0), p) for i, p in enumerate(probs)])
    assert len(kept) == 99 and min(c.value for c in kept) == 0.02
    # 102 distinct: the 101st highest is cut, so exactly the top 100 stay, in file order
    probs = list(np.linspace(0.0, 1.0, 102))[::-1]
    kept = cap_candidates([Point("s", (0.0, 0.0, 0.0), float(p)) for p in probs])
    assert [c.value for c in kept] == pytest.approx(probs[:100])
    # the cap applies per scan and is counted
    nodule = [Point("s", (0.0, 0.0, 0.0), 4.0)]
    many = [Point("s", (50.0, 0.0, 0.0), 0.9)] * 100 + [Point("s", (0.0, 0.0, 0.0), 0.1)]
    result = luna16_cpm(many, nodule, [], ["s"])
    assert result.dropped_by_cap == 1 and result.detected_nodules == 0 and result.cpm == 0.0


def test_no_detection_and_no_nodule() -> None:
    result = luna16_cpm([Point("s", (50.0, 0.0, 0.0), 0.9)], [Point("s", (0.0, 0.0, 0.0), 4.0)], [], ["s"])
    assert result.cpm == 0.0  # the script's roc_curve gives NaN here
    result = luna16_cpm([Point("s", (50.0, 0.0, 0.0), 0.9)], [], [], ["s", "t"])
    assert result.cpm == -1.0 and set(result.sensitivities.values()) == {-1.0}


def write_csv(path: Path, header: tuple[str, ...], points: list[Point]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows((p.seriesuid, *p.xyz, p.value) for p in points)
    return path


def test_csv_files_in_and_out(tmp_path: Path) -> None:
    findings = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
    annotations = write_csv(tmp_path / "annotations.csv", findings, NODULES)
    excluded = write_csv(tmp_path / "annotations_excluded.csv", findings, EXCLUDED)
    header = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
    fold0 = write_csv(tmp_path / "fold0.csv", header, CANDIDATES[:6])  # scan A
    fold1 = write_csv(tmp_path / "fold1.csv", header, CANDIDATES[6:])  # scan B
    result = evaluate_luna16_csv([fold0, fold1], annotations, excluded, SCANS, tmp_path / "cpm.json",
                                 tmp_path / "froc.csv")
    record = json.loads((tmp_path / "cpm.json").read_text())
    assert record["LUNA16_CPM"] == pytest.approx(11 / 21) == result.cpm
    assert record["LUNA16_sens_FPI_0.125"] == pytest.approx(1 / 3) and record["LUNA16_sens_FPI_8"] == pytest.approx(2 / 3)
    assert record["num_scans"] == 3 and record["ignored_on_excluded"] == 2
    rows = list(csv.reader((tmp_path / "froc.csv").open()))
    assert rows[0] == ["fps_per_scan", "sensitivity", "threshold"]
    np.testing.assert_allclose([[float(v) for v in row] for row in rows[1:]],
                               [[0, 0, np.inf], [0, 1 / 3, 0.9], [2 / 3, 1 / 3, 0.8], [2 / 3, 2 / 3, 0.4],
                                [1, 2 / 3, 0.3]], rtol=1e-8)
    # without the excluded findings the record says that hits on them counted as false positives
    evaluate_luna16_csv([fold0, fold1], annotations, None, SCANS, tmp_path / "plain.json", tmp_path / "plain.csv")
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert plain["LUNA16_CPM"] == pytest.approx(8 / 21) and "NO excluded findings" in plain["definition"]


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    findings = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
    annotations = write_csv(tmp_path / "annotations.csv", findings, NODULES)
    candidates = write_csv(tmp_path / "c.csv", ("seriesuid", "coordX", "coordY", "coordZ", "score"), CANDIDATES)
    with pytest.raises(LUNA16InputError, match=r"c\.csv: missing columns \['probability'\]"):
        evaluate_luna16_csv(candidates, annotations, None, SCANS, tmp_path / "o.json", tmp_path / "o.csv")
    candidates.write_text("seriesuid,coordX,coordY,coordZ,probability\nA,1,2,x,0.5\n")
    with pytest.raises(LUNA16InputError, match=r"c\.csv: row 2: coordZ 'x' is not a number"):
        evaluate_luna16_csv(candidates, annotations, None, SCANS, tmp_path / "o.json", tmp_path / "o.csv")
    candidates.write_text("seriesuid,coordX,coordY,coordZ,probability\nZ,1,2,3,0.5\n")
    with pytest.raises(LUNA16InputError, match=r"c\.csv: candidates of 1 series that are not among the 3 scans"):
        evaluate_luna16_csv(candidates, annotations, None, SCANS, tmp_path / "o.json", tmp_path / "o.csv")
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "o.csv").exists()


def test_rule_verb_reads_the_converted_reference_tables(tmp_path: Path) -> None:
    """``luna16-cpm`` as the rule runs it: the scans are the validation cases of the folds, the reference tables
    those the LUNA16 converter kept in labelsTr/."""
    from pretrain_det3d.cli import main

    findings = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
    converted = tmp_path / "converted" / "luna16"
    (converted / "labelsTr").mkdir(parents=True)
    write_csv(converted / "labelsTr" / "annotations.csv", findings, NODULES)
    write_csv(converted / "labelsTr" / "annotations_excluded.csv", findings, EXCLUDED)
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps([{"train": ["B", "C"], "val": ["A"]}, {"train": ["A"], "val": ["B", "C"]}]))
    header = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
    fold0 = write_csv(tmp_path / "fold0.csv", header, CANDIDATES[:6])
    fold1 = write_csv(tmp_path / "fold1.csv", header, CANDIDATES[6:])
    args = ["luna16-cpm", "--candidates", str(fold0), str(fold1), "--converted", str(converted), "--splits",
            str(splits), "--folds", "0", "1", "--out-json", str(tmp_path / "pooled_cpm.json"),
            "--out-froc", str(tmp_path / "pooled_froc.csv")]
    assert main(args) == 0
    assert json.loads((tmp_path / "pooled_cpm.json").read_text())["LUNA16_CPM"] == pytest.approx(11 / 21)
    # fold 1 alone: scans B and C, nodule N3 found at 0.4 with one FP at 0.8 -> points (0, 0), (1/2, 0), (1/2, 1):
    # sensitivity 0 at 1/8 and 1/4, 1 from 1/2 on -> CPM 5/7
    args = ["luna16-cpm", "--candidates", str(fold1), "--converted", str(converted), "--splits", str(splits),
            "--folds", "1", "--out-json", str(tmp_path / "fold1_cpm.json"), "--out-froc", str(tmp_path / "f.csv")]
    assert main(args) == 0
    assert json.loads((tmp_path / "fold1_cpm.json").read_text())["LUNA16_CPM"] == pytest.approx(5 / 7)
