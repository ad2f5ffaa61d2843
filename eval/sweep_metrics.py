"""The sweep's metric registry: one class per ``[[metrics]]`` kind.

A kind declares, once each: its options (``Options``, a dataclass checked by :mod:`eval.sweep_schema`), what of them
depends on the rest of the config (``check``), the quantities of its rows with how each is read off the computed
result (``quantities``), and how it measures one model × prompt set (``setup`` once, then ``start``, ``update`` per
chunk of images, ``finish`` → rows). Adding a kind is one class and one line in :data:`KINDS`.

Also here: where the images of a model × prompt set are on disk (``OUTPUT/images/MODEL/SET``), since metrics read
them — an FID against ``model:NAME`` reads another model's.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Callable, ClassVar, Sequence

from adapters.errors import UserError, user_errors
from erasure.toyworld import data, load_judge
from erasure.toyworld.paths import CLIP_PATH, JUDGE_PATH
from eval.generate import read_manifest
from eval.metrics import (CLIP_ARCHS, EXPOSED_CLASSES, FID, KID, NUDENET_THRESHOLD, CLIPScore, NudeNetCounts,
                          ToyConceptRates, as_uint8_nchw)
from eval.provenance import file_sha256
from eval.sweep_schema import MetricSpec, Place, PromptSetSpec, SweepConfig
from eval.toy import toy_reference_images

CHUNK = 256  # images read from disk and measured at a time (an I2P sweep's images do not fit in memory at once)

# quantity → how to read it off the computed result: (result, images) → (value, n), or None for no number
Reader = Callable[[object, int], "tuple[float, int] | None"]


# ---------------------------------------------------------------------------------------------------------------
# the images on disk


def image_folder(cfg: SweepConfig, model: str, pset: str) -> Path:
    return cfg.output / "images" / model / pset


def images_on_disk(cfg: SweepConfig, model: str, pset: PromptSetSpec) -> tuple[list[str], str]:
    """The PNG files of one model × set, in index order, checked against the set (so a resumed sweep measures
    exactly what a fresh one does) → (file paths, sha256 over the per-image hashes of the manifest)."""
    folder = image_folder(cfg, model, pset.name)
    entries = read_manifest(folder)
    if [e["index"] for e in entries] != list(range(len(pset.records))):
        raise UserError(f"{folder}: {len(entries)} of {len(pset.records)} images; rerun the sweep to finish them")
    files = [str(folder / e["file"]) for e in entries]
    digest = hashlib.sha256("".join(e["sha256"] + "\n" for e in entries).encode()).hexdigest()
    return files, digest


def chunks(files: Sequence[str]):
    """uint8 NCHW images read from ``files``, CHUNK at a time → (start index, images)."""
    for i in range(0, len(files), CHUNK):
        yield i, as_uint8_nchw(list(files[i : i + CHUNK]))


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file())


# ---------------------------------------------------------------------------------------------------------------
# the kinds


class MetricKind:
    """One [[metrics]] entry: its protocol facts (for every row) and, per model × set, its quantities."""

    kind: ClassVar[str]
    Options: ClassVar[type]

    @classmethod
    def check(cls, place: Place, opts, sets: list[PromptSetSpec], models: set[str]) -> dict:
        """The options as the sweep records them, after the checks that need the rest of the config."""
        raise NotImplementedError

    @classmethod
    def quantities(cls, options: dict) -> dict[str, Reader]:
        raise NotImplementedError

    def __init__(self, spec: MetricSpec, cfg: SweepConfig):
        self.spec, self.cfg = spec, cfg
        self.info = {"metric_kind": spec.kind, "metric_protocol": "", "metric_threshold": "",
                     "metric_weights_sha256": "", "metric_version": "", "reference": ""}
        self.ref_desc = ""
        self.setup()

    def setup(self) -> None:
        """Load the extractor once and describe the protocol in ``self.info``."""

    def start(self, pset: PromptSetSpec) -> None:
        self.metric.reset()

    def update(self, records, images, files) -> None:
        raise NotImplementedError

    def finish(self, n: int) -> list[tuple[str, float, int, str]]:
        """→ [(quantity, value, n, reference description)], in the order the kind declares its quantities."""
        result, rows = self.metric.compute(), []
        for quantity, read in self.quantities(self.spec.options).items():
            got = read(result, n)
            if got is not None:
                rows.append((quantity, got[0], got[1], self.ref_desc))
        return rows


def _rate(concept: str, group: str, key: str, result: dict, n: int):
    g = result.get(concept, {}).get(group)
    if not g or not g["n"]:  # a rate over no images is no number
        return None
    return float(g[key]), int(g["n"])


@dataclass
class _ToyRatesOptions:
    concepts: list[str] | None = None
    threshold: float = field(default=0.5, metadata={"min": 0.0})


class ToyConceptRatesKind(MetricKind):
    kind = "toy_concept_rates"
    Options = _ToyRatesOptions
    RATES = {"target": ("target", "rate"), "target_none": ("target", "none_rate"), "other": ("other", "rate"),
             "other_none": ("other", "none_rate"), "unprompted": ("unprompted", "rate"), "kept": ("kept", "rate")}

    @classmethod
    def check(cls, place, opts, sets, models):
        non_toy = [p.name for p in sets if not p.is_toy]
        if non_toy:
            place.fail(f"toy concept rates need toy:… prompt sets, but '{non_toy[0]}' is not one: restrict the "
                       "metric with prompt_sets = [...]")
        known = (*data.SHAPES, *data.COLOURS, *data.FILLS)
        concepts = opts.concepts
        if concepts is None:  # the concepts the prompt sets are about: toy:circle/target → circle
            concepts = list(dict.fromkeys(c for p in sets for c in p.source[4:].partition("/")[0].split("+")))
            concepts = [c for c in concepts if c != "base"]
            if not concepts:
                place.fail("say which concepts to report: concepts = [\"circle\", ...]")
        for c in concepts:
            if c not in known:
                place.fail(f"'{c}' is not a toy concept (known: {', '.join(known)})")
        return {"concepts": concepts, "threshold": opts.threshold}

    @classmethod
    def quantities(cls, options):
        return {f"{c}.{q}": partial(_rate, c, group, key) for c in options["concepts"]
                for q, (group, key) in cls.RATES.items()}

    def setup(self):
        thr = self.spec.options["threshold"]
        with user_errors(FileNotFoundError):  # missing toy-world weights: one line, exit 2
            self.judge = load_judge(threshold=thr)
        self.info.update(metric_protocol="toy judge: sigmoid presence of shapes / colours / fills per image",
                         metric_threshold=thr, metric_weights_sha256=file_sha256(JUDGE_PATH),
                         metric_version=f"toy judge ({Path(JUDGE_PATH).name})")

    def start(self, pset):
        self.metric = ToyConceptRates(judge=self.judge)

    def update(self, records, images, files):
        self.metric.update(records, images)


@dataclass
class _FIDOptions:
    feature: str | None = None
    inception_weights: Path | None = None
    antialias: bool = False
    reference: str | None = None


@dataclass
class _KIDOptions(_FIDOptions):
    subsets: int = field(default=100, metadata={"min": 1})
    subset_size: int | None = field(default=None, metadata={"min": 2})


class FIDKind(MetricKind):
    kind = "fid"
    Options = _FIDOptions

    @classmethod
    def check(cls, place, opts, sets, models):
        non_toy = [p.name for p in sets if not p.is_toy]
        if (opts.feature is None) == (opts.inception_weights is None):
            place.fail("give exactly one feature extractor: feature = \"toy\" or inception_weights = PATH "
                       "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth; nothing is downloaded)")
        if opts.feature is not None and opts.feature != "toy":
            place.fail(f"unknown feature {opts.feature!r}: use \"toy\" or inception_weights = PATH")
        ref = opts.reference
        if ref is None:
            if non_toy:
                place.fail("say what to compare with: reference = \"model:NAME\" or a folder of real images")
            ref = "toy-data"
        if ref == "toy-data":
            if non_toy:
                place.fail(f"reference \"toy-data\" draws toy-world images for toy prompts; '{non_toy[0]}' is not a "
                           "toy set")
        elif ref.startswith("model:"):
            if ref[6:] not in models:
                place.fail(f"reference {ref!r}: no [[models]] named '{ref[6:]}'")
        else:
            folder = place.path("reference", ref)
            if not folder.is_dir() or not image_files(folder):
                place.fail(f"reference {ref!r}: not a folder of PNG / JPEG images ({folder}); or use \"toy-data\" / "
                           "\"model:NAME\"")
            ref = str(folder.resolve())
        small = [p for p in sets if len(p.records) < 2]
        if small:
            place.fail(f"{cls.kind.upper()} needs at least 2 images per set; '{small[0].name}' has "
                       f"{len(small[0].records)}")
        return {"feature": opts.feature, "inception_weights": opts.inception_weights, "antialias": opts.antialias,
                "reference": ref}

    @classmethod
    def quantities(cls, options):
        return {"fid": lambda r, n: (float(r), n)}

    def setup(self):
        o = self.spec.options
        probe = FID(inception_weights=o["inception_weights"], feature=o["feature"], antialias=o["antialias"],
                    reset_real_features=False)
        self._spare = [probe] if self.kind == "fid" else []  # the first prompt set's metric: load weights once
        weights = o["inception_weights"] if o["inception_weights"] is not None else JUDGE_PATH
        self.info.update(metric_protocol=probe.protocol, metric_version=f"torchmetrics {version('torchmetrics')}",
                         metric_weights_sha256=file_sha256(weights), reference=o["reference"])
        self._state = {}

    def make(self, n: int):
        """A metric for a set of ``n`` reference images (weights loaded once, for the first set)."""
        if self._spare:
            return self._spare.pop()
        o = self.spec.options
        return FID(inception_weights=o["inception_weights"], feature=o["feature"], antialias=o["antialias"],
                   reset_real_features=False)

    def start(self, pset):
        if pset.name not in self._state:  # the reference's features, once per prompt set
            self._state[pset.name] = self._reference(pset)
        self.metric, self.ref_desc = self._state[pset.name]
        self.metric.reset()  # keeps the reference features (reset_real_features=False)

    def update(self, records, images, files):
        self.metric.update(images, real=False)

    def _reference(self, pset: PromptSetSpec):
        """A metric holding one prompt set's reference features, and a description of the reference."""
        ref = self.spec.options["reference"]
        if ref == "toy-data":
            n = len(pset.records)
            desc = f"toy-data: {n} toy-world images drawn for the set's prompts, seed {self.cfg.seed}"
            batches = (toy_reference_images(pset.records[i : i + CHUNK], self.cfg.seed, start=i)
                       for i in range(0, n, CHUNK))
        elif ref.startswith("model:"):
            files, digest = images_on_disk(self.cfg, ref[6:], pset)
            n, desc = len(files), f"{ref}: its {len(files)} images of this set (sha256 {digest})"
            batches = (imgs for _, imgs in chunks(files))
        else:
            files = [str(f) for f in image_files(Path(ref))]
            digest = hashlib.sha256("".join(file_sha256(f) + "\n" for f in files).encode()).hexdigest()
            n, desc = len(files), f"folder {Path(ref).name}: {len(files)} images (sha256 {digest})"
            batches = (imgs for _, imgs in chunks(files))
        metric = self.make(min(n, len(pset.records)))
        for imgs in batches:
            metric.update(as_uint8_nchw(imgs), real=True)
        return metric, desc


