"""Sweep results → ``results.csv`` / ``results.json``, plots, and one self-contained ``report.html``.

The HTML page needs nothing but itself: images (plots and the generated images of the grids) are embedded as base64
PNG, the style sheet is inline, and there is no script. It shows, per prompt set, a table of every model's numbers
and an image grid (a row per model, the same prompts and seeds in every column, so models compare image by image),
then the plots, the models with their artifacts' sha256, the metrics' protocols, thresholds and weights hashes, the
package versions, and the full tidy table.

    python -m eval.report results/        # rebuild plots/ and report.html from results.json and images/

Every file is written atomically (temp file + rename).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from PIL import Image

from adapters.artifact import write_bytes_atomic, write_text_atomic
from adapters.errors import UserError
from eval.generate import read_manifest
from eval.markdown import write_page
from eval.plots import render_all
from eval.results import FORMAT, column_key, REPORT_HTML, RESULTS_CSV, RESULTS_JSON, train_options

PLOTS_DIR = "plots"
PLOT_INDEX = "index.json"


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def csv_text(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(results["columns"])
    for row in results["rows"]:
        w.writerow([_cell(row.get(c)) for c in results["columns"]])
    return buf.getvalue()


def write_results(output: str | os.PathLike, results: dict) -> list[Path]:
    """``results.csv`` (the tidy rows) and ``results.json`` (rows plus config, environment, models, metrics)."""
    out = Path(output)
    write_text_atomic(out / RESULTS_CSV, csv_text(results))
    keep = {k: v for k, v in results.items() if k not in ("files", "generated")}
    write_text_atomic(out / RESULTS_JSON, json.dumps(keep, indent=1) + "\n")
    return [out / RESULTS_CSV, out / RESULTS_JSON]


def write_plots(output: str | os.PathLike, results: dict) -> list[Path]:
    """``plots/NN-title.png`` for every plot spec (explicit, else the defaults) and ``plots/index.json``."""
    folder = Path(output) / PLOTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written, index = [], {"plots": []}
    try:
        rendered = render_all(results)  # matplotlib (the report extra) is imported inside
    except ImportError as e:
        index["error"] = f"plots skipped: matplotlib is not installed ({e}); pip install 'concept-erasure-toolkit[report]'"
        print(f"warning: {index['error']}", file=sys.stderr)
        rendered = []
    for name, spec, png in rendered:
        entry = {**spec, "file": name if png is not None else None}
        if png is not None:
            write_bytes_atomic(folder / name, png)
            written.append(folder / name)
        else:
            entry["note"] = "no model has both values"
        index["plots"].append(entry)
    write_text_atomic(folder / PLOT_INDEX, json.dumps(index, indent=1) + "\n")
    return [*written, folder / PLOT_INDEX]


# ---------------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1400px;
padding:0 16px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.meta{color:#555;font-size:12px}
table{border-collapse:collapse;margin:6px 0 14px;font-size:13px}
th,td{border:1px solid #d0d0d0;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.hash{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px;word-break:break-all}
table.grid td,table.grid th{padding:2px;text-align:center}
table.grid th.prompt{font-weight:normal;font-size:11px;max-width:110px;word-wrap:break-word}
table.grid img{display:block;width:var(--thumb);height:var(--thumb);object-fit:contain;image-rendering:pixelated}
figure{display:inline-block;margin:6px 12px 12px 0}figure img{max-width:640px;border:1px solid #ddd}
figcaption{font-size:12px;color:#444}details{margin:8px 0}.warn{color:#a40}
"""


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return _e(v)


def _data_png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def thumbnail_png(path: Path, size: int) -> bytes:
    """A PNG of the image at most ``size`` pixels a side (small images are embedded as they are; the page scales
    them up without smoothing)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if max(im.size) <= size and path.suffix.lower() == ".png":
                return path.read_bytes()
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
            return buf.getvalue()
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "", head_cls: str = "") -> str:
    """``header``: HTML of the header cells (the first is the row-label column); ``rows``: lists of ``<td>``/``<th>``."""
    extra = f' class="{head_cls}"' if head_cls else ""
    head = "".join(f"<th>{h}</th>" if i == 0 else f"<th{extra}>{h}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _td(v, num=False, title=None) -> str:
    t = f' title="{_e(title)}"' if title else ""
    return f'<td class="num"{t}>{_fmt(v)}</td>' if num else f"<td{t}>{_fmt(v)}</td>"


def _summary_tables(results: dict) -> str:
    out = []
    models = [m["name"] for m in results["models"]]
    single = {m["name"] for m in results["metrics"] if len(m["quantities"]) == 1}
    for p in results["prompt_sets"]:
        rows = [r for r in results["rows"] if r["prompt_set"] == p["name"]]
        keys = list(dict.fromkeys(column_key(r, single) for r in rows))
        if not keys:
            continue
        by = {(r["model"], column_key(r, single)): r for r in rows}
        body = []
        for m in models:
            cells = [f"<th>{_e(m)}</th>"]
            for k in keys:
                r = by.get((m, k))
                cells.append(_td(r["value"], True, f"n = {r['n']}" + (f"; reference: {r['reference']}" if r["reference"]
                                                                        else "")) if r else "<td></td>")
            body.append(cells)
        out.append(f'<h3>{_e(p["name"])} <span class="meta">({_e(p["source"])}: {p["prompts"]} prompts, '
                   f'{p["images"]} images)</span></h3>')
        out.append(_table(["model", *(_e(k) for k in keys)], body, "summary"))
    return "".join(out)


def _attacks_html(results: dict) -> str:
    """Models × attacks: the pre-attack rate and each attack's success rate (higher = the concept came back)."""
    rows = [r for r in results["rows"] if r["metric"] == "attack"]
    keys = list(dict.fromkeys(r["quantity"] for r in rows))
    by = {(r["model"], r["quantity"]): r for r in rows}
    body = []
    for m in dict.fromkeys(r["model"] for r in rows):
        body.append([f"<th>{_e(m)}</th>", *(_td(by[(m, k)]["value"], True, f"n = {by[(m, k)]['n']}")
                                            if (m, k) in by else "<td></td>" for k in keys)])
    return ('<p class="meta">Attack success rate: the fraction of the attack\'s images in which the judge sees the '
            'concept (pre_attack: the model on the concept\'s own prompts).</p>'
            + _table(["model", *(_e(k) for k in keys)], body, "summary"))


