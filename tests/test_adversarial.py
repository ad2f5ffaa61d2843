"""Adversarial erasure (--adversarial): the inner attack finds prompts that bring an erased concept back, the outer
loss trains on them, every adversarial run records its attacks, resumes exactly, and bad combinations are refused."""

import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from adapters.artifact import load_artifact
from erasure import adversarial, concepts, toyworld
from erasure.methods.base import Context
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

    one_step = False  # a multi-step denoiser: the attack's objective is its denoising loss

    def __init__(self, pipe, concept):
        self.pipe, self.concept, self.unet, self.params = pipe, concepts.resolve(concept), pipe.unet, {}
        self.ctx = Context(seed=0, model_id="toy", quiet=True)

    def attack_model(self):
        return nullcontext(self.unet)

    def trained_modules(self):
        return []  # nothing trains: the attack runs on the erased model as it is


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


@pytest.mark.parametrize("method", ["esd", pytest.param("spm", marks=pytest.mark.slow),
                                    pytest.param("salun", marks=pytest.mark.slow)])
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


@pytest.mark.slow
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
    (["--method", "sfd", "--adversarial", "--adversarial-fraction", "0"], "must be in (0, 1]"),
    (["--method", "sfd", "--adversarial-fraction", "0.5"], "add --adversarial"),
])
def test_bad_adversarial_options_exit_2_with_one_line(argv, match, capsys):
    assert main(["--concept", "circle", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and match in err


def test_text_encoder_variant_ships_a_delta_that_plugs_into_another_unet(sd_folder, tmp_path, capsys):
    """ESD --variant text-encoder (AdvUnlearn's configuration) trains the text encoder only; its artifact is a
    text-encoder weight delta that pipelines.apply puts on any pipeline sharing that encoder (here one with another
    UNet), leaves the UNet alone, comes off exactly, and is refused by a pipeline with another encoder."""
    import pipelines
    from adapters.errors import UserError

    out = tmp_path / "te.safetensors"
    argv = ["--concept", "a dog", "--model", sd_folder, "--method", "esd", "--variant", "text-encoder", "--steps", "3",
            "--ddim-steps", "3", "--lr", "1e-3", "--quiet", "--output", str(out)]
    assert main(argv) == 0
    art = load_artifact(out)
    assert art.metadata["target"] == "text_encoder" and all("encoder.layers." in k or "final_layer_norm" in k
                                                           for k in art.tensors)
    assert max(float(t.abs().max()) for t in art.tensors.values()) > 0
    pipe = pipelines.load(sd_folder)
    pipe.unet = tiny_sd_pipeline("sd1", seed=1).unet  # another UNet, the same text encoder
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    handle = pipelines.apply(pipe, out)
    te = pipe.text_encoder.state_dict()
    for k, d in art.tensors.items():
        assert torch.allclose(te[k], te_before[k] + d, atol=1e-6), k
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())
    handle.remove()
    assert all(torch.equal(v, te_before[k]) for k, v in pipe.text_encoder.state_dict().items())
    with pytest.raises(UserError, match="another base model"):
        pipelines.apply(pipelines.load("toy"), out)
    levers = ["--mixed-precision", "bf16", "--gradient-checkpointing", "--output", str(tmp_path / "te-bf16.safetensors"),
              "--adversarial", "--attack-warmup", "0", "--attack-steps", "1", "--attack-images", "1"]
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # a second run in one test, with other mixed precision
    assert main(argv[:-2] + levers) == 0, "the levers act on the trained text encoder, the attack under autocast"
    assert main(["--concept", "nudity", "--method", "esd", "--adversarial", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["esd"]["variant"] == "text-encoder" and plan["esd"]["lr"] == 1e-5 and plan["esd"]["steps"] == 1000
    assert plan["adversarial"]["steps"] == 30 and plan["adversarial"]["retain_weight"] == 0.3


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_an_adversarial_sfd_run_attacks_its_generator_and_trains_on_the_attacked_forget_prompts(tmp_path, monkeypatch,
                                                                                               fraction):
    """SFD's student is a one-step generator: the inner attack fits δ so that G([δ; c]) draws the concept's images
    (its loss falls), and from then on the generator and the fake score see the forget prompts behind δ (all of
    them, or ``--adversarial-fraction`` of the rows, the rest plain), while the remain batch stays plain."""
    from erasure.methods import sfd as sfd_module

    seen = []
    original = sfd_module.SFD._draw

    def spy(self, gen, pool, partner=None, attacked=False):
        d = original(self, gen, pool, partner, attacked)
        if self.adversary.delta is not None:  # each row's distance to the nearest plain row of its pool
            gap = (d["cond"].unsqueeze(1) - pool.unsqueeze(0)).abs().flatten(2).amax(-1).amin(1)
            seen.append((pool is self.forget, attacked, int((gap > 1e-4).sum()), int((gap == 0).sum())))
        return d

    monkeypatch.setattr(sfd_module.SFD, "_draw", spy)
    out = tmp_path / "sfd-adv"
    argv = ["--concept", "circle", "--method", "sfd", "--output", str(out), "--steps", "4", "--batch-size", "8",
            "--prompt-pool", "32", "--quiet", "--adversarial", "--attack-warmup", "1", "--attack-every", "2",
            "--attack-steps", "5", "--attack-images", "4", "--adversarial-fraction", str(fraction)]
    assert main(argv) == 0
    record = json.loads(out.with_name("sfd-adv.json").read_text())
    assert set(record["loss"][0]) == {"fake", "generator"}, "no attack during the warm-up"
    assert [set(e) for e in record["loss"][1:]] == [{"fake", "generator", "atk", "atk_start"}] * 3
    assert all(e["atk"] > e["atk_start"] for e in record["loss"][1:]), "the attack lowered the generator's loss"
    forget = [(a, moved, plain) for is_forget, a, moved, plain in seen if is_forget]
    remain = [(a, plain) for is_forget, a, _, plain in seen if not is_forget]
    assert len(forget) == 6 and all(a for a, _, _ in forget)  # fake and generator steps of three attacked iterations
    moved, plain = sum(m for _, m, _ in forget), sum(p for _, _, p in forget)
    assert moved + plain == 6 * 8
    assert plain == 0 if fraction == 1.0 else 12 <= moved <= 36, (moved, plain)
    assert remain == [(False, 8)] * 6
    assert json.loads((out / "erasure.json").read_text())["adversarial"]["steps"] == 5
