"""Facilitated transport (SPM paper §3.3): a per-prompt permeability γ for every membrane.

    γ_c(p) = max( s_f(c, p), s_t(c, p) )                                   (paper Eqs. 10–11)

s_f is the cosine similarity of the text encoder's last hidden states of prompt p and of the membrane's concept
prompts; s_t = |T(c) ∩ T(p)| / |T(c)| is the overlap of their token ids, special tokens excluded. A membrane with
several concept prompts takes the max over them. Two ways to compare hidden states (``similarity``):

- ``"flat"`` — all 77 positions flattened into one vector, as the SPM code does. Every short prompt shares the
  padding positions, so unrelated prompts still score high (0.78–0.96 for the other shapes against "a circle" on the
  toy world) and the membrane stays mostly open for them.
- ``"eos"`` — the state at the end-of-text token, the encoder's summary of the prompt (CLIP's pooled output):
  unrelated prompts score low (0.13–0.81, mean 0.39 on the same prompts) while prompts that imply the concept
  without naming it stay high (aliases: 0.75–1.00). Rows the text encoder did not produce fall back to ``"flat"``.
  Measured with the toy circle membrane (2 images per prompt), flat → eos: other shapes kept 0.78 → 0.86, the other
  object in pairs 0.64 → 0.75, but circle on alias prompts 0.08 → 0.33 and, on all 156 prompts without a circle,
  shape 0.78 → 0.74, colour 0.38 → 0.40: the damage is done by the membrane even at a low γ, so ``"flat"`` (the
  paper's) stays the default.

Differences from the original code, on purpose:

- γ multiplies the membrane's output, so the combination is **linear** in γ (paper Eq. 9). The original code scales
  both factors (γ² for one membrane) and sums the factors of several membranes (cross terms U_i·D_j).
- γ is computed **once per prompt**: a hook on the text encoder scores each prompt as it is encoded; a pre-hook on the
  UNet reads the rows of ``encoder_hidden_states`` it receives, so every row of a batch — each prompt, and each CFG
  branch — gets its own γ, and the score is reused across denoising steps (the same tensor is passed every step).
- Rows the text encoder did not produce (``prompt_embeds`` passed in directly) are scored by s_f alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adapters.membrane import set_gates


@dataclass
class MembraneConcept:
    """What facilitated transport needs to know about one membrane."""

    name: str
    embeds: torch.Tensor  # (P, L·D) flattened last hidden states of its concept prompts
    token_sets: list[set[int]]  # token ids of each concept prompt, special tokens removed
    scale: float = 1.0  # user multiplier on γ
    eos_embeds: torch.Tensor | None = None  # (P, D) their states at the end-of-text token


def token_overlap(tokens: set[int], concept: set[int]) -> float:
    """s_t = |T(c) ∩ T(p)| / |T(c)|; 0 for an empty concept."""
    return len(tokens & concept) / len(concept) if concept else 0.0


def permeability(row: torch.Tensor, tokens: set[int] | None, concept: MembraneConcept, eos: int | None = None) -> float:
    """γ for one prompt row (L, D) and one membrane, in [0, 1]; ``eos``: the row's end-of-text position, to compare
    end-of-text states (``similarity="eos"``), else all positions flattened."""
    if eos is not None and concept.eos_embeds is not None:
        s_f = F.cosine_similarity(row[eos].float()[None], concept.eos_embeds.float(), dim=1).max().item()
    else:
        s_f = F.cosine_similarity(row.flatten().float()[None], concept.embeds.float(), dim=1).max().item()
    s_t = max((token_overlap(tokens, t) for t in concept.token_sets), default=0.0) if tokens is not None else 0.0
    return min(max(s_f, s_t, 0.0), 1.0)


@dataclass
class Transport:
    """Hooks on a pipeline's text encoder and UNet that gate membranes per prompt."""

    concepts: list[MembraneConcept]
    special_ids: set[int]
    enabled: bool = True
    eos_id: int | None = None  # the end-of-text token id: with it, s_f compares end-of-text states ("eos")
    _seen: list = field(default_factory=list)  # [(hidden row (L, D), token set, eos position)] of recent prompts
    _last: tuple = (None, None)  # (encoder_hidden_states object, gates) of the last UNet call
    _handles: list = field(default_factory=list)

    def _on_text(self, module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        hidden = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
        if ids is None:
            return
        for row_ids, row in zip(ids.tolist(), hidden.detach()):
            eos = row_ids.index(self.eos_id) if self.eos_id in row_ids else None
            self._seen.append((row, set(row_ids) - self.special_ids, eos))
        del self._seen[:-64]  # a bounded memory of recent prompts

    def _lookup(self, row: torch.Tensor) -> tuple[set[int] | None, int | None]:
        """(token set, end-of-text position) of a row the text encoder produced, else (None, None)."""
        for seen, tokens, eos in reversed(self._seen):
            if seen.shape[0] == row.shape[0] and seen.shape[-1] <= row.shape[-1] and torch.allclose(
                    seen.to(row.device, row.dtype), row[..., : seen.shape[-1]], atol=1e-3, rtol=1e-3):
                return tokens, eos
        return None, None

    def gates_for(self, ehs: torch.Tensor) -> dict[str, torch.Tensor]:
        """γ per membrane for every row of ``encoder_hidden_states`` (B, L, D) → {name: (B,)}."""
        found = [self._lookup(r) for r in ehs]
        return {c.name: torch.tensor([permeability(r, t, c, e) * c.scale for r, (t, e) in zip(ehs, found)])
                for c in self.concepts}

    def _on_unet(self, module, args, kwargs):
        if not self.enabled:
            return
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if ehs is None:
            return
        if self._last[0] is not ehs:  # new prompts: score them once, reuse for every denoising step
            self._last = (ehs, self.gates_for(ehs))
        set_gates(module, self._last[1])

    def install(self, text_encoders, unet) -> "Transport":
        for te in text_encoders:
            self._handles.append(te.register_forward_hook(self._on_text, with_kwargs=True))
        self._handles.append(unet.register_forward_pre_hook(self._on_unet, with_kwargs=True))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()
        self._last = (None, None)
