"""Relearning: fine-tune an erased model on a few images of its erased concept and count the steps until the concept
comes back (its rate on the concept's prompts passes 50 %), as FreezeAsGuard and follow-ups measure.

    python -m eval.relearn --model toy --artifact circle-esd.safetensors --concept circle
    python -m eval.relearn --model students/circle-sfd --concept circle          # a one-step student

The attacker fine-tunes every UNet weight (membranes included) with AdamW on N toy-world data images of the concept
captioned with the concept's prompts: the diffusion loss ‖ε_θ(x_t, t, c) − ε‖² for a multi-step model, the
generator's regression loss ‖x_g(z, c) − x₀‖² for a one-step student (it has no other training signal without a
teacher). Every ``every`` steps the concept rate is measured with the judge on the concept's prompts (fixed seeds);
``steps_to_relearn`` is the first measured step where it passes the threshold (None: not within ``max_steps``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import pipelines
from adapters.artifact import load_artifact
from adapters.errors import UserError, user_errors
from erasure import toyworld
from erasure.concepts import TOY_MODEL, resolve
from erasure.toyworld.models import GUIDANCE as TOY_GUIDANCE
from eval.attacks import EVAL_OFFSET, Sampler, frozen, is_one_step
from eval.toy import toy_reference_images
from pipelines import prediction
from pipelines.load import quiet_loading


def relearn_loss(pipe, x0: torch.Tensor, cond: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One fine-tuning loss on clean latents x0 (B, C, h, w) with text conditioning cond (B, L, D)."""
    unet = pipe.unet
    noise = torch.randn(x0.shape, generator=gen)
    if is_one_step(pipe):
        return (pipe.generate_latents(noise, cond.to(unet.dtype)) - x0).pow(2).mean()
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
    x_t = pipe.scheduler.add_noise(x0, noise, t)
    a = pipe.scheduler.alphas_cumprod[t].to(noise).view(-1, 1, 1, 1)
    goal = prediction.target(x0, noise, a, prediction.prediction_type_of(pipe))  # ε, or v for v-prediction
    return (unet(x_t.to(unet.dtype), t, cond.to(unet.dtype)).sample.float() - goal).pow(2).mean()


def relearn(pipe, latents: torch.Tensor, captions: Sequence[str], measure: Callable[[object], float], *,
            max_steps: int = 200, every: int = 10, lr: float = 1e-4, batch_size: int = 4, threshold: float = 0.5,
            seed: int = 0, progress: bool = False) -> dict:
    """Fine-tune ``pipe.unet`` on (latents, captions) until ``measure(pipe)`` > threshold → the curve and the step."""
    sampler = Sampler(pipe)
    cond_all = sampler.embed(list(captions))
    gen = torch.Generator().manual_seed(seed)
    params = list(pipe.unet.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    curve = [(0, measure(pipe))]
    found = 0 if curve[0][1] > threshold else None
    bar = tqdm(total=max_steps, desc="relearn", disable=not progress)
    step = 0
    with frozen(pipe.text_encoder):
        while found is None and step < max_steps:
            pipe.unet.train()
            idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
            loss = relearn_loss(pipe, latents[idx], cond_all[idx], gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step % every == 0:
                pipe.unet.eval()
                curve.append((step, measure(pipe)))
                if curve[-1][1] > threshold:
                    found = step
    bar.close()
    pipe.unet.eval()
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
    return {"steps_to_relearn": found, "curve": [[s, round(r, 4)] for s, r in curve], "max_steps": max_steps,
            "every": every, "lr": lr, "batch_size": batch_size, "threshold": threshold, "images": len(latents)}


def toy_relearn(pipe, concept: str, *, images: int = 16, measure_prompts: int = 16, steps: int = 25,
                guidance: float | None = None, seed: int = 0, judge=None, **kwargs) -> dict:
    """Relearning on the toy world: ``images`` data images of the concept (drawn for its target prompts and captioned
    with them), the concept rate measured on ``measure_prompts`` of those prompts (one image each, fixed seeds)."""
    judge = judge or toyworld.load_judge()
    records = toyworld.prompts(concept, seed)["target"]
    train = [records[i % len(records)] for i in range(images)]
    pixels = torch.from_numpy(toy_reference_images(train, seed + 7)).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
    texts = [r.text for r in records[:measure_prompts]]
    seeds = [seed + EVAL_OFFSET + i for i in range(len(texts))]
    g = float(TOY_GUIDANCE) if guidance is None else guidance

    def measure(p) -> float:
        imgs = Sampler(p, steps=steps, guidance=g, batch_size=64).prompt_images(texts, seeds)
        return float(np.mean([s.has(concept) for s in judge.classify(imgs)]))

    return relearn(pipe, latents, [r.text for r in train], measure, seed=seed, **kwargs)


DESCRIPTION = """\
Relearning: fine-tune every UNet weight of an erased toy-world model (membranes included; AdamW) on a few images of
its erased concept, captioned with the concept's prompts, and report the first step at which the concept's rate on
its prompts passes 50 % (measured by the toy judge every --every steps, on fixed seeds), as FreezeAsGuard and
follow-ups measure. A one-step student is fine-tuned with its generator's regression loss. Prints JSON."""

EXAMPLES = """\
Examples:
  python -m eval.relearn --concept circle --artifact outputs/circle-spm.safetensors
  python -m eval.relearn --model outputs/circle-sfd --concept circle      # a one-step student"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.relearn", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy")
    p.add_argument("--artifact", action="append", default=[], help="erasure artifact(s) to apply (repeatable)")
    p.add_argument("--concept", required=True, help="a toy concept")
    p.add_argument("--images", type=int, default=16, help="concept images the attacker fine-tunes on")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--every", type=int, default=10, help="measure the concept rate every N steps")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if min(args.images, args.max_steps, args.every, args.batch_size) < 1 or args.lr <= 0:
            raise UserError("--images, --max-steps, --every and --batch-size must be ≥ 1 and --lr > 0")
        if not resolve(args.concept, TOY_MODEL).is_toy:
            raise UserError(f"relearning is measured on the toy world; '{args.concept}' is not a toy concept")
        arts = [load_artifact(a) for a in args.artifact]  # bad files are refused before any model loads
        if args.quiet:
            quiet_loading()
        t0 = time.time()
        pipe = pipelines.load(args.model)
        pipelines.apply(pipe, *arts)
        with user_errors(FileNotFoundError):  # missing toy-world weights: one line, exit 2
            res = toy_relearn(pipe, args.concept, images=args.images, max_steps=args.max_steps, every=args.every,
                              lr=args.lr, batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = {"model": args.model, "artifacts": args.artifact, "concept": args.concept, **res,
           "seconds": round(time.time() - t0, 1)}
    print(json.dumps(res, indent=None if args.quiet else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
