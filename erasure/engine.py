"""The training engine: resolve a run (:func:`plan`), train it with the one fit loop (:func:`fit`), write its
artifact and run record (:func:`execute`).

Every method goes through the same loop: accelerate (devices, mixed precision, processes), the progress bar, the
learning-rate schedule, resumable checkpoints (trained tensors, optimiser states and the random state, so a resumed
CPU run is bit-identical), the non-finite guard and the run record. A method supplies its loss, or overrides the
:meth:`erasure.methods.base.Method.train_step` hook when one iteration is more than one backward pass (SFD).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs
from tqdm.auto import tqdm

import pipelines
from adapters.artifact import load_artifact, save_artifact, save_pipeline_folder, write_text_atomic
from adapters.errors import UserError
from adapters.saliency import load_mask
from erasure import adversarial, concepts
from erasure.concepts import Concept
from erasure.config import TrainConfig, resolve_method_config
from erasure.methods import METHODS
from erasure.methods.base import Context, Method, tf32
from erasure.optim import import_bitsandbytes
from erasure.sharding import sharding_for

# run options that only steer the command line, never the training
_CLI_ONLY = ("dry_run",)
_NOT_RECORDED = ("dry_run", "quiet", "resume")
_PER_METHOD = ("steps", "lr", "batch_size")  # run options that exist only where the method's config has them


@dataclass(frozen=True)
class Plan:
    """A resolved run: the run's config, the concept, the method's config and the method class."""

    run: TrainConfig
    concept: Concept
    config: Any
    method: type[Method]

    @property
    def output(self) -> Path:
        return Path(self.run.output)

    @property
    def folder(self) -> bool:
        """The method writes a pipeline folder (SFD), not a ``.safetensors`` file."""
        return self.method.writes_folder

    def describe(self) -> dict:
        """What ``--dry-run`` prints: the run, the method's config and the concept."""
        out = {"run": asdict(self.run), self.method.name: asdict(self.config), "concept": asdict(self.concept)}
        if self.run.adversarial:
            out["adversarial"] = asdict(adversarial.settings(self.run.model == concepts.TOY_MODEL,
                                                             attack_options(self.run)))
        return out


@dataclass(frozen=True)
class Result:
    """What one erasure produced: the artifact (a ``.safetensors`` file, or a pipeline folder for SFD) and its run
    record (the JSON written beside it: configs, loss history, seconds, ...)."""

    artifact: Path
    record: dict


# ---------------------------------------------------------------------------------------------------------------
# resolution


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}': choose from {', '.join(METHODS)}")
    return METHODS[name]


