"""batchbench: llama-batched-bench on MLX with a unified multi-sequence KV cache."""

import os

# MLX's CUDA back-end submits its CUDA graph every 100 ops or 1000 MB of op inputs on Hopper.
# A decode step is 400-800 small ops whose inputs include whole KV buffers: with the defaults
# it is cut into many graphs and each submit leaves the GPU waiting. Measured on the H200
# (scripts/h200_overhead.py): host time per op 4.3 -> 2.0 us, kernel gaps 4.0 -> 1.7 us.
# MLX reads these once, when it creates its first GPU stream: set them before importing mlx.
os.environ.setdefault("MLX_MAX_OPS_PER_BUFFER", "1000")
os.environ.setdefault("MLX_MAX_MB_PER_BUFFER", "1000000")

__version__ = "0.1.0"
