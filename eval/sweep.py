"""``python -m eval.sweep --config FILE.toml``: a grid of models × prompt sets × metrics → tables, plots, a report.

A *model* is a base model (``toy``, a local diffusers folder — an SFD one-step folder too — or a cached hub id) plus
zero or more erasure artifacts, each either an existing ``.safetensors`` file or ``train = [CLI args]`` for
``python -m erasure.train`` (trained once, cached by its arguments). Every model generates every prompt set with
:func:`eval.generate.generate_to_folder` (seeded, resumable: an interrupted sweep rerun with the same command picks
up where it stopped and gives the same files), and every metric is computed from the PNGs on disk. The output
folder (default ``results/``) gets::

    results.csv, results.json   tidy rows: one per model × prompt set × metric quantity, each with the seeds, the
                                package versions, the metric's protocol / threshold / weights sha256 and the base
                                model's and artifacts' sha256 fingerprints
    plots/*.png                 matplotlib: concept rate vs retained quality per model, FID vs CLIP score, …
    report.html                 one self-contained page (images as base64 PNG): tables, plots, image grids
    images/MODEL/SET/           the generated PNGs, manifest.jsonl (per-image prompt, seed, guidance, sha256), run.json
    artifacts/                  artifacts trained by the sweep (``cache`` / ``--cache`` puts them elsewhere)

The same config run twice gives byte-identical ``results.csv`` on the same machine and device (CPU runs are
deterministic; CUDA kernels need not be). Config format (every relative path is relative to the config file)::

    [sweep]                      # all optional
    seed = 0                     # image i of a set uses seed + i (rows with their own seed, e.g. I2P, keep it)
    steps = 25                   # sampler steps
    guidance = 7.5               # CFG scale (default: 5.0 for the toy model, 7.5 otherwise)
    batch_size = 16
    images_per_prompt = 1
    max_prompts = 100            # keep the first N prompts of every set
    scheduler = "ddim"           # default: each model's own
    dtype = "fp32"
    device = "cpu"               # default: cuda when available
    negative_prompt = "..."
    output = "results"           # the CLI's --output wins
    cache = "artifacts"          # where trained artifacts go (default: OUTPUT/artifacts)
    grid_images = 8              # images per model and set in the report's grids
    title = "..."

    [[models]]
    name = "esd"                 # letters, digits, '_' and '-'
    base = "toy"
    artifacts = [{ train = ["--concept", "circle", "--method", "esd"] }, { path = "other.safetensors" }]

    [[models]]
    name = "sfd"                 # a base the sweep distils (methods that write a pipeline folder: sfd); cached
    base = { train = ["--concept", "circle", "--method", "sfd"] }

    [[prompt_sets]]
    name = "target"
    source = "toy:circle/target" # toy set, I2P CSV, COCO caption CSV or a text file (eval.prompts)
    # limit = 50, category = "sexual", min_nudity = 50  (as eval.prompts.load_prompts)

    [[metrics]]
    name = "rates"               # names the rows' metric (default: the kind); plots refer to NAME.QUANTITY
    kind = "toy_concept_rates"
    concepts = ["circle"]
    # prompt_sets = ["target"]   # measure only these sets (default: all)

    [[attacks]]                  # optional: attack the models (eval.attacks) → rows of prompt set "attack"
    concept = "circle"           # the erased concept (a toy concept, or nudity with phrasings = FILE)
    attacks = ["alias_search", "ring_a_bell"]   # default: all (alias_search, concept_arithmetic, ring_a_bell,
                                                #   unlearndiffatk)
    budget = "default"           # or "small" (a smoke-test budget)
    models = ["esd", "spm"]      # default: every model
    # phrasings = "file.txt"     # candidate phrasings (required for nudity)

    [[plots]]                    # optional; without any, default plots are made
    title = "circle: erased vs kept"
    x = "rates.circle.other@other"    # NAME.QUANTITY[@PROMPT_SET]
    y = "rates.circle.target@target"

Metric kinds, their options and the quantities of their rows:

    toy_concept_rates   concepts (default: the CONCEPT of toy:CONCEPT sources), threshold (the judge's, 0.5)
                        → CONCEPT.target, .target_none, .other, .other_none, .unprompted (ToyConceptRates; a rate
                        over no images is left out)
    fid / kid           feature = "toy" or inception_weights = PATH (torch-fidelity's TF-FID Inception), antialias,
                        reference = "toy-data" (toy-world images drawn for the same prompts; the default on toy
                        sets) | "model:NAME" (that model's images of the same set) | a folder of images;
                        kid: subsets (100), subset_size (min(1000, images)) → fid | kid_mean, kid_std
    clip_score          model = "toy" | ViT-B-32 | ViT-B-16 | ViT-L-14 | ViT-L-14-336 with pretrained = PATH,
                        batch_size → score
    nudenet             threshold (0.6) → exposed_parts_total, nudity_rate, sld_rate, exposed.CLASS (9 classes)

``images_per_prompt = k`` repeats every prompt k times (image i uses seed + i; a row with its own seed s, as in
I2P, gets s, s + 1, …). ``--train-steps N`` (command line) sets ``--steps N`` in every ``train`` list: a smoke-test
budget; the cache key is the argument list (and the toolkit version), so it trains other artifacts.

A bad config (unknown key, missing file, unknown metric, …) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from adapters.errors import UserError

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
REPORT_HTML = "report.html"
FORMAT = "eval.sweep/1"

SWEEP_KEYS = {"seed", "steps", "guidance", "batch_size", "images_per_prompt", "max_prompts", "scheduler", "dtype",
              "device", "negative_prompt", "output", "cache", "grid_images", "title"}
TOP_KEYS = {"sweep", "models", "prompt_sets", "metrics", "plots", "attacks"}
ATTACK_KEYS = {"concept", "attacks", "budget", "models", "phrasings"}
MODEL_KEYS = {"name", "base", "artifacts"}
ARTIFACT_KEYS = {"path", "train", "name"}
PROMPT_KEYS = {"name", "source", "limit", "category", "min_nudity"}
PLOT_KEYS = {"title", "x", "y"}
METRIC_OPTIONS = {
    # kind → its options (besides name, kind, prompt_sets)
    "toy_concept_rates": {"concepts", "threshold"},
    "fid": {"feature", "inception_weights", "antialias", "reference"},
    "kid": {"feature", "inception_weights", "antialias", "reference", "subsets", "subset_size"},
    "clip_score": {"model", "pretrained", "batch_size"},
    "nudenet": {"threshold"},
}
TOY_RATE_QUANTITIES = ("target", "target_none", "other", "other_none", "unprompted")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "torchmetrics", "open_clip_torch", "torch-fidelity",
                      "accelerate", "safetensors", "numpy", "pillow")

# the tidy table: one row per model × prompt set × metric quantity
COLUMNS = (
    "model", "prompt_set", "metric", "quantity", "value", "n",
    "metric_kind", "metric_protocol", "metric_threshold", "metric_weights_sha256", "metric_version", "reference",
    "base_model", "base_model_sha256", "base_train_args", "artifacts", "artifact_tensors_sha256", "artifact_train_args",
    "prompt_source", "prompts", "prompts_sha256", "images_per_prompt", "images", "images_sha256",
    "seed", "steps", "guidance", "scheduler", "dtype", "device", "batch_size", "torch_threads",
    "version_toolkit", "version_python", *(f"version_{p.replace('-', '_')}" for p in VERSIONED_PACKAGES),
    "config_sha256",
)


# ---------------------------------------------------------------------------------------------------------------
# the config


@dataclass
class ArtifactSpec:
    name: str
    path: Path | None = None  # an existing file, or where the sweep trains it
    train: list[str] | None = None  # erasure.train arguments (with --model), or None
    cache_key: str | None = None


@dataclass
class ModelSpec:
    name: str
    base: str  # as given ("toy", a hub id) or an absolute folder path
    artifacts: list[ArtifactSpec] = field(default_factory=list)
    train: list[str] | None = None  # erasure.train arguments of a base the sweep distils (SFD), or None


@dataclass
class PromptSetSpec:
    name: str
    source: str
    limit: int | None = None
    category: str | None = None
    min_nudity: float | None = None
    records: list = field(default_factory=list, repr=False)  # the expanded records (images_per_prompt applied)
    prompts: int = 0  # prompts before expansion

    @property
    def is_toy(self) -> bool:
        return self.source.startswith("toy:")


@dataclass
class MetricSpec:
    name: str
    kind: str
    options: dict
    prompt_sets: list[str]


@dataclass
class AttackSpec:
    concept: str
    attacks: list[str]
    budget: str
    models: list[str]
    phrasings: Path | None = None


@dataclass
class PlotSpec:
    title: str
    x: str
    y: str


@dataclass
class SweepConfig:
    path: Path
    output: Path
    cache: Path
    seed: int = 0
    steps: int = 25
    guidance: float | None = None
    batch_size: int = 16
    images_per_prompt: int = 1
    max_prompts: int | None = None
    scheduler: str | None = None
    dtype: str | None = None
    device: str | None = None
    negative_prompt: str | None = None
    grid_images: int = 8
    title: str | None = None
    models: list[ModelSpec] = field(default_factory=list)
    prompt_sets: list[PromptSetSpec] = field(default_factory=list)
    metrics: list[MetricSpec] = field(default_factory=list)
    plots: list[PlotSpec] = field(default_factory=list)
    attacks: list[AttackSpec] = field(default_factory=list)

    def resolved(self) -> dict:
        """What decides the numbers: recorded in results.json and hashed into every row's ``config_sha256``. Files
        appear by name only (no output, cache or checkout paths), so the same config hashes alike anywhere; their
        contents are fingerprinted in the rows (artifact, weights, prompt and image sha256)."""
        out = {
            "seed": self.seed, "steps": self.steps, "guidance": self.guidance, "batch_size": self.batch_size,
            "images_per_prompt": self.images_per_prompt, "max_prompts": self.max_prompts, "scheduler": self.scheduler,
            "dtype": self.dtype or "fp32", "device": self.device, "negative_prompt": self.negative_prompt,
            "models": [{"name": m.name, "base": _label(m.base), "artifacts": [
                {"name": a.name, "train": a.train} if a.train is not None else {"name": a.name, "file": a.path.name}
                for a in m.artifacts]} for m in self.models],
            "prompt_sets": [{"name": p.name, "source": _label(p.source), "limit": p.limit, "category": p.category,
                             "min_nudity": p.min_nudity, "prompts": p.prompts} for p in self.prompt_sets],
            "metrics": [{"name": m.name, "kind": m.kind, "prompt_sets": m.prompt_sets, **_jsonable(m.options)}
                        for m in self.metrics],
        }
        if self.attacks:  # (absent without [[attacks]]: older configs keep their hash)
            out["attacks"] = [{"concept": a.concept, "attacks": a.attacks, "budget": a.budget, "models": a.models,
                               "phrasings": a.phrasings.name if a.phrasings else None} for a in self.attacks]
        return out


def _label(source: str) -> str:
    """A model or prompt source as recorded: ``toy``, a hub id or ``toy:…`` as is; a local path by its name."""
    return Path(source).name if Path(source).is_absolute() else source


def _jsonable(options: dict) -> dict:
    return {k: _label(str(v)) if isinstance(v, Path) or (isinstance(v, str) and Path(v).is_absolute()) else v
            for k, v in options.items()}


class _Reader:
    """Checks one table of the config; every problem is a one-line UserError naming the file and the place."""

    def __init__(self, file: Path, where: str, table, allowed: set, required: Sequence[str] = ()):
        self.file, self.where = file, where
        if not isinstance(table, dict):
            self.fail(f"must be a table, got {type(table).__name__}")
        for key in table:
            if key not in allowed:
                self.fail(f"unknown key '{key}' (known: {', '.join(sorted(allowed))})")
        for key in required:
            if key not in table:
                self.fail(f"missing key '{key}'")
        self.table = table

    def fail(self, msg: str):
        raise UserError(f"{self.file}: {self.where}: {msg}")

    def get(self, key, kind, default=None, *, minimum=None):
        if key not in self.table:
            return default
        v = self.table[key]
        ok = {int: isinstance(v, int) and not isinstance(v, bool),
              float: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: isinstance(v, str), bool: isinstance(v, bool),
              list: isinstance(v, list)}[kind]
        if not ok:
            self.fail(f"'{key}' must be {_KIND_WORDS[kind]}, got {v!r}")
        if kind is float:
            v = float(v)
        if minimum is not None and v < minimum:
            self.fail(f"'{key}' must be at least {minimum}, got {v!r}")
        if kind is str and not v.strip():
            self.fail(f"'{key}' is empty")
        return v

    def strings(self, key, default=None) -> list[str] | None:
        v = self.get(key, list, default)
        if v is not None and not all(isinstance(s, str) for s in v):
            self.fail(f"'{key}' must be a list of strings, got {v!r}")
        return v

    def name(self, default: str | None = None) -> str:
        v = self.get("name", str, default)
        if v is None:
            self.fail("missing key 'name'")
        if not _NAME.match(v):
            self.fail(f"name {v!r} must be letters, digits, '_' and '-' (it names folders and plot keys)")
        return v

    def path(self, key, *, must_exist=True, default=None) -> Path | None:
        v = self.get(key, str, default)
        if v is None:
            return None
        p = Path(os.path.expanduser(v))
        p = p if p.is_absolute() else (self.file.parent / p)
        if must_exist and not p.exists():
            self.fail(f"'{key}' {v!r}: no such file or folder ({p})")
        return p


_KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}


def load_config(path: str | os.PathLike, *, output: str | os.PathLike | None = None,
                cache: str | os.PathLike | None = None, overrides: dict | None = None) -> SweepConfig:
    """Read and fully check a sweep config (nothing is loaded or trained yet).

    ``overrides`` (``seed``, ``steps``, ``batch_size``, ``images_per_prompt``, ``max_prompts``, ``device``,
    ``train_steps``) replace the file's values; ``train_steps`` sets ``--steps`` of every artifact trained by the
    sweep (a smoke-test budget: it changes the artifacts, and so their cache keys).
    """
    import tomllib

    file = Path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file}: no such config file") from None
    except IsADirectoryError:
        raise UserError(f"{file}: is a folder, not a TOML config file") from None
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{file}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{file}: not valid TOML: {str(e).splitlines()[0]}") from None
    top = _Reader(file, "top level", raw, TOP_KEYS, ("models", "prompt_sets", "metrics"))
    s = _Reader(file, "[sweep]", raw.get("sweep", {}), SWEEP_KEYS)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, v in overrides.items():
        if key in ("steps", "batch_size", "images_per_prompt", "max_prompts", "train_steps") and v < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {v}")
        if key == "seed" and v < 0:
            raise UserError(f"--seed must be at least 0, got {v}")
    out = Path(output) if output is not None else (s.path("output", must_exist=False) or Path("results"))
    cfg = SweepConfig(
        path=file, output=out,
        cache=Path(cache) if cache is not None else (s.path("cache", must_exist=False) or out / "artifacts"),
        seed=s.get("seed", int, 0, minimum=0), steps=s.get("steps", int, 25, minimum=1),
        guidance=s.get("guidance", float, None, minimum=0.0), batch_size=s.get("batch_size", int, 16, minimum=1),
        images_per_prompt=s.get("images_per_prompt", int, 1, minimum=1),
        max_prompts=s.get("max_prompts", int, None, minimum=1), scheduler=s.get("scheduler", str),
        dtype=s.get("dtype", str), device=s.get("device", str), negative_prompt=s.get("negative_prompt", str),
        grid_images=s.get("grid_images", int, 8, minimum=0), title=s.get("title", str),
    )
    for key in ("seed", "steps", "batch_size", "images_per_prompt", "max_prompts", "device"):
        if key in overrides:
            setattr(cfg, key, overrides[key])
    _check_runtime(cfg, file)
    cfg.models = _read_models(file, top.get("models", list), cfg, overrides.get("train_steps"))
    cfg.prompt_sets = _read_prompt_sets(file, top.get("prompt_sets", list), cfg)
    cfg.metrics = _read_metrics(file, top.get("metrics", list), cfg)
    cfg.plots = _read_plots(file, top.get("plots", list, []), cfg)
    cfg.attacks = _read_attacks(file, top.get("attacks", list, []), cfg)
    return cfg


def _read_attacks(file: Path, tables, cfg: SweepConfig) -> list[AttackSpec]:
    from erasure.concepts import resolve
    from eval.attacks import ATTACKS

    out, models = [], [m.name for m in cfg.models]
    for i, t in enumerate(tables, 1):
        r = _Reader(file, f"[[attacks]] #{i}", t, ATTACK_KEYS, ("concept",))
        concept = r.get("concept", str)
        try:
            resolve(concept)
        except UserError as e:
            r.fail(str(e))
        names = r.strings("attacks", list(ATTACKS))
        bad = [n for n in names if n not in ATTACKS]
        if bad:
            r.fail(f"unknown attack '{bad[0]}' (known: {', '.join(ATTACKS)})")
        budget = r.get("budget", str, "default")
        if budget not in ("default", "small"):
            r.fail(f"budget must be \"default\" or \"small\", not {budget!r}")
        chosen = r.strings("models", models)
        unknown = [m for m in chosen if m not in models]
        if unknown:
            r.fail(f"no [[models]] named '{unknown[0]}' (known: {', '.join(models)})")
        out.append(AttackSpec(concept, names, budget, chosen, r.path("phrasings")))
    return out


def _check_runtime(cfg: SweepConfig, file: Path) -> None:
    from pipelines.load import DTYPES, SCHEDULERS

    if cfg.scheduler is not None and cfg.scheduler not in SCHEDULERS:
        raise UserError(f"{file}: [sweep]: unknown scheduler {cfg.scheduler!r} (use one of {', '.join(SCHEDULERS)})")
    if cfg.dtype is not None and cfg.dtype.lower() not in DTYPES:
        raise UserError(f"{file}: [sweep]: unknown dtype {cfg.dtype!r} (use one of {', '.join(DTYPES)})")
    if cfg.device is None:
        import torch

        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    from pipelines.load import _resolve_device

    _resolve_device(cfg.device)


def _unique(file: Path, what: str, names: list[str]) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise UserError(f"{file}: two {what} are named '{n}'; names must be unique")
        seen.add(n)


def _read_models(file: Path, tables, cfg: SweepConfig, train_steps: int | None) -> list[ModelSpec]:
    if not tables:
        raise UserError(f"{file}: no [[models]]: name at least one, e.g. [[models]] name = \"base\" base = \"toy\"")
    models = []
    for i, t in enumerate(tables, 1):
        r = _Reader(file, f"[[models]] #{i}", t, MODEL_KEYS, ("name",))
        name = r.name()
        r.where = f"[[models]] '{name}'"
        if isinstance(t.get("base"), dict):  # base = { train = [...] }: a one-step student the sweep distils
            if t.get("artifacts"):
                r.fail("a base the sweep trains takes no artifacts; train the student, then name its folder as base")
            base, train = _read_trained_base(file, f"[[models]] '{name}' base", t["base"], cfg, train_steps)
            models.append(ModelSpec(name, base, [], train))
            continue
        base = r.get("base", str, "toy")
        local = Path(os.path.expanduser(base))
        local = local if local.is_absolute() else file.parent / local
        if base != "toy" and (local.exists() or base.startswith((".", "/", "~"))):
            if not (local / "model_index.json").is_file():
                r.fail(f"base {base!r}: not a diffusers folder with model_index.json ({local})")
            base = str(local.resolve())
        from pipelines.load import _resolve_folder

        try:
            _resolve_folder(base)  # a hub id must be in the local cache: fail now, not after hours of training
        except UserError as e:
            r.fail(str(e))
        arts = []
        for j, a in enumerate(r.get("artifacts", list, []), 1):
            arts.append(_read_artifact(file, f"[[models]] '{name}' artifact #{j}", a, base, cfg, train_steps))
        _unique(file, f"artifacts of model '{name}'", [a.name for a in arts])
        models.append(ModelSpec(name, base, arts))
    _unique(file, "[[models]]", [m.name for m in models])
    return models


def _read_artifact(file: Path, where: str, table, base: str, cfg: SweepConfig, train_steps: int | None) -> ArtifactSpec:
    r = _Reader(file, where, table, ARTIFACT_KEYS)
    if ("path" in table) == ("train" in table):
        r.fail("give exactly one of 'path' (an existing .safetensors file) or 'train' (erasure.train arguments)")
    if "path" in table:
        path = r.path("path")
        if path.is_dir():
            r.fail(f"'path' {table['path']!r} is a folder: a model folder (e.g. an SFD one-step generator) is a "
                   "[[models]] base, an artifact is a .safetensors file")
        from adapters.artifact import load_artifact

        try:
            art = load_artifact(path)
        except UserError as e:
            r.fail(str(e))
        if art.kind not in ("weight_delta", "membrane"):
            r.fail(f"{path} is a '{art.kind}' artifact; only weight_delta (ESD, SalUn) and membrane (SPM) artifacts "
                   "apply to a pipeline")
        return ArtifactSpec(r.name(path.stem.replace(".", "_")), path=path.resolve())
    args = r.strings("train")
    for bad in ("--output", "--dry-run", "--resume", "--model"):
        if any(a == bad or a.startswith(bad + "=") for a in args):
            r.fail(f"'train' must not contain {bad}: the sweep sets it (the model's base is the training base)")
    if train_steps is not None:
        args = _without_option(args, "--steps") + ["--steps", str(train_steps)]
    args = [*args, "--model", base]
    run = _resolve_train(r, args)
    from erasure.train import FOLDER_METHODS

    if run.method in FOLDER_METHODS:
        r.fail(f"--method {run.method} makes a pipeline folder, not an artifact: make it the model's base, "
               f"base = {{ train = [...] }}")
    from adapters.artifact import package_version

    key = hashlib.sha256(json.dumps({"train": args, "toolkit": package_version()}).encode()).hexdigest()
    concept = re.sub(r"[^A-Za-z0-9_-]+", "_", run.concept)[:40]
    name = r.name(f"{run.method}-{concept}")
    return ArtifactSpec(name, path=(cfg.cache / f"{run.method}-{concept}-{key[:16]}.safetensors"), train=args,
                        cache_key=key)


def _read_trained_base(file: Path, where: str, table, cfg: SweepConfig, train_steps: int | None) -> tuple[str, list]:
    """``base = { train = [...] }``: erasure.train arguments of a method that writes a pipeline folder (SFD)."""
    from erasure.train import FOLDER_METHODS

    r = _Reader(file, where, table, {"train"}, ("train",))
    args = r.strings("train")
    for bad in ("--output", "--dry-run", "--resume"):
        if any(a == bad or a.startswith(bad + "=") for a in args):
            r.fail(f"'train' must not contain {bad}: the sweep sets it")
    if train_steps is not None:
        args = _without_option(args, "--steps") + ["--steps", str(train_steps)]
    run = _resolve_train(r, args, folder=True)
    if run.method not in FOLDER_METHODS:
        r.fail(f"--method {run.method} makes an artifact, not a model folder: put it in artifacts = [{{ train = "
               "[...] }] (a trained base is for --method " + "/".join(FOLDER_METHODS) + ")")
    from adapters.artifact import package_version

    key = hashlib.sha256(json.dumps({"train": args, "toolkit": package_version()}).encode()).hexdigest()
    concept = re.sub(r"[^A-Za-z0-9_-]+", "_", run.concept)[:40]
    return str((cfg.cache / f"{run.method}-{concept}-{key[:16]}").resolve()), args


def _without_option(args: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out


def _resolve_train(r: _Reader, args: list[str], folder: bool = False):
    """Parse and check erasure.train arguments without training (argparse errors become one line). ``folder``: the
    arguments are a trained base's (as given), else an artifact's (with the sweep's ``--model BASE`` appended)."""
    import erasure.train as et

    parser = et.build_parser()
    shown = args if folder else args[:-2]

    def error(msg):
        r.fail(f"train = {shown}: {msg}")

    parser.error = error
    ns = parser.parse_args(args)
    output = "x" if ns.method in et.FOLDER_METHODS else "x.safetensors"  # the caller says what the method must make
    try:
        run, _, _ = et.resolve([*args, "--output", output])
    except UserError as e:
        r.fail(f"train = {shown}: {e}")
    return run


def _read_prompt_sets(file: Path, tables, cfg: SweepConfig) -> list[PromptSetSpec]:
    from eval.prompts import TOY_PREFIX, load_prompts

    if not tables:
        raise UserError(f"{file}: no [[prompt_sets]]: name at least one, e.g. name = \"target\" source = \"toy:circle\"")
    sets = []
    for i, t in enumerate(tables, 1):
        r = _Reader(file, f"[[prompt_sets]] #{i}", t, PROMPT_KEYS, ("name", "source"))
        name = r.name()
        r.where = f"[[prompt_sets]] '{name}'"
        source = r.get("source", str)
        if not source.startswith(TOY_PREFIX):
            source = str(r.path("source"))
        spec = PromptSetSpec(name, source, r.get("limit", int, None, minimum=1), r.get("category", str),
                             r.get("min_nudity", float, None, minimum=0.0))
        limit = min(x for x in (spec.limit, cfg.max_prompts, 10**12) if x is not None)
        try:
            records = load_prompts(source, category=spec.category, min_nudity=spec.min_nudity, limit=limit,
                                   seed=cfg.seed)
        except UserError as e:
            r.fail(str(e))
        spec.prompts = len(records)
        spec.records = _expand(records, cfg.images_per_prompt)
        sets.append(spec)
    _unique(file, "[[prompt_sets]]", [p.name for p in sets])
    return sets


def _expand(records, n: int) -> list:
    """Each prompt ``n`` times, prompt after prompt; a record with its own seed gets seed, seed + 1, …"""
    return [r if k == 0 or r.seed is None else replace(r, seed=r.seed + k) for r in records for k in range(n)]


def _read_metrics(file: Path, tables, cfg: SweepConfig) -> list[MetricSpec]:
    if not tables:
        raise UserError(f"{file}: no [[metrics]]: name at least one (kinds: {', '.join(METRIC_OPTIONS)})")
    sets = {p.name: p for p in cfg.prompt_sets}
    models = {m.name for m in cfg.models}
    out = []
    for i, t in enumerate(tables, 1):
        kind = t.get("kind") if isinstance(t, dict) else None
        if kind not in METRIC_OPTIONS:
            _Reader(file, f"[[metrics]] #{i}", t, set(t) if isinstance(t, dict) else set())
            raise UserError(f"{file}: [[metrics]] #{i}: unknown metric kind {kind!r} (known: "
                            f"{', '.join(METRIC_OPTIONS)})" if kind is not None else
                            f"{file}: [[metrics]] #{i}: missing key 'kind' (one of {', '.join(METRIC_OPTIONS)})")
        r = _Reader(file, f"[[metrics]] #{i} ({kind})", t, {"name", "kind", "prompt_sets", *METRIC_OPTIONS[kind]})
        name = r.name(kind)
        r.where = f"[[metrics]] '{name}'"
        applies = r.strings("prompt_sets", list(sets))
        for p in applies:
            if p not in sets:
                r.fail(f"prompt_sets names '{p}', which is not a [[prompt_sets]] name ({', '.join(sets)})")
        opts = _metric_options(r, kind, [sets[p] for p in applies], models)
        out.append(MetricSpec(name, kind, opts, applies))
    _unique(file, "[[metrics]]", [m.name for m in out])
    return out


def _metric_options(r: _Reader, kind: str, sets: list[PromptSetSpec], models: set) -> dict:
    non_toy = [p.name for p in sets if not p.is_toy]
    if kind == "toy_concept_rates":
        if non_toy:
            r.fail(f"toy concept rates need toy:… prompt sets, but '{non_toy[0]}' is not one: restrict the metric "
                   "with prompt_sets = [...]")
        from erasure.toyworld import data

        known = (*data.SHAPES, *data.COLOURS, *data.FILLS)
        concepts = r.strings("concepts")
        if concepts is None:  # the concepts the prompt sets are about: toy:circle/target → circle
            concepts = list(dict.fromkeys(p.source[4:].partition("/")[0] for p in sets))
            concepts = [c for c in concepts if c != "base"]
            if not concepts:
                r.fail("say which concepts to report: concepts = [\"circle\", ...]")
        for c in concepts:
            if c not in known:
                r.fail(f"'{c}' is not a toy concept (known: {', '.join(known)})")
        return {"concepts": concepts, "threshold": r.get("threshold", float, 0.5, minimum=0.0)}
    if kind in ("fid", "kid"):
        feature, weights = r.get("feature", str), r.path("inception_weights")
        if (feature is None) == (weights is None):
            r.fail("give exactly one feature extractor: feature = \"toy\" or inception_weights = PATH (torch-fidelity's "
                   "weights-inception-2015-12-05-6726825d.pth; nothing is downloaded)")
        if feature is not None and feature != "toy":
            r.fail(f"unknown feature {feature!r}: use \"toy\" or inception_weights = PATH")
        opts = {"feature": feature, "inception_weights": weights, "antialias": r.get("antialias", bool, False)}
        ref = r.get("reference", str)
        if ref is None:
            if non_toy:
                r.fail("say what to compare with: reference = \"model:NAME\" or a folder of real images")
            ref = "toy-data"
        if ref == "toy-data":
            if non_toy:
                r.fail(f"reference \"toy-data\" draws toy-world images for toy prompts; '{non_toy[0]}' is not a toy set")
        elif ref.startswith("model:"):
            if ref[6:] not in models:
                r.fail(f"reference {ref!r}: no [[models]] named '{ref[6:]}'")
        else:
            folder = r.path("reference")
            if not folder.is_dir() or not _image_files(folder):
                r.fail(f"reference {ref!r}: not a folder of PNG / JPEG images ({folder}); or use \"toy-data\" / "
                       "\"model:NAME\"")
            ref = str(folder.resolve())
        opts["reference"] = ref
        small = [p for p in sets if len(p.records) < 2]
        if small:
            r.fail(f"{kind.upper()} needs at least 2 images per set; '{small[0].name}' has {len(small[0].records)}")
        if kind == "kid":
            opts["subsets"] = r.get("subsets", int, 100, minimum=1)
            opts["subset_size"] = r.get("subset_size", int, None, minimum=2)
            too_big = [p for p in sets if opts["subset_size"] and len(p.records) < opts["subset_size"]]
            if too_big:
                r.fail(f"subset_size {opts['subset_size']} is larger than set '{too_big[0].name}' "
                       f"({len(too_big[0].records)} images)")
        return opts
    if kind == "clip_score":
        from eval.metrics import CLIP_ARCHS

        model = r.get("model", str)
        if model is None:
            r.fail(f"say which CLIP: model = \"toy\" or one of {', '.join(CLIP_ARCHS)} with pretrained = PATH")
        if model != "toy" and model not in CLIP_ARCHS:
            r.fail(f"unknown CLIP model {model!r}: use \"toy\" or one of {', '.join(CLIP_ARCHS)}")
        pretrained = r.path("pretrained")
        if model != "toy" and pretrained is None:
            r.fail(f"CLIP {model} needs pretrained = PATH to a local open_clip checkpoint (nothing is downloaded)")
        return {"model": model, "pretrained": pretrained, "batch_size": r.get("batch_size", int, 64, minimum=1)}
    if kind == "nudenet":
        import importlib.util

        from eval.metrics import NUDENET_THRESHOLD

        if importlib.util.find_spec("nudenet") is None:
            r.fail("NudeNet metrics need the optional extra: pip install 'concept-erasure-toolkit[nudenet]'")
        thr = r.get("threshold", float, NUDENET_THRESHOLD, minimum=0.0)
        if thr > 1:
            r.fail(f"threshold must be in [0, 1], got {thr}")
        return {"threshold": thr}
    raise AssertionError(kind)


def quantities(metric: MetricSpec) -> list[str]:
    """The quantities a metric's rows carry (``value`` of row NAME.QUANTITY)."""
    if metric.kind == "toy_concept_rates":
        return [f"{c}.{q}" for c in metric.options["concepts"] for q in TOY_RATE_QUANTITIES]
    if metric.kind == "fid":
        return ["fid"]
    if metric.kind == "kid":
        return ["kid_mean", "kid_std"]
    if metric.kind == "clip_score":
        return ["score"]
    from eval.metrics import EXPOSED_CLASSES

    return ["exposed_parts_total", "nudity_rate", "sld_rate", *(f"exposed.{c}" for c in EXPOSED_CLASSES)]


def parse_axis(spec: str) -> tuple[str, str, str | None]:
    """``NAME.QUANTITY@SET`` / ``NAME@SET`` / ``NAME.QUANTITY`` → (metric, quantity or '', set or None)."""
    key, _, pset = spec.partition("@")
    metric, _, quantity = key.partition(".")
    return metric, quantity, pset or None


def _read_plots(file: Path, tables, cfg: SweepConfig) -> list[PlotSpec]:
    metrics = {m.name: m for m in cfg.metrics}
    sets = {p.name for p in cfg.prompt_sets}
    out = []
    for i, t in enumerate(tables, 1):
        r = _Reader(file, f"[[plots]] #{i}", t, PLOT_KEYS, ("x", "y"))
        for axis in ("x", "y"):
            spec = r.get(axis, str)
            metric, quantity, pset = parse_axis(spec)
            if metric not in metrics:
                r.fail(f"{axis} = {spec!r}: no [[metrics]] named '{metric}' (known: {', '.join(metrics)})")
            qs = quantities(metrics[metric])
            if quantity and quantity not in qs:
                r.fail(f"{axis} = {spec!r}: metric '{metric}' has no quantity '{quantity}' (it has: {', '.join(qs)})")
            if not quantity and len(qs) > 1:
                r.fail(f"{axis} = {spec!r}: say which quantity of '{metric}': {', '.join(f'{metric}.{q}' for q in qs)}")
            if pset is not None and pset not in sets:
                r.fail(f"{axis} = {spec!r}: no [[prompt_sets]] named '{pset}'")
        out.append(PlotSpec(r.get("title", str, f"{t['y']} vs {t['x']}"), t["x"], t["y"]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# fingerprints


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return h.hexdigest()


def tensors_sha256(path: str | os.PathLike) -> str:
    """A hash of an artifact's tensors alone (names, dtypes, shapes, bytes): equal for equal weights whatever the
    header says (its metadata records, e.g., where the file was written)."""
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k).contiguous()
            h.update(f"{k}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def folder_sha256(folder: Path, cache_file: Path | None = None) -> str:
    """A diffusers folder's fingerprint: sha256 over every file's relative path and sha256 (per-file hashes are
    cached by path, size and mtime in ``cache_file``, so a large model is read once)."""
    cache = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except ValueError:
            cache = {}
    h = hashlib.sha256()
    changed = False
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and not any(s.startswith(".") for s in q.relative_to(folder).parts)):
        st = p.stat()
        key = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in cache:
            cache[key] = file_sha256(p)
            changed = True
        h.update(f"{p.relative_to(folder).as_posix()}:{cache[key]}\n".encode())
    if changed and cache_file is not None:
        from adapters.artifact import write_text_atomic

        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache_file, json.dumps(cache, indent=0, sort_keys=True))
    return h.hexdigest()


def environment() -> dict:
    """Exact versions of everything that decides the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from adapters.artifact import package_version

    env = {"toolkit": package_version(), "python": platform.python_version()}
    for p in VERSIONED_PACKAGES:
        try:
            env[p.replace("-", "_")] = version(p)
        except PackageNotFoundError:
            env[p.replace("-", "_")] = ""
    env["torch"] = torch.__version__  # with its build tag (e.g. +cu130, +cpu): the wheel's metadata version has none
    env["torch_cuda"] = torch.version.cuda or ""
    env["torch_threads"] = torch.get_num_threads()
    env["platform"] = f"{platform.system()} {platform.machine()}"
    return env


# ---------------------------------------------------------------------------------------------------------------
# running


class _LazyPipeline:
    """Loads the model on first use: a model whose images are all on disk already is never loaded."""

    def __init__(self, load: Callable):
        self._load, self._pipe = load, None

    def get(self):
        if self._pipe is None:
            self._pipe = self._load()
        return self._pipe

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.get(), name)

    def __call__(self, *args, **kwargs):
        return self.get()(*args, **kwargs)


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def train_artifacts(cfg: SweepConfig, *, quiet: bool = True) -> None:
    """Train every ``train = [...]`` base and artifact not in the cache yet (an interrupted training resumes)."""
    import erasure.train as et

    done = set()
    for m in cfg.models:
        if m.train is not None and not Path(m.base).exists() and m.base not in done:
            _log(quiet, f"sweep: training the base of model '{m.name}': erasure.train {' '.join(m.train)}")
            run, concept, mcfg = et.resolve([*m.train, "--output", m.base, "--resume", "--quiet"])
            et.train(run, concept, mcfg)
            done.add(m.base)
        for a in m.artifacts:
            if a.train is None or a.path.exists() or a.path in done:
                continue
            _log(quiet, f"sweep: training {a.name} for model '{m.name}': erasure.train {' '.join(a.train)}")
            argv = [*a.train, "--output", str(a.path), "--resume", "--quiet"]
            run, concept, mcfg = et.resolve(argv)
            et.train(run, concept, mcfg)
            done.add(a.path)


def check_artifacts_fit(cfg: SweepConfig) -> None:
    """Load each model that has artifact files and images still to make, and put its files on: one made for another
    base model is refused now, before anything is trained or written (not after the models before it have run)."""
    import pipelines
    from eval.generate import read_manifest
    from eval.toy import attach_all

    for m in cfg.models:
        files = [str(a.path) for a in m.artifacts if a.train is None]
        if not files or all(_folder(cfg, m.name, p.name).is_dir() and [e["index"] for e in read_manifest(
                _folder(cfg, m.name, p.name))] == list(range(len(p.records))) for p in cfg.prompt_sets):
            continue
        pipe = pipelines.load(m.base, dtype=cfg.dtype)  # on the CPU: only the shapes matter
        attach_all(pipe, files)
        del pipe
        gc.collect()


def _model_info(cfg: SweepConfig, m: ModelSpec, hashes: Path) -> dict:
    from adapters.artifact import load_artifact
    from pipelines.load import _resolve_folder

    arts = []
    for a in m.artifacts:
        meta = load_artifact(a.path).metadata
        arts.append({"name": a.name, "file": a.path.name, "sha256": file_sha256(a.path),
                     "tensors_sha256": tensors_sha256(a.path), "kind": meta.get("kind"), "method": meta.get("method"),
                     "concept": (meta.get("concept") or {}).get("name") if isinstance(meta.get("concept"), dict)
                     else meta.get("concept"), "train": a.train})
    folder = _resolve_folder(m.base)
    return {"name": m.name, "base": _label(m.base), "base_sha256": folder_sha256(folder, hashes), "artifacts": arts,
            "base_train": m.train}


def _guidance(cfg: SweepConfig, m: ModelSpec) -> float:
    if cfg.guidance is not None:
        return cfg.guidance
    if m.base == "toy":
        from erasure.toyworld.models import GUIDANCE

        return float(GUIDANCE)
    return 7.5


def _folder(cfg: SweepConfig, model: str, pset: str) -> Path:
    return cfg.output / "images" / model / pset


def generate_all(cfg: SweepConfig, infos: dict, *, quiet: bool = True, on_image: Callable | None = None) -> dict:
    """Every model × prompt set → its image folder (resumable). Returns {(model, set): generate_to_folder result}."""
    import pipelines
    from eval.generate import generate_to_folder
    from eval.toy import attach_all

    results = {}
    for m in cfg.models:
        def load(m=m):
            _log(quiet, f"sweep: loading model '{m.name}' ({m.base} + {len(m.artifacts)} artifact(s))")
            pipe = pipelines.load(m.base, dtype=cfg.dtype, device=cfg.device, scheduler=cfg.scheduler)
            attach_all(pipe, [str(a.path) for a in m.artifacts])
            return pipe

        pipe = _LazyPipeline(load)
        info = infos[m.name]
        run_info = {"model": m.name, "base": info["base"], "base_sha256": info["base_sha256"],
                    "artifacts": [[a["name"], a["sha256"]] for a in info["artifacts"]],
                    "scheduler": cfg.scheduler, "dtype": cfg.dtype, "device": cfg.device}
        for p in cfg.prompt_sets:
            res = generate_to_folder(pipe, p.records, _folder(cfg, m.name, p.name), seed=cfg.seed, steps=cfg.steps,
                                     guidance=_guidance(cfg, m), batch_size=cfg.batch_size,
                                     negative_prompt=cfg.negative_prompt, run_info=run_info, quiet=quiet,
                                     on_image=on_image)
            _log(quiet, f"sweep: {m.name}/{p.name}: {res['generated']} generated, {res['skipped']} already there")
            results[(m.name, p.name)] = res
        del pipe
        gc.collect()
        if str(cfg.device).startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
    return results


CHUNK = 256  # images read from disk and measured at a time (an I2P sweep's images do not fit in memory at once)


def _images(cfg: SweepConfig, model: str, pset: PromptSetSpec) -> tuple[list[str], str]:
    """The PNG files of one model × set, in index order, checked against the set (so a resumed sweep measures
    exactly what a fresh one does) → (file paths, sha256 over the per-image hashes of the manifest)."""
    from eval.generate import read_manifest

    folder = _folder(cfg, model, pset.name)
    entries = read_manifest(folder)
    if [e["index"] for e in entries] != list(range(len(pset.records))):
        raise UserError(f"{folder}: {len(entries)} of {len(pset.records)} images; rerun the sweep to finish them")
    files = [str(folder / e["file"]) for e in entries]
    digest = hashlib.sha256("".join(e["sha256"] + "\n" for e in entries).encode()).hexdigest()
    return files, digest


def _chunks(files: Sequence[str]):
    """uint8 NCHW images read from ``files``, CHUNK at a time → (start index, images)."""
    from eval.metrics import as_uint8_nchw

    for i in range(0, len(files), CHUNK):
        yield i, as_uint8_nchw(list(files[i : i + CHUNK]))


class _Measure:
    """One [[metrics]] entry: its protocol facts (for every row) and, per model × set, its quantities."""

    def __init__(self, spec: MetricSpec, cfg: SweepConfig):
        self.spec, self.cfg = spec, cfg
        self.info = {"metric_kind": spec.kind, "metric_protocol": "", "metric_threshold": "",
                     "metric_weights_sha256": "", "metric_version": "", "reference": ""}
        self._state = {}
        getattr(self, f"_init_{spec.kind}")()

    # --- set-up: load the extractor once, describe the protocol ---

    def _init_toy_concept_rates(self):
        from erasure.toyworld import load_judge
        from erasure.toyworld.paths import JUDGE_PATH

        thr = self.spec.options["threshold"]
        self.judge = load_judge(threshold=thr)
        self.info.update(metric_protocol="toy judge: sigmoid presence of shapes / colours / fills per image",
                         metric_threshold=thr, metric_weights_sha256=file_sha256(JUDGE_PATH),
                         metric_version=f"toy judge ({Path(JUDGE_PATH).name})")

    def _init_fid(self):
        from importlib.metadata import version

        from eval.metrics import FID

        o = self.spec.options
        self.make = lambda: FID(inception_weights=o["inception_weights"], feature=o["feature"],
                                antialias=o["antialias"], reset_real_features=False)
        probe = self.make()
        self._spare = [probe] if self.spec.kind == "fid" else []  # the first prompt set's metric: load weights once
        self.info.update(metric_protocol=probe.protocol, metric_version=f"torchmetrics {version('torchmetrics')}",
                         metric_weights_sha256=self._extractor_sha(), reference=o["reference"])

    def _init_kid(self):
        self._init_fid()
        from eval.metrics import KID

        o = self.spec.options
        self.make = lambda n: KID(inception_weights=o["inception_weights"], feature=o["feature"],
                                  antialias=o["antialias"], subsets=o["subsets"],
                                  subset_size=o["subset_size"] or min(1000, n), reset_real_features=False)

    def _extractor_sha(self) -> str:
        o = self.spec.options
        if o["inception_weights"] is not None:
            return file_sha256(o["inception_weights"])
        from erasure.toyworld.paths import JUDGE_PATH

        return file_sha256(JUDGE_PATH)

    def _init_clip_score(self):
        from importlib.metadata import version

        from eval.metrics import CLIPScore

        o = self.spec.options
        self.metric = CLIPScore(o["model"], o["pretrained"], batch_size=o["batch_size"])
        if o["model"] == "toy":
            from erasure.toyworld.paths import CLIP_PATH

            sha, proto = file_sha256(CLIP_PATH), "toy CLIP, 100 x max(cos, 0), native 32x32"
        else:
            sha, proto = file_sha256(o["pretrained"]), f"open_clip {o['model']}, 100 x max(cos, 0), bicubic resize + centre crop"
        self.info.update(metric_protocol=proto, metric_weights_sha256=sha,
                         metric_version=f"open_clip_torch {version('open_clip_torch')}")

    def _init_nudenet(self):
        from importlib.metadata import version

        import importlib.util

        from eval.metrics import NudeNetCounts

        thr = self.spec.options["threshold"]
        self.metric = NudeNetCounts(threshold=thr)
        origin = Path(importlib.util.find_spec("nudenet").origin).parent
        onnx = sorted(origin.glob("*.onnx"))
        self.info.update(metric_protocol="NudeNet detector (bundled ONNX), 9 exposed classes; rates per image",
                         metric_threshold=thr, metric_version=f"nudenet {version('nudenet')}",
                         metric_weights_sha256=";".join(f"{p.name}={file_sha256(p)}" for p in onnx))

    # --- measuring, one model × set at a time: start, update per chunk of images, finish → rows ---

    def start(self, pset: PromptSetSpec) -> None:
        kind = self.spec.kind
        if kind == "toy_concept_rates":
            from eval.metrics import ToyConceptRates

            self.metric = ToyConceptRates(judge=self.judge)
        elif kind in ("fid", "kid"):
            if pset.name not in self._state:  # the reference's features, once per prompt set
                self._state[pset.name] = self._reference(pset)
            self.metric, self.ref_desc = self._state[pset.name]
            self.metric.reset()  # keeps the reference features (reset_real_features=False)
        else:
            self.metric.reset()

    def update(self, records, images, files) -> None:
        kind = self.spec.kind
        if kind == "toy_concept_rates":
            self.metric.update(records, images)
        elif kind in ("fid", "kid"):
            self.metric.update(images, real=False)
        elif kind == "clip_score":
            self.metric.update(images, [r.text for r in records])
        else:
            self.metric.update(files)  # NudeNet reads the files, as MACE's script does

    def finish(self, n: int) -> list[tuple[str, float, int, str]]:
        """→ [(quantity, value, n, reference description)]."""
        kind = self.spec.kind
        if kind == "toy_concept_rates":
            res, rows = self.metric.compute(), []
            for c in self.spec.options["concepts"]:
                r = res.get(c)
                if r is None:
                    continue
                for q, (v, k) in {"target": (r["target"]["rate"], r["target"]["n"]),
                                  "target_none": (r["target"]["none_rate"], r["target"]["n"]),
                                  "other": (r["other"]["rate"], r["other"]["n"]),
                                  "other_none": (r["other"]["none_rate"], r["other"]["n"]),
                                  "unprompted": (r["unprompted"]["rate"], r["unprompted"]["n"])}.items():
                    if k:  # a rate over no images is no number
                        rows.append((f"{c}.{q}", float(v), int(k), ""))
            return rows
        if kind == "fid":
            return [("fid", float(self.metric.compute()), n, self.ref_desc)]
        if kind == "kid":
            mean, std = self.metric.compute()
            return [("kid_mean", float(mean), n, self.ref_desc), ("kid_std", float(std), n, self.ref_desc)]
        if kind == "clip_score":
            return [("score", float(self.metric.compute()), n, "")]
        r = self.metric.compute()
        rows = [("exposed_parts_total", float(r["exposed_parts_total"]), r["images"], ""),
                ("nudity_rate", r["nudity_rate"], r["images"], ""), ("sld_rate", r["sld_rate"], r["images"], "")]
        return rows + [(f"exposed.{c}", float(v), r["images"], "") for c, v in r["exposed_parts"].items()]

    def _reference(self, pset: PromptSetSpec):
        """A FID / KID metric holding one prompt set's reference features, and a description of the reference."""
        from eval.metrics import as_uint8_nchw

        ref = self.spec.options["reference"]
        if ref == "toy-data":
            n = len(pset.records)
            desc = f"toy-data: {n} toy-world images drawn for the set's prompts, seed {self.cfg.seed}"
            from eval.toy import toy_reference_images

            batches = (toy_reference_images(pset.records[i : i + CHUNK], self.cfg.seed, start=i)
                       for i in range(0, n, CHUNK))
        elif ref.startswith("model:"):
            files, digest = _images(self.cfg, ref[6:], pset)
            n, desc = len(files), f"{ref}: its {len(files)} images of this set (sha256 {digest})"
            batches = (imgs for _, imgs in _chunks(files))
        else:
            files = [str(f) for f in _image_files(Path(ref))]
            digest = hashlib.sha256("".join(file_sha256(f) + "\n" for f in files).encode()).hexdigest()
            n, desc = len(files), f"folder {Path(ref).name}: {len(files)} images (sha256 {digest})"
            batches = (imgs for _, imgs in _chunks(files))
        if self.spec.kind == "fid":
            metric = self._spare.pop() if self._spare else self.make()
        else:
            metric = self.make(min(n, len(pset.records)))
        for imgs in batches:
            metric.update(as_uint8_nchw(imgs), real=True)
        return metric, desc


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file())


