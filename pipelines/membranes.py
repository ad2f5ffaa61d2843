"""Attach SPM membrane files to any loaded Stable Diffusion (XL) pipeline, optionally gated by facilitated transport.

    handle = attach_membranes(pipe, ["circle.safetensors", "red.safetensors"])   # transport on
    image = pipe("a red circle").images[0]
    handle.detach()                                                               # the original pipeline again

Files use the kohya / SD-WebUI keys of the original SPM release (``lora_unet_<path>.lora_down.weight``, ...; SDXL:
kohya's SGM-layout names, ``lora_unet_input_blocks_4_1_…``), so membranes made by the original code load here (with a
warning when they lack this toolkit's metadata), and ours load in plain diffusers with ``pipe.load_lora_weights(path)``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from adapters import membrane
from adapters.artifact import Artifact, load_artifact
from adapters.errors import UserError
from adapters.transport import MembraneConcept, Transport
from pipelines.text import encode, token_rows


def _groups(art: Artifact) -> dict[str, dict[str, torch.Tensor]]:
    """kohya prefix → {"lora_down.weight", "lora_up.weight", "alpha"}."""
    out: dict[str, dict] = {}
    for key, t in art.tensors.items():
        for part in ("lora_down.weight", "lora_up.weight", "alpha"):
            if key.endswith("." + part):
                out.setdefault(key[: -len(part) - 1], {})[part] = t
                break
        else:
            raise UserError(f"{art.path}: unexpected tensor '{key}' in a membrane file")
    for prefix, parts in out.items():
        if not {"lora_down.weight", "lora_up.weight"} <= parts.keys():
            raise UserError(f"{art.path}: layer '{prefix}' lacks lora_down or lora_up")
    return out


def _prompts(art: Artifact) -> list[str]:
    """What transport compares prompts with: the membrane's ``targets`` (the concept), else — files from before
    ``targets`` existed — its training ``prompts``, else the original release's comma-joined ``prompts`` string."""
    for key in ("targets", "prompts"):
        if art.metadata.get(key):
            return list(art.metadata[key])
    raw = art.raw_metadata.get("prompts", "")  # the original release: comma-joined
    return [p.strip() for p in raw.split(",") if p.strip()]


def _check_layer(art: Artifact, prefix: str, base, down: torch.Tensor, up: torch.Tensor) -> None:
    conv = isinstance(base, torch.nn.Conv2d)
    want_in = base.in_channels if conv else base.in_features
    want_out = base.out_channels if conv else base.out_features
    if down.shape[1] != want_in or up.shape[0] != want_out or up.shape[1] != down.shape[0] or (down.ndim == 4) != conv:
        raise UserError(f"{art.path}: made for another base model: layer '{prefix}' is {tuple(up.shape[:1])}×"
                        f"{tuple(down.shape[1:2])} in the file, {want_out}×{want_in} here")


def check_membrane(unet, art: Artifact) -> dict[str, dict[str, torch.Tensor]]:
    """Validate ``art`` against ``unet`` without changing it → {layer path: its tensors}. A file made for another
    base model (fingerprint, a layer this UNet lacks, other shapes) is a one-line :class:`UserError`."""
    paths = membrane.kohya_to_paths(unet)
    targets = membrane.target_layers(unet)
    groups = _groups(art)
    expected = art.metadata.get("base_model", {}).get("fingerprint") if art.metadata else None
    if expected and expected != membrane.layers_fingerprint(unet):
        raise UserError(f"{art.path}: made for another base model (fingerprint {expected}, this model "
                        f"{membrane.layers_fingerprint(unet)})")
    for prefix, parts in groups.items():
        if prefix not in paths:
            raise UserError(f"{art.path}: made for another base model: this UNet has no layer '{prefix}'")
        _check_layer(art, prefix, targets[paths[prefix]], parts["lora_down.weight"], parts["lora_up.weight"])
    return {paths[prefix]: parts for prefix, parts in groups.items()}


def _attach_checked(unet, layers: dict[str, dict[str, torch.Tensor]], name: str) -> None:
    """Attach membrane ``name`` with the tensors :func:`check_membrane` returned."""
    for path, parts in layers.items():
        rank = parts["lora_down.weight"].shape[0]
        alpha = float(parts.get("alpha", torch.tensor(float(rank))))  # kohya: no alpha means alpha = rank
        branch = membrane.attach(unet, name, rank=rank, alpha=alpha, layers=[path])[path]
        with torch.no_grad():
            branch.lora_down.weight.copy_(parts["lora_down.weight"])
            branch.lora_up.weight.copy_(parts["lora_up.weight"])


