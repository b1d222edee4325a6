"""Command line: ``python -m pretrain_det3d <verb> ...``, one verb per kind of workflow rule.

Every Snakemake rule calls one verb; the verbs only parse arguments and call the package, so each step can
also be run by hand. Settings arrive as one JSON object (``--settings '{"iterations": 100}'``).

Example:
    python -m pretrain_det3d synthesize-dataset --out /tmp/demo --name demo --settings '{"num_cases": 4}'
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("pretrain_det3d")


def _settings(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--settings is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--settings must be a JSON object")
    return value


def check_detector_settings(detector: str, settings: dict[str, Any]) -> None:
    """Refuse unknown keys and wrong types before any work, with the detector's settings class."""
    from pretrain_det3d.settings.detectors import detector_settings_class

    detector_settings_class(detector).parse(settings, where=f"detectors ({detector})")


def check_method_settings(method: str, settings: dict[str, Any]) -> None:
    """Refuse unknown keys and wrong types before any work, with the method's settings class.

    The rule hands labelled datasets over resolved to ``{name, root, classes}``; they are checked under the
    names the config uses.
    """
    from pretrain_det3d.settings.pretraining import method_settings_class

    as_configured = dict(settings)
    if isinstance(settings.get("datasets"), list):
        as_configured["datasets"] = [
            {"dataset": d.get("name"), **({"classes": d["classes"]} if d.get("classes") else {})}
            if isinstance(d, dict) else d for d in settings["datasets"]
        ]
    method_settings_class(method).parse(as_configured, where=f"pretraining.methods ({method})")


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _validation_cases(splits_path: Path, fold: int) -> list[str]:
    splits = json.loads(Path(splits_path).read_text())
    if not 0 <= fold < len(splits):
        raise ValueError(f"{splits_path}: fold {fold} does not exist (the file holds {len(splits)} folds)")
    return list(splits[fold]["val"])


#: synthetic dataset kinds (``synthetic.kind`` in the config) -> "module:function" writing one in the converted format
SYNTHETIC_KINDS = {
    "lesions": "pretrain_det3d.data.synthetic:write_synthetic_dataset",  # detection datasets (the default)
    "organs": "pretrain_det3d.pretraining.multitalent:write_synthetic_organ_dataset",  # segmentation, for multitalent
}


def cmd_synthesize_dataset(args: argparse.Namespace) -> None:
    import importlib

    settings = dict(args.settings)
    kind = settings.pop("kind", "lesions")
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"synthetic settings key 'kind': unknown kind {kind!r}; known: {sorted(SYNTHETIC_KINDS)}")
    module, function = SYNTHETIC_KINDS[kind].split(":")
    getattr(importlib.import_module(module), function)(args.out, args.name, settings, args.seed)


def cmd_synthesize_corpus(args: argparse.Namespace) -> None:
    from pretrain_det3d.data.synthetic import write_synthetic_corpus

    write_synthetic_corpus(args.out, args.settings, args.seed)


def cmd_download(args: argparse.Namespace) -> None:
    from pretrain_det3d.data.download import fetch_source

    root = fetch_source(args.source_json, args.out)
    print(f"source ready: {root}")


def cmd_convert(args: argparse.Namespace) -> None:
    from pretrain_det3d.data.converters import convert_dataset

    convert_dataset(args.converter, args.source, args.out, args.settings)


def cmd_export_luna16(args: argparse.Namespace) -> None:
    from pretrain_det3d.data.luna16_export import export_luna16_csv

    cases = _validation_cases(args.splits, args.fold)
    rows = export_luna16_csv(args.predictions, args.converted, cases, args.out)
    print(f"{args.out}: {rows} candidates")


