"""Erasure measured on the toy world with the judge: the concept rate before and after, never assumed."""

import json

import pytest


def test_esd_lowers_the_circle_rate_on_its_prompts_and_aliases(circle_reports, esd_circle):
    """Regression guard on the mechanism (measured with the committed world, toy defaults: target 0.96 → 0.10–0.15,
    aliases 1.00 → 0.08–0.17 by machine and thread count, n = 52 / 12 prompts). The issue's bars are the strict
    xfail test below."""
    base, erased = circle_reports
    print(json.dumps({"base": base, "esd": erased}))
    assert base["target"]["rate"] >= 0.6 and base["alias"]["rate"] >= 0.6, "the base model draws circles"
    assert erased["target"]["rate"] <= 0.5 * base["target"]["rate"]
    assert erased["alias"]["rate"] <= 0.5 * base["alias"]["rate"]
    record = json.loads(esd_circle.with_suffix(".json").read_text())
    assert record["method_config"]["eta"] == 1.0 and len(record["loss"]) == record["method_config"]["steps"]


@pytest.mark.xfail(strict=True, reason="ESD has no preservation term: in two dozen settings (README) every run with "
                   "circles ≤ 0.10 keeps other shapes ≤ 0.83×, every run keeping them ≥ 0.90× leaves circles ≥ 0.13 "
                   "(the defaults: 0.10–0.15 / 0.08–0.17 / 0.81–0.94× by machine and thread count; issue 3, blocked)")
def test_esd_meets_the_issue_bars(circle_reports):
    base, erased = circle_reports
    assert erased["target"]["rate"] <= 0.10
    assert erased["alias"]["rate"] <= 0.15
    assert erased["other"]["rate"] >= 0.9 * base["other"]["rate"]
    assert erased["pair_other"]["rate"] >= 0.8 * base["pair_other"]["rate"]


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
