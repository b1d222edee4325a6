"""Case-level bootstrap: percentile confidence intervals and paired differences of any statistic over cases.

The statistic is a callable over a list of case ids, ``statistic(case_ids) -> float``; the list of a bootstrap
resample holds repeated ids (a case drawn twice counts twice). This lets the evaluation code recompute AP, FROC
or anything else from the detections of the resampled cases, while a simple statistic (the mean of a per-case
column) serves the tests.

Method (Efron and Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13):

- resamples: ``n_resamples`` draws of ``n`` case positions with replacement, ``numpy.random.default_rng(seed)
  .integers(0, n, size=(n_resamples, n))``, the same draws as ``scipy.stats.bootstrap`` with that generator;
- confidence interval: the percentile interval, the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
  quantiles of the bootstrap distribution with linear interpolation (``numpy.quantile``'s default, as
  ``scipy.stats.bootstrap(method="percentile")``); default 95 %, ``DEFAULT_N_RESAMPLES`` = 1000 resamples;
- paired comparison: both statistics are evaluated on the *same* resampled case lists, the difference
  ``a - b`` per resample forms the distribution; its two-sided p-value is the smallest level at which the
  percentile interval excludes 0, ``p = min(1, 2 * min((1 + #{d <= 0}) / (B + 1), (1 + #{d >= 0}) / (B + 1)))``;
  the ``+1`` counts the observed data as one resample so that p is never 0 (Davison and Hinkley 1997, ch. 4).
- seeds: tables use ``dataset_seed(seed, dataset)``, so every detector and initialisation of a dataset is
  evaluated on the same resamples (paired), and a dataset's resamples do not depend on which other datasets
  are in the study.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from pretrain_det3d.settings.study import StatisticsSettings

#: A statistic over a list of case ids (ids may repeat in a bootstrap resample).
CaseStatistic = Callable[[Sequence[str]], float]
#: Number of bootstrap resamples (the common minimum for 95 % percentile intervals; raise it for publication).
DEFAULT_N_RESAMPLES = StatisticsSettings.default("n_resamples")
#: Coverage of the confidence intervals.
DEFAULT_CONFIDENCE = StatisticsSettings.default("confidence")
#: Seed of the resampling when the caller gives none.
DEFAULT_SEED = StatisticsSettings.default("seed")
#: Show a progress bar when at least this many resamples are evaluated (AP recomputation can be slow).
PROGRESS_MIN_RESAMPLES = 200


@dataclass(frozen=True)
class BootstrapResult:
    """A statistic on all cases, its percentile interval and the bootstrap distribution ``[n_resamples]``."""

    estimate: float
    ci_low: float
    ci_high: float
    distribution: np.ndarray
    confidence: float
    seed: int | tuple[int, ...]


@dataclass(frozen=True)
class PairedBootstrapResult:
    """``statistic_a - statistic_b`` on all cases, its percentile interval, p-value and distribution."""

    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    distribution: np.ndarray
    confidence: float
    seed: int | tuple[int, ...]


def dataset_seed(seed: int, dataset: str) -> tuple[int, int]:
    """Seed of a dataset's resamples: the study seed and a stable hash (CRC-32) of the dataset name.

    Python's ``hash`` of a string changes between processes, CRC-32 does not.

    Example:
        >>> dataset_seed(0, "luna16")
        (0, 1691202097)
    """
    return (int(seed), zlib.crc32(dataset.encode("utf-8")))


def resample_indices(n_cases: int, n_resamples: int = DEFAULT_N_RESAMPLES,
                     seed: int | Sequence[int] = DEFAULT_SEED) -> np.ndarray:
    """Case positions of each resample, int ``[n_resamples, n_cases]``, drawn with replacement.

    Example:
        >>> resample_indices(3, 2, seed=0).shape
        (2, 3)
    """
    if n_cases < 1:
        raise ValueError(f"bootstrap needs at least one case, got {n_cases}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_cases, size=(n_resamples, n_cases))


def evaluate_resamples(case_ids: Sequence[str], statistics: Sequence[CaseStatistic],
                       indices: np.ndarray, description: str = "bootstrap") -> np.ndarray:
    """Each statistic on each resample, float ``[n_resamples, len(statistics)]``.

    Evaluating several statistics on one resample's case list is what makes comparisons and rankings paired.

    Example:
        >>> values = {"a": 1.0, "b": 3.0}
        >>> mean = lambda ids: float(np.mean([values[i] for i in ids]))
        >>> evaluate_resamples(["a", "b"], [mean], np.array([[0, 0], [0, 1]])).tolist()
        [[1.0], [2.0]]
    """
    ids = np.asarray(list(case_ids), dtype=object)
    if indices.ndim != 2 or indices.shape[1] != len(ids):
        raise ValueError(f"indices must have shape [n_resamples, {len(ids)}], got {list(indices.shape)}")
    result = np.empty((indices.shape[0], len(statistics)), dtype=np.float64)
    rows = tqdm(indices, desc=description, unit="resample", leave=False,
                disable=indices.shape[0] < PROGRESS_MIN_RESAMPLES)
    for row, positions in enumerate(rows):
        resampled = ids[positions].tolist()
        for column, statistic in enumerate(statistics):
            result[row, column] = float(statistic(resampled))
    return result


def percentile_interval(distribution: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """The two-sided percentile interval of a bootstrap distribution (linear interpolation between order stats).

    Example:
        >>> low, high = percentile_interval(np.arange(101.0), 0.9)
        >>> round(low, 9), round(high, 9)
        (5.0, 95.0)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    alpha = (1.0 - confidence) / 2.0
    values = _defined(distribution)
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _defined(distribution: np.ndarray) -> np.ndarray:
    """The resamples whose statistic is defined: AP is undefined (NaN) on a resample without any ground truth,
    which small validation sets draw now and then; such resamples are left out of intervals and p-values."""
    values = np.asarray(distribution, dtype=np.float64).ravel()
    return values[~np.isnan(values)]


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p-value of "no difference" from a bootstrap distribution of differences (module docstring).

    Example:
        >>> bootstrap_p_value(np.array([0.1, 0.2, 0.3, -0.1]))  # 2 * (1 + 1) / 5
        0.8
    """
    differences = _defined(differences)
    count = differences.size
    if count == 0:
        return float("nan")
    at_or_below = (1 + int(np.sum(differences <= 0))) / (count + 1)
    at_or_above = (1 + int(np.sum(differences >= 0))) / (count + 1)
    return float(min(1.0, 2.0 * min(at_or_below, at_or_above)))


def bootstrap_ci(case_ids: Sequence[str], statistic: CaseStatistic, n_resamples: int = DEFAULT_N_RESAMPLES,
                 confidence: float = DEFAULT_CONFIDENCE,
                 seed: int | tuple[int, ...] = DEFAULT_SEED) -> BootstrapResult:
    """Percentile bootstrap interval over cases of ``statistic``.

    Example:
        >>> values = {"a": 0.0, "b": 1.0, "c": 2.0}
        >>> mean = lambda ids: float(np.mean([values[i] for i in ids]))
        >>> result = bootstrap_ci(["a", "b", "c"], mean, n_resamples=500, seed=1)
        >>> result.estimate, result.ci_low <= 1.0 <= result.ci_high
        (1.0, True)
    """
    case_ids = list(case_ids)
    indices = resample_indices(len(case_ids), n_resamples, seed)
    distribution = evaluate_resamples(case_ids, [statistic], indices)[:, 0]
    low, high = percentile_interval(distribution, confidence)
    return BootstrapResult(float(statistic(case_ids)), low, high, distribution, confidence, seed)


def paired_bootstrap(case_ids: Sequence[str], statistic_a: CaseStatistic, statistic_b: CaseStatistic,
                     n_resamples: int = DEFAULT_N_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE,
                     seed: int | tuple[int, ...] = DEFAULT_SEED) -> PairedBootstrapResult:
    """Paired bootstrap over cases of ``statistic_a - statistic_b``: both see the same resampled cases.

    Example:
        >>> a = {"x": 1.0, "y": 2.0, "z": 3.0}; b = {"x": 0.0, "y": 1.0, "z": 2.5}
        >>> mean_of = lambda table: (lambda ids: float(np.mean([table[i] for i in ids])))
        >>> result = paired_bootstrap(["x", "y", "z"], mean_of(a), mean_of(b), n_resamples=200, seed=0)
        >>> round(result.difference, 3), result.ci_low > 0
        (0.833, True)
    """
    case_ids = list(case_ids)
    indices = resample_indices(len(case_ids), n_resamples, seed)
    values = evaluate_resamples(case_ids, [statistic_a, statistic_b], indices, description="paired bootstrap")
    differences = values[:, 0] - values[:, 1]
    low, high = percentile_interval(differences, confidence)
    observed = float(statistic_a(case_ids)) - float(statistic_b(case_ids))
    return PairedBootstrapResult(observed, low, high, bootstrap_p_value(differences), differences, confidence, seed)
