"""Configuration dataclasses: one for the run, one per method. The CLI is generated from their fields.

Defaults are the papers' values, each with its source. Where the toy world needs other values (a 2.4 M-parameter
UNet trains at a larger learning rate, in fewer steps, on batches instead of single prompts), they live in
``TOY_DEFAULTS`` and apply only with ``--model toy`` and only to fields the user did not set. A concept preset's
``method_overrides`` (e.g. nudity: η 3 for SPM) apply the same way.

Resolution order: dataclass default < toy default < preset override < explicit command-line value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from adapters.errors import UserError


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    concept: str = _f("circle", "concept to erase: a preset (circle, red, striped, nudity, 'van gogh', …) or free text")
    method: str = _f("spm", "erasure method (default: SPM, a membrane that loads anywhere; README compares them)",
                     choices=("esd", "spm", "salun", "sfd"))
    prompts: str | None = _f(None, "training prompts separated by '|' (default: the concept preset's prompts)")
    model: str | None = _f(None, "base model: 'toy', a local diffusers folder or a hub id (default: the preset's)")
    output: str | None = _f(None, "artifact path (.safetensors); default outputs/<concept>-<method>.safetensors")
    seed: int = _f(0, "random seed (training is deterministic on CPU for a given seed)")
    steps: int | None = _f(None, "training steps (default: the method's)")
    lr: float | None = _f(None, "learning rate (default: the method's)")
    batch_size: int | None = _f(None, "prompts per step (default: the method's)")
    mask: str | None = _f(None, "saliency mask (.safetensors, e.g. from a salun run) confining fine-tuning (esd, salun) "
                          "to its weights; salun computes one when absent")
    mixed_precision: str = _f("no", "accelerate mixed precision", choices=("no", "fp16", "bf16"))
    device: str | None = _f(None, "device (default: CUDA when available, else CPU)")
    attention: str = _f("sdpa", "attention backend", choices=("sdpa", "xformers"))
    checkpoint_every: int = _f(100, "steps between resumable checkpoints (0: never)")
    resume: bool = _f(False, "resume from the checkpoint next to --output if there is one")
    quiet: bool = _f(False, "no progress bar or log lines")
    dry_run: bool = _f(False, "print the resolved configuration and exit")


@dataclass
class ESDConfig:
    """ESD (Gandikota et al., 2023). Defaults: paper / train-esd.py at 8725451 unless noted."""

    variant: str = _f("esd-x", "parameters trained: esd-x (cross-attention), esd-x-strict (its to_k/to_v), esd-u "
                      "(all but cross-attention), full, selfattn",
                      choices=("esd-x", "esd-x-strict", "esd-u", "full", "selfattn"))
    eta: float = _f(1.0, "negative guidance η (paper: 1.0)")
    steps: int = _f(1000, "iterations (paper: 1000)")
    lr: float = _f(1e-5, "learning rate, Adam (paper: 1e-5)")
    batch_size: int = _f(1, "prompts per step (paper: 1)")
    ddim_steps: int = _f(50, "DDIM steps of the partial sampling that makes x_t (paper: 50)")
    start_guidance: float = _f(3.0, "CFG scale of that sampling (paper: 3)")
    sample_with: str = _f("trained", "model that samples x_t: 'trained' (paper code) or 'frozen' (diffusers code)",
                          choices=("trained", "frozen"))


@dataclass
class SPMConfig:
    """SPM (Lyu et al., CVPR 2024). Defaults: App. C.1 and Con6924/SPM configs/*.yaml unless noted."""

    rank: int = _f(1, "membrane rank (paper: 1, a one-dimensional adapter)")
    alpha: float = _f(1.0, "membrane alpha; scale = alpha / rank (SPM config: 1.0)")
    eta: float = _f(1.0, "erasing guidance η (prompt YAML guidance_scale: 1.0; nudity 3.0)")
    anchor_weight: float = _f(1000.0, "latent-anchoring weight λ (la_strength: 1e3; nudity 1e2)")
    steps: int = _f(3000, "iterations (App. C.1: 3000; nudity 15K)")
    lr: float = _f(1e-4, "learning rate, AdamW (App. C.1: 1e-4)")
    batch_size: int = _f(1, "target prompts per step (SPM: 1)")
    ddim_steps: int = _f(30, "DDIM steps of the partial sampling that makes x_t (max_denoising_steps: 30)")
    start_guidance: float = _f(3.0, "CFG scale of that sampling (SPM: 3)")
    anchor_samples: int = _f(2, "anchors per step besides the empty prompt (the code's effective count: 2)")
    anchor_source: str = _f("random", "anchors: 'random' text-space directions (SPM code), the preset's anchor "
                            "'prompts', 'both', or 'captions' (toy world: captions of scenes without the concept; "
                            "elsewhere the preset's anchor prompts)", choices=("random", "prompts", "both", "captions"))
    steer: str = _f("surrogate", "what the concept's prompts are steered to: the preset's 'surrogate' (SPM: the empty "
                    "prompt), or, on the toy world, each prompt with the concept's word 'swap'ped for the substitute's",
                    choices=("surrogate", "swap"))
    pair_fraction: float = _f(0.0, "toy world: share of each batch drawn from two-object captions naming the concept, "
                              "each steered to its other object alone instead of the surrogate (0: none, as SPM)")
    pair_eta: float = _f(1.0, "η of those pair rows (0: steer them to their target without pushing away)")
    pair_target: str = _f("other", "what those pairs are steered to: the 'other' object alone, or the caption with the "
                          "concept's word 'swap'ped for the preset's substitute", choices=("other", "swap"))
    anchor_latents: str = _f("target", "x_t of the anchors: the 'target' prompt's trajectory (SPM code) or each "
                             "anchor's 'own' partial DDIM trajectory", choices=("target", "own"))
    lr_schedule: str = _f("constant", "learning-rate schedule: 'constant', or 'cosine' decay to 0 over the steps "
                          "(the SPM code: cosine with restarts after 500 warm-up steps)", choices=("constant", "cosine"))
    layers: str = _f("all", "layers the membrane wraps: 'all' Linear / Conv2d of the transformer blocks (SPM), or only "
                     "the cross-attention key / value projections ('cross-kv': a per-token edit of the text)",
                     choices=("all", "cross-kv"))


@dataclass
class SalUnConfig:
    """SalUn (Fan et al., ICLR 2024). Defaults: OPTML-Group/Unlearn-Saliency SD/train-scripts/nsfw_removal.py and
    generate_mask.py unless noted."""

    variant: str = _f("full", "parameters trained (--train_method): full UNet or xattn (attn2 only)",
                      choices=("full", "xattn"))
    alpha: float = _f(0.1, "weight α of the retain diffusion loss (nsfw_removal.py: 0.1; Imagenette README: 0.5)")
    steps: int = _f(100, "iterations (800 forget images, batch 8, 1 epoch)")
    lr: float = _f(1e-5, "learning rate, Adam, no weight decay (nsfw_removal.py: 1e-5)")
    batch_size: int = _f(8, "forget and retain examples per step (8)")
    mask_fraction: float = _f(0.5, "fraction of weights the saliency mask keeps (threshold_list [0.5]); 1.0 = no mask")
    mask_per_layer: bool = _f(False, "threshold each parameter tensor separately instead of one global cut")
    mask_guidance: float = _f(7.5, "w of the mask loss's (1 + w)·ε(c) − w·ε(∅) (generate_mask.py c_guidance 7.5)")
    mask_batches: int = _f(0, "batches of forget examples the mask's gradient sums (0: one pass over the forget set)")
    forget_images: int = _f(800, "forget examples (SD: generations of the forget prompt; SalUn issue #3: 800)")
    retain_images: int = _f(800, "retain examples (SD: generations of the substitute and anchors; issue #3: 800)")
    forget_prompt: str = _f("", "forget prompt (default: the preset's prompts; nudity: 'a photo of a nude person')")
    substitute: str = _f("", "substitute prompt c' (default: the preset's; nudity: 'a photo of a person wearing "
                         "clothes')")
    sample_steps: int = _f(50, "DDIM steps when generating forget / retain images on SD")
    sample_guidance: float = _f(7.5, "CFG scale when generating forget / retain images on SD")


@dataclass
class SFDConfig:
    """Score Forgetting Distillation (Chen et al., ICLR 2025). Defaults: tqch/score-forgetting-distillation
    SD/run_sfd.sh (SD 1.5) unless noted."""

    steps: int = _f(12500, "iterations (README evaluates kimg 100 at batch 8: 12.5K)")
    lr: float = _f(1e-6, "generator learning rate, Adam β (0, 0.999) (run_sfd.sh: 1e-6)")
    lr_fake: float = _f(3e-6, "fake-score learning rate (run_sfd.sh: 3e-6)")
    fake_steps: int = _f(1, "fake-score updates per generator update (SiD / SFD: 1; DMD2's two time-scale rule: 5)")
    batch_size: int = _f(8, "global batch of remain and of forget prompts per iteration (run_sfd.sh: 8)")
    alpha: float = _f(1.0, "SiD α (SD: 1; CIFAR configs: 1.2)")
    t_init: int = _f(625, "the generator's fixed timestep (625 ⇒ σ_init ≈ 2.5)")
    t_min: int = _f(20, "lowest loss timestep (train.py: 20)")
    t_max: int = _f(980, "loss timesteps are drawn from [t_min, t_max) (train.py: 980)")
    cfg_train_fake: float = _f(4.5, "κ1: guidance inside the fake score's own loss (SFD-SD: 4.5)")
    cfg_eval_fake: float = _f(4.5, "κ2 = κ3: guidance of the fake score in the generator loss (4.5)")
    cfg_eval_real: float = _f(4.5, "κ4: guidance of the teacher in the generator loss (4.5)")
    g_remain: float = _f(1.0, "generator loss weight, remain batch (run_sfd.sh: 1)")
    g_forget: float = _f(1.0, "generator loss weight, forget batch (run_sfd.sh: 1)")
    sg_remain: float = _f(1.0, "fake-score loss weight, remain batch (1)")
    sg_forget: float = _f(1.0, "fake-score loss weight, forget batch (1)")
    concept_override: str = _f("", "override prompt c_s the teacher sees for forget prompts (default: the preset's; "
                               "celebrity → 'a middle aged man', nudity → the bare subject)")
    remain_prompts: str = _f("", "file of remain prompts, one per line (SFD: Aesthetics-6+ captions; default: the "
                             "preset's anchors)")
    prompt_pool: int = _f(4096, "toy world: how many remain and forget captions to draw from")
    ema_halflife_kimg: float = _f(0.0, "EMA of the generator, half-life in thousands of images (batch_size per "
                                  "iteration); the student is the EMA. 0 = off, as SFD-SD (--ema 0: it fine-tunes an "
                                  "already distilled generator); SiD-LSG 50, SiD-EDM 500")
    ema_rampup: float = _f(0.5, "EMA half-life at most this × the images seen so far (SiD / EDM ema_rampup_ratio 0.5)")
    regression_weight: float = _f(0.0, "λ of a regression term pulling G(z) toward the teacher's own sample from the same "
                                  "noise z (DMD's regression loss; forget prompts: the override prompt's sample). It "
                                  "keeps the one-step map tied to the noise. 0 = off, as SFD")
    regression_pairs: int = _f(256, "teacher samples (noise, prompt → latent) drawn once for the regression term, half "
                               "remain and half forget prompts")
    regression_guidance: float = _f(7.5, "CFG scale of the teacher samples of the regression term (25 DDIM steps)")


METHOD_CONFIGS = {"esd": ESDConfig, "spm": SPMConfig, "salun": SalUnConfig, "sfd": SFDConfig}

# Toy-world values (measured on the toy world; see README "Toy world numbers").
TOY_DEFAULTS = {
    "esd": {"steps": 200, "lr": 1e-4, "batch_size": 8, "ddim_steps": 25, "variant": "esd-u"},
    "sfd": {"steps": 400, "lr": 5e-5, "lr_fake": 1e-4, "batch_size": 8, "cfg_train_fake": 2.0, "cfg_eval_fake": 2.0,
            "cfg_eval_real": 2.0, "ema_halflife_kimg": 0.5,  # κ 2: SiD-LSG run_sid.sh; EMA: SiD (distils from scratch)
            "regression_guidance": 4.0,  # the toy world's sampler CFG (erasure.toyworld.models.GUIDANCE)
            "t_max": 700},  # above it the teacher's x̂₀ is mostly the caption's mean; FID 1.67× → 1.22× (README)
    "spm": {"steps": 200, "lr": 5e-3, "batch_size": 4, "ddim_steps": 12, "anchor_weight": 1.5, "anchor_samples": 4,
            "anchor_source": "captions", "anchor_latents": "own", "pair_fraction": 0.5},  # shapes: + steer swap (concepts)
    "salun": {"steps": 200, "lr": 1e-4, "batch_size": 16, "alpha": 0.4, "forget_images": 512, "retain_images": 4096},
}


def method_fields(method: str) -> tuple:
    return fields(METHOD_CONFIGS[method])


def resolve_method_config(method: str, *, on_toy: bool, preset_overrides: dict, explicit: dict):
    """Build the method's config: dataclass default < toy default < preset override < explicit value."""
    cfg = METHOD_CONFIGS[method]()
    names = {f.name for f in fields(cfg)}
    for f in fields(cfg):
        value, choices = explicit.get(f.name), f.metadata.get("choices")
        if value is not None and choices and value not in choices:
            raise UserError(f"--{f.name.replace('_', '-')} {value} is not a choice of --method {method} "
                            f"(choose from {', '.join(choices)})")
    layers = [TOY_DEFAULTS.get(method, {}) if on_toy else {}, preset_overrides.get(method, {}), explicit]
    for layer in layers:
        cfg = replace(cfg, **{k: v for k, v in layer.items() if k in names and v is not None})
    return cfg
