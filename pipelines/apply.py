"""``apply(pipe, *artifacts)``: the one call that puts any mix of the toolkit's artifacts on a loaded pipeline, and
takes them off again exactly.

    handle = pipelines.apply(pipe, "circle-esd.safetensors", "red-spm.safetensors")
    image = pipe("a red circle").images[0]
    handle.remove()                    # the pipeline as it was: the same weights, bit for bit, and the same images

It reads each artifact's metadata and does the right thing for its kind:

- ``weight_delta`` (ESD, SalUn): adds ``scale · Δθ`` to the named weights of the component it names (the UNet);
- ``membrane`` (SPM): all the membranes of one call are attached together, gated per prompt by facilitated transport
  (``scale`` multiplies a membrane's γ; ``transport=False`` fixes γ at ``scale``): :func:`pipelines.attach_membranes`;
- ``saliency_mask`` (SalUn): refused — a mask says which weights *training* may change, it changes no model; train
  with it (``python -m erasure.train --mask FILE``) and apply the weight delta that run writes. ``checkpoint`` and
  ``data_cache`` files are training's own and refused too.

A file without this toolkit's metadata is taken for an original SPM release membrane if its keys are kohya LoRA keys.

Every artifact is validated against the pipeline before anything changes: a file made for another base model
(missing weights, other shapes, another fingerprint) is refused with one clear line and the pipeline is left untouched.

Exact removal: :class:`Applied` keeps a copy (on the CPU) of every weight it is about to change and puts those values
back, rather than subtracting the delta (which floating point does not undo exactly), and it detaches its membranes
and their transport hooks. Weight deltas go on before the membranes (so their weight names are the UNet's own), and
a second ``apply`` on a pipeline that already carries membranes finds the weights inside the membrane wrappers.
Several handles on one pipeline come off in any order unless a later one changed the same weights: those must come
off first (last on, first off), else :meth:`Applied.remove` refuses with a :class:`RuntimeError`. ``remove()`` on a
handle already removed does nothing. Moving the pipeline to another dtype or device in between is fine: the saved
values are cast back as ``.to()`` casts them.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch

from adapters import membrane
from adapters.artifact import Artifact, fingerprint, load_artifact
from adapters.errors import UserError
from pipelines.membranes import SIMILARITY, AttachedMembranes, attach_membranes, check_membrane

_REFUSED = {
    "saliency_mask": "is a saliency mask: it says which weights training may change and changes no model by itself; "
                     "train with it (python -m erasure.train --method esd --mask {path}) and apply the weight delta "
                     "that run writes",
    "checkpoint": "is a training checkpoint; resume training from it (python -m erasure.train ... --resume) and apply "
                  "the artifact the finished run writes",
    "data_cache": "is a cache of generated training data, not something to apply to a pipeline",
}



@dataclass(eq=False)
class _Record:
    """What the order check needs of a handle, without a reference to the pipeline (so that a pipeline with handles
    still on it can be garbage-collected): the weights it saved (the handle's own dict) and its files' names."""

    saved: dict
    files: str


# pipe → records of its handles not yet removed, oldest first (a dropped handle's record stays: it never comes off)
_LIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s parameters and persistent buffers by their names without membranes: a weight wrapped by a
    membrane layer (``…to_k.base_layer.weight``) under its own name (``…to_k.weight``); membrane branches left out."""
    wrapped = [f"{p}." for p in membrane.membrane_layers(module)]
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        owner = next((w for w in wrapped if name.startswith(w)), None)
        if owner is not None:
            rest = name[len(owner):]
            if not rest.startswith("base_layer."):
                continue  # a membrane's own tensor
            name = owner + rest[len("base_layer."):]
        out[name] = t
    return out


def _component(pipe, art: Artifact) -> tuple[str, torch.nn.Module]:
    target = art.metadata.get("target", "unet")
    module = getattr(pipe, target, None)
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"{art.path}: changes the pipeline's '{target}', which this pipeline does not have")
    return target, module