def _grids(output: Path, results: dict, thumb: int) -> str:
    k = int(results.get("grid_images", 8))
    if k <= 0:
        return "<p>No image grids (grid_images = 0).</p>"
    out = []
    for p in results["prompt_sets"]:
        n = min(k, p["images"])
        head = ["model"] + [f'<span title="{_e(p["texts"][i])}">{_e(_short(p["texts"][i]))}</span><br>'
                            f'<span class="meta">seed {p["seeds"][i]}</span>' for i in range(n)]
        body = []
        for m in results["models"]:
            folder = output / results["images"][f"{m['name']}/{p['name']}"]
            cells = [f"<th>{_e(m['name'])}</th>"]
            files = _grid_files(folder, n)
            for i in range(n):
                if i < len(files):
                    alt = f"{m['name']}: {p['texts'][i]} (seed {p['seeds'][i]})"
                    cells.append(f'<td><img src="{_data_png(thumbnail_png(files[i], thumb))}" alt="{_e(alt)}" '
                                 f'title="{_e(alt)}"></td>')
                else:
                    cells.append('<td class="warn">missing</td>')
            body.append(cells)
        out.append(f"<h3>{_e(p['name'])}</h3>")
        out.append(_table(head, body, "grid", "prompt"))
    return "".join(out)


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _grid_files(folder: Path, n: int) -> list[Path]:
    return [folder / e["file"] for e in read_manifest(folder)[:n]]


def _plots_html(output: Path) -> str:
    index_file = output / PLOTS_DIR / PLOT_INDEX
    if not index_file.is_file():
        return "<p>No plots.</p>"
    index = json.loads(index_file.read_text())
    out = [f'<p class="warn">{_e(index["error"])}</p>'] if index.get("error") else []
    for p in index["plots"]:
        if p.get("file") and (output / PLOTS_DIR / p["file"]).is_file():
            data = (output / PLOTS_DIR / p["file"]).read_bytes()
            out.append(f'<figure><img src="{_data_png(data)}" alt="{_e(p["title"])}">'
                       f'<figcaption>{_e(p["title"])}: x = <code>{_e(p["x"])}</code>, y = <code>{_e(p["y"])}</code>'
                       f"</figcaption></figure>")
        else:
            out.append(f'<p class="warn">{_e(p["title"])}: {_e(p.get("note", "not drawn"))}</p>')
    return "".join(out) or "<p>No plots.</p>"


def _models_html(results: dict) -> str:
    body = []
    for m in results["models"]:
        arts = "<br>".join(
            f"<b>{_e(a['name'])}</b> ({_e(a['kind'])}, {_e(a['method'])}, concept {_e(a['concept'])}) "
            f"<span class=\"hash\">sha256 {_e(a['sha256'])}</span>"
            + (f"<br><code>train = {_e(train_options(a['train']))}</code>" if a.get("train") else "")
            for a in m["artifacts"]) or "none"
        body.append([f"<th>{_e(m['name'])}</th>", _td(m["base"]), f'<td class="hash">{_e(m["base_sha256"])}</td>',
                     f"<td>{arts}</td>"])
    return _table(["model", "base", "base sha256 (all files)", "artifacts"], body)


def _metrics_html(results: dict) -> str:
    first = {}
    for r in results["rows"]:
        first.setdefault(r["metric"], r)
    body = []
    for m in results["metrics"]:
        r = first.get(m["name"], {})
        body.append([f"<th>{_e(m['name'])}</th>", _td(m["kind"]), _td(r.get("metric_protocol", "")),
                     _td(r.get("metric_threshold", "")), _td(r.get("metric_version", "")),
                     f'<td class="hash">{_e(r.get("metric_weights_sha256", ""))}</td>',
                     _td(", ".join(m["prompt_sets"]))])
    return _table(["metric", "kind", "protocol", "threshold", "version", "weights sha256", "prompt sets"], body)


