"""One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing Applications
(SPM; Lyu et al., CVPR 2024), arXiv 2312.16145.

A rank-1 membrane on every Linear / Conv2d of the UNet's transformer blocks is trained with

    L = L_era + λ · L_anc                                                              (paper Eq. 8)
    L_era = ‖ε_SPM(x_t, c_tar) − [ε(x_t, c_sur) − η (ε(x_t, c_tar) − ε(x_t, c_sur))]‖²       (Eq. 4)
    L_anc = E_{c ~ anchors} ‖ε_SPM(x_t, c) − ε(x_t, c)‖²                                  (Eqs. 5–7)

where ε is the original model (membrane off) and x_t comes from partial DDIM sampling (30 steps, CFG 3) with the
membrane on, conditioned on the target. Anchors, as the SPM code samples them (not as the paper words it): random
Gaussian directions in text-embedding space (all 77 positions), rescaled to ‖c_tar‖ · U[0.8, 1.2], plus the empty
prompt; here optionally also the preset's anchor prompts (``anchor_source``).
"""

from __future__ import annotations

import torch

from adapters import membrane
from erasure.methods.base import check_trainable_pipeline, partial_ddim, run_metadata
from pipelines.text import encode

MEMBRANE = "spm"  # the name of the membrane being trained on the UNet's layers


def erase_loss(eps_spm_tar, eps_tar, eps_sur, eta: float) -> torch.Tensor:
    """Eq. 4, per sample: (B, 4, h, w) ×3 → (B,)."""
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
        branches = membrane.attach(self.unet, MEMBRANE, rank=config.rank, alpha=config.alpha, generator=init)
        self.params = {f"{p}.{k}": v for p, b in branches.items() for k, v in b.named_parameters()}
        self.sampler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.targets = encode(pipe, list(concept.prompts))  # (P, L, D)
        self.surrogate = encode(pipe, [concept.surrogate])  # (1, L, D)
        self.empty = encode(pipe, [""])
        anchors = list(concept.anchors) if config.anchor_source in ("prompts", "both") else []
        self.anchor_prompts = encode(pipe, anchors) if anchors else None

    def _on(self, on: bool) -> None:
        membrane.set_gates(self.unet, {MEMBRANE: 1.0 if on else 0.0})

    def _anchors(self, target: torch.Tensor, gen) -> torch.Tensor:
        cfg, parts = self.config, [self.empty]
        if cfg.anchor_source in ("random", "both"):
            parts.append(random_anchors(target, cfg.anchor_samples, gen))
        if self.anchor_prompts is not None:
            idx = torch.randint(len(self.anchor_prompts), (cfg.anchor_samples,), generator=gen)
            parts.append(self.anchor_prompts[idx])
        return torch.cat(parts)  # (A, L, D)

    def loss(self, gen: torch.Generator) -> torch.Tensor:
        cfg = self.config
        idx = torch.randint(len(self.targets), (cfg.batch_size,), generator=gen)
        tar = self.targets[idx]  # (B, L, D)
        sur = self.surrogate.expand_as(tar)
        stop = int(torch.randint(1, cfg.ddim_steps, (1,), generator=gen))
        self._on(True)  # x_t is sampled with the membrane on (SPM train loop)
        z, t = partial_ddim(self.unet, self.sampler, tar, self.empty.expand_as(tar), n_steps=cfg.ddim_steps,
                            stop_at=stop, guidance=cfg.start_guidance, gen=gen)
        anc = self._anchors(self.targets[idx[0]], gen)
        za = z[:1].expand(len(anc), -1, -1, -1)
        tb, ta = t.expand(len(tar)).to(z.device), t.expand(len(anc)).to(z.device)
        self._on(False)
        with torch.no_grad():
            eps = self.unet(torch.cat([z, z, za]), torch.cat([tb, tb, ta]), torch.cat([tar, sur, anc])).sample
            eps_tar, eps_sur, eps_anc = eps.split([len(tar), len(tar), len(anc)])
        self._on(True)
        out = self.unet(torch.cat([z, za]), torch.cat([tb, ta]), torch.cat([tar, anc])).sample
        spm_tar, spm_anc = out.split([len(tar), len(anc)])
        return erase_loss(spm_tar, eps_tar, eps_sur, cfg.eta).mean() + cfg.anchor_weight * anchor_loss(spm_anc, eps_anc).mean()

    # -- what the training loop and the CLI need ------------------------------------------------------------------
    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.params.values(), lr=lr, weight_decay=1e-2)  # SPM: AdamW(8bit), wd 1e-2

    def artifact(self, model_id: str) -> tuple[dict, dict, dict]:
        """Kohya-keyed membrane tensors, our metadata, and the original release's three header strings."""
        tensors = membrane.state_dict(self.unet, MEMBRANE)
        paths = [k[: -len(".alpha")] for k in tensors if k.endswith(".alpha")]
        meta = run_metadata(self, "membrane", model_id, membrane.layers_fingerprint(self.unet),
                            surrogate=self.concept.surrogate, layers=len(paths))
        extra = {"prompts": ",".join(self.concept.prompts), "rank": str(self.config.rank), "alpha": str(self.config.alpha)}
        return tensors, meta, extra
