"""Facilitated transport (SPM paper §3.3): a per-prompt permeability γ for every membrane.

    γ_c(p) = max( s_f(c, p), s_t(c, p) )                                   (paper Eqs. 10–11)

s_f is the cosine similarity of the text encoder's last hidden states of prompt p and of the membrane's targets (the
concept itself, e.g. "circle" or "nudity", as the SPM release stores it; files from before ``targets`` existed use
their training prompts); s_t = |T(c) ∩ T(p)| / |T(c)| is the overlap of their token ids, special tokens excluded. A
membrane with several targets takes the max over them. Two ways to compare hidden states (``similarity``):

- ``"flat"`` — all 77 positions flattened into one vector, as the SPM code does. Every short prompt shares the
  padding positions, so unrelated prompts still score high and a membrane stays mostly open for them; prompts that
  imply the concept without naming it score higher still.
- ``"eos"`` — the state at the end-of-text token, the encoder's summary of the prompt (CLIP's pooled output):
  unrelated prompts score low, but so do many aliases, which are then erased less. Rows the text encoder did not
  produce fall back to ``"flat"``.

On the toy world one membrane erases its aliases best under ``"flat"``; several stacked keep the prompts that name
none of them intact only under ``"eos"`` (the similarities and rates: docs/methods/spm.md).

Differences from the original code, on purpose:

- γ multiplies the membrane's output, so the combination is **linear** in γ (paper Eq. 9). The original code scales
  both factors (γ² for one membrane) and sums the factors of several membranes (cross terms U_i·D_j).
- γ is computed **once per prompt**: a hook on the text encoder scores each prompt as it is encoded (whole batches:
  the last few encoder calls are remembered, not a fixed number of rows); a pre-hook on the UNet reads the rows of
  ``encoder_hidden_states`` it receives, so every prompt of a batch gets its own γ, reused across denoising steps
  (the same tensor is passed every step). Under CFG a negative row takes its prompt's γ (``pair_negatives``, the
  default), so one γ per prompt acts in both branches, as in the SPM code. Scored by its own text instead
  (``pair_negatives=False``), the empty negative prompt keeps a membrane open in the unconditional branch for every
  prompt, a change CFG amplifies by w − 1: on the toy world the circle membrane then keeps less of the pairs and a
  stack moves unrelated images more (docs/methods/spm.md).
- Rows the text encoder did not produce (``prompt_embeds`` passed in directly) are scored by s_f alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adapters.membrane import set_gates

MEMORY_CALLS = 8  # text-encoder calls remembered: enough for one SDXL generation with CFG (2 encoders × 2 calls)


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


def cfg_layout(calls: list[int]) -> bool:
    """Whether a batch is a CFG batch [negative; positive], judged by the text-encoder call that produced each row
    (0: unknown): diffusers encodes the prompts, then the negative prompts, and puts the negatives first."""
    n = len(calls) // 2
    if n == 0 or len(calls) % 2 or 0 in calls:
        return False
    return min(calls[:n]) > max(calls[n:])


@dataclass
class Transport:
    """Hooks on a pipeline's text encoder and UNet that gate membranes per prompt."""

    concepts: list[MembraneConcept]
    special_ids: set[int]
    enabled: bool = True
    eos_id: int | None = None  # the end-of-text token id: with it, s_f compares end-of-text states ("eos")
    pair_negatives: bool = True  # under CFG, negative rows take their prompt's γ (the SPM code), not their own
    _seen: list = field(default_factory=list)  # [(call no., hidden (N, L, D), token sets, eos positions)] per call
    _calls: int = 0  # text-encoder calls so far
    _last: tuple = (None, None)  # (encoder_hidden_states object, gates) of the last UNet call
    _handles: list = field(default_factory=list)

    def _on_text(self, module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        hidden = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
        if ids is None:
            return
        rows = ids.tolist()
        tokens = [set(r) - self.special_ids for r in rows]
        eos = [r.index(self.eos_id) if self.eos_id in r else None for r in rows]
        self._calls += 1
        self._seen.append((self._calls, hidden.detach(), tokens, eos))
        # The calls of one generation (prompts, negative prompts, a second text encoder) — whole batches of any size.
        del self._seen[:-MEMORY_CALLS]

    def _lookup(self, ehs: torch.Tensor) -> list[tuple[set[int] | None, int | None, int]]:
        """(token set, end-of-text position, call no.) of each row of ``ehs`` (B, L, D) that the text encoder
        produced, else (None, None, 0). A cheap per-position signature finds candidates, ``allclose`` confirms."""
        found: list = [(None, None, 0)] * len(ehs)
        for call, hidden, tokens, eos in reversed(self._seen):
            todo = [i for i, f in enumerate(found) if f[0] is None]
            if not todo or hidden.shape[1] != ehs.shape[1] or hidden.shape[-1] > ehs.shape[-1]:
                continue
            h = hidden.to(ehs.device, torch.float32)
            rows = ehs[todo][..., : h.shape[-1]].float()
            near = (rows.mean(-1)[:, None] - h.mean(-1)[None]).abs().amax(-1) <= 1e-3 + 1e-3 * rows.abs().amax((1, 2))[:, None]
            for k, i in enumerate(todo):
                for j in near[k].nonzero().flatten().tolist():
                    if torch.allclose(h[j], rows[k], atol=1e-3, rtol=1e-3):
                        found[i] = (tokens[j], eos[j], call)
                        break
        return found

    def gates_for(self, ehs: torch.Tensor) -> dict[str, torch.Tensor]:
        """γ per membrane for every row of ``encoder_hidden_states`` (B, L, D) → {name: (B,)}. With
        ``pair_negatives``, under CFG ([negative; positive] rows) each negative row takes its prompt's γ."""
        found = self._lookup(ehs)
        n = len(ehs) // 2
        if self.pair_negatives and cfg_layout([f[2] for f in found]):
            return {k: torch.cat([g, g]) for k, g in self._gates(ehs[n:], found[n:]).items()}
        return self._gates(ehs, found)

    def _gates(self, ehs, found) -> dict[str, torch.Tensor]:
        return {c.name: torch.tensor([permeability(r, t, c, e) * c.scale for r, (t, e, _) in zip(ehs, found)])
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