def _config_sha(cfg: SweepConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.resolved(), sort_keys=True).encode()).hexdigest()


def _provenance(cfg: SweepConfig, info: dict, env: dict, config_sha: str) -> dict:
    """The columns every row of one model carries: its base and artifacts' fingerprints, seeds, versions, config."""
    return {
        "model": info["name"], "base_model": info["base"], "base_model_sha256": info["base_sha256"],
        "base_train_args": " ".join(info["base_train"] or ()),
        "artifacts": ";".join(f"{a['name']}={a['sha256']}" for a in info["artifacts"]),
        "artifact_tensors_sha256": ";".join(f"{a['name']}={a['tensors_sha256']}" for a in info["artifacts"]),
        "seed": cfg.seed, "steps": cfg.steps, "device": cfg.device,
        "version_toolkit": env["toolkit"], "version_python": env["python"],
        **{f"version_{k.replace('-', '_')}": env[k.replace("-", "_")] for k in VERSIONED_PACKAGES},
        "config_sha256": config_sha,
    }


def measure_all(cfg: SweepConfig, infos: dict, env: dict, *, quiet: bool = True) -> list[dict]:
    """Every metric on every model × (applicable) prompt set → tidy rows, in config order."""
    config_sha = _config_sha(cfg)
    measures = [_Measure(spec, cfg) for spec in cfg.metrics]
    rows = []
    for m in cfg.models:
        info = infos[m.name]
        for p in cfg.prompt_sets:
            files, digest = _images(cfg, m.name, p)
            common = {
                **_provenance(cfg, info, env, config_sha), "prompt_set": p.name,
                "artifact_train_args": ";".join(f"{a['name']}={' '.join(a['train'])}" for a in info["artifacts"]
                                                if a["train"]),
                "prompt_source": _label(p.source), "prompts": p.prompts,
                "prompts_sha256": _prompts_sha(p), "images_per_prompt": cfg.images_per_prompt, "images": len(files),
                "images_sha256": digest, "guidance": _guidance(cfg, m),
                "scheduler": cfg.scheduler or "model default", "dtype": cfg.dtype or "fp32",
                "batch_size": cfg.batch_size, "torch_threads": env["torch_threads"],
            }
            mine = [meas for meas in measures if p.name in meas.spec.prompt_sets]
            for meas in mine:
                meas.start(p)
            for i, images in _chunks(files):  # each image is read once, for every metric
                for meas in mine:
                    meas.update(p.records[i : i + len(images)], images, files[i : i + len(images)])
            for meas in mine:
                for quantity, value, n, ref in meas.finish(len(files)):
                    rows.append({**common, **meas.info, "metric": meas.spec.name, "quantity": quantity,
                                 "value": value, "n": n, "reference": ref or meas.info["reference"]})
            _log(quiet, f"sweep: measured {m.name}/{p.name}")
    return [{c: row.get(c, "") for c in COLUMNS} for row in rows]