def load_membrane(unet, art: Artifact, name: str) -> list[str]:
    """Validate ``art`` against ``unet`` and attach it as membrane ``name`` → the layer paths it covers."""
    layers = check_membrane(unet, art)
    _attach_checked(unet, layers, name)
    return list(layers)


@dataclass
class AttachedMembranes:
    """Membranes attached to a pipeline; ``detach()`` restores the original modules (a second call does nothing)."""

    pipe: object
    names: list[str]
    transport: Transport | None = None
    prompts: dict[str, list[str]] = field(default_factory=dict)

    def detach(self) -> None:
        if self.transport is not None:
            self.transport.remove()
        for n in self.names:
            membrane.detach(self.pipe.unet, n)
        self.names = []


SIMILARITY = "flat"  # facilitated transport's default text similarity (adapters.transport)


def _concept(pipe, name: str, prompts: list[str], scale: float, special: set[int]) -> MembraneConcept:
    """What transport needs of one membrane: its prompts' hidden states, token sets and end-of-text states."""
    tok = pipe.tokenizer
    hidden = token_rows(encode(pipe, prompts), pipe.unet)  # what the UNet's cross-attention sees (SDXL: unpacked)
    ids = [tok(p, truncation=True, max_length=tok.model_max_length).input_ids for p in prompts]
    eos = torch.stack([h[i.index(tok.eos_token_id) if tok.eos_token_id in i else len(i) - 1] for h, i in zip(hidden, ids)])
    return MembraneConcept(name, hidden.flatten(1), [set(i) - special for i in ids], scale, eos)


def _unique_name(unet, stem: str, taken: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3``, … if a membrane of that name is on ``unet`` or in ``taken``."""
    taken, name, k = taken | set(membrane.membrane_names(unet)), stem, 1
    while name in taken:
        k += 1
        name = f"{stem}_{k}"
    return name


def _load(file: str | os.PathLike | Artifact) -> Artifact:
    art = file if isinstance(file, Artifact) else load_artifact(file, kind="membrane", allow_missing_metadata=True)
    if art.metadata and art.kind != "membrane":
        raise UserError(f"{art.path}: is a {art.kind} artifact, expected membrane")
    return art


def attach_membranes(pipe, files: Sequence[str | os.PathLike | Artifact], *, transport: bool = True,
                     scales: Sequence[float] | None = None, similarity: str | None = SIMILARITY,
                     pair_negatives: bool = True) -> AttachedMembranes:
    """Attach membrane files to ``pipe.unet``, all together. With ``transport`` each membrane's γ is set per prompt
    from the text similarity to its concept, times its scale (facilitated transport; ``similarity``: ``"eos"`` or
    ``"flat"``, None: :data:`SIMILARITY`; ``pair_negatives``: CFG's negative rows take their prompt's γ — see
    :mod:`adapters.transport`); without, γ is fixed at ``scales`` (default 1 each).

    Every file is validated before anything is attached: a file made for another base model is a one-line
    :class:`UserError` and the pipeline is left untouched. :func:`pipelines.apply` is the one call for any mix of
    artifacts; this is what it does with membranes."""
    scales = list(scales) if scales is not None else [1.0] * len(files)
    if len(scales) != len(files):
        raise UserError(f"{len(files)} membrane files but {len(scales)} scales")
    similarity = similarity or SIMILARITY
    if similarity not in ("eos", "flat"):
        raise UserError(f"similarity must be 'eos' or 'flat', not {similarity!r}")
    arts = [_load(f) for f in files]
    checked = [check_membrane(pipe.unet, art) for art in arts]  # all of them, before anything changes
    names, prompts = [], {}
    for art, layers in zip(arts, checked):
        if not art.metadata:
            warnings.warn(f"{art.path}: no concept-erasure metadata (an original SPM file?); loaded by its shapes")
        name = _unique_name(pipe.unet, art.path.stem.replace(".", "_"), set(names))
        _attach_checked(pipe.unet, layers, name)
        names.append(name)
        prompts[name] = _prompts(art)
    handle = AttachedMembranes(pipe, names, prompts=prompts)
    if transport:
        tok = pipe.tokenizer
        special = set(tok.all_special_ids)
        concepts = [_concept(pipe, n, prompts[n] or [""], s, special) for n, s in zip(names, scales)]
        encoders = [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]
        eos_id = tok.eos_token_id if similarity == "eos" else None
        handle.transport = Transport(concepts, special, eos_id=eos_id, pair_negatives=pair_negatives).install(
            encoders, pipe.unet)
    else:
        membrane.set_gates(pipe.unet, dict(zip(names, scales)))
    return handle
