"""``python -m erasure.train``: erase a concept from a text-to-image model and write a ``.safetensors`` artifact.

    python -m erasure.train --concept circle                 # the embedded toy world, a few minutes on 2 cores
    python -m erasure.train --concept nudity --model /path/to/stable-diffusion-v1-4
    python -m erasure.train --concept circle --dry-run       # print the resolved configuration

parse → TrainConfig + the method's config → method.fit → artifact (+ a JSON run record beside it).
User errors exit with status 2 and one line; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path
from typing import Sequence

from adapters.errors import UserError
from erasure.config import METHOD_CONFIGS, TrainConfig, resolve_method_config

METHODS = {"esd": "erasure.methods.esd:ESD", "spm": "erasure.methods.spm:SPM", "salun": "erasure.methods.salun:SalUn",
           "sfd": "erasure.methods.sfd:SFD"}
FOLDER_METHODS = ("sfd",)  # methods whose result is a whole pipeline folder, not a .safetensors artifact
MASKABLE = ("esd", "salun")  # methods that fine-tune weights, so a saliency mask can confine them


def _method_class(name: str):
    import importlib

    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _add_field(p, f, choices=None, help_=None) -> None:
    flag = "--" + f.name.replace("_", "-")
    meta = dict(f.metadata)
    help_ = help_ or meta.get("help", "")
    default = None if f.default is MISSING else f.default
    if f.type in (bool, "bool"):
        p.add_argument(flag, action="store_true", default=None, help=help_)
        return
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    conv = float if "float" in kind else int if "int" in kind else str
    p.add_argument(flag, type=conv, default=None, choices=choices or meta.get("choices"),
                   help=f"{help_} [default: {default}]" if default is not None else help_)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m erasure.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        _add_field(p, f)
    # an option several methods share (--steps, --variant, ...) is one flag: its choices are the union, and each
    # method checks its own (resolve_method_config)
    owners: dict[str, list] = {}
    for name, cls in METHOD_CONFIGS.items():
        for f in fields(cls):
            owners.setdefault(f.name, []).append((name, f))
    seen = {f.name for f in fields(TrainConfig)}
    for name, cls in METHOD_CONFIGS.items():
        g = p.add_argument_group(f"{name} options")
        for f in fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            shared = owners[f.name]
            choices = [c for _, g_ in shared for c in g_.metadata.get("choices") or ()]
            help_ = None
            if len(shared) > 1:
                help_ = "; ".join(f"{m}: {g_.metadata.get('help', '')} [default: {g_.default}]" for m, g_ in shared)
            _add_field(g, f, list(dict.fromkeys(choices)) or None, help_)
    return p


def resolve(argv: Sequence[str] | None = None):
    """argv → (TrainConfig, Concept, method config). Raises UserError for bad combinations."""
    from erasure import concepts

    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    run_names = {f.name for f in fields(TrainConfig)}
    run = TrainConfig(**{k: v for k, v in args.items() if k in run_names})
    method_names = {f.name for f in fields(METHOD_CONFIGS[run.method])}
    stray = [k for k in args if k not in run_names and k not in method_names]
    if stray:
        raise UserError(f"--{stray[0].replace('_', '-')} is not an option of --method {run.method}")
    if run.mask and run.method not in MASKABLE:
        raise UserError(f"--mask confines weight fine-tuning ({', '.join(MASKABLE)}); --method {run.method} trains "
                        "an adapter")
    if run.mask:  # a bad mask file fails before any model is loaded
        from adapters.saliency import load_mask

        load_mask(run.mask)
    concept = concepts.resolve(run.concept, run.model)
    if run.prompts is not None:
        texts = tuple(t.strip() for t in run.prompts.split("|") if t.strip())
        if not texts:
            raise UserError("--prompts is empty: pass prompts separated by '|', e.g. --prompts 'a circle|circle'")
        concept = replace(concept, prompts=texts)
    run.model = run.model or concept.default_model
    explicit = {k: v for k, v in args.items() if k in method_names}
    mcfg = resolve_method_config(run.method, on_toy=run.model == concepts.TOY_MODEL,
                                 preset_overrides=concept.method_overrides, explicit=explicit)
    if run.method in ("spm", "sfd"):  # bad method options fail before any model is loaded
        from importlib import import_module

        import_module(f"erasure.methods.{run.method}").check_config(mcfg, concept)
    run.steps, run.lr, run.batch_size = mcfg.steps, mcfg.lr, mcfg.batch_size
    folder = run.method in FOLDER_METHODS
    if run.output is None:
        stem = f"{concept.name.replace(' ', '_')}-{run.method}"
        run.output = str(Path("outputs") / (stem if folder else stem + ".safetensors"))
    if folder and run.output.endswith(".safetensors"):
        raise UserError(f"--method {run.method} writes a pipeline folder: --output must be a folder path (got {run.output})")
    if not folder and not run.output.endswith(".safetensors"):
        raise UserError(f"--output must end in .safetensors (got {run.output})")
    return run, concept, mcfg


def _check_writable(path: Path) -> None:
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {folder}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder {folder} is not writable; choose another --output")


def _accelerator(run: TrainConfig):
    import torch
    from accelerate import Accelerator

    device = run.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if run.mixed_precision == "fp16" and not device.startswith("cuda"):
        raise UserError("--mixed-precision fp16 needs a CUDA device; use bf16 on the CPU")
    return Accelerator(mixed_precision=run.mixed_precision, cpu=device == "cpu"), device


def train(run: TrainConfig, concept, mcfg) -> dict:
    """Run one erasure and write its artifact; returns the run record."""
    import pipelines
    from adapters.artifact import save_artifact
    from erasure.methods.base import fit, remove_checkpoint

    output = Path(run.output)
    _check_writable(output)
    accelerator, device = _accelerator(run)
    t0 = time.time()
    pipe = pipelines.load(run.model, device=device, attention=run.attention)
    if run.method in FOLDER_METHODS:
        return _train_folder(run, concept, mcfg, pipe, accelerator, output, t0)
    method = _method_class(run.method)(pipe, concept, mcfg, run)
    history = fit(method, steps=mcfg.steps, lr=mcfg.lr, output=output, seed=run.seed, accelerator=accelerator,
                  checkpoint_every=run.checkpoint_every, resume=run.resume, quiet=run.quiet)
    tensors, meta, extra = method.artifact(run.model)
    meta["run"] = {k: v for k, v in asdict(run).items() if k not in ("dry_run", "quiet", "resume")}
    save_artifact(output, tensors, meta, extra_strings=extra)
    remove_checkpoint(output)
    record = {"artifact": str(output), "seconds": round(time.time() - t0, 1), "final_loss": history[-1] if history else None,
              "config": asdict(run), "method_config": asdict(mcfg), "loss": history}
    mask = getattr(method, "mask", None)
    if mask is not None:
        record["mask"] = {"path": method.mask_source, **mask.summary(method.mask_source)}
    _write_json(output.with_suffix(".json"), record)
    return record


def _train_folder(run, concept, mcfg, pipe, accelerator, output: Path, t0: float) -> dict:
    """Distillation (SFD): train, then write the one-step pipeline folder atomically (main process only)."""
    method = _method_class(run.method)(pipe, concept, mcfg, run, accelerator)
    history = method.fit(output, resume=run.resume, checkpoint_every=run.checkpoint_every, quiet=run.quiet)
    record = {"artifact": str(output), "seconds": round(time.time() - t0, 1), "final_loss": history[-1] if history else None,
              "config": asdict(run), "method_config": asdict(mcfg), "loss": history,
              "processes": accelerator.num_processes}
    if accelerator.is_main_process:
        meta = method.metadata(run.model)
        meta["run"] = {k: v for k, v in asdict(run).items() if k not in ("dry_run", "quiet", "resume")}
        _save_folder_atomic(method.student(), output, meta)
        output.with_name(output.name + ".ckpt.safetensors").unlink(missing_ok=True)
        _write_json(output.with_name(output.name + ".json"), record)
    accelerator.wait_for_everyone()
    return record


def _save_folder_atomic(pipe, output: Path, meta: dict) -> None:
    """save_pretrained into a temp sibling, then swap it in: a folder is never half-written."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "erasure.json").write_text(json.dumps(meta, indent=2, default=str))
        old = output.with_name(f".{output.name}.old")
        if output.exists():
            shutil.rmtree(old, ignore_errors=True)
            output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, obj) -> None:
    from adapters.artifact import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run, concept, mcfg = resolve(argv)
        if run.quiet:
            from pipelines.load import quiet_loading

            quiet_loading()
        if run.dry_run:
            print(json.dumps({"run": asdict(run), run.method: asdict(mcfg), "concept": asdict(concept)}, indent=2))
            return 0
        record = train(run, concept, mcfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130
    if not run.quiet:
        print(f"erased '{concept.name}' with {run.method} in {record['seconds']} s → {record['artifact']}")
        if "mask" in record:
            m = record["mask"]
            size = f", {m['bytes_on_disk'] / 2**20:.1f} MiB" if "bytes_on_disk" in m else ""
            print(f"saliency mask: keeps {100 * m['kept_fraction']:.1f} % of {m['parameters']:,} weights{size} "
                  f"→ {m['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
