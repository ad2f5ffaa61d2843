"""``python -m eval.sweep --config FILE.toml``: a grid of models × prompt sets × metrics → tables, plots, a report.

A *model* is a base model (``toy``, a local diffusers folder — an SFD one-step folder too — or a cached hub id) plus
zero or more erasure artifacts, each either an existing ``.safetensors`` file or ``train = { OPTIONS }`` for
``erasure.erase`` (trained once, cached by its options). Every model generates every prompt set with
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
deterministic; CUDA kernels need not be).

The parts: :mod:`eval.sweep_config` reads and checks the config (its format is documented there) into the
dataclasses of :mod:`eval.sweep_schema`; :mod:`eval.sweep_metrics` is the metric registry; :mod:`eval.provenance`
fingerprints; :mod:`eval.results` names the files and columns. This module runs it all: train, generate, measure,
attack, write.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

import erasure
import pipelines
from adapters.artifact import load_artifact, write_text_atomic
from adapters.errors import UserError
from erasure.concepts import resolve as resolve_concept
from erasure.engine import record_path
from erasure.toyworld.models import GUIDANCE
from eval import sweep_config
from eval.attack import build_target, teacher_of
from eval.attacks import run_attacks
from eval.generate import generate_to_folder, plan, read_manifest
from eval.provenance import (config_sha, environment, file_sha256, folder_sha256, jsonable, label, model_folder,
                             prompts_sha, row_provenance, tensors_sha256)
from eval.report import write_plots, write_report, write_results
from eval.results import COLUMNS, FORMAT, REPORT_HTML, RESULTS_CSV, RESULTS_JSON, parse_axis, train_options
from eval.sweep_config import load_config
from eval.sweep_metrics import chunks, image_folder, images_on_disk, measure, quantities
from eval.sweep_schema import (ArtifactSpec, AttackSpec, MetricSpec, ModelSpec, PlotSpec, PromptSetSpec,
                               SweepConfig)
from pipelines.load import quiet_loading

__all__ = ["load_config", "run_sweep", "main", "plan_summary", "quantities", "parse_axis", "environment",
           "file_sha256", "folder_sha256", "tensors_sha256", "SweepConfig", "ModelSpec", "ArtifactSpec",
           "PromptSetSpec", "MetricSpec", "AttackSpec", "PlotSpec", "UserError", "COLUMNS", "FORMAT",
           "RESULTS_CSV", "RESULTS_JSON", "REPORT_HTML"]


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


def _load(cfg: SweepConfig, m: ModelSpec, *, base: str | None = None, artifacts: bool = True):
    """Model ``m`` (or the pipeline ``base``) on the sweep's device, with its artifacts on."""
    pipe = pipelines.load(base or m.base, dtype=cfg.dtype, device=cfg.device, scheduler=cfg.scheduler)
    if artifacts:
        pipelines.apply(pipe, *[str(a.path) for a in m.artifacts])
    return pipe


def _erase(options: dict, output) -> None:
    """One training the sweep runs, into its cache (resuming an interrupted one)."""
    rest = dict(options)
    erasure.erase(rest.pop("concept"), **rest, output=str(output), resume=True, quiet=True)


def train_artifacts(cfg: SweepConfig, *, quiet: bool = True) -> None:
    """Train every ``train = {...}`` base and artifact not in the cache yet (an interrupted training resumes)."""
    done = set()
    for m in cfg.models:
        if m.train is not None and not Path(m.base).exists() and m.base not in done:
            _log(quiet, f"sweep: training the base of model '{m.name}': erasure.erase {train_options(m.train)}")
            _erase(m.train, m.base)
            done.add(m.base)
        for a in m.artifacts:
            if a.train is None or a.path.exists() or a.path in done:
                continue
            _log(quiet, f"sweep: training {a.name} for model '{m.name}': erasure.erase {train_options(a.train)}")
            _erase(a.train, a.path)
            done.add(a.path)


def _complete(cfg: SweepConfig, m: ModelSpec) -> bool:
    """Whether every image of model ``m`` is on disk already."""
    return all(image_folder(cfg, m.name, p.name).is_dir() and [e["index"] for e in read_manifest(
        image_folder(cfg, m.name, p.name))] == list(range(len(p.records))) for p in cfg.prompt_sets)


