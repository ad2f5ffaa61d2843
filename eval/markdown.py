"""A sweep's ``results.json`` → a Markdown results page: the erasure table (per erased model: method, concepts, training
time, artifact size, what is left of the concepts, what is kept of the rest) and every prompt set's numbers, headed
by the command, the config's sha256, the package versions and the date, so no number on the page is typed by hand.

    python -m eval.report results/toy-many --markdown docs/results/many-concepts.md
"""

from __future__ import annotations

from typing import Sequence

from eval.results import column_key

TARGET, ALIAS, OTHER = "target", "alias", "other"  # the toy sweeps' prompt-set names the erasure table reads


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
    at which the prompts naming none of them are drawn as asked (and its ratio to ``base``), and the toy FID ratio
    on those prompts."""
    rates, fid = _metric(results, "toy_concept_rates"), _metric(results, "fid")
    rows = []
    for e in erased_models(results):
        row = dict(e, n=len(e["concepts"]))
        if rates:
            targets = [_value(results, e["model"], rates, f"{c}.target", TARGET) for c in e["concepts"]]
            aliases = [_value(results, e["model"], rates, f"{c}.target", ALIAS) for c in e["concepts"]]
            kept = _value(results, e["model"], rates, f"{e['concepts'][0]}.other", OTHER)
            kept_base = _value(results, base, rates, f"{e['concepts'][0]}.other", OTHER)
            row.update(target_max=max((v for v in targets if v is not None), default=None),
                       alias_max=max((v for v in aliases if v is not None), default=None), kept=kept,
                       kept_ratio=round(kept / kept_base, 3) if kept is not None and kept_base else None)
        if fid:
            f, f_base = _value(results, e["model"], fid, "fid", OTHER), _value(results, base, fid, "fid", OTHER)
            row["fid_ratio"] = round(f / f_base, 3) if f is not None and f_base else None
        rows.append(row)
    return rows


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


def erasure_table(results: dict, base: str = "base") -> list[str]:
    rows = erasure_rows(results, base)
    header = ["model", "method", "N", "train s", "artifact MB", "erased: max rate on own prompts",
              "max rate on aliases", "rest drawn as asked", "× base", "rest toy FID × base"]
    body = [[r["model"], r["method"], r["n"], r["train_seconds"],
             None if r["bytes"] is None else round(r["bytes"] / 2**20, 3), r.get("target_max"), r.get("alias_max"),
             r.get("kept"), r.get("kept_ratio"), r.get("fid_ratio")] for r in rows]
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
    """Models × attacks: the pre-attack rate and each attack's success rate (higher = the concept came back)."""
    rows = [r for r in results["rows"] if r["metric"] == "attack"]
    keys = list(dict.fromkeys(r["quantity"] for r in rows))
    by = {(r["model"], r["quantity"]): r["value"] for r in rows}
    return _table(["model", *keys], [[m, *(by.get((m, k)) for k in keys)] for m in dict.fromkeys(r["model"] for r in rows)])


def page(results: dict, command: str, *, base: str = "base") -> str:
    """The Markdown page of a sweep's results."""
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
    if erased_models(results):
        lines += ["## Erasure", "",
                  "Rates are the toy judge's: the fraction of images showing the concept (own prompts, aliases: "
                  f"lower is better), and of prompts naming none of the erased concepts drawn as asked (higher is "
                  f"better; × base: the ratio to the model `{base}`).", ""]
        lines += erasure_table(results, base)
    if any(r["metric"] == "attack" for r in results["rows"]):
        lines += ["", "## Attacks", "", "Attack success rate: the fraction of the attack's images in which the judge "
                  "sees the concept (pre_attack: the model on the concept's own prompts).", ""] + attack_table(results)
    lines += ["", "## Every prompt set", "", "(The fractions of images with no shape at all, `*_none`, are in "
              "`results.csv`.)"] + set_tables(results)
    return "\n".join(lines) + "\n"