def _check_type(name: str, f, value, method: str) -> Any:
    """A library caller's value against the field's type (the CLI's argparse already converted its strings)."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    want = bool if "bool" in kind else float if "float" in kind else int if "int" in kind else str
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        words = {bool: "true or false", float: "a number", int: "an integer", str: "a string"}
        where = f" of method {method}" if method else ""
        raise UserError(f"option {name}{where} must be {words[want]} (got {value!r})")
    return value


def plan(concept: str, method: str = "spm", options: dict | None = None) -> Plan:
    """Resolve ``concept``, ``method`` and the options (the run's and the method's, by field name; ``None`` values
    are unset) into a :class:`Plan`, loading no model. Bad names, values and combinations raise UserError."""
    cls = method_class(method)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    run_fields = {f.name: f for f in fields(TrainConfig) if f.name not in ("concept", "method", *_CLI_ONLY)}
    method_fields = {f.name: f for f in fields(cls.config_class)}
    stray = [k for k in options if (k not in run_fields or k in _PER_METHOD) and k not in method_fields]
    if stray:
        raise UserError(f"--{stray[0].replace('_', '-')} is not an option of --method {method}")
    if isinstance(options.get("prompts"), (list, tuple)):
        options["prompts"] = "|".join(options["prompts"])
    if isinstance(concept, (list, tuple)):  # several concepts erased in one run: one '+'-joined name
        concept = "+".join(str(c) for c in concept)
    options = {k: _check_type(k, run_fields.get(k) or method_fields[k], v, method) for k, v in options.items()}
    run = TrainConfig(concept=concept, method=method, **{k: v for k, v in options.items() if k in run_fields})
    if run.use_8bit_adam:
        if run.optimizer not in ("adam", "adam8bit"):
            raise UserError(f"--use-8bit-adam and --optimizer {run.optimizer} contradict each other: give one")
        run.optimizer, run.use_8bit_adam = "adam8bit", False
    _check_fsdp(run, cls)
    _check_adversarial(run, cls)
    if run.mask and not cls.maskable:
        maskable = ", ".join(n for n, m in METHODS.items() if m.maskable)
        raise UserError(f"--mask confines weight fine-tuning ({maskable}); --method {method} trains an adapter")
    if run.mask:  # a bad mask file fails before any model is loaded
        load_mask(run.mask)
    resolved = concepts.resolve(run.concept, run.model)
    if run.prompts is not None:
        texts = tuple(t.strip() for t in run.prompts.split("|") if t.strip())
        if not texts:
            raise UserError("--prompts is empty: pass prompts separated by '|', e.g. --prompts 'a circle|circle'")
        if resolved.members:
            raise UserError(f"--prompts replaces one concept's prompts; the set '{resolved.name}' trains on its "
                            "members' (erase a single concept to choose its prompts)")
        resolved = replace(resolved, prompts=texts)
    run.model = run.model or resolved.default_model
    explicit = {k: v for k, v in options.items() if k in method_fields}
    inert = [k for k, v in explicit.items() if v is not None and method_fields[k].metadata.get("adversarial_only")]
    if inert and not run.adversarial:
        raise UserError(f"--{inert[0].replace('_', '-')} is an option of --adversarial: add --adversarial")
    overrides = resolved.method_overrides
    if run.adversarial and resolved.robust_overrides:  # the preset's adversarial recipe (nudity: AdvUnlearn's)
        overrides = {**overrides, **{m: {**overrides.get(m, {}), **o} for m, o in resolved.robust_overrides.items()}}
    mcfg = resolve_method_config(cls, on_toy=run.model == concepts.TOY_MODEL, preset_overrides=overrides,
                                 explicit=explicit)
    cls.check(mcfg, resolved)  # bad method options fail before any model is loaded
    # a closed-form method (UCE) has no lr or batch and one step per edit round
    run.steps, run.lr, run.batch_size = steps_of(mcfg), getattr(mcfg, "lr", None), getattr(mcfg, "batch_size", None)
    if run.output is None:
        name = resolved.name if len(resolved.name) <= 60 else f"{resolved.names[0]}+{len(resolved.names) - 1}-more"
        stem = f"{re.sub(r'[^A-Za-z0-9+._-]+', '_', name)}-{method}"
        run.output = str(Path("outputs") / (stem if cls.writes_folder else stem + ".safetensors"))
    if cls.writes_folder and run.output.endswith(".safetensors"):
        raise UserError(f"--method {method} writes a pipeline folder: --output must be a folder path (got {run.output})")
    if not cls.writes_folder and not run.output.endswith(".safetensors"):
        raise UserError(f"--output must end in .safetensors (got {run.output})")
    return Plan(run, resolved, mcfg, cls)


def steps_of(config) -> int:
    """The fit loop's iterations for a method config: its ``steps``, or ``rounds`` + 1 / one solve (closed form)."""
    if hasattr(config, "steps"):
        return config.steps
    return getattr(config, "rounds", 0) + 1


# the run options of --adversarial, by erasure.adversarial.AttackSettings field
_ATTACK_OPTIONS = {"every": "attack_every", "steps": "attack_steps", "lr": "attack_lr", "tokens": "attack_tokens",
                   "warmup": "attack_warmup", "images": "attack_images", "retain_weight": "retain_weight"}


