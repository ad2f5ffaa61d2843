"""Text conditioning shared by every method: what the UNet sees for a list of prompts."""

from __future__ import annotations

import torch


def encode(pipe, prompts: list[str]) -> torch.Tensor:
    """The UNet's text conditioning for ``prompts`` (B, 77, D), for SD and SDXL pipelines (no CFG duplication)."""
    with torch.no_grad():
        return pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0]
