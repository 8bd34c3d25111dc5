"""Evaluation of a trained mixture: the eval stage (eval_stage.py: mixture vs dense on validation, --final for
test), its streaming tallies (tally.py), the lm-eval model (lm_harness.py), the report (report.py)."""