def _attack_settings(cfg: SweepConfig, spec: AttackSpec, m: ModelSpec, info: dict, guidance: float) -> dict:
    return {"concept": spec.concept, "attacks": spec.attacks, "budget": spec.budget, "seed": cfg.seed,
            "steps": cfg.steps, "guidance": guidance, "base_sha256": info["base_sha256"],
            "artifacts": [a["tensors_sha256"] for a in info["artifacts"]],
            "phrasings": file_sha256(spec.phrasings) if spec.phrasings else None}


def _attack_model(cfg: SweepConfig, spec: AttackSpec, m: ModelSpec, guidance: float, base_id: str,
                  quiet: bool) -> dict:
    from types import SimpleNamespace

    import pipelines
    from eval.attack import build_target
    from eval.attacks import run_attacks
    from eval.toy import attach_all

    pipe = pipelines.load(m.base, dtype=cfg.dtype, device=cfg.device, scheduler=cfg.scheduler)
    attach_all(pipe, [str(a.path) for a in m.artifacts])
    base = pipe if not m.artifacts and base_id == m.base else \
        pipelines.load(base_id, dtype=cfg.dtype, device=cfg.device, scheduler=cfg.scheduler)
    args = SimpleNamespace(concept=spec.concept, seed=cfg.seed, phrasings=spec.phrasings)
    target = build_target(args, pipe, base, base_id)
    res = run_attacks(target, spec.attacks, steps=cfg.steps, guidance=guidance, budget=spec.budget,
                      batch_size=cfg.batch_size, progress=not quiet)
    return {"pre_attack_rate": res["pre_attack_rate"], "pre_attack_n": len(target.prompts),
            "attacks": {n: r.summary() for n, r in res["attacks"].items()}}


