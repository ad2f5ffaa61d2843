"""The sweep config's TOML tables as plain dataclasses, and the one reader that checks a table against them.

Each table of the config is a dataclass below: its fields are the table's keys, their types are what the key must
hold, a field without a default is a required key, and ``metadata`` adds a lower bound (``min``) or says that a path
need not exist yet (``exists=False``). :func:`read_table` turns a parsed TOML table into that dataclass or raises a
one-line :class:`UserError` naming the file, the table and the key. What depends on other tables (names that must
refer to something, files that must be artifacts, …) is checked by :mod:`eval.sweep_config`.
"""

from __future__ import annotations

import os
import re
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import NoReturn

from adapters.errors import UserError
from eval.provenance import jsonable, label

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
          dict: "a table", Path: "a string"}


def _min(v):
    return {"min": v}


@dataclass
class TopTable:
    models: list
    prompt_sets: list
    metrics: list
    sweep: object = None  # a table: checked as SweepTable, under its own name
    plots: list = field(default_factory=list)
    attacks: list = field(default_factory=list)


@dataclass
class SweepTable:
    seed: int = field(default=0, metadata=_min(0))
    steps: int = field(default=25, metadata=_min(1))
    guidance: float | None = field(default=None, metadata=_min(0.0))
    batch_size: int = field(default=16, metadata=_min(1))
    images_per_prompt: int = field(default=1, metadata=_min(1))
    max_prompts: int | None = field(default=None, metadata=_min(1))
    scheduler: str | None = None
    dtype: str | None = None
    device: str | None = None
    negative_prompt: str | None = None
    output: Path | None = field(default=None, metadata={"exists": False})
    cache: Path | None = field(default=None, metadata={"exists": False})
    grid_images: int = field(default=8, metadata=_min(0))
    title: str | None = None


@dataclass
class ModelTable:
    name: str
    base: object = "toy"  # a string (toy, a folder, a hub id) or a table: TrainedBaseTable
    artifacts: list = field(default_factory=list)


@dataclass
class TrainedBaseTable:
    train: dict  # keyword options of erasure.erase, for a method that writes a pipeline folder (SFD)


@dataclass
class ArtifactTable:
    path: Path | None = None
    train: dict | None = None  # keyword options of erasure.erase (the sweep sets model and output)
    name: str | None = None


@dataclass
class PromptSetTable:
    name: str
    source: str
    limit: int | None = field(default=None, metadata=_min(1))
    category: str | None = None
    min_nudity: float | None = field(default=None, metadata=_min(0.0))


@dataclass
class MetricTable:  # the keys every kind has; the kind's own options are its Options dataclass (eval.sweep_metrics)
    kind: object  # checked against the registry, for a better message than a type error
    name: str | None = None
    prompt_sets: list[str] | None = None


@dataclass
class PlotTable:
    x: str
    y: str
    title: str | None = None


@dataclass
class AttackTable:
    concept: str
    attacks: list[str] | None = None
    budget: str = "default"
    models: list[str] | None = None
    phrasings: Path | None = None


# ---------------------------------------------------------------------------------------------------------------
# the checked config, as the sweep runs it


@dataclass
class ArtifactSpec:
    name: str
    path: Path | None = None  # an existing file, or where the sweep trains it
    train: dict | None = None  # erasure.erase options (model included), or None
    cache_key: str | None = None


@dataclass
class ModelSpec:
    name: str
    base: str  # as given ("toy", a hub id) or an absolute folder path
    artifacts: list[ArtifactSpec] = field(default_factory=list)
    train: dict | None = None  # erasure.erase options of a base the sweep distils (SFD), or None


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
            "models": [{"name": m.name, "base": label(m.base), "artifacts": [
                {"name": a.name, "train": a.train} if a.train is not None else {"name": a.name, "file": a.path.name}
                for a in m.artifacts]} for m in self.models],
            "prompt_sets": [{"name": p.name, "source": label(p.source), "limit": p.limit, "category": p.category,
                             "min_nudity": p.min_nudity, "prompts": p.prompts} for p in self.prompt_sets],
            "metrics": [{"name": m.name, "kind": m.kind, "prompt_sets": m.prompt_sets, **jsonable(m.options)}
                        for m in self.metrics],
        }
        if self.attacks:  # (absent without [[attacks]]: older configs keep their hash)
            out["attacks"] = [{"concept": a.concept, "attacks": a.attacks, "budget": a.budget, "models": a.models,
                               "phrasings": a.phrasings.name if a.phrasings else None} for a in self.attacks]
        return out


