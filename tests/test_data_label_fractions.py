"""Label-fraction subsets: nesting, class cover and stratification on a hand-made case list; files on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pretrain_det3d.data.label_fractions import (
    LabelSubsetError,
    class_cover,
    format_fraction,
    fraction_segment,
    label_subset,
    read_label_subset,
    scaled_iterations,
    segment_fraction,
    stratified_order,
    subset_path,
    subset_size,
    write_label_subset,
)

FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
#: 20 training cases: 10 without objects, 6 with class 0 only, 3 with class 1 only, 1 with both
CASES = {**{f"empty_{i}": set() for i in range(10)}, **{f"zero_{i}": {0} for i in range(6)},
         **{f"one_{i}": {1} for i in range(3)}, "both": {0, 1}}


def strata_of(cases):
    return {case: tuple(sorted(held)) for case, held in cases.items()}


@pytest.mark.parametrize("seed", range(40))
def test_subsets_nest_keep_every_class_and_follow_the_strata(seed):
    order = stratified_order(CASES, seed)
    assert sorted(order) == sorted(CASES)  # a permutation
    subsets = [label_subset(order, f, CASES, seed) for f in FRACTIONS]
    for small, large in zip(subsets, subsets[1:]):
        assert set(small) <= set(large)
    assert sorted(subsets[-1]) == sorted(CASES)
    for subset in subsets:
        assert set().union(*(CASES[c] for c in subset)) == {0, 1}  # a case with objects of each class
    # the cover: the rarest class (1, four holders) is drawn first; "both" makes a cover of one case
    cover = class_cover(CASES, seed)
    assert len(cover) == (1 if cover[0] == "both" else 2) and order[:len(cover)] == cover
    assert [len(s) for s in subsets] == [max(math.ceil(f * 20), len(cover)) for f in FRACTIONS]
    # after the cover, every prefix holds each stratum in proportion: with S strata of m_s of the M remaining
    # cases, |count_s(k) - k m_s / M| < 1 + S m_s / M (random systematic sampling; a plain shuffle breaks it)
    rest = order[len(cover):]
    strata = strata_of({c: CASES[c] for c in rest})
    sizes = {s: sum(1 for v in strata.values() if v == s) for s in set(strata.values())}
    for k in range(1, len(rest) + 1):
        for stratum, m in sizes.items():
            count = sum(1 for case in rest[:k] if strata[case] == stratum)
            assert abs(count - k * m / len(rest)) < 1 + len(sizes) * m / len(rest), (seed, k, stratum)


def test_a_plain_shuffle_would_fail_the_stratification_check():
    # the check above can fail: a seeded shuffle of the same cases breaks the bound for some seed
    rest = sorted(CASES)
    strata = strata_of(CASES)
    sizes = {s: sum(1 for v in strata.values() if v == s) for s in set(strata.values())}
    broken = 0
    for seed in range(40):
        order = [rest[i] for i in np.random.default_rng(seed).permutation(len(rest))]
        broken += any(abs(sum(1 for c in order[:k] if strata[c] == s) - k * m / 20) >= 1 + len(sizes) * m / 20
                      for k in range(1, 21) for s, m in sizes.items())
    assert broken > 0


def test_order_depends_on_seed_not_on_listing_order():
    reversed_cases = dict(reversed(list(CASES.items())))
    assert stratified_order(CASES, 3) == stratified_order(reversed_cases, 3)
    assert len({tuple(stratified_order(CASES, seed)) for seed in range(10)}) > 1


def test_cover_takes_the_only_holder_of_a_rare_class():
    cases = {"a": {0}, "b": {0}, "c": {0, 2}, "d": set(), "e": {1}}
    for seed in range(10):
        cover = class_cover(cases, seed)
        assert cover[:2] == ["e", "c"] or cover[:2] == ["c", "e"]  # classes 1 and 2 have one holder each
        assert len(cover) == 2  # "c" also holds class 0


def test_subset_sizes_and_fraction_text():
    assert subset_size(0.1, 30) == 3  # 0.1 * 30 is 3.0000000000000004 in floating point
    assert subset_size(0.25, 10) == 3 and subset_size(0.1, 10, min_size=2) == 2 and subset_size(1.0, 7) == 7
    assert subset_size(0.05, 7) == 1
    assert [format_fraction(f) for f in (0.1, 0.25, 0.125, 1.0)] == ["0.1", "0.25", "0.125", "1"]
    assert fraction_segment(1.0) == "" and fraction_segment(0.25) == "fraction0.25/"
    assert segment_fraction("fraction0.25/") == 0.25 and segment_fraction("") == 1.0
    with pytest.raises(ValueError, match="more than 6 decimals"):
        format_fraction(0.1234567)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        format_fraction(0.0)
    with pytest.raises(ValueError, match="canonical"):
        segment_fraction("fraction0.250/")


def test_scaled_schedule_by_hand():
    assert scaled_iterations(1000, 100, 0.25) == (250, 25)
    assert scaled_iterations(125000, 4000, 0.1) == (12500, 400)
    assert scaled_iterations(10, 4, 0.1) == (1, 0)  # warm-up stays below the iterations
    assert scaled_iterations(30, 29, 0.1) == (3, 2)


def write_preprocessed(root: Path, folds: list[dict], classes: dict[str, set]) -> Path:
    (root / "cases").mkdir(parents=True)
    (root / "splits.json").write_text(json.dumps(folds))
    for case, held in classes.items():
        instances = {str(i + 1): c for i, c in enumerate(sorted(held))}
        (root / "cases" / f"{case}.json").write_text(json.dumps({"instances": instances}))
    return root


def test_subset_files_nest_and_are_read_back(tmp_path):
    train = sorted(CASES)
    root = write_preprocessed(tmp_path / "demo", [{"train": train, "val": ["v0", "v1"]},
                                                  {"train": ["v0", "v1"], "val": train}], CASES)
    small = write_label_subset(root, 0, 0.25, seed=7)
    large = write_label_subset(root, 0, 0.5, seed=7)
    assert small == subset_path(root, 0, 0.25) and small.as_posix().endswith("label_fractions/fraction0.25/fold0.json")
    records = [json.loads(p.read_text()) for p in (small, large)]
    assert set(records[0]["train"]) < set(records[1]["train"]) and len(records[0]["train"]) == 5
    assert records[0]["val"] == ["v0", "v1"] and records[0]["num_fold_train"] == 20
    assert records[0]["order"] == records[1]["order"] == stratified_order(CASES, 7)
    assert records[0]["case_classes"]["both"] == [0, 1]
    assert read_label_subset(small, 0, train) == records[0]["train"]
    # rewriting one fraction's file gives the same subset (reproducible)
    write_label_subset(root, 0, 0.25, seed=7, out=tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["train"] == records[0]["train"]


def test_subset_errors_name_the_file(tmp_path):
    root = write_preprocessed(tmp_path / "demo", [{"train": ["a", "b"], "val": ["c"]}], {"a": {0}, "b": set()})
    path = write_label_subset(root, 0, 0.5, seed=0)
    with pytest.raises(LabelSubsetError, match="written for fold 0, used for fold 1"):
        read_label_subset(path, 1, ["a", "b"])
    with pytest.raises(LabelSubsetError, match=r"are not training cases of fold 0"):
        read_label_subset(path, 0, ["z"])
    with pytest.raises(LabelSubsetError, match="not found"):
        read_label_subset(tmp_path / "nope.json", 0, ["a"])
    (root / "cases" / "b.json").write_text("{}")
    with pytest.raises(LabelSubsetError, match=r"b\.json: needs 'instances'"):
        write_label_subset(root, 0, 0.5, seed=0, out=tmp_path / "x.json")
    with pytest.raises(LabelSubsetError, match="no fold 3"):
        write_label_subset(root, 3, 0.5, seed=0)
    with pytest.raises(ValueError, match="fraction 1 has no subset file"):
        write_label_subset(root, 0, 1.0, seed=0)
    assert not (tmp_path / "x.json").exists()


def test_finetune_reads_the_subset_and_scales_the_schedule(tmp_path, monkeypatch):
    """run_finetuning trains on the subset's cases, and the scaled schedule shrinks iterations by their share."""
    import pretrain_det3d.training.finetune as finetune

    train = [f"c{i}" for i in range(8)]
    classes = {c: ({0} if i % 2 else set()) for i, c in enumerate(train)}
    root = write_preprocessed(tmp_path / "demo", [{"train": train, "val": ["v"]}], classes)
    (root / "plan.json").write_text(json.dumps({"num_classes": 1, "modalities": ["CT"]}))
    subset = write_label_subset(root, 0, 0.25, seed=0)
    seen = {}

    class Trainer:
        def __init__(self, model, **kwargs):
            seen.update(kwargs)

        def run(self):
            pass

    monkeypatch.setattr(finetune, "DetectorTrainer", Trainer)
    monkeypatch.setattr(finetune, "load_case_records", lambda root, cases: list(cases))
    settings = {"iterations": 400, "warmup_iterations": 40, "patch_size": [16, 16, 16], "fpn_channels": 8,
                "preset": "resenc_demo"}
    finetune.run_finetuning(root, 0, "retina_unet", settings, None, tmp_path / "out", seed=0,
                            train_subset=subset, schedule="scaled")
    expected = json.loads(subset.read_text())["train"]
    assert seen["records"] == expected and len(expected) == 2
    assert (seen["settings"].iterations, seen["settings"].warmup_iterations) == (100, 10)  # 2 of 8 cases
    assert seen["extra"]["label_fraction"]["num_cases"] == 2
    finetune.run_finetuning(root, 0, "retina_unet", settings, None, tmp_path / "out", seed=0,
                            train_subset=subset, schedule="same")
    assert seen["settings"].iterations == 400
    finetune.run_finetuning(root, 0, "retina_unet", settings, None, tmp_path / "out", seed=0)
    assert seen["records"] == train and "label_fraction" not in seen["extra"]
