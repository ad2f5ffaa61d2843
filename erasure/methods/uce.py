"""Unified Concept Editing (Gandikota et al., WACV 2024), arXiv 2308.14761: one closed-form edit of every
cross-attention key and value projection (``attn2.to_k`` / ``attn2.to_v``), no training.

For each such weight W₀ (out × D), with c_i the erase prompts' token embeddings, g_i the guide's at the same
positions and p_j the preserve prompts' (all 77 rows each, the empty prompt always among them):

    W = (λ W₀ + s_e Σ_i W₀ g_i c_iᵀ + s_p Σ_j W₀ p_j p_jᵀ) (λ I + s_e Σ_i c_i c_iᵀ + s_p Σ_j p_j p_jᵀ)⁻¹

so the concept's keys and values become the guide's, the preserved prompts' stay, and λ holds the rest near W₀
(the λ terms are the code's, uce_sd_erase.py / train_erase.py; the paper's equation has none). Every layer sees the
same embeddings, so W = W₀ T with one D × D matrix T: the edit of all 32 projections of SD 1.x is one solve.
Tokens: ``tail`` pairs the prompt's last word, EOS and padding position by position with the guide's from its last
word on (train_erase.py, paper era: with CLIP's causal encoder every position after the word carries it); when the
guide is the prompt with one word swapped, both start at that word (so "a red circle and a blue star" is edited from
"circle" on). ``last`` edits that one position only (uce_sd_erase.py at HEAD: the last word).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.errors import UserError
from erasure.config import option
from erasure.methods.base import FineTuneMethod
from pipelines.text import encode, token_rows


@dataclass
class UCEConfig:
    """UCE (Gandikota et al., 2024). Defaults: unified-concept-editing uce_sd_erase.py at 28c81ed unless noted."""

    guide: str = option("surrogate", "what the concept's prompts are mapped to: the preset's 'surrogate' ('' for "
                        "nudity and objects, as UCE), 'swap' (toy: each prompt with the concept's word swapped for "
                        "the substitute's), or a prompt")
    erase_scale: float = option(1.0, "s_e, weight of the erase pairs (erase_scale: 1)")
    preserve_scale: float = option(1.0, "s_p, weight of the preserve prompts (preserve_scale: 1)")
    lam: float = option(0.5, "λ, pull towards the original weights (main passes 0.5)")
    tokens: str = option("tail", "edited token positions: 'tail' (last word, EOS, padding: train_erase.py, paper era) "
                         "or 'last' (last word: HEAD)", choices=("tail", "last"))
    preserve: str = option("", "preserve prompts separated by '|' (default: the preset's anchors; toy: captions without "
                           "the concept); the empty prompt is always preserved")
    pairs: int = option(0, "toy world: two-object captions naming the concept added to the erase prompts, each "
                        "mapped to the caption with the substitute's word (0: none, as UCE)")
    preserve_captions: int = option(256, "toy world: how many captions without the concept are preserved")


def edit_transform(keys: torch.Tensor, values: torch.Tensor, preserve: torch.Tensor, *, lam: float,
                   erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """T (D × D, float64) with W = W_base T the edit: keys (n, D) → values (n, D) (values are W_base-space inputs:
    W_base·values is what W·keys should give), preserve (m, D) kept, λ towards W_base.
    T = (λI + s_e VᵀK + s_p PᵀP)(λI + s_e KᵀK + s_p PᵀP)⁻¹ with rows as embeddings."""
    k, v, p = keys.double(), values.double(), preserve.double()
    eye = torch.eye(k.shape[1], dtype=torch.float64, device=k.device)
    num = lam * eye + erase_scale * v.T @ k + preserve_scale * p.T @ p
    den = lam * eye + erase_scale * k.T @ k + preserve_scale * p.T @ p
    return torch.linalg.solve(den, num.T).T  # num · den⁻¹ (den is symmetric)


def start_positions(pipe, prompts: list[str], guides: list[str]) -> tuple[list[int], list[int]]:
    """Where each prompt's edited tokens start, and its guide's: the first token where a guide of the same length
    differs (a swapped word: "a red circle and a blue star" → "a red square and …", position of "circle"), else
    each one's last word (before EOS; the start token for the empty prompt), as UCE."""
    tok = pipe.tokenizer
    ids = lambda t: tok(t, truncation=True, max_length=tok.model_max_length).input_ids  # noqa: E731
    starts_p, starts_g = [], []
    for p, g in zip(prompts, guides):
        a, b = ids(p), ids(g)
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        if len(a) == len(b) and diff:
            starts_p.append(diff[0])
            starts_g.append(diff[0])
        else:
            starts_p.append(len(a) - 2)
            starts_g.append(len(b) - 2)
    return starts_p, starts_g