def check_artifacts_fit(cfg: SweepConfig) -> None:
    """Load each model that has artifact files and images still to make, and put its files on: one made for another
    base model is refused now, before anything is trained or written (not after the models before it have run)."""
    for m in cfg.models:
        files = [str(a.path) for a in m.artifacts if a.train is None]
        if not files or _complete(cfg, m):
            continue
        pipe = pipelines.load(m.base, dtype=cfg.dtype)  # on the CPU: only the shapes matter
        pipelines.apply(pipe, *files)
        del pipe
        gc.collect()


def model_info(cfg: SweepConfig, m: ModelSpec, hashes: Path) -> dict:
    """A model's entry in results.json: its base's and artifacts' fingerprints and how they were trained."""
    arts = []
    for a in m.artifacts:
        meta = load_artifact(a.path).metadata
        concept = meta.get("concept")
        name = concept.get("name") if isinstance(concept, dict) else concept
        arts.append({"name": a.name, "file": a.path.name, "sha256": file_sha256(a.path),
                     "tensors_sha256": tensors_sha256(a.path), "kind": meta.get("kind"), "method": meta.get("method"),
                     "concept": name, "concepts": meta.get("concepts") or [name], "train": a.train,
                     **training_cost(a.path, folder=False)})
    info = {"name": m.name, "base": label(m.base), "base_sha256": folder_sha256(model_folder(m.base), hashes),
            "artifacts": arts, "base_train": m.train}
    if m.train is not None:  # a trained base model (an SFD student): what it erased and what it cost
        info.update(base_method=m.train.get("method"), base_concepts=list(resolve_concept(m.train["concept"]).names),
                    **training_cost(Path(m.base), folder=True))
    return info


def _record(path: Path, folder: bool) -> dict:
    try:
        return json.loads(record_path(path, folder).read_text())
    except (OSError, ValueError):
        return {}


def training_cost(path: Path, folder: bool) -> dict:
    """An artifact's size on disk and, when its run record is beside it, its training seconds (``None`` for a file
    that came without one)."""
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return {"bytes": size, "train_seconds": _record(path, folder).get("seconds")}


def _guidance(cfg: SweepConfig, base: str) -> float:
    if cfg.guidance is not None:
        return cfg.guidance
    return float(GUIDANCE) if base == "toy" else 7.5


def generate_all(cfg: SweepConfig, infos: dict, *, quiet: bool = True, on_image: Callable | None = None) -> dict:
    """Every model × prompt set → its image folder (resumable). Returns {(model, set): generate_to_folder result}."""
    results = {}
    for m in cfg.models:
        def load(m=m):
            _log(quiet, f"sweep: loading model '{m.name}' ({m.base} + {len(m.artifacts)} artifact(s))")
            return _load(cfg, m)

        pipe = _LazyPipeline(load)
        info = infos[m.name]
        run_info = {"model": m.name, "base": info["base"], "base_sha256": info["base_sha256"],
                    "artifacts": [[a["name"], a["sha256"]] for a in info["artifacts"]],
                    "scheduler": cfg.scheduler, "dtype": cfg.dtype, "device": cfg.device}
        for p in cfg.prompt_sets:
            res = generate_to_folder(pipe, p.records, image_folder(cfg, m.name, p.name), seed=cfg.seed,
                                     steps=cfg.steps, guidance=_guidance(cfg, m.base), batch_size=cfg.batch_size,
                                     negative_prompt=cfg.negative_prompt, run_info=run_info, quiet=quiet,
                                     on_image=on_image)
            _log(quiet, f"sweep: {m.name}/{p.name}: {res['generated']} generated, {res['skipped']} already there")
            results[(m.name, p.name)] = res
        del pipe
        gc.collect()
        if str(cfg.device).startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def measure_all(cfg: SweepConfig, infos: dict, env: dict, *, quiet: bool = True) -> list[dict]:
    """Every metric on every model × (applicable) prompt set → tidy rows, in config order."""
    sha = config_sha(cfg)
    measures = [measure(spec, cfg) for spec in cfg.metrics]
    rows = []
    for m in cfg.models:
        info = infos[m.name]
        for p in cfg.prompt_sets:
            files, digest = images_on_disk(cfg, m.name, p)
            common = {
                **row_provenance(cfg, info, env, sha), "prompt_set": p.name,
                "artifact_train_args": ";".join(f"{a['name']}={train_options(a['train'])}"
                                                for a in info["artifacts"] if a["train"]),
                "prompt_source": label(p.source), "prompts": p.prompts,
                "prompts_sha256": prompts_sha(p), "images_per_prompt": cfg.images_per_prompt, "images": len(files),
                "images_sha256": digest, "guidance": _guidance(cfg, m.base),
                "scheduler": cfg.scheduler or "model default", "dtype": cfg.dtype or "fp32",
                "batch_size": cfg.batch_size, "torch_threads": env["torch_threads"],
            }
            mine = [meas for meas in measures if p.name in meas.spec.prompt_sets]
            for meas in mine:
                meas.start(p)
            for i, images in chunks(files):  # each image is read once, for every metric
                for meas in mine:
                    meas.update(p.records[i : i + len(images)], images, files[i : i + len(images)])
            for meas in mine:
                for quantity, value, n, ref in meas.finish(len(files)):
                    rows.append({**common, **meas.info, "metric": meas.spec.name, "quantity": quantity,
                                 "value": value, "n": n, "reference": ref or meas.info["reference"]})
            _log(quiet, f"sweep: measured {m.name}/{p.name}")
    return [{c: row.get(c, "") for c in COLUMNS} for row in rows]


