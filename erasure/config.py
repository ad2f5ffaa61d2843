"""Configuration dataclasses: one for the run, one per method. The CLI is generated from their fields.

Defaults are the papers' values, each with its source. Where the toy world needs other values (a 2.4 M-parameter
UNet trains at a larger learning rate, in fewer steps, on batches instead of single prompts), they live in
``TOY_DEFAULTS`` and apply only with ``--model toy`` and only to fields the user did not set. A concept preset's
``method_overrides`` (e.g. nudity: η 3 for SPM) apply the same way.

Resolution order: dataclass default < toy default < preset override < explicit command-line value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    concept: str = _f("circle", "concept to erase: a preset (circle, red, striped, nudity, 'van gogh', …) or free text")
    method: str = _f("esd", "erasure method (default: the best one present)", choices=("esd", "spm"))
    model: str | None = _f(None, "base model: 'toy', a local diffusers folder or a hub id (default: the preset's)")
    output: str | None = _f(None, "artifact path (.safetensors); default outputs/<concept>-<method>.safetensors")
    seed: int = _f(0, "random seed (training is deterministic on CPU for a given seed)")
    steps: int | None = _f(None, "training steps (default: the method's)")
    lr: float | None = _f(None, "learning rate (default: the method's)")
    batch_size: int | None = _f(None, "prompts per step (default: the method's)")
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

    variant: str = _f("esd-x", "parameters trained: esd-x (cross-attention), esd-u (all but cross-attention), "
                      "full, selfattn", choices=("esd-x", "esd-u", "full", "selfattn"))
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
                            "'prompts', or 'both'", choices=("random", "prompts", "both"))


METHOD_CONFIGS = {"esd": ESDConfig, "spm": SPMConfig}

# Toy-world values (measured on the toy world; see README "Toy world numbers").
TOY_DEFAULTS = {
    "esd": {"steps": 200, "lr": 1e-4, "batch_size": 8, "ddim_steps": 25, "variant": "esd-u"},
}


def method_fields(method: str) -> tuple:
    return fields(METHOD_CONFIGS[method])


def resolve_method_config(method: str, *, on_toy: bool, preset_overrides: dict, explicit: dict):
    """Build the method's config: dataclass default < toy default < preset override < explicit value."""
    cfg = METHOD_CONFIGS[method]()
    names = {f.name for f in fields(cfg)}
    layers = [TOY_DEFAULTS.get(method, {}) if on_toy else {}, preset_overrides.get(method, {}), explicit]
    for layer in layers:
        cfg = replace(cfg, **{k: v for k, v in layer.items() if k in names and v is not None})
    return cfg
