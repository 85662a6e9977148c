"""icd: text-guided photo editing with Invertible Consistency Distillation (iCD)."""

import os

__version__ = "0.1.0"

# OpenMP threads (torch's, MKL's) that busy-wait after each operation take the cores from another process, from
# ONNX Runtime's threads and from each other: on a busy 2-core machine an edit took 5-12 s instead of 0.2-0.6 s
# (BENCHMARKS.md, "CPU threads under load"). OpenMP reads this once, when torch loads, which any icd command
# does after this package; a value set by the user stays.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
