"""What every fine-tuning erasure method shares: parameter selection, the frozen reference, partial sampling,
the training loop (accelerate, progress, resumable checkpoints), and the weight-delta artifact.

A method subclasses :class:`FineTuneMethod` and provides ``trainable_names()`` and ``loss(gen)``.
"""

from __future__ import annotations

import math
import sys
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

from adapters.artifact import load_artifact, module_fingerprint, save_artifact
from adapters.errors import UserError
from adapters.saliency import SaliencyMask, load_mask


def check_trainable_pipeline(pipe) -> None:
    """Training calls the UNet with text conditioning only: SD 1.x / 2.x. SDXL's extra conditioning is not wired."""
    if getattr(pipe.unet.config, "addition_embed_type", None):
        raise UserError(f"training on {type(pipe).__name__} (SDXL-style added conditioning) is not supported yet; "
                        "use an SD 1.x / 2.x model (SDXL artifacts can still be loaded and applied)")


@contextmanager
def swapped(module: torch.nn.Module, values: dict[str, torch.Tensor]):
    """Temporarily give named parameters other values (e.g. the frozen originals) without copying the module."""
    params = dict(module.named_parameters())
    saved = {n: params[n].data for n in values}
    try:
        for n, v in values.items():
            params[n].data = v
        yield module
    finally:
        for n, v in saved.items():
            params[n].data = v


def cfg_eps(unet, z, t, cond, uncond, scale: float) -> torch.Tensor:
    """Classifier-free-guided ε: ε(∅) + s·(ε(c) − ε(∅)), one pass when s = 1 (as diffusers' pipelines).
    z (B, 4, h, w); t a scalar or (B,); cond, uncond (B, 77, D)."""
    if scale == 1.0:
        return unet(z, t, cond).sample
    t = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim else t
    e_u, e_c = unet(torch.cat([z, z]), t, torch.cat([uncond, cond])).sample.chunk(2)
    return e_u + scale * (e_c - e_u)


@torch.no_grad()
def ddim_steps(unet, scheduler, z, cond, uncond, timesteps, guidance: float) -> torch.Tensor:
    """DDIM (η = 0, CFG) from z (B, 4, h, w) through ``timesteps`` of ``scheduler`` → z (B, 4, h, w)."""
    for t in timesteps:
        z = scheduler.step(cfg_eps(unet, z, t, cond, uncond, guidance), t, z).prev_sample
    return z


@torch.no_grad()
def partial_ddim(unet, scheduler, cond, uncond, *, n_steps: int, stop_at: int, guidance: float, gen) -> tuple:
    """Run ``stop_at`` of ``n_steps`` DDIM steps (η = 0, CFG) from pure noise → (z_t, t). z_t (B, 4, h, w)."""
    scheduler.set_timesteps(n_steps)
    c, s = unet.config.in_channels, unet.config.sample_size
    z = torch.randn((cond.shape[0], c, s, s), generator=gen).to(cond.device, cond.dtype) * scheduler.init_noise_sigma
    z = ddim_steps(unet, scheduler, z, cond, uncond, scheduler.timesteps[:stop_at], guidance)
    return z, scheduler.timesteps[stop_at]


