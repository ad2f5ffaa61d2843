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
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from erasure.toyworld import data, models
from erasure.toyworld.paths import WEIGHTS_DIR


@dataclass
class BuildConfig:
    output: str = str(WEIGHTS_DIR)
    seed: int = 0
    n_images: int = 60000  # diffusion training set (seeded procedural images)
    n_judge: int = 24000  # judge positives; negatives are 40 % more
    vae_steps: int = 2500
    vae_batch: int = 32
    unet_steps: int = 1600
    unet_batch: int = 128
    unet_lr: float = 1e-3
    text_lr: float = 2e-4  # the text encoder's lr in the joint stage (gentle: keeps what pretraining learned)
    text_pretrain_steps: int = 1500  # > 0: pretrain the text encoder contrastively first (README, "Base world")
    refine_steps: int = 800  # UNet-only steps with the text encoder frozen (stage 2b)
    refine_lr: float = 5e-4
    polish_rounds: int = 2  # UNet-only rounds (stage 2c), each a fresh warm-up + cosine; the fill bar (README)
    polish_steps: int = 1200
    polish_lr: float = 3e-4
    polish_t_max: int = 500  # polish rounds train on timesteps [0, polish_t_max), where the fill detail is drawn
    judge_steps: int = 1200
    judge_batch: int = 128
    clip_steps: int = 1000
    scale: float = 1.0  # multiplies every size and step count (smoke builds)
    threads: int = 2  # torch threads of the main process's full-speed stages (the weights depend on it: CPU kernels
    #                   round differently with another thread count)
    jobs: int = 2  # 2: train the judge and CLIP in a helper process beside the VAE / UNet stages (same weights as 1)
    clip_wait_step: int = 900  # VAE steps run on one thread beside the helper's CLIP before the main process waits
    #                            for CLIP and takes every thread until the VAE is written (the helper then waits)
    helper_steps: int = 2  # joint UNet steps run on one thread (after the text-encoder pretraining, which also runs
    #                        on one thread, beside the helper's judge) before the main process waits for the helper
    #                        and takes every thread (fixed steps: the weights do not depend on timing)
    quiet: bool = False

    def scaled(self, name: str) -> int:
        return max(2, int(getattr(self, name) * self.scale))


def _bar(cfg, total, desc):
    return tqdm(total=total, desc=desc, disable=cfg.quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def _lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return f


def _optimise(opt, sched, loss: torch.Tensor, bar, clip_params=None) -> None:
    """One optimiser step (with optional grad clipping to norm 1) and a progress update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    sched.step()
    bar.update()
    bar.set_postfix(loss=f"{loss.item():.4f}")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _save_model_atomic(model, folder: Path, extra_files: dict | None = None, **kw) -> None:
    """save_pretrained (and ``extra_files``: name → text) into a temp sibling, then rename: a killed build never
    leaves a half-written stage, nor a stage's weights without its marker."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    model.save_pretrained(tmp, **kw)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def _log(cfg, msg):
    if not cfg.quiet:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------------


def train_vae(cfg: BuildConfig, images: np.ndarray, out: Path, threads: _Threads) -> dict:
    """Stage 1; writes the VAE (fp32) and returns its report (the stages after it read it back as fp16)."""
    torch.manual_seed(cfg.seed)
    vae = models.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    steps, switch = cfg.scaled("vae_steps"), cfg.scaled("clip_wait_step")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(50, steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all = _to_tensor(images)
    with _bar(cfg, steps, "vae") as bar:
        for step in range(steps):
            idx = torch.randint(len(x_all), (cfg.vae_batch,), generator=gen)
            x = x_all[idx]
            # decode the posterior mean: sampling from the (initially unit-variance) posterior blurs colours for
            # thousands of steps; a tiny L2 on the latents keeps them bounded instead of the KL term
            z = vae.encode(x).latent_dist.mean
            rec = vae.decode(z).sample
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * z.pow(2).mean()
            _optimise(opt, sched, loss, bar, vae.parameters())
            if step + 1 == switch:
                threads.after_clip()
            else:
                threads.check()
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(x_all[i : i + 512]).latent_dist.mean for i in range(0, min(len(x_all), 4096), 512)])
        rec = torch.cat([vae.decode(z[i : i + 512]).sample for i in range(0, len(z), 512)])
    mse = F.mse_loss(rec.clamp(-1, 1), x_all[: len(rec)]).item()
    psnr = 10 * math.log10(4.0 / mse)
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    _save_model_atomic(vae, out / "pipeline" / "vae", safe_serialization=True)
    _log(cfg, f"vae: PSNR {psnr:.1f} dB, scaling factor {vae.config.scaling_factor:.4f}")
    return {"vae_psnr_db": round(psnr, 2)}


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 512) -> torch.Tensor:
    """Posterior mean of every image, (N, 4, 8, 8), unscaled."""
    return torch.cat([vae.encode(_to_tensor(images[i : i + batch])).latent_dist.mean for i in range(0, len(images), batch)])


