"""Provenance of sweep results: fingerprints of files, artifacts and model folders, exact package versions, and the
columns every row of a model carries (so a number can be traced to the weights, prompts and code that made it)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import safe_open

from adapters.artifact import package_version, write_text_atomic
from adapters.errors import UserError
from eval.results import VERSIONED_PACKAGES, train_options
from pipelines.load import resolve_folder


def label(source: str) -> str:
    """A model or prompt source as recorded: ``toy``, a hub id or ``toy:…`` as is; a local path by its name."""
    return Path(source).name if Path(source).is_absolute() else source


def jsonable(options: dict) -> dict:
    """A metric's options as recorded: paths by their names (so the same config hashes alike anywhere)."""
    return {k: label(str(v)) if isinstance(v, Path) or (isinstance(v, str) and Path(v).is_absolute()) else v
            for k, v in options.items()}


def model_folder(model: str) -> Path:
    """``"toy"`` | local folder | cached hub id → its diffusers folder (with ``model_index.json``), offline: checks a
    hub id is cached before anything trains and fingerprints a base model without loading it."""
    return resolve_folder(model)


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
    files = sorted(q for q in folder.rglob("*")
                   if q.is_file() and not any(s.startswith(".") for s in q.relative_to(folder).parts))
    for p in files:
        st = p.stat()
        key = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in cache:
            cache[key] = file_sha256(p)
            changed = True
        h.update(f"{p.relative_to(folder).as_posix()}:{cache[key]}\n".encode())
    if changed and cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache_file, json.dumps(cache, indent=0, sort_keys=True))
    return h.hexdigest()


def environment() -> dict:
    """Exact versions of everything that decides the numbers."""
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


def config_sha(cfg) -> str:
    """sha256 of what decides the numbers (:meth:`SweepConfig.resolved`)."""
    return hashlib.sha256(json.dumps(cfg.resolved(), sort_keys=True).encode()).hexdigest()


def prompts_sha(pset) -> str:
    return hashlib.sha256(json.dumps([[r.text, r.seed, r.guidance] for r in pset.records]).encode()).hexdigest()


def row_provenance(cfg, info: dict, env: dict, config_sha256: str) -> dict:
    """The columns every row of one model carries: its base and artifacts' fingerprints, seeds, versions, config
    (``info``: the model's entry in results.json, from :func:`eval.sweep.model_info`)."""
    return {
        "model": info["name"], "base_model": info["base"], "base_model_sha256": info["base_sha256"],
        "base_train_args": train_options(info["base_train"]),
        "artifacts": ";".join(f"{a['name']}={a['sha256']}" for a in info["artifacts"]),
        "artifact_tensors_sha256": ";".join(f"{a['name']}={a['tensors_sha256']}" for a in info["artifacts"]),
        "seed": cfg.seed, "steps": cfg.steps, "device": cfg.device,
        "version_toolkit": env["toolkit"], "version_python": env["python"],
        **{f"version_{k.replace('-', '_')}": env[k.replace("-", "_")] for k in VERSIONED_PACKAGES},
        "config_sha256": config_sha256,
    }