class FineTuneMethod(ABC):
    """Base of methods that fine-tune UNet weights and ship the change as a ``weight_delta`` artifact."""

    name = "base"

    def __init__(self, pipe, concept, config, run):
        check_trainable_pipeline(pipe)
        self.pipe, self.concept, self.config, self.run = pipe, concept, config, run
        self.unet = pipe.unet
        names = self.trainable_names()
        if not names:
            raise UserError(f"{self.name}: the selection '{getattr(config, 'variant', '?')}' matches no UNet parameter")
        self.unet.requires_grad_(False)
        params = dict(self.unet.named_parameters())
        self.params = {n: params[n] for n in names}
        for p in self.params.values():
            p.requires_grad_(True)
        # the frozen originals θ₀ of the trainable weights (the rest of the UNet is shared, never copied)
        self.original = {n: p.detach().clone() for n, p in self.params.items()}
        self.mask: SaliencyMask | None = None
        self.mask_source: str | None = None
        if getattr(run, "mask", None):
            self.use_mask(load_mask(run.mask, self.unet), source=str(run.mask))

    # -- to override -------------------------------------------------------------------------------------------
    @abstractmethod
    def trainable_names(self) -> list[str]:
        """Names of the UNet parameters this method trains."""

    @abstractmethod
    def loss(self, gen: torch.Generator) -> torch.Tensor:
        """One step's scalar loss; all randomness drawn from ``gen`` (resumable, deterministic)."""

    # -- shared ------------------------------------------------------------------------------------------------
    def frozen(self):
        """Context: the UNet with its original weights θ₀ (the frozen reference model)."""
        return swapped(self.unet, self.original)

    def use_mask(self, mask: SaliencyMask, source: str | None = None) -> None:
        """Confine training to the mask's weights (a SalUn saliency mask as a plug-in): gradients are gated by hooks,
        so with Adam (no weight decay) every other weight stays exactly θ₀; parameters the mask does not cover are
        frozen."""
        self.mask = mask.restricted(self.params)
        self.mask_source = source
        if self.mask.kept == 0:
            raise UserError(f"{self.name}: the saliency mask keeps none of the weights this method trains "
                            f"({getattr(self.config, 'variant', '')}); use a mask made for these parameters")
        for n, p in self.params.items():
            p.register_hook(lambda g, n=n: self.mask.gate(n, g))

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.params.values(), lr=lr)  # ESD / SalUn: Adam, no weight decay

    def shipped_names(self) -> list[str]:
        """The parameters the artifact carries: all trained ones, or with a mask those it keeps any weight of."""
        if self.mask is None:
            return list(self.params)
        return [n for n in self.params if n in self.mask.masks and bool(self.mask.masks[n].any())]

    def delta(self) -> dict[str, torch.Tensor]:
        """θ − θ₀ of the shipped parameters; with a mask, exactly 0 outside it."""
        out = {n: (self.params[n].detach() - self.original[n]).to(torch.float32) for n in self.shipped_names()}
        return {n: self.mask.gate(n, d) for n, d in out.items()} if self.mask is not None else out

    def artifact(self, model_id: str) -> tuple[dict, dict, dict | None]:
        """(tensors, metadata, extra header strings) of the artifact this run ships."""
        return self.delta(), self.metadata(model_id), None

    def metadata(self, model_id: str) -> dict:
        names = self.shipped_names()
        extra = {}
        if self.mask is not None:
            extra["mask"] = {"source": self.mask_source, "kept_fraction": round(self.mask.fraction, 6),
                             "fraction": self.mask.metadata.get("fraction"), "concept": self.mask.metadata.get("concept")}
        return run_metadata(self, "weight_delta", model_id, module_fingerprint(self.unet, names), target="unet", **extra)


def mask_path(output: Path) -> Path:
    """Where a run that computes a saliency mask writes it: beside its artifact, ``<name>.mask.safetensors``."""
    return output.with_name(output.name.removesuffix(".safetensors") + ".mask.safetensors")


def run_metadata(method, kind: str, model_id: str, fingerprint: str, **extra) -> dict:
    """The metadata every trained artifact carries (DESIGN §3 rule 3): what was erased, how, and from which model."""
    return {
        "kind": kind,
        "method": method.name,
        "config": asdict(method.config),
        "concept": method.concept.name,
        "prompts": list(method.concept.prompts),
        "base_model": {"id": model_id, "fingerprint": fingerprint},
        **extra,
    }


# ---------------------------------------------------------------------------------------------------------------
# training loop


def _checkpoint_path(output: Path) -> Path:
    return output.with_name(output.name + ".ckpt.safetensors")


