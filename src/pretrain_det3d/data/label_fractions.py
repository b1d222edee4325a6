"""Label fractions: nested, stratified subsets of a fold's training cases, for label-efficiency curves.

For each fold the training cases are put in one seeded, stratified order (:func:`stratified_order`); the subset of
fraction ``f`` is the first :func:`subset_size` cases of that order. Hence:

- **nested**: a smaller fraction's subset lies inside every larger one's, and adding a fraction to a study never
  changes the subset of another (the order does not depend on which fractions are run);
- **every class kept**: the order starts with a *cover*, a few cases that together hold objects of every class
  present among the fold's training cases (for each class, rarest first, one case holding it is drawn at random
  unless an earlier draw already holds it), and no subset is smaller than the cover;
- **stratified**: after the cover, the cases of each stratum (the set of classes a case holds objects of; cases
  without objects form their own stratum) are shuffled and interleaved by random systematic sampling (the j-th
  of ``m`` cases of a stratum gets the key ``(j + u) / m`` with one uniform ``u`` per stratum, and the cases are
  taken in key order), so every prefix holds each stratum in proportion to within one case or so.

The validation cases stay the whole fold: the curves compare models on the same cases. Fraction 1.0 is the fold's
training set as it is (no subset file; the study's runs of today).

One JSON file per (dataset, fold, fraction), written beside the dataset's ``splits.json`` under
``label_fractions/fraction{f}/fold{k}.json`` (:func:`write_label_subset`), records the subset (``train``), the
fold's validation cases (``val``), the whole order, the cover, the seed and each training case's classes, so the
subset is reproducible and inspectable; ``training.finetune`` reads its ``train`` list (:func:`read_label_subset`).

Example:
    >>> classes = {"a": {0}, "b": set(), "c": {1}, "d": set(), "e": {0}, "f": set()}
    >>> order = stratified_order(classes, seed=0)
    >>> small, large = label_subset(order, 0.25, classes), label_subset(order, 0.5, classes)
    >>> set(small) <= set(large), len(small), len(large)
    (True, 2, 3)
    >>> sorted(set().union(*(classes[c] for c in small)))
    [0, 1]
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pretrain_det3d.utils.atomic import write_json

#: Path segment of a run below fraction 1 (``results/.../{dataset}/fraction0.25/fold0...``); fraction 1 has none.
SEGMENT_PREFIX = "fraction"
#: Decimals a fraction may have (it is written into paths, so it must round-trip through its text).
FRACTION_DECIMALS = 6
#: Folder of the subset files, beside the dataset's splits.json.
SUBSETS_DIR = "label_fractions"
#: ``study.label_fraction_schedule`` choices: the fold's schedule as it is, or iterations and warm-up x fraction.
SCHEDULES = ("same", "scaled")


class LabelSubsetError(ValueError):
    """A subset file or its inputs are malformed; the message names the file."""


def format_fraction(fraction: float) -> str:
    """The text of a fraction in paths: fixed-point, no trailing zeros; more than 6 decimals is an error.

    Example:
        >>> format_fraction(0.25), format_fraction(0.1), format_fraction(1.0)
        ('0.25', '0.1', '1')
    """
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"a label fraction lies in (0, 1], got {fraction}")
    text = f"{fraction:.{FRACTION_DECIMALS}f}".rstrip("0").rstrip(".")
    if float(text) != fraction:
        raise ValueError(f"label fraction {fraction!r} has more than {FRACTION_DECIMALS} decimals")
    return text


def fraction_segment(fraction: float) -> str:
    """The path segment of a fraction: ``""`` for 1 (today's paths), else ``"fraction{f}/"``.

    Example:
        >>> fraction_segment(1.0), fraction_segment(0.5)
        ('', 'fraction0.5/')
    """
    return "" if float(fraction) == 1.0 else f"{SEGMENT_PREFIX}{format_fraction(fraction)}/"


def segment_fraction(segment: str) -> float:
    """The fraction of a path segment made by :func:`fraction_segment` (``""`` is 1).

    Example:
        >>> segment_fraction(""), segment_fraction("fraction0.25/")
        (1.0, 0.25)
    """
    if segment == "":
        return 1.0
    text = segment.rstrip("/")
    if not text.startswith(SEGMENT_PREFIX):
        raise ValueError(f"not a label-fraction path segment: {segment!r}")
    fraction = float(text[len(SEGMENT_PREFIX):])
    if fraction_segment(fraction) != segment:
        raise ValueError(f"not a canonical label-fraction path segment: {segment!r} "
                         f"(expected {fraction_segment(fraction)!r})")
    return fraction


def subset_path(preprocessed_root: str | os.PathLike, fold: int, fraction: float) -> Path:
    """Where the subset file of ``fold`` at ``fraction`` (below 1) lives.

    Example:
        >>> subset_path("results/data/preprocessed/demo", 0, 0.25).as_posix()
        'results/data/preprocessed/demo/label_fractions/fraction0.25/fold0.json'
    """
    segment = fraction_segment(fraction)
    if not segment:
        raise ValueError("fraction 1 has no subset file: it trains on the fold's training cases")
    return Path(preprocessed_root) / SUBSETS_DIR / segment / f"fold{int(fold)}.json"


def _rng(seed: int, purpose: str) -> np.random.Generator:
    """A generator for one purpose, independent of the other draws of the same seed."""
    return np.random.default_rng([int(seed), *purpose.encode("utf-8")])


def class_cover(case_classes: Mapping[str, Iterable[int]], seed: int) -> list[str]:
    """Cases that together hold objects of every class present in ``case_classes`` (see the module docstring).

    Classes are visited rarest first (ties: lower class index); for a class no chosen case holds yet, one case
    holding it is drawn uniformly (cases sorted by id first, so the listing order never matters).

    Example:
        >>> class_cover({"a": {0, 1}, "b": {0}, "c": set()}, seed=0)  # class 1 is rarest: only "a" holds it
        ['a']
    """
    classes = {str(case): frozenset(int(c) for c in held) for case, held in case_classes.items()}
    counts: dict[int, int] = {}
    for held in classes.values():
        for c in held:
            counts[c] = counts.get(c, 0) + 1
    rng = _rng(seed, "cover")
    cover: list[str] = []
    covered: set[int] = set()
    for c in sorted(counts, key=lambda k: (counts[k], k)):
        if c in covered:
            continue
        holders = sorted(case for case, held in classes.items() if c in held)
        chosen = holders[int(rng.integers(len(holders)))]
        cover.append(chosen)
        covered |= classes[chosen]
    return cover


def stratified_order(case_classes: Mapping[str, Iterable[int]], seed: int) -> list[str]:
    """Every case of ``case_classes`` (case id -> classes it holds objects of) in one seeded, stratified order:
    the class cover first, then the other cases interleaved by stratum (see the module docstring).

    Example:
        >>> order = stratified_order({"a": {0}, "b": set(), "c": set(), "d": {0}}, seed=1)
        >>> sorted(order), order[0] in ("a", "d")
        (['a', 'b', 'c', 'd'], True)
    """
    classes = {str(case): frozenset(int(c) for c in held) for case, held in case_classes.items()}
    if not classes:
        raise ValueError("no cases to order")
    cover = class_cover(classes, seed)
    rest = sorted(set(classes) - set(cover))
    strata: dict[tuple[int, ...], list[str]] = {}
    for case in rest:
        strata.setdefault(tuple(sorted(classes[case])), []).append(case)
    rng = _rng(seed, "strata")
    keyed: list[tuple[float, int, str]] = []
    for rank, stratum in enumerate(sorted(strata)):
        members = [strata[stratum][i] for i in rng.permutation(len(strata[stratum]))]
        offset = float(rng.random())
        keyed += [((j + offset) / len(members), rank, case) for j, case in enumerate(members)]
    return cover + [case for _, _, case in sorted(keyed)]


def subset_size(fraction: float, num_cases: int, min_size: int = 1) -> int:
    """Cases in the subset of ``fraction``: ``ceil(fraction x num_cases)``, at least ``min_size`` (the cover),
    at most ``num_cases``. The product is rounded to 9 decimals first, so 0.1 x 30 gives 3, not 4.

    Example:
        >>> subset_size(0.1, 30), subset_size(0.25, 10), subset_size(0.1, 10, min_size=2), subset_size(1.0, 7)
        (3, 3, 2, 7)
    """
    if num_cases < 1:
        raise ValueError("a fold without training cases has no subsets")
    size = math.ceil(round(float(fraction) * num_cases, 9))
    return int(min(num_cases, max(size, min_size, 1)))


def label_subset(order: Sequence[str], fraction: float, case_classes: Mapping[str, Iterable[int]],
                 seed: int | None = None) -> list[str]:
    """The first :func:`subset_size` cases of ``order`` (made by :func:`stratified_order` with ``seed``; the
    cover's size is recomputed from ``case_classes`` when ``seed`` is given, else taken as the shortest prefix of
    ``order`` that holds every class).

    Example:
        >>> label_subset(["a", "b", "c", "d"], 0.5, {"a": {0}, "b": set(), "c": {1}, "d": set()})
        ['a', 'b', 'c']
    """
    if seed is not None:
        cover = len(class_cover(case_classes, seed))
    else:
        wanted = set().union(*(set(held) for held in case_classes.values())) if case_classes else set()
        seen: set[int] = set()
        cover = 0
        while seen != wanted:
            seen |= set(case_classes[order[cover]])
            cover += 1
    return list(order[: subset_size(fraction, len(order), cover)])


def read_case_classes(preprocessed_root: str | os.PathLike, case_ids: Iterable[str]) -> dict[str, list[int]]:
    """Classes each case holds objects of, from ``{preprocessed_root}/cases/{case}.json`` (``instances``: instance
    id -> class), the metadata the trainer samples from.

    Example:
        >>> read_case_classes("results/data/preprocessed/demo", ["case_000"])  # doctest: +SKIP
        {'case_000': [0, 1]}
    """
    classes = {}
    for case in case_ids:
        path = Path(preprocessed_root) / "cases" / f"{case}.json"
        if not path.is_file():
            raise LabelSubsetError(f"{path}: metadata of training case {case!r} is missing (run preprocessing)")
        try:
            instances = json.loads(path.read_text())["instances"]
            classes[str(case)] = sorted({int(c) for c in instances.values()})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise LabelSubsetError(f"{path}: needs 'instances' (instance id -> class index): {error}") from None
    return classes


def _fold(preprocessed_root: Path, fold: int) -> dict[str, Any]:
    path = preprocessed_root / "splits.json"
    try:
        splits = json.loads(path.read_text())
        entry = splits[int(fold)]
        return {"train": [str(c) for c in entry["train"]], "val": [str(c) for c in entry["val"]]}
    except FileNotFoundError:
        raise LabelSubsetError(f"{path}: missing (run preprocessing first)") from None
    except (json.JSONDecodeError, IndexError, KeyError, TypeError) as error:
        raise LabelSubsetError(f"{path}: no fold {fold} with 'train' and 'val' lists ({error})") from None


def write_label_subset(preprocessed_root: str | os.PathLike, fold: int, fraction: float, seed: int,
                       out: str | os.PathLike | None = None) -> Path:
    """Write the subset file of ``fold`` at ``fraction`` (below 1) and return its path (default
    :func:`subset_path`). Keys: dataset folder, fold, fraction, seed, ``train`` (the subset, sorted), ``val`` (the
    fold's validation cases), ``num_fold_train``, ``order``, ``cover``, ``case_classes``.

    Example:
        >>> write_label_subset("results/data/preprocessed/demo", fold=0, fraction=0.25, seed=0)  # doctest: +SKIP
        PosixPath('results/data/preprocessed/demo/label_fractions/fraction0.25/fold0.json')
    """
    root = Path(preprocessed_root)
    out = Path(out) if out is not None else subset_path(root, fold, fraction)
    if fraction_segment(fraction) == "":
        raise ValueError("fraction 1 has no subset file: it trains on the fold's training cases")
    split = _fold(root, fold)
    if not split["train"]:
        raise LabelSubsetError(f"{root / 'splits.json'}: fold {fold} has no training cases")
    classes = read_case_classes(root, split["train"])
    order = stratified_order(classes, seed)
    cover = class_cover(classes, seed)
    subset = label_subset(order, fraction, classes, seed)
    record = {
        "dataset": root.name, "fold": int(fold), "fraction": float(fraction), "seed": int(seed),
        "train": sorted(subset), "val": split["val"], "num_fold_train": len(split["train"]),
        "order": order, "cover": cover, "case_classes": classes,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, record)
    return out


def read_label_subset(path: str | os.PathLike, fold: int, fold_train: Sequence[str]) -> list[str]:
    """The ``train`` list of a subset file, checked: written for ``fold``, non-empty, inside ``fold_train``.

    Example:
        >>> read_label_subset("results/data/preprocessed/demo/label_fractions/fraction0.25/fold0.json", 0,
        ...                   ["case_000", "case_001"])  # doctest: +SKIP
        ['case_001']
    """
    path = Path(path)
    if not path.is_file():
        raise LabelSubsetError(f"{path}: label-fraction subset file not found")
    try:
        record = json.loads(path.read_text())
        train = [str(c) for c in record["train"]]
        written_for = int(record["fold"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise LabelSubsetError(f"{path}: not a subset file (needs 'fold' and a 'train' list): {error}") from None
    if written_for != int(fold):
        raise LabelSubsetError(f"{path}: written for fold {written_for}, used for fold {fold}")
    if not train:
        raise LabelSubsetError(f"{path}: empty 'train' list")
    outside = sorted(set(train) - set(map(str, fold_train)))
    if outside:
        raise LabelSubsetError(f"{path}: cases {outside[:5]} are not training cases of fold {fold}")
    return train


def scaled_iterations(iterations: int, warmup_iterations: int, scale: float) -> tuple[int, int]:
    """``(iterations, warmup_iterations)`` of the ``scaled`` schedule: ``ceil(iterations x scale)`` and
    ``floor(warmup x scale)`` (products rounded to 9 decimals), which keeps the warm-up below the iterations.

    Example:
        >>> scaled_iterations(1000, 100, 0.25), scaled_iterations(10, 4, 0.1)
        ((250, 25), (1, 0))
    """
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"schedule scale lies in (0, 1], got {scale}")
    return (max(1, math.ceil(round(iterations * scale, 9))), math.floor(round(warmup_iterations * scale, 9)))
