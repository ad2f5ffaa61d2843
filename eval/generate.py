"""Seeded, batched image generation from any diffusers text-to-image pipeline.

Image ``i`` uses its own generator seeded with ``seed + i``, so an image does not depend on the batch it was made
in: the same prompt list and seed give the same images at any batch size.

:func:`generate` returns the images as an array. :func:`generate_to_folder` writes them as PNGs with a manifest,
resumes after a kill, and shards across processes; its command line::

    python -m eval.generate --model toy --prompts toy:circle --output out/ [--artifact FILE ...]
    accelerate launch --num_processes 4 -m eval.generate --model CompVis/stable-diffusion-v1-4 \\
        --prompts i2p.csv --output out/i2p          # process k of n takes every n-th batch
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

import pipelines
from adapters.artifact import load_artifact, write_bytes_atomic
from adapters.errors import UserError
from erasure.toyworld.models import GUIDANCE as TOY_GUIDANCE
from eval.prompts import PromptRecord, load_prompts
from pipelines.load import quiet_loading


def generate(pipe, prompts: Sequence[str], *, seed: int = 0, steps: int = 25, guidance: float = 7.5,
             batch_size: int = 64, negative_prompt: str | None = None, quiet: bool = True, **kwargs) -> np.ndarray:
    """Generate one image per prompt → uint8 array (N, H, W, 3)."""
    out = []
    device = getattr(pipe, "device", torch.device("cpu"))
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=quiet):
        chunk = list(prompts[start : start + batch_size])
        gens = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        latents = None
        if "latents" not in kwargs:  # draw per-image noise on the CPU: identical across devices and batch sizes
            shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
            latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, pipe.unet.dtype)
        images = pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance, output_type="np", latents=latents,
            negative_prompt=[negative_prompt] * len(chunk) if negative_prompt is not None else None, **kwargs,
        ).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# generation to a folder: PNGs + manifest, resumable, sharded
#
# Folder layout::
#
#     run.json                      settings that decide the images (refused on resume if they differ)
#     00000.png 00001.png …         one image per prompt record, named by its index
#     manifest.jsonl                index, prompt, seed, guidance, file, sha256 — one JSON line per image, by index
#     manifest-shard0of2.jsonl …    while a run is under way: each process's own append-only log
#
# Image ``i`` uses the record's own seed and guidance (I2P, COCO) or ``seed + i`` and the run's guidance, with its
# initial noise drawn on the CPU from that seed, as in :func:`generate`. Images are grouped into batches by guidance
# and then by index; the batches depend only on the prompt list and the batch size, so a resumed run and a sharded
# run compute every image in the same batch as one uninterrupted process does and write the same bytes.

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
_SHARD_LOG = "manifest-shard{k}of{n}.jsonl"


def image_name(index: int, total: int) -> str:
    """``00042.png``: zero-padded to at least 5 digits, so files sort by index."""
    return f"{index:0{max(5, len(str(max(total - 1, 0))))}d}.png"


def plan(records, *, seed: int = 0, guidance: float = 7.5) -> list[dict]:
    """Records (or plain strings) → one job per image: index, prompt, seed, guidance, file."""
    recs = [PromptRecord(r) if isinstance(r, str) else r for r in records]
    return [{"index": i, "prompt": r.text, "seed": r.seed if r.seed is not None else seed + i,
             "guidance": float(r.guidance if r.guidance is not None else guidance), "file": image_name(i, len(recs))}
            for i, r in enumerate(recs)]


def batches(jobs: Sequence[dict], batch_size: int) -> list[list[dict]]:
    """Jobs grouped by guidance (a pipeline call takes one scale), in index order, cut into ``batch_size`` pieces."""
    groups: dict[float, list[dict]] = {}
    for job in jobs:
        groups.setdefault(job["guidance"], []).append(job)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def shard(items: Sequence, index: int, count: int) -> list:
    """Process ``index`` of ``count`` takes every ``count``-th batch: disjoint slices that cover everything."""
    if not 0 <= index < count:
        raise UserError(f"shard index {index} is outside 0..{count - 1}")
    return list(items[index::count])


def read_manifest(folder: str | os.PathLike) -> list[dict]:
    """All finished images of a folder (the merged manifest and any shard logs), one entry per index, by index.

    An entry counts only if its image file exists; a torn last line of a killed run is ignored.
    """
    folder = Path(folder)
    entries: dict[int, dict] = {}
    for path in [folder / MANIFEST, *sorted(folder.glob(_SHARD_LOG.format(k="*", n="*")))]:
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and (folder / str(entry.get("file"))).is_file():
                entries[int(entry["index"])] = entry
    return [entries[i] for i in sorted(entries)]


def finalise(folder: str | os.PathLike, total: int) -> bool:
    """If all ``total`` images are done: write ``manifest.jsonl`` sorted by index (atomically), drop the shard logs."""
    folder = Path(folder)
    entries = read_manifest(folder)
    if [e["index"] for e in entries] != list(range(total)):
        return False
    write_bytes_atomic(folder / MANIFEST, "".join(json.dumps(e) + "\n" for e in entries).encode())
    for log in folder.glob(_SHARD_LOG.format(k="*", n="*")):
        log.unlink(missing_ok=True)
    return True


def generate_to_folder(pipe, records, output: str | os.PathLike, *, seed: int = 0, steps: int = 25,
                       guidance: float = 7.5, batch_size: int = 16, negative_prompt: str | None = None,
                       shard_index: int = 0, num_shards: int = 1, run_info: dict | None = None,
                       finalise_when_done: bool = True, quiet: bool = True,
                       on_image: Callable[[dict], None] | None = None, **kwargs) -> dict:
    """Generate one PNG per record into ``output``, resumably; this process does shard ``shard_index`` of ``num_shards``.

    - Each image is written to a temp file and moved into place with ``os.replace``; its manifest line is appended
      only after that, so a killed run never leaves a half-written image or entry. A rerun skips every image in the
      manifest whose file exists; a batch that was cut off is recomputed whole (its finished images are not
      rewritten), so every image comes from the same batch as in an uninterrupted run.
    - ``run_info`` (model, artifacts, …) is stored in ``run.json`` with the settings; resuming with other settings
      is refused with a :class:`UserError`. Bit-identical results also need the same ``batch_size`` and device.
    - ``on_image(entry)`` is called after each image's manifest line (progress hooks, tests).
    - With ``finalise_when_done`` the process that finds all images done writes the merged ``manifest.jsonl``.

    Returns ``{"total", "shard", "generated", "skipped", "complete", "output"}``.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    jobs = plan(records, seed=seed, guidance=guidance)
    if not jobs:
        raise UserError("no prompts to generate")
    out = _make_folder(output)
    _check_run(out, _settings(jobs, seed, steps, guidance, negative_prompt, kwargs, run_info), batch_size)
    mine = shard(batches(jobs, batch_size), shard_index, num_shards)
    done = {e["index"] for e in read_manifest(out)}
    todo = [b for b in mine if any(j["index"] not in done for j in b)]
    n_mine = sum(len(b) for b in mine)
    n_todo = sum(1 for b in todo for j in b if j["index"] not in done)
    log = out / _SHARD_LOG.format(k=shard_index, n=num_shards)
    for b in todo:  # stale temp files of this shard's unfinished images (only this process writes them)
        for j in b:
            (out / f".{j['file']}.tmp").unlink(missing_ok=True)
    with tqdm(total=n_mine, initial=n_mine - n_todo, desc="generate", disable=True if quiet else None) as bar:
        for b in todo:
            images = _run_batch(pipe, b, steps=steps, negative_prompt=negative_prompt, **kwargs)
            for job, image in zip(b, images):
                if job["index"] in done:
                    continue
                entry = {**job, "sha256": _write_png(out / job["file"], image)}
                _append_line(log, entry)
                bar.update(1)
                if on_image is not None:
                    on_image(entry)
    complete = finalise(out, len(jobs)) if finalise_when_done else False
    return {"total": len(jobs), "shard": [shard_index, num_shards], "generated": n_todo,
            "skipped": n_mine - n_todo, "complete": complete, "output": str(out)}