def attack_options(run: TrainConfig) -> dict:
    """The run's ``--attack-*`` / ``--retain-weight`` values by :class:`erasure.adversarial.AttackSettings` field."""
    return {field: getattr(run, option) for field, option in _ATTACK_OPTIONS.items()}


def _check_adversarial(run: TrainConfig, cls: type[Method]) -> None:
    given = [_ATTACK_OPTIONS[k] for k, v in attack_options(run).items() if v is not None]
    if not run.adversarial:
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} is an option of --adversarial: add --adversarial")
        return
    if not cls.adversarial:
        names = ", ".join(n for n, m in METHODS.items() if m.adversarial)
        raise UserError(f"--adversarial trains on inner-attack prompts ({names}); --method {cls.name} does not")
    if run.fsdp:
        raise UserError("--adversarial runs unsharded: drop --fsdp")
    adversarial.settings(False, attack_options(run))  # bad values fail before any model is loaded


def _check_fsdp(run: TrainConfig, cls: type[Method]) -> None:
    if not run.fsdp:
        return
    if not cls.shardable:
        names = ", ".join(n for n, m in METHODS.items() if m.shardable)
        raise UserError(f"--fsdp shards full-weight training ({names}); --method {cls.name} trains too few weights to "
                        "need it: run it without --fsdp")
    if run.resume:
        raise UserError("--resume: sharded runs (--fsdp) write no checkpoints to resume from")
    if run.mixed_precision == "fp16":
        raise UserError("--fsdp takes --mixed-precision bf16 or no, not fp16 (its gradient scaler is not sharded)")


# ---------------------------------------------------------------------------------------------------------------
# running a plan


def _check_writable(path: Path) -> None:
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {folder}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder {folder} is not writable; choose another --output")


def _accelerator(run: TrainConfig) -> tuple[Accelerator, str]:
    device = run.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if run.mixed_precision == "fp16" and not device.startswith("cuda"):
        raise UserError("--mixed-precision fp16 needs a CUDA device; use bf16 on the CPU")
    if run.optimizer == "adam8bit":
        if not device.startswith("cuda"):
            raise UserError("--use-8bit-adam needs a CUDA device; on the CPU, --optimizer factored keeps a compact "
                            "optimiser state")
        import_bitsandbytes()
    # under gradient checkpointing, autocast's cache of half-precision weight copies would keep a copy of every
    # trained weight for the whole step; without it they live only while an op needs them
    autocast = AutocastKwargs(enabled=True, cache_enabled=not run.gradient_checkpointing)
    return Accelerator(mixed_precision=run.mixed_precision, cpu=device == "cpu", kwargs_handlers=[autocast]), device


WEIGHT_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def apply_levers(method: Method, run: TrainConfig) -> None:
    """The memory levers that act on a built method: frozen networks in the mixed-precision dtype, and gradient
    checkpointing on the networks it trains."""
    dtype = WEIGHT_DTYPES[run.mixed_precision]
    if dtype is not None:
        method.cast_frozen(dtype)
    if run.gradient_checkpointing:
        for module in method.trained_modules():  # diffusers' name, or transformers 5's (a trained text encoder)
            enable = getattr(module, "enable_gradient_checkpointing", None) or module.activation_checkpointing_enable
            enable()


def mask_path(output: Path) -> Path:
    """Where a run that computes a saliency mask writes it: beside its artifact, ``<name>.mask.safetensors``."""
    return output.with_name(output.name.removesuffix(".safetensors") + ".mask.safetensors")


def _use_mask(method: Method, run: TrainConfig, output: Path) -> None:
    """A given ``--mask`` confines the method; a method that computes its own (SalUn) does so at θ₀ and the mask is
    written beside the artifact, where ``--mask`` can reuse it (a resumed run reads it back)."""
    if run.mask:
        method.use_mask(load_mask(run.mask, method.unet), source=str(run.mask))
    elif method.computes_mask:
        path = mask_path(output)
        if run.resume and path.exists():
            mask = load_mask(path, method.unet)
        else:
            mask = method.compute_mask()
            if mask.fraction < 1.0:  # a mask that keeps every weight (the unmasked baseline) is not worth a file
                mask.save(path)
        method.use_mask(mask, source=str(path))


