"""SPM one-dimensional membranes: rank-r (default 1) adapters that wrap a base Linear / Conv2d.

    y = W x + Σ_c γ_c · s · (v_sig,c ⊗ v_reg,c) x          (SPM paper Eq. 1; Eq. 9 for several membranes)

with ``lora_down`` = v_reg (input side, kaiming-uniform init), ``lora_up`` = v_sig (output side, zero init, so a fresh
membrane is an exact no-op), s = alpha / rank. Several named membranes can sit on one layer; each has its own gate
γ_c, a float or a per-sample tensor (B,) — facilitated transport sets one γ per prompt. The combination is
**linear** in γ (the paper's Eq. 9), unlike the original code, which scales both factors and mixes membranes' factors.

Like peft: the wrapper keeps the original module as ``base_layer``; ``merge()`` folds the (scalar-gated) membranes
into the base weight and ``unmerge()`` takes them out again; ``detach_membranes`` restores the original module tree.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from adapters.artifact import fingerprint

TARGET_BLOCK = "Transformer2DModel"  # SPM wraps every Linear / Conv2d inside the UNet's transformer blocks


class MembraneBranch(nn.Module):
    """One membrane on one layer: ``lora_down`` (rank × in) and ``lora_up`` (out × rank), plus ``alpha``."""

    def __init__(self, base: nn.Module, rank: int = 1, alpha: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_up.weight)
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.to(device=base.weight.device, dtype=base.weight.dtype)

    def scale_tensor(self, dtype: torch.dtype) -> torch.Tensor:
        """s = alpha / rank as a 0-d tensor on the membrane's device: no host sync in the forward pass."""
        return self.alpha.to(dtype) / self.rank

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · U D with the base weight's shape."""
        up, down = self.lora_up.weight, self.lora_down.weight
        if down.ndim == 4:  # conv: (out, r, 1, 1) @ (r, in, kh, kw)
            return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * self.scale_tensor(up.dtype)
        return (up @ down) * self.scale_tensor(up.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x) * self.scale_tensor(x.dtype))


def _broadcast_gate(gate, y: torch.Tensor):
    """A float, or a (B,) tensor reshaped to broadcast over y (B, …)."""
    if isinstance(gate, torch.Tensor):
        return gate.to(y.device, y.dtype).view(-1, *([1] * (y.ndim - 1)))
    return gate


