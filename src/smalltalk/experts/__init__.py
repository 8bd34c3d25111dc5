"""The experts stage, the paper's core: each expert's job (expert.py), where experts start (start.py: scratch,
a shared trunk, a pretrained model), the dense baselines they are compared with (dense.py) and the budget both
spend (budget.py: FLOPs of a run), adding and removing experts (elastic.py), routers refined from the experts
(refine.py)."""
