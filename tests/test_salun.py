"""SalUn (its losses: tests/test_losses.py): the nudity preset end to end on a random SD-1.x-shaped pipeline, the mask
as a plug-in for ESD, and a weight-delta artifact that touches only the salient weights."""

import json

import pytest
import torch

import pipelines
from adapters.artifact import load_artifact
from adapters.saliency import load_mask
from erasure.toyworld import data
from erasure.train import main
from pipelines.testing import save_tiny, tiny_sd_pipeline

FAST = ["--steps", "3", "--batch-size", "2", "--forget-images", "4", "--retain-images", "4", "--sample-steps", "2",
        "--quiet"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd1")
    save_tiny(tiny_sd_pipeline("sd1"), folder)
    return str(folder)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path / "cache"))


def test_toy_forget_examples_swap_only_the_concept_word():
    rng = __import__("numpy").random.default_rng(0)
    for concept, sub in (("circle", "square"), ("red", "orange"), ("striped", "dotted")):
        for _ in range(20):
            scene, swapped = data.sample_concept(concept, rng, sub)
            assert data.contains(scene, concept) and concept in scene.caption.replace(",", "").split(" ")
            assert swapped.replace(sub, concept).replace("an ", "a ") == scene.caption.replace("an ", "a ")


def test_nudity_preset_trains_on_an_sd1_shaped_pipeline_and_reuses_its_mask_for_esd(sd_folder, tmp_path, capsys):
    out = tmp_path / "nudity-salun.safetensors"
    assert main(["--concept", "nudity", "--method", "salun", "--model", sd_folder, "--output", str(out), *FAST]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["method_config"]["forget_prompt"] == "a photo of a nude person"
    assert record["method_config"]["alpha"] == 0.1 and record["method_config"]["mask_fraction"] == 0.5
    mask_file = tmp_path / "nudity-salun.mask.safetensors"
    mask = load_mask(mask_file)
    assert mask.metadata["concept"] == "nudity" and abs(mask.fraction - 0.5) < 0.01
    assert all(m.dtype == torch.bool for m in mask.masks.values())
    art = load_artifact(out)
    assert art.kind == "weight_delta" and art.metadata["method"] == "salun"
    assert art.metadata["mask"]["kept_fraction"] == pytest.approx(mask.fraction, abs=1e-4)
    # the artifact changes only salient weights, and applies to a fresh pipeline as a weight delta
    moved = 0
    for name, delta in art.tensors.items():
        assert not delta[~mask.masks[name]].any(), f"{name}: a weight outside the mask changed"
        moved += int((delta != 0).sum())
    assert moved > 0
    base = pipelines.load(sd_folder)
    before = {n: p.detach().clone() for n, p in base.unet.named_parameters()}
    pipelines.apply(base, out)
    changed = {n for n, p in base.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(art.tensors)
    # the generated training data is cached: a second run does not generate again
    assert list((tmp_path / "cache").glob("salun-*.safetensors"))
    # the same mask confines ESD
    esd_out = tmp_path / "nudity-esd.safetensors"
    assert main(["--concept", "nudity", "--method", "esd", "--model", sd_folder, "--mask", str(mask_file),
                 "--output", str(esd_out), "--steps", "2", "--ddim-steps", "2", "--batch-size", "1", "--quiet"]) == 0
    esd = load_artifact(esd_out)
    assert esd.metadata["mask"]["source"] == str(mask_file)
    for name, delta in esd.tensors.items():
        assert not delta[~mask.masks[name]].any(), f"{name}: ESD changed a weight outside the mask"
    assert any(d.any() for d in esd.tensors.values())


def test_mask_user_errors(sd_folder, tmp_path, capsys):
    assert main(["--concept", "nudity", "--method", "spm", "--model", sd_folder, "--mask", "m.safetensors",
                 "--output", str(tmp_path / "o.safetensors")]) == 2
    assert "--mask confines weight fine-tuning" in capsys.readouterr().err
    assert main(["--concept", "nudity", "--method", "esd", "--model", sd_folder, "--mask", str(tmp_path / "no.safetensors"),
                 "--output", str(tmp_path / "o.safetensors"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such file" in err and err.count("\n") == 0
    assert main(["--concept", "nudity", "--method", "esd", "--variant", "xattn", "--dry-run"]) == 2
    assert "not a choice of --method esd" in capsys.readouterr().err
    assert not list(tmp_path.glob("o*"))


def test_salun_offline_without_weights_fails_fast(tmp_path, capsys):
    assert main(["--concept", "nudity", "--method", "salun", "--output", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not available locally" in err and err.count("\n") == 0
