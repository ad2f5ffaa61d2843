"""Erase "circle" from the embedded toy world with ESD, apply the artifact to a fresh pipeline, and measure it.

    python examples/erase_circle_esd.py                 # ~2 minutes on 2 CPU cores
    python examples/erase_circle_esd.py --steps 20      # a quick look
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import erasure
import pipelines
from erasure.toyworld import load_judge
from eval.toy import concept_report


def run(steps: int | None, output: Path, images_per_prompt: int) -> dict:
    erasure.erase("circle", method="esd", output=str(output), steps=steps, quiet=True)  # steps None: the default
    judge = load_judge()
    pipe = pipelines.load("toy")
    base = concept_report(pipe, judge, "circle", images_per_prompt=images_per_prompt)
    with pipelines.apply(pipe, output):  # the one call for any artifact; taken off again, exactly, after the block
        erased = concept_report(pipe, judge, "circle", images_per_prompt=images_per_prompt)
    return {k: {"base": base[k]["rate"], "erased": erased[k]["rate"]} for k in base if k != "concept"}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--output", type=Path, default=Path(tempfile.gettempdir()) / "circle-esd.safetensors")
    p.add_argument("--images-per-prompt", type=int, default=2)
    args = p.parse_args()
    print(json.dumps(run(args.steps, args.output, args.images_per_prompt), indent=2))
    sys.exit(0)
