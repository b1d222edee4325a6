"""evaluation stage of the study: box matching, AP/mAP, FROC and per-case records (nnDetection's definitions).

``run_evaluation(predictions_dir, converted_root, case_ids, out_json, out_csv)`` is the entry point of the rule.
"""

from pretrain_det3d.evaluation.run import evaluate_cases, run_evaluation

__all__ = ["evaluate_cases", "run_evaluation"]
