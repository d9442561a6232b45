"""batchbench: llama-batched-bench on MLX with a unified multi-sequence KV cache."""

__version__ = "0.1.0"
