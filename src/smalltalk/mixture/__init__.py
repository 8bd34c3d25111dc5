"""The mixture and what is made of it: the mixture itself (routers + independent experts, `model.py`), the
expert and dense training jobs, elastic add/remove, the eval stage and its streaming tally, the FLOPs of a
run, the report, export and the lm-eval adapter."""
