"""Peak memory of one training step per method, at full model size: ``python -m eval.bench --memory``.

Each case (model × method × lever set) is one ``erasure.erase(..., steps=1)`` run of ``--concept nudity`` in a fresh
process, on a randomly initialised pipeline with the real architecture (``pipelines.testing``: SD 1.x, 860 M UNet;
SDXL, 2.6 B UNet), saved once to a cache folder. Measured: on CPU the child process's peak resident set size (the
kernel's ``ru_maxrss``); on CUDA ``torch.cuda.max_memory_allocated``. A case whose resident size passes ``limit_gb``
is stopped and reported as ``> limit`` (the machine's memory is not the bench's to exhaust).

Lever sets: ``fp32`` (none) and ``levers`` (bf16 mixed precision with frozen networks in bf16, gradient
checkpointing, and for SFD the factored optimiser). The options shrink each method's set-up to what one step needs
(2 sampling steps, 2 generated images for SalUn, batch 1) — the step itself is full size. The closed-form methods
run their whole edit (UCE) or the edit and one adversarial round (RECE). With ``adversarial`` (``--adversarial``),
the methods that train against an inner attack (ESD, SPM, SalUn, SFD) run their step after one inner-attack step on
one image of the concept (``ADVERSARIAL_OPTIONS``): the attack's graph through the trained model is what it adds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from erasure.methods import METHODS as ALL_METHODS

METHODS = ("spm", "esd", "salun", "sfd", "uce", "rece")
MODELS = ("tiny", "sd1", "sdxl")
LEVERS = {"fp32": {}, "levers": {"mixed_precision": "bf16", "gradient_checkpointing": True}}
SFD_LEVERS = {"optimizer": "factored"}  # SFD's memory mode adds the compact optimiser state
TARGETS_GB = {"sd1": {"spm": 8, "esd": 16, "salun": 16, "sfd": 22}}  # levers on, CPU (issue targets)
# one full-size step: the smallest set-up each method accepts (the step's tensors are the model's full size)
STEP_OPTIONS = {
    "spm": {"steps": 1, "ddim_steps": 2},
    "esd": {"steps": 1, "ddim_steps": 2},
    "salun": {"steps": 1, "forget_images": 2, "retain_images": 2, "sample_steps": 2, "mask_batches": 1, "batch_size": 1},
    "sfd": {"steps": 1, "batch_size": 1},
    "uce": {},  # closed form: the whole edit
    "rece": {"rounds": 1},  # the edit and one adversarial round
}

ADVERSARIAL = tuple(m for m in METHODS if ALL_METHODS[m].adversarial)  # the methods --adversarial trains
# an inner attack at the first step, one Adam step on one image (its memory is one attack step's; AdvUnlearn runs 30)
ADVERSARIAL_OPTIONS = {"adversarial": True, "attack_warmup": 0, "attack_steps": 1, "attack_images": 1}


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "erasure" / "bench-models"


def model_folder(model: str, cache: Path) -> Path:
    """The saved random pipeline of ``model`` (built and saved on first use)."""
    from pipelines import testing  # heavy: builds a full-size pipeline only when the cache lacks it

    folder = cache / model
    if (folder / "model_index.json").exists():
        return folder
    build = {"tiny": lambda: testing.tiny_sd_pipeline("sd1"), "sd1": testing.sd1_shaped_pipeline,
             "sdxl": testing.sdxl_shaped_pipeline}[model]
    print(f"building the random {model} pipeline in {folder} (once)", file=sys.stderr)
    testing.save_tiny(build(), folder)
    return folder


def case_options(model_dir: Path, method: str, levers: str, output: Path, adversarial: bool = False) -> dict:
    extra = SFD_LEVERS if method == "sfd" and levers == "levers" else {}
    return {"model": str(model_dir), "checkpoint_every": 0, "quiet": True, "output": str(output),
            **STEP_OPTIONS[method], **LEVERS[levers], **extra, **(ADVERSARIAL_OPTIONS if adversarial else {})}


def run_case(options: dict, method: str) -> dict:
    """In the child process: one step; → {"cuda_peak_bytes"} on CUDA, {} on CPU (the parent reads ru_maxrss)."""
    import erasure  # the child trains; the parent only measures

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    erasure.erase("nudity", method=method, **options)
    out = {"seconds": round(time.time() - t0, 1)}
    if torch.cuda.is_available():
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def measure(model: str, method: str, levers: str, cache: Path, limit_gb: float, adversarial: bool = False) -> dict:
    """One case in a fresh process → its record (peak GB, seconds, status)."""
    folder = model_folder(model, cache)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        out = Path(tmp) / ("student" if method == "sfd" else "a.safetensors")
        spec = json.dumps({"options": case_options(folder, method, levers, out, adversarial), "method": method})
        t0 = time.time()
        with open(Path(tmp) / "out", "w+") as out_f, open(Path(tmp) / "err", "w+") as err_f:
            child = subprocess.Popen([sys.executable, "-m", "eval.bench_memory", spec], stdout=out_f, stderr=err_f,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
            stopped, usage, limit = False, None, limit_gb * 2**30
            while True:  # wait4 reaps the child with its own resource usage (ru_maxrss: its peak RSS)
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                if not stopped and _rss_bytes(child.pid) > limit:
                    os.kill(child.pid, signal.SIGKILL)
                    stopped = True
                time.sleep(0.05)
            child.returncode = os.waitstatus_to_exitcode(status)
            out_f.seek(0), err_f.seek(0)
            stdout, stderr = out_f.read(), err_f.read()
    rec = {"model": model, "method": method, "levers": levers, "adversarial": adversarial,
           "seconds": round(time.time() - t0, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 2**30, 2)}
    if stopped:
        rec["status"] = f"stopped above {limit_gb:.1f} GB"
    elif child.returncode:
        rec["status"] = "failed: " + (stderr.strip().splitlines() or ["?"])[-1][:200]
    else:
        rec["status"] = "ok"
        result = json.loads(stdout.strip().splitlines()[-1])
        if "cuda_peak_bytes" in result:
            rec["cuda_peak_gb"] = round(result["cuda_peak_bytes"] / 2**30, 2)
    return rec


def bench(models, methods, cache: Path | None = None, limit_gb: float | None = None, lever_sets=tuple(LEVERS),
          adversarial: bool = False) -> dict:
    cache = cache or default_cache()
    limit_gb = limit_gb or 0.9 * _total_memory_gb()
    rows = []
    for model in models:
        for method in methods:
            for levers in lever_sets:
                rows.append(measure(model, method, levers, cache, limit_gb, adversarial))
                r = rows[-1]
                print(f"{model} {method} {_levers_label(r)}: peak RSS {r['peak_rss_gb']} GB, {r['status']}, "
                      f"{r['seconds']} s", file=sys.stderr)
    return {"device": "cuda" if torch.cuda.is_available() else "cpu", "limit_gb": round(limit_gb, 1),
            "levers": {"fp32": "none", "levers": "bf16 mixed precision (frozen networks in bf16), gradient "
                                                 "checkpointing; SFD also --optimizer factored"},
            "targets_gb": TARGETS_GB, "rows": rows}


def _total_memory_gb() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


def _levers_label(row: dict) -> str:
    return row["levers"] + (" + adversarial" if row.get("adversarial") else "")


def table(report: dict) -> str:
    """The report as a markdown table."""
    peak = "CUDA peak allocated (GB)" if report["device"] == "cuda" else "peak RSS (GB)"
    lines = [f"| model | method | levers | {peak} | target (GB) | status | seconds |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        value = r.get("cuda_peak_gb", r["peak_rss_gb"])
        target = report["targets_gb"].get(r["model"], {}).get(r["method"]) if r["levers"] == "levers" else None
        shown = f"> {report['limit_gb']:.1f}" if r["status"].startswith("stopped") else value
        lines.append(f"| {r['model']} | {r['method']} | {_levers_label(r)} | {shown} | {target or ''} | {r['status']} | "
                     f"{r['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # the child of one case
    spec = json.loads(sys.argv[1])
    print(json.dumps(run_case(spec["options"], spec["method"])))
