"""Rebuild every toy-world weight from seeds: ``python -m erasure.toyworld.build``.

Stages (each writes its weights atomically, so an interrupted build resumes at the first missing stage):

1. ``vae``   — AutoencoderKL on data images (MSE + L1, a tiny L2 on the latents), then the latent scaling factor is
   measured.
2. ``unet``  — with ``--text-pretrain-steps N``, the CLIP text encoder first learns captions contrastively against a
   small image tower (SD's text encoder is CLIP's); then text encoder (lr ``--text-lr``) and UNet train jointly on
   VAE latents of captioned images (ε-prediction, SD's noise schedule, 10 % caption dropout for classifier-free
   guidance, EMA); then ``refine``: the UNet alone, with the text encoder frozen and every caption's conditioning
   computed once; ``--polish-rounds N``: N more rounds of the UNet alone, each a fresh warm-up + cosine schedule, on
   timesteps t < ``--polish-t-max`` (README, "Base world").
3. ``judge`` — the multi-label judge on data images, their VAE reconstructions, and negatives.
4. ``clip``  — a tiny open_clip CLIP trained contrastively on the captions.

The defaults are the committed build's recipe, and the weights depend on the seeds and ``--threads`` alone: the main
process's thread count follows the stage and step, never the helper process's progress (CPU kernels round
differently with another thread count), so builds — resumed or not, with ``--jobs 1`` or 2 — make the same
``.safetensors`` files byte for byte (with the same torch build on the same kind of CPU); the committed weights are
such a build at the defaults (run in three parts: to the UNet refine, then each polish round resumed).
``--scale 0.01`` runs a smoke build (tests use it on a temp folder).

The recipe is :class:`erasure.toyworld.recipe.BuildConfig`, the stages and their losses are in
:mod:`erasure.toyworld.stages`, the thread schedule in :mod:`erasure.toyworld.threads`; this module runs the stages
(the helper process, resuming) and is the command line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from erasure.toyworld import data
from erasure.toyworld.recipe import BuildConfig
from erasure.toyworld.stages import (contrastive_loss, diffusion_loss, encode_latents, held_out_pairs_set, judge_set,
                                     pretrain_text_encoder, refine_unet, train_clip, train_judge, train_unet, train_vae)
from erasure.toyworld.threads import Threads
from erasure.toyworld.tokenizer import clip_tokenizer

__all__ = ["BuildConfig", "build", "main", "train_vae", "pretrain_text_encoder", "train_unet", "refine_unet",
           "train_judge", "train_clip", "judge_set", "held_out_pairs_set", "encode_latents", "diffusion_loss",
           "contrastive_loss"]


def _load_vae(out: Path, wait: bool = False):
    """The stage-1 VAE from ``out``, rounded to the fp16 weights that ship (stage 1 writes fp32, the pipeline fp16:
    the judge reads the same VAE whenever it loads it); with ``wait``, block until the main process has written it."""
    folder = out / "pipeline" / "vae"
    while True:
        try:
            vae = AutoencoderKL.from_pretrained(folder, dtype=torch.float32)
            return vae.half().float().eval().requires_grad_(False)
        except (OSError, ValueError):  # not written yet (or being replaced): the folder appears atomically
            if not wait:
                raise
            time.sleep(2)


def _judge_and_clip(cfg: BuildConfig, images: np.ndarray, captions: list[str], wait: bool = False) -> dict:
    """Stages 3 and 4. CLIP needs only the data, so it runs first; the judge reads VAE reconstructions."""
    out, report = Path(cfg.output), {}
    t = time.time()
    if not (out / "clip" / "clip.safetensors").exists():
        report.update(train_clip(cfg, images, captions, out))
    report["clip_s"] = round(time.time() - t, 1)
    vae = _load_vae(out, wait)
    t = time.time()
    if not (out / "judge" / "judge.safetensors").exists():
        train_judge(cfg, vae, out)
    report["judge_s"] = round(time.time() - t, 1)
    return report


def _helper_process(cfg_fields: dict, images_path: str, captions_path: str) -> dict:
    """Entry point of the helper process (one torch thread): judge and CLIP beside the main process's VAE / UNet."""
    torch.set_num_threads(1)
    cfg = BuildConfig(**cfg_fields)
    images = np.load(images_path, mmap_mode="r")
    captions = json.loads(Path(captions_path).read_text())
    return _judge_and_clip(cfg, images, captions, wait=True)


