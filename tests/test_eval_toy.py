"""eval.toy helpers: toy FID against data images, and the CLI's argument checks."""

import numpy as np

from eval import toy


def test_toy_fid_is_low_for_data_images_and_high_for_noise():
    records = toy.rest_prompts(["circle"])[:96]
    data_again = toy.toy_reference_images(records, seed=1)  # the same prompts, other draws
    noise = np.random.default_rng(0).integers(0, 256, data_again.shape, dtype=np.uint8)
    same, far = toy.toy_fid(records, data_again), toy.toy_fid(records, noise)
    assert 0 <= same < 0.2 * far, (same, far)
    assert toy.toy_fid(records, data_again) == same, "deterministic"


def test_erased_model_needs_compare(capsys):
    assert toy.main(["--concept", "circle", "--erased-model", "somewhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --erased-model needs --compare (it is compared with --model)"]


def test_scales_must_match_the_membranes(tmp_path, capsys, monkeypatch):
    from erasure.train import main as train

    out = tmp_path / "c.safetensors"
    assert train(["--concept", "circle", "--method", "spm", "--steps", "1", "--ddim-steps", "2", "--quiet",
                  "--checkpoint-every", "0", "--output", str(out)]) == 0
    capsys.readouterr()

    def no_models(*a, **k):
        raise AssertionError("a bad --scale count must be refused before any model or judge is loaded")

    monkeypatch.setattr("erasure.toyworld.load_judge", no_models)
    monkeypatch.setattr("pipelines.load", no_models)
    assert toy.main(["--concept", "circle", "--artifact", str(out), "--scale", "1", "--scale", "3", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --scale given 2 time(s) for 1 membrane artifact(s): give one per membrane, in --artifact order"]