def _check_delta(pipe, art: Artifact) -> None:
    """Refuse a weight delta that does not fit ``pipe`` (another base model), with one clear line."""
    _, module = _component(pipe, art)
    state = _weights(module)
    for name, delta in art.tensors.items():
        if name not in state:
            raise UserError(f"{art.path}: made for another base model: this model has no weight '{name}'")
        want, got = tuple(state[name].shape), tuple(delta.shape)
        if want != got:
            raise UserError(f"{art.path}: made for another base model: '{name}' is {got} in the file, {want} here")
    expected = art.metadata.get("base_model", {}).get("fingerprint")
    here = fingerprint(((n, tuple(state[n].shape)) for n in art.tensors), type(module).__name__)
    if expected and here != expected:  # adapters.artifact.module_fingerprint, on the names without membranes
        raise UserError(f"{art.path}: made for another base model (fingerprint {expected}, this model {here})")


def _load(artifact: str | os.PathLike | Artifact) -> Artifact:
    if isinstance(artifact, Artifact):
        return artifact
    art = load_artifact(artifact, allow_missing_metadata=True)
    if not art.metadata and not (art.tensors and all(k.startswith("lora_unet_") for k in art.tensors)):
        load_artifact(artifact)  # raises the usual "not written by this toolkit" error
    return art


def _kind(art: Artifact) -> str:
    return art.kind if art.metadata else "membrane"  # a file without our metadata: an original SPM membrane