def build(cfg: BuildConfig) -> dict:
    full_threads = cfg.threads or torch.get_num_threads()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    report, stages = {"config": asdict(cfg)}, {}
    prev = json.loads((out / "build_report.json").read_text()) if (out / "build_report.json").exists() else {}
    t0 = time.time()
    images, scenes = data.make_dataset(cfg.scaled("n_images"), cfg.seed)
    captions = [s.caption for s in scenes]
    stages["data"] = round(time.time() - t0, 1)
    cfg.log(f"data: {len(images)} images in {stages['data']} s")
    helper_needed = not ((out / "judge" / "judge.safetensors").exists() and (out / "clip" / "clip.safetensors").exists())
    pool = tmp = helper = None
    try:
        if cfg.jobs > 1 and helper_needed:
            tmp = Path(tempfile.mkdtemp(prefix="toy-build-"))
            np.save(tmp / "images.npy", images)
            (tmp / "captions.json").write_text(json.dumps(captions))
            pool = multiprocessing.get_context("spawn").Pool(1)
            helper = pool.apply_async(_helper_process, (asdict(cfg), str(tmp / "images.npy"), str(tmp / "captions.json")))
            cfg.log("judge and CLIP: training in a helper process")
        threads = Threads(full_threads, helper, out / "clip" / "clip.safetensors")
        t = time.time()
        if not (out / "pipeline" / "vae" / "config.json").exists():
            report.update(train_vae(cfg, images, out, threads))
        vae = _load_vae(out)  # the fp16-rounded weights that ship, whether trained now or by an earlier run
        stages["vae"] = round(time.time() - t, 1)
        if helper is None and helper_needed:  # --jobs 1: here, on one thread, with the VAE as the helper reads it
            threads.one()
            report.update(_judge_and_clip(cfg, images, captions))
        t = time.time()
        if not (out / "pipeline" / "unet" / "config.json").exists():
            report.update(train_unet(cfg, vae, images, scenes, clip_tokenizer(), out, threads))
        stages["unet"] = round(time.time() - t, 1)
        t = time.time()
        if not (out / "pipeline" / "refined.json").exists():
            report.update(refine_unet(cfg, vae, images, scenes, out, threads))
        stages["refine"] = round(time.time() - t, 1)
        for r in range(1, cfg.polish_rounds + 1):
            t = time.time()
            if not (out / "pipeline" / f"polished-{r}.json").exists():
                report.update(refine_unet(cfg, vae, images, scenes, out, threads, round_=r))
            stages[f"polish_{r}"] = round(time.time() - t, 1)
        t = time.time()
        if helper is not None:
            report.update(helper.get())  # re-raises the helper's error, if any
            stages["wait_for_judge_and_clip"] = round(time.time() - t, 1)
    finally:
        if pool is not None:
            pool.terminate()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for k in ("clip_s", "judge_s"):
        if k in report:
            stages[k[:-2]] = report.pop(k)
    report["stages_s"] = stages
    report["total_s"] = round(time.time() - t0, 1)
    report["note"] = ("judge and CLIP train in a helper process beside the VAE and UNet stages (jobs=2), so their "
                      "times overlap the others; total_s is the wall-clock time; the main process runs the first "
                      "clip_wait_step VAE steps and the first helper_steps joint UNet steps on one thread, the rest "
                      "on `threads`")
    if prev:  # a resumed build: what earlier runs built, and how long it took them, stays in the report
        resumed = {k: v for k, v in prev.items() if k not in ("config", "stages_s", "total_s", "note", "runs")}
        report = {**resumed, **report, "runs": [*prev.get("runs", [prev.get("stages_s", {})]), stages]}
        report["note"] += "; a resumed build: runs lists each run's stage times (a stage found built takes ~0 s)"
    (out / "build_report.json").write_text(json.dumps(report, indent=2))
    cfg.log(f"built in {report['total_s']} s → {out}")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m erasure.toyworld.build", description=__doc__.split("\n")[0])
    for name, f in BuildConfig.__dataclass_fields__.items():
        if f.type in ("bool", bool):
            p.add_argument(f"--{name.replace('_', '-')}", action="store_true")
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=f.default)
    args = p.parse_args(argv)
    build(BuildConfig(**vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
