"""rkd: search knowledge-distillation methods for small, fast remote-sensing detectors."""

__version__ = "0.1.0"