def diffusion_loss(pred: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """ε-prediction MSE with Min-SNR-γ weighting (Hang et al., 2023): per sample min(SNR, γ) / SNR, which stops the
    low-noise steps from dominating and makes a small training budget go further."""
    snr = alpha_bar / (1 - alpha_bar)
    w = snr.clamp(max=gamma) / snr
    return (w * (pred.float() - eps).pow(2).mean(dim=(1, 2, 3))).mean()


class _Threads:
    """Torch threads of the main process, a function of the stage and step alone. The helper process trains CLIP,
    waits for the VAE, then trains the judge, on one thread. The main process runs the first ``clip_wait_step`` VAE
    steps on one thread, waits for CLIP, runs the rest of the VAE on ``cfg.threads``, then the text-encoder
    pretraining and the first ``helper_steps`` joint UNet steps on one thread beside the judge, waits for the
    helper, and runs the rest on ``cfg.threads``. CPU kernels round differently with different thread counts, so a
    schedule that followed the helper's progress would make every build differ; this one makes a build bit-identical
    to any other with the same ``--threads`` (resumed, or with ``--jobs 1``)."""

    def __init__(self, full: int, helper=None, clip_file: Path | None = None):
        self.full, self.helper, self.clip_file = full, helper, clip_file
        self.one()

    def after_clip(self) -> None:
        """Wait until the helper has written CLIP (it then waits for the VAE), then use every thread."""
        while self.helper is not None and not self.clip_file.exists():
            self.check()
            time.sleep(0.5)
        torch.set_num_threads(self.full)

    def one(self) -> None:
        torch.set_num_threads(1)
        self.check()

    def all(self) -> None:
        """Wait for the helper process (re-raising its error), then use every thread."""
        if self.helper is not None:
            self.helper.wait()
            self.check()
            self.helper = None
        torch.set_num_threads(self.full)

    def check(self) -> None:
        """Raise the helper's error now rather than after the UNet stages."""
        if self.helper is not None and self.helper.ready() and not self.helper.successful():
            self.helper.get()


def _ema_update(ema, model, decay):
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def pretrain_text_encoder(cfg: BuildConfig, text_encoder, images: np.ndarray, ids: torch.Tensor, pad_id: int) -> dict:
    """Stage 2a (``--text-pretrain-steps`` > 0): train the pipeline's text encoder contrastively against a small image
    tower (``models.CaptionImageTower``, discarded after), on its pooled (EOS) output — SD's text encoder is CLIP's.
    A text encoder trained through the UNet's loss alone keeps "striped" and "dotted" close, and the UNet then draws
    either for both (README, "Base world"). The encoder is causal, so captions are cut after their longest EOS."""
    torch.manual_seed(cfg.seed + 5)
    tower, proj = models.CaptionImageTower(), torch.nn.Linear(models.TEXT_WIDTH, models.TEXT_WIDTH, bias=False)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    ids = ids[:, : int((ids != pad_id).sum(1).max()) + 1]
    params = [*text_encoder.parameters(), *tower.parameters(), *proj.parameters(), log_scale]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    steps = cfg.scaled("text_pretrain_steps")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(100, steps // 10 + 1), steps))
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    with _bar(cfg, steps, "text encoder") as bar:
        for step in range(steps):
            idx = torch.randint(len(ids), (256,), generator=gen)
            f_img = F.normalize(tower(_to_tensor(images[idx.numpy()])), dim=-1)  # one batch at a time, as uint8
            f_txt = F.normalize(proj(text_encoder(ids[idx]).pooler_output), dim=-1)
            loss = contrastive_loss(f_img, f_txt, log_scale.exp().clamp(max=100), ids[idx])
            _optimise(opt, sched, loss, bar, params)
            if bar.disable and not cfg.quiet and (step + 1) % 200 == 0:
                _log(cfg, f"text encoder: step {step + 1}/{steps} loss {loss.item():.4f}")
    return {"text_pretrain_final_loss": round(loss.item(), 4)}


def train_unet(cfg: BuildConfig, vae, images: np.ndarray, scenes, tokenizer, out: Path, threads: _Threads):
    from diffusers import StableDiffusionPipeline

    threads.one()
    switch = cfg.scaled("helper_steps")
    torch.manual_seed(cfg.seed + 1)
    unet, text_encoder = models.make_unet(), models.make_text_encoder()
    noise_sched = models.make_scheduler("ddpm")
    mean = encode_latents(vae, images)
    sf = vae.config.scaling_factor
    ids = tokenizer([s.caption for s in scenes], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    report = {}
    if cfg.text_pretrain_steps > 0:
        report.update(pretrain_text_encoder(cfg, text_encoder, images, ids, tokenizer.pad_token_id))
    groups = [{"params": list(unet.parameters()), "lr": cfg.unet_lr},
              {"params": list(text_encoder.parameters()), "lr": cfg.text_lr}]
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = cfg.scaled("unet_steps")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, steps))
    ema_unet, ema_text = deepcopy(unet).requires_grad_(False), deepcopy(text_encoder).requires_grad_(False)
    alphas = noise_sched.alphas_cumprod
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    with _bar(cfg, steps, "unet+text") as bar:
        for step in range(steps):
            idx = torch.randint(len(mean), (cfg.unet_batch,), generator=gen)
            z0 = mean[idx] * sf  # (B, 4, 8, 8); the VAE is used deterministically (posterior mean)
            tok = ids[idx].clone()
            drop = torch.rand(len(idx), generator=gen) < 0.1  # caption dropout → CFG
            tok[drop] = empty
            t = torch.randint(0, 1000, (len(idx),), generator=gen)
            eps = torch.randn(z0.shape, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
            cond = text_encoder(tok).last_hidden_state  # (B, 77, 64)
            loss = diffusion_loss(unet(zt, t, cond).sample, eps, a.flatten())
            _optimise(opt, sched, loss, bar, params)
            if step + 1 == switch:
                threads.all()
            else:
                threads.check()
            if bar.disable and not cfg.quiet and (step + 1) % 200 == 0:
                _log(cfg, f"unet+text: step {step + 1}/{steps} loss {loss.item():.4f}")
            decay = min(0.999, (1 + step) / (10 + step))
            _ema_update(ema_unet, unet, decay)
            _ema_update(ema_text, text_encoder, decay)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet, scheduler=models.make_scheduler("ddim"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16)  # committed weights are fp16 (weight budget); loading upcasts
    _save_model_atomic(pipe, out / "pipeline", safe_serialization=True)
    vae.to(torch.float32)
    _log(cfg, f"unet: final loss {loss.item():.4f}")
    return {**report, "unet_final_loss": round(loss.item(), 4)}


def refine_unet(cfg: BuildConfig, vae, images: np.ndarray, scenes, out: Path, threads: _Threads, *,
                round_: int = 0) -> dict:
    """Stage 2b (``round_`` 0) and 2c (rounds 1, 2, …): keep training the UNet from its saved weights with the text
    encoder frozen; each round has its own warm-up + cosine schedule and a fresh EMA. Text conditioning of every
    distinct caption is computed once, so a step costs the UNet alone (~1.5× faster than the joint stage). The
    rounds of stage 2c are what bring the fill style up to the bar (README, "Base world")."""
    from diffusers import StableDiffusionPipeline

    threads.all()
    if round_ == 0:
        seed, steps, lr = cfg.seed + 4, cfg.scaled("refine_steps"), cfg.refine_lr
        name, marker, t_max = "unet refine", "refined.json", 1000
        torch.manual_seed(seed)
    else:
        seed, steps, lr = cfg.seed + round_ + 4, cfg.scaled("polish_steps"), cfg.polish_lr
        name, marker = f"unet polish {round_}", f"polished-{round_}.json"
        t_max = cfg.polish_t_max
        torch.manual_seed(cfg.seed + round_)
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", dtype=torch.float32, local_files_only=True,
                                                   safety_checker=None)
    unet, text_encoder = pipe.unet.train(), pipe.text_encoder.eval().requires_grad_(False)
    captions = sorted({s.caption for s in scenes} | {""})
    index = {c: i for i, c in enumerate(captions)}
    with torch.no_grad():
        ids = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        cond_all = torch.cat([text_encoder(ids[i : i + 512]).last_hidden_state for i in range(0, len(ids), 512)])
    which = torch.tensor([index[s.caption] for s in scenes])
    empty = index[""]
    mean = encode_latents(vae, images) * vae.config.scaling_factor
    alphas = models.make_scheduler("ddpm").alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(50, steps))
    ema = deepcopy(unet).requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    with _bar(cfg, steps, name) as bar:
        for step in range(steps):
            idx = torch.randint(len(mean), (cfg.unet_batch,), generator=gen)
            c = which[idx].clone()
            c[torch.rand(len(idx), generator=gen) < 0.1] = empty  # caption dropout → CFG
            t = torch.randint(0, t_max, (len(idx),), generator=gen)
            eps = torch.randn(mean[idx].shape, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            pred = unet(a.sqrt() * mean[idx] + (1 - a).sqrt() * eps, t, cond_all[c]).sample
            loss = diffusion_loss(pred, eps, a.flatten())
            _optimise(opt, sched, loss, bar, unet.parameters())
            _ema_update(ema, unet, min(0.999, (1 + step) / (10 + step)))
            if bar.disable and not cfg.quiet and (step + 1) % 200 == 0:
                _log(cfg, f"{name}: step {step + 1}/{steps} loss {loss.item():.4f}")
    pipe.unet = ema
    pipe.to(torch.float16)
    done = {p.name: p.read_text() for p in (out / "pipeline").glob("*.json") if p.name != "model_index.json"}
    this = {"steps": steps, "lr": lr, "seed": seed, **({"t_max": t_max} if round_ else {})}
    markers = {**done, marker: json.dumps(this)}  # earlier stages' markers too
    _save_model_atomic(pipe, out / "pipeline", extra_files=markers, safe_serialization=True)
    _log(cfg, f"{name}: final loss {loss.item():.4f}")
    key = "refine_final_loss" if round_ == 0 else f"polish_{round_}_final_loss"
    return {key: round(loss.item(), 4)}


def _multi_hot(labels: dict) -> np.ndarray:
    v = np.zeros(len(data.SHAPES) + len(data.COLOURS) + len(data.FILLS), np.float32)
    for s in labels.get("shapes", ()):
        v[data.SHAPES.index(s)] = 1
    for c in labels.get("colours", ()):
        v[len(data.SHAPES) + list(data.COLOURS).index(c)] = 1
    for f in labels.get("fills", ()):
        v[len(data.SHAPES) + len(data.COLOURS) + data.FILLS.index(f)] = 1
    return v


def judge_set(n_pos: int, seed: int):
    """Positives (all scene kinds, held-out pairs included) and negatives → uint8 images, multi-hot labels."""
    rng = np.random.default_rng(seed)
    scenes = [data.sample_scene(rng) for _ in range(n_pos)]
    pos = [data.render(s, rng) for s in scenes]
    labels = [_multi_hot(data.labels_of(s)) for s in scenes]
    for _ in range(int(0.4 * n_pos)):
        img, lab = data.sample_negative(rng)
        pos.append(img)
        labels.append(_multi_hot(lab))
    return np.stack(pos), np.stack(labels)


def held_out_pairs_set(n: int, seed: int):
    """Images of the held-out shape × colour pairs (the judge must see those too)."""
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for k in range(n):
        shape, colour = data.HELD_OUT[k % len(data.HELD_OUT)]
        fill = str(rng.choice(data.FILLS))
        sc = data.Scene([data.single_obj(shape, colour, fill, rng)], data.background(rng), "")
        imgs.append(data.render(sc, rng))
        labels.append(_multi_hot(data.labels_of(sc)))
    return np.stack(imgs), np.stack(labels)


def train_judge(cfg: BuildConfig, vae, out: Path):

    torch.manual_seed(cfg.seed + 2)
    n = cfg.scaled("n_judge")
    x, y = judge_set(n, cfg.seed + 100)
    hx, hy = held_out_pairs_set(max(50, n // 20), cfg.seed + 101)
    x, y = np.concatenate([x, hx]), np.concatenate([y, hy])
    with torch.no_grad():  # the judge must also read decoded (slightly blurred) images
        xt = _to_tensor(x)
        rec = torch.cat([vae.decode(vae.encode(xt[i : i + 512]).latent_dist.mean).sample for i in range(0, len(xt), 512)])
    clean = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    recon = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    labels = torch.from_numpy(y)
    judge = models.Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = cfg.scaled("judge_steps")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, steps))
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    with _bar(cfg, steps, "judge") as bar:
        for step in range(steps):
            idx = torch.randint(len(labels), (cfg.judge_batch,), generator=gen)
            use_rec = torch.rand(len(idx), generator=gen) < 0.4
            img = torch.where(use_rec.view(-1, 1, 1, 1), recon[idx], clean[idx]).float() / 255
            img = img + torch.randn(img.shape, generator=gen) * 0.03 * torch.rand(len(idx), 1, 1, 1, generator=gen)
            loss = F.binary_cross_entropy_with_logits(judge(img.clamp(0, 1)), labels[idx])
            _optimise(opt, sched, loss, bar)
    judge.eval()
    (out / "judge").mkdir(parents=True, exist_ok=True)
    _save_tensors_atomic({k: v.half() for k, v in judge.state_dict().items()}, out / "judge" / "judge.safetensors")
    return judge


def _save_tensors_atomic(tensors, path: Path):
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def contrastive_loss(f_img: torch.Tensor, f_txt: torch.Tensor, scale, ids: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on normalised features (B, d); captions repeat inside a batch, so every pair with the
    same token ids counts as a positive."""
    logits = scale * f_img @ f_txt.T  # (B, B)
    same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))


def train_clip(cfg: BuildConfig, images: np.ndarray, captions: list[str], out: Path):
    import open_clip

    torch.manual_seed(cfg.seed + 3)
    model = models.make_clip()
    tok = open_clip.get_tokenizer("ViT-B-32")  # the same BPE; our captions are short
    ids = tok(list(captions), context_length=models.CLIP_CONTEXT)
    x_all = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # a writable copy (the helper maps a file)
    mean = torch.tensor(models.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(models.CLIP_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    steps = cfg.scaled("clip_steps")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, steps))
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    with _bar(cfg, steps, "clip") as bar:
        for step in range(steps):
            idx = torch.randint(len(ids), (256,), generator=gen)
            img = (x_all[idx].float() / 255 - mean) / std
            f_img, f_txt, scale = model(img, ids[idx])
            loss = contrastive_loss(f_img, f_txt, scale, ids[idx])
            _optimise(opt, sched, loss, bar)
    (out / "clip").mkdir(parents=True, exist_ok=True)
    _save_tensors_atomic({k: v.half() for k, v in model.state_dict().items()}, out / "clip" / "clip.safetensors")
    return {"clip_final_loss": round(loss.item(), 4)}


def _load_vae(out: Path, wait: bool = False):
    """The stage-1 VAE from ``out``, rounded to the fp16 weights that ship (stage 1 writes fp32, the pipeline fp16:
    the judge reads the same VAE whenever it loads it); with ``wait``, block until the main process has written it."""
    from diffusers import AutoencoderKL

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
    import multiprocessing

    from erasure.toyworld.tokenizer import clip_tokenizer

    full_threads = cfg.threads or torch.get_num_threads()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    report, stages = {"config": asdict(cfg)}, {}
    prev = json.loads((out / "build_report.json").read_text()) if (out / "build_report.json").exists() else {}
    t0 = time.time()
    images, scenes = data.make_dataset(cfg.scaled("n_images"), cfg.seed)
    captions = [s.caption for s in scenes]
    stages["data"] = round(time.time() - t0, 1)
    _log(cfg, f"data: {len(images)} images in {stages['data']} s")
    helper_needed = not ((out / "judge" / "judge.safetensors").exists() and (out / "clip" / "clip.safetensors").exists())
    pool = tmp = helper = None
    try:
        if cfg.jobs > 1 and helper_needed:
            tmp = Path(tempfile.mkdtemp(prefix="toy-build-"))
            np.save(tmp / "images.npy", images)
            (tmp / "captions.json").write_text(json.dumps(captions))
            pool = multiprocessing.get_context("spawn").Pool(1)
            helper = pool.apply_async(_helper_process, (asdict(cfg), str(tmp / "images.npy"), str(tmp / "captions.json")))
            _log(cfg, "judge and CLIP: training in a helper process")
        threads = _Threads(full_threads, helper, out / "clip" / "clip.safetensors")
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
    _log(cfg, f"built in {report['total_s']} s → {out}")
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
