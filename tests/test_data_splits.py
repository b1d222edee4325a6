"""make_splits against scikit-learn's KFold on the same seeded order."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import KFold

from pretrain_det3d.data.splits import make_splits

IDS = [f"case_{i:02d}" for i in range(13)]


@pytest.mark.parametrize("num_folds", [2, 5, 13])
def test_each_case_is_validated_exactly_once(num_folds: int) -> None:
    folds = make_splits(IDS, num_folds, seed=3)
    assert len(folds) == num_folds
    val_all = [case for fold in folds for case in fold["val"]]
    assert sorted(val_all) == sorted(IDS)
    for fold in folds:
        assert set(fold["train"]).isdisjoint(fold["val"])
        assert sorted(fold["train"] + fold["val"]) == sorted(IDS)
        assert fold["train"] == sorted(fold["train"]) and fold["val"] == sorted(fold["val"])
    sizes = [len(fold["val"]) for fold in folds]
    assert max(sizes) - min(sizes) <= 1


def test_matches_sklearn_kfold_on_the_seeded_permutation() -> None:
    seed, num_folds = 11, 4
    ordered = np.asarray(sorted(IDS))[np.random.default_rng(seed).permutation(len(IDS))]
    expected = [sorted(ordered[val].tolist()) for _, val in KFold(n_splits=num_folds).split(ordered)]
    assert [fold["val"] for fold in make_splits(IDS, num_folds, seed)] == expected


def test_deterministic_and_independent_of_input_order() -> None:
    shuffled = list(np.random.default_rng(99).permutation(IDS))
    assert make_splits(IDS, 5, seed=0) == make_splits(shuffled, 5, seed=0)
    assert make_splits(IDS, 5, seed=0) != make_splits(IDS, 5, seed=1)


@pytest.mark.parametrize(
    ("ids", "num_folds", "message"),
    [
        (["a", "b"], 3, r"num_folds \(3\) is larger than the number of cases \(2\)"),
        (["a", "b"], 1, "num_folds must be at least 2"),
        (["a", "b", "a"], 2, r"duplicated: \['a'\]"),
    ],
)
def test_bad_requests(ids: list[str], num_folds: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_splits(ids, num_folds, seed=0)
