"""One command for a machine with an accelerator: ``python -m eval.device_check --output DIR``.

It runs, in order, and writes ``DIR/device_check.json`` and ``DIR/device_check.md`` (one table):

1. the ``gpu``-marked tests (``pytest -m gpu``: CUDA mixed precision, xformers, adapters on CUDA);
2. the membrane overhead ratios (UNet forward with 1 membrane, 8 gated membranes, merged — against the bare UNet);
3. the SFD one-step generator's images per second against the 25-step CFG teacher (512 px on SD-1.x size);
4. one training step per mixed-precision dtype (fp16 and bf16 on CUDA; bf16 on CPU) and the xformers attention path;
5. the training-memory bench (``python -m eval.bench --memory``) on SD-1.x size with the memory levers.

``--device cpu --quick`` runs the same checks at toy size on any machine (so CI exercises the command); its figures
are not the CUDA ones. Each check records ``ok``, ``failed: …`` or ``skipped: …`` — a failing check does not stop
the others; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from xml.etree import ElementTree
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate.state import AcceleratorState

import erasure
from adapters.artifact import write_text_atomic
from adapters.errors import UserError
from eval import bench, bench_memory
from pipelines.testing import save_tiny, tiny_sd_pipeline

ONE_STEP_TARGET = bench.TARGETS["one_step_vs_teacher_images"]


def check_gpu_tests(device: str, quick: bool) -> dict:
    """``pytest -m gpu`` in a subprocess → counts of tests, failures, errors and skips (from its JUnit XML)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "gpu.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}", "tests"]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if not xml.exists():
            return {"status": f"failed: pytest exited {out.returncode}: {out.stderr.strip()[-300:]}"}
        suite = ElementTree.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    ok = not counts["failures"] and not counts["errors"]
    return {"status": "ok" if ok else f"failed: {counts['failures']} failed, {counts['errors']} errors", **counts}


def check_overhead(device: str, quick: bool) -> dict:
    model = "toy" if quick else "sd1"
    r = bench.bench_forward(model, device, batch=2, rounds=2 if quick else 5, iters=2 if quick else 3)
    return {"status": "ok", "model": model, **r}


def check_one_step(device: str, quick: bool) -> dict:
    model = "toy" if quick else "sd1"
    r = bench.bench_one_step(model, device, batch=1 if quick else 4, rounds=1 if quick else 3, iters=1,
                             size=None if quick else 512)
    ratio = r["ratio"]["one_step_vs_teacher_images"]
    status = "ok" if quick or ratio >= ONE_STEP_TARGET else f"failed: {ratio}× < {ONE_STEP_TARGET}×"
    return {"status": status, "model": model, "target": ONE_STEP_TARGET, **r}


