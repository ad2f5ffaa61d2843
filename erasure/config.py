"""The run's configuration dataclass, and how a method's config is resolved. The CLI is generated from their fields.

Each method's own config dataclass lives in its file (``erasure/methods/*.py``), defaults = the paper's values, each
with its source. Where the toy world needs other values (a 2.4 M-parameter UNet trains at a larger learning rate, in
fewer steps, on batches instead of single prompts), they are the method's ``toy_defaults`` and apply only with
``--model toy`` and only to fields the user did not set. A concept preset's ``method_overrides`` (e.g. nudity: η 3
for SPM) apply the same way.

Resolution order: dataclass default < toy default < preset override < explicit command-line value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from adapters.errors import UserError
from erasure.optim import OPTIMIZERS


def option(default, help: str, **kw):
    """A config field with its ``--help`` text (and ``choices=``): the CLI is built from these."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    concept: str = option("circle", "concept to erase: a preset (circle, red, striped, nudity, 'van gogh', …) or "
                          "free text; repeat it, join names with '+', or name a list (toy-shapes:3, artists-10, "
                          "celebrities-10, explicit-content) to erase several in one run")
    method: str = option("spm", "erasure method (default: SPM, a membrane that loads anywhere; README compares them)")
    prompts: str | None = option(None, "training prompts separated by '|' (default: the concept preset's prompts)")
    model: str | None = option(None, "base model: 'toy', a local diffusers folder or a hub id (default: the preset's)")
    output: str | None = option(None, "artifact path (.safetensors); default outputs/<concept>-<method>.safetensors")
    seed: int = option(0, "random seed (training is deterministic on CPU for a given seed)")
    steps: int | None = option(None, "training steps (default: the method's)")
    lr: float | None = option(None, "learning rate (default: the method's)")
    batch_size: int | None = option(None, "prompts per step (default: the method's)")
    mask: str | None = option(None, "saliency mask (.safetensors, e.g. from a salun run) confining fine-tuning (esd, "
                              "salun) to its weights; salun computes one when absent")
    mixed_precision: str = option("no", "mixed precision through accelerate: autocast, and every frozen network (text "
                                  "encoder, VAE, the UNet's untrained weights, SFD's teacher) held in this dtype; what "
                                  "trains keeps fp32 master weights. fp16 needs CUDA", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = option(False, "recompute the trained networks' activations during the backward pass "
                                          "instead of storing them (less memory, slower steps)")
    optimizer: str = option("adam", "optimiser: 'adam' (the method's own Adam / AdamW, as its paper), 'factored' (Adam "
                            "with a factored second moment: a state of rows + columns per weight matrix, any device), "
                            "'adam8bit' (bitsandbytes, CUDA)", choices=OPTIMIZERS)
    use_8bit_adam: bool = option(False, "bitsandbytes' 8-bit Adam (CUDA; the cuda extra): the same as --optimizer adam8bit")
    allow_tf32: bool = option(False, "allow TF32 matmuls on Ampere or newer GPUs (faster, less precise; SFD otherwise "
                              "turns TF32 off, as SiD)")
    fsdp: bool = option(False, "shard the trained networks (and SFD's teacher) across the processes of `accelerate "
                        "launch` with FSDP (esd, salun, sfd); such runs write no intermediate checkpoints")
    adversarial: bool = option(False, "adversarial erasure (AdvUnlearn; esd, salun, spm, sfd): every few steps an "
                               "inner attack finds prefix embeddings that bring the concept back on the current "
                               "model, and the method trains on the attacked prompts, with a retain regulariser")
    attack_every: int | None = option(None, "--adversarial: steps between inner attacks (AdvUnlearn: 1; toy: 5)")
    attack_steps: int | None = option(None, "--adversarial: Adam steps of each inner attack (AdvUnlearn: 30; toy: 10)")
    attack_lr: float | None = option(None, "--adversarial: the inner attack's learning rate (AdvUnlearn: 1e-3; toy: "
                                     "2e-2)")
    attack_tokens: int | None = option(None, "--adversarial: adversarial prefix vectors k (AdvUnlearn: 1)")
    attack_warmup: int | None = option(None, "--adversarial: plain erasure steps before the first attack (AdvUnlearn: "
                                       "200; toy: 40)")
    attack_images: int | None = option(None, "--adversarial: images of the concept the inner attack denoises "
                                       "(generated by the model on real concepts; default 8, toy 16)")
    retain_weight: float | None = option(None, "--adversarial: γ of the retain regulariser (AdvUnlearn README: 0.3; "
                                         "toy: 1); esd adds AdvUnlearn's retain loss, spm and salun keep their own")
    device: str | None = option(None, "device (default: CUDA when available, else CPU)")
    attention: str = option("sdpa", "attention backend", choices=("sdpa", "xformers"))
    checkpoint_every: int = option(100, "steps between resumable checkpoints (0: never)")
    resume: bool = option(False, "resume from the checkpoint next to --output if there is one")
    quiet: bool = option(False, "no progress bar or log lines")
    dry_run: bool = option(False, "print the resolved configuration and exit")


def resolve_method_config(method, *, on_toy: bool, preset_overrides: dict, explicit: dict):
    """Build ``method``'s config (a :class:`erasure.methods.base.Method` class): dataclass default < the method's
    toy default (``on_toy``) < preset override < explicit value. A value outside a field's choices is a UserError."""
    cfg = method.config_class()
    names = {f.name for f in fields(cfg)}
    for f in fields(cfg):
        value, choices = explicit.get(f.name), f.metadata.get("choices")
        if value is not None and choices and value not in choices:
            raise UserError(f"--{f.name.replace('_', '-')} {value} is not a choice of --method {method.name} "
                            f"(choose from {', '.join(choices)})")
    layers = [method.toy_defaults if on_toy else {}, preset_overrides.get(method.name, {}), explicit]
    for layer in layers:
        cfg = replace(cfg, **{k: v for k, v in layer.items() if k in names and v is not None})
    return cfg
