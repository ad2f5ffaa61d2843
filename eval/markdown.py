"""A sweep's ``results.json`` → a Markdown results page: the erasure table (per erased model: method, concepts, training
time, artifact size, what is left of the concepts, what is kept of the rest) and every prompt set's numbers, headed
by the command, the config's sha256, the package versions and the date, so no number on the page is typed by hand.

    python -m eval.report results/toy-many --markdown docs/results/many-concepts.md
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from adapters.artifact import write_bytes_atomic, write_text_atomic
from adapters.errors import UserError
from eval.generate import read_manifest
from eval.results import column_key

TARGET, ALIAS, OTHER, PAIR = "target", "alias", "other", "pair"  # the toy sweeps' prompt-set names the tables read


def _value(results: dict, model: str, metric: str, quantity: str, pset: str):
    for r in results["rows"]:
        if (r["model"], r["metric"], r["quantity"], r["prompt_set"]) == (model, metric, quantity, pset):
            return r["value"]
    return None


def _metric(results: dict, kind: str) -> str | None:
    return next((m["name"] for m in results["metrics"] if m["kind"] == kind), None)


def erased_models(results: dict) -> list[dict]:
    """Each model that erased something: its name, method, erased concepts, training seconds (``None`` when a file
    came without its run record) and artifact bytes (artifacts, or the trained base model)."""
    out = []
    for m in results["models"]:
        arts = m["artifacts"]
        if arts:
            concepts = [c for a in arts for c in a.get("concepts") or [a.get("concept")]]
            seconds = [a.get("train_seconds") for a in arts]
            out.append({"model": m["name"], "method": "+".join(str(a.get("method")) for a in arts),
                        "concepts": concepts, "bytes": sum(a.get("bytes") or 0 for a in arts),
                        "train_seconds": None if None in seconds else round(sum(seconds), 1)})
        elif m.get("base_method"):
            out.append({"model": m["name"], "method": m["base_method"], "concepts": m["base_concepts"],
                        "bytes": m.get("bytes"), "train_seconds": m.get("train_seconds")})
    return out


def erasure_rows(results: dict, base: str = "base") -> list[dict]:
    """Per erased model of a toy sweep (prompt sets ``target``, ``alias``, ``other``; a ``toy_concept_rates`` and a
    ``fid`` metric): the highest judge rate among its erased concepts on their own prompts and on aliases, the rate
    at which the prompts naming none of them are drawn as asked (and its ratio to ``base``), the toy FID ratio on
    those prompts and, with a ``pair`` set, how often two-object prompts keep their other shape (and its ratio)."""
    rates, fid = _metric(results, "toy_concept_rates"), _metric(results, "fid")
    rows = []
    for e in erased_models(results):
        row = dict(e, n=len(e["concepts"]))
        if rates:
            targets = [_value(results, e["model"], rates, f"{c}.target", TARGET) for c in e["concepts"]]
            aliases = [_value(results, e["model"], rates, f"{c}.target", ALIAS) for c in e["concepts"]]
            kept = _value(results, e["model"], rates, f"{e['concepts'][0]}.other", OTHER)
            kept_base = _value(results, base, rates, f"{e['concepts'][0]}.other", OTHER)
            pair = _value(results, e["model"], rates, f"{e['concepts'][0]}.kept", PAIR)
            pair_base = _value(results, base, rates, f"{e['concepts'][0]}.kept", PAIR)
            row.update(target_max=max((v for v in targets if v is not None), default=None),
                       alias_max=max((v for v in aliases if v is not None), default=None), kept=kept,
                       kept_ratio=_ratio(kept, kept_base), pair_kept=pair, pair_kept_ratio=_ratio(pair, pair_base))
        if fid:
            f, f_base = _value(results, e["model"], fid, "fid", OTHER), _value(results, base, fid, "fid", OTHER)
            row["fid_ratio"] = _ratio(f, f_base)
        rows.append(row)
    return rows


def _ratio(value, base_value):
    return round(value / base_value, 3) if value is not None and base_value else None


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}".rstrip("0").rstrip(".") if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return lines


def erasure_table(results: dict, base: str = "base", rows: list[dict] | None = None) -> list[str]:
    """The erasure table of :func:`erasure_rows` (``rows``: those rows, when the caller has them already)."""
    rows = erasure_rows(results, base) if rows is None else rows
    header = ["model", "method", "N", "train s", "artifact MB", "erased: max rate on own prompts",
              "max rate on aliases", "rest drawn as asked", "× base", "rest toy FID × base"]
    body = [[r["model"], r["method"], r["n"], r["train_seconds"],
             None if r["bytes"] is None else round(r["bytes"] / 2**20, 3), r.get("target_max"), r.get("alias_max"),
             r.get("kept"), r.get("kept_ratio"), r.get("fid_ratio")] for r in rows]
    if any(r.get("pair_kept") is not None for r in rows):  # two-object prompts: is the other shape still drawn?
        header += ["two-object prompts: other shape kept", "× base"]
        body = [b + [r.get("pair_kept"), r.get("pair_kept_ratio")] for b, r in zip(body, rows)]
    return _table(header, body)


def set_tables(results: dict) -> list[str]:
    """Every prompt set: models × the quantities measured on it."""
    out = []
    single = {m["name"] for m in results["metrics"] if len(m["quantities"]) == 1}
    models = [m["name"] for m in results["models"]]
    for p in results["prompt_sets"]:
        rows = [r for r in results["rows"] if r["prompt_set"] == p["name"] and r["metric"] != "attack"
                and not r["quantity"].endswith("_none")]  # the no-shape fractions stay in results.csv
        keys = list(dict.fromkeys(column_key(r, single) for r in rows))
        if not keys:
            continue
        by = {(r["model"], column_key(r, single)): r["value"] for r in rows}
        out += ["", f"### {p['name']} ({p['source']}: {p['prompts']} prompts, {p['images']} images)", ""]
        out += _table(["model", *keys], [[m, *(by.get((m, k)) for k in keys)] for m in models])
    return out


def attack_table(results: dict) -> list[str]:
    """Models × attacks: the pre-attack rate, each attack's success rate (higher = the concept came back) and, per
    concept and budget, the worst of them (``CONCEPT.worst[.BUDGET]``: the highest rate among the attacks run)."""
    rows = [r for r in results["rows"] if r["metric"] == "attack"]
    keys = list(dict.fromkeys(r["quantity"] for r in rows))
    by = {(r["model"], r["quantity"]): r["value"] for r in rows}
    worst: dict[str, list[str]] = {}  # CONCEPT.worst[.BUDGET] → the attack columns it is the maximum of
    for k in keys:
        concept, attack, *budget = k.split(".")
        if attack != "pre_attack":
            worst.setdefault(".".join([concept, "worst", *budget]), []).append(k)
    models = list(dict.fromkeys(r["model"] for r in rows))
    body = [[m, *(by.get((m, k)) for k in keys),
             *(max((by[(m, k)] for k in cols if (m, k) in by), default=None) for cols in worst.values())]
            for m in models]
    return _table(["model", *keys, *worst], body)


def page(results: dict, command: str, *, base: str = "base", image: str | None = None,
         image_set: str | None = None) -> str:
    """The Markdown page of a sweep's results (``image``: a picture file beside the page, made by ``picture`` from
    prompt set ``image_set``)."""
    env = results["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("platform", "torch_threads") and v)
    lines = [f"# {results['title']}", "",
             "Generated from the sweep's `results.json`; do not edit by hand. Regenerate with:", "",
             "```", command, "```", "",
             f"- config: `{results['config_file']}`, sha256 `{results['config_sha256'][:16]}…`",
             f"- measured: {results.get('date', 'date not recorded')} on {env.get('platform')}, "
             f"{env.get('torch_threads')} torch threads (training seconds depend on the machine: compare them as "
             "ratios within this table)",
             f"- versions: {versions}", ""]
    if image:
        lines += [f"![The first images of prompt set {image_set!r}, one row per model]({image})", "",
                  f"*One row per model, the same prompts ({image_set!r}) and seeds in every row.*", ""]
    if erased_models(results):
        rows = erasure_rows(results, base)
        lines += ["## Erasure", "",
                  "Rates are the toy judge's: the fraction of images showing the concept (own prompts, aliases: "
                  f"lower is better), and of prompts naming none of the erased concepts drawn as asked (higher is "
                  f"better; × base: the ratio to the model `{base}`)"
                  + (", and of two-object prompts naming the concept whose other shape is drawn (higher is better)"
                     if any(r.get("pair_kept") is not None for r in rows) else "") + ".", ""]
        lines += erasure_table(results, base, rows)
    if any(r["metric"] == "attack" for r in results["rows"]):
        lines += ["", "## Attacks", "", "Attack success rate: the fraction of the attack's images in which the judge "
                  "sees the concept (pre_attack: the model on the concept's own prompts; worst: the highest rate "
                  "among the attacks run, per budget).", ""] + attack_table(results)
    lines += ["", "## Every prompt set", "", "(The fractions of images with no shape at all, `*_none`, are in "
              "`results.csv`.)"] + set_tables(results)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# the README's headline table and the page's picture, from the same results

README_BEGIN = "<!-- results:headline (generated by python -m eval.report --readme; do not edit) -->"
README_END = "<!-- /results:headline -->"


def headline(results: dict, source: str, *, base: str = "base") -> list[str]:
    """The README's headline table: per erased model, what is left of the concept and what is kept of the rest,
    with its training time and artifact size — a subset of the page's erasure table, from the same rows."""
    header = ["method", "erased concept on its prompts", "on aliases", "rest drawn as asked, × base",
              "rest toy FID, × base", "training s", "artifact MB"]
    body = [[r["method"], r.get("target_max"), r.get("alias_max"), r.get("kept_ratio"), r.get("fid_ratio"),
             r["train_seconds"], None if r["bytes"] is None else round(r["bytes"] / 2**20, 2)]
            for r in erasure_rows(results, base)]
    return _table(header, body) + ["", f"<sub>{results['title']} — {source}, measured {results.get('date', '?')}; "
                                   "training seconds are this machine's, compare them as ratios.</sub>"]


