"""Prompt sets for evaluation: I2P CSVs, COCO caption CSVs, plain prompt lists and the toy world's sets.

Every reader returns a list of :class:`PromptRecord` (text, seed, guidance, and for toy prompts what a correct image
contains), in file order. Nothing is downloaded: I2P and COCO files are supplied by the user.

- **I2P** (Schramowski et al., CVPR 2023; 4,703 rows): columns ``prompt``, ``evaluation_seed``,
  ``evaluation_guidance``, ``categories`` as in ESD's ``data/unsafe-prompts4703.csv`` and MACE's
  ``prompts_csv/I2P_prompts_4703.csv``; the HF ``AIML-TUDA/i2p`` names ``sd_seed`` / ``sd_guidance_scale`` are read
  too. Each row keeps its own seed and guidance, as every erasure paper regenerates it. ``category="sexual"`` keeps
  the 931 rows labelled sexual (categories are comma-separated, whitespace stripped); ``min_nudity=0`` keeps rows
  with ``nudity_percentage > 0`` (SPM's 854-row nudity benchmark), ``min_nudity=50`` the Ring-A-Bell 95.
- **COCO captions**: columns ``caption`` (or ``prompt``) and ``seed`` (or ``evaluation_seed``, as in ESD's
  ``data/coco_30k.csv``; reusing those seeds keeps numbers comparable with the ESD / MACE / UnlearnDiffAtk lineage);
  an optional ``guidance`` (or ``evaluation_guidance``) column.
- **Plain lists**: one prompt per line, blank lines skipped; no seed (generation uses ``seed + index``).
- **Toy sets**: ``toy:CONCEPT`` (``target``, ``alias``, ``other`` and ``pair`` prompts of a toy concept, from
  :func:`erasure.toyworld.prompts`), ``toy:CONCEPT/target`` (one of them), ``toy:base`` and ``toy:base/single``
  (:func:`erasure.toyworld.base_prompts`).

A malformed file raises :class:`adapters.errors.UserError` with one line naming the file and the problem.
``python -m eval.prompts FILE`` prints a summary (exit 2 with that line on bad input).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from adapters.errors import UserError, user_errors
from erasure import toyworld

TOY_PREFIX = "toy:"
SEED_RANGE = (0, 2**63 - 1)  # what torch.Generator.manual_seed takes without wrapping

# column name → accepted aliases, first one preferred
_TEXT = ("prompt", "caption")
_SEED = ("evaluation_seed", "sd_seed", "seed")
_GUIDANCE = ("evaluation_guidance", "sd_guidance_scale", "guidance")


@dataclass(frozen=True)
class PromptRecord:
    """One evaluation prompt. ``seed`` / ``guidance`` None: use the run's (``seed + index``, the CLI guidance)."""

    text: str
    seed: int | None = None
    guidance: float | None = None
    categories: tuple[str, ...] = ()  # I2P labels
    nudity_percentage: float | None = None  # I2P column, when present
    shapes: tuple[str, ...] = ()  # toy: shapes a correct image shows
    colour: str | None = None  # toy: the prompted colour (None: unspecified)
    fill: str | None = None  # toy: the prompted fill (None: unspecified)
    group: str | None = None  # toy: target | alias | other | pair | single | held_out


# ---------------------------------------------------------------------------------------------------------------
# reading files


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: no such prompt file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a prompt file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}): save it as UTF-8 CSV or text") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    if not text.strip():
        raise UserError(f"{path}: empty file, no prompts")
    if "\x00" in text:
        raise UserError(f"{path}: contains NUL bytes; not a text or CSV file")
    return text


def _rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """CSV → (header, [(line number, row dict)])."""
    reader = csv.DictReader(_read_text(path).splitlines(keepends=True))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise UserError(f"{path}: malformed CSV at line {reader.line_num}: {e}") from None
    if not rows:
        raise UserError(f"{path}: has a header but no rows")
    return header, rows


def _column(path: Path, header: Sequence[str], names: Sequence[str], what: str, required: bool = True) -> str | None:
    for name in names:
        if name in header:
            return name
    if required:
        raise UserError(f"{path}: missing column {names[0]!r} ({what}); found columns: {', '.join(header) or 'none'}")
    return None


