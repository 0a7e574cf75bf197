"""Benchmarks (``infmllm-bench-*``), the drive generator and answer scoring they share, and
random-weight checkpoints of real VLM shapes; figures in ``bench/results/``."""
