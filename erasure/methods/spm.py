"""One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing Applications
(SPM; Lyu et al., CVPR 2024), arXiv 2312.16145.

A rank-1 membrane on every Linear / Conv2d of the UNet's transformer blocks is trained with

    L = L_era + λ · L_anc                                                              (paper Eq. 8)
    L_era = ‖ε_SPM(x_t, c_tar) − [ε(x_t, c_sur) − η (ε(x_t, c_tar) − ε(x_t, c_sur))]‖²       (Eq. 4)
    L_anc = E_{c ~ anchors} ‖ε_SPM(x_t, c) − ε(x_t, c)‖²                                  (Eqs. 5–7)

where ε is the original model (membrane off) and x_t comes from partial DDIM sampling (30 steps, CFG 3) with the
membrane on, conditioned on the target. Anchors, as the SPM code samples them (not as the paper words it): random
Gaussian directions in text-embedding space (all 77 positions), rescaled to ‖c_tar‖ · U[0.8, 1.2], plus the empty
prompt, all evaluated at the target's x_t. Options beyond the code (``SPMConfig``):

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

import torch

from adapters import membrane
from adapters.errors import UserError
from erasure.methods.base import check_trainable_pipeline, partial_ddim, run_metadata
from pipelines.text import encode

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


def anchor_captions(concept, seed: int, n: int = 512) -> list[str]:
    """``anchor_source="captions"``: on the toy world, ``n`` captions of scenes that do not show the concept (single
    objects, aliases and pairs, every colour and fill); elsewhere the preset's anchor prompts."""
    if not concept.is_toy:
        return list(concept.anchors)
    import numpy as np

    from erasure.toyworld import data

    return data.captions_without(concept.name, n, np.random.default_rng(seed))


def membrane_paths(unet, layers: str) -> list[str] | None:
    """``layers``: None for every target layer ("all"), else the paths of the cross-attention key / value
    projections ("cross-kv"), which see each text token on its own."""
    if layers == "all":
        return None
    return [p for p in membrane.target_layers(unet) if p.endswith(("attn2.to_k", "attn2.to_v"))]


def check_config(config, concept) -> None:
    """Refuse bad SPM options before any model is loaded (one line each)."""
    if not 0.0 <= config.pair_fraction <= 1.0:
        raise UserError(f"--pair-fraction must be between 0 and 1 (got {config.pair_fraction})")
    if config.pair_fraction > 0:
        _need_toy(concept, "--pair-fraction", "two-object captions come from the toy world")
    if config.steer == "swap":
        _need_toy(concept, "--steer swap", "it swaps the toy concept's word for its substitute's")


def _need_toy(concept, option: str, why: str) -> None:
    if not concept.is_toy:
        raise UserError(f"spm: {option} needs a toy concept ({why})")


def swap_word(concept, prompts: list[str]) -> list[str]:
    """Each toy prompt with the concept's word replaced by its substitute's ("a red circle" → "a red square")."""
    from erasure.concepts import toy_word
    from erasure.toyworld import data

    word = toy_word(concept, concept.substitute, "spm: the substitute")
    return [data.swap_word(p, concept.name, word) for p in prompts]


def pair_prompts(concept, seed: int, n: int = 256, swap: bool = False) -> list[tuple[str, str]]:
    """``pair_fraction``: ``n`` toy two-object captions naming the concept, each with its other object alone (or, with
    ``swap``, the caption with the concept's word swapped for the substitute's)."""
    _need_toy(concept, "--pair-fraction", "two-object captions come from the toy world")
    import numpy as np

    from erasure.toyworld import data

    rng = np.random.default_rng(seed + 1)
    pairs = [data.concept_pair(concept.name, rng) for _ in range(n)]
    if swap:
        captions = [p for p, _ in pairs]
        pairs = list(zip(captions, swap_word(concept, captions)))
    return pairs