def optimizer_tensors(opt, named: Iterable[tuple[str, torch.Tensor]], prefix: str) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as checkpoint tensors ``PREFIX/NAME/KEY``."""
    return {f"{prefix}/{n}/{k}": v for n, p in named for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)}


def restore_optimizer(opt, named: Iterable[tuple[str, torch.Tensor]], tensors: dict, prefix: str) -> None:
    """The inverse of :func:`optimizer_tensors`."""
    for n, p in named:
        state = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{prefix}/{n}/")}
        if state:
            opt.state[p] = state


def save_checkpoint(path: Path, method_name: str, config, tensors: dict, step: int, gen: torch.Generator,
                    history: list) -> None:
    meta = {"kind": "checkpoint", "checkpoint": {"step": step, "history": history}, "method": method_name,
            "config": asdict(config)}
    save_artifact(path, {**tensors, "rng": gen.get_state()}, meta)


@contextmanager
def read_checkpoint(path: Path, config, gen: torch.Generator):
    """Open a checkpoint of this run configuration → (tensors, step, history); restores ``gen``. A checkpoint of
    another configuration, or one that lacks what this run needs, is a one-line UserError."""
    art = load_artifact(path, kind="checkpoint")
    ck = art.metadata.get("checkpoint")
    if not ck or art.metadata.get("config") != asdict(config):
        raise UserError(f"{path}: checkpoint of another run configuration; delete it or drop --resume")
    try:
        yield art.tensors, int(ck["step"]), list(ck["history"])
        gen.set_state(art.tensors["rng"])
    except KeyError as e:
        raise UserError(f"{path}: incomplete checkpoint (no {e}); delete it or drop --resume") from None


def _save_checkpoint(path: Path, method: FineTuneMethod, opt, step: int, gen: torch.Generator, history: list) -> None:
    tensors = {f"param/{n}": p.detach() for n, p in method.params.items()}
    tensors.update(optimizer_tensors(opt, method.params.items(), "opt"))
    save_checkpoint(path, method.name, method.config, tensors, step, gen, history)


def _load_checkpoint(path: Path, method: FineTuneMethod, opt, gen: torch.Generator) -> tuple[int, list]:
    with read_checkpoint(path, method.config, gen) as (tensors, step, history):
        with torch.no_grad():
            for n, p in method.params.items():
                p.copy_(tensors[f"param/{n}"])
        restore_optimizer(opt, method.params.items(), tensors, "opt")
    return step, history


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` of ``steps``: "constant" 1, or "cosine" from 1 down to 0."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))
    return 1.0


def fit(method: FineTuneMethod, *, steps: int, lr: float, output: Path, seed: int, accelerator,
        checkpoint_every: int = 100, resume: bool = False, quiet: bool = False, log_every: int = 25) -> list[float]:
    """Train ``method`` for ``steps`` Adam steps → loss history. Checkpoints next to ``output``; ``resume`` continues
    bit-identically on CPU (parameters, optimiser moments and the random state are all restored)."""
    gen = torch.Generator().manual_seed(seed)
    opt = method.optimizer(lr)
    ckpt = _checkpoint_path(output)
    start, history = 0, []
    if resume and ckpt.exists():
        start, history = _load_checkpoint(ckpt, method, opt, gen)
    bar = tqdm(total=steps, initial=start, desc=f"{method.name} {method.concept.name}", dynamic_ncols=True,
               disable=quiet or not sys.stderr.isatty())
    t0 = time.time()
    schedule = getattr(getattr(method, "config", None), "lr_schedule", "constant")
    for step in range(start, steps):
        for group in opt.param_groups:  # a function of the step alone: resuming needs no scheduler state
            group["lr"] = lr * lr_factor(schedule, step, steps)
        with accelerator.autocast():
            loss = method.loss(gen)
        if not torch.isfinite(loss):
            raise UserError(f"{method.name}: the loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        opt.step()
        history.append(round(loss.item(), 6))
        bar.update()
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if not quiet and bar.disable and (step + 1) % log_every == 0:  # log lines where there is no bar
            print(f"step {step + 1}/{steps} loss {history[-1]:.5f} ({time.time() - t0:.0f} s)", file=sys.stderr)
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_checkpoint(ckpt, method, opt, step + 1, gen, history)
    bar.close()
    return history


def remove_checkpoint(output: Path) -> None:
    _checkpoint_path(output).unlink(missing_ok=True)
