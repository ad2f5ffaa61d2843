"""One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing Applications
(SPM; Lyu et al., CVPR 2024), arXiv 2312.16145.

A rank-1 membrane on every Linear / Conv2d of the UNet's transformer blocks is trained with

    L = L_era + λ · L_anc                                                              (paper Eq. 8)
    L_era = ‖ε_SPM(x_t, c_tar) − [ε(x_t, c_sur) − η (ε(x_t, c_tar) − ε(x_t, c_sur))]‖²       (Eq. 4)
    L_anc = E_{c ~ anchors} ‖ε_SPM(x_t, c) − ε(x_t, c)‖²                                  (Eqs. 5–7)

where ε is the original model (membrane off) and x_t comes from partial DDIM sampling (30 steps, CFG 3) with the
membrane on, conditioned on the target. Anchors, as the SPM code samples them (not as the paper words it): random
Gaussian directions in text-embedding space (all 77 positions), rescaled to ‖c_tar‖ · U[0.8, 1.2], plus the empty
prompt, all evaluated at the target's x_t (SDXL: only the token rows are random; the pooled embedding and size ids
are the empty prompt's). v-prediction models (SD 2.x 768) need no conversion: every term compares outputs at the same
x_t and t with weights summing to 1, so on v outputs it is the ε loss divided by ᾱ_t. Options beyond the code
(``SPMConfig``):

- ``anchor_source="prompts" | "both"``: the preset's anchor prompts instead of / besides the random directions;
  ``"captions"``: on the toy world, captions of scenes without the concept (every shape, colour, fill, alias and
  two-object scene that does not show it), so the anchors cover what must be kept, not only the other shapes.
- ``anchor_latents="own"``: each anchor at the x_t of its own partial DDIM trajectory (sampled together with the
  targets', membrane on) instead of the target's — "a blue square" is anchored on latents that hold a blue square.
- ``pair_fraction``: that share of each batch is two-object captions naming the concept, each steered by Eq. 4 to
  its other object alone (c_sur = "a blue square" for "a red circle and a blue square"), so the membrane learns to
  take the concept out of a scene, not to empty the scene.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from adapters import membrane
from adapters.errors import UserError
from erasure.config import option
from erasure.methods.base import Method, ddim_sampler, partial_ddim, run_metadata
from pipelines.text import denoise, encode, token_rows, with_tokens

@dataclass
class SPMConfig:
    """SPM (Lyu et al., CVPR 2024). Defaults: App. C.1 and Con6924/SPM configs/*.yaml unless noted."""

    rank: int = option(1, "membrane rank (paper: 1, a one-dimensional adapter)")
    alpha: float = option(1.0, "membrane alpha; scale = alpha / rank (SPM config: 1.0)")
    eta: float = option(1.0, "erasing guidance η (prompt YAML guidance_scale: 1.0; nudity 3.0)")
    anchor_weight: float = option(1000.0, "latent-anchoring weight λ (la_strength: 1e3; nudity 1e2)")
    steps: int = option(3000, "iterations (App. C.1: 3000; nudity 15K)")
    lr: float = option(1e-4, "learning rate, AdamW (App. C.1: 1e-4)")
    batch_size: int = option(1, "target prompts per step (SPM: 1)")
    ddim_steps: int = option(30, "DDIM steps of the partial sampling that makes x_t (max_denoising_steps: 30)")
    start_guidance: float = option(3.0, "CFG scale of that sampling (SPM: 3)")
    anchor_samples: int = option(2, "anchors per step besides the empty prompt (the code's effective count: 2)")
    anchor_source: str = option("random", "anchors: 'random' text-space directions (SPM code), the preset's anchor "
                                "'prompts', 'both', or 'captions' (toy world: captions of scenes without the concept; "
                                "elsewhere the preset's anchor prompts)", choices=("random", "prompts", "both", "captions"))
    steer: str = option("surrogate", "what the concept's prompts are steered to: the preset's 'surrogate' (SPM: the empty "
                        "prompt), or, on the toy world, each prompt with the concept's word 'swap'ped for the substitute's",
                        choices=("surrogate", "swap"))
    pair_fraction: float = option(0.0, "toy world: share of each batch drawn from two-object captions naming the concept, "
                                  "each steered to its other object alone instead of the surrogate (0: none, as SPM)")
    pair_eta: float = option(1.0, "η of those pair rows (0: steer them to their target without pushing away)")
    pair_target: str = option("other", "what those pairs are steered to: the 'other' object alone, or the caption with the "
                              "concept's word 'swap'ped for the preset's substitute", choices=("other", "swap"))
    anchor_latents: str = option("target", "x_t of the anchors: the 'target' prompt's trajectory (SPM code) or each "
                                 "anchor's 'own' partial DDIM trajectory", choices=("target", "own"))
    lr_schedule: str = option("constant", "learning-rate schedule: 'constant', or 'cosine' decay to 0 over the steps "
                              "(the SPM code: cosine with restarts after 500 warm-up steps)", choices=("constant", "cosine"))
    layers: str = option("all", "layers the membrane wraps: 'all' Linear / Conv2d of the transformer blocks (SPM), or only "
                         "the cross-attention key / value projections ('cross-kv': a per-token edit of the text)",
                         choices=("all", "cross-kv"))


MEMBRANE = "spm"  # the name of the membrane being trained on the UNet's layers


def erase_loss(eps_spm_tar, eps_tar, eps_sur, eta) -> torch.Tensor:
    """Eq. 4, per sample: (B, 4, h, w) ×3, η a float or (B,) → (B,)."""
    eta = torch.as_tensor(eta, dtype=eps_tar.dtype, device=eps_tar.device).reshape(-1, 1, 1, 1)
    target = eps_sur - eta * (eps_tar - eps_sur)
    return ((eps_spm_tar - target) ** 2).flatten(1).mean(1)


def anchor_loss(eps_spm_anc, eps_anc) -> torch.Tensor:
    """Eqs. 5–7, per sample: (A, 4, h, w) ×2 → (A,)."""
    return ((eps_spm_anc - eps_anc) ** 2).flatten(1).mean(1)


def random_anchors(target: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """SPM's anchor sampling: Gaussian directions with norm ‖c_tar‖·U[0.8, 1.2]. target (L, D) → (n, L, D).

    (The code's acceptance test, probability 1 − cos(noise, target), is ≈ 1 in L·D dimensions and is omitted.)"""
    noise = torch.randn((n, *target.shape), generator=gen).to(target)
    noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1)
    scale = target.norm() * (0.8 + 0.4 * torch.rand(n, generator=gen)).to(target)
    return noise * scale.view(-1, 1, 1)


def membrane_paths(unet, layers: str) -> list[str] | None:
    """``layers``: None for every target layer ("all"), else the paths of the cross-attention key / value
    projections ("cross-kv"), which see each text token on its own."""
    if layers == "all":
        return None
    return [p for p in membrane.target_layers(unet) if p.endswith(("attn2.to_k", "attn2.to_v"))]


class SPM(Method):
    """Trains one membrane on ``pipe.unet``; its parameters are the membrane's lora_down / lora_up."""

    name = "spm"
    adversarial = True
    title = "a rank-1 membrane with latent anchoring, loads anywhere (SPM, Lyu et al. 2024) [default]"
    config_class = SPMConfig
    # the toy world's 2.4 M-parameter UNet (docs/methods/spm.md); shapes also steer by swap (concepts.py)
    toy_defaults = {"steps": 200, "lr": 5e-3, "batch_size": 4, "ddim_steps": 12, "anchor_weight": 1.5,
                    "anchor_samples": 4, "anchor_source": "captions", "anchor_latents": "own", "pair_fraction": 0.5}

    @classmethod
    def check(cls, config, concept) -> None:
        if not 0.0 <= config.pair_fraction <= 1.0:
            raise UserError(f"--pair-fraction must be between 0 and 1 (got {config.pair_fraction})")
        if config.pair_fraction > 0 and not concept.is_toy:
            raise UserError("spm: --pair-fraction needs a toy concept (two-object captions come from the toy world)")
        if config.steer == "swap" and not concept.is_toy:
            raise UserError("spm: --steer swap needs a toy concept (it swaps the toy concept's word for its "
                            "substitute's)")

    def __init__(self, pipe, concept, config, ctx):
        super().__init__(pipe, concept, config, ctx)
        self.unet.requires_grad_(False)
        init = torch.Generator().manual_seed(ctx.seed)  # the membrane's lora_down init: same seed, same membrane
        branches = membrane.attach(self.unet, MEMBRANE, rank=config.rank, alpha=config.alpha,
                                   layers=membrane_paths(self.unet, config.layers), generator=init)
        self.params = {f"{p}.{k}": v for p, b in branches.items() for k, v in b.named_parameters()}
        self.sampler = ddim_sampler(pipe)
        self.targets = encode(pipe, list(concept.prompts))  # (P, L, D)
        if config.steer == "swap":  # each target prompt → itself with the substitute's word: (P, L, D)
            self.surrogate = encode(pipe, concept.swap(list(concept.prompts), role="spm: the substitute"))
        else:
            self.surrogate = encode(pipe, [concept.surrogate]).expand(len(self.targets), -1, -1)  # (P, L, D)
        self.pairs = None  # two-object captions naming the concept and their other object alone: (2, Q, L, D)
        if config.pair_fraction > 0:
            pairs = concept.scene_pairs(256, ctx.seed, swap=config.pair_target == "swap")
            self.pairs = torch.stack([encode(pipe, [p for p, _ in pairs]), encode(pipe, [o for _, o in pairs])])
        self.empty = encode(pipe, [""])
        anchors = list(concept.anchors) if config.anchor_source in ("prompts", "both") else []
        if config.anchor_source == "captions":
            anchors = concept.anchor_captions(ctx.seed)
        self.anchor_prompts = encode(pipe, anchors) if anchors else None

    def attack_model(self):
        """The inner attack runs the UNet with the membrane on, as the erased model does."""
        self._on(True)
        return nullcontext(self.unet)

    def _on(self, on: bool) -> None:
        membrane.set_gates(self.unet, {MEMBRANE: 1.0 if on else 0.0})

    def _anchors(self, target: torch.Tensor, gen) -> torch.Tensor:
        cfg = self.config
        parts = [] if cfg.anchor_source == "captions" else [self.empty]
        if cfg.anchor_source in ("random", "both"):
            tokens = random_anchors(token_rows(target, self.unet), cfg.anchor_samples, gen)
            parts.append(with_tokens(tokens, self.empty, self.unet))  # SDXL: the empty prompt's packed rows
        if self.anchor_prompts is not None:
            idx = torch.randint(len(self.anchor_prompts), (cfg.anchor_samples,), generator=gen)
            parts.append(self.anchor_prompts[idx])
        return torch.cat(parts)  # (A, L, D)

    def loss(self, gen: torch.Generator) -> torch.Tensor:
        cfg = self.config
        idx = torch.randint(len(self.targets), (cfg.batch_size,), generator=gen)
        tar, sur = self.targets[idx], self.surrogate[idx]  # (B, L, D) ×2
        eta = torch.full((cfg.batch_size,), cfg.eta)
        if self.pairs is not None:  # some rows: a pair naming the concept → its other object alone
            use = torch.rand(cfg.batch_size, generator=gen) < cfg.pair_fraction
            pick = torch.randint(self.pairs.shape[1], (cfg.batch_size,), generator=gen)
            tar = torch.where(use.view(-1, 1, 1), self.pairs[0][pick], tar)
            sur = torch.where(use.view(-1, 1, 1), self.pairs[1][pick], sur)
            eta = torch.where(use, cfg.pair_eta, cfg.eta)
        stop = int(torch.randint(1, cfg.ddim_steps, (1,), generator=gen))
        anc = self._anchors(self.targets[idx[0]], gen)  # (A, L, D)
        own = cfg.anchor_latents == "own"
        cond = torch.cat([tar, anc]) if own else tar
        self._on(True)  # x_t is sampled with the membrane on (SPM train loop)
        z, t = partial_ddim(self.unet, self.sampler, cond, self.empty.expand_as(cond), n_steps=cfg.ddim_steps,
                            stop_at=stop, guidance=cfg.start_guidance, gen=gen)
        z, za = z.split([len(tar), len(anc)]) if own else (z, z[:1].expand(len(anc), -1, -1, -1))
        tb, ta = t.expand(len(tar)).to(z.device), t.expand(len(anc)).to(z.device)
        self._on(False)
        with torch.no_grad():
            eps = denoise(self.unet, torch.cat([z, z, za]), torch.cat([tb, tb, ta]), torch.cat([tar, sur, anc]))
            eps_tar, eps_sur, eps_anc = eps.split([len(tar), len(tar), len(anc)])
        self._on(True)
        if self.adversary is not None:  # --adversarial: the membrane sees the attacked prompts (pair rows stay)
            attacked = self.attacked(self.targets[idx], idx)
            tar = attacked if self.pairs is None else torch.where(use.view(-1, 1, 1), tar, attacked)
        out = denoise(self.unet, torch.cat([z, za]), torch.cat([tb, ta]), torch.cat([tar, anc]))
        spm_tar, spm_anc = out.split([len(tar), len(anc)])
        return erase_loss(spm_tar, eps_tar, eps_sur, eta).mean() + cfg.anchor_weight * anchor_loss(spm_anc, eps_anc).mean()

    # -- what the training loop needs -----------------------------------------------------------------------------
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        # SPM: AdamW, weight decay 1e-2
        return {"opt": self.make_optimizer(self.params.values(), lr=self.config.lr, weight_decay=1e-2, decoupled=True)}

    def artifact(self, model_id: str) -> tuple[dict, dict, dict]:
        """Kohya-keyed membrane tensors, our metadata, and the original release's three header strings."""
        tensors = membrane.state_dict(self.unet, MEMBRANE)
        paths = [k[: -len(".alpha")] for k in tensors if k.endswith(".alpha")]
        targets = list(self.concept.names)  # what facilitated transport compares prompts with: the concept(s)
        meta = run_metadata(self, "membrane", model_id, membrane.layers_fingerprint(self.unet),
                            surrogate=self.concept.surrogate, layers=len(paths), targets=targets)
        extra = {"prompts": ",".join(targets), "rank": str(self.config.rank), "alpha": str(self.config.alpha)}
        return tensors, meta, extra
