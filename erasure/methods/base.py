"""The Method protocol every erasure method implements, and what the methods share: sampling helpers, the frozen
reference, parameter selection and the weight-delta artifact.

A method is one class in one file (plus one line in :data:`erasure.methods.METHODS`)::

    class MyMethod(Method):
        name = "mine"                      # --method mine
        config_class = MyConfig            # a dataclass; its fields become --options, its defaults the paper's
        toy_defaults = {"steps": 200}      # what the toy world trains with (only where the user set nothing)

        def __init__(self, pipe, concept, config, ctx): ...     # build tensors; write no files
        def loss(self, gen) -> torch.Tensor: ...                 # one step's scalar loss, randomness from gen
        def artifact(self, model_id): ...                        # (tensors, metadata, extra header strings)

The one fit loop (:func:`erasure.engine.fit`) owns accelerate, the progress bar, resumable checkpoints and the
run record. A method with its own update schedule (SFD's two optimisers) overrides the :meth:`Method.train_step`
hook instead of writing a second loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from copy import deepcopy
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler

from adapters.artifact import SpilledTensors, module_fingerprint
from adapters.errors import UserError
from adapters.saliency import SaliencyMask
from erasure.optim import make_optimizer
from erasure.sharding import full, like, shard
from pipelines.text import denoise


@dataclass(frozen=True)
class Context:
    """What a method learns about its run besides its config: the seed, the base model's id (for metadata and
    caches), the accelerator (processes, autocast), and whether to stay quiet."""

    seed: int = 0
    model_id: str = ""
    accelerator: Any = None
    quiet: bool = True
    optimizer: str = "adam"  # the method's own Adam / AdamW, or a memory lever (erasure.optim)
    allow_tf32: bool = False  # the user allowed TF32 matmuls (SFD otherwise turns them off, as SiD)
    scratch: str | None = None  # a folder for temporary files (spilled originals); default: the working folder


class Method(ABC):
    """The protocol of an erasure method (see the module docstring). ``params`` holds the trained tensors by name."""

    name: ClassVar[str]
    title: ClassVar[str]  # one line for --help: what it trains, and the paper
    config_class: ClassVar[type]
    toy_defaults: ClassVar[dict] = {}  # applied on the toy world, below the preset's and the user's values
    writes_folder: ClassVar[bool] = False  # the result is a pipeline folder (SFD), not a .safetensors file
    maskable: ClassVar[bool] = False  # a saliency mask (--mask) can confine its training
    computes_mask: ClassVar[bool] = False  # it makes its own saliency mask before training (SalUn)
    shardable: ClassVar[bool] = False  # it implements shard() (--fsdp)

    adversarial: ClassVar[bool] = False  # it trains on inner-attack prompts (--adversarial): implements attacked()
    one_step: ClassVar[bool] = False  # it trains a one-step generator: the inner attack targets generate(z, cond)
    params: dict[str, torch.Tensor]
    sharding = None  # an erasure.sharding.Sharding once shard() has run
    adversary = None  # an erasure.adversarial.Adversary under --adversarial

    def __init__(self, pipe, concept, config, ctx: Context):
        self.pipe, self.concept, self.config, self.ctx = pipe, concept, config, ctx
        self.unet = pipe.unet

    @classmethod
    def check(cls, config, concept) -> None:
        """Refuse bad options before any model is loaded (a one-line UserError each)."""

    # -- training: the fit loop calls these ---------------------------------------------------------------------
    def loss(self, gen: torch.Generator) -> torch.Tensor:
        """One step's scalar loss; all randomness drawn from ``gen`` (resumable, deterministic). The default
        :meth:`train_step` calls it; a method that overrides :meth:`train_step` (SFD, the closed-form UCE) needs none."""
        raise NotImplementedError(f"{type(self).__name__} defines neither loss() nor train_step()")

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimisers, by name (the checkpoint's key prefix). Default: Adam over ``params``, no weight decay."""
        return {"opt": self.make_optimizer(self.params.values(), lr=self.config.lr)}

    def make_optimizer(self, params, **hyper) -> torch.optim.Optimizer:
        """The run's kind of optimiser (``--optimizer``: the paper's Adam / AdamW, factored, 8-bit) with the method's
        hyper-parameters (``lr``, ``betas``, ``eps``, ``weight_decay``, ``decoupled`` for AdamW)."""
        return make_optimizer(self.ctx.optimizer, params, **hyper)

    # -- adversarial erasure (--adversarial): the inner attack and the outer loss meet here ----------------------
    def adversarial_texts(self) -> list[str]:
        """The prompts whose embeddings the loss indexes with :meth:`attacked` (default: the concept's prompts)."""
        return list(self.concept.prompts)

    def attack_model(self):
        """Context → the UNet as the trained model runs it (SPM: with its membrane on), for the inner attack."""
        return nullcontext(self.unet)

    def attacked(self, clean: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """What the trained model is conditioned on for the prompts ``idx`` of :meth:`adversarial_texts`: their
        ``clean`` embeddings, or, once the inner attack has run, the prompts behind its adversarial prefix."""
        if self.adversary is None or self.adversary.delta is None:
            return clean
        texts = self.adversarial_texts()
        return self.adversary.encode([texts[int(i)] for i in idx]).to(clean.dtype)

    # -- memory levers: the engine calls these after construction ------------------------------------------------
    def frozen_modules(self) -> list[torch.nn.Module]:
        """Networks whose frozen weights mixed precision holds in half precision: the UNet's untrained weights and
        the text encoder(s) and VAE, idle once the method is built."""
        p = self.pipe
        return [m for m in (p.unet, getattr(p, "text_encoder", None), getattr(p, "text_encoder_2", None), p.vae)
                if m is not None]

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Mixed precision: every frozen weight in ``dtype``; what trains (``params``) stays fp32 (the master
        weights)."""
        trained = {id(p) for p in getattr(self, "params", {}).values()}
        for module in self.frozen_modules():
            cast_frozen(module, dtype, keep=trained)

    def trained_modules(self) -> list[torch.nn.Module]:
        """The networks gradients flow through (gradient checkpointing is enabled on them)."""
        return [self.unet]

    def shard(self, sharding) -> None:
        """``--fsdp``: shard the networks it trains (and large frozen ones) with :func:`erasure.sharding.shard`, then
        point ``params`` at the sharded parameters. Called after the levers and the mask, before the optimisers."""
        raise UserError(f"{self.name}: --fsdp is not supported")

    def after_backward(self) -> None:
        """Hook between the backward pass and the optimiser step (a sharded run gates its gradients here)."""

    def train_step(self, gen: torch.Generator, optimizers: dict, accelerator, step: int) -> float | dict:
        """Hook: one training iteration → its logged loss(es). Default: one loss, one backward, one step of the
        single optimiser. Methods with several networks or optimisers (SFD) override this, not the loop."""
        (opt,) = optimizers.values()
        with accelerator.autocast():
            loss = self.loss(gen)
        if not torch.isfinite(loss):
            raise UserError(f"{self.name}: the loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        self.after_backward()
        optimizer_step(accelerator, opt)
        opt.zero_grad(set_to_none=True)  # gradients are not kept between steps
        return round(loss.item(), 6)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of the method besides its optimisers (the trained tensors, and the inner
        attack's latest prefix)."""
        out = {f"param/{n}": p.detach() for n, p in self.params.items()}
        if self.adversary is not None and self.adversary.delta is not None:
            out["adversary/delta"] = self.adversary.delta
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"param/{n}"])
        if self.adversary is not None and "adversary/delta" in tensors:
            self.adversary.delta = tensors["adversary/delta"]

    # -- the result ---------------------------------------------------------------------------------------------
    @abstractmethod
    def artifact(self, model_id: str) -> tuple[Any, dict, dict | None]:
        """(tensors, metadata, extra header strings) of a file artifact, or (pipeline, metadata, None) when
        ``writes_folder``."""

    def summary(self) -> dict:
        """Extra entries for the run record (e.g. the saliency mask in use)."""
        return {}

    def close(self) -> None:
        """Remove the run's temporary files (the engine calls this when the run ends, also on failure)."""


