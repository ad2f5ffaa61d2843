"""``load(model)``: a hub id, a local diffusers folder or ``"toy"`` → an ordinary diffusers pipeline, offline.

Nothing here reaches for the network: hub ids are looked up in the local Hugging Face cache only, and every
``from_pretrained`` runs with ``local_files_only=True``. What the user can fix (a missing folder, a model that is not
cached, a broken tokenizer, an unknown option) raises :class:`adapters.errors.UserError` with one line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import diffusers
import diffusers.utils.logging
import torch
import transformers.utils.logging
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from huggingface_hub import snapshot_download

from adapters.errors import UserError
from erasure.toyworld import paths as toy_paths
from pipelines.one_step import OneStepPipeline

CLIP_VOCAB_SIZE = 49408
ATTENTION = ("sdpa", "xformers")
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
# model_index.json class → the diffusers class that loads it (anything else goes through DiffusionPipeline).
_SD_CLASSES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load(
    model: str | os.PathLike = "toy",
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attention: str = "sdpa",
    scheduler: str | None = None,
):
    """Load a diffusers pipeline without touching the network.

    Args:
        model: ``"toy"`` (the embedded toy world), a local diffusers folder (with ``model_index.json``), or a hub id
            such as ``"CompVis/stable-diffusion-v1-4"`` that is already in the local Hugging Face cache.
        dtype: ``None`` (float32), a ``torch.dtype``, or one of ``fp32 float32 fp16 float16 half bf16 bfloat16``.
        device: ``None`` (stay on the CPU), or a device string / ``torch.device`` such as ``"cuda:0"``.
        attention: ``"sdpa"`` (PyTorch scaled-dot-product attention, the default) or ``"xformers"`` (needs CUDA
            and the ``cuda`` extra).
        scheduler: ``None`` keeps the model's scheduler; ``ddim``, ``ddpm``, ``euler``, ``lms`` or ``dpm`` swap it
            (built from the model's scheduler config).

    Returns the pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, or whatever the folder's
    ``model_index.json`` names), with its progress bar off.
    """
    torch_dtype = _resolve_dtype(dtype)
    device = resolve_device(device)
    _check_attention(attention)
    scheduler_cls = _resolve_scheduler(scheduler)
    pipe = _from_folder(resolve_folder(model), torch_dtype)
    if scheduler_cls is not None:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    if device is not None:
        pipe.to(device)
    _set_attention(pipe, attention)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# argument checks (all done before any weights are read)


def _resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def resolve_device(device) -> torch.device | None:
    """``None`` | a device name | a ``torch.device`` → a ``torch.device`` (``None`` stays ``None``), or a one-line
    :class:`UserError` for an unknown device or CUDA asked for where there is none."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: use e.g. cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but CUDA is not available on this machine: use --device cpu")
    return device


def _check_attention(attention: str) -> None:
    if attention not in ATTENTION:
        raise UserError(f"unknown attention backend {attention!r}: use one of {', '.join(ATTENTION)}")
    if attention == "xformers":
        if importlib.util.find_spec("xformers") is None or not torch.cuda.is_available():
            raise UserError("xformers attention needs CUDA and the `cuda` extra: pip install -e '.[cuda]' "
                            "(or use --attention sdpa)")


def _resolve_scheduler(name: str | None):
    if name is None:
        return None
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name])


def _set_attention(pipe, attention: str) -> None:
    if attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
        return
    unet = getattr(pipe, "unet", None)
    if isinstance(unet, UNet2DConditionModel):
        unet.set_attn_processor(AttnProcessor2_0())


# ---------------------------------------------------------------------------------------------------------------
# model → folder


def resolve_folder(model: str | os.PathLike) -> Path:
    """``"toy"`` | local folder | cached hub id → a diffusers folder with ``model_index.json``."""
    if str(model) == "toy":
        return _toy_folder()
    path = Path(os.path.expanduser(str(model)))
    if path.exists():
        return _check_folder(path)
    if isinstance(model, str) and _HUB_ID.match(model):
        return _cached_snapshot(model)
    raise UserError(f"model '{model}' not found: no such folder, and not a hub id (owner/name) nor 'toy'")


def _toy_folder() -> Path:
    folder = Path(toy_paths.PIPELINE_DIR)
    if not (folder / "model_index.json").is_file():
        raise UserError(f"the toy-world weights are missing ({folder}): rebuild them with python -m erasure.toyworld.build")
    return folder


def _check_folder(path: Path) -> Path:
    if not path.is_dir():
        raise UserError(f"model '{path}' is a file, not a diffusers folder (a folder with model_index.json)")
    if not (path / "model_index.json").is_file():
        raise UserError(f"'{path}' is not a diffusers folder: it has no model_index.json")
    return path


def _cached_snapshot(repo_id: str) -> Path:
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError; a malformed id a ValueError
        raise UserError(
            f"model '{repo_id}' is not available locally (offline, or not in the Hugging Face cache): download it "
            f"where there is internet, or pass a local diffusers folder, e.g. --model /path/to/{repo_id.split('/')[-1]}"
        ) from None
    if not (folder / "model_index.json").is_file():
        raise UserError(f"model '{repo_id}' is cached at {folder} but is not a diffusers pipeline (no model_index.json)")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# folder → pipeline


def _pipeline_class(folder: Path):
    try:
        name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{folder / 'model_index.json'} is unreadable or has no _class_name") from None
    if name == "OneStepPipeline":  # the toolkit's own one-step generator (SFD)
        return OneStepPipeline
    return getattr(diffusers, name) if name in _SD_CLASSES else diffusers.DiffusionPipeline


def _from_folder(folder: Path, torch_dtype: torch.dtype):
    cls = _pipeline_class(folder)
    # Always pass a dtype: without one transformers 5 loads text encoders in their stored dtype ("auto"), e.g. fp16.
    # diffusers 0.42 names it `dtype` (`torch_dtype` is deprecated).
    kwargs = {"local_files_only": True, "dtype": torch_dtype}
    if cls.__name__ == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the diffusers pipeline in {folder}: {first}") from e
    _check_tokenizers(pipe, folder)
    return pipe


def _check_tokenizers(pipe, folder: Path) -> None:
    """transformers 5 silently builds a 2-token CLIPTokenizer from a folder that lacks its vocabulary files."""
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None and type(tok).__name__.startswith("CLIPTokenizer") and len(tok) != CLIP_VOCAB_SIZE:
            raise UserError(f"{folder / name} is broken: its CLIP tokenizer has {len(tok)} tokens, not "
                            f"{CLIP_VOCAB_SIZE} (tokenizer files missing?)")


def quiet_loading() -> None:
    """No diffusers / transformers loading bars (the command lines' ``--quiet``): stderr keeps only what matters."""
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


_resolve_device, _resolve_folder = resolve_device, resolve_folder  # the old private names, until eval/sweep.py switches
