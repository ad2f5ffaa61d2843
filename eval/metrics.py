"""Metrics, torchmetrics-style: accumulate with ``update()``, finish with ``compute()``, mergeable across processes.

- :class:`ConceptRate`: fraction of images in which a judge sees what it is asked about;
- :class:`FID`, :class:`KID`: torchmetrics' FID / KID with a local Inception file or the toy judge's features;
- :class:`CLIPScore`: ``100 × max(cos, 0)`` with open_clip ViT-B-32 / ViT-L-14 from a local checkpoint, or the toy CLIP;
- :class:`NudeNetCounts`: NudeNet 3.4.2 exposed-part counts (MACE), nudity rate (RECE) and the 5-class SLD rate
  (in :mod:`eval.nudenet`, re-exported here);
- :class:`ToyConceptRates`: per shape / colour / fill rates on target prompts and on all others (toy judge).

Nothing here downloads weights: a missing file is a one-line :class:`adapters.errors.UserError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from adapters.errors import UserError, user_errors
from erasure import toyworld
from erasure.toyworld.models import CLIP_MEAN, CLIP_STD, IMAGE_SIZE
from eval.nudenet import (EXPOSED_CLASSES, NUDENET_THRESHOLD, SLD_CLASSES, NudeNetCounts, count_exposed,
                          hwc_uint8_images, nudenet_detector)

__all__ = ["ConceptRate", "FID", "KID", "CLIPScore", "NudeNetCounts", "ToyConceptRates", "as_uint8_nchw",
           "inception_extractor", "load_clip", "clip_preprocess", "count_exposed", "hwc_uint8_images",
           "nudenet_detector", "CLIP_ARCHS", "INCEPTION_FILE", "NUDENET_THRESHOLD", "EXPOSED_CLASSES", "SLD_CLASSES"]


class ConceptRate(Metric):
    """Fraction of images in which a judge sees what it is asked about.

    ``update(hits, empty)`` takes per-image booleans: ``hits`` — the judged thing is present; ``empty`` — the judge
    sees no object at all (reported with every rate: a broken model that paints nothing has a low concept rate too).
    ``compute()`` → ``{"rate": …, "none_rate": …, "n": …}``.
    """

    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("hits", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("empty", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, hits: Iterable[bool], empty: Iterable[bool] | None = None) -> None:
        hits = torch.as_tensor(list(hits), dtype=torch.bool)
        self.hits += int(hits.sum())
        self.total += hits.numel()
        if empty is not None:
            self.empty += int(torch.as_tensor(list(empty), dtype=torch.bool).sum())

    def compute(self) -> dict:
        n = int(self.total)
        return {"rate": float(self.hits) / max(n, 1), "none_rate": float(self.empty) / max(n, 1), "n": n}


# ---------------------------------------------------------------------------------------------------------------
# image inputs


def as_uint8_nchw(images) -> torch.Tensor:
    """Image files, PIL images, uint8 or float [0, 1] arrays/tensors (NHWC or NCHW, or one image) → uint8 NCHW."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], (str, os.PathLike)):
        images = [_open_image(p) for p in images]
    return toyworld.to_uint8_nchw(images)


