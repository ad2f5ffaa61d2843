"""Score Forgetting Distillation: the equations, the one-step pipeline's folder round trip, the CLI, resume, and
data-parallel training that follows a 1-process run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pipelines
from erasure.data import override_of
from erasure.methods.sfd import (fake_score_loss, one_step, regression_loss, sid_generator_loss, teacher_samples,
                                 x0_from_eps)
from erasure.train import main
from eval.generate import generate
from pipelines.one_step import OneStepPipeline

FAST = ["--steps", "3", "--batch-size", "4", "--prompt-pool", "32", "--lr", "1e-4", "--lr-fake", "1e-4", "--quiet"]


def test_sid_loss_is_the_papers_equation_and_only_w_is_detached():
    g = torch.Generator().manual_seed(0)
    x_g, y_real, y_fake = (torch.randn(3, 4, 8, 8, generator=g, requires_grad=True) for _ in range(3))
    w = (x_g - y_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    want = ((y_real - y_fake) * (y_fake - x_g) / w).flatten(1).sum(1)  # α = 1
    assert torch.allclose(sid_generator_loss(x_g, y_real, y_fake, 1.0), want.detach(), atol=1e-5)
    a12 = ((y_real - y_fake) * ((y_real - x_g) - 1.2 * (y_real - y_fake)) / w).flatten(1).sum(1)
    assert torch.allclose(sid_generator_loss(x_g, y_real, y_fake, 1.2), a12.detach(), atol=1e-5)
    # gradients reach all three inputs (only the normaliser is detached): compare with a detached-w reference
    loss = sid_generator_loss(x_g, y_real, y_fake, 1.0).sum()
    ref = ((y_real - y_fake) * (y_fake - x_g) / w.detach()).sum()
    gl = torch.autograd.grad(loss, [x_g, y_real, y_fake])
    gr = torch.autograd.grad(ref, [x_g, y_real, y_fake])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(gl, gr))
    eps, pred = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.allclose(fake_score_loss(pred, eps), ((pred - eps) ** 2).sum(dim=(1, 2, 3)))


def test_one_step_generator_formula():
    abar = torch.linspace(0.99, 0.01, 1000)

    class Eps(torch.nn.Module):  # a "UNet" predicting a constant ε
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, cond):
            return type("Out", (), {"sample": torch.full_like(x, 0.5) + self.w})()

    z = torch.randn(2, 4, 8, 8)
    a = abar[625]
    x_g = one_step(Eps(), z, None, abar, 625)
    assert torch.allclose(x_g, ((1 - a).sqrt() * z - (1 - a).sqrt() * 0.5) / a.sqrt(), atol=1e-6)
    assert torch.allclose(x0_from_eps(a.sqrt() * x_g + (1 - a).sqrt() * z, z, a), x_g, atol=1e-5)
    assert override_of("a photo of Brad Pitt", "brad pitt", "a middle aged man") == "a photo of a middle aged man"
    assert override_of("nudity", "nude woman", "a woman") == "a woman"


def test_teacher_samples_are_the_pipelines_own_ddim_samples():
    """The regression targets: the teacher's 25-step CFG DDIM sample from the same initial noise, as the pipeline
    draws it; the regression term is Σ (G(z) − x)² per sample."""
    from pipelines.text import encode

    pipe = pipelines.load("toy")
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    prompts = ["a red square", "a striped blue star"]
    ours = teacher_samples(pipe.unet, pipe.scheduler.config, z, encode(pipe, prompts), encode(pipe, [""]), 5.0)
    theirs = pipe(prompts, latents=z.clone(), num_inference_steps=25, guidance_scale=5.0, output_type="latent").images
    assert ours.shape == (2, 4, 8, 8) and torch.allclose(ours, theirs.float(), atol=1e-4)
    x, y = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    assert torch.equal(regression_loss(x, y), torch.full((2,), 256.0))


def test_regression_term_pulls_the_generator_toward_the_teacher_samples(tmp_path):
    """With the SiD terms weighted 0 the generator loss is the regression term alone, and training lowers it."""
    out = tmp_path / "reg"
    argv = ["--concept", "circle", "--method", "sfd", "--output", str(out), *FAST, "--steps", "8", "--lr", "3e-5",
            "--g-remain", "0", "--g-forget", "0", "--regression-weight", "1", "--regression-pairs", "4"]
    assert main(argv) == 0
    losses = [x["generator"] for x in json.loads(out.with_name("reg.json").read_text())["loss"]]
    assert all(x > 0 for x in losses) and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


def test_fake_steps_update_the_fake_score_that_many_times_per_iteration(tmp_path, monkeypatch):
    from erasure.methods import sfd as sfd_module

    calls = []
    for name in ("_fake_step", "_generator_step"):
        original = getattr(sfd_module.SFD, name)
        monkeypatch.setattr(sfd_module.SFD, name,
                            lambda self, *a, _f=original, _n=name: calls.append(_n) or _f(self, *a))
    out = tmp_path / "fs"
    assert main(["--concept", "circle", "--method", "sfd", "--output", str(out), *FAST, "--steps", "2", "--fake-steps", "3"]) == 0
    assert calls == (["_fake_step"] * 3 + ["_generator_step"]) * 2
    assert json.loads(out.with_name("fs.json").read_text())["method_config"]["fake_steps"] == 3


@pytest.fixture(scope="module")
def sfd_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("sfd") / "circle-sfd"
    assert main(["--concept", "circle", "--method", "sfd", "--output", str(out), *FAST]) == 0
    return out


def test_cli_writes_a_one_step_pipeline_folder(sfd_folder):
    assert (sfd_folder / "model_index.json").exists() and (sfd_folder / "erasure.json").exists()
    index = json.loads((sfd_folder / "model_index.json").read_text())
    assert index["_class_name"] == "OneStepPipeline" and index["init_timestep"] == 625
    assert list(sfd_folder.rglob("*.safetensors")) and not list(sfd_folder.rglob("*.bin"))
    meta = json.loads((sfd_folder / "erasure.json").read_text())
    assert meta["method"] == "sfd" and meta["concept"] == "circle" and "a square" in " ".join(meta["override_prompts"])
    record = json.loads(sfd_folder.with_name(sfd_folder.name + ".json").read_text())
    assert len(record["loss"]) == 3 and {"fake", "generator"} <= record["loss"][0].keys()
    assert not list(sfd_folder.parent.glob(".*")), "no temp folders or checkpoints left behind"


def test_one_step_pipeline_loads_and_generates_like_any_model(sfd_folder):
    pipe = pipelines.load(str(sfd_folder))
    assert isinstance(pipe, OneStepPipeline)
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    a = generate(pipe, ["a red square", "a blue star"], seed=3, steps=25, guidance=5.0)
    assert a.shape == (2, 32, 32, 3) and a.dtype.name == "uint8" and len(calls) == 1, "one UNet call per batch"
    b = generate(pipelines.load(str(sfd_folder)), ["a red square", "a blue star"], seed=3, steps=25, guidance=5.0)
    assert (a == b).all(), "same seeds → same images after a reload"
    c = generate(pipe, ["a red square", "a blue star"], seed=3, batch_size=1)
    assert abs(a.astype(int) - c.astype(int)).max() <= 1, "batch size changes at most float rounding (1/255)"
    with pytest.warns(UserWarning, match="ignores negative_prompt"):
        pipe("a red square", negative_prompt="blurry", output_type="np")


def test_generator_ema_follows_the_sid_half_life():
    """β = 0.5^(batch / half-life); with ramp-up the half-life is at most ratio × images seen; off → no EMA."""
    from types import SimpleNamespace

    from erasure.methods.sfd import SFD, SFDConfig

    def ema_after_one_step(**cfg):
        G, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.ones_(G.weight), torch.nn.init.zeros_(ema.weight)
        SFD._update_ema(SimpleNamespace(config=SFDConfig(batch_size=8, **cfg), G=G, G_ema=ema), 0)
        return ema.weight.item()

    assert ema_after_one_step(ema_halflife_kimg=0.008, ema_rampup=0.0) == pytest.approx(0.5)  # β = 0.5^(8/8)
    assert ema_after_one_step(ema_halflife_kimg=0.008, ema_rampup=0.5) == pytest.approx(0.75)  # h = 4: β = 0.25
    assert ema_after_one_step(ema_halflife_kimg=1.0, ema_rampup=0.0) == pytest.approx(1 - 0.5 ** (8 / 1000))
    assert SFD._update_ema(SimpleNamespace(config=SFDConfig(), G_ema=None), 0) is None


@pytest.mark.parametrize("ema", [["--ema-halflife-kimg", "0"], ["--ema-halflife-kimg", "0.01"],
                                 ["--ema-halflife-kimg", "0", "--regression-weight", "1", "--regression-pairs", "4"]],
                         ids=["plain", "ema", "regression"])
def test_resume_continues_bit_identically(tmp_path, ema):
    full = tmp_path / "full"
    assert main(["--concept", "circle", "--method", "sfd", "--output", str(full), *FAST, *ema]) == 0
    part = tmp_path / "part"
    argv = ["--concept", "circle", "--method", "sfd", "--output", str(part), "--checkpoint-every", "2", *FAST, *ema]
    # interrupt a 3-step run during step 3 (after its step-2 checkpoint), then resume it
    from erasure.methods import sfd as sfd_module

    calls = {"n": 0}
    original = sfd_module.SFD._generator_step

    def stop_after_two(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args)

    sfd_module.SFD._generator_step = stop_after_two
    try:
        assert main(argv) == 130
    finally:
        sfd_module.SFD._generator_step = original
    assert part.with_name("part.ckpt.safetensors").exists()
    assert main([*argv, "--resume"]) == 0
    from safetensors.torch import load_file

    fa = load_file(str(next((full / "unet").glob("*.safetensors"))))
    fb = load_file(str(next((part / "unet").glob("*.safetensors"))))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    if ema[1] != "0":  # the student is the EMA, not the last generator
        plain = tmp_path / "plain"
        assert main(["--concept", "circle", "--method", "sfd", "--output", str(plain), *FAST, "--ema-halflife-kimg", "0"]) == 0
        fp = load_file(str(next((plain / "unet").glob("*.safetensors"))))
        assert any(not torch.equal(fa[k], fp[k]) for k in fa)


@pytest.mark.slow
def test_two_processes_follow_one_process(tmp_path):
    """Data parallel through `accelerate launch`: 2 CPU processes, same global batch → same losses and weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = ["-m", "erasure.train", "--concept", "circle", "--method", "sfd", "--device", "cpu", *FAST]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *args, "--output", str(one)], check=True, env=env, timeout=600)
    with socket.socket() as sock:  # a free port for the processes' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", port, *args,
                    "--output", str(two)], check=True, env=env, timeout=600)
    r1 = json.loads(one.with_name("one.json").read_text())
    r2 = json.loads(two.with_name("two.json").read_text())
    assert r2["processes"] == 2 and r1["processes"] == 1
    for a, b in zip(r1["loss"], r2["loss"]):
        assert a["generator"] == pytest.approx(b["generator"], rel=1e-3, abs=1e-4)
        assert a["fake"] == pytest.approx(b["fake"], rel=1e-3, abs=1e-4)
    from safetensors.torch import load_file

    wa = load_file(str(next((one / "unet").glob("*.safetensors"))))
    wb = load_file(str(next((two / "unet").glob("*.safetensors"))))
    diff = torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in wa])
    # Adam (β₁ = 0) moves a weight by ≈ lr·sign(g) whatever |g|: where g ≈ 0 the summation order of the two runs
    # can flip the sign. So: almost every weight equal, and none further apart than two steps of size lr.
    assert (diff > 1e-6).float().mean() < 0.01, f"{(diff > 1e-6).float().mean():.4f} of the weights differ"
    assert diff.max() <= 2 * 3 * 1e-4


