"""Cross-validation folds over case ids: nnU-Net's own split, or a dataset's official split read from a file.

:func:`make_splits` calls nnunetv2's ``generate_crossval_split`` (scikit-learn's ``KFold`` with ``shuffle=True``)
on the sorted case ids with nnU-Net's seed 12345 by default, as nnU-Net's trainer (``do_split``) and nnDetection's
data module (``nndet/io/datamodule/base.py``) do, so fold k here is fold k there. :func:`read_splits_file` reads
a split fixed elsewhere instead (nnDetection's ``splits_final.pkl``, nnU-Net's ``splits_final.json``, or a JSON
list of folds) and :func:`check_splits` refuses one that does not fit the dataset, naming the offending ids.

Folds are ``[{"train": [...], "val": [...]}, ...]`` (ids sorted within each list); extra keys are kept.

Example:
    >>> folds = make_splits(["c", "a", "b", "d"], num_folds=2)
    >>> sorted(folds[0]["val"] + folds[1]["val"])
    ['a', 'b', 'c', 'd']
"""

from __future__ import annotations

import collections
import json
import os
import pickle
from pathlib import Path
from typing import Any, Iterable, Sequence

MIN_FOLDS = 2  # with one fold there is nothing left to train on
#: nnU-Net's seed of generate_crossval_split (its default argument, passed by nnUNetTrainer.do_split) and the
#: random_state of nnDetection's KFold
NNUNET_SPLIT_SEED = 12345


class SplitsFileError(ValueError):
    """A splits file cannot be read or does not fit the dataset; the message names the file."""


def make_splits(case_ids: Iterable[str], num_folds: int, seed: int = NNUNET_SPLIT_SEED) -> list[dict[str, list[str]]]:
    """``num_folds`` folds ``{"train": [...], "val": [...]}`` from nnunetv2's ``generate_crossval_split``.

    The ids are sorted first (nnU-Net sorts its identifiers before splitting), so the order they are listed in
    never matters; each list in the result is sorted. Raises ``ValueError`` for duplicate ids, fewer than two
    folds, or more folds than cases.

    Example:
        >>> make_splits(["a", "b", "c"], num_folds=3)[0]["val"]  # doctest: +SKIP
        ['b']
    """
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    ids = sorted(str(case) for case in case_ids)
    if len(set(ids)) != len(ids):
        duplicates = sorted({case for case in ids if ids.count(case) > 1})
        raise ValueError(f"case ids must be unique, duplicated: {duplicates}")
    if num_folds < MIN_FOLDS:
        raise ValueError(f"num_folds must be at least {MIN_FOLDS}, got {num_folds}")
    if num_folds > len(ids):
        raise ValueError(f"num_folds ({num_folds}) is larger than the number of cases ({len(ids)})")
    folds = generate_crossval_split(ids, seed=int(seed), n_splits=int(num_folds))
    return [{"train": sorted(str(c) for c in fold["train"]), "val": sorted(str(c) for c in fold["val"])}
            for fold in folds]


# ---- splits files ------------------------------------------------------------------------------------------
class _SplitsUnpickler(pickle.Unpickler):
    """Unpickles nnDetection's ``splits_final.pkl`` (OrderedDicts of numpy string arrays) and nothing else:
    any other global (which a pickle could use to run code) is refused."""

    ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module == "collections":
            return collections.OrderedDict
        import numpy as np

        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        try:
            from numpy._core import multiarray  # numpy >= 2 (files pickled under numpy 1 name numpy.core)
        except ImportError:  # pragma: no cover - numpy 1
            from numpy.core import multiarray
        return getattr(multiarray, name)


def _as_id_list(value: Any, where: str) -> list[str]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{where} must be a list of case ids, got {type(value).__name__}")
    return [str(item) for item in value]