@dataclass(eq=False)
class Applied:
    """What one :func:`apply` call put on a pipeline. ``remove()`` takes it off exactly; a second call does nothing.

    Also a context manager: ``with pipelines.apply(pipe, f): ...`` removes the artifacts on leaving the block.
    """

    pipe: object
    artifacts: list[Artifact]
    membranes: AttachedMembranes | None = None
    _saved: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)  # (component, weight) → before apply
    _premerge: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)  # … → before merge()
    _record: _Record | None = field(default=None, repr=False)
    _removed: bool = False

    @property
    def active(self) -> bool:
        """False once :meth:`remove` has run."""
        return not self._removed

    def _later_overlap(self, keys) -> _Record | None:
        live = _LIVE.get(self.pipe, [])
        later = live[live.index(self._record) + 1:] if self._record in live else []
        return next((r for r in later if r.saved.keys() & set(keys)), None)

    def _copy(self, keys) -> dict[tuple[str, str], torch.Tensor]:
        """The current values of weights ``keys`` ((component, name) pairs), copied to the CPU."""
        states: dict[str, dict] = {}
        out = {}
        for component, name in keys:
            state = states.setdefault(component, _weights(getattr(self.pipe, component)))
            out[(component, name)] = state[name].detach().to("cpu", copy=True)
        return out

    def _restore(self, saved: dict[tuple[str, str], torch.Tensor]) -> None:
        """Put saved values back (cast to each weight's current dtype and device, as ``.to()`` would)."""
        states: dict[str, dict] = {}
        with torch.no_grad():
            for (component, name), value in saved.items():
                state = states.setdefault(component, _weights(getattr(self.pipe, component)))
                state[name].copy_(value)

    def _membrane_weight_keys(self) -> list[tuple[str, str]]:
        names = set(self.membranes.names) if self.membranes else set()
        return [("unet", f"{path}.weight") for path, layer in membrane.membrane_layers(self.pipe.unet).items()
                if names & set(layer.membranes)]

    def merge(self) -> None:
        """Fold this call's membranes into the UNet's weights (at their fixed γ): the forward pass is then as fast as
        the base model's. Needs ``transport=False`` (a per-prompt γ cannot be folded into one weight). Weight deltas
        are in the weights already. :meth:`unmerge` and :meth:`remove` restore the saved weights exactly."""
        if self._removed:
            raise RuntimeError("these artifacts were removed from the pipeline; apply them again to merge")
        if self._premerge or not (self.membranes and self.membranes.names):
            return
        if self.membranes.transport is not None:
            raise ValueError("membranes gated per prompt by facilitated transport cannot be merged into the weights; "
                             "apply them with transport=False to merge")
        keys = self._membrane_weight_keys()
        self._refuse_if_later("merge", keys)
        self._premerge = self._copy(keys)
        for k, v in self._premerge.items():  # unmerged membranes change no weights: these are the originals
            self._saved.setdefault(k, v)
        membrane.merge(self.pipe.unet, self.membranes.names)

    def unmerge(self) -> None:
        """Take merged membranes out of the weights again (the saved weights, bit for bit); they act unmerged."""
        if not self._premerge or self._removed:
            return
        self._refuse_if_later("unmerge", self._premerge)
        membrane.unmerge(self.pipe.unet, self.membranes.names)
        self._restore(self._premerge)
        self._premerge = {}

    def _refuse_if_later(self, action: str, keys) -> None:
        later = self._later_overlap(keys)
        if later is not None:
            raise RuntimeError(f"cannot {action}: a later pipelines.apply ({later.files}) changed the same weights; "
                               f"remove it first (last on, first off)")

    def remove(self) -> None:
        """Detach the membranes and their transport hooks and put every changed weight back as it was, bit for bit.
        A second call does nothing. Refused (RuntimeError) while a later :func:`apply` that changed the same weights
        is still on the pipeline."""
        if self._removed:
            return
        self._refuse_if_later("remove these artifacts", self._saved)
        if self.membranes is not None:
            self.membranes.detach()  # merged membranes are subtracted here; the saved weights then make it exact
        self._restore(self._saved)
        self._saved, self._premerge = {}, {}
        self._removed = True
        live = _LIVE.get(self.pipe, [])
        if self._record in live:
            live.remove(self._record)

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply(pipe, *artifacts: str | os.PathLike | Artifact, scale: float = 1.0, scales: Sequence[float] | None = None,
          transport: bool = True, similarity: str | None = None, pair_negatives: bool = True) -> Applied:
    """Apply artifacts (paths or loaded :class:`~adapters.artifact.Artifact` objects) to ``pipe`` in place.

    Args:
        scale: every artifact's strength (weight delta: ``scale · Δθ``; membrane: its γ multiplier).
        scales: one strength per artifact, in order, instead of ``scale``.
        transport: gate the membranes per prompt by facilitated transport (the default), else fix γ at the scale.
        similarity: transport's text similarity, ``"flat"`` or ``"eos"`` (None: :data:`pipelines.membranes.SIMILARITY`).
        pair_negatives: under CFG, negative rows take their prompt's γ (:mod:`adapters.transport`).

    Returns the :class:`Applied` handle (``handle.pipe`` is ``pipe``); ``handle.remove()`` restores ``pipe`` exactly.
    Raises :class:`UserError` (one line, ``pipe`` untouched) for a file that is not an applicable artifact or was
    made for another base model.
    """
    if scales is not None and scale != 1.0:
        raise UserError("give scale (one for all artifacts) or scales (one per artifact), not both")
    scales = [float(s) for s in scales] if scales is not None else [float(scale)] * len(artifacts)
    if len(scales) != len(artifacts):
        raise UserError(f"{len(artifacts)} artifact(s) but {len(scales)} scales: give one per artifact, in order")
    arts = [_load(a) for a in artifacts]
    for art in arts:  # validate everything before anything changes
        kind = _kind(art)
        if kind in _REFUSED:
            raise UserError(f"{art.path}: {_REFUSED[kind].format(path=art.path)}")
        if kind == "weight_delta":
            _check_delta(pipe, art)
        elif kind == "membrane":
            check_membrane(pipe.unet, art)
        else:
            raise UserError(f"{art.path}: a '{kind}' artifact cannot be applied to a pipeline")
    mem = [(a, s) for a, s in zip(arts, scales) if _kind(a) == "membrane"]
    if mem and (similarity or SIMILARITY) not in ("eos", "flat"):
        raise UserError(f"similarity must be 'eos' or 'flat', not {similarity!r}")
    handle = Applied(pipe, arts)
    for art, s in zip(arts, scales):  # weight deltas first: their names are the UNet's own
        if _kind(art) == "weight_delta":
            _add_delta(handle, art, s)
    if mem:
        handle.membranes = attach_membranes(pipe, [a for a, _ in mem], transport=transport, scales=[s for _, s in mem],
                                            similarity=similarity, pair_negatives=pair_negatives)
    handle._record = _Record(handle._saved, ", ".join(a.path.name for a in arts))
    _LIVE.setdefault(pipe, []).append(handle._record)
    return handle


def _add_delta(handle: Applied, art: Artifact, scale: float) -> None:
    component, module = _component(handle.pipe, art)
    for key, value in handle._copy([(component, n) for n in art.tensors]).items():
        handle._saved.setdefault(key, value)  # the first value seen is the one before this call
    state = _weights(module)
    with torch.no_grad():
        for name, delta in art.tensors.items():
            p = state[name]
            p.add_(delta.to(p.device, torch.float32).mul(scale).to(p.dtype))