def _attack_settings(cfg: SweepConfig, spec: AttackSpec, info: dict, guidance: float) -> dict:
    return {"concept": spec.concept, "attacks": spec.attacks, "budget": spec.budget, "seed": cfg.seed,
            "steps": cfg.steps, "guidance": guidance, "base_sha256": info["base_sha256"],
            "artifacts": [a["tensors_sha256"] for a in info["artifacts"]],
            "phrasings": file_sha256(spec.phrasings) if spec.phrasings else None}


def _attack_model(cfg: SweepConfig, spec: AttackSpec, m: ModelSpec, guidance: float, base_id: str,
                  quiet: bool) -> dict:
    pipe = _load(cfg, m)
    base = pipe if not m.artifacts and base_id == m.base else _load(cfg, m, base=base_id, artifacts=False)
    target = build_target(spec.concept, pipe, base, base_id, seed=cfg.seed, phrasings=spec.phrasings)
    res = run_attacks(target, spec.attacks, steps=cfg.steps, guidance=guidance, budget=spec.budget,
                      batch_size=cfg.batch_size, progress=not quiet)
    return {"pre_attack_rate": res["pre_attack_rate"], "pre_attack_n": len(target.prompts),
            "attacks": {n: r.summary() for n, r in res["attacks"].items()}}


def attack_all(cfg: SweepConfig, infos: dict, env: dict, config_sha256: str, *, quiet: bool = True) -> list[dict]:
    """Every ``[[attacks]]`` entry on its models → tidy rows (prompt set ``attack``, metric ``attack``; quantities
    ``CONCEPT.pre_attack`` and ``CONCEPT.ATTACK`` = its ASR; a budget other than the default suffixes them,
    ``CONCEPT.ATTACK.large``). Each model's result is kept in ``OUTPUT/attacks/MODEL-CONCEPT[.BUDGET].json`` with the
    settings that decide it, and reused while they match."""
    rows = []
    for spec in cfg.attacks:
        for name in spec.models:
            m = next(x for x in cfg.models if x.name == name)
            info = infos[name]
            base_id = teacher_of(m.base) or m.base
            guidance = _guidance(cfg, base_id)
            settings = _attack_settings(cfg, spec, info, guidance)
            suffix = "" if spec.budget == "default" else f".{spec.budget}"  # budgets side by side, apart
            cache = cfg.output / "attacks" / f"{name}-{re.sub(r'[^A-Za-z0-9_-]+', '_', spec.concept)}{suffix}.json"
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
                **row_provenance(cfg, info, env, config_sha256), "prompt_set": "attack", "metric": "attack",
                "metric_kind": "attack",
                "metric_protocol": f"eval.attacks, budget {spec.budget}; ASR on evaluation seeds",
                "guidance": guidance,
            }
            rows.append({**common, "quantity": f"{spec.concept}.pre_attack{suffix}",
                         "value": round(res["pre_attack_rate"], 4), "n": res["pre_attack_n"]})
            for a, r in res["attacks"].items():
                rows.append({**common, "quantity": f"{spec.concept}.{a}{suffix}", "value": r["asr"], "n": r["n"]})
    return [{c: row.get(c, "") for c in COLUMNS} for row in rows]