def paired_rows(erase: torch.Tensor, guide: torch.Tensor, e_idx: list[int], g_idx: list[int],
                tokens: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (key, value) embedding rows: erase (P, L, D), guide (P, L, D) → two (n, D). ``last``: each prompt's last
    word; ``tail``: its last word onwards, paired position by position with the guide's from its last word on."""
    keys, values = [], []
    for e, g, i, j in zip(erase, guide, e_idx, g_idx):
        m = 1 if tokens == "last" else min(len(e) - i, len(g) - j)
        keys.append(e[i : i + m])
        values.append(g[j : j + m])
    return torch.cat(keys), torch.cat(values)


class UCE(FineTuneMethod):
    name = "uce"
    title = "closed-form edit of the cross-attention keys and values (UCE, Gandikota et al. 2024)"
    config_class = UCEConfig
    maskable = False
    shardable = False
    uses_reference = False
    # the toy world: each prompt (and 64 two-object captions) mapped to itself with the substitute's word, the
    # 256 preserved captions at 0.1 (docs/methods/uce-rece.md)
    toy_defaults = {"guide": "swap", "pairs": 64, "preserve_scale": 0.1}

    @classmethod
    def check(cls, config, concept) -> None:
        if config.guide == "swap" and not concept.is_toy:
            raise UserError(f"{cls.name}: --guide swap needs a toy concept (it swaps the toy concept's word for its "
                            "substitute's)")
        if config.pairs and not concept.is_toy:
            raise UserError(f"{cls.name}: --pairs needs a toy concept (two-object captions come from the toy world)")
        if config.lam <= 0 or config.erase_scale < 0 or config.preserve_scale < 0:
            raise UserError(f"{cls.name}: need --lam > 0 and --erase-scale, --preserve-scale ≥ 0")

    def __init__(self, pipe, concept, config, ctx):
        super().__init__(pipe, concept, config, ctx)
        prompts = list(concept.prompts)
        if config.guide == "swap":
            guides = concept.swap(prompts, role=f"{self.name}: the substitute")
        else:
            guides = [concept.surrogate if config.guide == "surrogate" else config.guide] * len(prompts)
        if config.pairs:  # two-object captions naming the concept, each → the caption with the substitute's word
            pairs = concept.scene_pairs(config.pairs, ctx.seed, swap=True)
            prompts, guides = prompts + [p for p, _ in pairs], guides + [g for _, g in pairs]
        self.prompts, self.guides = prompts, guides
        self.erase = self._rows(prompts)  # (P, 77, D)
        self.guide = self._rows(guides)
        self.keys, self.values = paired_rows(self.erase, self.guide, *start_positions(pipe, prompts, guides),
                                             config.tokens)
        self.preserve_prompts = [""] + self._preserve_prompts()
        self.preserve = self._rows(self.preserve_prompts).flatten(0, 1)  # (M·77, D)

    def _rows(self, prompts: list[str]) -> torch.Tensor:
        return token_rows(encode(self.pipe, prompts), self.unet).float()

    def _preserve_prompts(self) -> list[str]:
        if self.config.preserve:
            return [t.strip() for t in self.config.preserve.split("|") if t.strip()]
        if self.concept.is_toy:
            return self.concept.anchor_captions(self.ctx.seed, self.config.preserve_captions)
        return list(self.concept.anchors)

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n]

    def optimizers(self) -> dict:
        return {}

    def apply_transform(self, base: dict[str, torch.Tensor], T: torch.Tensor) -> None:
        """Every edited weight ← base weight · T."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_((base[n].to(p.device).double() @ T.to(p.device)).to(p.dtype))

    def residual(self) -> float:
        """How far the edited layers are from mapping the keys to the values: Σ‖W k − W₀ v‖² / Σ‖W₀ v‖²."""
        num = den = 0.0
        with torch.no_grad():
            for n, p in self.params.items():
                w0 = self.original[n].to(p.device).float()
                target = self.values.to(p.device) @ w0.T
                num += float(((self.keys.to(p.device) @ p.float().T - target) ** 2).sum())
                den += float((target**2).sum())
        return num / max(den, 1e-30)

    def train_step(self, gen, optimizers: dict, accelerator, step: int) -> float:
        """The one edit (UCE has one step) → the relative residual of the erase pairs."""
        cfg = self.config
        T = edit_transform(self.keys, self.values, self.preserve, lam=cfg.lam, erase_scale=cfg.erase_scale,
                           preserve_scale=cfg.preserve_scale)
        self.apply_transform(self.original, T)
        return round(self.residual(), 6)
