"""SPM membranes measured on the toy world (slow: each membrane is trained once at the toy defaults, ≈ 3 min each on
2 cores, shared by the tests of this file): erasing "circle" removes it from its prompts, its aliases and the
two-object scenes that name it, while, with facilitated transport on, every other prompt keeps its shape and colour;
three membranes (a shape, a colour, a fill) stacked — what they reach and the issue bars they still miss."""

import json

import pytest

from erasure.train import main
from eval.toy import erasure_report

pytestmark = pytest.mark.slow


def _train(tmp_path_factory, concept: str):
    out = tmp_path_factory.mktemp(f"spm-{concept}") / f"{concept}-spm.safetensors"
    assert main(["--concept", concept, "--method", "spm", "--output", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def circle_membrane(tmp_path_factory):
    return _train(tmp_path_factory, "circle")


@pytest.fixture(scope="module")
def circle_report(circle_membrane, judge):
    """Base vs base + membrane (transport on), same prompts and seeds, 4 images per prompt: 56 images of pairs with a
    circle, so that one image moves their rate by 0.02 (at 2 per prompt the 0.9× bar sat inside the noise)."""
    return erasure_report("toy", [str(circle_membrane)], ["circle"], judge, images_per_prompt=4)


def test_the_circle_is_erased_from_its_prompts_and_aliases(circle_report):
    base, erased = (circle_report["concepts"]["circle"][k] for k in ("base", "erased"))
    assert base["target"]["rate"] >= 0.9 and base["alias"]["rate"] >= 0.9, "the base model draws circles"
    assert erased["target"]["rate"] <= 0.05, erased["target"]
    assert erased["alias"]["rate"] <= 0.10, erased["alias"]


def test_the_circle_leaves_pairs_and_their_other_objects_stay(circle_report):
    """Measured (4 images per prompt, default seed): the other object is in 50 of the 56 pair images of the base
    model and in 54 with the membrane — 1.08× (steered to the empty prompt and the other object alone, as before
    shapes were steered to their substitute: 45, 0.90×); compared as image counts, since the report's rates are
    rounded to 4 decimals."""
    base, erased = (circle_report["concepts"]["circle"][k] for k in ("base", "erased"))
    assert base["pair_target"]["n"] >= 56 and base["pair_other"]["rate"] >= 0.8, base
    assert erased["pair_target"]["rate"] <= 0.10, "the circle leaves the two-object scenes too"
    kept, had = (round(r["pair_other"]["rate"] * r["pair_other"]["n"]) for r in (erased, base))
    assert kept >= 0.9 * had, (base["pair_other"], erased["pair_other"])


def test_prompts_without_the_concept_keep_shape_and_colour(circle_report):
    base, erased = (circle_report["concepts"]["circle"][k] for k in ("base", "erased"))
    assert erased["other_shape"]["rate"] >= 0.95 * base["other_shape"]["rate"], erased["other_shape"]
    rest = circle_report["rest"]
    assert rest["n_prompts"] >= 150, "every single-object prompt without a circle"
    assert rest["ratio"]["shape"] >= 0.95 and rest["ratio"]["colour"] >= 0.95, rest["ratio"]
    assert rest["mean_abs_pixel_diff"] <= 0.10, "their images stay close to the base model's"


def test_run_record_states_the_toy_defaults(circle_membrane):
    record = json.loads(circle_membrane.with_suffix(".json").read_text())
    mc = record["method_config"]
    assert (mc["anchor_source"], mc["anchor_latents"]) == ("captions", "own") and mc["pair_fraction"] > 0
    assert (mc["steer"], mc["pair_target"]) == ("swap", "swap")
    assert len(record["loss"]) == mc["steps"]


@pytest.fixture(scope="module")
def stack_paths(circle_membrane, tmp_path_factory):
    return [str(circle_membrane), str(_train(tmp_path_factory, "red")), str(_train(tmp_path_factory, "striped"))]


@pytest.fixture(scope="module")
def stack_report(stack_paths, judge):
    """The three membranes under the default transport (flat similarity, the SPM code's)."""
    return erasure_report("toy", stack_paths, ["circle", "red", "striped"], judge, images_per_prompt=2)


@pytest.fixture(scope="module")
def stack_report_eos(stack_paths, judge):
    """The same membranes gated by end-of-text similarity (CFG's negatives share their prompt's gate, the default)."""
    return erasure_report("toy", stack_paths, ["circle", "red", "striped"], judge, images_per_prompt=2,
                          similarity="eos")


@pytest.fixture(scope="module")
def stack_report_style(stack_paths, judge):
    """Gated by end-of-text similarity, the striped (style) membrane's γ × 4, as the SPM paper doubles it for art
    styles (App. C.1): at γ = 1 it fades the stripes too little; at × 3 6 of 48 striped images stayed (0.12), since
    the circle membrane turns a striped circle into a striped square rather than blanking it."""
    return erasure_report("toy", stack_paths, ["circle", "red", "striped"], judge, images_per_prompt=2,
                          similarity="eos", scales=[1.0, 1.0, 4.0])


def test_three_stacked_membranes_erase_the_shape_and_the_colour_and_spare_most_of_the_rest(stack_report):
    """Measured (flat): circle 0.94 → 0.02, red 0.92 → 0.04; the 90 prompts naming none of the three keep shape
    0.81×, colour 0.87×, fill 0.91× (circle membrane steered to the empty prompt: 0.88×, 0.87×, 0.91×; gated by the training prompts instead of the concept, each negative row by its
    own text: 0.80×, 0.84×, 0.90×; with the SPM code's anchors: 0.19×, 0.22×, 0.52×)."""
    for concept in ("circle", "red"):
        base, erased = (stack_report["concepts"][concept][k] for k in ("base", "erased"))
        assert base["target"]["rate"] >= 0.9 and erased["target"]["rate"] <= 0.10, (concept, base, erased)
    ratio = stack_report["rest"]["ratio"]
    assert ratio["shape"] >= 0.75 and ratio["colour"] >= 0.75 and ratio["fill"] >= 0.8, ratio


def test_three_stacked_membranes_gated_by_end_of_text_keep_the_rest(stack_report_eos):
    """Issue bar for the rest (≥ 0.9×), met under eos gates: measured shape 1.01×, colour 0.99×, fill 1.00×, mean
    pixel change 0.020 (flat: 0.10); circle 0.94 → 0.02, red 0.92 → 0.08 (the other membranes, now shut for red
    prompts, no longer help erase it: 0.00 under flat)."""
    for concept, bar in (("circle", 0.10), ("red", 0.15)):
        base, erased = (stack_report_eos["concepts"][concept][k] for k in ("base", "erased"))
        assert base["target"]["rate"] >= 0.9 and erased["target"]["rate"] <= bar, (concept, base, erased)
    rest = stack_report_eos["rest"]
    assert all(rest["ratio"][k] >= 0.9 for k in ("shape", "colour", "fill")), rest["ratio"]
    assert rest["mean_abs_pixel_diff"] <= 0.05, rest["mean_abs_pixel_diff"]


def test_three_stacked_membranes_meet_the_issue_bars(stack_report_style):
    """Issue bars: all three erased (≤ 0.10), the rest ≥ 0.9×. Measured (1-thread membranes): circle 0.94 → 0.04,
    red 0.92 → 0.06, striped 0.62 → 0.00; rest 0.98× / 0.98× / 1.01×, pixel change 0.041, toy FID 9.6 → 11.1. At
    γ × 1 the striped membrane leaves striped at 0.46 (alone: 0.56)."""
    for concept in ("circle", "red", "striped"):
        erased = stack_report_style["concepts"][concept]["erased"]["target"]
        assert erased["rate"] <= 0.10, (concept, erased)
    ratio = stack_report_style["rest"]["ratio"]
    assert ratio["shape"] >= 0.9 and ratio["colour"] >= 0.9 and ratio["fill"] >= 0.9, ratio