def optimizer_step(accelerator, opt: torch.optim.Optimizer) -> None:
    """``opt.step()``, through accelerate's gradient scaler when fp16 mixed precision scaled the loss."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        opt.step()
        return
    scaler.step(opt)  # unscales, skips the step on inf / NaN gradients
    scaler.update()


@contextmanager
def tf32(enabled: bool | None):
    """TF32 matmuls and convolutions on (``--allow-tf32``) or off (SiD / SFD, unless allowed) while the block runs;
    ``None`` leaves them as they are. The caller's settings afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if enabled is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype, keep: set[int] = frozenset()) -> None:
    """Cast ``module``'s floating parameters and buffers to ``dtype`` in place, except the parameters whose ``id``
    is in ``keep`` (the trained ones) and the buffers of modules holding any of those (a membrane's alpha)."""
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if id(p) not in keep and p.is_floating_point():
                p.data = p.data.to(dtype)
        trains = any(id(p) in keep for p in m.parameters())
        for name, b in m.named_buffers(recurse=False):
            if b.is_floating_point() and not trains:
                m._buffers[name] = b.to(dtype)


def run_metadata(method: Method, kind: str, model_id: str, fingerprint: str, **extra) -> dict:
    """The metadata every trained artifact carries (DESIGN §3 rule 3): what was erased, how, and from which model."""
    return {
        "kind": kind,
        "method": method.name,
        "config": asdict(method.config),
        "concept": method.concept.name,
        **({"concepts": list(method.concept.names)} if method.concept.members else {}),
        "prompts": list(method.concept.prompts),
        "base_model": {"id": model_id, "fingerprint": fingerprint},
        **extra,
    }


