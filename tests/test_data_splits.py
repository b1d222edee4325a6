"""Folds: nnunetv2's generate_crossval_split and scikit-learn's KFold as references; splits files as nnDetection
and nnU-Net write them; bad files refused naming the ids."""

from __future__ import annotations

import collections
import json
import os
import pickle

import numpy as np
import pytest
from nnunetv2.utilities.crossval_split import generate_crossval_split
from sklearn.model_selection import KFold

from pretrain_det3d.data.splits import (
    NNUNET_SPLIT_SEED,
    SplitsFileError,
    check_splits,
    load_splits,
    make_splits,
    read_splits_file,
)

IDS = [f"case_{i:02d}" for i in range(13)]


@pytest.mark.parametrize("num_folds", [2, 5, 13])
def test_each_case_is_validated_exactly_once(num_folds: int) -> None:
    folds = make_splits(IDS, num_folds)
    assert len(folds) == num_folds
    val_all = [case for fold in folds for case in fold["val"]]
    assert sorted(val_all) == sorted(IDS)
    for fold in folds:
        assert sorted(fold["train"] + fold["val"]) == sorted(IDS)
        assert not set(fold["train"]) & set(fold["val"])


@pytest.mark.parametrize(("num_folds", "seed"), [(5, NNUNET_SPLIT_SEED), (4, 11), (2, 0)])
def test_folds_equal_nnunets_generate_crossval_split(num_folds: int, seed: int) -> None:
    # nnU-Net's trainer sorts its identifiers, then calls generate_crossval_split (seed 12345 by default)
    reference = generate_crossval_split(sorted(IDS), seed=seed, n_splits=num_folds)
    ours = make_splits(list(reversed(IDS)), num_folds, seed)
    assert [(sorted(f["train"]), sorted(f["val"])) for f in reference] == [(f["train"], f["val"]) for f in ours]


def test_default_seed_is_nnunets_and_equals_nndetections_kfold() -> None:
    # nnDetection's data module: KFold(n_splits=5, shuffle=True, random_state=12345) on the sorted ids
    ids = np.sort(np.asarray(IDS))
    expected = [sorted(ids[val].tolist()) for _, val in KFold(5, shuffle=True, random_state=12345).split(ids)]
    assert [fold["val"] for fold in make_splits(IDS, 5)] == expected
    assert make_splits(IDS, 5) != make_splits(IDS, 5, seed=1)


@pytest.mark.parametrize(
    ("ids", "num_folds", "message"),
    [
        (["a", "a", "b"], 2, "duplicated"),
        (["a", "b"], 1, "at least 2"),
        (["a", "b"], 3, r"num_folds \(3\) is larger than the number of cases \(2\)"),
    ],
)
def test_bad_requests_raise(ids: list[str], num_folds: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_splits(ids, num_folds)


# ---- splits files ------------------------------------------------------------------------------------------
def _official(ids: list[str]) -> list[dict[str, list[str]]]:
    """A fixed split that no seed of ours produces: validation folds by position, 0, 3, 6, ... first."""
    return [{"train": [c for j, c in enumerate(ids) if j % 3 != k], "val": [c for j, c in enumerate(ids) if j % 3 == k]}
            for k in range(3)]


def test_nndetection_pickle_is_used_verbatim(tmp_path) -> None:
    folds = _official(IDS)
    # nnDetection writes splits_final.pkl as a list of OrderedDicts of numpy string arrays
    nndet = [collections.OrderedDict(train=np.array(f["train"]), val=np.array(f["val"])) for f in folds]
    path = tmp_path / "splits_final.pkl"
    path.write_bytes(pickle.dumps(nndet, protocol=4))
    loaded = load_splits(IDS, 3, path)
    assert loaded == folds  # ids are already sorted within each list
    assert loaded != make_splits(IDS, 3)


def test_json_folds_are_used_verbatim_and_extra_keys_kept(tmp_path) -> None:
    folds = _official(IDS)
    folds[0]["note"] = "official"
    path = tmp_path / "splits.json"
    path.write_text(json.dumps([{**f, "val": list(reversed(f["val"]))} for f in folds]))
    assert load_splits(IDS, 3, path) == folds


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f[0]["val"].append("ghost_01"), r"ids not in the dataset: ghost_01"),
        (lambda f: f[1]["val"].append(f[0]["val"][0]), r"cases in more than one validation fold: case_00"),
        (lambda f: f[2]["val"].remove("case_02"), r"cases in no validation fold: case_02"),
        (lambda f: f[0]["train"].append("case_00"), r"fold 0 trains and validates on: case_00"),
        (lambda f: f.pop(), r"2 folds, the study runs 3"),
    ],
)
def test_bad_splits_files_are_refused_naming_the_ids(tmp_path, change, message) -> None:
    folds = _official(IDS)
    change(folds)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(folds))
    with pytest.raises(SplitsFileError, match=f"^{path}: .*{message}"):
        load_splits(IDS, 3, path)


def test_malformed_and_malicious_files_are_refused(tmp_path) -> None:
    (tmp_path / "dict.json").write_text('{"train": []}')
    with pytest.raises(SplitsFileError, match="dict.json: not a splits file: expected a non-empty list"):
        read_splits_file(tmp_path / "dict.json")
    (tmp_path / "nokeys.json").write_text('[{"training": []}]')
    with pytest.raises(SplitsFileError, match="fold 0 must be a mapping with 'train' and 'val'"):
        read_splits_file(tmp_path / "nokeys.json")
    with pytest.raises(SplitsFileError, match="splits file not found"):
        read_splits_file(tmp_path / "missing.pkl")

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([{"train": Exploit(), "val": []}]))
    with pytest.raises(SplitsFileError, match="refusing to load global"):
        read_splits_file(tmp_path / "evil.pkl")


def test_long_lists_of_offending_ids_are_shortened() -> None:
    ids = [f"c{i:03d}" for i in range(30)]
    with pytest.raises(SplitsFileError, match=r"cases in no validation fold: c000, .*, c009, \.\.\. \(30 in all\)"):
        check_splits([{"train": [], "val": []}], ids)
