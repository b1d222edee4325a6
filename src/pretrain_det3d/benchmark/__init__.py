"""Throughput benchmark: training step, data loading, inference, evaluation, and comparisons with nnU-Net / MONAI.

``run_benchmark(settings, out_json)`` is what ``python -m pretrain_det3d benchmark`` calls; one module per
measured thing (``training``, ``loading``, ``inference``, ``evaluation``, ``comparisons``), ``timing`` for the
shared clock, ``fixtures`` for the synthetic arrays, ``report`` for the JSON record and its table.
"""

from pretrain_det3d.benchmark.report import format_table, validate_record
from pretrain_det3d.benchmark.run import BenchmarkSettings, run_benchmark

__all__ = ["BenchmarkSettings", "format_table", "run_benchmark", "validate_record"]