class MembraneLayer(nn.Module):
    """A base Linear / Conv2d with named membranes beside it."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"membranes wrap Linear or Conv2d layers, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.membranes = nn.ModuleDict()
        self.gates: dict[str, float | torch.Tensor] = {}
        self.merged: dict[str, float] = {}  # name → the γ it was merged with

    def add(self, name: str, rank: int = 1, alpha: float = 1.0, generator: torch.Generator | None = None) -> MembraneBranch:
        if name in self.membranes:
            raise ValueError(f"membrane {name!r} is already attached here")
        self.membranes[name] = MembraneBranch(self.base_layer, rank, alpha, generator)
        self.gates[name] = 1.0
        return self.membranes[name]

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        del self.membranes[name]
        self.gates.pop(name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        active = []
        for name, branch in self.membranes.items():
            gate = self.gates.get(name, 1.0)
            if name not in self.merged and (isinstance(gate, torch.Tensor) or gate != 0):
                active.append((branch, gate))
        if len(active) == 1:  # γ s U (D x): scaled in the rank-r bottleneck, not on the layer's whole output
            branch, gate = active[0]
            h = branch.lora_down(x)
            return y + branch.lora_up(h * _broadcast_gate(gate, h) * branch.scale_tensor(h.dtype))
        if active:
            return y + self._stacked(x, active)
        return y

    def _stacked(self, x: torch.Tensor, active) -> torch.Tensor:
        """Σ_c γ_c s_c U_c D_c x for several membranes in two matmuls: the D_c stacked into one (Σr × in) map, the
        U_c into one (out × Σr) map, each row of the bottleneck scaled by its γ (per sample) and s."""
        n = x.shape[0]
        cols = []
        for branch, gate in active:
            g = gate.to(x.device, x.dtype) if isinstance(gate, torch.Tensor) else x.new_full((n,), float(gate))
            cols.append((g * branch.scale_tensor(x.dtype)).view(-1, 1).expand(n, branch.rank))
        scale = torch.cat(cols, 1)  # (B, Σr)
        down = torch.cat([b.lora_down.weight for b, _ in active], 0)
        up = torch.cat([b.lora_up.weight for b, _ in active], 1)
        if down.ndim == 4:  # conv: (B, Σr, H, W)
            first = active[0][0].lora_down
            h = F.conv2d(x, down, None, first.stride, first.padding, first.dilation)
            return F.conv2d(h * scale[:, :, None, None], up)
        h = F.linear(x, down)  # (B, …, Σr)
        return F.linear(h * scale.view(n, *([1] * (h.ndim - 2)), -1), up)

    @torch.no_grad()
    def merge(self, names: Iterable[str] | None = None) -> None:
        """Fold membranes (with their current scalar γ) into the base weight."""
        for name in names if names is not None else list(self.membranes):
            if name in self.merged:
                continue
            gate = self.gates.get(name, 1.0)
            if isinstance(gate, torch.Tensor):
                raise ValueError("a membrane with a per-sample gate cannot be merged; set a scalar gate first")
            w = self.base_layer.weight
            w.add_((self.membranes[name].delta_weight().float() * gate).to(w.dtype))
            self.merged[name] = float(gate)

    @torch.no_grad()
    def unmerge(self, names: Iterable[str] | None = None) -> None:
        for name in names if names is not None else list(self.merged):
            gate = self.merged.pop(name)
            w = self.base_layer.weight
            w.sub_((self.membranes[name].delta_weight().float() * gate).to(w.dtype))


# ---------------------------------------------------------------------------------------------------------------
# attaching to a UNet


def _walk(module: nn.Module, prefix: str):
    """(path, base Linear/Conv2d) below ``module``, not descending into membrane wrappers."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}"
        if isinstance(child, MembraneLayer):
            yield path, child.base_layer
        elif isinstance(child, (nn.Linear, nn.Conv2d)):
            yield path, child
        else:
            yield from _walk(child, path)


def target_layers(unet: nn.Module, block: str = TARGET_BLOCK) -> dict[str, nn.Module]:
    """Every Linear / Conv2d inside the UNet's transformer blocks, by dotted path (SD 1.x: 192 layers)."""
    return {path: layer for name, mod in unet.named_modules() if type(mod).__name__ == block
            for path, layer in _walk(mod, name)}


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def membrane_layers(unet: nn.Module) -> dict[str, MembraneLayer]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, MembraneLayer)}


def attach(unet: nn.Module, name: str, rank: int = 1, alpha: float = 1.0, layers: Iterable[str] | None = None,
           generator: torch.Generator | None = None) -> dict[str, MembraneBranch]:
    """Attach a membrane called ``name`` to every target layer (or the given paths) → {path: branch}. ``generator``
    seeds the lora_down initialisation (training is then reproducible; lora_up starts at zero either way)."""
    targets = target_layers(unet)
    paths = list(layers) if layers is not None else list(targets)
    wrapped = membrane_layers(unet)
    branches = {}
    for path in paths:
        layer = wrapped.get(path)
        if layer is None:
            layer = MembraneLayer(targets[path])
            _set_submodule(unet, path, layer)
        branches[path] = layer.add(name, rank, alpha, generator)
    return branches


def detach(unet: nn.Module, name: str | None = None) -> None:
    """Remove one membrane (or all); a layer left with no membrane is replaced by its original module."""
    for path, layer in membrane_layers(unet).items():
        for n in [name] if name is not None else list(layer.membranes):
            if n in layer.membranes:
                layer.remove(n)
        if not layer.membranes:
            _set_submodule(unet, path, layer.base_layer)


def set_gates(unet: nn.Module, gates: dict[str, float | torch.Tensor]) -> None:
    """Set γ for named membranes on every layer (floats, or (B,) tensors for per-sample gating)."""
    for layer in membrane_layers(unet).values():
        for n, g in gates.items():
            if n in layer.membranes:
                layer.gates[n] = g


def membrane_names(unet: nn.Module) -> list[str]:
    names: list[str] = []
    for layer in membrane_layers(unet).values():
        names += [n for n in layer.membranes if n not in names]
    return names


