"""The toy-world build's stages (VAE, text encoder + UNet, UNet refine and polish rounds, judge, CLIP) and the
losses they train with. Each stage writes its weights atomically; :mod:`erasure.toyworld.build` runs them in order
(README, "Base world")."""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file
from tqdm.auto import tqdm

from erasure.toyworld import data, models
from erasure.toyworld.recipe import BuildConfig
from erasure.toyworld.threads import Threads


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


def _ema_update(ema, model, decay):
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


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


def contrastive_loss(f_img: torch.Tensor, f_txt: torch.Tensor, scale, ids: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on normalised features (B, d); captions repeat inside a batch, so every pair with the
    same token ids counts as a positive."""
    logits = scale * f_img @ f_txt.T  # (B, B)
    same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))


# ---------------------------------------------------------------------------------------------------------------
# stages


def train_vae(cfg: BuildConfig, images: np.ndarray, out: Path, threads: Threads) -> dict:
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
    cfg.log(f"vae: PSNR {psnr:.1f} dB, scaling factor {vae.config.scaling_factor:.4f}")
    return {"vae_psnr_db": round(psnr, 2)}


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
                cfg.log(f"text encoder: step {step + 1}/{steps} loss {loss.item():.4f}")
    return {"text_pretrain_final_loss": round(loss.item(), 4)}


def train_unet(cfg: BuildConfig, vae, images: np.ndarray, scenes, tokenizer, out: Path, threads: Threads):
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
                cfg.log(f"unet+text: step {step + 1}/{steps} loss {loss.item():.4f}")
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
    cfg.log(f"unet: final loss {loss.item():.4f}")
    return {**report, "unet_final_loss": round(loss.item(), 4)}


def refine_unet(cfg: BuildConfig, vae, images: np.ndarray, scenes, out: Path, threads: Threads, *,
                round_: int = 0) -> dict:
    """Stage 2b (``round_`` 0) and 2c (rounds 1, 2, …): keep training the UNet from its saved weights with the text
    encoder frozen; each round has its own warm-up + cosine schedule and a fresh EMA. Text conditioning of every
    distinct caption is computed once, so a step costs the UNet alone (faster than the joint stage). The
    rounds of stage 2c are what bring the fill style up to the bar (README, "Base world")."""
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
                cfg.log(f"{name}: step {step + 1}/{steps} loss {loss.item():.4f}")
    pipe.unet = ema
    pipe.to(torch.float16)
    done = {p.name: p.read_text() for p in (out / "pipeline").glob("*.json") if p.name != "model_index.json"}
    this = {"steps": steps, "lr": lr, "seed": seed, **({"t_max": t_max} if round_ else {})}
    markers = {**done, marker: json.dumps(this)}  # earlier stages' markers too
    _save_model_atomic(pipe, out / "pipeline", extra_files=markers, safe_serialization=True)
    cfg.log(f"{name}: final loss {loss.item():.4f}")
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
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def train_clip(cfg: BuildConfig, images: np.ndarray, captions: list[str], out: Path):
    import open_clip  # heavy: ~3 s to import, and only this stage needs it

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
