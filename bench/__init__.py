"""Micro-benchmarks of the caad_kernels losses against PyTorch, torch.compile and Liger-Kernel.

Run with ``pytest bench/`` (pytest-benchmark); turn the JSON into a report with
``python -m bench.report RESULTS.json``. See ``bench/README.md``.
"""
