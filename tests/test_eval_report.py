"""eval.report: CSV / JSON, plots, the self-contained report.html — and that page in a real headless Chromium
(driven over the DevTools protocol on a pipe: no console errors, tables and image grids present, a non-blank
screenshot)."""

import base64
import csv
import hashlib
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval import report, results, sweep

# ---------------------------------------------------------------------------------------------------------------
# a synthetic results folder (no model): what eval.sweep writes, at the smallest size


def _png(rgb, size=32) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (240, 240, 240))
    ImageDraw.Draw(im).ellipse((6, 6, size - 6, size - 6), fill=rgb)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def fake_results(folder: Path, texts=("a red circle", "a blue square")) -> dict:
    models, sets = ["base", "erased"], ["target"]
    colours = [(200, 30, 30), (30, 30, 200)]
    for m_i, m in enumerate(models):
        for s in sets:
            d = folder / "images" / m / s
            d.mkdir(parents=True)
            lines = []
            for i, t in enumerate(texts):
                data = _png(colours[(i + m_i) % 2])
                (d / f"{i:05d}.png").write_bytes(data)
                lines.append(json.dumps({"index": i, "prompt": t, "seed": i, "guidance": 5.0, "file": f"{i:05d}.png",
                                         "sha256": hashlib.sha256(data).hexdigest()}))
            (d / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    rows = []
    for m, rate, fid, clip in (("base", 1.0, 3.0, 30.0), ("erased", 0.25, 9.0, 27.5)):
        common = {c: "" for c in results.COLUMNS}
        common.update(model=m, prompt_set="target", n=len(texts), seed=0, steps=2)
        rows += [{**common, "metric": "rates", "quantity": "circle.target", "value": rate},
                 {**common, "metric": "rates", "quantity": "circle.other", "value": 1 - rate / 2},
                 {**common, "metric": "fid", "quantity": "fid", "value": fid, "reference": "toy-data"},
                 {**common, "metric": "clip", "quantity": "score", "value": clip}]
    return {
        "format": results.FORMAT, "title": "Synthetic <sweep> & co", "config_file": "x.toml", "config_sha256": "0" * 64,
        "config": {"seed": 0, "steps": 2, "guidance": None, "batch_size": 2, "images_per_prompt": 1, "device": "cpu",
                   "dtype": "fp32", "scheduler": None},
        "environment": {"torch": "x", "python": "y"},
        "models": [{"name": m, "base": "toy", "base_sha256": "1" * 64, "artifacts": []} for m in models],
        "prompt_sets": [{"name": "target", "source": "toy:circle/target", "prompts": len(texts), "images": len(texts),
                         "texts": list(texts), "seeds": list(range(len(texts)))}],
        "metrics": [{"name": "rates", "kind": "toy_concept_rates", "prompt_sets": ["target"],
                     "options": {"concepts": ["circle"]}, "quantities": ["circle.target", "circle.other"]},
                    {"name": "fid", "kind": "fid", "prompt_sets": ["target"], "options": {}, "quantities": ["fid"]},
                    {"name": "clip", "kind": "clip_score", "prompt_sets": ["target"], "options": {},
                     "quantities": ["score"]}],
        "plots": [], "grid_images": 8,
        "images": {f"{m}/target": f"images/{m}/target" for m in models},
        "columns": list(results.COLUMNS), "rows": rows,
    }


def test_csv_json_plots_and_a_self_contained_page(tmp_path):
    res = fake_results(tmp_path, texts=("a red circle", 'a <script>alert("x")</script> & circle'))
    files = report.write_results(tmp_path, res) + report.write_plots(tmp_path, res)
    page_path = report.write_report(tmp_path, res)
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["value"]) for r in rows] == [r["value"] for r in res["rows"]]
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == res["rows"]
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)  # default plots
    assert set(files) >= {tmp_path / "results.csv", tmp_path / "results.json", *pngs}
    page = page_path.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 2 * 2 + 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:  # every embedded image decodes
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<script" not in page and "&lt;script&gt;" in page and "Synthetic &lt;sweep&gt; &amp; co" in page
    assert "http://" not in page and "https://" not in page
    assert page.count('<table class="grid"') == 1 and page.count('<table class="summary"') == 1
    assert "rates.circle.target" in page and ">fid<" in page and "0.25" in page  # one-quantity metrics by name


def test_report_rebuilds_from_a_results_folder(tmp_path, capsys):
    res = fake_results(tmp_path)
    report.write_results(tmp_path, res)
    assert report.main([str(tmp_path)]) == 0
    assert (tmp_path / "report.html").is_file() and len(list((tmp_path / "plots").glob("*.png"))) == 2
    assert report.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run python -m eval.sweep first" in err[0]


def test_without_matplotlib_the_report_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    res = fake_results(tmp_path)
    report.write_plots(tmp_path, res)
    page = report.write_report(tmp_path, res).read_text()
    assert "matplotlib is not installed" in page and "[report]" in page


# ---------------------------------------------------------------------------------------------------------------
# headless Chromium over the DevTools protocol (--remote-debugging-pipe: fd 3 in, fd 4 out, NUL-separated JSON)


def chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class DevTools:
    def __init__(self, exe: str, profile: Path):
        to_r, self._w = os.pipe()
        self._r, from_w = os.pipe()

        def fds():  # in the child: the pipe ends become fds 3 and 4, which Chromium's pipe transport uses
            os.dup2(to_r, 3)
            os.dup2(from_w, 4)

        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
                f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._buf, self._id, self.events = b"", 0, []

    def send(self, method: str, params=None, session=None, timeout=30.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._next(timeout)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout=30.0) -> dict:
        for m in self.events:
            if m.get("method") == method:
                return m
        while True:
            m = self._next(timeout)
            self.events.append(m)
            if m.get("method") == method:
                return m

    def _next(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def load_in_chromium(page: Path, profile: Path, width=1280, height=2200) -> tuple[dict, list, bytes]:
    """Open ``page`` in headless Chromium → (facts about the DOM, console errors and exceptions, screenshot PNG)."""
    cdp = DevTools(chromium(), profile)
    try:
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            cdp.send(f"{domain}.enable", session=s)
        cdp.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                        "mobile": False}, session=s)
        cdp.send("Page.navigate", {"url": page.resolve().as_uri()}, session=s)
        cdp.wait_event("Page.loadEventFired")
        facts = cdp.send("Runtime.evaluate", {"returnByValue": True, "awaitPromise": True, "expression": """
            Promise.all([...document.images].map(i => i.decode().catch(() => null))).then(() => ({
              title: document.title,
              tables: document.querySelectorAll('table').length,
              summary: document.querySelectorAll('table.summary').length,
              grids: document.querySelectorAll('table.grid').length,
              gridImages: [...document.querySelectorAll('table.grid img')].map(i => [i.complete, i.naturalWidth,
                                                                                     i.getBoundingClientRect().width]),
              plots: [...document.querySelectorAll('figure img')].map(i => [i.complete, i.naturalWidth]),
              headings: [...document.querySelectorAll('h2')].map(h => h.textContent),
              firstCell: document.querySelector('table.summary td.num')?.textContent,
              external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') ||
                        e.getAttribute('href')).filter(u => !u.startsWith('data:') && !u.startsWith('#')),
            }))"""}, session=s)["result"]["value"]
        shot = base64.b64decode(cdp.send("Page.captureScreenshot", {"format": "png"}, session=s)["data"])
        errors = [e for e in cdp.events if e.get("method") == "Runtime.exceptionThrown"
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        return facts, errors, shot
    finally:
        cdp.close()


def _blank(png: bytes) -> bool:
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    return len(im.getcolors(maxcolors=1 << 20) or []) < 50


TINY = """
[sweep]
steps = 2
batch_size = 4
grid_images = 3

[[models]]
name = "base"
base = "toy"

[[models]]
name = "perturbed"
base = "toy"
artifacts = [{ path = "delta.safetensors" }]

[[prompt_sets]]
name = "target"
source = "toy:circle/target"
limit = 3

[[prompt_sets]]
name = "other"
source = "toy:circle/other"
limit = 3

[[metrics]]
name = "rates"
kind = "toy_concept_rates"

[[metrics]]
name = "fid"
kind = "fid"
feature = "toy"

[[metrics]]
name = "clip"
kind = "clip_score"
model = "toy"
"""


def _delta(path: Path) -> None:
    import torch
    from safetensors import safe_open

    from adapters.artifact import save_artifact
    from erasure.toyworld.paths import PIPELINE_DIR

    with safe_open(str(PIPELINE_DIR / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        name = sorted(k for k in f.keys() if k.endswith("attn2.to_v.weight"))[0]
        shape = tuple(f.get_slice(name).get_shape())
    save_artifact(path, {name: 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(1))},
                  {"kind": "weight_delta", "method": "synthetic", "target": "unet"})


@pytest.mark.skipif(chromium() is None, reason="no Chromium found (apt-get install chromium, or set CHROMIUM=path)")
def test_report_of_a_real_sweep_loads_in_headless_chromium(tmp_path):
    _delta(tmp_path / "delta.safetensors")
    (tmp_path / "sweep.toml").write_text(TINY)
    res = sweep.run_sweep(sweep.load_config(tmp_path / "sweep.toml", output=tmp_path / "out"))
    facts, errors, shot = load_in_chromium(tmp_path / "out" / "report.html", tmp_path / "profile")
    assert errors == [], errors
    assert facts["title"] == res["title"] and facts["external"] == []
    assert facts["summary"] == 2 and facts["grids"] == 2 and facts["tables"] >= 2 + 2 + 3
    assert len(facts["gridImages"]) == 2 * 2 * 3  # 2 models × 2 sets × 3 images
    assert all(complete and natural == 32 and shown >= 90 for complete, natural, shown in facts["gridImages"])
    assert len(facts["plots"]) == 2 and all(c and w > 100 for c, w in facts["plots"])  # rates; FID vs CLIP
    assert facts["headings"][:4] == ["Results", "Plots", "Images", "Models and artifacts"]
    first = next(r for r in res["rows"] if r["model"] == "base" and r["prompt_set"] == "target")
    assert facts["firstCell"] == f"{first['value']:.4g}"
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and not _blank(shot)
    (tmp_path / "out" / "screenshot.png").write_bytes(shot)


@pytest.mark.skipif(chromium() is None, reason="no Chromium found (apt-get install chromium, or set CHROMIUM=path)")
def test_the_browser_check_sees_console_errors_and_blank_pages(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><title>bad</title><p>x</p><script>console.error('boom'); no_such_function();"
                    "</script>")
    facts, errors, shot = load_in_chromium(page, tmp_path / "profile", height=400)
    assert {e["method"] for e in errors} == {"Runtime.consoleAPICalled", "Runtime.exceptionThrown"}
    assert facts["tables"] == 0 and _blank(shot)