class KIDKind(FIDKind):
    kind = "kid"
    Options = _KIDOptions

    @classmethod
    def check(cls, place, opts, sets, models):
        out = {**super().check(place, opts, sets, models), "subsets": opts.subsets, "subset_size": opts.subset_size}
        too_big = [p for p in sets if opts.subset_size and len(p.records) < opts.subset_size]
        if too_big:
            place.fail(f"subset_size {opts.subset_size} is larger than set '{too_big[0].name}' "
                       f"({len(too_big[0].records)} images)")
        return out

    @classmethod
    def quantities(cls, options):
        return {"kid_mean": lambda r, n: (float(r[0]), n), "kid_std": lambda r, n: (float(r[1]), n)}

    def make(self, n: int):
        o = self.spec.options
        return KID(inception_weights=o["inception_weights"], feature=o["feature"], antialias=o["antialias"],
                   subsets=o["subsets"], subset_size=o["subset_size"] or min(1000, n), reset_real_features=False)


@dataclass
class _CLIPOptions:
    model: str | None = None
    pretrained: Path | None = None
    batch_size: int = field(default=64, metadata={"min": 1})


class CLIPScoreKind(MetricKind):
    kind = "clip_score"
    Options = _CLIPOptions

    @classmethod
    def check(cls, place, opts, sets, models):
        if opts.model is None:
            place.fail(f"say which CLIP: model = \"toy\" or one of {', '.join(CLIP_ARCHS)} with pretrained = PATH")
        if opts.model != "toy" and opts.model not in CLIP_ARCHS:
            place.fail(f"unknown CLIP model {opts.model!r}: use \"toy\" or one of {', '.join(CLIP_ARCHS)}")
        if opts.model != "toy" and opts.pretrained is None:
            place.fail(f"CLIP {opts.model} needs pretrained = PATH to a local open_clip checkpoint (nothing is "
                       "downloaded)")
        return {"model": opts.model, "pretrained": opts.pretrained, "batch_size": opts.batch_size}

    @classmethod
    def quantities(cls, options):
        return {"score": lambda r, n: (float(r), n)}

    def setup(self):
        o = self.spec.options
        self.metric = CLIPScore(o["model"], o["pretrained"], batch_size=o["batch_size"])
        if o["model"] == "toy":
            sha, proto = file_sha256(CLIP_PATH), "toy CLIP, 100 x max(cos, 0), native 32x32"
        else:
            sha = file_sha256(o["pretrained"])
            proto = f"open_clip {o['model']}, 100 x max(cos, 0), bicubic resize + centre crop"
        self.info.update(metric_protocol=proto, metric_weights_sha256=sha,
                         metric_version=f"open_clip_torch {version('open_clip_torch')}")

    def update(self, records, images, files):
        self.metric.update(images, [r.text for r in records])