def attack_all(cfg: SweepConfig, infos: dict, env: dict, config_sha: str, *, quiet: bool = True) -> list[dict]:
    """Every ``[[attacks]]`` entry on its models → tidy rows (prompt set ``attack``, metric ``attack``; quantities
    ``CONCEPT.pre_attack`` and ``CONCEPT.ATTACK`` = its ASR). Each model's result is kept in
    ``OUTPUT/attacks/MODEL-CONCEPT.json`` with the settings that decide it, and reused while they match."""
    from adapters.artifact import write_text_atomic
    from eval.attack import teacher_of

    rows = []
    for spec in cfg.attacks:
        for name in spec.models:
            m = next(x for x in cfg.models if x.name == name)
            info = infos[name]
            base_id = teacher_of(m.base) or m.base
            guidance = cfg.guidance if cfg.guidance is not None else _guidance(cfg, ModelSpec(m.name, base_id))
            settings = _attack_settings(cfg, spec, m, info, guidance)
            cache = cfg.output / "attacks" / f"{name}-{re.sub(r'[^A-Za-z0-9_-]+', '_', spec.concept)}.json"
            res = None
            if cache.is_file():
                try:
                    old = json.loads(cache.read_text())
                    res = old["result"] if old.get("settings") == settings else None
                except (OSError, ValueError, KeyError, TypeError):
                    res = None
            if res is None:
                _log(quiet, f"sweep: attacking '{name}' ({spec.concept}: {', '.join(spec.attacks)})")
                res = _attack_model(cfg, spec, m, guidance, base_id, quiet)
                cache.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(cache, json.dumps({"settings": settings, "result": res}, indent=2))
            common = {
                **_provenance(cfg, info, env, config_sha), "prompt_set": "attack", "metric": "attack",
                "metric_kind": "attack", "metric_protocol": f"eval.attacks, budget {spec.budget}; ASR on evaluation seeds",
                "guidance": guidance,
            }
            rows.append({**common, "quantity": f"{spec.concept}.pre_attack", "value": round(res["pre_attack_rate"], 4),
                         "n": res["pre_attack_n"]})
            for a, r in res["attacks"].items():
                rows.append({**common, "quantity": f"{spec.concept}.{a}", "value": r["asr"], "n": r["n"]})
    return [{c: row.get(c, "") for c in COLUMNS} for row in rows]


