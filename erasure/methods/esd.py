"""Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023), arXiv 2303.07345.

The fine-tuned model θ learns to predict, for the concept c, what the frozen model θ* predicts under *negative*
guidance away from c:

    ε_θ(x_t, c, t)  ←  ε_θ*(x_t, t) − η · [ε_θ*(x_t, c, t) − ε_θ*(x_t, t)]            (paper Eq. 5 target)

x_t comes from partial DDIM sampling (η_DDIM = 0, CFG 3) conditioned on c, stopped at a random step of 50.
v-prediction models (SD 2.x 768) need no conversion: all outputs share x_t and t and the target's weights sum to 1, so
with ε = √(1−ᾱ_t) x_t + √ᾱ_t v the loss on v outputs is the ε loss divided by ᾱ_t (the sampler steps by the scheduler).
Variants by trained parameters: ESD-x (cross-attention ``attn2``; ``esd-x-strict``: its to_k / to_v only), ESD-u
(everything but cross-attention, time embedding and the output layers — ``noxattn`` of the paper code), ``full``,
``selfattn``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from erasure.config import option
from erasure.methods.base import FineTuneMethod, ddim_sampler, partial_ddim
from pipelines.text import denoise, encode

COCO_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
_ESD_U_EXCLUDE = ("attn2", "time_embedding", "conv_out", "conv_norm_out")  # paper code: attn2, time_embed, out.


@dataclass
class ESDConfig:
    """ESD (Gandikota et al., 2023). Defaults: paper / train-esd.py at 8725451 unless noted."""

    variant: str = option("esd-x", "parameters trained: esd-x (cross-attention), esd-x-strict (its to_k/to_v), esd-u "
                          "(all but cross-attention), full, selfattn, or text-encoder (AdvUnlearn's configuration: "
                          "the text encoder's layers, not the UNet; a plug-in text-encoder delta)",
                          choices=("esd-x", "esd-x-strict", "esd-u", "full", "selfattn", "text-encoder"))
    eta: float = option(1.0, "negative guidance η (paper: 1.0)")
    steps: int = option(1000, "iterations (paper: 1000)")
    lr: float = option(1e-5, "learning rate, Adam (paper: 1e-5)")
    batch_size: int = option(1, "prompts per step (paper: 1)")
    ddim_steps: int = option(50, "DDIM steps of the partial sampling that makes x_t (paper: 50)")
    start_guidance: float = option(3.0, "CFG scale of that sampling (paper: 3)")
    sample_with: str = option("trained", "model that samples x_t: 'trained' (paper code) or 'frozen' (diffusers code)",
                              choices=("trained", "frozen"))


def esd_loss(eps_theta: torch.Tensor, eps_star_c: torch.Tensor, eps_star_null: torch.Tensor, eta: float) -> torch.Tensor:
    """Eq. 5: ‖ε_θ(x_t,c,t) − (ε*(x_t,t) − η(ε*(x_t,c,t) − ε*(x_t,t)))‖², per sample. Inputs (B, 4, h, w) → (B,)."""
    target = eps_star_null - eta * (eps_star_c - eps_star_null)
    return ((eps_theta - target) ** 2).flatten(1).mean(1)


def select_parameters(unet: torch.nn.Module, variant: str) -> list[str]:
    names = [n for n, _ in unet.named_parameters()]
    if variant == "text-encoder":  # ``unet`` is the text encoder: its transformer layers and final norm
        return [n for n in names if "encoder.layers." in n or "final_layer_norm" in n]
    if variant == "esd-x":
        return [n for n in names if ".attn2." in n]
    if variant == "esd-x-strict":  # the diffusers code's esd-x-strict: the text-facing projections only
        return [n for n in names if ".attn2.to_k." in n or ".attn2.to_v." in n]
    if variant == "selfattn":
        return [n for n in names if ".attn1." in n]
    if variant == "esd-u":
        return [n for n in names if not any(k in n for k in _ESD_U_EXCLUDE)]
    if variant == "full":
        return names
    raise ValueError(f"unknown ESD variant {variant!r}")


RETAIN_BATCH = 5  # AdvUnlearn's retain_batch


def retain_prompts(concept) -> list[str]:
    """AdvUnlearn's retain set, "a photo of a {COCO object}" (its coco_object list filters 243 such prompts; here the
    80 COCO classes), without those naming the concept."""
    return [p for p in (f"a photo of a {o}" for o in COCO_OBJECTS) if not any(n in p for n in concept.names)]


class ESD(FineTuneMethod):
    name = "esd"
    adversarial = True
    title = "fine-tune UNet weights to negatively guide away from the concept (ESD, Gandikota et al. 2023)"
    config_class = ESDConfig
    # the toy world's 2.4 M-parameter UNet: larger lr, fewer steps, batches (docs/methods/esd.md)
    toy_defaults = {"steps": 200, "lr": 1e-4, "batch_size": 8, "ddim_steps": 25, "variant": "esd-u"}

    def __init__(self, pipe, concept, config, ctx):
        super().__init__(pipe, concept, config, ctx)
        self.sampler = ddim_sampler(pipe)
        self.prompt_embeds = encode(pipe, list(concept.prompts))  # (P, 77, D)
        self.null_embed = encode(pipe, [concept.surrogate])  # (1, 77, D): "" → unconditional

    def trained_component(self) -> str:
        return "text_encoder" if self.config.variant == "text-encoder" else "unet"

    def trainable_names(self) -> list[str]:
        return select_parameters(self.module, self.config.variant)

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.module] if self.component != "unet" else [self.unet]

    def _theta(self, clean: torch.Tensor, texts: list[str], idx: torch.Tensor, attack: bool = True) -> torch.Tensor:
        """The trained model's conditioning for prompts ``idx`` of ``texts``: the attacked prompts under
        --adversarial (``attack``: the concept's prompts); the trained text encoder's E_θ(c) (with gradients) for
        the text-encoder variant; else the ``clean`` embeddings."""
        if attack and self.adversary is not None and self.adversary.delta is not None:
            return self.attacked(clean, idx)
        if self.component == "unet":
            return clean
        tok = self.pipe.tokenizer
        ids = tok([texts[int(i)] for i in idx], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        return self.module(ids.to(self.module.device))[0].to(clean.dtype)

    def loss(self, gen: torch.Generator) -> torch.Tensor:
        """Eq. 5 on the concept's prompts; under --adversarial the trained model sees them behind the inner attack's
        prefix, and AdvUnlearn's retain term γ‖ε_θ(x_t^r, c_r) − ε₀(x_t^r, c_r)‖² over ``RETAIN_BATCH`` retain
        prompts is added, their x_t^r sampled in the same pass."""
        cfg, b = self.config, self.config.batch_size
        idx = torch.randint(len(self.prompt_embeds), (b,), generator=gen)
        cond = self.prompt_embeds[idx]  # (B, 77, D)
        rows, r_idx = cond, None
        if self.adversary is not None:
            self._retain_set()
            r_idx = torch.randint(len(self.retain_embeds), (RETAIN_BATCH,), generator=gen)
            rows = torch.cat([cond, self.retain_embeds[r_idx]])
        null = self.null_embed.expand_as(rows)
        stop = int(torch.randint(cfg.ddim_steps, (1,), generator=gen))
        with self.frozen() if cfg.sample_with == "frozen" else nullcontext(self.unet) as net:
            z, t = partial_ddim(net, self.sampler, rows, null, n_steps=cfg.ddim_steps, stop_at=stop,
                                guidance=cfg.start_guidance, gen=gen)
        t = t.expand(len(rows)).to(z.device)
        with torch.no_grad(), self.frozen() as frozen:
            e_null, e_c = denoise(frozen, torch.cat([z, z]), torch.cat([t, t]), torch.cat([null, rows])).chunk(2)
        theta = self._theta(cond, list(self.concept.prompts), idx)
        if r_idx is not None:
            theta = torch.cat([theta, self._theta(rows[b:], self.retain_texts, r_idx, attack=False)])
        e_theta = denoise(self.unet, z, t, theta)
        loss = esd_loss(e_theta[:b], e_c[:b], e_null[:b], cfg.eta).mean()
        if r_idx is not None:
            loss = loss + self.adversary.s.retain_weight * ((e_theta[b:] - e_c[b:]) ** 2).mean()
        return loss

    def _retain_set(self) -> None:
        """AdvUnlearn's retain prompts, encoded once: toy, captions without the concept; else "a photo of a {COCO
        object}"."""
        if not hasattr(self, "retain_embeds"):
            texts = (self.concept.anchor_captions(self.ctx.seed + 3, 256) if self.concept.is_toy
                     else retain_prompts(self.concept))
            self.retain_embeds, self.retain_texts = encode(self.pipe, texts), texts
