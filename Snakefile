# The study "The Missing Piece: A Case for Pre-Training in 3D Medical Object Detection" as one DAG.
# Thin entry point: rules live in workflow/rules/, logic in the pretrain_det3d package.
from snakemake.utils import min_version

min_version("8.20")


# The built-in demo study, unless --configfile names a study of its own (then that file alone is the config,
# not merged over the demo's keys).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# common.smk validates the config (schema, then names) before any rule is defined
include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/postprocess.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/common_label_fractions.smk"
include: "workflow/rules/label_fractions.smk"


rule all:
    input:
        final_outputs() + label_fraction_outputs(),
    default_target: True
