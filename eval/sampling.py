"""Sampling with a *composition* of text conditions (:class:`Sampler`), as the attacks and the relearning
measurement use it, and :class:`frozen`, which stops modules' parameters requiring gradients inside a block.
Re-exported by :mod:`eval.attacks`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from adapters.errors import UserError
from pipelines import prediction
from pipelines.one_step import one_step_latents
from pipelines.text import encode


def is_one_step(pipe) -> bool:
    return hasattr(pipe, "generate_latents")


class Sampler:
    """DDIM sampling (the pipeline's scheduler, η = 0) with a *composition* of conditions per image:
    ε = ε(∅) + Σᵢ wᵢ·(ε(cᵢ) − ε(∅)); one condition at weight ``guidance`` is ordinary CFG and reproduces the pipeline.
    A one-step student makes one generator call with ε composed the same way, the weights divided by ``guidance``."""

    def __init__(self, pipe, *, steps: int = 25, guidance: float = 7.5, batch_size: int = 32):
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise UserError("attacks support SD 1.x / 2.x pipelines and one-step students, not SDXL")
        self.pipe, self.steps, self.guidance, self.batch_size = pipe, steps, guidance, batch_size
        self.device = getattr(pipe, "device", torch.device("cpu"))
        self._uncond = None

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text conditioning (B, L, D) through the pipeline's own encoder (so membranes' transport sees the tokens)."""
        return encode(self.pipe, list(prompts))

    @property
    def uncond(self) -> torch.Tensor:
        if self._uncond is None:
            self._uncond = self.embed([""])
        return self._uncond

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Per-image initial noise drawn on the CPU from its seed, as :func:`eval.generate.generate` draws it."""
        cfg = self.pipe.unet.config
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def _context(self, terms, n: int) -> tuple[torch.Tensor, list[float]]:
        """One conditioning tensor for every step ([∅, c₁, …], each repeated n times; transport scores its rows
        once) and the composition's weights."""
        dtype = self.pipe.unet.dtype
        conds = [e.to(self.device, dtype).expand(n, -1, -1) for e, _ in terms]
        uncond = self.uncond.to(self.device, dtype).expand(n, -1, -1)
        return torch.cat([uncond, *conds]), [float(w) for _, w in terms]

    @torch.no_grad()
    def latents(self, terms: Sequence[tuple[torch.Tensor, float]], seeds: Sequence[int],
                start: torch.Tensor | None = None) -> torch.Tensor:
        """Clean latents for a composition ``terms`` = [(embeds (B, L, D), weight), ...], one image per seed (B), or
        sampled from the given noisy latents ``start`` (B, C, h, w) (e.g. an inverted image) instead of the seeds'."""
        dtype = self.pipe.unet.dtype
        z = self.noise(seeds).to(self.device, dtype) if start is None else start.to(self.device, dtype)
        context, weights = self._context(terms, len(z))
        if is_one_step(self.pipe):
            t = int(self.pipe.config.init_timestep)
            one_step_weights = [w / self.guidance for w in weights]
            return one_step_latents(lambda x: self._composed(x.to(dtype), t, context, one_step_weights), z,
                                    self.pipe.scheduler.alphas_cumprod[t].to(self.device, torch.float32),
                                    self.pipe.prediction_type)
        sched = self.pipe.scheduler
        sched.set_timesteps(self.steps)
        z = z * sched.init_noise_sigma if start is None else z
        for t in sched.timesteps:
            eps = self._composed(sched.scale_model_input(z, t), t, context, weights)
            z = sched.step(eps, t, z).prev_sample
        return z

    def _composed(self, z, t, context, weights) -> torch.Tensor:
        k = len(weights) + 1
        out = self.pipe.unet(z.repeat(k, 1, 1, 1), t, context).sample.chunk(k)
        eps = out[0].clone()
        for w, e in zip(weights, out[1:]):
            eps += w * (e - out[0])
        return eps

    @torch.no_grad()
    def invert(self, latents: torch.Tensor, terms: Sequence[tuple[torch.Tensor, float]],
               seeds: Sequence[int]) -> torch.Tensor:
        """DDIM inversion (η = 0) of clean ``latents`` (B, C, h, w) under the composition ``terms``: the noisy
        latents from which :meth:`latents` (``start=``) regenerates them, run backwards through the same timesteps
        (ε at each level taken at the level below, as DDIM inversion does). A one-step student has no trajectory:
        its input is the latents noised to its t_init by the forward process, with the ``seeds``' noise."""
        dtype = self.pipe.unet.dtype
        z = latents.to(self.device, dtype)
        if is_one_step(self.pipe):  # x_t = √ᾱ x₀ + √(1−ᾱ) ε, and the student's input is x_t / √(1−ᾱ)
            a = self.pipe.scheduler.alphas_cumprod[int(self.pipe.config.init_timestep)].float()
            noise = self.noise(seeds).to(self.device)
            return ((a / (1 - a)).sqrt() * z.float() + noise).to(dtype)
        context, weights = self._context(terms, len(z))
        sched = self.pipe.scheduler
        sched.set_timesteps(self.steps)
        abar = sched.alphas_cumprod.to(self.device, torch.float32)
        kind = sched.config.get("prediction_type", "epsilon")
        a_prev = torch.as_tensor(getattr(sched, "final_alpha_cumprod", abar[0]), dtype=torch.float32)
        for t in sched.timesteps.flip(0):
            out = self._composed(z, t, context, weights).float()
            eps = prediction.to_eps(out, z.float(), abar[t], kind)
            x0 = (z.float() - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            a_prev = abar[t]
            z = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).to(dtype)
        return z

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N, H, W, 3) → the VAE's latents (N, C, h, w) (the posterior's mean, scaled)."""
        vae = self.pipe.vae
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device, vae.dtype)
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        x = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()
        return ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def images(self, terms: Sequence[tuple[torch.Tensor, float]], seeds: Sequence[int]) -> np.ndarray:
        out = [self.decode(self.latents(terms, seeds[i : i + self.batch_size]))
               for i in range(0, len(seeds), self.batch_size)]
        return np.concatenate(out)

    def prompt_images(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        """Ordinary CFG images, one per (prompt, seed): batched over prompts."""
        return self.embed_images(prompts, seeds, self.embed)

    def embed_images(self, rows, seeds: Sequence[int], embed=lambda chunk: chunk) -> np.ndarray:
        """Ordinary CFG images, one per (row, seed), batched: rows are prompts (with ``embed=self.embed``) or text
        conditioning rows (B, L, D) given directly."""
        out = []
        for i in range(0, len(rows), self.batch_size):
            cond = embed(rows[i : i + self.batch_size])
            out.append(self.decode(self.latents([(cond, self.guidance)], list(seeds[i : i + self.batch_size]))))
        return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


class frozen:
    """Modules' parameters stop requiring gradients inside the block (an attack differentiates through them, it does
    not train them); restored after."""

    def __init__(self, *modules):
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self):
        self.saved = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, r in zip(self.params, self.saved):
            p.requires_grad_(r)