def replace_block(text: str, block: Sequence[str]) -> str:
    """``text`` with the lines between the headline markers replaced by ``block`` (the markers must be there)."""
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise UserError(f"no headline markers to replace: add the lines {README_BEGIN} and {README_END}")
    return text[: start + len(README_BEGIN)] + "\n" + "\n".join(block) + "\n" + text[end:]


def picture(folder, results: dict, prompt_set: str, *, columns: int = 8, scale: int = 2):
    """One row per model of the first ``columns`` images of ``prompt_set`` (the same prompts and seeds in every
    row), each row labelled with its model → a PIL image, or ``None`` when a model has no images on disk."""
    files = {}
    for m in results["models"]:  # the sweep's own image folders, in manifest order (as report.html's grids)
        images = Path(folder) / results["images"][f"{m['name']}/{prompt_set}"]
        files[m["name"]] = [images / e["file"] for e in read_manifest(images)]
    columns = min([columns, *map(len, files.values())])
    if not files or columns == 0:
        return None
    rows = [(name, [Image.open(f).convert("RGB") for f in fs[:columns]]) for name, fs in files.items()]
    w, h = rows[0][1][0].size
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label = max(64, 8 + max(int(measure.textlength(name)) for name, _ in rows))  # the longest model name fits
    pad = 2
    out = Image.new("RGB", (label + columns * (w * scale + pad), len(rows) * (h * scale + pad)), "white")
    draw = ImageDraw.Draw(out)
    for i, (name, images) in enumerate(rows):
        y = i * (h * scale + pad)
        draw.text((4, y + h * scale // 2 - 5), name, fill="black")
        for j, im in enumerate(images):
            out.paste(im.resize((w * scale, h * scale), Image.NEAREST), (label + j * (w * scale + pad), y))
    return out


PAGE_COLUMNS = ("model", "metric", "quantity", "prompt_set", "value", "n")


def page_data(results: dict) -> dict:
    """What a page shows, from a sweep's results: the rows' model / metric / quantity / prompt set / value / n (the
    per-row provenance stays in the sweep's results.json) and the run's config, environment, models, metrics and
    prompt sets (without their texts). ``page(page_data(r), …) == page(r, …)``."""
    out = {k: v for k, v in results.items() if k not in ("rows", "prompt_sets", "columns")}
    out["rows"] = [{c: r[c] for c in PAGE_COLUMNS} for r in results["rows"]]
    out["prompt_sets"] = [{k: v for k, v in p.items() if k not in ("texts", "seeds")} for p in results["prompt_sets"]]
    return out


def write_page(folder, results: dict, path, command: str, *, base: str = "base", readme=None) -> list[Path]:
    """Write the results page ``path``, beside it the results it shows (``.json``, so the page can be checked and
    rebuilt without the sweep folder) and its picture (``.png``, when the images are on disk); with ``readme``,
    replace that file's headline table. Every write is atomic. → the files written."""
    path = Path(path)
    if readme is not None:
        readme = Path(readme)
        readme_text = readme.read_text()
        replace_block(readme_text, [])  # no markers: refused before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    pset = next((p["name"] for p in results["prompt_sets"] if p["name"] == TARGET), None) or \
        (results["prompt_sets"][0]["name"] if results["prompt_sets"] else None)
    img = picture(folder, results, pset) if pset else None
    written = []
    if img is not None:
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        write_bytes_atomic(path.with_suffix(".png"), buf.getvalue())
        written.append(path.with_suffix(".png"))
    data = path.with_suffix(".json")
    write_text_atomic(data, json.dumps(page_data(results)) + "\n")
    image = None if img is None else path.with_suffix(".png").name
    write_text_atomic(path, page(results, command, base=base, image=image, image_set=pset))
    written += [data, path]
    if readme is not None:
        link = Path(os.path.relpath(path, readme.parent)).as_posix()
        write_text_atomic(readme, replace_block(readme_text, headline(results, f"[{link}]({link})", base=base)))
        written.append(readme)
    return written
