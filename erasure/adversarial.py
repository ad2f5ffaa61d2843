"""Adversarial erasure (AdvUnlearn, Zhang et al., NeurIPS 2024), for any method that declares ``adversarial``:

    min_θ  ℓ_erase(θ; c*) + γ ℓ_retain(θ)      with   c* = [δ*; c],   δ* = argmin_δ ℓ_attack(θ; [δ; c])

Every ``every`` steps after a ``warmup`` of plain erasure, the inner attack searches k continuous token embeddings δ,
prepended after the start token of the concept's prompts (AdvUnlearn's ``word_embd`` attack, ``prefix_k``), that
bring the concept back on the *current* model; the method's erasure loss then trains on the attacked prompts in place
of the plain ones (its frozen targets still come from the plain prompts), plus the method's retain regulariser.

The inner objective is UnlearnDiffAtk's: the current model's denoising loss on images of the concept, conditioned on
[δ; c] (AdvUnlearn's own, ‖ε_θ(x_t, [δ; c]) − ε₀(x_t, c)‖², needs the frozen model, which SPM and SalUn do not keep).
A one-step generator (SFD's student) has no denoising loss of its own: δ makes its output from fresh noise z match an
image of the concept, ‖G(z, [δ; c]) − x₀‖², as :class:`eval.attacks.UnlearnDiffAtk` attacks a one-step student.
δ starts each round from random vocabulary embeddings (the README's ``--attack_init random``); Adam, no norm bound.
Each round's randomness comes from (seed, step) alone, so a resumed run attacks exactly as an uninterrupted one.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from adapters.errors import UserError
from erasure.data import Sampling
from pipelines import prediction
from pipelines.soft_prompt import encode_with_soft, prefixed_ids


@dataclass(frozen=True)
class AttackSettings:
    """The inner attack and the retain term. Defaults: AdvUnlearn.py at 9d23124 / its README command."""

    every: int = 1  # adv_prompt_update_step: a new attack every iteration
    steps: int = 30  # attack_step
    lr: float = 1e-3  # attack_lr (Adam)
    tokens: int = 1  # adv_prompt_num: k prefix vectors
    warmup: int = 200  # iterations of plain erasure before the first attack
    retain_weight: float = 0.3  # γ, retain_loss_w (README command): ESD's retain term (SPM, SalUn keep their own)
    images: int = 8  # images of the concept the inner attack denoises
    t_batch: int = 4  # diffusion timesteps per attack step


# the toy world's 2.4 M-parameter models train in 200-400 steps: attack every 5th, from step 40, with a larger step
TOY_SETTINGS = {"every": 5, "steps": 10, "lr": 2e-2, "warmup": 40, "retain_weight": 1.0, "images": 16}


def settings(on_toy: bool, explicit: dict) -> AttackSettings:
    """AdvUnlearn's settings < the toy world's (on ``--model toy``) < the user's (``None``: unset)."""
    s = AttackSettings(**(TOY_SETTINGS if on_toy else {}))
    s = AttackSettings(**{**s.__dict__, **{k: v for k, v in explicit.items() if v is not None}})
    if min(s.every, s.steps, s.tokens, s.images, s.t_batch) < 1 or s.warmup < 0 or s.lr <= 0 or s.retain_weight < 0:
        raise UserError("--attack-every, --attack-steps, --attack-tokens, --attack-images must be ≥ 1, "
                        "--attack-warmup and --retain-weight ≥ 0, --attack-lr > 0")
    return s


