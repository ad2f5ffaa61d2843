"""SPM membranes measured on the toy world (slow: each membrane is trained once at the toy defaults, shared by the
tests of this file; the figures these tests guard are in docs/methods/spm.md): erasing "circle" removes it from its prompts, its aliases and the
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
    """The other object of a two-object prompt stays (≥ 0.9× the base model's count; measured: the README's SPM circle
    table, its two-object row); compared as image counts, since the report's rates are rounded to 4 decimals."""
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
    styles (App. C.1): at γ = 1 it fades the stripes too little, and at × 3 some striped images stay, since the circle
    membrane turns a striped circle into a striped square rather than blanking it (README, the three-membrane table)."""
    return erasure_report("toy", stack_paths, ["circle", "red", "striped"], judge, images_per_prompt=2,
                          similarity="eos", scales=[1.0, 1.0, 4.0])


def test_three_stacked_membranes_erase_the_shape_and_the_colour_and_spare_most_of_the_rest(stack_report):
    """Under the flat similarity (the SPM code's) the stack erases circle and red, and the prompts naming none of the
    three keep most of their shape, colour and fill; the measured figures, and those of the alternatives, are in the
    three-membrane stack in docs/methods/spm.md."""
    for concept in ("circle", "red"):
        base, erased = (stack_report["concepts"][concept][k] for k in ("base", "erased"))
        assert base["target"]["rate"] >= 0.9 and erased["target"]["rate"] <= 0.10, (concept, base, erased)
    ratio = stack_report["rest"]["ratio"]
    assert ratio["shape"] >= 0.75 and ratio["colour"] >= 0.75 and ratio["fill"] >= 0.8, ratio


def test_three_stacked_membranes_gated_by_end_of_text_keep_the_rest(stack_report_eos):
    """Issue bar for the rest (≥ 0.9×), met under end-of-text gates, with circle and red still erased (red's bar is
    looser: the other membranes, shut for red prompts, no longer help erase it); measured: the README's
    three-membrane table, `--similarity eos` rows."""
    for concept, bar in (("circle", 0.10), ("red", 0.15)):
        base, erased = (stack_report_eos["concepts"][concept][k] for k in ("base", "erased"))
        assert base["target"]["rate"] >= 0.9 and erased["target"]["rate"] <= bar, (concept, base, erased)
    rest = stack_report_eos["rest"]
    assert all(rest["ratio"][k] >= 0.9 for k in ("shape", "colour", "fill")), rest["ratio"]
    assert rest["mean_abs_pixel_diff"] <= 0.05, rest["mean_abs_pixel_diff"]


def test_three_stacked_membranes_meet_the_issue_bars(stack_report_style):
    """Issue bars: all three erased (≤ 0.10), the rest ≥ 0.9×, with the striped (style) membrane's γ × 4; measured:
    the README's three-membrane table, "eos, striped γ × 4" row, and the paragraph below it."""
    for concept in ("circle", "red", "striped"):
        erased = stack_report_style["concepts"][concept]["erased"]["target"]
        assert erased["rate"] <= 0.10, (concept, erased)
    ratio = stack_report_style["rest"]["ratio"]
    assert ratio["shape"] >= 0.9 and ratio["colour"] >= 0.9 and ratio["fill"] >= 0.9, ratio
