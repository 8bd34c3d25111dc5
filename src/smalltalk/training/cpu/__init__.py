"""The CPU kernels of the training forward: cache-sized chunked sublayers, blocked causal attention and a
hand-derived RMSNorm backward. They run only on CPU (training/paths.py decides)."""