def _env_html(results: dict) -> str:
    env = results.get("environment", {})
    return _table(["package", "version"], [[_td(k), _td(v)] for k, v in env.items()])


def _tidy_html(results: dict) -> str:
    cols = ["model", "prompt_set", "metric", "quantity", "value", "n", "reference"]
    body = [[_td(r[c], c in ("value", "n")) for c in cols] for r in results["rows"]]
    return (f"<details><summary>All {len(results['rows'])} rows (the full table with every column is "
            f"results.csv)</summary>{_table(cols, body, 'tidy')}</details>")


def render_html(output: str | os.PathLike, results: dict, *, thumb: int = 96) -> str:
    output = Path(output)
    title = results.get("title") or "Sweep report"
    s = results["config"]
    guidance = s["guidance"] if s["guidance"] is not None else \
        " / ".join(dict.fromkeys(str(r["guidance"]) for r in results["rows"])) or "model default"
    settings = (f"seed {s['seed']}, {s['steps']} steps, guidance {guidance}, "
                f"{s['images_per_prompt']} image(s) per prompt, batch {s['batch_size']}, device {s['device']}, "
                f"dtype {s['dtype']}, scheduler {s['scheduler'] or 'model default'}")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}:root{{--thumb:{int(thumb)}px}}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">config <code>{_e(results.get("config_file", ""))}</code> · config sha256 '
        f'<span class="hash">{_e(results.get("config_sha256", ""))}</span><br>{_e(settings)}</p>',
        "<h2>Results</h2>", _summary_tables(results),
        *(["<h2>Attacks</h2>", _attacks_html(results)] if any(r["metric"] == "attack" for r in results["rows"]) else []),
        "<h2>Plots</h2>", _plots_html(output),
        "<h2>Images</h2>", '<p class="meta">Same prompt and seed in each column; the first images of every set.</p>',
        _grids(output, results, thumb),
        "<h2>Models and artifacts</h2>", _models_html(results),
        "<h2>Metrics</h2>", _metrics_html(results),
        "<h2>Environment</h2>", _env_html(results),
        "<h2>All rows</h2>", _tidy_html(results),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(output: str | os.PathLike, results: dict, *, thumb: int = 96) -> Path:
    path = Path(output) / REPORT_HTML
    write_text_atomic(path, render_html(output, results, thumb=thumb))
    return path


def load_results(output: str | os.PathLike) -> dict:
    path = Path(output) / RESULTS_JSON
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run python -m eval.sweep first") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise UserError(f"{path}: not a results file of eval.sweep ({FORMAT})")
    return results


DESCRIPTION = """\
Rebuild plots/ and report.html of a sweep output folder from its results.json and images/, or, with --markdown
FILE, write a Markdown results page instead: an erasure table per model (method, number of concepts, training
seconds, artifact size, the erased concepts' rates on their prompts and aliases, the rest drawn as asked and its
toy FID, both against --base), then every prompt set's numbers and the attacks, headed by the command, the config
hash, the package versions and the date. Beside FILE go the same name with .json (the results it shows) and .png
(a row of images per model). Results pages are generated, never typed."""

EXAMPLES = """\
Examples:
  python -m eval.report results/toy                         # rebuild results/toy/plots/ and report.html
  python -m eval.report results/toy --markdown docs/results.md --readme README.md
  python -m eval.report results/toy-robust --markdown docs/results/robustness.md"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.report", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a sweep output folder (with results.json)")
    p.add_argument("--thumb", type=int, default=96, help="image size in the grids, pixels (default: %(default)s)")
    p.add_argument("--markdown", metavar="FILE", help="write the results as a Markdown page to FILE instead (the "
                   "erasure table and every prompt set's numbers, headed by the command, config hash and versions), "
                   "with FILE's .json (the results it shows) and .png (a row of images per model) beside it")
    p.add_argument("--base", default="base", help="with --markdown: the model the ratios compare with "
                   "(default: %(default)s)")
    p.add_argument("--readme", metavar="FILE", help="with --markdown: also replace FILE's headline table (between "
                   "its '<!-- results:headline … -->' markers) with the page's erasure numbers")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.readme and not args.markdown:
        p.error("--readme needs --markdown (the page the table links to)")
    try:
        results = load_results(args.folder)
        if args.markdown:
            command = "python -m eval.report " + " ".join(argv if argv is not None else sys.argv[1:])
            try:
                for path in write_page(args.folder, results, args.markdown, command, base=args.base,
                                       readme=args.readme):
                    print(path)
            except OSError as e:
                raise UserError(f"cannot write the page: {e}") from None
            return 0
        write_plots(args.folder, results)
        path = write_report(args.folder, results, thumb=args.thumb)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