class Adversary:
    """The inner attack on a method being trained. ``method`` supplies ``attack_model()`` (a context giving the
    current model's UNet, e.g. with SPM's membrane on), ``adversarial_texts()`` (the prompts its loss conditions on)
    and its concept's images (:meth:`erasure.concepts.Concept.concept_latents`); a ``one_step`` method (SFD) also
    ``generate(z, cond)``, its generator's clean latents."""

    def __init__(self, method, s: AttackSettings, seed: int):
        pipe = method.pipe
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise UserError("--adversarial: the inner attack prepends tokens for one text encoder; SDXL's two are "
                            "not supported (SD 1.x / 2.x are)")
        self.method, self.s, self.seed = method, s, seed
        self.pipe, self.tok, self.te = pipe, pipe.tokenizer, pipe.text_encoder
        ctx = method.ctx
        sampling = Sampling(model_id=ctx.model_id, quiet=ctx.quiet)  # real concepts: 50 DDIM steps, CFG 7.5, cached
        latents, self.captions = method.concept.concept_latents(pipe, s.images, seed + 5, sampling)
        self.latents = latents.to(pipe.unet.device, torch.float32)
        self.schedule = pipe.scheduler
        self.kind = prediction.prediction_type_of(pipe.scheduler)
        self.table = self.te.get_input_embeddings().weight
        self.allowed = torch.ones(len(self.table), dtype=torch.bool)
        self.allowed[list(self.tok.all_special_ids)] = False
        self.delta: torch.Tensor | None = None  # the latest δ* (k, D)
        self.last: dict = {}

    def due(self, step: int) -> bool:
        return step >= self.s.warmup and (step - self.s.warmup) % self.s.every == 0

    def encode(self, texts: list[str], soft: torch.Tensor | None = None) -> torch.Tensor:
        """E([δ; text]) for each text (N, L, D) through the pipeline's text encoder as it is now (AdvUnlearn's
        E_θ when the method trains the encoder: gradients flow to its weights and to ``soft``)."""
        soft = self.delta if soft is None else soft
        return encode_with_soft(self.te, prefixed_ids(self.tok, texts, len(soft)), soft.to(self.table.dtype))

    def _denoising_loss(self, unet, soft: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, b = len(self.latents), self.s.t_batch
        pick = torch.randint(n, (b,), generator=gen)
        z0 = self.latents[pick]
        t = torch.randint(0, self.schedule.config.num_train_timesteps, (b,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen).to(z0)
        cond = self.encode([self.captions[int(i)] for i in pick], soft)
        if self.method.one_step:  # a one-step generator: its output from fresh noise should be the concept's image
            return (self.method.generate(noise, cond) - z0).pow(2).mean()
        x_t = self.schedule.add_noise(z0, noise, t.to(z0.device))
        out = unet(x_t.to(unet.dtype), t.to(z0.device), cond.to(unet.dtype)).sample.float()
        a = self.schedule.alphas_cumprod.to(z0.device)[t.to(z0.device)].view(-1, 1, 1, 1)
        return (out - prediction.target(z0, noise, a, self.kind)).pow(2).mean()

    def attack(self, step: int) -> dict:
        """One inner attack on the current model → δ* (kept for the outer steps) and its log: ``atk`` = how much
        lower the concept images' denoising loss is under [δ*; c] than under c (1 − loss(δ*) / loss(plain))."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        init = torch.nonzero(self.allowed).flatten()[torch.randint(int(self.allowed.sum()), (self.s.tokens,),
                                                                   generator=gen)]
        soft = self.table[init].detach().clone().float().requires_grad_(True)
        opt = torch.optim.Adam([soft], lr=self.s.lr)
        with self.method.attack_model() as unet, _no_param_grads(self.method):
            state = gen.get_state()
            with torch.no_grad():
                plain = float(self._denoising_loss(unet, torch.zeros(0, soft.shape[1]), _copy(state)))
                before = float(self._denoising_loss(unet, soft, _copy(state)))
            for _ in range(self.s.steps):
                loss = self._denoising_loss(unet, soft, gen)
                (grad,) = torch.autograd.grad(loss, [soft])
                soft.grad = grad
                opt.step()
            with torch.no_grad():
                after = float(self._denoising_loss(unet, soft, _copy(state)))
        self.delta = soft.detach()
        self.last = {"atk": round(1.0 - after / max(plain, 1e-12), 4)}
        self.last["atk_start"] = round(1.0 - before / max(plain, 1e-12), 4)
        return self.last


def _copy(state: torch.Tensor) -> torch.Generator:
    g = torch.Generator()
    g.set_state(state)
    return g


@contextmanager
def _no_param_grads(method):
    """The trained parameters (those of the method's trained networks that take gradients now: SPM's membrane, a
    fine-tune's weights, SFD's generator and fake score) take none while the inner attack differentiates through
    them."""
    params = [p for m in method.trained_modules() for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