def run_sweep(cfg: SweepConfig, *, quiet: bool = True, on_image: Callable | None = None, report: bool = True) -> dict:
    """Train what is missing, generate (resuming), measure, and write results.csv / .json, plots and report.html.

    Returns the results dict (also in results.json) plus ``"files"`` (paths written) and ``"generated"`` (images made
    by this call, as opposed to found on disk)."""
    t0 = time.time()
    check_artifacts_fit(cfg)
    try:
        cfg.output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {cfg.output}: {e.strerror or e}") from None
    train_artifacts(cfg, quiet=quiet)
    hashes = cfg.cache / "fingerprints.json"
    infos = {m.name: model_info(cfg, m, hashes) for m in cfg.models}
    gen = generate_all(cfg, infos, quiet=quiet, on_image=on_image)
    env = environment()
    rows = measure_all(cfg, infos, env, quiet=quiet)
    rows += attack_all(cfg, infos, env, config_sha(cfg), quiet=quiet)
    results = {
        "format": FORMAT, "title": cfg.title or f"Sweep {cfg.path.name}", "config_file": cfg.path.name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "seconds": round(time.time() - t0, 1),
        "config": cfg.resolved(), "config_sha256": rows[0]["config_sha256"] if rows else "",
        "environment": env, "models": [infos[m.name] for m in cfg.models],
        "prompt_sets": [{"name": p.name, "source": label(p.source),
                         "prompts": p.prompts, "images": len(p.records), "prompts_sha256": prompts_sha(p),
                         "texts": [r.text for r in p.records], "seeds": [e["seed"] for e in _seeds(cfg, p)]}
                        for p in cfg.prompt_sets],
        "metrics": [{"name": s.name, "kind": s.kind, "prompt_sets": s.prompt_sets, "options": jsonable(s.options),
                     "quantities": quantities(s)} for s in cfg.metrics],
        "plots": [{"title": p.title, "x": p.x, "y": p.y} for p in cfg.plots],
        "grid_images": cfg.grid_images,
        "images": {f"{m.name}/{p.name}": f"images/{m.name}/{p.name}" for m in cfg.models for p in cfg.prompt_sets},
        "columns": list(COLUMNS), "rows": rows,
    }
    files = write_results(cfg.output, results)
    if report:
        files += write_plots(cfg.output, results)
        files.append(write_report(cfg.output, results))
    generated = sum(r["generated"] for r in gen.values())
    _log(quiet, f"sweep: {len(rows)} rows, {generated} images generated, {time.time() - t0:.1f} s → {cfg.output}")
    return {**results, "files": [str(f) for f in files], "generated": generated}


def _seeds(cfg: SweepConfig, p: PromptSetSpec) -> list[dict]:
    return plan(p.records, seed=cfg.seed, guidance=cfg.guidance if cfg.guidance is not None else 0.0)


# ---------------------------------------------------------------------------------------------------------------
# command line


EXAMPLES = """\
Examples:
  python -m eval.sweep --config examples/sweeps/toy.toml --output results/toy            # every method, one report
  python -m eval.sweep --config examples/sweeps/toy.toml --output results/toy --dry-run  # print the plan
  python -m eval.sweep --config examples/sweeps/toy.toml --output /tmp/toy-smoke \\
      --train-steps 2 --max-prompts 2 --images-per-prompt 1                             # a smoke run
  python -m eval.sweep --config examples/sweeps/toy_robust.toml --output results/toy-robust   # attacks"""


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\nThe parts:")[0] + "\n" + sweep_config.__doc__.split("\n", 2)[2]
    p = argparse.ArgumentParser(prog="python -m eval.sweep", description=doc.replace("``", "'"), epilog=EXAMPLES,
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
                   help="set steps of every artifact the sweep trains (smoke tests: other artifacts, other cache)")
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
