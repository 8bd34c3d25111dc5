"""Training: the one trainer every LM goes through (experts, dense baselines, routers, SFT), its
checkpoints, the NLL helpers, the loss and the device-specific kernels, chosen in one place (`paths.py`)."""