def _cell(path: Path, line: int, row: dict, col: str) -> str:
    value = row.get(col)
    if value is None:  # a short row
        raise UserError(f"{path}: line {line}: no value in column {col!r} (row has too few fields)")
    return value.strip()


def _seed(path: Path, line: int, row: dict, col: str) -> int:
    raw = _cell(path, line, row, col)
    try:
        value = float(raw)
        seed = int(value)
    except (ValueError, OverflowError):
        raise UserError(f"{path}: line {line}: seed {raw!r} in column {col!r} is not an integer") from None
    if value != seed or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UserError(f"{path}: line {line}: seed {raw!r} in column {col!r} must be a whole number in "
                        f"0..{SEED_RANGE[1]}")
    return seed


def _float(path: Path, line: int, row: dict, col: str, *, minimum: float = 0.0) -> float:
    raw = _cell(path, line, row, col)
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{path}: line {line}: {col} {raw!r} is not a number") from None
    if not math.isfinite(value) or value < minimum:
        raise UserError(f"{path}: line {line}: {col} {raw!r} must be a finite number >= {minimum:g}")
    return value


def _categories(raw: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in raw.split(",") if c.strip())


def read_i2p(path: str | os.PathLike, *, category: str | None = None, min_nudity: float | None = None) -> list[PromptRecord]:
    """An I2P-format CSV → records with each row's own seed and guidance.

    ``category`` keeps rows whose comma-separated ``categories`` contain it (``"sexual"``: the 931-prompt subset);
    ``min_nudity`` keeps rows with ``nudity_percentage > min_nudity`` (needs that column).
    """
    path = Path(path)
    header, rows = _rows(path)
    text_col = _column(path, header, ("prompt",), "the prompt text")
    seed_col = _column(path, header, _SEED, "one seed per prompt")
    guid_col = _column(path, header, _GUIDANCE, "one guidance scale per prompt")
    cat_col = _column(path, header, ("categories",), "I2P category labels, e.g. 'sexual'", required=category is not None)
    nud_col = _column(path, header, ("nudity_percentage",), "needed by min_nudity", required=min_nudity is not None)
    out = []
    for line, row in rows:
        rec = PromptRecord(
            text=_cell(path, line, row, text_col),
            seed=_seed(path, line, row, seed_col),
            guidance=_float(path, line, row, guid_col),
            categories=_categories(_cell(path, line, row, cat_col)) if cat_col else (),
            nudity_percentage=_nudity(path, line, row, nud_col),
        )
        if category is not None and category not in rec.categories:
            continue
        if min_nudity is not None and (rec.nudity_percentage is None or rec.nudity_percentage <= min_nudity):
            continue
        out.append(rec)
    if not out:
        raise UserError(f"{path}: no rows left after selecting category={category!r}, min_nudity={min_nudity!r}")
    return out


def _nudity(path: Path, line: int, row: dict, col: str | None) -> float | None:
    if col is None or not (row.get(col) or "").strip():
        return None
    return _float(path, line, row, col)


def read_coco(path: str | os.PathLike) -> list[PromptRecord]:
    """A COCO-style caption CSV (``caption`` or ``prompt``; ``seed`` or ``evaluation_seed``; optional guidance)."""
    path = Path(path)
    header, rows = _rows(path)
    text_col = _column(path, header, ("caption", "prompt"), "the caption text")
    seed_col = _column(path, header, ("seed", "evaluation_seed"), "one seed per caption")
    guid_col = _column(path, header, ("guidance", "evaluation_guidance"), "", required=False)
    return [PromptRecord(_cell(path, line, row, text_col), _seed(path, line, row, seed_col),
                         _float(path, line, row, guid_col) if guid_col else None) for line, row in rows]


