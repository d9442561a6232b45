"""Custom kernels, each behind one function with a pure-MLX twin."""
