"""Every example script runs (at a small budget) and reports what it claims to."""

import importlib.util

import pytest
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_erase_circle_esd_example(tmp_path):
    out = tmp_path / "circle-esd.safetensors"
    rates = _load("erase_circle_esd").run(steps=2, output=out, images_per_prompt=1)
    assert out.exists() and out.with_suffix(".json").exists()
    assert {"target", "alias", "other", "pair_other"} <= rates.keys()
    assert all(0.0 <= v <= 1.0 for r in rates.values() for v in r.values())
    assert rates["target"]["base"] >= 0.5, "the base model draws circles"


def test_membrane_in_plain_diffusers_example(tmp_path):
    out = tmp_path / "circle-spm.safetensors"
    report = _load("membrane_in_plain_diffusers").run(steps=2, output=out)
    assert out.exists()
    assert set(report) == {"base", "membrane"} and report["base"].keys() == report["membrane"].keys()
    assert "circle" in report["base"]["a red circle"], "the base toy model draws the circle it is asked for"


@pytest.mark.slow
def test_salun_mask_plugin_example(tmp_path):
    report = _load("salun_mask_plugin").run(steps=2, folder=tmp_path, images_per_prompt=1)
    assert (tmp_path / "circle-salun.mask.safetensors").exists() and (tmp_path / "circle-esd-masked.safetensors").exists()
    assert abs(report["mask"]["kept_fraction"] - 0.5) < 0.01 and report["mask"]["bytes_on_disk"] > 0
    assert set(report["rates"]["target"]) == {"base", "salun", "esd_masked"}
    assert report["rates"]["target"]["base"] >= 0.5, "the base model draws circles"
