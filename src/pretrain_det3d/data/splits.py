"""Cross-validation folds over case ids, reproducible from a seed.

Ids are sorted first (so the order files were listed in never matters), shuffled with the seed, and cut into
``num_folds`` nearly equal validation folds (sizes differ by at most one, larger folds first, like scikit-learn's
``KFold``); each fold trains on all other cases. Every case is validated in exactly one fold.

Example:
    >>> folds = make_splits(["c", "a", "b", "d"], num_folds=2, seed=0)
    >>> sorted(folds[0]["val"] + folds[1]["val"])
    ['a', 'b', 'c', 'd']
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

MIN_FOLDS = 2  # with one fold there is nothing left to train on


def make_splits(case_ids: Iterable[str], num_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """Return ``num_folds`` dicts ``{"train": [...], "val": [...]}`` (each list sorted).

    Raises ``ValueError`` for duplicate ids, fewer than two folds, or more folds than cases.

    Example:
        >>> make_splits(["a", "b", "c"], num_folds=3, seed=1)[0]["train"]  # doctest: +SKIP
        ['a', 'c']
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        duplicates = sorted({case for case in ids if ids.count(case) > 1})
        raise ValueError(f"case ids must be unique, duplicated: {duplicates}")
    if num_folds < MIN_FOLDS:
        raise ValueError(f"num_folds must be at least {MIN_FOLDS}, got {num_folds}")
    if num_folds > len(ids):
        raise ValueError(f"num_folds ({num_folds}) is larger than the number of cases ({len(ids)})")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = []
    for val_indices in np.array_split(order, num_folds):
        val = set(val_indices.tolist())
        folds.append(
            {
                "train": [case for index, case in enumerate(ids) if index not in val],
                "val": sorted(ids[index] for index in val),
            }
        )
    return folds
