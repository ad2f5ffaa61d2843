"""Erasure measured on the toy world with the judge: the concept rate before and after, never assumed."""

import json

import pytest


def test_esd_lowers_the_circle_rate_on_its_prompts_and_aliases(circle_reports, esd_circle):
    """Regression guard on the mechanism (measured with the committed world, toy defaults: target 0.94 → 0.27,
    aliases 1.00 → 0.25, n = 52 / 12 prompts). The issue's bars are the strict xfail test below."""
    base, erased = circle_reports
    print(json.dumps({"base": base, "esd": erased}))
    assert base["target"]["rate"] >= 0.6 and base["alias"]["rate"] >= 0.6, "the base model draws circles"
    assert erased["target"]["rate"] <= 0.5 * base["target"]["rate"]
    assert erased["alias"]["rate"] <= 0.5 * base["alias"]["rate"]
    record = json.loads(esd_circle.with_suffix(".json").read_text())
    assert record["method_config"]["eta"] == 1.0 and len(record["loss"]) == record["method_config"]["steps"]


@pytest.mark.xfail(strict=True, reason="ESD (no preservation term) leaves circles at 0.27 and costs other shapes a "
                   "third (1.00 → 0.67; ESD-x: 0.19 and 0.78) on the toy world (issue 3)")
def test_esd_meets_the_issue_bars(circle_reports):
    base, erased = circle_reports
    assert erased["target"]["rate"] <= 0.10
    assert erased["alias"]["rate"] <= 0.15
    assert erased["other"]["rate"] >= 0.9 * base["other"]["rate"]
    assert erased["pair_other"]["rate"] >= 0.8 * base["pair_other"]["rate"]