def check_precisions(device: str, quick: bool) -> dict:
    """One training step of SPM and ESD on a tiny SD-1.x pipeline per mixed-precision dtype, and with xformers."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny(tiny_sd_pipeline("sd1"), Path(tmp) / "sd")
        cases = [(p, "sdpa") for p in (("fp16", "bf16") if device.startswith("cuda") else ("bf16",))]
        cases.append(("no", "xformers"))
        for precision, attention in cases:
            name = f"{precision}/{attention}"
            if attention == "xformers" and not device.startswith("cuda"):
                out[name] = "skipped: xformers needs CUDA"
                continue
            for method in ("spm", "esd"):
                AcceleratorState._reset_state(True)
                try:
                    r = erasure.erase("a photo of a dog", method=method, model=str(Path(tmp) / "sd"), steps=2,
                                      ddim_steps=2, quiet=True, checkpoint_every=0, device=device,
                                      mixed_precision=precision, attention=attention,
                                      output=str(Path(tmp) / f"{method}-{precision}-{attention}.safetensors"))
                    loss = r.record["loss"][-1]
                    out[f"{name}/{method}"] = "ok" if torch.isfinite(torch.tensor(loss)) else f"failed: loss {loss}"
                except UserError as e:
                    out[f"{name}/{method}"] = f"failed: {e}"
    bad = [k for k, v in out.items() if v.startswith("failed")]
    return {"status": "ok" if not bad else f"failed: {', '.join(bad)}", "cases": out}


def check_memory(device: str, quick: bool) -> dict:
    models, methods = (["tiny"], ["spm"]) if quick else (["sd1"], list(bench_memory.METHODS))
    report = bench_memory.bench(models, methods, lever_sets=("levers",))
    over = [r for r in report["rows"] if r["status"] != "ok"]
    status = "ok" if not over else "failed: " + ", ".join(f"{r['method']} {r['status']}" for r in over)
    return {"status": status, **report, "table": bench_memory.table(report)}


CHECKS: dict[str, Callable[[str, bool], dict]] = {
    "gpu_tests": check_gpu_tests, "membrane_overhead": check_overhead, "one_step_speed": check_one_step,
    "precisions": check_precisions, "training_memory": check_memory,
}


def markdown(report: dict) -> str:
    lines = [f"# Device check ({report['device']}{', quick' if report['quick'] else ''})", "",
             f"{report['gpu'] or 'no CUDA device'}; torch {report['torch']}; {report['seconds']} s", "",
             "| check | status | figures |", "|---|---|---|"]
    for name, r in report["checks"].items():
        figures = json.dumps(r.get("ratio") or r.get("cases") or {k: r[k] for k in ("tests", "skipped") if k in r})
        lines.append(f"| {name} | {r['status']} | `{figures}` |")
    memory = report["checks"].get("training_memory", {}).get("table")
    return "\n".join(lines) + ("\n\n## Training memory\n\n" + memory if memory else "\n")


def run(device: str, quick: bool, only: Sequence[str] | None = None) -> dict:
    t0 = time.time()
    report = {"device": device, "quick": quick, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "checks": {}}
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        print(f"device check: {name} …", file=sys.stderr)
        t = time.time()
        try:
            r = check(device, quick)
        except Exception as e:  # one broken check must not hide the others' figures; the traceback is kept
            r = {"status": f"failed: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        r["seconds"] = round(time.time() - t, 1)
        report["checks"][name] = r
    report["seconds"] = round(time.time() - t0, 1)
    return report


DESCRIPTION = """\
One command for a machine with an accelerator. It runs the gpu-marked tests, the membrane overhead ratios, the SFD
one-step generator's speed against the 25-step CFG teacher, one training step per mixed-precision dtype and the
xformers path, and the training-memory bench at SD-1.x size, then writes DIR/device_check.json and
DIR/device_check.md (one table). Each check records ok, failed or skipped; a failing check does not stop the
others, and the exit status is 1 when any failed. --device cpu --quick runs the same checks at toy size on any
machine (the test suite runs it); its figures are not the CUDA ones."""

EXAMPLES = """\
Examples:
  python -m eval.device_check --output device-check                  # on a CUDA machine
  python -m eval.device_check --device cpu --quick --output /tmp/device-check   # toy size, any machine"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.device_check", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for device_check.json and device_check.md")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="toy-size checks (any machine; what CI runs)")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(CHECKS)}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    only = [c.strip() for c in args.only.split(",")] if args.only else None
    if only and (bad := [c for c in only if c not in CHECKS]):
        print(f"error: unknown check(s) {', '.join(bad)}: choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible; use --device cpu --quick", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.quick:
        print("error: the full checks need CUDA; on a CPU run --device cpu --quick", file=sys.stderr)
        return 2
    out = Path(args.output)
    try:  # a bad --output fails before minutes of checks
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    report = run(args.device, args.quick, only)
    try:
        write_text_atomic(out / "device_check.json", json.dumps(report, indent=2) + "\n")
        write_text_atomic(out / "device_check.md", markdown(report))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(report))
    return 1 if any(r["status"].startswith("failed") for r in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
