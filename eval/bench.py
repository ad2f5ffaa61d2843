"""Membrane speed and memory, measured side by side in one run: ``python -m eval.bench``.

Every number is a ratio against the plain model measured in the same process, in interleaved rounds (each round
times every configuration once; the median over rounds is reported), so machine load affects them alike:

- ``forward``: UNet forward time with 1 membrane, with 8 membranes gated per prompt (facilitated transport gives every
  batch row its own γ), and with the membrane merged into the weights — each divided by the bare UNet's time;
- ``train_step``: one SPM training step (forward, backward, AdamW) with a rank-1 membrane divided by the same step with
  a plain peft LoRA of the same rank on the same layers;
- ``memory``: peak memory of a training step vs an inference step, each in a fresh process (RSS on CPU, sampled
  every millisecond; allocated memory on CUDA), in total and as the increase over the loaded model.

- ``one_step``: images per second of a one-step generator (``OneStepPipeline``, what SFD distils) against the
  teacher's 25-step classifier-free-guided DDIM sampler, with and without the VAE decode (``--one-step``; the
  generator's speed does not depend on its training, so the teacher UNet stands in for it).

Models: ``toy`` (the toy world's UNet, 8×8 latents) and ``sd1`` (a randomly initialised SD-1.x-shaped UNet, 860 M
parameters, 64×64 latents). Prints JSON; ``--output`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

import pipelines
from adapters import membrane
from adapters.artifact import write_text_atomic
from adapters.errors import UserError
from eval import bench_memory as training_memory
from erasure.toyworld.models import GUIDANCE
from pipelines.one_step import OneStepPipeline
from pipelines.testing import sd1_shaped_pipeline

TARGETS = {"forward_1": 1.05, "forward_8_transport": 1.15, "forward_merged": 1.00, "train_step_vs_peft": 1.2,
           "one_step_vs_teacher_images": 40.0}


def make_unet(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """→ (unet, latent side, text width)."""
    if model == "toy":
        unet = pipelines.load("toy", dtype=dtype, device=device).unet
    elif model == "sd1":
        torch.manual_seed(0)
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    else:
        raise ValueError(f"unknown bench model {model!r}: use toy or sd1")
    unet = unet.to(device, dtype).eval().requires_grad_(False)
    return unet, unet.config.sample_size, unet.config.cross_attention_dim


def inputs(unet, side: int, width: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p = next(unet.parameters())
    x = torch.randn(batch, unet.config.in_channels, side, side, generator=g).to(p.device, p.dtype)
    ehs = torch.randn(batch, 77, width, generator=g).to(p.device, p.dtype)
    t = torch.full((batch,), 500, device=p.device)
    return x, t, ehs


def attach_random(unet, names: Sequence[str], seed: int = 0) -> None:
    """Attach membranes with non-zero (seeded) up-projections, so they do real work."""
    g = torch.Generator().manual_seed(seed)
    for name in names:
        for branch in membrane.attach(unet, name).values():
            w = branch.lora_up.weight
            w.data.copy_((torch.randn(w.shape, generator=g) * 0.01).to(w.dtype))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], device: str, iters: int) -> float:
    fn()  # warm-up (allocator, caches)
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / iters


def interleaved(configs: dict[str, tuple[Callable[[], None], Callable[[], object]]], device: str, rounds: int,
                iters: int) -> dict[str, float]:
    """Median seconds per call of each config; ``configs[name] = (set_up, call)``; set_up runs before each timing."""
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, (set_up, call) in configs.items():
            set_up()
            times[name].append(_time(call, device, iters))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_forward(model: str, device: str, batch: int, rounds: int, iters: int) -> dict:
    unet, side, width = make_unet(model, device)
    x, t, ehs = inputs(unet, side, width, batch)
    names8 = [f"m{i}" for i in range(8)]
    gates = {n: torch.rand(batch, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(names8)}

    def bare():
        membrane.detach(unet)

    def one():
        bare()
        attach_random(unet, ["m0"])

    def eight():
        bare()
        attach_random(unet, names8)
        membrane.set_gates(unet, gates)  # per-row γ, as transport sets them

    def merged():  # merged for deployment: folded into the weights, wrappers removed
        bare()
        attach_random(unet, ["m0"])
        membrane.merge_and_unload(unet)

    def merged_kept():  # merged but still wrapped (so it can be unmerged)
        one()
        membrane.merge(unet)

    @torch.no_grad()
    def call():
        return unet(x, t, ehs).sample

    configs = {"none": (bare, call), "1": (one, call), "8_transport": (eight, call), "merged": (merged, call),
               "merged_kept": (merged_kept, call)}
    sec = interleaved(configs, device, rounds, iters)
    membrane.detach(unet)
    return {
        "seconds": {k: round(v, 5) for k, v in sec.items()},
        "ratio": {f"forward_{k}": round(sec[k] / sec["none"], 3) for k in ("1", "8_transport", "merged", "merged_kept")},
    }


def _peft_copy(unet):
    from peft import LoraConfig, inject_adapter_in_model  # heavy: peft takes seconds to import; only the LoRA baseline needs it

    paths = list(membrane.target_layers(unet))
    lora = copy.deepcopy(unet)
    inject_adapter_in_model(LoraConfig(r=1, lora_alpha=1, target_modules=paths, init_lora_weights=True), lora)
    return lora


def bench_train_step(model: str, device: str, batch: int, rounds: int, iters: int) -> dict:
    unet, side, width = make_unet(model, device)
    x, t, ehs = inputs(unet, side, width, batch)
    target = torch.randn_like(x)
    lora = _peft_copy(unet)
    membrane.attach(unet, "m")

    def trainer(net):
        params = [p for n, p in net.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            loss = torch.nn.functional.mse_loss(net(x, t, ehs).sample, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return sum(p.numel() for p in params), step

    n_ours, ours = trainer(unet)
    n_peft, peft = trainer(lora)
    sec = interleaved({"membrane": (lambda: None, ours), "peft_lora": (lambda: None, peft)}, device, rounds, iters)
    return {
        "seconds": {k: round(v, 5) for k, v in sec.items()},
        "trainable_parameters": {"membrane": n_ours, "peft_lora": n_peft},
        "ratio": {"train_step_vs_peft": round(sec["membrane"] / sec["peft_lora"], 3)},
    }


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RSSPeak:
    """Highest resident set size seen while the block runs (sampled every millisecond on a thread)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()

        def watch():
            while not self._stop.wait(0.001):
                self.peak = max(self.peak, _rss())

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _step_memory(model: str, device: str, batch: int, mode: str) -> tuple[int, int]:
    """Run one inference or training step in this process → (memory before it, peak during it), bytes: RSS on
    CPU, allocated memory on CUDA. The difference is what the step itself needs."""
    unet, side, width = make_unet(model, device)
    x, t, ehs = inputs(unet, side, width, batch)
    branches = membrane.attach(unet, "m")
    params = [p for b in branches.values() for p in b.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        if mode == "train":
            for p in params:
                p.requires_grad_(True)
            unet(x, t, ehs).sample.float().pow(2).mean().backward()
            opt.step()
        else:
            with torch.no_grad():
                unet(x, t, ehs)

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return before, torch.cuda.max_memory_allocated()
    before = _rss()
    with _RSSPeak() as watch:
        step()
    return before, watch.peak


def bench_memory(model: str, device: str, batch: int) -> dict:
    """Each mode in a fresh process, so one peak does not hide the other."""
    before, peak = {}, {}
    for mode in ("inference", "train"):
        cmd = [sys.executable, "-m", "eval.bench", "--peak-memory", mode, "--models", model, "--device", device,
               "--batch", str(batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
        before[mode], peak[mode] = (int(v) for v in out.stdout.strip().splitlines()[-1].split())
    step = {k: peak[k] - before[k] for k in peak}
    kind = "cuda_allocated" if device.startswith("cuda") else "rss"
    return {
        f"{kind}_peak_mib": {k: round(v / 2**20, 1) for k, v in peak.items()},
        f"{kind}_step_increase_mib": {k: round(v / 2**20, 1) for k, v in step.items()},
        "ratio": {"train_vs_inference_peak": round(peak["train"] / peak["inference"], 3),
                  "train_vs_inference_step": round(step["train"] / max(1, step["inference"]), 3)},
    }


def _pipeline(model: str, device: str):
    pipe = pipelines.load("toy") if model == "toy" else sd1_shaped_pipeline()
    return pipe.to(device)


@torch.no_grad()
def bench_one_step(model: str, device: str, batch: int, rounds: int, iters: int, steps: int = 25,
                   size: int | None = None) -> dict:
    """One-step generator vs the teacher's ``steps``-step CFG sampler, side by side (images per second); ``size``:
    the image side in pixels (default: the model's own, 32 toy, 512 sd1)."""
    pipe = _pipeline(model, device)
    student = OneStepPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                              scheduler=DDPMScheduler.from_config(pipe.scheduler.config))
    prompts = ["a red circle"] * batch
    guidance = GUIDANCE if model == "toy" else 7.5
    side = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    hw = {"height": side, "width": side}

    def teacher(kind):
        return lambda: pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type=kind, **hw)

    def one(kind):
        return lambda: student(prompts, output_type=kind, **hw)

    noop = lambda: None  # noqa: E731
    configs = {"teacher_images": (noop, teacher("np")), "one_step_images": (noop, one("np")),
               "teacher_latents": (noop, teacher("latent")), "one_step_latents": (noop, one("latent"))}
    sec = interleaved(configs, device, rounds, iters)
    return {
        "teacher": f"{steps}-step DDIM, CFG {guidance}", "image_side": side,
        "images_per_second": {k: round(batch / v, 3) for k, v in sec.items()},
        "ratio": {"one_step_vs_teacher_images": round(sec["teacher_images"] / sec["one_step_images"], 2),
                  "one_step_vs_teacher_latents": round(sec["teacher_latents"] / sec["one_step_latents"], 2)},
    }


def run(models: Sequence[str], device: str = "cpu", batch: int = 2, rounds: int = 5, iters: int = 3,
        memory: bool = True, one_step: bool = False, only_one_step: bool = False, size: int | None = None) -> dict:
    report = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": batch,
              "rounds": rounds, "targets": TARGETS, "models": {}}
    for model in models:
        scale = 1 if model == "sd1" else 4  # the toy UNet is fast: more calls per timing
        r = {}
        if not only_one_step:
            r["forward"] = bench_forward(model, device, batch, rounds, iters * scale)
            r["train_step"] = bench_train_step(model, device, batch, rounds, iters * scale)
            if memory:
                r["memory"] = bench_memory(model, device, batch)
        if one_step or only_one_step:
            r["one_step"] = bench_one_step(model, device, batch, rounds, 1 if model == "sd1" else iters,
                                           size=None if model == "toy" else size)
        report["models"][model] = r
    return report


