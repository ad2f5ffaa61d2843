"""Plots of sweep results (matplotlib, the ``report`` extra): one scatter per plot spec, a point per model.

A plot spec is ``{"title", "x", "y"}`` with axes ``NAME.QUANTITY[@PROMPT_SET]`` (``NAME`` alone for a metric with one
quantity, e.g. a FID). Without ``@SET`` on either axis there is a point per model and prompt set (one colour per
set); otherwise a point per model, each axis read on its set (an axis without a set uses the other axis's).
Without explicit specs, :func:`default_specs` plots, for every toy concept-rate metric and concept, the concept's
rate on its own prompts against the retained quality on other prompts, and every FID / KID against every CLIP score.
"""

from __future__ import annotations

import io
import re
from typing import Sequence

from eval.results import parse_axis


def _quantity(results: dict, metric: str, quantity: str) -> str:
    if quantity:
        return quantity
    for m in results["metrics"]:
        if m["name"] == metric and len(m["quantities"]) == 1:
            return m["quantities"][0]
    return quantity


def values(results: dict, axis: str) -> dict[tuple[str, str], float]:
    """``{(model, prompt set): value}`` of one axis spec."""
    metric, quantity, pset = parse_axis(axis)
    quantity = _quantity(results, metric, quantity)
    return {(r["model"], r["prompt_set"]): float(r["value"]) for r in results["rows"]
            if r["metric"] == metric and r["quantity"] == quantity and (pset is None or r["prompt_set"] == pset)}


def points(results: dict, x: str, y: str) -> list[tuple[str, str, float, float]]:
    """``[(model, series, x, y)]`` in model order (series: the prompt set, or '' when the axes name sets)."""
    xs, ys = values(results, x), values(results, y)
    xset, yset = parse_axis(x)[2], parse_axis(y)[2]
    models = list(dict.fromkeys(r["model"] for r in results["rows"]))
    out = []
    if xset is None and yset is None:
        for (model, pset), xv in xs.items():
            if (model, pset) in ys:
                out.append((model, pset, xv, ys[(model, pset)]))
        return sorted(out, key=lambda p: models.index(p[0]))
    xset, yset = xset or yset, yset or xset
    for model in models:
        if (model, xset) in xs and (model, yset) in ys:
            out.append((model, "", xs[(model, xset)], ys[(model, yset)]))
    return out


def default_specs(results: dict) -> list[dict]:
    rows = results["rows"]

    def best_set(metric: str, quantity: str) -> str | None:
        n = {}
        for r in rows:
            if r["metric"] == metric and r["quantity"] == quantity:
                n[r["prompt_set"]] = max(n.get(r["prompt_set"], 0), int(r["n"]))
        return max(n, key=lambda s: n[s]) if n else None

    specs = []
    for m in results["metrics"]:
        if m["kind"] != "toy_concept_rates":
            continue
        for c in m["options"]["concepts"]:
            t, o = best_set(m["name"], f"{c}.target"), best_set(m["name"], f"{c}.other")
            if t and o:
                specs.append({"title": f"{c}: concept rate on its prompts ({t}) vs retained quality ({o})",
                              "x": f"{m['name']}.{c}.other@{o}", "y": f"{m['name']}.{c}.target@{t}"})
    dists = [m for m in results["metrics"] if m["kind"] in ("fid", "kid")]
    clips = [m for m in results["metrics"] if m["kind"] == "clip_score"]
    for d in dists:
        for c in clips:
            q = "" if d["kind"] == "fid" else ".kid_mean"
            specs.append({"title": f"{d['name']} vs {c['name']}", "x": f"{d['name']}{q}", "y": c["name"]})
    return specs


_HINTS = {"target": "concept rate on its prompts, lower = erased", "other": "prompted content kept, higher = better",
          "fid": "lower = closer to the reference", "kid_mean": "lower = closer to the reference",
          "score": "CLIP score, higher = better aligned", "unprompted": "concept seen unasked, lower = better",
          "kept": "other shapes of two-object prompts kept, higher = better"}


def _label(axis: str, results: dict) -> str:
    metric, quantity, pset = parse_axis(axis)
    quantity = _quantity(results, metric, quantity)
    hint = _HINTS.get(quantity.rsplit(".", 1)[-1], "")
    return f"{axis}" + (f"\n({hint})" if hint else "")


def scatter_png(results: dict, spec: dict) -> bytes | None:
    """One scatter plot as PNG bytes, or None when no model has both values."""
    from matplotlib.figure import Figure  # optional: matplotlib, the `report` extra

    pts = points(results, spec["x"], spec["y"])
    if not pts:
        return None
    fig = Figure(figsize=(6.4, 4.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    series = list(dict.fromkeys(p[1] for p in pts))
    for k, s in enumerate(series):
        mine = [p for p in pts if p[1] == s]
        ax.scatter([p[2] for p in mine], [p[3] for p in mine], s=48, color=f"C{k}", label=s or None, zorder=3)
        at: dict[tuple[float, float], list[str]] = {}  # models on the same spot share one label
        for model, _, xv, yv in mine:
            at.setdefault((xv, yv), []).append(model)
        for (xv, yv), names in at.items():
            ax.annotate(", ".join(names), (xv, yv), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.set_xlabel(_label(spec["x"], results))
    ax.set_ylabel(_label(spec["y"], results))
    ax.set_title(spec["title"], fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    if len(series) > 1:
        ax.legend(title="prompt set", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "plot"


def render_all(results: dict, specs: Sequence[dict] | None = None) -> list[tuple[str, dict, bytes | None]]:
    """``[(file name, spec, png or None)]`` for the explicit specs, else the defaults."""
    specs = list(specs if specs is not None else (results.get("plots") or default_specs(results)))
    return [(f"{i:02d}-{slug(s['title'])}.png", s, scatter_png(results, s)) for i, s in enumerate(specs, 1)]
