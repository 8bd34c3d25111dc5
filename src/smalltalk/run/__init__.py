"""The run machinery: the pipeline's STAGES table and loop, the launcher (local processes, SLURM), status
and plan. It orchestrates the stages; the stages themselves live in their packages."""
