r"""Speed benchmarks for torchconstrain: per-layer cases (``layers``) and whole models (``models``).

Run ``python benchmarks/run.py --help``. Nothing here is imported by the library itself.
"""