def _open_image(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# ---------------------------------------------------------------------------------------------------------------
# FID and KID (torchmetrics) with local feature extractors only

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's TF-FID Inception, 95.6 MB


def inception_extractor(path: str | os.PathLike, *, antialias: bool = False) -> nn.Module:
    """torchmetrics' Inception-v3 (torch-fidelity ``inception-v3-compat``, the TF 2015-12-05 FID weights) from a local
    file: uint8 NCHW of any size → (N, 2048) pool3 features. Never downloads.

    Resize: to 299×299, bilinear; ``antialias=False`` is torch-fidelity's TF1-compatible bilinear (the original
    TF FID / torch-fidelity protocol), ``antialias=True`` torch's antialiased bilinear (torchmetrics 1.9's default).
    Then ``(x - 128) / 128``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Inception weights {path} not found: pass a local copy of torch-fidelity's {INCEPTION_FILE} "
                        "(nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike: the file is not a state dict
        raise UserError(f"{path}: not a torch state dict of Inception weights ({_one_line(e)})") from None
    if not isinstance(state, dict) or "Conv2d_1a_3x3.conv.weight" not in state or "fc.weight" not in state:
        raise UserError(f"{path}: not torch-fidelity Inception-v3 weights (expected {INCEPTION_FILE})")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3  # optional: needs torch-fidelity

        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(path), antialias=antialias)
    except ModuleNotFoundError:
        raise UserError("FID/KID with Inception weights need torch-fidelity: pip install torch-fidelity") from None
    except RuntimeError as e:
        raise UserError(f"{path}: does not fit Inception-v3 ({_one_line(e)})") from None
    net.num_features = 2048
    return net


def _feature_extractor(inception_weights, feature, antialias: bool) -> tuple[nn.Module, str]:
    if (inception_weights is None) == (feature is None):
        raise UserError("FID/KID need exactly one feature extractor: inception_weights=PATH (torch-fidelity's "
                        f"{INCEPTION_FILE}) or feature='toy' / an nn.Module; nothing is downloaded")
    if inception_weights is not None:
        resize = "antialiased bilinear" if antialias else "TF1-compatible bilinear"
        return inception_extractor(inception_weights, antialias=antialias), f"inception-v3-compat pool3 2048, {resize} to 299"
    if isinstance(feature, str) and feature == "toy":
        with user_errors(FileNotFoundError):
            judge = toyworld.load_judge()
        return judge.features, "toy judge penultimate 96, native 32x32, no resize"
    if isinstance(feature, nn.Module):
        return feature, f"custom {type(feature).__name__}"
    raise UserError(f"unknown FID/KID feature {feature!r}: use 'toy', an nn.Module, or inception_weights=PATH")


class FID(FrechetInceptionDistance):
    """Fréchet Inception Distance (torchmetrics ``FrechetInceptionDistance``) with a local feature extractor.

    ``FID(inception_weights=PATH)``: the TF-FID Inception (torch-fidelity's ``weights-inception-2015-12-05``
    file, which torchmetrics would otherwise download). Protocol: uint8 RGB images → resized to 299×299 by bilinear
    interpolation — ``antialias=False`` (default here, pinned): torch-fidelity's TF1-compatible resize, as the original
    TF FID code; ``antialias=True``: torch's antialiased bilinear, torchmetrics 1.9's default — → ``(x − 128)/128`` →
    2048-d pool3 features; FID between the Gaussians of real and generated features (float64). Numbers are
    comparable with torch-fidelity / torchmetrics (antialias off); not with clean-fid "clean" mode (PIL bicubic resize
    of uint8 images), which MACE, SPM and RECE report (SD v1.4 ≈ 14.0 on COCO-30k), nor with T2IBenchmark's.

    ``FID(feature="toy")``: the toy judge's 96-d penultimate features (``load_judge().features``) on the toy world's
    32×32 images, no resize; only comparable within the toy world. ``feature=`` also takes any ``nn.Module`` mapping
    uint8 NCHW → (N, d).

    ``update(images, real)`` takes PIL images, image files, uint8 or [0, 1] float arrays/tensors; ``compute()`` → FID.
    States are sums (``dist_reduce_fx="sum"``), so shards merge exactly. ``self.protocol`` names the extractor.
    """

    def __init__(self, *, inception_weights: str | os.PathLike | None = None, feature: str | nn.Module | None = None,
                 antialias: bool = False, **kwargs):
        net, protocol = _feature_extractor(inception_weights, feature, antialias)
        super().__init__(feature=net, **kwargs)
        self.protocol = protocol

    def update(self, images, real: bool) -> None:  # noqa: D102 (see class)
        super().update(as_uint8_nchw(images).to(self.device), real)


class KID(KernelInceptionDistance):
    """Kernel Inception Distance (torchmetrics ``KernelInceptionDistance``: polynomial-kernel MMD, degree 3, mean and
    std over ``subsets`` random subsets of ``subset_size``) with the same local extractors and resize as :class:`FID`.
    ``compute()`` → ``(kid_mean, kid_std)``; needs at least ``subset_size`` real and generated images. Feature states
    are lists concatenated across processes.
    """

    def __init__(self, *, inception_weights: str | os.PathLike | None = None, feature: str | nn.Module | None = None,
                 antialias: bool = False, subsets: int = 100, subset_size: int = 1000, **kwargs):
        net, protocol = _feature_extractor(inception_weights, feature, antialias)
        super().__init__(feature=net, subsets=subsets, subset_size=subset_size, **kwargs)
        self.protocol = protocol

    def update(self, images, real: bool) -> None:  # noqa: D102
        super().update(as_uint8_nchw(images).to(self.device), real)


# ---------------------------------------------------------------------------------------------------------------
# CLIP score (open_clip)

CLIP_ARCHS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")  # the OpenAI CLIP shapes (SimpleTokenizer, offline)


def load_clip(model: str = "ViT-B-32", pretrained: str | os.PathLike | None = None):
    """``"toy"`` (the toy world's CLIP) or an OpenAI-shaped open_clip architecture from a local checkpoint →
    ``(model, tokenize, preprocess_cfg)``. A missing checkpoint is a :class:`UserError`; nothing is downloaded."""
    if model == "toy":
        with user_errors(FileNotFoundError):
            clip, tokenize = toyworld.load_clip(pretrained)
        return clip, tokenize, {"size": IMAGE_SIZE, "mean": CLIP_MEAN, "std": CLIP_STD}
    if model not in CLIP_ARCHS:
        raise UserError(f"unknown CLIP architecture {model!r}: use one of {', '.join(CLIP_ARCHS)} or toy")
    if pretrained is None:
        raise UserError(f"CLIP score with {model} needs a local checkpoint: pass its path (e.g. open_clip's "
                        f"{model} 'openai' weights saved as a file); nothing is downloaded")
    path = Path(pretrained).expanduser().resolve()  # absolute: never mistaken for an open_clip tag ('openai')
    if not path.is_file():
        raise UserError(f"CLIP checkpoint {pretrained} not found: pass a local open_clip {model} state dict")
    import open_clip  # heavy: ~3 s to import, only for real CLIP checkpoints

    try:
        clip = open_clip.create_model(model, pretrained=str(path))
    except Exception as e:  # unpickling, shape and key errors: the file is not this architecture's weights
        raise UserError(f"{pretrained}: not an open_clip {model} checkpoint ({_one_line(e)})") from None
    cfg = open_clip.get_model_preprocess_cfg(clip)
    return clip.eval(), open_clip.get_tokenizer(model), {"size": cfg["size"], "mean": cfg["mean"], "std": cfg["std"]}


def clip_preprocess(x: torch.Tensor, size, mean, std) -> torch.Tensor:
    """uint8 NCHW → CLIP input, as open_clip's transform does for PIL images: shorter side resized to ``size``
    (bicubic, antialiased; torch's bicubic, which differs slightly from PIL's), centre crop, normalise."""
    h_out, w_out = (size, size) if isinstance(size, int) else tuple(size)
    x = x.float() / 255
    h, w = x.shape[-2:]
    if (h, w) != (h_out, w_out):
        s = max(h_out / h, w_out / w)
        nh, nw = max(h_out, int(h * s)), max(w_out, int(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = int(round((nh - h_out) / 2)), int(round((nw - w_out) / 2))
        x = x[..., top : top + h_out, left : left + w_out]
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


class CLIPScore(Metric):
    """CLIP score: ``100 × max(cos(E_image, E_text), 0)`` per image–caption pair, averaged (Hessel et al. 2021 without
    their w = 2.5; the scale of MACE's ~31 for SD v1.4 with ViT-B/32; torchmetrics clamps the mean instead of each
    pair, which differs only when a cosine is negative).

    ``CLIPScore("ViT-B-32", PATH)`` / ``CLIPScore("ViT-L-14", PATH)``: open_clip architectures from a local checkpoint
    (``open_clip.create_model(arch, pretrained=PATH)``; RECE reports L/14, MACE and AdvUnlearn B/32 — never mix them).
    ``CLIPScore("toy")``: the toy world's CLIP on 32×32 images. Images: see :func:`clip_preprocess`.
    ``update(images, texts)``; ``compute()`` → mean score. States are sums, merged across processes.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, model: str = "ViT-B-32", pretrained: str | os.PathLike | None = None, *, batch_size: int = 64,
                 **kwargs):
        super().__init__(**kwargs)
        self.clip, self.tokenize, self.preprocess_cfg = load_clip(model, pretrained)
        self.clip.requires_grad_(False)
        self.arch, self.batch_size = model, batch_size
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0), dist_reduce_fx="sum")

    def scores(self, images, texts: Sequence[str]) -> torch.Tensor:
        """Per-pair scores ``100 × max(cos, 0)``, shape (N,)."""
        x = as_uint8_nchw(images)
        if len(x) != len(texts):
            raise ValueError(f"{len(x)} images but {len(texts)} captions")
        out = []
        cfg = self.preprocess_cfg
        for i in range(0, len(x), self.batch_size):
            img = clip_preprocess(x[i : i + self.batch_size].to(self.device), cfg["size"], cfg["mean"], cfg["std"])
            tok = self.tokenize(list(texts[i : i + self.batch_size])).to(self.device)
            f_img = torch.nn.functional.normalize(self.clip.encode_image(img).float(), dim=-1)
            f_txt = torch.nn.functional.normalize(self.clip.encode_text(tok).float(), dim=-1)
            out.append(100 * (f_img * f_txt).sum(-1).clamp(min=0))
        return torch.cat(out) if out else torch.zeros(0)

    def update(self, images, texts: Sequence[str]) -> None:
        s = self.scores(images, texts)
        self.score_sum += s.double().sum()
        self.n += len(s)

    def compute(self) -> torch.Tensor:
        return (self.score_sum / self.n.clamp(min=1)).float()


