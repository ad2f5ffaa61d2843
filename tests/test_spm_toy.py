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
    """Measured (4 images per prompt): the other object 0.89 → 0.84 (0.94×) on the default seed; seeds 1 / 2 give
    0.87× / 0.97× (README's seed table)."""
    base, erased = (circle_report["concepts"]["circle"][k] for k in ("base", "erased"))
    assert base["pair_target"]["n"] >= 56 and base["pair_other"]["rate"] >= 0.8, base
    assert erased["pair_target"]["rate"] <= 0.10, "the circle leaves the two-object scenes too"
    assert erased["pair_other"]["rate"] >= 0.9 * base["pair_other"]["rate"], (base["pair_other"], erased["pair_other"])


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
    assert len(record["loss"]) == mc["steps"]


@pytest.fixture(scope="module")
def stack_report(circle_membrane, tmp_path_factory, judge):
    paths = [str(circle_membrane), str(_train(tmp_path_factory, "red")), str(_train(tmp_path_factory, "striped"))]
    return erasure_report("toy", paths, ["circle", "red", "striped"], judge, images_per_prompt=2)


def test_three_stacked_membranes_erase_the_shape_and_the_colour_and_spare_most_of_the_rest(stack_report):
    """Measured: circle 0.94 → 0.02–0.06, red 0.92 → 0.02 (membranes trained with 1 or 2 torch threads differ in
    the last bits); the 90 prompts naming none of the three keep shape 0.77–0.80×, colour 0.82–0.84×, fill
    0.88–0.90× (with the SPM code's anchors: 0.19×, 0.22×, 0.52×)."""
    for concept in ("circle", "red"):
        base, erased = (stack_report["concepts"][concept][k] for k in ("base", "erased"))
        assert base["target"]["rate"] >= 0.9 and erased["target"]["rate"] <= 0.10, (concept, base, erased)
    ratio = stack_report["rest"]["ratio"]
    assert ratio["shape"] >= 0.7 and ratio["colour"] >= 0.7 and ratio["fill"] >= 0.8, ratio


@pytest.mark.xfail(strict=True, reason="issue bar not met: stacked, the striped membrane leaves striped at 0.33 "
                                       "(base 0.63) and the rest keeps shape 0.80x, colour 0.84x (bar 0.9x)")
def test_three_stacked_membranes_meet_the_issue_bars(stack_report):
    for concept in ("circle", "red", "striped"):
        assert stack_report["concepts"][concept]["erased"]["target"]["rate"] <= 0.10, concept
    ratio = stack_report["rest"]["ratio"]
    assert ratio["shape"] >= 0.9 and ratio["colour"] >= 0.9 and ratio["fill"] >= 0.9, ratio
