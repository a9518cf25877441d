"""Model files: GGUF headers and inspection, the default model, synthetic models."""

from .synthetic import SHAPES, synthetic

__all__ = ["SHAPES", "synthetic"]