def cmd_luna16_cpm(args: argparse.Namespace) -> None:
    from pretrain_det3d.data.converters.luna16 import reference_tables
    from pretrain_det3d.evaluation.luna16_cpm import evaluate_luna16_csv

    cases = [case for fold in args.folds for case in _validation_cases(args.splits, fold)]
    annotations, excluded = reference_tables(args.converted)
    if excluded is None:
        log.warning("%s: no annotations_excluded.csv; hits on LUNA16's excluded findings count as false positives",
                    args.converted)
    result = evaluate_luna16_csv(args.candidates, annotations, excluded, cases, args.out_json, args.out_froc)
    print(f"{args.out_json}: LUNA16 CPM {result.cpm:.4f} over {result.num_scans} scans, {result.num_nodules} nodules")


def cmd_check_dataset(args: argparse.Namespace) -> None:
    import dataclasses

    from pretrain_det3d.data.dataset_format import check_converted_dataset
    from pretrain_det3d.utils.atomic import write_json

    summary = check_converted_dataset(args.root)
    record = dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else dict(summary)
    write_json(args.out, json.loads(json.dumps(record, default=str)))
    print(f"{args.root}: ok")


def cmd_preprocess(args: argparse.Namespace) -> None:
    from pretrain_det3d.data.preprocessing import run_preprocessing

    run_preprocessing(args.converted, args.out, args.num_folds, args.seed, args.settings)


def cmd_preprocess_corpus(args: argparse.Namespace) -> None:
    from pretrain_det3d.data.preprocessing import preprocess_corpus

    preprocess_corpus(args.corpus, args.out, args.settings)


def cmd_index_corpus(args: argparse.Namespace) -> None:
    from pretrain_det3d.data.corpus import index_corpus

    manifest = index_corpus(args.source_json, args.out, args.name, args.num_workers)
    print(f"{args.out}: {len(manifest['volumes'])} volumes, {len(manifest['failures'])} unreadable")


def cmd_plan_corpus(args: argparse.Namespace) -> None:
    from pretrain_det3d.data.corpus import plan_corpus

    plan_corpus(args.manifest, args.out, args.settings)


def cmd_preprocess_corpus_shard(args: argparse.Namespace) -> None:
    from pretrain_det3d.data.corpus import preprocess_corpus_shard

    preprocess_corpus_shard(args.plan, args.out, args.shard, args.num_shards, args.num_workers)


def cmd_gather_corpus(args: argparse.Namespace) -> None:
    from pretrain_det3d.data.corpus import gather_corpus

    plan = gather_corpus(args.plan, args.shards, args.out, args.max_failure_fraction)
    print(f"{args.out}: {plan['num_cases']} volumes, {plan['num_failed']} skipped")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from pretrain_det3d.pretraining import run_pretraining

    _set_threads(args.threads)
    settings = {"threads": args.threads, **args.settings}
    check_method_settings(args.method, settings)
    run_pretraining(args.corpus, args.method, settings, args.out, args.seed)