# ---------------------------------------------------------------------------------------------------------------
# the reader


class Place:
    """Where a table is (the file, and e.g. ``[[models]] 'esd'``): every problem is one line naming both."""

    def __init__(self, file: Path, where: str):
        self.file, self.where = file, where

    def fail(self, msg: str) -> NoReturn:
        raise UserError(f"{self.file}: {self.where}: {msg}")

    def path(self, key: str, value: str, *, exists: bool = True) -> Path:
        """A path as written in the config → absolute (``~`` expanded, relative to the config's folder)."""
        p = Path(os.path.expanduser(value))
        p = p if p.is_absolute() else (self.file.parent / p)
        if exists and not p.exists():
            self.fail(f"'{key}' {value!r}: no such file or folder ({p})")
        return p


def load_toml(file: Path) -> dict:
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file}: no such config file") from None
    except IsADirectoryError:
        raise UserError(f"{file}: is a folder, not a TOML config file") from None
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{file}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{file}: not valid TOML: {str(e).splitlines()[0]}") from None


def check_keys(place: Place, table, *schemas: type) -> dict:
    """``table`` is a table whose keys all belong to one of ``schemas`` and that has each one's required keys."""
    if not isinstance(table, dict):
        place.fail(f"must be a table, got {type(table).__name__}")
    allowed = {f.name for s in schemas for f in fields(s)}
    for key in table:
        if key not in allowed:
            place.fail(f"unknown key '{key}' (known: {', '.join(sorted(allowed))})")
    for s in schemas:
        for f in fields(s):
            if f.default is MISSING and f.default_factory is MISSING and f.name not in table:
                place.fail(f"missing key '{f.name}'")
    return table


def read_name(place: Place, table: dict, default: str | None = None) -> str:
    """The table's ``name``: it names folders and plot keys, so letters, digits, '_' and '-'."""
    v = table.get("name", default)
    if v is None:
        place.fail("missing key 'name'")
    v = _value(place, "name", v, str, {})
    if not NAME.match(v):
        place.fail(f"name {v!r} must be letters, digits, '_' and '-' (it names folders and plot keys)")
    return v


def read_values(place: Place, table: dict, schema: type):
    """The ``schema`` dataclass of ``table``'s values (keys already checked), each checked against its field."""
    hints = typing.get_type_hints(schema)
    values = {}
    for f in fields(schema):
        if f.name in table:
            values[f.name] = _value(place, f.name, table[f.name], hints[f.name], f.metadata)
    return schema(**values)


def read_table(place: Place, table, schema: type):
    return read_values(place, check_keys(place, table, schema), schema)


def _value(place: Place, key: str, v, hint, meta):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]  # X | None: a key that is absent is None (TOML has no null)
    kind, item = typing.get_origin(hint) or hint, (typing.get_args(hint) or (None,))[0]
    if kind is object:
        return v
    ok = {int: isinstance(v, int) and not isinstance(v, bool),
          float: isinstance(v, (int, float)) and not isinstance(v, bool),
          bool: isinstance(v, bool)}.get(kind, isinstance(v, str if kind is Path else kind))
    if not ok:
        place.fail(f"'{key}' must be {_WORDS[kind]}, got {v!r}")
    if item is str and not all(isinstance(s, str) for s in v):
        place.fail(f"'{key}' must be a list of strings, got {v!r}")
    if kind is float:
        v = float(v)
    if "min" in meta and v < meta["min"]:
        place.fail(f"'{key}' must be at least {meta['min']}, got {v!r}")
    if isinstance(v, str) and not v.strip():
        place.fail(f"'{key}' is empty")
    if kind is Path:
        return place.path(key, v, exists=meta.get("exists", True))
    return v
