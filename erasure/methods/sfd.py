"""Score Forgetting Distillation (Chen et al., ICLR 2025, arXiv 2409.11219), on Score identity Distillation (SiD,
Zhou et al. 2024) with long-and-short guidance (SiD-LSG).

Three copies of the teacher UNet: the frozen teacher f_φ, a fake score f_ψ and a one-step generator G_θ. G maps noise
to a clean latent in one evaluation at t_init (σ_init ≈ 2.5):

    x = √(1−ᾱ_init)·z,    x_g = (x − √(1−ᾱ_init)·G(x, t_init, c)) / √ᾱ_init

(ε-prediction; every output is read in the teacher's parameterisation, ``prediction_type`` of its scheduler config:
x̂₀ via :func:`pipelines.prediction.to_x0`, the fake score's regression target ε or v via ``target``).

Each iteration updates f_ψ (``fake_steps`` times; 1 in SiD), then G, on a *remain* batch (prompts of what must keep
working) and a *forget* batch:

    L_ψ = Σ_{c ∈ {c_r, c_f}} ‖ε_ψ^{κ1}(x_t, t, c) − ε‖²,   x_t from sg(x_g(c))                     (denoising)
    L_G = Σ (y_real − y_fake) ⊙ ((y_real − x_g) − α (y_real − y_fake)) / w,   w = sg(mean|x_g − y_real|)    (SiD)

with y_fake = x̂₀ of f_ψ^{κ2}(x_t, t, c) and y_real = x̂₀ of f_φ^{κ4}(x_t, t, c′): on the remain batch c′ = c = c_r;
on the forget batch G and f_ψ see the forget prompt c_f and the *teacher* sees the override prompt c_s — so G under c_f
is pulled toward the teacher's p(x | c_s) and never learns the concept. Data-free: only prompts are used.

Under ``--adversarial`` (:mod:`erasure.adversarial`) the inner attack searches prefix embeddings δ that make G draw
the concept, and both networks see the forget prompts behind them, [δ*; c_f] (``adversarial_fraction`` of the rows;
the rest stay plain), while the teacher still sees c_s: the student is pulled toward the override prompt's
distribution on the attacker's inputs too.

Data parallel without DDP wrappers: every process draws the same global batch from the same seeded generator and
takes its own rows; gradients (per-process losses normalised by the local batch) are averaged across processes, so
N processes follow a 1-process run with the same global batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers import DDIMScheduler, DDPMScheduler

from adapters.artifact import module_fingerprint
from adapters.errors import UserError
from erasure.config import option
from erasure.methods.base import Method, add_noise, cfg_eps, ddim_steps, run_metadata, tf32
from erasure.sharding import full_state_dict, shard
from erasure.toyworld.models import GUIDANCE
from pipelines.one_step import OneStepPipeline, one_step_latents
from pipelines.prediction import prediction_type_of, target, to_x0
from pipelines.text import denoise, encode


@dataclass
class SFDConfig:
    """Score Forgetting Distillation (Chen et al., ICLR 2025). Defaults: tqch/score-forgetting-distillation
    SD/run_sfd.sh (SD 1.5) unless noted."""

    steps: int = option(12500, "iterations (README evaluates kimg 100 at batch 8: 12.5K)")
    lr: float = option(1e-6, "generator learning rate, Adam β (0, 0.999) (run_sfd.sh: 1e-6)")
    lr_fake: float = option(3e-6, "fake-score learning rate (run_sfd.sh: 3e-6)")
    fake_steps: int = option(1, "fake-score updates per generator update (SiD / SFD: 1; DMD2's two time-scale rule: 5)")
    batch_size: int = option(8, "global batch of remain and of forget prompts per iteration (run_sfd.sh: 8)")
    alpha: float = option(1.0, "SiD α (SD: 1; CIFAR configs: 1.2)")
    t_init: int = option(625, "the generator's fixed timestep (625 ⇒ σ_init ≈ 2.5)")
    t_min: int = option(20, "lowest loss timestep (train.py: 20)")
    t_max: int = option(980, "loss timesteps are drawn from [t_min, t_max) (train.py: 980)")
    cfg_train_fake: float = option(4.5, "κ1: guidance inside the fake score's own loss (SFD-SD: 4.5)")
    cfg_eval_fake: float = option(4.5, "κ2 = κ3: guidance of the fake score in the generator loss (4.5)")
    cfg_eval_real: float = option(4.5, "κ4: guidance of the teacher in the generator loss (4.5)")
    g_remain: float = option(1.0, "generator loss weight, remain batch (run_sfd.sh: 1)")
    g_forget: float = option(1.0, "generator loss weight, forget batch (run_sfd.sh: 1)")
    sg_remain: float = option(1.0, "fake-score loss weight, remain batch (1)")
    sg_forget: float = option(1.0, "fake-score loss weight, forget batch (1)")
    concept_override: str = option("", "override prompt c_s the teacher sees for forget prompts (default: the preset's; "
                                   "celebrity → 'a middle aged man', nudity → the bare subject)")
    remain_prompts: str = option("", "file of remain prompts, one per line (SFD: Aesthetics-6+ captions; default: the "
                                 "preset's anchors)")
    prompt_pool: int = option(4096, "toy world: how many remain and forget captions to draw from")
    ema_halflife_kimg: float = option(0.0, "EMA of the generator, half-life in thousands of images (batch_size per "
                                      "iteration); the student is the EMA. 0 = off, as SFD-SD (--ema 0: it fine-tunes an "
                                      "already distilled generator); SiD-LSG 50, SiD-EDM 500")
    ema_rampup: float = option(0.5, "EMA half-life at most this × the images seen so far (SiD / EDM ema_rampup_ratio 0.5)")
    regression_weight: float = option(0.0, "λ of a regression term pulling G(z) toward the teacher's own sample from the same "
                                      "noise z (DMD's regression loss; forget prompts: the override prompt's sample). It "
                                      "keeps the one-step map tied to the noise. 0 = off, as SFD")
    regression_pairs: int = option(256, "teacher samples (noise, prompt → latent) drawn once for the regression term, half "
                                   "remain and half forget prompts")
    regression_guidance: float = option(7.5, "CFG scale of the teacher samples of the regression term (25 DDIM steps)")
    adversarial_fraction: float = option(0.5, "--adversarial: the fraction of forget rows behind the inner attack's "
                                         "prefix; the rest keep their plain prompts, which the student must keep "
                                         "forgetting (1: all, as AdvUnlearn trains ESD)", adversarial_only=True)


# ---------------------------------------------------------------------------------------------------------------
# the equations


def one_step(G, z: torch.Tensor, cond: torch.Tensor, abar: torch.Tensor, t_init: int,
             prediction_type: str = "epsilon") -> torch.Tensor:
    """x_g = x̂₀ of G(x, t_init, c) with x = √(1−ᾱ)·z (ε: (x − √(1−ᾱ)·G) / √ᾱ). z (B, 4, h, w) → x_g (B, 4, h, w),
    fp32."""
    t = torch.full((len(z),), t_init, device=z.device)
    return one_step_latents(lambda x: denoise(G, x.to(_dtype(G)), t, cond), z, abar[t_init], prediction_type)


def eps_guided(net, x_t, t, cond, uncond, kappa: float) -> torch.Tensor:
    """``cfg_eps`` at κ, run in the network's dtype. x_t (B, 4, h, w); t (B,); cond, uncond (B, 77, D)
    → (B, 4, h, w), fp32."""
    return cfg_eps(net, x_t.to(_dtype(net)), t, cond, uncond, kappa).float()


def sid_generator_loss(x_g, y_real, y_fake, alpha: float) -> torch.Tensor:
    """SiD: Σ (y_real − y_fake)((y_real − x_g) − α(y_real − y_fake)) / w per sample, w = sg(mean|x_g − y_real|).
    (B, 4, h, w) ×3 → (B,); only w is detached, so the gradient reaches G through x_g and through both scores' input."""
    w = (x_g - y_real).abs().mean(dim=(1, 2, 3), keepdim=True).detach().clamp_min(1e-5)
    return ((y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / w).flatten(1).sum(1)


def fake_score_loss(pred: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """Denoising score matching on detached generator samples: Σ_{CHW} (f_ψ − goal)², per sample (B,); the goal is
    ε (or v for a v-prediction teacher, :func:`pipelines.prediction.target`). (B, 4, h, w) ×2 → (B,)."""
    return ((pred - goal) ** 2).flatten(1).sum(1)


def regression_loss(x_g: torch.Tensor, x_teacher: torch.Tensor) -> torch.Tensor:
    """DMD's regression term: Σ_{CHW} (G(z) − x_φ(z))², per sample (B,); x_φ(z) is the teacher's sample from z."""
    return ((x_g - x_teacher) ** 2).flatten(1).sum(1)


@torch.no_grad()
def teacher_samples(unet, scheduler_config, z, cond, null, kappa: float, steps: int = 25) -> torch.Tensor:
    """Deterministic DDIM samples of the teacher from the initial noise z with CFG κ: z (B, 4, h, w), cond (B, 77, D)
    → clean latents (B, 4, h, w), fp32, in batches of 32."""
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


# ---------------------------------------------------------------------------------------------------------------
# the method


class SFD(Method):
    """Distil ``pipe``'s UNet into a one-step generator that never learns ``concept``. Its update schedule (``fake_steps``
    fake-score updates, then one generator update, then the EMA) is the :meth:`train_step` hook of the fit loop."""

    name = "sfd"
    title = "distil a one-step generator that never learns the concept (SFD, Chen et al. 2025)"
    config_class = SFDConfig
    writes_folder = True
    shardable = True
    adversarial = True
    one_step = True
    # the toy world (docs/methods/sfd.md): κ 2 as SiD-LSG's run_sid.sh; EMA as SiD, which distils from
    # scratch; the regression samples at the toy world's sampler CFG; t_max 700:
    # above it the teacher's x̂₀ is mostly the caption's mean
    toy_defaults = {"steps": 400, "lr": 5e-5, "lr_fake": 1e-4, "batch_size": 8, "cfg_train_fake": 2.0,
                    "cfg_eval_fake": 2.0, "cfg_eval_real": 2.0, "ema_halflife_kimg": 0.5, "regression_guidance": GUIDANCE,
                    "t_max": 700}

    @classmethod
    def check(cls, config, concept) -> None:
        if config.fake_steps < 1:
            raise UserError(f"sfd: --fake-steps must be at least 1 (got {config.fake_steps})")
        if not 0.0 < config.adversarial_fraction <= 1.0:
            raise UserError(f"sfd: --adversarial-fraction must be in (0, 1] (got {config.adversarial_fraction})")
        if config.regression_weight < 0 or (config.regression_weight > 0 and config.regression_pairs < 2):
            raise UserError(f"sfd: need --regression-weight ≥ 0 and, when it is on, --regression-pairs ≥ 2 (got "
                            f"{config.regression_weight}, {config.regression_pairs})")

    def __init__(self, pipe, concept, config, ctx):
        super().__init__(pipe, concept, config, ctx)
        accelerator = ctx.accelerator
        self.acc = accelerator
        if config.batch_size % accelerator.num_processes:
            raise UserError(f"sfd: --batch-size {config.batch_size} (the global batch) must be divisible by the "
                            f"{accelerator.num_processes} processes")
        self.teacher = pipe.unet.eval().requires_grad_(False)
        self.fake = deepcopy(self.teacher).train()
        self.G = deepcopy(self.teacher).train()
        self.G_ema = deepcopy(self.G).requires_grad_(False) if config.ema_halflife_kimg > 0 else None
        self.noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
        self.abar = self.noise_schedule.alphas_cumprod.to(self.teacher.device, torch.float32)
        self.prediction_type = prediction_type_of(pipe.scheduler)  # G, f_ψ and f_φ all output the teacher's kind
        if not 0 <= config.t_min < config.t_max <= len(self.abar) or not 0 <= config.t_init < len(self.abar):
            raise UserError(f"sfd: need 0 ≤ t_min < t_max ≤ {len(self.abar)} and 0 ≤ t_init < {len(self.abar)}")
        remain, forget, override = concept.distillation_prompts(config.prompt_pool, ctx.seed,
                                                                override=config.concept_override,
                                                                remain_file=config.remain_prompts)
        self.prompts = {"remain": remain, "forget": forget, "override": override}
        self.remain, self.forget, self.override = encode(pipe, remain), encode(pipe, forget), encode(pipe, override)
        self.null = encode(pipe, [""])
        self.pairs = self._regression_pairs() if config.regression_weight > 0 else None

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The generator's and the fake score's Adam (SiD / SFD: β₁ = 0), as named in checkpoints."""
        cfg, betas = self.config, (0.0, 0.999)
        return {"opt_g": self.make_optimizer(self.G.parameters(), lr=cfg.lr, betas=betas, eps=1e-8),
                "opt_fake": self.make_optimizer(self.fake.parameters(), lr=cfg.lr_fake, betas=betas, eps=1e-8)}

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Only the teacher: the text encoder and VAE go into the student pipeline at their own precision."""
        return [self.teacher]

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.G, self.fake]

    def _regression_pairs(self) -> dict:
        """Noise → teacher sample pairs for the regression term, drawn once from the run's seed (so a resumed run
        redraws the same): half remain prompts, half forget prompts whose target is the override prompt's sample."""
        cfg, dev = self.config, self.teacher.device
        gen = torch.Generator().manual_seed(self.ctx.seed + 7919)
        c, s = self.teacher.config.in_channels, self.teacher.config.sample_size
        pairs = {}
        half = cfg.regression_pairs // 2
        for name, pool, aim, n in (("remain", self.remain, self.remain, cfg.regression_pairs - half),
                                      ("forget", self.forget, self.override, half)):
            idx = torch.randint(len(pool), (n,), generator=gen)
            z = torch.randn((n, c, s, s), generator=gen).to(dev)
            x = teacher_samples(self.teacher, self.pipe.scheduler.config, z, aim[idx], self.null, cfg.regression_guidance)
            pairs[name] = {"z": z, "cond": pool[idx], "x": x}
        return pairs

    def _regression_term(self, gen, pairs: dict) -> torch.Tensor:
        """λ · mean over a batch of pairs of ‖G(z) − x_φ(z)‖² (this process's rows of the global batch)."""
        cfg = self.config
        idx = torch.randint(len(pairs["z"]), (cfg.batch_size,), generator=gen)[self._rows()]
        x_g = one_step(self.G, pairs["z"][idx], pairs["cond"][idx], self.abar, cfg.t_init, self.prediction_type)
        rows = regression_loss(x_g, pairs["x"][idx])
        return cfg.regression_weight * _finite_mean(rows, len(rows))

    # -- one iteration ------------------------------------------------------------------------------------------
    def _rows(self) -> slice:
        b = self.config.batch_size // self.acc.num_processes
        return slice(self.acc.process_index * b, (self.acc.process_index + 1) * b)

    def _draw(self, gen: torch.Generator, pool: torch.Tensor, partner: torch.Tensor | None = None,
              attacked: bool = False):
        """A global batch's randomness, sliced to this process: conditions, z, t, ε (and 10 % prompt dropout);
        ``attacked``: the conditions behind the inner attack's prefix once it has run (forget prompts)."""
        B, dev = self.config.batch_size, self.teacher.device
        c, s = self.teacher.config.in_channels, self.teacher.config.sample_size
        idx = torch.randint(len(pool), (B,), generator=gen)
        z = torch.randn((B, c, s, s), generator=gen)
        t = torch.randint(self.config.t_min, self.config.t_max, (B,), generator=gen)
        eps = torch.randn((B, c, s, s), generator=gen)
        drop = torch.rand(B, generator=gen) < 0.1
        r = self._rows()
        cond = pool[idx][r]
        if attacked and self.adversary is not None:  # the rows behind the attack's prefix: all, or a fraction
            # (all rows draw nothing from gen, so such a run repeats one made before the fraction existed)
            frac = self.config.adversarial_fraction
            use = (torch.rand(B, generator=gen) < frac)[r] if frac < 1 else torch.ones(len(cond), dtype=torch.bool)
            cond = torch.where(use.to(cond.device).view(-1, 1, 1), self.attacked(cond, idx[r]), cond)
        out = {"cond": cond, "z": z[r].to(dev), "t": t[r].to(dev), "eps": eps[r].to(dev), "drop": drop[r]}
        if partner is not None:
            out["partner"] = partner[idx][r]
        return out

    def _noised(self, x_g, t, eps):
        """x_t of x_g at t (B,) with noise ε, and ᾱ_t (B, 1, 1, 1) for x̂₀."""
        return add_noise(self.noise_schedule, x_g, t, eps), self.abar[t].view(-1, 1, 1, 1)

    def _x0(self, net, x_t, t, cond, null, kappa: float, a) -> torch.Tensor:
        """x̂₀ of a score network's κ-guided output (y_real, y_fake): x_t (B, 4, h, w), ᾱ_t (B, 1, 1, 1) → fp32."""
        return to_x0(eps_guided(net, x_t, t, cond, null, kappa), x_t, a, self.prediction_type)

    def _fake_step(self, gen, opt) -> float:
        cfg = self.config
        self.G.requires_grad_(False)
        self.fake.requires_grad_(True)
        total = 0.0
        opt.zero_grad(set_to_none=True)
        for pool, weight in ((self.remain, cfg.sg_remain), (self.forget, cfg.sg_forget)):  # forget: f_ψ sees c_f
            d = self._draw(gen, pool, attacked=pool is self.forget)
            with self.acc.autocast():
                with torch.no_grad():
                    x_g = one_step(self.G, d["z"], d["cond"], self.abar, cfg.t_init, self.prediction_type)
                x_t, a = self._noised(x_g, d["t"], d["eps"])
                cond = d["cond"].clone()
                if cfg.cfg_train_fake != 1.0:  # train the unconditional branch that guidance needs
                    cond[d["drop"]] = self.null[0]
                null = self.null.expand_as(cond)
                goal = target(x_g, d["eps"], a, self.prediction_type)  # ε, or v for a v-prediction teacher
                rows = fake_score_loss(eps_guided(self.fake, x_t, d["t"], cond, null, cfg.cfg_train_fake), goal)
                loss = weight * _finite_mean(rows, len(rows))
            loss.backward()
            total += loss.item()
        self._sync_and_step(self.fake, opt, clip=False)
        return self._mean_over_processes(total)

    def _generator_step(self, gen, opt) -> float:
        cfg = self.config
        self.fake.requires_grad_(False)  # frozen, but gradients flow through its input into x_g
        self.G.requires_grad_(True)
        total = 0.0
        opt.zero_grad(set_to_none=True)
        for name, pool, partner, weight in (("remain", self.remain, None, cfg.g_remain),
                                            ("forget", self.forget, self.override, cfg.g_forget)):
            d = self._draw(gen, pool, partner, attacked=partner is not None)
            teacher_cond = d["partner"] if partner is not None else d["cond"]  # forget: the teacher sees c_s
            with self.acc.autocast():
                x_g = one_step(self.G, d["z"], d["cond"], self.abar, cfg.t_init, self.prediction_type)
                x_t, a = self._noised(x_g, d["t"], d["eps"])
                null = self.null.expand_as(d["cond"])
                y_fake = self._x0(self.fake, x_t, d["t"], d["cond"], null, cfg.cfg_eval_fake, a)
                y_real = self._x0(self.teacher, x_t, d["t"], teacher_cond, null, cfg.cfg_eval_real, a)
                rows = sid_generator_loss(x_g, y_real, y_fake, cfg.alpha)
                loss = weight * _finite_mean(rows, len(rows))
                if self.pairs is not None:
                    loss = loss + self._regression_term(gen, self.pairs[name])
            loss.backward()
            total += loss.item()
        self._sync_and_step(self.G, opt, clip=True)
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
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.acc.num_processes

    def _sync_and_step(self, net, opt, clip: bool) -> None:
        params = [p for p in net.parameters() if p.grad is not None]
        if self.acc.num_processes > 1 and self.sharding is None:  # sharded: FSDP averaged them already
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= self.acc.num_processes
        for p in params:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        if clip:
            torch.nn.utils.clip_grad_value_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)  # one network's gradients at a time

    # -- adversarial erasure: the inner attack runs the generator -------------------------------------------------
    def adversarial_texts(self) -> list[str]:
        """The forget prompts: the rows of ``self.forget`` that :meth:`attacked` indexes."""
        return self.prompts["forget"]

    def attack_model(self):
        """The generator as it is now (the inner attack runs it through :meth:`generate`)."""
        return nullcontext(self.G)

    def generate(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """G's clean latents x_g from noise z (B, 4, h, w) under ``cond`` (B, 77, D), fp32."""
        return one_step(self.G, z, cond, self.abar, self.config.t_init, self.prediction_type)

    # -- the fit loop's hooks ------------------------------------------------------------------------------------
    def train_step(self, gen, optimizers: dict, accelerator, step: int) -> dict:
        """``fake_steps`` fake-score updates, one generator update, the EMA → {"fake", "generator"} losses."""
        cfg = self.config
        with tf32(self.ctx.allow_tf32):  # SiD turns TF32 off unless the user allowed it
            lf = sum(self._fake_step(gen, optimizers["opt_fake"]) for _ in range(cfg.fake_steps)) / cfg.fake_steps
            lg = self._generator_step(gen, optimizers["opt_g"])
            self._update_ema(step)
        if not (torch.isfinite(torch.tensor(lf)) and torch.isfinite(torch.tensor(lg))):
            raise UserError(f"sfd: the loss became non-finite at step {step}; lower --lr / --lr-fake")
        return {"fake": round(lf, 6), "generator": round(lg, 6)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        nets = {"G": self.G, "fake": self.fake, "G_ema": self.G_ema}
        return {f"{k}/{n}": v for k, net in nets.items() if net is not None for n, v in net.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, net in {"G": self.G, "fake": self.fake, "G_ema": self.G_ema}.items():
            if net is not None:
                net.load_state_dict({n[len(k) + 1 :]: v for n, v in tensors.items() if n.startswith(f"{k}/")})

    def shard(self, sharding) -> None:
        """The teacher (frozen), the fake score, the generator and its EMA, each sharded. Every process still draws
        the global batch and keeps its rows; FSDP averages the gradients."""
        self.unet_class = type(self.teacher)
        for net in (self.teacher, self.fake, self.G, self.G_ema):
            if net is not None:
                shard(net, sharding)
        self.sharding = sharding

    # -- the result ---------------------------------------------------------------------------------------------
    def student(self):
        """The distilled one-step pipeline (shares the VAE and text encoder with the teacher pipeline); its UNet is
        the generator's EMA when ``ema_halflife_kimg`` > 0."""
        p = self.pipe
        src = self.G_ema if self.G_ema is not None else self.G
        if self.sharding is None:
            G = deepcopy(src)
        else:  # gathered whole by every process (a collective)
            G = self.unet_class.from_config(src.config)
            G.load_state_dict(full_state_dict(src))
            G.to(p.vae.device)
        G = G.eval().requires_grad_(False)
        return OneStepPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=G,
                               scheduler=DDPMScheduler.from_config(p.scheduler.config), init_timestep=self.config.t_init,
                               text_encoder_2=getattr(p, "text_encoder_2", None),
                               tokenizer_2=getattr(p, "tokenizer_2", None))  # SDXL: its second encoder

    def artifact(self, model_id: str) -> tuple:
        """(the one-step pipeline, its metadata, None): written as a pipeline folder."""
        names = [n for n, _ in self.teacher.named_parameters()]
        meta = run_metadata(self, "one_step_generator", model_id, module_fingerprint(self.teacher, names),
                            override_prompts=sorted(set(self.prompts["override"]))[:50],
                            remain_prompts=len(self.prompts["remain"]))
        return self.student(), meta, None