def _run_batch(pipe, jobs: Sequence[dict], *, steps: int, negative_prompt: str | None, **kwargs) -> np.ndarray:
    """One pipeline call for jobs of equal guidance; per-image CPU noise from each job's seed → uint8 (B, H, W, 3)."""
    device = getattr(pipe, "device", torch.device("cpu"))
    scale = getattr(pipe, "vae_scale_factor", 8)
    size = pipe.unet.config.sample_size
    h = kwargs.get("height", None) or size * scale
    w = kwargs.get("width", None) or size * scale
    shape = (pipe.unet.config.in_channels, h // scale, w // scale)
    noise = [torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(j["seed"])) for j in jobs]
    texts = [j["prompt"] for j in jobs]
    images = pipe(
        texts, num_inference_steps=steps, guidance_scale=jobs[0]["guidance"], output_type="np",
        latents=torch.stack(noise).to(device, pipe.unet.dtype),
        negative_prompt=[negative_prompt] * len(jobs) if negative_prompt is not None else None, **kwargs,
    ).images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def _settings(jobs, seed, steps, guidance, negative_prompt, kwargs, run_info) -> dict:
    digest = hashlib.sha256(json.dumps([[j["prompt"], j["seed"], j["guidance"]] for j in jobs]).encode()).hexdigest()
    settings = {"prompts": len(jobs), "prompts_sha256": digest, "seed": seed, "steps": steps, "guidance": guidance,
                "negative_prompt": negative_prompt, "pipeline_kwargs": {k: repr(v) for k, v in sorted(kwargs.items())},
                **(run_info or {})}
    return json.loads(json.dumps(settings))  # as run.json will hold it (tuples → lists), so comparisons are fair