# ---------------------------------------------------------------------------------------------------------------
# sampling helpers


def cfg_eps(unet, z, t, cond, uncond, scale: float) -> torch.Tensor:
    """Classifier-free-guided ε: ε(∅) + s·(ε(c) − ε(∅)), one pass when s = 1 (as diffusers' pipelines). The UNet's
    own output kind (ε, or v for v-prediction): guidance is the same affine combination for either.
    z (B, 4, h, w); t a scalar or (B,); cond, uncond (B, L, D) from :func:`pipelines.text.encode`."""
    if scale == 1.0:
        return denoise(unet, z, t, cond)
    t = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim else t
    e_u, e_c = denoise(unet, torch.cat([z, z]), t, torch.cat([uncond, cond])).chunk(2)
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


def ddim_sampler(pipe) -> DDIMScheduler:
    """A DDIM scheduler with the pipeline's noise schedule (for partial sampling and teacher samples)."""
    return DDIMScheduler.from_config(pipe.scheduler.config)


def add_noise(scheduler, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward noising x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε with ``scheduler``'s ᾱ (diffusers' ``add_noise``, in x₀'s dtype).
    x0, noise (B, 4, h, w); t (B,)."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(x0.device)
    return scheduler.add_noise(x0, noise, t)


# ---------------------------------------------------------------------------------------------------------------
# fine-tuning methods: they train UNet weights and ship θ − θ₀ as a ``weight_delta`` artifact


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


class FineTuneMethod(Method):
    """Base of methods that fine-tune UNet weights (ESD, SalUn): ``trainable_names()`` picks them, a saliency mask
    can confine them, and the artifact is θ − θ₀ of the shipped ones."""

    maskable = True
    shardable = True
    uses_reference: ClassVar[bool] = True  # its loss runs the frozen model θ₀ (ESD); SalUn's does not

    def __init__(self, pipe, concept, config, ctx: Context):
        super().__init__(pipe, concept, config, ctx)
        self.component = self.trained_component()
        self.module = getattr(pipe, self.component)  # the network it fine-tunes: the UNet, or the text encoder
        names = self.trainable_names()
        if not names:
            raise UserError(f"{self.name}: the selection '{getattr(config, 'variant', '?')}' matches no parameter")
        self.unet.requires_grad_(False)
        self.module.requires_grad_(False)
        params = dict(self.module.named_parameters())
        self.params = {n: params[n] for n in names}
        for p in self.params.values():
            p.requires_grad_(True)
        # the frozen originals θ₀ of the trainable weights (the rest of the UNet is shared, never copied)
        self.original = {n: p.detach().clone() for n, p in self.params.items()}
        self.reference = self.original  # what frozen() runs: θ₀, or θ₀ in half precision under mixed precision
        self.mask: SaliencyMask | None = None
        self.mask_source: str | None = None

    def trained_component(self) -> str:
        """The pipeline component it fine-tunes (its artifact's ``target``): "unet", or "text_encoder"."""
        return "unet"

    @abstractmethod
    def trainable_names(self) -> list[str]:
        """Names of the parameters of :meth:`trained_component` this method trains."""

    def compute_mask(self) -> SaliencyMask:
        """The method's own saliency mask at θ₀ (methods with ``computes_mask``)."""
        raise NotImplementedError

    def frozen(self):
        """Context → the frozen reference model: the UNet with its original weights θ₀ swapped in (sharded: a
        sharded copy of it)."""
        if self.sharding is not None:
            return nullcontext(self.reference_net)
        if self.component != "unet":  # the UNet is not trained: it is its own frozen reference
            return nullcontext(self.unet)
        return swapped(self.unet, self.reference)

    def shard(self, sharding) -> None:
        """The UNet sharded; the frozen reference θ₀ (when the loss runs it) becomes a sharded copy of the UNet in
        the reference's precision; the exact fp32 θ₀ for θ − θ₀ waits on disk, on the main process only; a mask
        gates the sharded gradients in :meth:`after_backward`."""
        if self.component != "unet":
            raise UserError(f"{self.name}: --fsdp shards the UNet; this run trains the {self.component}: drop --fsdp")
        if self.uses_reference:
            ref = deepcopy(self.unet).requires_grad_(False)
            ref_params = dict(ref.named_parameters())
            for n, v in self.reference.items():
                ref_params[n].data = v
            self.reference_net = shard(ref, sharding)
        self.reference = {}
        shard(self.unet, sharding)
        params = dict(self.unet.named_parameters())
        self.params = {n: params[n] for n in self.params}
        if self.mask is not None:
            self.mask_shards = {n: like(self.params[n], m) for n, m in self.mask.masks.items() if n in self.params}
        main = self.ctx.accelerator is None or self.ctx.accelerator.is_main_process
        if not main:
            self.close()
            self.original = {}
        elif not isinstance(self.original, SpilledTensors):
            self.original = SpilledTensors(self.original, self.ctx.scratch or ".")
        self.sharding = sharding

    def after_backward(self) -> None:
        if self.sharding is None or self.mask is None:
            return  # unsharded, the mask's hooks gated the gradients as they were computed
        for n, p in self.params.items():
            if p.grad is not None:
                if n in self.mask_shards:
                    p.grad.mul_(self.mask_shards[n])
                else:
                    p.grad.zero_()

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Mixed precision: besides the frozen networks, the frozen reference θ₀ runs in ``dtype`` (when the loss
        uses it), and the exact fp32 θ₀ that the final θ − θ₀ needs waits on disk, not in memory."""
        super().cast_frozen(dtype)
        self.reference = {n: v.to(dtype) for n, v in self.original.items()} if self.uses_reference else {}
        self.original = SpilledTensors(self.original, self.ctx.scratch or ".")

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

    def close(self) -> None:
        if isinstance(self.original, SpilledTensors):
            self.original.close()

    def shipped_names(self) -> list[str]:
        """The parameters the artifact carries: all trained ones, or with a mask those it keeps any weight of."""
        if self.mask is None:
            return list(self.params)
        return [n for n in self.params if n in self.mask.masks and bool(self.mask.masks[n].any())]

    def delta(self) -> dict[str, torch.Tensor]:
        """θ − θ₀ of the shipped parameters; with a mask, exactly 0 outside it."""
        out = {}
        for n in self.shipped_names():
            theta = full(self.params[n].detach())  # sharded: gathered by every process, kept by the main one
            if n in self.original:
                out[n] = theta.float() - self.original[n].to(theta.device).float()
        return {n: self.mask.gate(n, d) for n, d in out.items()} if self.mask is not None else out

    def artifact(self, model_id: str) -> tuple[dict, dict, None]:
        names = self.shipped_names()
        extra = {}
        if self.mask is not None:
            extra["mask"] = {"source": self.mask_source, "kept_fraction": round(self.mask.fraction, 6),
                             "fraction": self.mask.metadata.get("fraction"), "concept": self.mask.metadata.get("concept")}
        meta = run_metadata(self, "weight_delta", model_id, module_fingerprint(self.module, names),
                            target=self.component, **extra)
        return self.delta(), meta, None

    def summary(self) -> dict:
        if self.mask is None:
            return {}
        return {"mask": {"path": self.mask_source, **self.mask.summary(self.mask_source)}}
