"""icd: text-guided photo editing with Invertible Consistency Distillation (iCD)."""

__version__ = "0.1.0"