class SPM:
    """Trains one membrane on ``pipe.unet``; its parameters are the membrane's lora_down / lora_up."""

    name = "spm"

    def __init__(self, pipe, concept, config, run):
        from diffusers import DDIMScheduler

        check_trainable_pipeline(pipe)
        self.pipe, self.concept, self.config, self.run = pipe, concept, config, run
        self.unet = pipe.unet
        self.unet.requires_grad_(False)
        init = torch.Generator().manual_seed(run.seed)  # the membrane's lora_down init: same seed, same membrane
        branches = membrane.attach(self.unet, MEMBRANE, rank=config.rank, alpha=config.alpha,
                                   layers=membrane_paths(self.unet, config.layers), generator=init)
        self.params = {f"{p}.{k}": v for p, b in branches.items() for k, v in b.named_parameters()}
        self.sampler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.targets = encode(pipe, list(concept.prompts))  # (P, L, D)
        if config.steer == "swap":  # each target prompt → itself with the substitute's word: (P, L, D)
            self.surrogate = encode(pipe, swap_word(concept, list(concept.prompts)))
        else:
            self.surrogate = encode(pipe, [concept.surrogate]).expand(len(self.targets), -1, -1)  # (P, L, D)
        self.pairs = None  # two-object captions naming the concept and their other object alone: (2, Q, L, D)
        if config.pair_fraction > 0:
            pairs = pair_prompts(concept, run.seed, swap=config.pair_target == "swap")
            self.pairs = torch.stack([encode(pipe, [p for p, _ in pairs]), encode(pipe, [o for _, o in pairs])])
        self.empty = encode(pipe, [""])
        anchors = list(concept.anchors) if config.anchor_source in ("prompts", "both") else []
        if config.anchor_source == "captions":
            anchors = anchor_captions(concept, run.seed)
        self.anchor_prompts = encode(pipe, anchors) if anchors else None

    def _on(self, on: bool) -> None:
        membrane.set_gates(self.unet, {MEMBRANE: 1.0 if on else 0.0})

    def _anchors(self, target: torch.Tensor, gen) -> torch.Tensor:
        cfg = self.config
        parts = [] if cfg.anchor_source == "captions" else [self.empty]
        if cfg.anchor_source in ("random", "both"):
            parts.append(random_anchors(target, cfg.anchor_samples, gen))
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
            eps = self.unet(torch.cat([z, z, za]), torch.cat([tb, tb, ta]), torch.cat([tar, sur, anc])).sample
            eps_tar, eps_sur, eps_anc = eps.split([len(tar), len(tar), len(anc)])
        self._on(True)
        out = self.unet(torch.cat([z, za]), torch.cat([tb, ta]), torch.cat([tar, anc])).sample
        spm_tar, spm_anc = out.split([len(tar), len(anc)])
        return erase_loss(spm_tar, eps_tar, eps_sur, eta).mean() + cfg.anchor_weight * anchor_loss(spm_anc, eps_anc).mean()

    # -- what the training loop and the CLI need ------------------------------------------------------------------
    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.params.values(), lr=lr, weight_decay=1e-2)  # SPM: AdamW(8bit), wd 1e-2

    def artifact(self, model_id: str) -> tuple[dict, dict, dict]:
        """Kohya-keyed membrane tensors, our metadata, and the original release's three header strings."""
        tensors = membrane.state_dict(self.unet, MEMBRANE)
        paths = [k[: -len(".alpha")] for k in tensors if k.endswith(".alpha")]
        targets = [self.concept.name]  # what facilitated transport compares prompts with: the concept itself
        meta = run_metadata(self, "membrane", model_id, membrane.layers_fingerprint(self.unet),
                            surrogate=self.concept.surrogate, layers=len(paths), targets=targets)
        extra = {"prompts": ",".join(targets), "rank": str(self.config.rank), "alpha": str(self.config.alpha)}
        return tensors, meta, extra
