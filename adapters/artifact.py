"""The one place that reads and writes files of learned weights.

Artifacts are ``.safetensors`` only — never pickle — so loading one can never execute code. Their header metadata
(string → string, as safetensors requires) carries, under the key ``"erasure"``, a JSON object with:

=================  =====================================================================================
``kind``           what the tensors are: ``weight_delta`` (ESD, SalUn: θ − θ₀ of the changed weights),
                   ``membrane`` (SPM), ``saliency_mask`` (SalUn masks), ``checkpoint`` (resumable training),
                   ``data_cache`` (generated training latents)
``format_version`` integer; files newer than this package are refused
``method``         ``esd``, ``spm``, ``salun``, …, with its ``config`` (the run's resolved dataclass)
``concept``        the preset name and its ``prompts``
``base_model``     what it was trained on (``toy``, a hub id or a folder) and its ``fingerprint``
``version``        the package version that wrote it
=================  =====================================================================================

Writes are atomic (temp file in the same folder + rename). Loading validates the file and every problem is a
:class:`~adapters.errors.UserError` naming the file and the mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Iterable, Mapping

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from adapters.errors import UserError

FORMAT_VERSION = 1
KINDS = ("weight_delta", "membrane", "saliency_mask", "checkpoint", "data_cache")
META_KEY = "erasure"
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header larger than this is refused unread
MAX_METADATA_BYTES = 1 * 2**20
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # raw pickle protocol ≥ 2, or torch.save's zip container


def package_version() -> str:
    try:
        return version("concept-erasure-toolkit")
    except Exception:  # running from a source tree that was never installed
        return "0+unknown"


def fingerprint(named_shapes: Iterable[tuple[str, tuple[int, ...]]], architecture: str = "") -> str:
    """A short hash of the architecture name plus the names and shapes of the weights an artifact touches."""
    h = hashlib.sha256(architecture.encode())
    for name, shape in sorted(named_shapes):
        h.update(f"{name}:{tuple(shape)}\n".encode())
    return f"{architecture}:{h.hexdigest()[:16]}"


def module_fingerprint(module: torch.nn.Module, names: Iterable[str]) -> str:
    """Fingerprint of ``module`` restricted to the parameter/buffer ``names`` (those an artifact touches)."""
    state = dict(module.state_dict(keep_vars=True))
    missing = [n for n in names if n not in state]
    if missing:
        return f"{type(module).__name__}:missing:{missing[0]}"
    return fingerprint(((n, tuple(state[n].shape)) for n in names), _class_name(module))


def _class_name(module: torch.nn.Module) -> str:
    """The module's class name; for a module sharded by FSDP2 (class ``FSDP<Name>``, bases FSDPModule and the
    original class) the original class's name, so a sharded run's artifact names the same base model."""
    cls = type(module)
    if cls.__name__.startswith("FSDP") and len(cls.__bases__) == 2 and cls.__bases__[0].__name__ == "FSDPModule":
        cls = cls.__bases__[1]
    return cls.__name__


@dataclass
class Artifact:
    """A loaded, validated artifact: its tensors and its decoded metadata."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)
    raw_metadata: dict = field(default_factory=dict)  # the header's own string → string map

    @property
    def kind(self) -> str | None:
        return self.metadata.get("kind")

    @property
    def has_metadata(self) -> bool:
        return bool(self.metadata)


