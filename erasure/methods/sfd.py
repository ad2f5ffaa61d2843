"""Score Forgetting Distillation (Chen et al., ICLR 2025, arXiv 2409.11219), on Score identity Distillation (SiD,
Zhou et al. 2024) with long-and-short guidance (SiD-LSG).

Three copies of the teacher UNet: the frozen teacher f_φ, a fake score f_ψ and a one-step generator G_θ. G maps noise
to a clean latent in one evaluation at t_init (σ_init ≈ 2.5):

    x = √(1−ᾱ_init)·z,    x_g = (x − √(1−ᾱ_init)·G(x, t_init, c)) / √ᾱ_init

Each iteration updates f_ψ (``fake_steps`` times; 1 in SiD), then G, on a *remain* batch (prompts of what must keep
working) and a *forget* batch:

    L_ψ = Σ_{c ∈ {c_r, c_f}} ‖ε_ψ^{κ1}(x_t, t, c) − ε‖²,   x_t from sg(x_g(c))                     (denoising)
    L_G = Σ (y_real − y_fake) ⊙ ((y_real − x_g) − α (y_real − y_fake)) / w,   w = sg(mean|x_g − y_real|)    (SiD)

with y_fake = x̂₀ of f_ψ^{κ2}(x_t, t, c) and y_real = x̂₀ of f_φ^{κ4}(x_t, t, c′): on the remain batch c′ = c = c_r;
on the forget batch G and f_ψ see the forget prompt c_f and the *teacher* sees the override prompt c_s — so G under c_f
is pulled toward the teacher's p(x | c_s) and never learns the concept. Data-free: only prompts are used.

Data parallel without DDP wrappers: every process draws the same global batch from the same seeded generator and
takes its own rows; gradients (per-process losses normalised by the local batch) are averaged across processes, so
N processes follow a 1-process run with the same global batch.
"""

from __future__ import annotations

import re
import sys
import time
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import torch

from adapters.artifact import module_fingerprint
from adapters.errors import UserError
from erasure.methods.base import (cfg_eps, check_trainable_pipeline, ddim_steps, optimizer_tensors, read_checkpoint,
                                   restore_optimizer, run_metadata, save_checkpoint)
from pipelines.text import encode


# ---------------------------------------------------------------------------------------------------------------
# the equations


def one_step(G, z: torch.Tensor, cond: torch.Tensor, abar: torch.Tensor, t_init: int) -> torch.Tensor:
    """x_g = (x − √(1−ᾱ)·G(x, t_init, c)) / √ᾱ with x = √(1−ᾱ)·z. z (B, 4, h, w) → x_g (B, 4, h, w), fp32."""
    a = abar[t_init]
    x = (1 - a).sqrt() * z
    t = torch.full((len(z),), t_init, device=z.device)
    eps = G(x.to(_dtype(G)), t, cond).sample.float()
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def eps_guided(net, x_t, t, cond, uncond, kappa: float) -> torch.Tensor:
    """``cfg_eps`` at κ, run in the network's dtype. x_t (B, 4, h, w); t (B,); cond, uncond (B, 77, D)
    → (B, 4, h, w), fp32."""
    return cfg_eps(net, x_t.to(_dtype(net)), t, cond, uncond, kappa).float()


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, in fp32 (ᾱ_t of shape (B, 1, 1, 1))."""
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def sid_generator_loss(x_g, y_real, y_fake, alpha: float) -> torch.Tensor:
    """SiD: Σ (y_real − y_fake)((y_real − x_g) − α(y_real − y_fake)) / w per sample, w = sg(mean|x_g − y_real|).
    (B, 4, h, w) ×3 → (B,); only w is detached, so the gradient reaches G through x_g and through both scores' input."""
    w = (x_g - y_real).abs().mean(dim=(1, 2, 3), keepdim=True).detach().clamp_min(1e-5)
    return ((y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / w).flatten(1).sum(1)


def fake_score_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Denoising score matching on detached generator samples: Σ_{CHW} (ε_ψ − ε)², per sample (B,)."""
    return ((eps_pred - eps) ** 2).flatten(1).sum(1)


def regression_loss(x_g: torch.Tensor, x_teacher: torch.Tensor) -> torch.Tensor:
    """DMD's regression term: Σ_{CHW} (G(z) − x_φ(z))², per sample (B,); x_φ(z) is the teacher's sample from z."""
    return ((x_g - x_teacher) ** 2).flatten(1).sum(1)


@torch.no_grad()
def teacher_samples(unet, scheduler_config, z, cond, null, kappa: float, steps: int = 25) -> torch.Tensor:
    """Deterministic DDIM samples of the teacher from the initial noise z with CFG κ: z (B, 4, h, w), cond (B, 77, D)
    → clean latents (B, 4, h, w), fp32, in batches of 32."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    return torch.cat([ddim_steps(unet, sched, z[i : i + 32] * sched.init_noise_sigma, cond[i : i + 32],
                                 null.expand_as(cond[i : i + 32]), sched.timesteps, kappa).float()
                      for i in range(0, len(z), 32)])