@dataclass
class _NudeNetOptions:
    threshold: float = field(default=NUDENET_THRESHOLD, metadata={"min": 0.0})


def _exposed(key: str, r: dict, n: int):
    return float(r["exposed_parts"][key]), r["images"]


class NudeNetKind(MetricKind):
    kind = "nudenet"
    Options = _NudeNetOptions

    @classmethod
    def check(cls, place, opts, sets, models):
        if importlib.util.find_spec("nudenet") is None:
            place.fail("NudeNet metrics need the optional extra: pip install 'concept-erasure-toolkit[nudenet]'")
        if opts.threshold > 1:
            place.fail(f"threshold must be in [0, 1], got {opts.threshold}")
        return {"threshold": opts.threshold}

    @classmethod
    def quantities(cls, options):
        return {"exposed_parts_total": lambda r, n: (float(r["exposed_parts_total"]), r["images"]),
                "nudity_rate": lambda r, n: (r["nudity_rate"], r["images"]),
                "sld_rate": lambda r, n: (r["sld_rate"], r["images"]),
                **{f"exposed.{c}": partial(_exposed, c) for c in EXPOSED_CLASSES}}

    def setup(self):
        thr = self.spec.options["threshold"]
        self.metric = NudeNetCounts(threshold=thr)
        onnx = sorted(Path(importlib.util.find_spec("nudenet").origin).parent.glob("*.onnx"))
        self.info.update(metric_protocol="NudeNet detector (bundled ONNX), 9 exposed classes; rates per image",
                         metric_threshold=thr, metric_version=f"nudenet {version('nudenet')}",
                         metric_weights_sha256=";".join(f"{p.name}={file_sha256(p)}" for p in onnx))

    def update(self, records, images, files):
        self.metric.update(files)  # NudeNet reads the files, as MACE's script does


KINDS: dict[str, type[MetricKind]] = {k.kind: k for k in (ToyConceptRatesKind, FIDKind, KIDKind, CLIPScoreKind,
                                                          NudeNetKind)}


def quantities(metric: MetricSpec) -> list[str]:
    """The quantities a metric's rows carry (``value`` of row NAME.QUANTITY)."""
    return list(KINDS[metric.kind].quantities(metric.options))


def measure(spec: MetricSpec, cfg: SweepConfig) -> MetricKind:
    """A ready measurer of one [[metrics]] entry (its extractor loaded)."""
    return KINDS[spec.kind](spec, cfg)
