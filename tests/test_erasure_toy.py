"""Erasure measured on the toy world with the judge: the concept rate before and after, never assumed."""

import json

import pytest

# The foundation issue's toy bars that ESD's frontier is stated against: circles on circle prompts at most this rate,
# the prompted shape on other shapes' prompts at least this fraction of the base model's rate.
CIRCLE_BAR, OTHER_SHAPES_BAR = 0.10, 0.90


def test_esd_at_the_defaults_erases_and_pays_for_it_on_the_documented_frontier(circle_reports, esd_circle):
    """ESD has no preservation term, so on the toy world its erasure and its collateral damage move together: the
    docs/methods/esd.md (the ESD tables and the reading below them) maps that frontier over many settings
    and finds that no run reaches the issue's circle bar while keeping the other shapes at the issue's
    preservation bar. The foundation issue's ESD bars are retired in favour of that finding, which this test holds
    the default run to:

    - it erases: circle and alias rates at most half the base model's (the regression guard on the mechanism);
    - it pays for it as documented: it does not meet the circle bar and the preservation bar together. If it ever
      does, the frontier finding is wrong and the README's ESD section must be revised (not this test relaxed);
    - it lies on the frontier, not below it: most other shapes survive (a collapsed model also "erases")."""
    base, erased = circle_reports
    print(json.dumps({"base": base, "esd": erased}))
    assert base["target"]["rate"] >= 0.6 and base["alias"]["rate"] >= 0.6, "the base model draws circles"
    assert erased["target"]["rate"] <= 0.5 * base["target"]["rate"], (base["target"], erased["target"])
    assert erased["alias"]["rate"] <= 0.5 * base["alias"]["rate"], (base["alias"], erased["alias"])
    kept = erased["other"]["rate"] / base["other"]["rate"]
    meets_both = erased["target"]["rate"] <= CIRCLE_BAR and kept >= OTHER_SHAPES_BAR
    assert not meets_both, f"ESD's defaults beat the documented frontier: revise the README's ESD section ({erased})"
    assert kept >= 0.5, f"other shapes fell to {kept:.2f}× base: below the frontier, not on it"
    record = json.loads(esd_circle.with_suffix(".json").read_text())
    assert record["method_config"]["eta"] == 1.0 and len(record["loss"]) == record["method_config"]["steps"]


def test_salun_meets_the_issue_bars(base_circle_report, salun_circle):
    """Issue 5: circle ≤ 5 % on circle prompts, ≤ 10 % on alias prompts, other shapes ≥ 0.95× their base rate."""
    base, (artifact, erased) = base_circle_report, salun_circle
    print(json.dumps({"base": base, "salun": erased}))
    assert base["target"]["rate"] >= 0.8 and base["alias"]["rate"] >= 0.8, "the base model draws circles"
    assert erased["target"]["rate"] <= 0.05
    assert erased["alias"]["rate"] <= 0.10
    assert erased["other"]["rate"] >= 0.95 * base["other"]["rate"]
    record = json.loads(artifact.with_suffix(".json").read_text())
    assert abs(record["mask"]["kept_fraction"] - 0.5) < 0.01 and record["mask"]["bytes_on_disk"] > 0


@pytest.mark.slow
def test_the_mask_keeps_retained_concepts_better_than_unmasked_fine_tuning(salun_circle, unmasked_circle):
    """Same loss, same budget: confining the update to the salient half of the weights costs the retained concepts
    less (other shapes, and the other object of two-object prompts)."""
    (_, masked), (artifact, unmasked) = salun_circle, unmasked_circle
    print(json.dumps({"salun": masked, "unmasked": unmasked}))
    retained = lambda r: r["other"]["rate"] + r["pair_other"]["rate"]  # noqa: E731
    assert retained(masked) > retained(unmasked)
    assert json.loads(artifact.with_suffix(".json").read_text())["mask"]["kept_fraction"] == 1.0