# ---------------------------------------------------------------------------------------------------------------
# toy concept rates


class ToyConceptRates(Metric):
    """Judge-measured rates of every toy shape, colour and fill, from toy prompt records and their images.

    For each concept ``c`` (:data:`erasure.toyworld.data.SHAPES`, ``COLOURS``, ``FILLS``):

    - ``target``: over images whose prompt names or implies ``c`` (aliases and pairs included), the fraction in which
      the judge sees ``c`` — what erasing ``c`` must drive down;
    - ``other``: over images whose prompt does not name ``c`` but names something of the same kind, the fraction in
      which the judge sees what was asked (every prompted shape; the prompted colour; the prompted fill) — what must
      keep working;
    - ``unprompted``: over all images whose prompt does not name ``c``, the fraction in which the judge sees ``c``;
    - ``kept``: over images whose prompt names the shape ``c`` beside other shapes (two-object prompts), the fraction
      in which the judge sees every other shape asked for — what an erasure of ``c`` must leave in the scene.

    ``target`` and ``other`` carry ``none_rate``, the fraction of images where the judge sees no shape at all, as
    :class:`ConceptRate` does. ``update(records, images)`` takes records with ``shapes`` / ``colour`` / ``fill``
    (:class:`eval.prompts.PromptRecord` from a ``toy:`` set, or :class:`erasure.toyworld.ToyPrompt`). All states are
    per-concept counts, summed across processes.
    """

    higher_is_better = None
    full_state_update = False
    _STATES = ("t_n", "t_hit", "t_empty", "o_n", "o_ok", "o_empty", "u_n", "u_seen", "k_n", "k_ok")

    def __init__(self, judge=None, **kwargs):
        super().__init__(**kwargs)
        data = toyworld.data
        self.kinds = {**{s: "shape" for s in data.SHAPES}, **{c: "colour" for c in data.COLOURS},
                      **{f: "fill" for f in data.FILLS}}
        self.concepts = tuple(self.kinds)
        self._judge = judge
        for name in self._STATES:
            self.add_state(name, torch.zeros(len(self.concepts), dtype=torch.long), dist_reduce_fx="sum")

    @property
    def judge(self):
        if self._judge is None:
            with user_errors(FileNotFoundError):
                self._judge = toyworld.load_judge()
        return self._judge

    def update(self, records: Sequence, images) -> None:
        seen = self.judge.classify(as_uint8_nchw(images))
        if len(seen) != len(records):
            raise ValueError(f"{len(seen)} images but {len(records)} prompt records")
        counts = {name: torch.zeros(len(self.concepts), dtype=torch.long) for name in self._STATES}
        for rec, s in zip(records, seen):
            self._count(counts, rec, s)
        for name, c in counts.items():
            setattr(self, name, getattr(self, name) + c.to(self.device))

    def _count(self, counts: dict, rec, s) -> None:
        shapes = tuple(getattr(rec, "shapes", ()) or ())
        colour, fill = getattr(rec, "colour", None), getattr(rec, "fill", None)
        if not shapes and colour is None and fill is None:
            raise UserError(f"toy concept rates need toy prompt records (toy:… sets); {getattr(rec, 'text', rec)!r} "
                            "names no shape, colour or fill")
        named = {*shapes, colour, fill} - {None}
        asked = {"shape": set(shapes) <= s.shapes if shapes else None,
                 "colour": colour in s.colours if colour else None, "fill": fill in s.fills if fill else None}
        empty = int(not s.shapes)
        for j, c in enumerate(self.concepts):
            if c in named:
                counts["t_n"][j] += 1
                counts["t_hit"][j] += int(s.has(c))
                counts["t_empty"][j] += empty
                rest = set(shapes) - {c}
                if rest:
                    counts["k_n"][j] += 1
                    counts["k_ok"][j] += int(rest <= s.shapes)
                continue
            counts["u_n"][j] += 1
            counts["u_seen"][j] += int(s.has(c))
            ok = asked[self.kinds[c]]
            if ok is not None:
                counts["o_n"][j] += 1
                counts["o_ok"][j] += int(ok)
                counts["o_empty"][j] += empty

    def compute(self) -> dict:
        def rate(hit, empty, n):
            return {"rate": hit / max(n, 1), "none_rate": empty / max(n, 1), "n": n}

        out = {}
        for j, c in enumerate(self.concepts):
            v = {k: int(getattr(self, k)[j]) for k in self._STATES}
            if not v["u_n"] and not v["t_n"]:
                continue
            out[c] = {"kind": self.kinds[c], "target": rate(v["t_hit"], v["t_empty"], v["t_n"]),
                      "other": rate(v["o_ok"], v["o_empty"], v["o_n"]),
                      "unprompted": {"rate": v["u_seen"] / max(v["u_n"], 1), "n": v["u_n"]},
                      "kept": {"rate": v["k_ok"] / max(v["k_n"], 1), "n": v["k_n"]}}
        return out