def test_membranes_attach_to_the_one_step_student(sfd_folder, tmp_path):
    """The same attach_membranes (facilitated transport included) works on a OneStepPipeline: a membrane changes its
    images, gated per prompt, and detaching restores them exactly."""
    from adapters.artifact import load_artifact, save_artifact

    out = tmp_path / "star.safetensors"
    assert main(["--concept", "star", "--method", "spm", "--steps", "1", "--ddim-steps", "2", "--output", str(out),
                 "--quiet", "--checkpoint-every", "0"]) == 0
    art = load_artifact(out)
    g = torch.Generator().manual_seed(1)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.05 if "lora_up" in k else v for k, v in art.tensors.items()}
    visible = tmp_path / "star-visible.safetensors"
    save_artifact(visible, tensors, art.metadata, extra_strings={k: art.raw_metadata[k] for k in ("prompts", "rank", "alpha")})
    pipe = pipelines.load(str(sfd_folder))
    prompts = ["a red star", "a blue square"]
    before = generate(pipe, prompts, seed=3)
    handle = pipelines.attach_membranes(pipe, [visible])
    gates = handle.transport.gates_for(pipe.encode_prompt(prompts)[0])[handle.names[0]]
    assert gates[0] == pytest.approx(1.0) and gates[1] < 1.0, "the star prompt opens the membrane fully"
    after = generate(pipe, prompts, seed=3)
    assert abs(after.astype(int) - before.astype(int)).max() > 0
    handle.detach()
    assert (generate(pipe, prompts, seed=3) == before).all()

