"""Compression: quantization, quality evaluation, layer pruning, and the comparison of
their size, speed and quality. The heavy work runs in child processes."""