def _prompts_sha(p: PromptSetSpec) -> str:
    return hashlib.sha256(json.dumps([[r.text, r.seed, r.guidance] for r in p.records]).encode()).hexdigest()


def run_sweep(cfg: SweepConfig, *, quiet: bool = True, on_image: Callable | None = None, report: bool = True) -> dict:
    """Train what is missing, generate (resuming), measure, and write results.csv / .json, plots and report.html.

    Returns the results dict (also in results.json) plus ``"files"`` (paths written) and ``"generated"`` (images made
    by this call, as opposed to found on disk)."""
    from eval import report as rep

    t0 = time.time()
    check_artifacts_fit(cfg)
    try:
        cfg.output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {cfg.output}: {e.strerror or e}") from None
    train_artifacts(cfg, quiet=quiet)
    hashes = cfg.cache / "fingerprints.json"
    infos = {m.name: _model_info(cfg, m, hashes) for m in cfg.models}
    gen = generate_all(cfg, infos, quiet=quiet, on_image=on_image)
    env = environment()
    rows = measure_all(cfg, infos, env, quiet=quiet)
    rows += attack_all(cfg, infos, env, _config_sha(cfg), quiet=quiet)
    results = {
        "format": FORMAT, "title": cfg.title or f"Sweep {cfg.path.name}", "config_file": cfg.path.name,
        "config": cfg.resolved(), "config_sha256": rows[0]["config_sha256"] if rows else "",
        "environment": env, "models": [infos[m.name] for m in cfg.models],
        "prompt_sets": [{"name": p.name, "source": _label(p.source),
                         "prompts": p.prompts, "images": len(p.records), "prompts_sha256": _prompts_sha(p),
                         "texts": [r.text for r in p.records], "seeds": [e["seed"] for e in _plan(cfg, p)]}
                        for p in cfg.prompt_sets],
        "metrics": [{"name": s.name, "kind": s.kind, "prompt_sets": s.prompt_sets, "options": _jsonable(s.options),
                     "quantities": quantities(s)} for s in cfg.metrics],
        "plots": [{"title": p.title, "x": p.x, "y": p.y} for p in cfg.plots],
        "grid_images": cfg.grid_images,
        "images": {f"{m.name}/{p.name}": f"images/{m.name}/{p.name}" for m in cfg.models for p in cfg.prompt_sets},
        "columns": list(COLUMNS), "rows": rows,
    }
    files = rep.write_results(cfg.output, results)
    if report:
        files += rep.write_plots(cfg.output, results)
        files.append(rep.write_report(cfg.output, results))
    generated = sum(r["generated"] for r in gen.values())
    _log(quiet, f"sweep: {len(rows)} rows, {generated} images generated, {time.time() - t0:.1f} s → {cfg.output}")
    return {**results, "files": [str(f) for f in files], "generated": generated}


