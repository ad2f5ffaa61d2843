"""A SalUn saliency mask as a plug-in: erase "circle" with SalUn (which computes the mask), then reuse the same mask to
confine ESD, and measure both against the base toy model.

    python examples/salun_mask_plugin.py                # ~5 minutes on 2 CPU cores
    python examples/salun_mask_plugin.py --steps 20     # a quick look
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import erasure
import pipelines
from adapters.saliency import load_mask
from erasure.toyworld import load_judge
from eval.toy import concept_report


def run(steps: int | None, folder: Path, images_per_prompt: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    salun = erasure.erase("circle", method="salun", output=str(folder / "circle-salun.safetensors"), steps=steps,
                          quiet=True).artifact  # steps None: the default
    mask_file = folder / "circle-salun.mask.safetensors"  # written beside the artifact
    esd = erasure.erase("circle", method="esd", mask=str(mask_file), output=str(folder / "circle-esd-masked.safetensors"),
                        steps=steps, quiet=True).artifact
    judge = load_judge()
    report = {"mask": load_mask(mask_file).summary(mask_file)}
    kw = dict(images_per_prompt=images_per_prompt)
    pipe = pipelines.load("toy")
    rates = {"base": concept_report(pipe, judge, "circle", **kw)}
    for name, artifact in (("salun", salun), ("esd_masked", esd)):
        with pipelines.apply(pipe, artifact):  # removed exactly after the block: the next one starts from the base
            rates[name] = concept_report(pipe, judge, "circle", **kw)
    report["rates"] = {k: {m: r[k]["rate"] for m, r in rates.items()} for k in ("target", "alias", "other", "pair_other")}
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "salun-example")
    p.add_argument("--images-per-prompt", type=int, default=2)
    args = p.parse_args()
    print(json.dumps(run(args.steps, args.folder, args.images_per_prompt), indent=2))
    sys.exit(0)