def _check_run(out: Path, settings: dict, batch_size: int) -> None:
    """First run: write ``run.json``. Later runs: refuse settings that would give other images."""
    path = out / RUN_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{path}: unreadable run record; use an empty --output folder") from None
        for key in sorted(set(old) | set(settings)):
            if old.get(key) != settings.get(key):
                raise UserError(f"{out} holds a run with other settings ({key}: {old.get(key)!r} there, "
                                f"{settings.get(key)!r} now): use the same settings to resume, or a new --output")
        return
    write_bytes_atomic(path, (json.dumps({"settings": settings, "batch_size": batch_size}, indent=2) + "\n").encode())


def _make_folder(output) -> Path:
    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror or e}") from None
    return out


def _check_output(out: Path) -> None:
    """Refuse an output folder that cannot be made or written, without making it (the CLI makes it only once the
    model and its artifacts have loaded, so a refused run leaves nothing behind)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create output folder {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot create output folder {out}: {existing} is not writable")


def _write_png(path: Path, image: np.ndarray) -> str:
    """Write one image atomically (:func:`adapters.artifact.write_bytes_atomic`); returns the file's sha256."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    data = buf.getvalue()
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def _append_line(path: Path, entry: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _file_sha256(path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise UserError(f"cannot read artifact {path}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------------------------
# command line


DESCRIPTION = """\
Seeded, batched, resumable image generation to a folder: one PNG per prompt, manifest.jsonl (prompt, seed,
guidance, file and sha256 per image) and run.json (the settings that determine the images). Image i uses its row's
seed and guidance, else --seed + i and --guidance. Rerun the same command to resume; changed settings are refused.
Shard across processes with accelerate launch -m eval.generate (process k of n takes every n-th batch) or, without
accelerate, with --shard-index K --num-shards N: the merged folder is byte-identical to one process's."""

EXAMPLES = """\
Examples:
  python -m eval.generate --model toy --prompts toy:circle --output out/circle --artifact outputs/circle-spm.safetensors
  python -m eval.generate --model /path/to/stable-diffusion-v1-4 --prompts i2p.csv --output out/i2p --steps 50
  accelerate launch --num_processes 4 -m eval.generate --model /path/to/stable-diffusion-v1-4 \\
      --prompts coco_30k.csv --output out/coco                # 4 GPUs"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.generate", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", help="toy, a local diffusers folder, or a cached hub id")
    p.add_argument("--prompts", required=True, help="I2P CSV, COCO caption CSV, text file, or toy:CONCEPT[/GROUP]")
    p.add_argument("--output", required=True, help="folder for the PNGs and the manifest (resumed if it exists)")
    p.add_argument("--artifact", action="append", default=[], help="artifact(s) to apply first (repeatable)")
    p.add_argument("--category", help="I2P: keep rows with this category (e.g. sexual)")
    p.add_argument("--min-nudity", type=float, help="I2P: keep rows with nudity_percentage above this")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--seed", type=int, default=0, help="base seed: image i uses seed + i unless its row has a seed")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float,
                   help=f"CFG scale unless a row has its own (default: {TOY_GUIDANCE:g} toy, 7.5 else)")
    p.add_argument("--negative-prompt")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--scheduler", help="ddim, ddpm, euler, lms or dpm (default: the model's)")
    p.add_argument("--dtype", help="fp32 (default), fp16 or bf16")
    p.add_argument("--device", help="default: this process's accelerate device (cuda:k under accelerate launch)")
    p.add_argument("--shard-index", type=int, help="without accelerate: this process's shard (0-based)")
    p.add_argument("--num-shards", type=int, help="without accelerate: how many processes share the prompts")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _shards(args, state) -> tuple[int, int]:
    if args.shard_index is None and args.num_shards is None:
        return state.process_index, state.num_processes
    if args.shard_index is None or args.num_shards is None:
        raise UserError("--shard-index and --num-shards go together")
    if state.num_processes > 1:
        raise UserError("--shard-index/--num-shards are for runs without accelerate; accelerate launch shards itself")
    if args.num_shards < 1:
        raise UserError(f"--num-shards must be at least 1, got {args.num_shards}")
    return args.shard_index, args.num_shards


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quiet:
        quiet_loading()
    try:
        return _main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    records = load_prompts(args.prompts, category=args.category, min_nudity=args.min_nudity, limit=args.limit)
    want_cpu = args.device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=want_cpu)
    index, count = _shards(args, state)
    device = args.device or (None if state.device.type == "cpu" else state.device)
    info = {"model": str(args.model), "scheduler": args.scheduler, "dtype": args.dtype,  # artifacts checked first
            "artifacts": [[Path(a).name, _file_sha256(a)] for a in args.artifact]}
    arts = [load_artifact(a) for a in args.artifact]  # a bad file is refused before anything is loaded or written
    guidance = args.guidance if args.guidance is not None else _default_guidance(args.model)
    jobs = plan(records, seed=args.seed, guidance=guidance)
    settings = _settings(jobs, args.seed, args.steps, guidance, args.negative_prompt, {}, info)
    out = Path(args.output)
    _check_output(out)
    if (out / RUN_FILE).exists():  # refuse a mismatched folder before loading the model
        _check_run(out, settings, args.batch_size)
    pipe = pipelines.load(args.model, dtype=args.dtype, device=device, scheduler=args.scheduler)
    pipelines.apply(pipe, *arts)  # a file made for another base model is refused here, before the folder is written to
    _check_run(_make_folder(out), settings, args.batch_size)
    result = generate_to_folder(pipe, records, args.output, seed=args.seed, steps=args.steps, guidance=guidance,
                                batch_size=args.batch_size, negative_prompt=args.negative_prompt, shard_index=index,
                                num_shards=count, run_info=info, finalise_when_done=False,
                                quiet=args.quiet or not state.is_local_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        result["complete"] = finalise(args.output, result["total"])
        print(json.dumps(result))
    return 0


def _default_guidance(model) -> float:
    if str(model) == "toy":
        return TOY_GUIDANCE
    return 7.5


if __name__ == "__main__":
    sys.exit(main())
