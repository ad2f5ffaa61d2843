"""The sweep's results format: the files it writes, their format tag, the tidy table's columns, the plot axis syntax.

A small module of its own so that what reads results (``eval.report``, ``eval.plots``) and what writes them
(``eval.sweep``) share one definition without importing each other.
"""

from __future__ import annotations

import json

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
REPORT_HTML = "report.html"
FORMAT = "eval.sweep/1"

# the packages whose exact versions every row records (column version_NAME, '-' written as '_')
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "torchmetrics", "open_clip_torch", "torch-fidelity",
                      "accelerate", "safetensors", "numpy", "pillow")

# the tidy table: one row per model × prompt set × metric quantity
COLUMNS = (
    "model", "prompt_set", "metric", "quantity", "value", "n",
    "metric_kind", "metric_protocol", "metric_threshold", "metric_weights_sha256", "metric_version", "reference",
    "base_model", "base_model_sha256", "base_train_args", "artifacts", "artifact_tensors_sha256", "artifact_train_args",
    "prompt_source", "prompts", "prompts_sha256", "images_per_prompt", "images", "images_sha256",
    "seed", "steps", "guidance", "scheduler", "dtype", "device", "batch_size", "torch_threads",
    "version_toolkit", "version_python", *(f"version_{p.replace('-', '_')}" for p in VERSIONED_PACKAGES),
    "config_sha256",
)


def parse_axis(spec: str) -> tuple[str, str, str | None]:
    """A plot axis ``NAME.QUANTITY@SET`` / ``NAME@SET`` / ``NAME.QUANTITY`` → (metric, quantity or '', set or
    None)."""
    key, _, pset = spec.partition("@")
    metric, _, quantity = key.partition(".")
    return metric, quantity, pset or None


def train_options(options: dict | list | None) -> str:
    """How a training's ``erasure.erase`` options are written in the rows and the report: as in the config,
    ``{ concept = "circle", method = "esd" }`` ('' for none; a results file written before options were tables has
    the ``erasure.train`` argument list)."""
    if not options:
        return ""
    if isinstance(options, list):
        return " ".join(options)
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items()) + " }"


def column_key(row: dict, single: set) -> str:
    """How a column is named: ``NAME`` for a metric with one quantity (a FID), else ``NAME.QUANTITY``."""
    return row["metric"] if row["metric"] in single else f"{row['metric']}.{row['quantity']}"