def cmd_fetch_checkpoint(args: argparse.Namespace) -> None:
    from pretrain_det3d.models.published import fetch_published_checkpoint

    fetch_published_checkpoint(args.entry, args.out, where=f"pretraining.published.{args.name}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from pretrain_det3d.training.finetune import run_finetuning

    _set_threads(args.threads)
    settings = {"threads": args.threads, **args.settings}
    check_detector_settings(args.detector, settings)
    run_finetuning(args.preprocessed, args.fold, args.detector, settings, args.init, args.out_dir, args.seed,
                   train_subset=args.train_subset, schedule=args.schedule, init_stem=args.init_stem,
                   init_stem_key=args.init_stem_key)


def cmd_label_fraction_runs(args: argparse.Namespace) -> None:
    from pretrain_det3d.analysis.label_efficiency import write_fraction_runs

    write_fraction_runs(json.loads(args.runs), args.out_csv)


def cmd_label_subset(args: argparse.Namespace) -> None:
    from pretrain_det3d.data.label_fractions import write_label_subset

    path = write_label_subset(args.preprocessed, args.fold, args.fraction, args.seed, args.out)
    print(f"{path}: label-fraction subset written")


def cmd_predict(args: argparse.Namespace) -> None:
    from pretrain_det3d.inference.predict import run_prediction

    _set_threads(args.threads)
    cases = _validation_cases(Path(args.preprocessed) / "splits.json", args.fold)
    run_prediction(args.model, args.preprocessed, cases, args.out_dir, args.settings)


def cmd_detect(args: argparse.Namespace) -> None:
    from pretrain_det3d.inference.detect import run_detection

    _set_threads(args.threads)
    settings = dict(args.settings)
    if args.device is not None:
        settings["device"] = args.device
    failures = run_detection(args.run, args.input, args.output, folds=args.folds, png_score=args.png_score,
                             settings=settings, config=args.config, plan_path=args.plan)
    print(f"{args.output}: detections written" + (f"; {len(failures)} input(s) skipped" if failures else ""))
    if failures:
        raise SystemExit(1)


def cmd_predict_raw(args: argparse.Namespace) -> None:
    from pretrain_det3d.inference.postprocessing import TEST_CASES_DIR, preprocessed_case_ids, run_raw_prediction

    _set_threads(args.threads)
    if args.test:
        cases_dir = Path(args.preprocessed) / TEST_CASES_DIR
        cases = preprocessed_case_ids(cases_dir)
    else:
        cases_dir = Path(args.preprocessed) / "cases"
        cases = _validation_cases(Path(args.preprocessed) / "splits.json", args.fold)
    run_raw_prediction(args.model, cases_dir, cases, args.out_dir, args.settings)


def cmd_sweep(args: argparse.Namespace) -> None:
    from pretrain_det3d.inference.postprocessing import run_sweep

    record = run_sweep(args.raw, args.converted, args.out, args.settings, args.postprocessing, args.folds,
                       evaluated=args.evaluated)
    print(f"{args.out}: {record['source']} parameters {record['parameters']}")


def cmd_consolidate(args: argparse.Namespace) -> None:
    from pretrain_det3d.inference.postprocessing import run_consolidation

    params = run_consolidation(args.raw, args.out_dir, args.settings, args.postprocessing_json)
    print(f"{args.out_dir}: consolidated with {params}")


def cmd_preprocess_test(args: argparse.Namespace) -> None:
    from pretrain_det3d.inference.postprocessing import preprocess_test_cases

    cases = preprocess_test_cases(args.converted, args.plan, args.out)
    print(f"{args.out}: {len(cases)} test case(s)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pretrain_det3d.evaluation import run_evaluation

    extra = {}
    if args.postprocessing is not None:
        from pretrain_det3d.inference.postprocessing import postprocessing_summary

        extra["postprocessing"] = postprocessing_summary(json.loads(Path(args.postprocessing).read_text()))
    if args.test:
        from pretrain_det3d.data.io import list_case_ids

        cases = list_case_ids(args.converted, test=True)
    else:
        if args.splits is None or args.fold is None:
            raise ValueError("evaluate needs --splits and --fold (or --test for the held-out test cases)")
        cases = _validation_cases(args.splits, args.fold)
    run_evaluation(args.predictions, args.converted, cases, args.out_json, args.out_csv, test=args.test,
                   extra=extra)


def cmd_chance_level(args: argparse.Namespace) -> None:
    from pretrain_det3d.evaluation.chance import DEFAULT_BOXES_PER_CASE, DEFAULT_DRAWS, run_chance_level

    splits = json.loads(Path(args.splits).read_text())
    if not 0 <= args.fold < len(splits):
        raise ValueError(f"{args.splits}: fold {args.fold} does not exist (the file holds {len(splits)} folds)")
    unknown = sorted(set(args.settings) - {"draws", "boxes_per_case", "seed"})
    if unknown:
        raise ValueError(f"chance-level --settings: unknown keys {unknown} (known: boxes_per_case, draws, seed)")
    result = run_chance_level(args.converted, splits[args.fold]["train"], splits[args.fold]["val"], args.out_json,
                              draws=int(args.settings.get("draws", DEFAULT_DRAWS)),
                              boxes_per_case=int(args.settings.get("boxes_per_case", DEFAULT_BOXES_PER_CASE)),
                              seed=int(args.settings.get("seed", 0)))
    print(f"{args.out_json}: random boxes reach AP@0.1 {result['AP_IoU_0.10_MaxDet_100']:.3f} "
          f"(mean of {result['draws']} draws)")


def cmd_aggregate(args: argparse.Namespace) -> None:
    from pretrain_det3d.analysis.aggregate import run_aggregation

    runs = json.loads(args.runs)
    metric_files = [(r["arch"], r["init"], r["dataset"], int(r["fold"]), r["path"]) for r in runs]
    run_aggregation(metric_files, args.out_csv, args.out_md, runs_csv=args.runs_csv)


def cmd_plot_ap_by_init(args: argparse.Namespace) -> None:
    from pretrain_det3d.analysis.figures import plot_ap_by_init

    plot_ap_by_init(args.runs_csv, args.out_png, args.out_pdf)


def _study_inputs(args: argparse.Namespace):
    from pretrain_det3d.analysis.outputs import StudyInputs

    return StudyInputs(runs_csv=args.runs_csv, metrics_root=args.metrics_root,
                       predictions_root=args.predictions_root, converted_root=args.converted_root)


def cmd_learning_curve(args: argparse.Namespace) -> None:
    from pretrain_det3d.analysis.learning_curve import plot_learning_curve

    plot_learning_curve(args.log, args.metrics, args.out_png, args.title)


def cmd_figure(args: argparse.Namespace) -> None:
    from pretrain_det3d.analysis.outputs import make_figure

    make_figure(args.name, _study_inputs(args), args.out_png, args.out_pdf, args.settings)


def cmd_table(args: argparse.Namespace) -> None:
    from pretrain_det3d.analysis.outputs import make_table

    out_paths = {key: value for key, value in (("csv", args.out_csv), ("md", args.out_md), ("tex", args.out_tex))
                 if value is not None}
    make_table(args.name, _study_inputs(args), out_paths, args.settings)


def cmd_benchmark_quality(args: argparse.Namespace) -> None:
    from pretrain_det3d.benchmark.quality import CURVE_FILE, RECORD_FILE, format_quality_table, run_quality_benchmark

    record = run_quality_benchmark(args.out, args.settings)
    print(format_quality_table(record))
    print(f"wrote {args.out / RECORD_FILE} and {args.out / CURVE_FILE}")


def cmd_benchmark(args: argparse.Namespace) -> None:
    from pretrain_det3d.benchmark import format_table, run_benchmark
    from pretrain_det3d.benchmark.run import settings_from_study_config

    settings: dict[str, Any] = {}
    if args.from_config is not None:
        settings.update(settings_from_study_config(args.from_config, args.detector or "retina_unet"))
    elif args.detector is not None:
        settings["detector"] = args.detector
    for key in ("preset", "patch_size", "batch_size", "num_workers", "device", "threads"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value[0] if key == "patch_size" and len(value) == 1 else value
    for key, value in args.settings.items():  # nested dicts (training, detector_settings) merge
        settings[key] = {**settings[key], **value} if isinstance(value, dict) and isinstance(settings.get(key), dict) else value
    record = run_benchmark(settings, args.out)
    print(format_table(record))


def cmd_demo_table(args: argparse.Namespace) -> None:
    import datetime

    from pretrain_det3d.analysis.demo_table import write_demo_table

    date = datetime.date.fromisoformat(args.date) if args.date else None
    block = write_demo_table(args.main_results, args.readme, args.metrics_root, args.config, date, args.print)
    print(block if args.print else f"{args.readme}: demo table rewritten from {args.main_results}")


def cmd_config_docs(args: argparse.Namespace) -> None:
    from pretrain_det3d.settings.docs import write_or_check

    stale = write_or_check(args.root, check=args.check)
    if args.check and stale:
        raise SystemExit(f"out of date: {', '.join(map(str, stale))}; run `python -m pretrain_det3d config-docs`")
    for path in stale:
        print(f"wrote {path}")


def cmd_cluster_check(args: argparse.Namespace) -> None:
    from pretrain_det3d.cluster_check import cluster_check

    if cluster_check(args):
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain_det3d", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, func: Callable[[argparse.Namespace], None], help_text: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(func=func)
        return sub

    p = verb("synthesize-dataset", cmd_synthesize_dataset, "write a synthetic labelled dataset (converted format)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--settings", type=_settings, default={})
    p.add_argument("--seed", type=int, default=0)

    p = verb("synthesize-corpus", cmd_synthesize_corpus, "write an unlabelled synthetic pre-training corpus")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--settings", type=_settings, default={})
    p.add_argument("--seed", type=int, default=0)

    p = verb("download", cmd_download, "download and verify a dataset source (or check a local copy)")
    p.add_argument("--source-json", type=_settings, required=True, help="the source entry as JSON")
    p.add_argument("--out", type=Path, required=True)

    p = verb("convert", cmd_convert, "convert a fetched source into the converted (nnDetection raw) format")
    p.add_argument("--converter", required=True)
    p.add_argument("--source", type=Path, required=True, help="folder holding source.json, or the data itself")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--settings", type=_settings, default={})

    p = verb("export-luna16", cmd_export_luna16, "write a fold's predictions as a LUNA16 candidates CSV")
    p.add_argument("--predictions", type=Path, required=True)
    p.add_argument("--converted", type=Path, required=True)
    p.add_argument("--splits", type=Path, required=True)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)

    p = verb("luna16-cpm", cmd_luna16_cpm, "LUNA16's own score (CPM) and FROC curve of exported candidates CSVs")
    p.add_argument("--candidates", type=Path, nargs="+", required=True, help="export-luna16 CSVs (one per fold)")
    p.add_argument("--converted", type=Path, required=True, help="the converted LUNA16 dataset (reference tables)")
    p.add_argument("--splits", type=Path, required=True)
    p.add_argument("--folds", type=int, nargs="+", required=True, help="folds whose validation scans are scored")
    p.add_argument("--out-json", type=Path, required=True)
    p.add_argument("--out-froc", type=Path, required=True)

    p = verb("check-dataset", cmd_check_dataset, "check a dataset in the converted format")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)

    p = verb("preprocess", cmd_preprocess, "plan and preprocess a converted dataset, write splits")
    p.add_argument("--converted", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-folds", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", type=_settings, default={})

    p = verb("preprocess-corpus", cmd_preprocess_corpus, "preprocess an unlabelled corpus for pre-training")
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--settings", type=_settings, default={})

    p = verb("index-corpus", cmd_index_corpus, "find (or fetch) a corpus's volumes; manifest with their sha256")
    p.add_argument("--source-json", type=_settings, required=True,
                   help='{"source": "folders", "folders": [...]}, {"source": "ct_rate", "ct_rate": {...}, '
                   '"cache_dir": ...} or {"source": "datasets", "datasets": {name: converted folder}}')
    p.add_argument("--out", type=Path, required=True, help="manifest.json to write")
    p.add_argument("--name", default=None, help="corpus name (default: the manifest's folder name)")
    p.add_argument("--num-workers", type=int, default=4, help="threads hashing files")

    p = verb("plan-corpus", cmd_plan_corpus, "plan a corpus's preprocessing (target spacing, normalisation)")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="plan.json to write")
    p.add_argument("--settings", type=_settings, default={}, help="pretraining.corpus.preprocessing")

    p = verb("preprocess-corpus-shard", cmd_preprocess_corpus_shard, "preprocess one shard of a planned corpus")
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the shard's folder")
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--num-shards", type=int, required=True)
    p.add_argument("--num-workers", type=int, default=1)

    p = verb("gather-corpus", cmd_gather_corpus, "join a corpus's shards; fail above the failure fraction")
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--shards", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True, help="the preprocessed corpus folder")
    p.add_argument("--max-failure-fraction", type=float, required=True)

    p = verb("pretrain", cmd_pretrain, "pre-train the backbone with one method")
    p.add_argument("--corpus", type=Path, required=True, help="preprocessed corpus folder")
    p.add_argument("--method", required=True)
    p.add_argument("--settings", type=_settings, default={})
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)

    p = verb("fetch-checkpoint", cmd_fetch_checkpoint, "download or copy a published checkpoint and verify it")
    p.add_argument("--entry", type=_settings, required=True, help="the published entry: {url|path, sha256}")
    p.add_argument("--name", default="checkpoint", help="its name in the config (for messages)")
    p.add_argument("--out", type=Path, required=True)

    p = verb("finetune", cmd_finetune, "fine-tune a detector on one fold")
    p.add_argument("--preprocessed", type=Path, required=True)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--detector", required=True)
    p.add_argument("--settings", type=_settings, default={})
    p.add_argument("--init", default=None, help="pre-training checkpoint (nnssl schema); none = scratch")
    p.add_argument("--init-stem", default=None,
                   help="stem id to load from a checkpoint with one stem per source dataset (MultiTalent)")
    p.add_argument("--init-stem-key", default="--init-stem", help="the config key that chose --init-stem (messages)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--train-subset", type=Path, default=None,
                   help="label-fraction subset file whose 'train' list replaces the fold's training cases")
    p.add_argument("--schedule", choices=("same", "scaled"), default="same",
                   help="with --train-subset: the same iterations, or scaled by the subset's share")

    p = verb("label-subset", cmd_label_subset,
             "write the nested, stratified subset of a fold's training cases at one label fraction")
    p.add_argument("--preprocessed", type=Path, required=True, help="the dataset's preprocessed folder (splits.json)")
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--fraction", type=float, required=True, help="share of the fold's training cases, below 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: label_fractions/fraction{f}/fold{k}.json there")

    p = verb("predict", cmd_predict, "predict boxes for the validation cases of a fold")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--preprocessed", type=Path, required=True)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--settings", type=_settings, default={})
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None)

    p = verb("detect", cmd_detect, "detect in new scans (NIfTI, MHA/MHD, NRRD, DICOM) with the folds of a trained run")
    p.add_argument("--run", type=Path, required=True, help="results/finetune/<detector>/<init>/<dataset>")
    p.add_argument("--input", type=Path, required=True, help="a scan file, a DICOM series folder, or a folder of scans")
    p.add_argument("--output", type=Path, required=True, help="folder for {scan}.json, detections.csv and PNGs")
    p.add_argument("--folds", type=int, nargs="+", default=None, help="folds to ensemble (default: all with a model)")
    p.add_argument("--png-score", type=float, default=None, help="write a PNG of each detection scoring at least this")
    p.add_argument("--device", default=None, help="cpu, cuda[:i] or auto (default: the inference settings')")
    p.add_argument("--settings", type=_settings, default={}, help="inference settings as JSON (InferenceSettings)")
    p.add_argument("--config", type=Path, default=None, help="study config whose inference section applies")
    p.add_argument("--plan", type=Path, default=None, help="the dataset's plan.json, for runs that do not record it")
    p.add_argument("--threads", type=int, default=None)

    p = verb("predict-raw", cmd_predict_raw,
             "predict a fold's validation cases (or the test cases) and keep the raw passes for the sweep")
    p.add_argument("--model", type=Path, nargs="+", required=True, help="one model, or the folds of a run")
    p.add_argument("--preprocessed", type=Path, required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--fold", type=int, help="predict this fold's validation cases")
    which.add_argument("--test", action="store_true", help="predict the preprocessed held-out test cases")
    p.add_argument("--settings", type=_settings, default={}, help="inference settings (InferenceSettings)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None)

    p = verb("sweep", cmd_sweep, "choose the consolidation parameters on other folds' raw predictions")
    p.add_argument("--raw", type=Path, nargs="*", default=[], help="raw prediction folders to sweep on")
    p.add_argument("--folds", type=int, nargs="*", default=[], help="their folds (for the record)")
    p.add_argument("--converted", type=Path, required=True)
    p.add_argument("--settings", type=_settings, default={}, help="inference settings (the starting point)")
    p.add_argument("--postprocessing", type=_settings, default={}, help="PostprocessingSettings as JSON")
    p.add_argument("--for", dest="evaluated", default="", help="what the parameters are for, e.g. 'fold 1'")
    p.add_argument("--out", type=Path, required=True)

    p = verb("consolidate", cmd_consolidate, "consolidate raw predictions into prediction JSONs")
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--postprocessing-json", type=Path, default=None, help="a sweep record whose parameters apply")
    p.add_argument("--settings", type=_settings, default={}, help="inference settings")
    p.add_argument("--out-dir", type=Path, required=True)

    p = verb("preprocess-test", cmd_preprocess_test, "preprocess a dataset's held-out test cases with its plan")
    p.add_argument("--converted", type=Path, required=True)
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)

    p = verb("evaluate", cmd_evaluate, "compute nnDetection's metrics for a fold")
    p.add_argument("--predictions", type=Path, required=True)
    p.add_argument("--converted", type=Path, required=True)
    p.add_argument("--splits", type=Path, default=None)
    p.add_argument("--fold", type=int, default=None)
    p.add_argument("--test", action="store_true", help="the held-out test cases (labelsTs) instead of a fold")
    p.add_argument("--postprocessing", type=Path, default=None, help="the sweep record the predictions used")
    p.add_argument("--out-json", type=Path, required=True)
    p.add_argument("--out-csv", type=Path, required=True)

    p = verb("aggregate", cmd_aggregate, "aggregate per-fold metrics into the main results table")
    p.add_argument("--runs", required=True, help="JSON list of {arch, init, dataset, fold, path}")
    p.add_argument("--out-csv", type=Path, required=True)
    p.add_argument("--out-md", type=Path, required=True)
    p.add_argument("--runs-csv", type=Path, required=True)

    p = verb("label-fraction-runs", cmd_label_fraction_runs,
             "the per-run table of the label-fraction runs (fraction and training cases per run)")
    p.add_argument("--runs", required=True, help="JSON list of {detector, initialisation, dataset, fold, fraction, "
                   "metrics, train_cases}")
    p.add_argument("--out-csv", type=Path, required=True)

    p = verb("plot-ap-by-init", cmd_plot_ap_by_init, "plot AP@0.1 per dataset and initialisation")
    p.add_argument("--runs-csv", type=Path, required=True)
    p.add_argument("--out-png", type=Path, required=True)
    p.add_argument("--out-pdf", type=Path, required=True)

    def study_inputs(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--name", required=True, help="registered name (analysis.outputs FIGURES / TABLES)")
        sub.add_argument("--runs-csv", type=Path, default=None, help="per-run table (results/tables/runs.csv)")
        sub.add_argument("--metrics-root", type=Path, default=None, help="results/metrics")
        sub.add_argument("--predictions-root", type=Path, default=None, help="results/predictions")
        sub.add_argument("--converted-root", type=Path, default=None, help="{data}/converted")
        sub.add_argument("--settings", type=_settings, default={},
                         help="statistics: n_resamples, seed, alpha, confidence, test, metric")

    p = verb("figure", cmd_figure, "draw one registered figure of the report (PNG + PDF)")
    study_inputs(p)
    p.add_argument("--out-png", type=Path, required=True)
    p.add_argument("--out-pdf", type=Path, required=True)

    p = verb("chance-level", cmd_chance_level, "metrics of boxes placed at random on a fold's validation cases")
    p.add_argument("--converted", type=Path, required=True, help="the converted dataset")
    p.add_argument("--splits", type=Path, required=True)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--out-json", type=Path, required=True)
    p.add_argument("--settings", type=_settings, default={}, help="draws (20), boxes_per_case (100), seed (0)")

    p = verb("learning-curve", cmd_learning_curve, "draw one fine-tuning run's training losses and validation AP")
    p.add_argument("--log", type=Path, required=True, help="the run's log.csv")
    p.add_argument("--metrics", type=Path, default=None, help="the run's metrics JSON (validation AP)")
    p.add_argument("--out-png", type=Path, required=True)
    p.add_argument("--title", default=None)

    p = verb("table", cmd_table, "write one registered table of the report (CSV, Markdown, LaTeX)")
    study_inputs(p)
    p.add_argument("--out-csv", type=Path, default=None)
    p.add_argument("--out-md", type=Path, default=None)
    p.add_argument("--out-tex", type=Path, default=None)
    p = verb("benchmark", cmd_benchmark, "measure training, loading, inference and evaluation throughput")
    p.add_argument("--detector", default=None, help="registered detector (default retina_unet)")
    p.add_argument("--from-config", type=Path, default=None,
                   help="study config whose detectors.<detector> entry and backbone give the defaults")
    p.add_argument("--preset", default=None, help="backbone preset, e.g. resenc_demo, resenc_l")
    p.add_argument("--patch-size", type=int, nargs="+", default=None, help="one edge or z y x")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None, help="data-loader processes")
    p.add_argument("--device", default=None, help="auto, cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--settings", type=_settings, default={}, help="further BenchmarkSettings as JSON")
    p.add_argument("--out", type=Path, default=None, help="JSON record (written atomically)")
    p = verb("benchmark-quality", cmd_benchmark_quality,
             "train our detectors and MONAI's RetinaNet side by side on one synthetic set; AP, mAP, FROC, curves")
    p.add_argument("--out", type=Path, default=Path("results/benchmark/quality"), help="output folder")
    p.add_argument("--settings", type=_settings, default={},
                   help="QualitySettings as JSON, e.g. '{\"iterations\": 600, \"threads\": 2}'")
    p = verb("config-docs", cmd_config_docs, "write the config's JSON schema and key reference (config/README.md)")
    p.add_argument("--root", type=Path, default=Path("."), help="repository root")
    p.add_argument("--check", action="store_true", help="only check that the generated files are up to date")

    p = verb("cluster-check", cmd_cluster_check,
             "submit one tiny job through the SLURM profile(s) and report partition, GPUs, signal and status polling")
    from pretrain_det3d.cluster_check import add_arguments as cluster_check_arguments

    cluster_check_arguments(p)

    p = verb("demo-table", cmd_demo_table, "rewrite the README's demo table from a finished run's main results")
    p.add_argument("--main-results", type=Path, default=Path("results/tables/main_results.csv"))
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    p.add_argument("--metrics-root", type=Path, default=Path("results/metrics"),
                   help="metric JSONs whose newest modification time dates the run")
    p.add_argument("--config", type=Path, default=Path("config/config.yaml"),
                   help="study config giving the order of initialisations and detectors")
    p.add_argument("--date", default=None, help="run date YYYY-MM-DD instead of the metric files' time")
    p.add_argument("--print", action="store_true", help="print the block and leave the README unchanged")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        args.func(args)
    except Exception as error:  # one clear line at the end of the log, the traceback above it
        traceback.print_exc()
        print(f"pretrain_det3d {args.verb}: error: {error}", file=sys.stderr)
        return 1
    return 0