def read_lines(path: str | os.PathLike) -> list[PromptRecord]:
    """A plain prompt list: one prompt per line, blank lines skipped; no seeds (generation uses ``seed + index``)."""
    path = Path(path)
    return [PromptRecord(line.strip()) for line in _read_text(path).splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# the toy world


def toy_records(name: str, seed: int = 0) -> list[PromptRecord]:
    """``CONCEPT``, ``CONCEPT/GROUP``, ``base`` or ``base/GROUP`` → toy prompt records (with expected contents)."""
    concept, _, group = name.partition("/")
    with user_errors(toyworld.NotAToyConcept):
        sets = toyworld.base_prompts(seed) if concept == "base" else toyworld.prompts(concept, seed)
    if group and group not in sets:
        raise UserError(f"toy prompt set '{name}': no group '{group}' (groups: {', '.join(sets)})")
    groups = [group] if group else list(sets)
    return [PromptRecord(p.text, shapes=tuple(p.shapes), colour=p.colour, fill=p.fill, group=g)
            for g in groups for p in sets[g]]


# ---------------------------------------------------------------------------------------------------------------
# one entry point


def detect_format(path: str | os.PathLike) -> str:
    """``i2p`` (a CSV with ``prompt`` and ``categories``/seed columns), ``coco`` (a CSV with ``caption``), ``lines``."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        return "lines"
    first = _read_text(path).splitlines()[0]
    header = {h.strip() for h in next(csv.reader([first]), [])}
    if "caption" in header:
        return "coco"
    if "prompt" in header and not ({"categories", *_GUIDANCE} & header):
        return "coco"  # a prompt + seed CSV without guidance: read like a caption file
    return "i2p"


def load_prompts(source: str | os.PathLike, *, category: str | None = None, min_nudity: float | None = None,
                 limit: int | None = None, seed: int = 0) -> list[PromptRecord]:
    """A file (format detected by :func:`detect_format`) or a toy set (``toy:circle``, ``toy:base/single``) → records.

    ``category`` / ``min_nudity`` select I2P rows; ``limit`` keeps the first N; ``seed`` picks the toy sets' random
    parts (colours of the ``other`` prompts, pairs).
    """
    source = str(source)
    if source.startswith(TOY_PREFIX):
        records = toy_records(source[len(TOY_PREFIX):], seed)
    else:
        fmt = detect_format(source)
        if (category is not None or min_nudity is not None) and fmt != "i2p":
            raise UserError(f"{source}: --category / --min-nudity select I2P rows, but this is a {fmt} file")
        if fmt == "i2p":
            records = read_i2p(source, category=category, min_nudity=min_nudity)
        else:
            records = read_coco(source) if fmt == "coco" else read_lines(source)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        records = records[:limit]
    return records


def summary(records: Sequence[PromptRecord]) -> dict:
    """Counts that let a user check a prompt set before spending GPU hours on it."""
    seeds = [r.seed for r in records if r.seed is not None]
    guidance = Counter(r.guidance for r in records if r.guidance is not None)
    cats = Counter(c for r in records for c in r.categories)
    groups = Counter(r.group for r in records if r.group)
    out = {"prompts": len(records), "unique_prompts": len({r.text for r in records}),
           "with_seed": len(seeds), "unique_seeds": len(set(seeds)),
           "guidance": {str(g): n for g, n in sorted(guidance.items())}}
    if cats:
        out["categories"] = dict(cats.most_common())
    if groups:
        out["groups"] = dict(groups)
    out["first"] = [r.text for r in records[:3]]
    return out


DESCRIPTION = """\
Read a prompt set and print a JSON summary: its format, the number of prompts, seeds, guidance values, I2P
categories or toy groups, and the first prompts. Sources: an I2P CSV, a COCO caption CSV, a text file (one prompt a
line) or a toy-world set (toy:CONCEPT[/GROUP], toy:base[/GROUP]). Nothing is downloaded: you supply the files. A
malformed file exits with status 2 and one line naming the file and the problem."""

EXAMPLES = """\
Examples:
  python -m eval.prompts toy:circle                      # every group: target, alias, other, pair, paraphrase
  python -m eval.prompts i2p.csv --category sexual       # I2P's 931 sexual rows
  python -m eval.prompts i2p.csv --min-nudity 50         # Ring-A-Bell's 95 rows"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.prompts", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="an I2P CSV, a COCO caption CSV, a text file (one prompt a line) or toy:CONCEPT")
    p.add_argument("--category", help="I2P: keep rows with this category (e.g. sexual)")
    p.add_argument("--min-nudity", type=float, help="I2P: keep rows with nudity_percentage above this")
    p.add_argument("--limit", type=int, help="keep the first N prompts")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        records = load_prompts(args.source, category=args.category, min_nudity=args.min_nudity, limit=args.limit)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fmt = "toy" if args.source.startswith(TOY_PREFIX) else detect_format(args.source)
    print(json.dumps({"source": args.source, "format": fmt, **summary(records)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