def save_artifact(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping, *,
                  extra_strings: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` and ``metadata`` (must contain ``kind``) atomically to a ``.safetensors`` file.

    ``extra_strings`` are written as top-level header strings beside ours (e.g. the kohya keys other tools read).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: artifacts are written as .safetensors files only")
    if metadata.get("kind") not in KINDS:
        raise ValueError(f"metadata kind must be one of {KINDS}, got {metadata.get('kind')!r}")
    meta = {"format_version": FORMAT_VERSION, "version": package_version(), **metadata}
    header = {"format": "pt", META_KEY: json.dumps(meta, sort_keys=True, default=str), **(extra_strings or {})}
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e} — choose a writable --output") from None
    _write_atomic(path, lambda tmp: safetensors.torch.save_file(clean, tmp, metadata=header), hint=" — choose a writable --output")
    return path


def _write_atomic(path: Path, write, hint: str = "") -> None:
    """``write(tmp)`` fills a temp sibling (unique per process), which is then renamed over ``path``: readers see the
    old file or the new one, never a part. The file gets the usual permissions (mkstemp makes 0600 files); on any
    failure the temp file is removed, and an OSError becomes a one-line UserError."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}{hint}") from None
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_container(path: Path) -> None:
    """Refuse anything that is not a plausible safetensors file before handing it to the parser."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a .safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head, brace = f.read(8), f.read(1)
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    looks_safetensors = brace == b"{" and 0 < n <= MAX_HEADER_BYTES and 8 + n <= size
    # a safetensors header length may start with byte 0x80 too (e.g. 35,968 bytes): only its JSON brace tells them apart
    if not looks_safetensors and head.startswith(_PICKLE_MAGIC):
        raise UserError(f"{path}: is a pickle/torch.save file; only .safetensors artifacts are loaded (pickles can run code)")
    if len(head) < 8:
        raise UserError(f"{path}: truncated or empty file, not a safetensors artifact")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise UserError(f"{path}: corrupt or truncated safetensors file (header claims {n} bytes, file has {size})")


def _decode_metadata(path: Path, raw: Mapping[str, str]) -> dict:
    blob = raw.get(META_KEY)
    if blob is None:
        return {}
    if len(blob) > MAX_METADATA_BYTES:
        raise UserError(f"{path}: metadata is {len(blob)} bytes, over the {MAX_METADATA_BYTES} limit")
    try:
        meta = json.loads(blob)
    except json.JSONDecodeError:
        raise UserError(f"{path}: its '{META_KEY}' metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: its '{META_KEY}' metadata is not a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise UserError(f"{path}: metadata has no valid format_version")
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: format version {version} is newer than this toolkit reads ({FORMAT_VERSION}); upgrade it")
    if meta.get("kind") not in KINDS:
        raise UserError(f"{path}: unknown artifact kind {meta.get('kind')!r} (known: {', '.join(KINDS)})")
    return meta


def load_artifact(path: str | os.PathLike, *, kind: str | None = None, allow_missing_metadata: bool = False) -> Artifact:
    """Load and validate an artifact. ``kind`` requires that kind; files without our metadata are refused unless
    ``allow_missing_metadata`` (then ``metadata`` is empty and the caller validates shapes)."""
    path = Path(path)
    _check_container(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
            meta = _decode_metadata(path, raw)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise UserError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    if not meta and not allow_missing_metadata:
        raise UserError(f"{path}: has no '{META_KEY}' metadata; it was not written by this toolkit")
    if kind is not None and meta and meta.get("kind") != kind:
        raise UserError(f"{path}: is a {meta.get('kind')} artifact, expected {kind}")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{path}: tensor '{name}' contains NaN or infinite values")
    return Artifact(path, tensors, meta, raw)


def check_fits(art: Artifact, module: torch.nn.Module, names: Iterable[str] | None = None) -> None:
    """Refuse an artifact whose tensors do not fit ``module`` (another base model), with one clear line."""
    state = dict(module.state_dict(keep_vars=True))
    for name in names if names is not None else art.tensors:
        if name not in state:
            raise UserError(f"{art.path}: made for another base model: this model has no weight '{name}'")
        want, got = tuple(state[name].shape), tuple(art.tensors[name].shape)
        if want != got:
            raise UserError(f"{art.path}: made for another base model: '{name}' is {got} in the file, {want} here")
    expected = art.metadata.get("base_model", {}).get("fingerprint") if art.metadata else None
    if expected and names is None:
        here = module_fingerprint(module, list(art.tensors))
        if here != expected:
            raise UserError(f"{art.path}: made for another base model (fingerprint {expected}, this model {here})")



def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a file through a temp sibling (unique per process) and a rename: readers see the old file or the new
    one, never a part; the file gets the usual permissions (umask). Failures are one-line UserErrors."""

    def write(tmp):
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
            f.write(data)

    _write_atomic(Path(path), write)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file (a run record, a report) atomically (:func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode())


def save_pipeline_folder(pipe, output: str | os.PathLike, metadata: Mapping) -> Path:
    """A pipeline as a diffusers folder (safetensors weights, ``model_index.json``) plus its ``erasure.json``
    metadata, atomically: ``save_pretrained`` into a temp sibling, then swapped in, so a folder is never half-written
    (an existing one is replaced only once the new one is complete)."""
    output = Path(output)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "erasure.json").write_text(json.dumps(metadata, indent=2, default=str))
        old = output.with_name(f".{output.name}.old")
        if output.exists():
            shutil.rmtree(old, ignore_errors=True)
            output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


class SpilledTensors(Mapping):
    """Tensors kept in a temporary ``.safetensors`` file instead of memory, read back one at a time (e.g. the exact
    fp32 originals θ₀ of a mixed-precision fine-tune, needed only for the final θ − θ₀). The file lives in a hidden
    temporary folder inside ``folder`` (not /tmp, which may be memory) and is removed with this object or at exit."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], folder: str | os.PathLike):
        self._dir = tempfile.TemporaryDirectory(dir=folder, prefix=".spill-")
        self.path = Path(self._dir.name) / "tensors.safetensors"
        safetensors.torch.save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(self.path))
        self._keys = list(tensors)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        self._dir.cleanup()
