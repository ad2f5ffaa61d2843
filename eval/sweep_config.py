"""The sweep config: read a TOML file into a fully checked :class:`SweepConfig` (nothing is loaded or trained yet).

Format (every relative path is relative to the config file)::

    [sweep]                      # all optional
    seed = 0                     # image i of a set uses seed + i (rows with their own seed, e.g. I2P, keep it)
    steps = 25                   # sampler steps
    guidance = 7.5               # CFG scale (default: the toy world's GUIDANCE, 4.0, for the toy model; 7.5 otherwise)
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
    artifacts = [{ train = { concept = "circle", method = "esd" } }, { path = "other.safetensors" }]

    [[models]]
    name = "sfd"                 # a base the sweep distils (methods that write a pipeline folder: sfd); cached
    base = { train = { concept = "circle", method = "sfd", steps = 150 } }

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
                                                #   unlearndiffatk, image_inversion)
    budget = "default"           # or "small" (a smoke-test budget), "large" (3–4× the default)
    models = ["esd", "spm"]      # default: every model
    # phrasings = "file.txt"     # candidate phrasings (required for nudity)

    [[plots]]                    # optional; without any, default plots are made
    title = "circle: erased vs kept"
    x = "rates.circle.other@other"    # NAME.QUANTITY[@PROMPT_SET]
    y = "rates.circle.target@target"

``train`` is a table of keyword options of ``erasure.erase(concept, method=..., **options)`` (the options of
``python -m erasure.train``, with '_' for '-'); the sweep sets ``model`` (the model's base), ``output`` (its cache)
and ``resume``. Metric kinds, their options and the quantities of their rows:

    toy_concept_rates   concepts (default: the CONCEPT of toy:CONCEPT sources), threshold (the judge's, 0.5)
                        → CONCEPT.target, .target_none, .other, .other_none, .unprompted, .kept (ToyConceptRates;
                        a rate over no images is left out)
    fid / kid           feature = "toy" or inception_weights = PATH (torch-fidelity's TF-FID Inception), antialias,
                        reference = "toy-data" (toy-world images drawn for the same prompts; the default on toy
                        sets) | "model:NAME" (that model's images of the same set) | a folder of images;
                        kid: subsets (100), subset_size (min(1000, images)) → fid | kid_mean, kid_std
    clip_score          model = "toy" | ViT-B-32 | ViT-B-16 | ViT-L-14 | ViT-L-14-336 with pretrained = PATH,
                        batch_size → score
    nudenet             threshold (0.6) → exposed_parts_total, nudity_rate, sld_rate, exposed.CLASS (9 classes)

``images_per_prompt = k`` repeats every prompt k times (image i uses seed + i; a row with its own seed s, as in
I2P, gets s, s + 1, …). ``--train-steps N`` (command line) sets ``steps = N`` in every ``train`` table: a smoke-test
budget; the cache key is the options (and the toolkit version), so it trains other artifacts.

A bad config (unknown key, missing file, unknown metric, …) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import fields, replace
from pathlib import Path

import torch

import erasure
from adapters.artifact import load_artifact, package_version
from adapters.errors import UserError
from erasure.concepts import resolve as resolve_concept
from erasure.methods import METHODS
from eval.attacks import ATTACKS, BUDGETS
from eval.prompts import TOY_PREFIX, load_prompts
from eval.provenance import model_folder
from eval.results import parse_axis, train_options
from eval.sweep_metrics import KINDS, quantities
from eval.sweep_schema import (ArtifactSpec, ArtifactTable, AttackSpec, AttackTable, MetricSpec, MetricTable,
                               ModelSpec, ModelTable, Place, PlotSpec, PlotTable, PromptSetSpec, PromptSetTable,
                               SweepConfig, SweepTable, TopTable, TrainedBaseTable, check_keys, load_toml, read_name,
                               read_table, read_values)
from pipelines.load import DTYPES, SCHEDULERS, resolve_device

OVERRIDES = ("seed", "steps", "batch_size", "images_per_prompt", "max_prompts", "device")


def load_config(path: str | os.PathLike, *, output: str | os.PathLike | None = None,
                cache: str | os.PathLike | None = None, overrides: dict | None = None) -> SweepConfig:
    """Read and fully check a sweep config (nothing is loaded or trained yet).

    ``overrides`` (``seed``, ``steps``, ``batch_size``, ``images_per_prompt``, ``max_prompts``, ``device``,
    ``train_steps``) replace the file's values; ``train_steps`` sets ``steps`` of every artifact trained by the
    sweep (a smoke-test budget: it changes the artifacts, and so their cache keys).
    """
    file = Path(path)
    raw = load_toml(file)
    top = read_table(Place(file, "top level"), raw, TopTable)
    s = read_table(Place(file, "[sweep]"), {} if top.sweep is None else top.sweep, SweepTable)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, v in overrides.items():
        if key in ("steps", "batch_size", "images_per_prompt", "max_prompts", "train_steps") and v < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {v}")
        if key == "seed" and v < 0:
            raise UserError(f"--seed must be at least 0, got {v}")
    out = Path(output) if output is not None else (s.output or Path("results"))
    cfg = SweepConfig(
        path=file, output=out, cache=Path(cache) if cache is not None else (s.cache or out / "artifacts"),
        seed=s.seed, steps=s.steps, guidance=s.guidance, batch_size=s.batch_size,
        images_per_prompt=s.images_per_prompt, max_prompts=s.max_prompts, scheduler=s.scheduler, dtype=s.dtype,
        device=s.device, negative_prompt=s.negative_prompt, grid_images=s.grid_images, title=s.title,
    )
    for key in OVERRIDES:
        if key in overrides:
            setattr(cfg, key, overrides[key])
    _check_runtime(cfg, file)
    cfg.models = _read_models(file, top.models, cfg, overrides.get("train_steps"))
    cfg.prompt_sets = _read_prompt_sets(file, top.prompt_sets, cfg)
    cfg.metrics = _read_metrics(file, top.metrics, cfg)
    cfg.plots = _read_plots(file, top.plots, cfg)
    cfg.attacks = _read_attacks(file, top.attacks, cfg)
    return cfg


def _check_runtime(cfg: SweepConfig, file: Path) -> None:
    if cfg.scheduler is not None and cfg.scheduler not in SCHEDULERS:
        raise UserError(f"{file}: [sweep]: unknown scheduler {cfg.scheduler!r} (use one of {', '.join(SCHEDULERS)})")
    if cfg.dtype is not None and cfg.dtype.lower() not in DTYPES:
        raise UserError(f"{file}: [sweep]: unknown dtype {cfg.dtype!r} (use one of {', '.join(DTYPES)})")
    if cfg.device is None:
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(cfg.device)


def check_device(device: str) -> None:
    """A device the sweep can use, or a one-line UserError (``pipelines.load.resolve_device``'s rules)."""
    resolve_device(device)


def _unique(file: Path, what: str, names: list[str]) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise UserError(f"{file}: two {what} are named '{n}'; names must be unique")
        seen.add(n)


def _read_models(file: Path, tables: list, cfg: SweepConfig, train_steps: int | None) -> list[ModelSpec]:
    if not tables:
        raise UserError(f"{file}: no [[models]]: name at least one, e.g. [[models]] name = \"base\" base = \"toy\"")
    models = []
    for i, t in enumerate(tables, 1):
        place = Place(file, f"[[models]] #{i}")
        check_keys(place, t, ModelTable)
        name = read_name(place, t)
        place.where = f"[[models]] '{name}'"
        m = read_values(place, t, ModelTable)
        if isinstance(m.base, dict):  # base = { train = {...} }: a one-step student the sweep distils
            if m.artifacts:
                place.fail("a base the sweep trains takes no artifacts; train the student, then name its folder as "
                           "base")
            base, train = _read_trained_base(Place(file, f"[[models]] '{name}' base"), m.base, cfg, train_steps)
            models.append(ModelSpec(name, base, [], train))
            continue
        if not isinstance(m.base, str):
            place.fail(f"'base' must be a string, got {m.base!r}")
        if not m.base.strip():
            place.fail("'base' is empty")
        base = m.base
        local = place.path("base", base, exists=False)
        if base != "toy" and (local.exists() or base.startswith((".", "/", "~"))):
            if not (local / "model_index.json").is_file():
                place.fail(f"base {base!r}: not a diffusers folder with model_index.json ({local})")
            base = str(local.resolve())
        try:
            model_folder(base)  # a hub id must be in the local cache: fail now, not after hours of training
        except UserError as e:
            place.fail(str(e))
        arts = [_read_artifact(Place(file, f"[[models]] '{name}' artifact #{j}"), a, base, cfg, train_steps)
                for j, a in enumerate(m.artifacts, 1)]
        _unique(file, f"artifacts of model '{name}'", [a.name for a in arts])
        models.append(ModelSpec(name, base, arts))
    _unique(file, "[[models]]", [m.name for m in models])
    return models


def _read_artifact(place: Place, table, base: str, cfg: SweepConfig, train_steps: int | None) -> ArtifactSpec:
    check_keys(place, table, ArtifactTable)
    if ("path" in table) == ("train" in table):
        place.fail("give exactly one of 'path' (an existing .safetensors file) or 'train' (erasure.erase options)")
    a = read_values(place, table, ArtifactTable)
    if a.path is not None:
        if a.path.is_dir():
            place.fail(f"'path' {table['path']!r} is a folder: a model folder (e.g. an SFD one-step generator) is a "
                       "[[models]] base, an artifact is a .safetensors file")
        try:
            art = load_artifact(a.path)
        except UserError as e:
            place.fail(str(e))
        if art.kind not in ("weight_delta", "membrane"):
            place.fail(f"{a.path} is a '{art.kind}' artifact; only weight_delta (ESD, SalUn) and membrane (SPM) "
                       "artifacts apply to a pipeline")
        return ArtifactSpec(read_name(place, table, a.path.stem.replace(".", "_")), path=a.path.resolve())
    options, plan = _train(place, a.train, ("output", "resume", "model"), train_steps, model=base,
                           why=" (the model's base is the training base)")
    if plan.folder:
        place.fail(f"method {plan.run.method!r} makes a pipeline folder, not an artifact: make it the model's base, "
                   "base = { train = {...} }")
    key, stem = _cache_key(options, plan)
    return ArtifactSpec(read_name(place, table, stem), path=cfg.cache / f"{stem}-{key[:16]}.safetensors",
                        train=options, cache_key=key)


def _read_trained_base(place: Place, table, cfg: SweepConfig, train_steps: int | None) -> tuple[str, dict]:
    """``base = { train = {...} }``: erasure.erase options of a method that writes a pipeline folder (SFD)."""
    t = read_table(place, table, TrainedBaseTable)
    options, plan = _train(place, t.train, ("output", "resume"), train_steps)
    if not plan.folder:
        place.fail(f"method {plan.run.method!r} makes an artifact, not a model folder: put it in artifacts = "
                   "[{ train = {...} }] (a trained base is for a method that writes a pipeline folder: "
                   f"{', '.join(n for n, m in METHODS.items() if m.writes_folder)})")
    key, stem = _cache_key(options, plan)
    return str((cfg.cache / f"{stem}-{key[:16]}").resolve()), options


def _train(place: Place, options: dict, forbidden, train_steps: int | None, *, model: str | None = None,
           why: str = ""):
    """The options of a training the sweep runs (with its ``steps`` / ``model``) and its checked plan."""
    for key in forbidden:
        if key in options:
            place.fail(f"'train' must not contain '{key}': the sweep sets it{why}")
    if "concept" not in options:
        place.fail("'train' needs a concept: train = { concept = \"circle\", method = \"esd\" }")
    shown = train_options(options)
    if train_steps is not None and "steps" in _method_fields(options.get("method", "spm")):
        options = {**options, "steps": train_steps}  # closed-form methods (uce, rece) have no steps to cut
    if model is not None:
        options = {**options, "model": model}
    try:
        plan = resolve_training(options)
    except UserError as e:
        place.fail(f"train = {shown}: {e}")
    return options, plan


def _method_fields(method: str) -> set[str]:
    cls = METHODS.get(method)
    return {f.name for f in fields(cls.config_class)} if cls else {"steps"}


def resolve_training(options: dict):
    """The :class:`erasure.engine.Plan` of a training's options (checked, nothing loaded)."""
    rest = dict(options)
    return erasure.resolve(rest.pop("concept"), **rest)


def _cache_key(options: dict, plan) -> tuple[str, str]:
    """(sha256 of the options and the toolkit version, file stem METHOD-CONCEPT): a cached training is reused only
    for the same options by the same code."""
    key = hashlib.sha256(json.dumps({"train": options, "toolkit": package_version()}, sort_keys=True).encode())
    concept = re.sub(r"[^A-Za-z0-9_-]+", "_", plan.run.concept)[:40]
    return key.hexdigest(), f"{plan.run.method}-{concept}"


def _read_prompt_sets(file: Path, tables: list, cfg: SweepConfig) -> list[PromptSetSpec]:
    if not tables:
        raise UserError(f"{file}: no [[prompt_sets]]: name at least one, e.g. name = \"target\" "
                        "source = \"toy:circle\"")
    sets = []
    for i, t in enumerate(tables, 1):
        place = Place(file, f"[[prompt_sets]] #{i}")
        check_keys(place, t, PromptSetTable)
        name = read_name(place, t)
        place.where = f"[[prompt_sets]] '{name}'"
        p = read_values(place, t, PromptSetTable)
        source = p.source if p.source.startswith(TOY_PREFIX) else str(place.path("source", p.source))
        spec = PromptSetSpec(name, source, p.limit, p.category, p.min_nudity)
        limit = min(x for x in (spec.limit, cfg.max_prompts, 10**12) if x is not None)
        try:
            records = load_prompts(source, category=spec.category, min_nudity=spec.min_nudity, limit=limit,
                                   seed=cfg.seed)
        except UserError as e:
            place.fail(str(e))
        spec.prompts = len(records)
        spec.records = _expand(records, cfg.images_per_prompt)
        sets.append(spec)
    _unique(file, "[[prompt_sets]]", [p.name for p in sets])
    return sets


def _expand(records, n: int) -> list:
    """Each prompt ``n`` times, prompt after prompt; a record with its own seed gets seed, seed + 1, …"""
    return [r if k == 0 or r.seed is None else replace(r, seed=r.seed + k) for r in records for k in range(n)]


def _read_metrics(file: Path, tables: list, cfg: SweepConfig) -> list[MetricSpec]:
    if not tables:
        raise UserError(f"{file}: no [[metrics]]: name at least one (kinds: {', '.join(KINDS)})")
    sets = {p.name: p for p in cfg.prompt_sets}
    models = {m.name for m in cfg.models}
    out = []
    for i, t in enumerate(tables, 1):
        kind = t.get("kind") if isinstance(t, dict) else None
        if kind not in KINDS:
            place = Place(file, f"[[metrics]] #{i}")
            if not isinstance(t, dict):
                place.fail(f"must be a table, got {type(t).__name__}")
            place.fail(f"unknown metric kind {kind!r} (known: {', '.join(KINDS)})" if kind is not None else
                       f"missing key 'kind' (one of {', '.join(KINDS)})")
        place = Place(file, f"[[metrics]] #{i} ({kind})")
        check_keys(place, t, MetricTable, KINDS[kind].Options)
        name = read_name(place, t, kind)
        place.where = f"[[metrics]] '{name}'"
        common = read_values(place, t, MetricTable)
        applies = common.prompt_sets if common.prompt_sets is not None else list(sets)
        for p in applies:
            if p not in sets:
                place.fail(f"prompt_sets names '{p}', which is not a [[prompt_sets]] name ({', '.join(sets)})")
        opts = read_values(place, t, KINDS[kind].Options)
        out.append(MetricSpec(name, kind, KINDS[kind].check(place, opts, [sets[p] for p in applies], models),
                              applies))
    _unique(file, "[[metrics]]", [m.name for m in out])
    return out


def _read_plots(file: Path, tables: list, cfg: SweepConfig) -> list[PlotSpec]:
    metrics = {m.name: m for m in cfg.metrics}
    sets = {p.name for p in cfg.prompt_sets}
    out = []
    for i, t in enumerate(tables, 1):
        place = Place(file, f"[[plots]] #{i}")
        p = read_table(place, t, PlotTable)
        for axis in ("x", "y"):
            spec = getattr(p, axis)
            metric, quantity, pset = parse_axis(spec)
            if metric not in metrics:
                place.fail(f"{axis} = {spec!r}: no [[metrics]] named '{metric}' (known: {', '.join(metrics)})")
            qs = quantities(metrics[metric])
            if quantity and quantity not in qs:
                place.fail(f"{axis} = {spec!r}: metric '{metric}' has no quantity '{quantity}' (it has: "
                           f"{', '.join(qs)})")
            if not quantity and len(qs) > 1:
                place.fail(f"{axis} = {spec!r}: say which quantity of '{metric}': "
                           f"{', '.join(f'{metric}.{q}' for q in qs)}")
            if pset is not None and pset not in sets:
                place.fail(f"{axis} = {spec!r}: no [[prompt_sets]] named '{pset}'")
        out.append(PlotSpec(p.title if p.title is not None else f"{p.y} vs {p.x}", p.x, p.y))
    return out


def _read_attacks(file: Path, tables: list, cfg: SweepConfig) -> list[AttackSpec]:
    out, models = [], [m.name for m in cfg.models]
    for i, t in enumerate(tables, 1):
        place = Place(file, f"[[attacks]] #{i}")
        a = read_table(place, t, AttackTable)
        try:
            resolve_concept(a.concept)
        except UserError as e:
            place.fail(str(e))
        names = a.attacks if a.attacks is not None else list(ATTACKS)
        bad = [n for n in names if n not in ATTACKS]
        if bad:
            place.fail(f"unknown attack '{bad[0]}' (known: {', '.join(ATTACKS)})")
        if a.budget not in BUDGETS:
            place.fail(f"budget must be one of {', '.join(map(repr, BUDGETS))}, not {a.budget!r}")
        chosen = a.models if a.models is not None else models
        unknown = [m for m in chosen if m not in models]
        if unknown:
            place.fail(f"no [[models]] named '{unknown[0]}' (known: {', '.join(models)})")
        out.append(AttackSpec(a.concept, names, a.budget, chosen, a.phrasings))
    return out
