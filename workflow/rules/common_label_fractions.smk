# Config helpers and targets of the label-efficiency curves (rules in label_fractions.smk; see its header).

from pretrain_det3d.data.label_fractions import SUBSETS_DIR, fraction_segment, segment_fraction

LABEL_FRACTIONS = sorted(float(f) for f in STUDY.get("label_fractions", [1.0]))
LABEL_SUBSETS = [fraction_segment(f) for f in LABEL_FRACTIONS]  # "" for fraction 1
LABEL_SCHEDULE = STUDY.get("label_fraction_schedule", "same")
BELOW_ONE = r"fraction[0-9.]+/"  # a `subset` below fraction 1 (never the empty one of fraction 1)


def label_subset_file(wildcards):
    return f"{DATA}/preprocessed/{wildcards.dataset}/{SUBSETS_DIR}/{wildcards.subset}fold{wildcards.fold}.json"


def label_fraction_entries(wildcards):
    """Every run of one detector and dataset at every label fraction: its metrics and training-case files."""
    entries = []
    for init in detector_initialisations(config, wildcards.arch):
        for fraction, subset in zip(LABEL_FRACTIONS, LABEL_SUBSETS):
            for fold in STUDY["folds"]:
                entries.append({
                    "detector": wildcards.arch, "initialisation": init, "dataset": wildcards.dataset, "fold": fold,
                    "fraction": fraction,
                    "metrics": f"results/metrics/{wildcards.arch}/{init}/{wildcards.dataset}/{subset}fold{fold}.json",
                    "train_cases": (f"{DATA}/preprocessed/{wildcards.dataset}/{SUBSETS_DIR}/{subset}fold{fold}.json"
                                    if subset else f"{DATA}/preprocessed/{wildcards.dataset}/splits.json"),
                })
    return entries


def label_fraction_run_inputs(wildcards):
    entries = label_fraction_entries(wildcards)
    return {"metrics": [e["metrics"] for e in entries], "train_cases": sorted({e["train_cases"] for e in entries})}


def label_fraction_predictions(wildcards):
    return [e["metrics"].replace("results/metrics/", "results/predictions/", 1).removesuffix(".json")
            for e in label_fraction_entries(wildcards)]


def label_efficiency_inputs(wildcards):
    return {
        "runs": f"results/tables/label_efficiency/{wildcards.arch}/{wildcards.dataset}_runs.csv",
        "predictions": label_fraction_predictions(wildcards),
        "converted": f"{DATA}/converted/{wildcards.dataset}",
    }


def label_efficiency_arguments(wildcards, input):
    return (f"--runs-csv {input.runs} --predictions-root results/predictions "
            f"--converted-root {Path(input.converted).parent}")


def label_fraction_outputs():
    """The curves and labels-saved tables per detector x dataset, when the study runs more than fraction 1 (the
    table compares with scratch, so only for detectors that run it)."""
    if len(LABEL_FRACTIONS) < 2:
        return []
    pairs = [(arch, dataset) for arch in STUDY["detectors"] for dataset in STUDY["datasets"]]
    with_scratch = [(a, d) for a, d in pairs if SCRATCH in detector_initialisations(config, a)]
    return ([f"results/figures/label_efficiency/{a}/{d}.{ext}" for a, d in pairs for ext in ("png", "pdf")]
            + [f"results/tables/labels_saved/{a}/{d}.{fmt}" for a, d in with_scratch for fmt in ("csv", "md")])
