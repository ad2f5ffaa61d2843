"""Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024), arXiv 2407.12383: UCE's edit, then rounds in
which the embedding that best regenerates the concept on the edited model is derived in closed form and erased too.

Round r, over every edited projection l (current W_l, original W⁰_l), for each token embedding c of the concept's
prompts (``round_tokens``: the rows UCE's edit changed, from the concept's word on; or all 77 rows, as RECE — the
rows before the word, shared with every prompt, took the other shapes with them on the toy world):

    c' = (λ_reg I + Σ_l W_lᵀ W_l)⁻¹ (Σ_l W_lᵀ W⁰_l) c          the minimiser of Σ_l ‖W_l c' − W⁰_l c‖² + λ_reg ‖c'‖²

then one UCE edit of the current weights: keys c' → the guide's embeddings at the same positions (erase scale s_e),
the empty prompt preserved at λ₂, λ₁ towards the current weights (RECE's uce.py: λ₁ = λ₂ = 0.1).
The logged loss of a round is the adversarial embedding's regeneration error before its edit,
Σ_l ‖W_l c' − W⁰_l c‖² / Σ_l ‖W⁰_l c‖² (small: the concept is one embedding away).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.errors import UserError
from erasure.config import option
from erasure.methods.uce import UCE, UCEConfig, edit_transform


@dataclass
class RECEConfig(UCEConfig):
    """RECE (Gong et al., 2024). Defaults: CharlesGong12/RECE at 403a67f, the nudity recipe (scripts/nudity.sh,
    README) unless noted; its first edit is UCE's (train_uce.py: λ 0.5, erase 1, preserve '' at 1)."""

    rounds: int = option(3, "adversarial rounds after the UCE edit (RECE README: nudity 3 epochs, I2P 2, artists 1)")
    lam_reg: float = option(0.1, "λ_reg of the adversarial embedding (RECE README: nudity / I2P / easy objects 0.1; "
                            "artists, hard objects 1e-3)")
    round_lam: float = option(0.1, "λ₁ of each round's edit, towards the current weights (uce.py: 0.1)")
    round_preserve_scale: float = option(0.1, "λ₂, weight of the prompts each round preserves (uce.py: 0.1)")
    round_tokens: str = option("edited", "rows whose adversarial twins each round erases: the 'edited' rows of the first "
                               "edit (the concept's word onwards) or 'all' 77 rows of the concept's prompts (RECE)",
                               choices=("edited", "all"))
    round_preserve: str = option("empty", "what each round preserves: the 'empty' prompt (RECE) or 'all' of the first "
                                 "edit's preserve prompts", choices=("empty", "all"))


class RECE(UCE):
    name = "rece"
    title = "UCE, then rounds erasing the closed-form adversarial embedding of the concept (RECE, Gong et al. 2024)"
    config_class = RECEConfig
    # the toy world: UCE's, then one round (RECE's count for objects) preserving the first edit's prompts: with the
    # empty prompt only, or three rounds, other shapes fell to 0.06–0.83 (docs/methods/uce-rece.md)
    toy_defaults = {**UCE.toy_defaults, "rounds": 1, "round_preserve": "all"}

    @classmethod
    def check(cls, config, concept) -> None:
        super().check(config, concept)
        if config.rounds < 0 or config.lam_reg < 0 or config.round_lam <= 0:
            raise UserError("rece: need --rounds ≥ 0, --lam-reg ≥ 0 and --round-lam > 0")

    def _round_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The concept rows a round attacks and the guide rows they are mapped to: UCE's key / value rows, or every
        row of the concept's prompts and of their guides."""
        if self.config.round_tokens == "edited":
            return self.keys, self.values
        return self.erase.flatten(0, 1), self.guide.flatten(0, 1)

    def adversarial(self) -> tuple[torch.Tensor, float]:
        """The concept's adversarial embeddings c' (P·77, D) on the current weights, and their regeneration error."""
        c = self._round_rows()[0].double()  # (n, D)
        D = c.shape[1]
        S, R, Q = (torch.zeros(D, D, dtype=torch.float64) for _ in range(3))  # Σ WᵀW, Σ WᵀW⁰, Σ W⁰ᵀW⁰
        with torch.no_grad():  # one pass over the layers (their originals may be read back from disk)
            for n, p in self.params.items():
                w, w0 = p.detach().double().cpu(), self.original[n].double().cpu()
                S += w.T @ w
                R += w.T @ w0
                Q += w0.T @ w0
        adv = torch.linalg.solve(self.config.lam_reg * torch.eye(D, dtype=torch.float64) + S, R @ c.T).T
        # Σ_l ‖W_l c' − W⁰_l c‖² = Σ_rows c'ᵀS c' − 2 c'ᵀR c + cᵀQ c
        num = ((adv @ S) * adv).sum() - 2 * ((adv @ R) * c).sum() + ((c @ Q) * c).sum()
        den = ((c @ Q) * c).sum()
        return adv.float(), max(float(num), 0.0) / max(float(den), 1e-30)

    def train_step(self, gen, optimizers: dict, accelerator, step: int) -> float:
        """Step 0: UCE's edit → its residual. Step r ≥ 1: one adversarial round → the regeneration error it found."""
        if step == 0:
            return super().train_step(gen, optimizers, accelerator, step)
        cfg = self.config
        adv, error = self.adversarial()
        values = self._round_rows()[1]  # each row's guide, position by position (n, D)
        preserve = self.preserve if cfg.round_preserve == "all" else self.preserve[: self.erase.shape[1]]  # "" first
        # the round's keys: the adversarial twins and the first edit's own rows (so a round cannot undo it)
        keys, values = torch.cat([adv, self.keys]), torch.cat([values, self.values])
        T = edit_transform(keys, values, preserve, lam=cfg.round_lam, erase_scale=cfg.erase_scale,
                           preserve_scale=cfg.round_preserve_scale)
        self.apply_transform(self.params, T)  # W ← W·T (each product is a new tensor before it is copied in)
        return round(error, 6)
