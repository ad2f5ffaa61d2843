"""Train an SPM membrane that erases "circle" from the toy world, then load it into a *plain* diffusers pipeline.

The membrane is one small ``.safetensors`` file in the kohya / SD-WebUI LoRA layout, so anything that reads LoRA
files reads it: here ``StableDiffusionPipeline.from_pretrained`` + ``load_lora_weights``, no toolkit code involved.
(Plain diffusers applies the membrane at a fixed strength; the toolkit's loader, ``pipelines.attach_membranes``,
adds facilitated transport — a per-prompt gate that leaves unrelated prompts alone — and stacking.)

    python examples/membrane_in_plain_diffusers.py               # trains with the toy defaults (~2 min on 2 cores)
    python examples/membrane_in_plain_diffusers.py --steps 20    # a quick look
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

import erasure
from erasure.toyworld import load_judge
from erasure.toyworld.models import GUIDANCE
from erasure.toyworld.paths import WEIGHTS_DIR


def train_membrane(output: Path, steps: int | None) -> None:
    erasure.erase("circle", method="spm", output=str(output), steps=steps, quiet=True)  # steps None: the default


def plain_diffusers_images(membrane: Path | None, prompts: list[str], seed: int = 0) -> np.ndarray:
    """Images from a plain diffusers pipeline (the toy world's folder), optionally with the membrane loaded."""
    pipe = StableDiffusionPipeline.from_pretrained(WEIGHTS_DIR / "pipeline", dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if membrane is not None:
        pipe.load_lora_weights(str(membrane))
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=25, guidance_scale=GUIDANCE, generator=gen, output_type="np").images


def run(steps: int | None, output: Path) -> dict:
    train_membrane(output, steps)
    prompts = ["a red circle", "a blue circle", "a sun", "a ball", "a green square", "a yellow star"]
    judge = load_judge()
    report = {}
    for name, path in (("base", None), ("membrane", output)):
        images = plain_diffusers_images(path, prompts)
        report[name] = {p: sorted(s.shapes) for p, s in zip(prompts, judge.classify((images * 255).round().astype(np.uint8)))}
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--output", type=Path, default=Path(tempfile.gettempdir()) / "circle-spm.safetensors")
    args = p.parse_args()
    print(json.dumps(run(args.steps, args.output), indent=2))
    sys.exit(0)