def execute(p: Plan) -> Result:
    """Load the base model, train ``p``'s method on it with :func:`fit`, write the artifact (main process) and the
    run record beside it, and remove the checkpoint."""
    run, output = p.run, p.output
    _check_writable(output)
    accelerator, device = _accelerator(run)
    sharding = sharding_for(accelerator, requested=run.fsdp, param_dtype=WEIGHT_DTYPES[run.mixed_precision])
    if sharding is not None and not run.fsdp:  # accelerate's FSDP plugin asked for it
        _check_fsdp(replace(run, fsdp=True), p.method)
    t0 = time.time()
    pipe = pipelines.load(run.model, device=device, attention=run.attention)
    ctx = Context(seed=run.seed, model_id=run.model, accelerator=accelerator,
                  quiet=run.quiet or not sys.stderr.isatty(), optimizer=run.optimizer, allow_tf32=run.allow_tf32,
                  scratch=str(output.parent))
    method = p.method(pipe, p.concept, p.config, ctx)
    try:
        adv_meta = {}
        if run.adversarial:  # before the levers: the concept's images are generated by the model as loaded
            s = adversarial.settings(run.model == concepts.TOY_MODEL, attack_options(run))
            method.adversary = adversarial.Adversary(method, s, run.seed)
            adv_meta["adversarial"] = asdict(s)
        apply_levers(method, run)
        with accelerator.autocast():
            _use_mask(method, run, output)
        if sharding is not None:
            method.shard(sharding)
        with tf32(True if run.allow_tf32 else None):
            history = fit(method, steps=steps_of(p.config), output=output, seed=run.seed, accelerator=accelerator,
                          checkpoint_every=0 if sharding else run.checkpoint_every, resume=run.resume, quiet=run.quiet)
        record = {"artifact": str(output), "seconds": round(time.time() - t0, 1),
                  "final_loss": history[-1] if history else None, "config": asdict(run),
                  "method_config": asdict(p.config), "loss": history, "processes": accelerator.num_processes,
                  "sharded": sharding is not None, **adv_meta, **method.summary()}
        if accelerator.is_main_process or sharding is not None:  # sharded: gathering is a collective, all take part
            result, meta, extra = method.artifact(run.model)
        if accelerator.is_main_process:
            meta["run"] = {k: v for k, v in asdict(run).items() if k not in _NOT_RECORDED}
            meta.update(adv_meta)  # the inner attack's settings of an adversarial run
            if p.folder:
                save_pipeline_folder(result, output, meta)
            else:
                save_artifact(output, result, meta, extra_strings=extra)
            checkpoint_path(output).unlink(missing_ok=True)
            write_text_atomic(record_path(output, p.folder), json.dumps(record, indent=2))
    finally:
        method.close()
    accelerator.wait_for_everyone()
    return Result(output, record)


def record_path(output: Path, folder: bool) -> Path:
    """The run record beside an artifact: ``x.json`` for ``x.safetensors``, ``x.json`` beside a folder ``x``."""
    return output.with_name(output.name + ".json") if folder else output.with_suffix(".json")


