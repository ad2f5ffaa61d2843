"""Erasure measured on the toy world with the judge: the concept rate before and after, never assumed."""

import json


def test_esd_erases_circle_and_keeps_the_rest(circle_reports, esd_circle):
    base, erased = circle_reports
    print(json.dumps({"base": base, "esd": erased}))
    assert base["target"]["rate"] >= 0.9 and base["alias"]["rate"] >= 0.85, "the base model draws circles"
    assert erased["target"]["rate"] <= 0.10
    assert erased["alias"]["rate"] <= 0.15
    assert erased["other"]["rate"] >= 0.9 * base["other"]["rate"]
    assert erased["pair_other"]["rate"] >= 0.8 * base["pair_other"]["rate"]
    record = json.loads(esd_circle.with_suffix(".json").read_text())
    assert record["seconds"] < 600 and record["method_config"]["eta"] == 1.0