def _dtype(net) -> torch.dtype:
    return next(net.parameters()).dtype


def _finite_mean(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Σ of the finite per-sample losses / n (non-finite rows dropped, as the SiD code does)."""
    ok = torch.isfinite(rows)
    return rows[ok].sum() / n


@contextmanager
def no_tf32():
    """SiD / SFD turn TF32 and reduced-precision reductions off; restore the caller's settings afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------------------------
# prompts (data-free: the method sees prompts only)


def override_of(prompt: str, concept: str, override: str) -> str:
    """The override prompt of a forget prompt: the concept's words replaced (SFD celebrity recipe), or the override
    prompt itself when the forget prompt does not name the concept (nudity: the bare subject)."""
    pattern = re.compile(re.escape(concept), re.IGNORECASE)
    return pattern.sub(override, prompt) if pattern.search(prompt) else override


def toy_prompts(concept, n: int, seed: int, override: str | None = None):
    """Toy world: remain prompts = captions without the concept; forget / override pairs = captions naming it (a
    quarter of them two-object scenes, so the concept is forgotten next to other objects too) and the same caption
    with its word swapped ("a red circle" → "a red square")."""
    import numpy as np

    from erasure.concepts import toy_word
    from erasure.toyworld import data

    rng = np.random.default_rng(seed)
    word = override or toy_word(concept, concept.override, "sfd: the override")
    named = re.compile(rf"\b{re.escape(concept.name)}\b")
    pairs = [data.sample_concept(concept.name, rng, word) for _ in range(n - n // 4)]
    forget, over = [s.caption for s, _ in pairs], [o for _, o in pairs]
    while len(forget) < n:
        scene = data.sample_pair(rng)
        if data.contains(scene, concept.name) and named.search(scene.caption):
            forget.append(scene.caption)
            over.append(data.swap_word(scene.caption, concept.name, word))
    return data.captions_without(concept.name, n, rng), forget, over


def real_prompts(concept, remain_file: str | None, override: str | None):
    """Stable Diffusion: forget prompts = the preset's; override per prompt; remain prompts from a file (one per line;
    the SFD paper uses Aesthetics-6+ captions) or the preset's anchors."""
    override = override or concept.override
    if not override:
        raise UserError(f"sfd needs an override prompt for '{concept.name}': pass --concept-override 'TEXT'")
    if remain_file:
        path = Path(remain_file)
        if not path.is_file():
            raise UserError(f"--remain-prompts {remain_file}: no such file")
        remain = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if not remain:
            raise UserError(f"--remain-prompts {remain_file}: the file has no prompts")
    else:
        remain = list(concept.anchors) or [override]
    forget = list(concept.prompts)
    return remain, forget, [override_of(p, concept.name, override) for p in forget]


def check_config(config, concept) -> None:
    """Refuse bad SFD options before any model is loaded (one line each)."""
    if config.fake_steps < 1:
        raise UserError(f"sfd: --fake-steps must be at least 1 (got {config.fake_steps})")
    if config.regression_weight < 0 or (config.regression_weight > 0 and config.regression_pairs < 2):
        raise UserError(f"sfd: need --regression-weight ≥ 0 and, when it is on, --regression-pairs ≥ 2 (got "
                        f"{config.regression_weight}, {config.regression_pairs})")


# ---------------------------------------------------------------------------------------------------------------
# the method


class SFD:
    """Distil ``pipe``'s UNet into a one-step generator that never learns ``concept``."""

    name = "sfd"

    def __init__(self, pipe, concept, config, run, accelerator):
        check_trainable_pipeline(pipe)
        from diffusers import DDPMScheduler

        from erasure.concepts import TOY_MODEL

        self.pipe, self.concept, self.config, self.run, self.acc = pipe, concept, config, run, accelerator
        if config.batch_size % accelerator.num_processes:
            raise UserError(f"sfd: --batch-size {config.batch_size} (the global batch) must be divisible by the "
                            f"{accelerator.num_processes} processes")
        self.teacher = pipe.unet.eval().requires_grad_(False)
        self.fake = deepcopy(self.teacher).train()
        self.G = deepcopy(self.teacher).train()
        self.G_ema = deepcopy(self.G).requires_grad_(False) if config.ema_halflife_kimg > 0 else None
        self.abar = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.to(self.teacher.device, torch.float32)
        if not 0 <= config.t_min < config.t_max <= len(self.abar) or not 0 <= config.t_init < len(self.abar):
            raise UserError(f"sfd: need 0 ≤ t_min < t_max ≤ {len(self.abar)} and 0 ≤ t_init < {len(self.abar)}")
        if run.model == TOY_MODEL:
            remain, forget, override = toy_prompts(concept, config.prompt_pool, run.seed, config.concept_override or None)
        else:
            remain, forget, override = real_prompts(concept, config.remain_prompts or None, config.concept_override or None)
        self.prompts = {"remain": remain, "forget": forget, "override": override}
        enc = lambda ps: torch.cat([encode(pipe, ps[i : i + 256]) for i in range(0, len(ps), 256)])  # noqa: E731
        self.remain, self.forget, self.override = enc(remain), enc(forget), enc(override)
        self.null = encode(pipe, [""])
        self.pairs = self._regression_pairs() if config.regression_weight > 0 else None
        betas = (0.0, 0.999)  # SiD / SFD: Adam β₁ = 0
        self.opt_fake = torch.optim.Adam(self.fake.parameters(), lr=config.lr_fake, betas=betas, eps=1e-8)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=config.lr, betas=betas, eps=1e-8)

    def _regression_pairs(self) -> dict:
        """Noise → teacher sample pairs for the regression term, drawn once from the run's seed (so a resumed run
        redraws the same): half remain prompts, half forget prompts whose target is the override prompt's sample."""
        cfg, dev = self.config, self.teacher.device
        gen = torch.Generator().manual_seed(self.run.seed + 7919)
        c, s = self.teacher.config.in_channels, self.teacher.config.sample_size
        pairs = {}
        half = cfg.regression_pairs // 2
        for name, pool, target, n in (("remain", self.remain, self.remain, cfg.regression_pairs - half),
                                      ("forget", self.forget, self.override, half)):
            idx = torch.randint(len(pool), (n,), generator=gen)
            z = torch.randn((n, c, s, s), generator=gen).to(dev)
            x = teacher_samples(self.teacher, self.pipe.scheduler.config, z, target[idx], self.null, cfg.regression_guidance)
            pairs[name] = {"z": z, "cond": pool[idx], "x": x}
        return pairs

    def _regression_term(self, gen, pairs: dict) -> torch.Tensor:
        """λ · mean over a batch of pairs of ‖G(z) − x_φ(z)‖² (this process's rows of the global batch)."""
        cfg = self.config
        idx = torch.randint(len(pairs["z"]), (cfg.batch_size,), generator=gen)[self._rows()]
        x_g = one_step(self.G, pairs["z"][idx], pairs["cond"][idx], self.abar, cfg.t_init)
        rows = regression_loss(x_g, pairs["x"][idx])
        return cfg.regression_weight * _finite_mean(rows, len(rows))

    # -- one iteration ------------------------------------------------------------------------------------------
    def _rows(self) -> slice:
        b = self.config.batch_size // self.acc.num_processes
        return slice(self.acc.process_index * b, (self.acc.process_index + 1) * b)

    def _draw(self, gen: torch.Generator, pool: torch.Tensor, partner: torch.Tensor | None = None):
        """A global batch's randomness, sliced to this process: conditions, z, t, ε (and 10 % prompt dropout)."""
        B, dev = self.config.batch_size, self.teacher.device
        c, s = self.teacher.config.in_channels, self.teacher.config.sample_size
        idx = torch.randint(len(pool), (B,), generator=gen)
        z = torch.randn((B, c, s, s), generator=gen)
        t = torch.randint(self.config.t_min, self.config.t_max, (B,), generator=gen)
        eps = torch.randn((B, c, s, s), generator=gen)
        drop = torch.rand(B, generator=gen) < 0.1
        r = self._rows()
        out = {"cond": pool[idx][r], "z": z[r].to(dev), "t": t[r].to(dev), "eps": eps[r].to(dev), "drop": drop[r]}
        if partner is not None:
            out["partner"] = partner[idx][r]
        return out

    def _noised(self, x_g, t, eps):
        a = self.abar[t].view(-1, 1, 1, 1)
        return a.sqrt() * x_g + (1 - a).sqrt() * eps, a

    def _fake_step(self, gen) -> float:
        cfg = self.config
        self.G.requires_grad_(False)
        self.fake.requires_grad_(True)
        total = 0.0
        self.opt_fake.zero_grad(set_to_none=True)
        for pool, weight in ((self.remain, cfg.sg_remain), (self.forget, cfg.sg_forget)):  # forget: f_ψ sees c_f
            d = self._draw(gen, pool)
            with self.acc.autocast():
                with torch.no_grad():
                    x_g = one_step(self.G, d["z"], d["cond"], self.abar, cfg.t_init)
                x_t, _ = self._noised(x_g, d["t"], d["eps"])
                cond = d["cond"].clone()
                if cfg.cfg_train_fake != 1.0:  # train the unconditional branch that guidance needs
                    cond[d["drop"]] = self.null[0]
                null = self.null.expand_as(cond)
                rows = fake_score_loss(eps_guided(self.fake, x_t, d["t"], cond, null, cfg.cfg_train_fake), d["eps"])
                loss = weight * _finite_mean(rows, len(rows))
            loss.backward()
            total += loss.item()
        self._sync_and_step(self.fake, self.opt_fake, clip=False)
        return self._mean_over_processes(total)

    def _generator_step(self, gen) -> float:
        cfg = self.config
        self.fake.requires_grad_(False)  # frozen, but gradients flow through its input into x_g
        self.G.requires_grad_(True)
        total = 0.0
        self.opt_g.zero_grad(set_to_none=True)
        for name, pool, partner, weight in (("remain", self.remain, None, cfg.g_remain),
                                            ("forget", self.forget, self.override, cfg.g_forget)):
            d = self._draw(gen, pool, partner)
            teacher_cond = d["partner"] if partner is not None else d["cond"]  # forget: the teacher sees c_s
            with self.acc.autocast():
                x_g = one_step(self.G, d["z"], d["cond"], self.abar, cfg.t_init)
                x_t, a = self._noised(x_g, d["t"], d["eps"])
                null = self.null.expand_as(d["cond"])
                y_fake = x0_from_eps(x_t, eps_guided(self.fake, x_t, d["t"], d["cond"], null, cfg.cfg_eval_fake), a)
                y_real = x0_from_eps(x_t, eps_guided(self.teacher, x_t, d["t"], teacher_cond, null, cfg.cfg_eval_real), a)
                rows = sid_generator_loss(x_g, y_real, y_fake, cfg.alpha)
                loss = weight * _finite_mean(rows, len(rows))
                if self.pairs is not None:
                    loss = loss + self._regression_term(gen, self.pairs[name])
            loss.backward()
            total += loss.item()
        self._sync_and_step(self.G, self.opt_g, clip=True)
        return self._mean_over_processes(total)

    def _update_ema(self, step: int) -> None:
        """SiD / EDM EMA: β = 0.5^(batch / half-life), the half-life ramped up as min(h, rampup × images seen)."""
        if self.G_ema is None:
            return
        cfg = self.config
        seen = (step + 1) * cfg.batch_size
        halflife = cfg.ema_halflife_kimg * 1000
        if cfg.ema_rampup > 0:
            halflife = min(halflife, seen * cfg.ema_rampup)
        beta = 0.5 ** (cfg.batch_size / max(halflife, 1e-8))
        with torch.no_grad():
            for pe, p in zip(self.G_ema.parameters(), self.G.parameters()):
                pe.lerp_(p.detach().to(pe.dtype), 1 - beta)

    def _mean_over_processes(self, value: float) -> float:
        """A logged loss is the global batch's: the mean of the processes' (each normalised by its local batch)."""
        if self.acc.num_processes == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.acc.num_processes

    def _sync_and_step(self, net, opt, clip: bool) -> None:
        params = [p for p in net.parameters() if p.grad is not None]
        if self.acc.num_processes > 1:
            import torch.distributed as dist

            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= self.acc.num_processes
        for p in params:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        if clip:
            torch.nn.utils.clip_grad_value_(params, 1.0)
        opt.step()

    # -- the loop -----------------------------------------------------------------------------------------------
    def fit(self, output: Path, *, resume: bool, checkpoint_every: int, quiet: bool) -> list[dict]:
        from tqdm.auto import tqdm

        cfg = self.config
        gen = torch.Generator().manual_seed(self.run.seed)
        ckpt = output.with_name(output.name + ".ckpt.safetensors")
        start, history = 0, []
        if resume and ckpt.exists():
            start, history = self._load_checkpoint(ckpt, gen)
        main = self.acc.is_main_process
        bar = tqdm(total=cfg.steps, initial=start, desc=f"sfd {self.concept.name}", dynamic_ncols=True,
                   disable=quiet or not main or not sys.stderr.isatty())
        t0 = time.time()
        with no_tf32():
            for step in range(start, cfg.steps):
                lf = sum(self._fake_step(gen) for _ in range(cfg.fake_steps)) / cfg.fake_steps
                lg = self._generator_step(gen)
                self._update_ema(step)
                if not (torch.isfinite(torch.tensor(lf)) and torch.isfinite(torch.tensor(lg))):
                    raise UserError(f"sfd: the loss became non-finite at step {step}; lower --lr / --lr-fake")
                history.append({"fake": round(lf, 6), "generator": round(lg, 6)})
                bar.update()
                bar.set_postfix(fake=f"{lf:.3f}", gen=f"{lg:.3f}")
                if main and not quiet and bar.disable and (step + 1) % 50 == 0:
                    print(f"step {step + 1}/{cfg.steps} fake {lf:.4f} generator {lg:.4f} ({time.time() - t0:.0f} s)",
                          file=sys.stderr)
                if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.steps and main:
                    self._save_checkpoint(ckpt, step + 1, gen, history)
        bar.close()
        return history

    def _optimizers(self):
        """(checkpoint prefix, optimizer, [(index, parameter)]) for both networks' Adam states."""
        return (("opt_g", self.opt_g, list(enumerate(self.G.parameters()))),
                ("opt_fake", self.opt_fake, list(enumerate(self.fake.parameters()))))

    def _save_checkpoint(self, path: Path, step: int, gen, history) -> None:
        tensors = {f"G/{k}": v for k, v in self.G.state_dict().items()}
        tensors.update({f"fake/{k}": v for k, v in self.fake.state_dict().items()})
        if self.G_ema is not None:
            tensors.update({f"G_ema/{k}": v for k, v in self.G_ema.state_dict().items()})
        for prefix, opt, named in self._optimizers():
            tensors.update(optimizer_tensors(opt, named, prefix))
        save_checkpoint(path, self.name, self.config, tensors, step, gen, history)

    def _load_checkpoint(self, path: Path, gen) -> tuple[int, list]:
        with read_checkpoint(path, self.config, gen) as (tensors, step, history):
            self.G.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("G/")})
            self.fake.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("fake/")})
            if self.G_ema is not None:
                self.G_ema.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("G_ema/")})
            for prefix, opt, named in self._optimizers():
                restore_optimizer(opt, named, tensors, prefix)
        return step, history

    # -- the result ---------------------------------------------------------------------------------------------
    def student(self):
        """The distilled one-step pipeline (shares the VAE and text encoder with the teacher pipeline); its UNet is
        the generator's EMA when ``ema_halflife_kimg`` > 0."""
        from diffusers import DDPMScheduler

        from pipelines.one_step import OneStepPipeline

        p = self.pipe
        G = deepcopy(self.G_ema if self.G_ema is not None else self.G).eval().requires_grad_(False)
        return OneStepPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=G,
                               scheduler=DDPMScheduler.from_config(p.scheduler.config), init_timestep=self.config.t_init)

    def metadata(self, model_id: str) -> dict:
        names = [n for n, _ in self.teacher.named_parameters()]
        return run_metadata(self, "one_step_generator", model_id, module_fingerprint(self.teacher, names),
                            override_prompts=sorted(set(self.prompts["override"]))[:50],
                            remain_prompts=len(self.prompts["remain"]))