# ---------------------------------------------------------------------------------------------------------------
# the fit loop


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` of ``steps``: "constant" 1, or "cosine" from 1 down to 0."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))
    return 1.0


def _log_line(value) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k} {v:.5f}" for k, v in value.items())
    return f"loss {value:.5f}"


def fit(method: Method, *, steps: int, output: Path, seed: int, accelerator, checkpoint_every: int = 100,
        resume: bool = False, quiet: bool = False, log_every: int = 25) -> list:
    """Train ``method`` for ``steps`` iterations of its :meth:`~erasure.methods.base.Method.train_step` → the loss
    history (floats, or dicts for methods that log several losses). Checkpoints next to ``output`` every
    ``checkpoint_every`` steps (main process); ``resume`` continues bit-identically on CPU."""
    gen = torch.Generator().manual_seed(seed)
    optimizers = method.optimizers()
    for opt in optimizers.values():
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    ckpt = checkpoint_path(output)
    start, history = 0, []
    if resume and ckpt.exists():
        start, history = load_checkpoint(ckpt, method, optimizers, gen)
    main = accelerator.is_main_process
    bar = tqdm(total=steps, initial=start, desc=f"{method.name} {method.concept.name}", dynamic_ncols=True,
               disable=quiet or not main or not sys.stderr.isatty())
    t0 = time.time()
    schedule = getattr(method.config, "lr_schedule", "constant")
    for step in range(start, steps):
        for opt in optimizers.values():  # a function of the step alone: resuming needs no scheduler state
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(schedule, step, steps)
        adversary = method.adversary
        if adversary is not None and adversary.due(step):
            with accelerator.autocast():
                adversary.attack(step)
        loss = method.train_step(gen, optimizers, accelerator, step)
        if adversary is not None and adversary.last:  # the latest inner attack's success beside the losses
            loss = {**(loss if isinstance(loss, dict) else {"loss": loss}), **adversary.last}
        history.append(loss)
        bar.update()
        bar.set_postfix_str(_log_line(history[-1]))
        if main and not quiet and bar.disable and (step + 1) % log_every == 0:  # log lines where there is no bar
            print(f"step {step + 1}/{steps} {_log_line(history[-1])} ({time.time() - t0:.0f} s)", file=sys.stderr)
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps and main:
            save_checkpoint(ckpt, method, optimizers, step + 1, gen, history)
    bar.close()
    return history


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: one .safetensors file beside the output, of the trained tensors, the optimiser states and the RNG


def checkpoint_path(output: Path) -> Path:
    return output.with_name(output.name + ".ckpt.safetensors")


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """An optimiser's per-parameter state as tensors ``PREFIX/INDEX/KEY``."""
    state = opt.state_dict()["state"]
    return {f"{prefix}/{i}/{k}": v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, prefix: str) -> None:
    """The inverse of :func:`optimizer_tensors`."""
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith(prefix + "/"):
            i, key = k[len(prefix) + 1 :].split("/", 1)
            state.setdefault(int(i), {})[key] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(path: Path, method: Method, optimizers: dict, step: int, gen: torch.Generator,
                    history: list) -> None:
    tensors = dict(method.state_tensors())
    for prefix, opt in optimizers.items():
        tensors.update(optimizer_tensors(opt, prefix))
    meta = {"kind": "checkpoint", "checkpoint": {"step": step, "history": history}, "method": method.name,
            "config": asdict(method.config)}
    save_artifact(path, {**tensors, "rng": gen.get_state()}, meta)


def load_checkpoint(path: Path, method: Method, optimizers: dict, gen: torch.Generator) -> tuple[int, list]:
    """Restore a checkpoint of this run configuration → (step, history). A checkpoint of another configuration, or
    one that lacks what this run needs, is a one-line UserError."""
    art = load_artifact(path, kind="checkpoint")
    ck = art.metadata.get("checkpoint")
    if not ck or art.metadata.get("config") != asdict(method.config):
        raise UserError(f"{path}: checkpoint of another run configuration; delete it or drop --resume")
    try:
        method.load_state_tensors(art.tensors)
        for prefix, opt in optimizers.items():
            restore_optimizer(opt, art.tensors, prefix)
        gen.set_state(art.tensors["rng"])
    except KeyError as e:
        raise UserError(f"{path}: incomplete checkpoint (no {e}); delete it or drop --resume") from None
    return int(ck["step"]), list(ck["history"])
