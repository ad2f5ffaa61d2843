"""diffusers-facing code: load a base model, apply artifacts to it."""

from pipelines.apply import apply
from pipelines.load import load

__all__ = ["load", "apply"]