def read_splits_file(path: str | os.PathLike) -> list[dict[str, list[str]]]:
    """Folds from ``path``: a pickle (``.pkl``, nnDetection's ``splits_final.pkl``) or JSON (``.json``), each a list
    of ``{"train": ids, "val": ids}`` (extra keys are kept). Nothing is checked against a dataset here
    (:func:`check_splits` does that); a file that is not such a list raises :class:`SplitsFileError`.

    Example:
        >>> read_splits_file("projects/Task012_LIDC/splits_final.pkl")[0].keys()  # doctest: +SKIP
        dict_keys(['train', 'val'])
    """
    path = Path(path)
    if not path.is_file():
        raise SplitsFileError(f"{path}: splits file not found")
    try:
        if path.suffix == ".pkl":
            with path.open("rb") as handle:
                raw = _SplitsUnpickler(handle).load()
        elif path.suffix == ".json":
            raw = json.loads(path.read_text())
        else:
            raise ValueError("unknown format: expected a .pkl (nnDetection's splits_final.pkl) or a .json file")
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"expected a non-empty list of folds, got {type(raw).__name__}")
        folds = []
        for index, fold in enumerate(raw):
            if not isinstance(fold, dict) or not {"train", "val"} <= set(fold):
                raise ValueError(f"fold {index} must be a mapping with 'train' and 'val'")
            extra = {str(k): v for k, v in fold.items() if k not in ("train", "val")}
            folds.append({**extra, "train": _as_id_list(fold["train"], f"fold {index} 'train'"),
                          "val": _as_id_list(fold["val"], f"fold {index} 'val'")})
    except (ValueError, pickle.UnpicklingError, EOFError, json.JSONDecodeError, AttributeError, TypeError) as error:
        raise SplitsFileError(f"{path}: not a splits file: {error}") from error
    return folds


def _preview(ids: Iterable[str], limit: int = 10) -> str:
    ids = sorted(ids)
    shown = ", ".join(ids[:limit])
    return f"{shown}, ... ({len(ids)} in all)" if len(ids) > limit else shown


def check_splits(folds: Sequence[dict[str, Any]], case_ids: Iterable[str], num_folds: int | None = None,
                 source: str = "splits") -> list[dict[str, Any]]:
    """Check ``folds`` against the dataset's ``case_ids`` and return them with sorted id lists.

    Every case must be in exactly one validation fold, no id may be unknown, and within a fold no case may be
    both trained and validated on; with ``num_folds`` the count must match. A breach raises
    :class:`SplitsFileError` starting with ``source`` (the file) and naming the offending ids. A training list is
    taken as given (it may leave cases out, as a fixed split for a subset does).

    Example:
        >>> check_splits([{"train": ["b"], "val": ["a"]}, {"train": ["a"], "val": ["b"]}], ["a", "b"])[1]["val"]
        ['b']
        >>> check_splits([{"train": ["b"], "val": ["a", "x"]}], ["a", "b"], source="f.json")
        Traceback (most recent call last):
        ...
        pretrain_det3d.data.splits.SplitsFileError: f.json: ids not in the dataset: x; cases in no validation fold: b
    """
    known = set(str(c) for c in case_ids)
    problems = []
    if num_folds is not None and len(folds) != num_folds:
        problems.append(f"{len(folds)} folds, the study runs {num_folds} (study.num_folds)")
    listed = {case for fold in folds for key in ("train", "val") for case in fold[key]}
    if unknown := listed - known:
        problems.append(f"ids not in the dataset: {_preview(unknown)}")
    counts = collections.Counter(case for fold in folds for case in fold["val"])
    if twice := {case for case, count in counts.items() if count > 1}:
        problems.append(f"cases in more than one validation fold: {_preview(twice)}")
    if missing := known - set(counts):
        problems.append(f"cases in no validation fold: {_preview(missing)}")
    for index, fold in enumerate(folds):
        if both := set(fold["train"]) & set(fold["val"]):
            problems.append(f"fold {index} trains and validates on: {_preview(both)}")
    if problems:
        raise SplitsFileError(f"{source}: " + "; ".join(problems))
    return [{**fold, "train": sorted(fold["train"]), "val": sorted(fold["val"])} for fold in folds]


def load_splits(case_ids: Iterable[str], num_folds: int, splits_file: str | os.PathLike | None = None,
                seed: int = NNUNET_SPLIT_SEED) -> list[dict[str, Any]]:
    """The dataset's folds: ``splits_file`` read and checked when given, else :func:`make_splits`.

    Example:
        >>> load_splits(["a", "b", "c", "d"], 2) == make_splits(["a", "b", "c", "d"], 2)
        True
    """
    case_ids = list(case_ids)
    if splits_file is None:
        return make_splits(case_ids, num_folds, seed)
    return check_splits(read_splits_file(splits_file), case_ids, num_folds, source=str(splits_file))
