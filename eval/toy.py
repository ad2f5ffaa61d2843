"""Toy-world measurements: base-world quality and concept erasure, judged by the toy judge.

``python -m eval.toy --model toy [--artifact FILE ...] [--concept circle | --base]`` prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np

import pipelines
from adapters.artifact import Artifact, load_artifact
from adapters.errors import UserError, user_errors
from erasure import toyworld
from erasure.toyworld import data
from erasure.toyworld.models import GUIDANCE
from eval.generate import generate
from eval.metrics import FID, ConceptRate, as_uint8_nchw
from pipelines.load import quiet_loading


def _judge_set(pipe, judge, prompts, *, images_per_prompt, seed, steps, guidance, batch_size):
    texts = [p.text for p in prompts for _ in range(images_per_prompt)]
    expected = [p for p in prompts for _ in range(images_per_prompt)]
    images = generate(pipe, texts, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size)
    return expected, judge.classify(images), images


def _rate(pairs) -> dict:
    m = ConceptRate()
    hits, empty = zip(*pairs) if pairs else ((), ())
    m.update(hits, empty)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in m.compute().items()}


def fill_confusion(expected, seen) -> dict:
    """For each prompted fill, how often the judge read each set of fills: ``{"striped": {"striped": 50,
    "dotted": 6, "dotted+striped": 3, "nothing": 0}}``. A prompt counts as a fill hit when its fill is among those
    read, so "dotted+striped" is a hit for both; "no fill": a shape but no fill read; "nothing": neither."""
    out: dict = {}
    for p, s in zip(expected, seen):
        key = "+".join(sorted(s.fills)) if s.fills else ("no fill" if s.shapes else "nothing")
        row = out.setdefault(p.fill, {})
        row[key] = row.get(key, 0) + 1
    return {f: dict(sorted(row.items(), key=lambda kv: -kv[1])) for f, row in sorted(out.items())}


def base_quality(pipe, judge, *, images_per_prompt: int = 2, seed: int = 0, steps: int = 25, guidance: float = GUIDANCE,
                 batch_size: int = 128) -> dict:
    """Judge-measured quality of a toy pipeline on every shape × colour × fill, aliases, pairs, held-out pairs."""
    kw = dict(images_per_prompt=images_per_prompt, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size)
    sets = toyworld.base_prompts(seed)
    report = {}
    for name in ("single", "held_out"):
        exp, seen, _ = _judge_set(pipe, judge, sets[name], **kw)
        report[name] = {
            "shape": _rate([(p.shapes[0] in s.shapes, not s.shapes) for p, s in zip(exp, seen)]),
            "colour": _rate([(p.colour in s.colours, not s.shapes) for p, s in zip(exp, seen)]),
            "fill": _rate([(p.fill in s.fills, not s.shapes) for p, s in zip(exp, seen)]),
            "fill_seen": fill_confusion(exp, seen),
        }
    exp, seen, _ = _judge_set(pipe, judge, sets["alias"], **kw)
    report["alias"] = {"shape": _rate([(p.shapes[0] in s.shapes, not s.shapes) for p, s in zip(exp, seen)])}
    exp, seen, _ = _judge_set(pipe, judge, sets["pair"], **kw)
    report["pair"] = {"both": _rate([(set(p.shapes) <= s.shapes, not s.shapes) for p, s in zip(exp, seen)])}
    return report


def concept_report(pipe, judge, concept: str, *, images_per_prompt: int = 2, seed: int = 0, steps: int = 25,
                   guidance: float = GUIDANCE, batch_size: int = 128) -> dict:
    """Rates for one toy concept: on its own prompts, its aliases, other prompts, and two-object prompts.

    - ``target`` / ``alias`` / ``paraphrase``: fraction of images where the judge sees the concept (lower is better
      after erasure; paraphrases: phrasings held out from every method's training prompts, shapes only);
    - ``other``: fraction where it sees the *prompted* shape (colour for colour concepts, fill for fills);
    - ``pair_other``: in two-object prompts with the concept, fraction where the other object is present;
      ``pair_target``: where the concept is.
    """
    kw = dict(images_per_prompt=images_per_prompt, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size)
    sets = toyworld.prompts(concept, seed)
    report = {"concept": concept}
    for name in ("target", "alias", "paraphrase"):
        if sets.get(name):
            exp, seen, _ = _judge_set(pipe, judge, sets[name], **kw)
            report[name] = _rate([(s.has(concept), not s.shapes) for s in seen])
    exp, seen, _ = _judge_set(pipe, judge, sets["other"], **kw)
    if concept in data.SHAPES:
        report["other"] = _rate([(p.shapes[0] in s.shapes, not s.shapes) for p, s in zip(exp, seen)])
    elif concept in data.COLOURS:
        report["other"] = _rate([(p.colour in s.colours, not s.shapes) for p, s in zip(exp, seen)])
    else:
        report["other"] = _rate([(p.fill in s.fills, not s.shapes) for p, s in zip(exp, seen)])
    report["other_shape"] = _rate([(p.shapes[0] in s.shapes, not s.shapes) for p, s in zip(exp, seen)])
    if sets["pair"]:
        exp, seen, _ = _judge_set(pipe, judge, sets["pair"], **kw)
        other = [[x for x in p.shapes if x != concept][0] for p in exp]
        report["pair_other"] = _rate([(o in s.shapes, not s.shapes) for o, s in zip(other, seen)])
        report["pair_target"] = _rate([(concept in s.shapes, not s.shapes) for s in seen])
    return report


def rest_prompts(concepts: Sequence[str], seed: int = 0):
    """Single-object prompts (every shape × colour × fill) that name none of ``concepts``: what must keep working."""
    return [p for p in toyworld.base_prompts(seed)["single"] if not {p.shapes[0], p.colour, p.fill} & set(concepts)]


def toy_reference_images(records, seed: int, *, start: int = 0):
    """Toy-world data images for toy prompt records: image i draws what record i asks for (its shapes, and its
    colour / fill where named — in pair prompts read from each half of the text — else random ones), seeded by
    (seed, i) (``start``: the index of ``records[0]``). The toy world's 'real images' for FID / KID."""
    out = []
    for i, rec in enumerate(records, start):
        rng = np.random.default_rng([seed, i])
        shapes = list(rec.shapes)
        if not shapes:
            raise UserError(f"toy reference images need toy prompt records; {rec.text!r} names no shape")
        if len(shapes) == 2:
            halves = rec.text.split(" and ")
            attrs = []
            for half in halves if len(halves) == 2 else ["", ""]:
                words = half.split()
                attrs.append((next((w for w in words if w in data.COLOURS), None),
                              next((w for w in words if w in data.FILLS), None)))
            (c1, f1), (c2, f2) = [(c or _colour(s, rng), f or str(rng.choice(data.FILLS)))
                                  for s, (c, f) in zip(shapes, attrs)]
            objs = data.pair_objects(shapes[0], c1, f1, shapes[1], c2, f2, rng)
        else:
            colour = rec.colour or _colour(shapes[0], rng)
            fill = rec.fill or str(rng.choice(data.FILLS))
            objs = [data.single_obj(shapes[0], colour, fill, rng)]
        bg = data.BACKGROUNDS[rng.integers(len(data.BACKGROUNDS))]
        out.append(data.render(data.Scene(objs, bg, rec.text), rng))
    return np.stack(out)


def _colour(shape: str, rng) -> str:
    return str(rng.choice([c for c in data.COLOURS if (shape, c) not in data.HELD_OUT]))


def _quality(expected, seen) -> dict:
    return {
        "shape": _rate([(p.shapes[0] in s.shapes, not s.shapes) for p, s in zip(expected, seen)]),
        "colour": _rate([(p.colour in s.colours, not s.shapes) for p, s in zip(expected, seen)]),
        "fill": _rate([(p.fill in s.fills, not s.shapes) for p, s in zip(expected, seen)]),
    }


def membrane_scales(artifacts: Sequence, scales: Sequence[float] | None) -> list[float] | None:
    """One strength per artifact for :func:`pipelines.apply` from ``scales``, one γ multiplier per membrane in
    artifact order, as ``--scale`` gives them (weight deltas keep strength 1). ``artifacts``: loaded artifacts."""
    if scales is None:
        return None
    n_membranes = sum(a.kind == "membrane" for a in artifacts)
    if len(scales) != n_membranes:
        raise UserError(f"{n_membranes} membrane files but {len(scales)} scales")
    it = iter(scales)
    return [next(it) if a.kind == "membrane" else 1.0 for a in artifacts]


def toy_fid(records, images, seed: int = 0) -> float:
    """Toy FID of ``images`` (one per record) against toy-world data images drawn for the same records, on the
    judge's 96-d features (the sweep's ``fid`` metric with ``feature = "toy"``, ``reference = "toy-data"``)."""
    fid = FID(feature="toy")
    fid.update(as_uint8_nchw(toy_reference_images(records, seed)), real=True)
    fid.update(as_uint8_nchw(images), real=False)
    return round(float(fid.compute()), 4)


def erasure_report(model: str, artifacts: Sequence[str], concepts: Sequence[str], judge=None, *,
                   erased_model: str | None = None, images_per_prompt: int = 1, seed: int = 0, steps: int = 25,
                   guidance: float = GUIDANCE, batch_size: int = 128, similarity: str | None = None,
                   pair_negatives: bool = True, scales: Sequence[float] | None = None) -> dict:
    """Before and after: each concept's rates (target, alias, pair) on the base model and on the erased one
    (``erased_model``, default the base, with ``artifacts`` applied: an SFD student is an erased model of its own),
    and the prompts that name none of the concepts (``rest``) — their shape / colour / fill rates, toy FID against
    data images drawn for the same prompts, the ratios to the base, and how far their images moved (mean absolute
    pixel difference, 0–1 scale, same seeds)."""
    judge = judge or toyworld.load_judge()
    kw = dict(images_per_prompt=images_per_prompt, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size)
    rest = rest_prompts(concepts, seed)
    pipes = {"base": pipelines.load(model), "erased": pipelines.load(erased_model or model)}
    arts = [a if isinstance(a, Artifact) else load_artifact(a) for a in artifacts]
    pipelines.apply(pipes["erased"], *arts, scales=membrane_scales(arts, scales), similarity=similarity,
                    pair_negatives=pair_negatives)
    report = {"concepts": {c: {} for c in concepts}, "rest": {"n_prompts": len(rest)}}
    images = {}
    for which, pipe in pipes.items():
        for c in concepts:
            report["concepts"][c][which] = concept_report(pipe, judge, c, **kw)
        exp, seen, images[which] = _judge_set(pipe, judge, rest, **kw)
        report["rest"][which] = {**_quality(exp, seen), "fid": toy_fid(exp, images[which], seed)}
    base, erased = report["rest"]["base"], report["rest"]["erased"]
    report["rest"]["ratio"] = {k: round(erased[k]["rate"] / max(base[k]["rate"], 1e-9), 4) for k in ("shape", "colour", "fill")}
    report["rest"]["ratio"]["fid"] = round(erased["fid"] / max(base["fid"], 1e-9), 4)
    diff = np.abs(images["erased"].astype(np.float32) - images["base"].astype(np.float32)) / 255
    report["rest"]["mean_abs_pixel_diff"] = round(float(diff.mean()), 4)
    return report


DESCRIPTION = """\
Measure a toy-world model with the toy judge and print a JSON report. --base: the base world's quality (every
shape x colour x fill, aliases, two-object and held-out prompts, drawn as asked). --concept C: C's rates on its own
prompts, aliases, paraphrases, two-object and other prompts, with any --artifact applied. --compare --concept C:
the same on the base model and with the artifacts, side by side, and how the prompts that name none of the
concepts fare (shape, colour and fill rates, toy FID, pixel difference). Images are seeded, 25 DDIM steps at the
toy world's CFG scale."""

EXAMPLES = """\
Examples:
  python -m eval.toy --base                                  # the base world's quality
  python -m eval.toy --concept circle --artifact outputs/circle-spm.safetensors
  python -m eval.toy --compare --concept circle --artifact outputs/circle-spm.safetensors   # before / after"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.toy", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy")
    p.add_argument("--artifact", action="append", default=[], help="artifact(s) to apply first (repeatable)")
    p.add_argument("--erased-model", help="with --compare: the erased model when it is a model of its own (an SFD "
                                          "student folder); --model is then the teacher it is compared with")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--concept", action="append", help="a toy concept: shape, colour or fill (repeatable with --compare)")
    g.add_argument("--base", action="store_true", help="measure the base world's quality")
    p.add_argument("--compare", action="store_true",
                   help="before/after report: the concepts' rates on the base model and with the artifacts, and how "
                        "the prompts that name none of them fare (rates, pixel difference)")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=GUIDANCE, help="CFG scale (default: the toy world's, %(default)s)")
    p.add_argument("--similarity", choices=("flat", "eos"),
                   help="facilitated transport's text similarity for membranes (default: the library's, flat)")
    p.add_argument("--pair-negatives", action=argparse.BooleanOptionalAction, default=True,
                   help="facilitated transport: CFG's negative rows take their prompt's gate, as the SPM code "
                        "(default), or are scored on their own text (--no-pair-negatives)")
    p.add_argument("--scale", type=float, action="append",
                   help="γ multiplier of each membrane, in --artifact order (repeatable; default 1 each; the SPM "
                        "paper doubles γ for art styles)")
    p.add_argument("--quiet", action="store_true", help="no loading progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quiet:
        quiet_loading()
    try:
        with user_errors(toyworld.NotAToyConcept):  # the toy world's own errors → one line, exit 2
            for concept in args.concept or ():  # bad input is refused before any model or judge is loaded
                toyworld.prompts(concept)
        if args.compare and not args.concept:
            raise UserError("--compare needs --concept (one per erased concept)")
        if not args.compare and args.erased_model:
            raise UserError("--erased-model needs --compare (it is compared with --model)")
        if not args.compare and args.concept and len(args.concept) > 1:
            raise UserError("several --concept values need --compare")
        arts = [load_artifact(a) for a in args.artifact]
        n_membranes = sum(a.kind == "membrane" for a in arts)
        if args.scale is not None and len(args.scale) != n_membranes:
            raise UserError(f"--scale given {len(args.scale)} time(s) for {n_membranes} membrane artifact(s): give "
                            "one per membrane, in --artifact order")
        with user_errors(FileNotFoundError):  # the toy world's missing weights → one line, exit 2
            judge = toyworld.load_judge()
        kw = dict(images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps, guidance=args.guidance)
        if args.compare:
            report = erasure_report(args.model, arts, args.concept, judge, erased_model=args.erased_model,
                                    similarity=args.similarity, pair_negatives=args.pair_negatives,
                                    scales=args.scale, **kw)
        else:
            pipe = pipelines.load(args.model)
            pipelines.apply(pipe, *arts, scales=membrane_scales(arts, args.scale), similarity=args.similarity,
                            pair_negatives=args.pair_negatives)
            report = base_quality(pipe, judge, **kw) if args.base else concept_report(pipe, judge, args.concept[0], **kw)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