DESCRIPTION = """\
Membrane speed and memory, measured side by side in one run. Every figure is a ratio against the plain model
measured in the same process, in interleaved rounds (median over rounds), so machine load affects the compared
configurations alike: UNet forward with 1 membrane, 8 gated membranes and a merged one; an SPM training step against
a plain LoRA step; peak memory of training against inference; with --one-step, a one-step generator's images per
second against the 25-step CFG teacher. --memory instead measures one full-size training step per method, each in a
fresh process, at fp32 and with the memory levers. Models: toy and sd1 (a random SD-1.x-shaped UNet); with
--memory, tiny, sd1 and sdxl. Prints JSON."""

EXAMPLES = """\
Examples:
  python -m eval.bench --models toy                         # membrane speed and memory ratios
  python -m eval.bench --models toy --one-step              # + one-step generator vs the 25-step teacher
  python -m eval.bench --memory --models sd1 --methods spm,esd   # training memory per method, full size
  python -m eval.bench --memory --models sd1 --levers levers --adversarial   # with an inner attack in the step"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.bench", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated: toy, sd1 (default: both); with --memory: tiny, sd1, sdxl "
                                    "(default: sd1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3, help="calls per timing (×4 on the toy UNet)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--one-step", action="store_true", help="also time a one-step generator against the 25-step teacher")
    p.add_argument("--only-one-step", action="store_true", help="time only the one-step generator against the teacher")
    p.add_argument("--size", type=int, help="sd1 one-step timing: image side in pixels (default 512; a multiple of 8)")
    p.add_argument("--output", help="also write the JSON report here")
    p.add_argument("--peak-memory", choices=("inference", "train"), help=argparse.SUPPRESS)
    m = p.add_argument_group("training memory (--memory): one full-size training step per method, each in a fresh "
                             "process, at fp32 and with the memory levers (models: tiny, sd1, sdxl)")
    m.add_argument("--memory", action="store_true", help="run the training-memory bench instead of the speed ratios")
    m.add_argument("--methods", default=",".join(training_memory.METHODS), help="comma-separated (default: all)")
    m.add_argument("--levers", default=",".join(training_memory.LEVERS), help="lever sets: fp32, levers (default: both)")
    m.add_argument("--cache", help="folder of the saved random pipelines (default ~/.cache/erasure/bench-models)")
    m.add_argument("--limit-gb", type=float, help="stop a case whose memory passes this (default: 90%% of RAM)")
    m.add_argument("--adversarial", action="store_true",
                   help="each step after one inner-attack step (--adversarial training); methods: "
                        f"{', '.join(training_memory.ADVERSARIAL)} (default: all of them)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models = [m.strip() for m in (args.models or ("sd1" if args.memory else "toy,sd1")).split(",") if m.strip()]
    if args.memory:
        return _memory_main(args, models)
    bad = [m for m in models if m not in ("toy", "sd1")]
    if bad or not models:
        print(f"error: unknown bench model(s) {bad or args.models!r}: use toy and/or sd1", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available here", file=sys.stderr)
        return 2
    if args.peak_memory:
        print(*_step_memory(models[0], args.device, args.batch, args.peak_memory))
        return 0
    if args.size is not None and (args.size < 64 or args.size % 8):
        print(f"error: --size {args.size}: use a multiple of 8, at least 64", file=sys.stderr)
        return 2
    report = run(models, args.device, args.batch, args.rounds, args.iters, memory=not args.no_memory,
                 one_step=args.one_step, only_one_step=args.only_one_step, size=args.size)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        try:
            write_text_atomic(args.output, text + "\n")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


def _memory_main(args, models: list[str]) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    levers = [m.strip() for m in args.levers.split(",") if m.strip()]
    known = training_memory.ADVERSARIAL if args.adversarial else training_memory.METHODS
    if args.adversarial and args.methods == build_parser().get_default("methods"):
        methods = list(known)
    for given, allowed, what in ((models, training_memory.MODELS, "model"), (methods, known, "method"),
                                 (levers, tuple(training_memory.LEVERS), "lever set")):
        bad = [x for x in given if x not in allowed]
        if bad or not given:
            print(f"error: unknown --memory {what}(s) {bad or given!r}: choose from {', '.join(allowed)}", file=sys.stderr)
            return 2
    report = training_memory.bench(models, methods, Path(args.cache) if args.cache else None, args.limit_gb, levers,
                                   adversarial=args.adversarial)
    text = json.dumps(report, indent=2)
    print(text)
    print(training_memory.table(report))
    if args.output:
        try:
            write_text_atomic(args.output, text + "\n")
            write_text_atomic(Path(args.output).with_suffix(".md"), training_memory.table(report))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
