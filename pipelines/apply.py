"""``apply(pipe, artifact)``: the one call that puts any artifact the toolkit makes onto a loaded pipeline.

It reads the artifact's metadata and does the right thing for its kind:

- ``weight_delta`` (ESD, SalUn): adds ``scale · Δθ`` to the named UNet weights (``scale=-1`` takes it off again);
- ``membrane`` (SPM): attaches the membrane with facilitated transport on (``scale`` multiplies its γ); use
  :func:`pipelines.attach_membranes` to stack several or to detach them again.

Every artifact is validated against the pipeline first: a file made for another base model (missing weights,
other shapes, another fingerprint) is refused with one clear line and the pipeline is left untouched.
"""

from __future__ import annotations

import os

import torch

from adapters.artifact import Artifact, check_fits, load_artifact
from adapters.errors import UserError


def _apply_weight_delta(pipe, art: Artifact, scale: float) -> None:
    target = art.metadata.get("target", "unet")
    module = getattr(pipe, target, None)
    if module is None:
        raise UserError(f"{art.path}: changes the pipeline's '{target}', which this pipeline does not have")
    check_fits(art, module)
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    with torch.no_grad():
        for name, delta in art.tensors.items():
            p = params.get(name, buffers.get(name))
            p.add_(delta.to(p.device, torch.float32).mul(scale).to(p.dtype))


def _apply_membrane(pipe, art: Artifact, scale: float) -> None:
    from pipelines.membranes import attach_membranes

    attach_membranes(pipe, [art], transport=True, scales=[scale])


_APPLIERS = {"weight_delta": _apply_weight_delta, "membrane": _apply_membrane}


def apply(pipe, artifact: str | os.PathLike | Artifact, scale: float = 1.0):
    """Apply an artifact (path or loaded :class:`Artifact`) to ``pipe`` in place; returns ``pipe``."""
    art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
    fn = _APPLIERS.get(art.kind)
    if fn is None:
        raise UserError(f"{art.path}: a '{art.kind}' artifact cannot be applied to a pipeline")
    fn(pipe, art, scale)
    return pipe
