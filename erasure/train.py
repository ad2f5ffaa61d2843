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
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Sequence

from adapters.errors import UserError
from erasure.config import METHOD_CONFIGS, TrainConfig, resolve_method_config

METHODS = {"esd": "erasure.methods.esd:ESD", "spm": "erasure.methods.spm:SPM"}


def _method_class(name: str):
    import importlib

    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _add_field(p: argparse.ArgumentParser, f, seen: set) -> None:
    if f.name in seen:
        return
    seen.add(f.name)
    flag = "--" + f.name.replace("_", "-")
    meta = dict(f.metadata)
    help_ = meta.get("help", "")
    default = None if f.default is MISSING else f.default
    if f.type in (bool, "bool"):
        p.add_argument(flag, action="store_true", default=None, help=help_)
        return
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    conv = float if "float" in kind else int if "int" in kind else str
    p.add_argument(flag, type=conv, default=None, choices=meta.get("choices"),
                   help=f"{help_} [default: {default}]" if default is not None else help_)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m erasure.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    seen: set = set()
    for f in fields(TrainConfig):
        _add_field(p, f, seen)
    for name, cls in METHOD_CONFIGS.items():
        g = p.add_argument_group(f"{name} options")
        for f in fields(cls):
            _add_field(g, f, seen)
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
    concept = concepts.resolve(run.concept, run.model)
    run.model = run.model or concept.default_model
    explicit = {k: v for k, v in args.items() if k in method_names}
    mcfg = resolve_method_config(run.method, on_toy=run.model == concepts.TOY_MODEL,
                                 preset_overrides=concept.method_overrides, explicit=explicit)
    run.steps, run.lr, run.batch_size = mcfg.steps, mcfg.lr, mcfg.batch_size
    if run.output is None:
        run.output = str(Path("outputs") / f"{concept.name.replace(' ', '_')}-{run.method}.safetensors")
    if not run.output.endswith(".safetensors"):
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
    method = _method_class(run.method)(pipe, concept, mcfg, run)
    history = fit(method, steps=mcfg.steps, lr=mcfg.lr, output=output, seed=run.seed, accelerator=accelerator,
                  checkpoint_every=run.checkpoint_every, resume=run.resume, quiet=run.quiet)
    tensors, meta, extra = method.artifact(run.model)
    meta["run"] = {k: v for k, v in asdict(run).items() if k not in ("dry_run", "quiet", "resume")}
    save_artifact(output, tensors, meta, extra_strings=extra)
    remove_checkpoint(output)
    record = {"artifact": str(output), "seconds": round(time.time() - t0, 1), "final_loss": history[-1] if history else None,
              "config": asdict(run), "method_config": asdict(mcfg), "loss": history}
    _write_json(output.with_suffix(".json"), record)
    return record


def _write_json(path: Path, obj) -> None:
    from adapters.artifact import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run, concept, mcfg = resolve(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