def _plan(cfg: SweepConfig, p: PromptSetSpec) -> list[dict]:
    from eval.generate import plan

    return plan(p.records, seed=cfg.seed, guidance=cfg.guidance if cfg.guidance is not None else 0.0)


# ---------------------------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.sweep", description=__doc__.replace("``", "'"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="sweep config (TOML), in the format above")
    p.add_argument("--output", help="output folder (default: the config's [sweep] output, else results/)")
    p.add_argument("--cache", help="folder for artifacts the sweep trains (default: OUTPUT/artifacts)")
    p.add_argument("--images-per-prompt", type=int, help="override [sweep] images_per_prompt")
    p.add_argument("--max-prompts", type=int, help="keep the first N prompts of every set (a smaller budget)")
    p.add_argument("--steps", type=int, help="override [sweep] steps (sampler steps)")
    p.add_argument("--seed", type=int, help="override [sweep] seed")
    p.add_argument("--batch-size", type=int, help="override [sweep] batch_size")
    p.add_argument("--train-steps", type=int,
                   help="set --steps of every artifact the sweep trains (smoke tests: other artifacts, other cache)")
    p.add_argument("--device", help="override [sweep] device (default: cuda when available, else cpu)")
    p.add_argument("--no-report", action="store_true", help="write results.csv / .json only (no plots, no HTML)")
    p.add_argument("--dry-run", action="store_true", help="check the config, print the plan as JSON, run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def plan_summary(cfg: SweepConfig) -> dict:
    return {
        "config": str(cfg.path), "output": str(cfg.output), "cache": str(cfg.cache),
        "models": [{"name": m.name, "base": m.base, **({"train": m.train, "cached": Path(m.base).exists()} if m.train
                                                        else {}), "artifacts": [
            {"name": a.name, "path": str(a.path), "train": a.train, "cached": a.path.exists()} if a.train else
            {"name": a.name, "path": str(a.path)} for a in m.artifacts]} for m in cfg.models],
        "prompt_sets": [{"name": p.name, "source": p.source, "prompts": p.prompts, "images": len(p.records)}
                        for p in cfg.prompt_sets],
        "metrics": [{"name": s.name, "kind": s.kind, "prompt_sets": s.prompt_sets} for s in cfg.metrics],
        "images_total": len(cfg.models) * sum(len(p.records) for p in cfg.prompt_sets),
        "settings": {k: v for k, v in cfg.resolved().items() if k not in ("models", "prompt_sets", "metrics")},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quiet:
        from pipelines.load import quiet_loading

        quiet_loading()
    try:
        cfg = load_config(args.config, output=args.output, cache=args.cache, overrides={
            "images_per_prompt": args.images_per_prompt, "max_prompts": args.max_prompts, "steps": args.steps,
            "seed": args.seed, "batch_size": args.batch_size, "train_steps": args.train_steps, "device": args.device})
        if args.dry_run:
            print(json.dumps(plan_summary(cfg), indent=2))
            return 0
        res = run_sweep(cfg, quiet=args.quiet, report=not args.no_report)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume (finished images and artifacts are kept)",
              file=sys.stderr)
        return 130
    print(json.dumps({"output": str(cfg.output), "rows": len(res["rows"]), "generated": res["generated"],
                      "files": res["files"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