def merge(unet: nn.Module, names: Iterable[str] | None = None) -> None:
    for layer in membrane_layers(unet).values():
        layer.merge([n for n in names if n in layer.membranes] if names is not None else None)


def merge_and_unload(unet: nn.Module) -> None:
    """Fold every membrane (at its current scalar γ) into the weights and remove the wrappers: the UNet is an
    ordinary one again, as fast as the base model; there is no unmerge after this (peft's ``merge_and_unload``)."""
    for path, layer in membrane_layers(unet).items():
        layer.merge()
        _set_submodule(unet, path, layer.base_layer)


def unmerge(unet: nn.Module, names: Iterable[str] | None = None) -> None:
    for layer in membrane_layers(unet).values():
        layer.unmerge([n for n in names if n in layer.merged] if names is not None else None)


# ---------------------------------------------------------------------------------------------------------------
# kohya / SD-WebUI key naming (the original SPM release): lora_unet_<path with . → _>.lora_down.weight, ...


def sgm_path(path: str, unet: nn.Module) -> str:
    """A diffusers UNet layer path in the original SGM / LDM layout that kohya sd-scripts and SD-WebUI name SDXL
    layers by; diffusers maps it back in ``_maybe_map_sgm_blocks_to_diffusers``. With L = ``layers_per_block``:
    ``down_blocks.i.attentions.j`` → ``input_blocks.{1 + i(L+1) + j}.1``, ``mid_block.attentions.0`` →
    ``middle_block.1``, ``up_blocks.i.attentions.j`` → ``output_blocks.{i(L+1) + j}.1``; the rest of the path (inside
    the transformer block) is the same in both layouts."""
    n = unet.config.layers_per_block + 1
    parts = path.split(".")
    if parts[0] == "mid_block" and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    if parts[0] in ("down_blocks", "up_blocks") and parts[2] == "attentions":
        i, j = int(parts[1]), int(parts[3])
        head = ["input_blocks", str(1 + i * n + j)] if parts[0] == "down_blocks" else ["output_blocks", str(i * n + j)]
        return ".".join([*head, "1", *parts[4:]])
    raise ValueError(f"no SGM name for UNet layer {path!r} (only transformer-block layers have one here)")


def uses_sgm_keys(unet: nn.Module) -> bool:
    """SDXL UNets (``text_time`` added conditioning): their membranes are saved under SGM-layout keys."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def kohya_prefix(path: str, unet: nn.Module | None = None) -> str:
    """The kohya key prefix of a UNet layer path: ``lora_unet_`` + the path with . → _, in the SGM layout
    (:func:`sgm_path`) for an SDXL ``unet`` as kohya and SD-WebUI write SDXL LoRAs, else in the diffusers layout."""
    if unet is not None and uses_sgm_keys(unet):
        path = sgm_path(path, unet)
    return "lora_unet_" + path.replace(".", "_")


def state_dict(unet: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """A membrane's tensors under kohya keys: ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``."""
    out = {}
    for path, layer in membrane_layers(unet).items():
        if name in layer.membranes:
            b, key = layer.membranes[name], kohya_prefix(path, unet)
            out[f"{key}.lora_down.weight"] = b.lora_down.weight.detach()
            out[f"{key}.lora_up.weight"] = b.lora_up.weight.detach()
            out[f"{key}.alpha"] = b.alpha.detach()
    return out


def kohya_to_paths(unet: nn.Module) -> dict[str, str]:
    """kohya prefix → dotted path, for every target layer of this UNet (the mapping is not invertible by text).
    SDXL UNets accept both the SGM-layout keys they are saved with and the diffusers-layout keys of older files."""
    out = {kohya_prefix(p): p for p in target_layers(unet)}
    if uses_sgm_keys(unet):
        out.update({kohya_prefix(p, unet): p for p in target_layers(unet)})
    return out


def layers_fingerprint(unet: nn.Module) -> str:
    """Fingerprint of the target layers' base weights (paths and shapes): equal for any UNet a membrane fits."""
    return fingerprint(((p, tuple(m.weight.shape)) for p, m in target_layers(unet).items()), type(unet).__name__)
