"""icd: text-guided photo editing with Invertible Consistency Distillation (iCD)."""

import os

__version__ = "0.1.0"

# OpenMP threads that busy-wait after each operation take the cores from other work: on a busy 2-core machine an
# edit took 5-12 s instead of 0.2-0.6 s (BENCHMARKS.md, "CPU threads under load"). Read once, when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
