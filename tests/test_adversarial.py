"""Adversarial erasure (--adversarial): the inner attack finds prompts that bring an erased concept back, the outer
loss trains on them, every adversarial run records its attacks, resumes exactly, and bad combinations are refused."""

import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from adapters.artifact import load_artifact
from erasure import adversarial, concepts, toyworld
from erasure.train import main
from pipelines.testing import save_tiny, tiny_sd_pipeline

TINY = ["--concept", "a dog", "--steps", "4", "--ddim-steps", "3", "--batch-size", "2", "--quiet", "--adversarial",
        "--attack-warmup", "1", "--attack-every", "2", "--attack-steps", "2"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd1")
    save_tiny(tiny_sd_pipeline("sd1"), folder)
    return str(folder)


class _Erased:
    """What the adversary needs of a method: the pipeline, the concept, the model the attack runs."""

    def __init__(self, pipe, concept):
        self.pipe, self.concept, self.unet, self.params = pipe, concepts.resolve(concept), pipe.unet, {}

    def attack_model(self):
        return nullcontext(self.unet)


def test_the_inner_attack_brings_an_erased_circle_back(tmp_path, judge):
    """UCE erases circle on its prompts; ten Adam steps on one prefix vector (the toy settings) bring it back on the
    same prompts: what the outer loop of an adversarial run then trains against."""
    import pipelines
    from eval.sampling import Sampler
    from pipelines.text import encode

    out = tmp_path / "uce.safetensors"
    assert main(["--concept", "circle", "--method", "uce", "--output", str(out), "--quiet"]) == 0
    pipe = pipelines.load("toy")
    pipelines.apply(pipe, out)
    texts = list(concepts.resolve("circle").prompts)
    sampler = Sampler(pipe, steps=25, guidance=toyworld.models.GUIDANCE, batch_size=64)

    def rate(cond):
        images = sampler.images([(cond, sampler.guidance)], list(range(len(texts))))
        return float(np.mean([s.has("circle") for s in judge.classify(images)]))

    adv = adversarial.Adversary(_Erased(pipe, "circle"), adversarial.settings(True, {}), seed=0)
    log = adv.attack(step=100)
    with torch.no_grad():
        plain, attacked = rate(encode(pipe, texts)), rate(adv.encode(texts))
    assert plain <= 0.1 and attacked >= plain + 0.2, (plain, attacked)
    assert log["atk"] > 0.3 and adv.delta.shape == (1, pipe.text_encoder.config.hidden_size)


@pytest.mark.parametrize("method", ["esd", "spm", "salun"])
def test_adversarial_runs_log_their_attacks_and_say_so_in_the_artifact(sd_folder, tmp_path, method):
    argv = [a for a in TINY if a not in ("--ddim-steps", "3")] if method == "salun" else TINY
    if method == "salun":
        argv += ["--substitute", "a cat", "--forget-images", "4", "--retain-images", "4", "--sample-steps", "2"]
    out = tmp_path / f"{method}.safetensors"
    assert main([*argv, "--model", sd_folder, "--method", method, "--output", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["adversarial"]["steps"] == 2 and record["adversarial"]["lr"] == 1e-3  # AdvUnlearn's lr off the toy
    assert isinstance(record["loss"][0], float), "no attack during the warm-up"
    assert [set(e) for e in record["loss"][1:]] == [{"loss", "atk", "atk_start"}] * 3
    assert load_artifact(out).metadata["adversarial"]["warmup"] == 1


def test_an_adversarial_run_resumes_bit_identically(sd_folder, tmp_path, monkeypatch):
    from erasure.methods import esd

    argv = [*TINY, "--model", sd_folder, "--method", "esd", "--checkpoint-every", "2"]
    full = tmp_path / "full.safetensors"
    assert main(argv + ["--output", str(full)]) == 0
    calls = {"n": 0}
    original = esd.ESD.loss

    def dying(self, gen):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, gen)

    part = tmp_path / "part.safetensors"
    monkeypatch.setattr(esd.ESD, "loss", dying)
    assert main(argv + ["--output", str(part)]) == 130
    monkeypatch.setattr(esd.ESD, "loss", original)
    assert main(argv + ["--output", str(part), "--resume"]) == 0
    a, b = load_artifact(full), load_artifact(part)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize("argv, match", [
    (["--method", "uce", "--adversarial"], "does not"),
    (["--method", "esd", "--attack-steps", "3"], "add --adversarial"),
    (["--method", "esd", "--retain-weight", "0.5"], "add --adversarial"),
    (["--method", "esd", "--adversarial", "--attack-steps", "0"], "must be ≥ 1"),
    (["--method", "esd", "--adversarial", "--attack-lr", "-1"], "> 0"),
])
def test_bad_adversarial_options_exit_2_with_one_line(argv, match, capsys):
    assert main(["--concept", "circle", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and match in err
