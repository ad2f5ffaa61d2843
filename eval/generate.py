"""Seeded, batched image generation from any diffusers text-to-image pipeline.

Image ``i`` uses its own generator seeded with ``seed + i``, so an image does not depend on the batch it was made
in: the same prompt list and seed give the same images at any batch size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


def generate(pipe, prompts: Sequence[str], *, seed: int = 0, steps: int = 25, guidance: float = 7.5,
             batch_size: int = 64, negative_prompt: str | None = None, quiet: bool = True, **kwargs) -> np.ndarray:
    """Generate one image per prompt → uint8 array (N, H, W, 3)."""
    out = []
    device = getattr(pipe, "device", torch.device("cpu"))
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=quiet):
        chunk = list(prompts[start : start + batch_size])
        gens = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        latents = None
        if "latents" not in kwargs:  # draw per-image noise on the CPU: identical across devices and batch sizes
            shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
            latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, pipe.unet.dtype)
        images = pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance, output_type="np", latents=latents,
            negative_prompt=[negative_prompt] * len(chunk) if negative_prompt is not None else None, **kwargs,
        ).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)
