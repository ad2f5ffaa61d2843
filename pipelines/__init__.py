"""diffusers-facing code: load a base model, apply artifacts to it."""

from pipelines.apply import Applied, apply
from pipelines.load import load
from pipelines.membranes import attach_membranes

__all__ = ["load", "apply", "Applied", "attach_membranes"]
