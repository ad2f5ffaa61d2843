"""v-prediction (SD 2.x 768) and the other prediction types, by oracles: a stand-in UNet that knows the clean latent x₀
behind its input outputs the exact ε, v or x₀ of its kind. Then x̂₀ and ε̂ are exact, every diffusion loss is zero, and
reading the oracle with the wrong prediction type is not. Tiny SD-1 (ε) and SD-2 (v, DDIM) pipelines."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import erasure
from erasure.concepts import resolve
from erasure.methods.base import Context, add_noise, ddim_sampler
from erasure.methods.salun import SalUn, SalUnConfig, saliency_loss
from erasure.methods.sfd import SFD, SFDConfig, teacher_samples
from pipelines.one_step import OneStepPipeline, one_step_latents
from pipelines.prediction import PREDICTION_TYPES, prediction_type_of, target, to_eps, to_x0
from pipelines.testing import save_tiny, tiny_sd_pipeline

KIND = {"sd1": "epsilon", "sd2": "v_prediction"}  # the tiny pipelines' schedulers
OTHER = {"epsilon": "v_prediction", "v_prediction": "epsilon", "sample": "epsilon"}


class Oracle(torch.nn.Module):
    """A UNet stand-in that knows x₀: at (x_t, t) it outputs the true ε = (x_t − √ᾱ_t x₀)/√(1 − ᾱ_t), v = √ᾱ_t ε −
    √(1 − ᾱ_t) x₀ or x₀ (its ``kind``), whatever the text conditioning. x0 (1 or B, 4, h, w); t a scalar or (B,)."""

    dtype = torch.float32

    def __init__(self, x0: torch.Tensor, abar: torch.Tensor, kind: str):
        super().__init__()
        self.register_buffer("x0", x0)
        self.abar, self.kind = abar, kind
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # a module with parameters, as a UNet

    def forward(self, x, t, cond, **unused):
        a = self.abar[torch.as_tensor(t).reshape(-1)].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        out = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * self.x0,
               "sample": self.x0.expand_as(x)}[self.kind]
        return SimpleNamespace(sample=out + self.dummy)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pipes():
    return {kind: tiny_sd_pipeline(kind) for kind in KIND}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path / "cache"))


def _ctx():
    from accelerate import Accelerator  # only the methods' tests need one

    return Context(seed=0, model_id="tiny", accelerator=Accelerator(cpu=True), quiet=True)


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_conversions_invert_the_forward_noising_as_diffusers_does(pipes, kind):
    """x_t = √ᾱ x₀ + √(1 − ᾱ) ε: from the true output of each kind, to_x0 gives x₀ and to_eps gives ε; target(x₀, ε)
    is that output (diffusers' get_velocity for v), and DDIM's own x̂₀ agrees. ᾱ per sample or a scalar."""
    sched = pipes["sd2"].scheduler
    abar = sched.alphas_cumprod
    x0, eps = randn(4, 4, 8, 8, seed=1), randn(4, 4, 8, 8, seed=2)
    t = torch.tensor([0, 250, 625, 999])
    x_t = sched.add_noise(x0, eps, t)
    a = abar[t].view(-1, 1, 1, 1)
    out = Oracle(x0, abar, kind)(x_t, t, None).sample.detach()
    assert torch.allclose(to_x0(out, x_t, a, kind), x0, atol=1e-4)
    assert torch.allclose(to_eps(out, x_t, a, kind), eps, atol=1e-4)
    assert torch.allclose(target(x0, eps, a, kind), out, atol=1e-5)
    assert not torch.allclose(to_x0(out, x_t, a, OTHER[kind]), x0, atol=1e-1)
    assert torch.allclose(to_x0(out[2], x_t[2], float(abar[625]), kind), x0[2], atol=1e-4)  # scalar ᾱ
    if kind == "v_prediction":
        assert torch.allclose(DDPMScheduler.from_config(sched.config).get_velocity(x0, eps, t), out, atol=1e-5)
    ddim = DDIMScheduler.from_config(sched.config, prediction_type=kind)
    ddim.set_timesteps(4)
    step = int(ddim.timesteps[1])
    x_s = sched.add_noise(x0[:1], eps[:1], torch.tensor([step]))
    pred = Oracle(x0[:1], abar, kind)(x_s, step, None).sample.detach()
    assert torch.allclose(ddim.step(pred, step, x_s).pred_original_sample, x0[:1], atol=1e-4)


def test_an_unknown_prediction_type_is_a_value_error_naming_the_choices():
    x = torch.zeros(1, 4, 2, 2)
    for f in (lambda: to_x0(x, x, 0.5, "flow"), lambda: to_eps(x, x, 0.5, "flow"), lambda: target(x, x, 0.5, "flow")):
        with pytest.raises(ValueError, match="'flow'.*epsilon, v_prediction, sample"):
            f()


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_samplers_and_the_one_step_map_follow_the_pipelines_prediction_type(pipes, kind):
    """The DDIM sampler of a pipeline keeps its prediction type, so a DDIM run of an oracle teacher ends at
    √ᾱ₀ x₀ + √(1 − ᾱ₀) ε̂_T (exact x̂₀ at every step); the one-step map of an oracle generator returns its x₀."""
    pipe, ptype = pipes[kind], KIND[kind]
    abar = pipe.scheduler.alphas_cumprod
    assert prediction_type_of(pipe) == ptype and ddim_sampler(pipe).config.prediction_type == ptype
    x0, z = randn(1, 4, 8, 8, seed=3), randn(2, 4, 8, 8, seed=4)
    cond = torch.zeros(2, 77, 32)
    sched = ddim_sampler(pipe)
    sched.set_timesteps(3)
    a_T, a_0 = abar[sched.timesteps[0]], abar[0]  # DDIM's last step goes to ᾱ₀ (set_alpha_to_one False)
    expected = a_0.sqrt() * x0 + (1 - a_0).sqrt() * (z - a_T.sqrt() * x0) / (1 - a_T).sqrt()
    for oracle_kind, close in ((ptype, True), (OTHER[ptype], False)):
        sample = teacher_samples(Oracle(x0, abar, oracle_kind), pipe.scheduler.config, z, cond, cond[:1], 4.5, steps=3)
        assert torch.allclose(sample, expected, atol=1e-4) == close
        x_g = one_step_latents(lambda x: Oracle(x0, abar, oracle_kind)(x, 625, cond).sample, z, abar[625], ptype)
        assert torch.allclose(x_g, x0.expand_as(z), atol=1e-4) == close


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_salun_diffusion_losses_of_an_oracle_are_zero(pipes, kind):
    """All forget and retain latents one x₀: an oracle of the pipeline's kind makes SalUn's loss (forget term: the
    same output twice; retain term: output − target) and the mask loss vanish; an oracle of the other kind does not."""
    pipe, ptype = pipes[kind], KIND[kind]
    cfg = SalUnConfig(batch_size=2, forget_images=2, retain_images=2, sample_steps=1, substitute="a blue car")
    method = SalUn(pipe, resolve("a red car", "tiny"), cfg, _ctx())
    assert method.prediction_type == ptype
    x0 = randn(1, 4, 8, 8, seed=5)
    method.forget.latents = x0.expand_as(method.forget.latents).clone()
    method.retain.latents = x0.expand_as(method.retain.latents).clone()
    abar = method.noise_schedule.alphas_cumprod
    unet = method.unet
    try:
        for oracle_kind, zero in ((ptype, True), (OTHER[ptype], False)):
            method.unet = Oracle(x0, abar, oracle_kind)
            loss = method.loss(torch.Generator().manual_seed(0)).item()
            assert (loss < 1e-8) == zero, (oracle_kind, loss)
            noise, t = randn(2, 4, 8, 8, seed=6), torch.tensor([100, 700])
            out = method.unet(add_noise(method.noise_schedule, x0.expand(2, -1, -1, -1), t, noise), t, None).sample
            mask_loss = saliency_loss(out, out, method._target(x0.expand(2, -1, -1, -1), noise, t), 7.5).item()
            assert (mask_loss < 1e-8) == zero, (oracle_kind, mask_loss)
    finally:
        method.unet = unet


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_sfd_reads_the_teacher_the_fake_score_and_the_generator_in_their_kind(pipes, kind, tmp_path):
    """An oracle teacher's guided output gives y_real = x₀; an oracle fake score has zero denoising loss on an oracle
    generator's samples; the student pipeline (saved and loaded) maps noise to the oracle generator's x₀."""
    pipe, ptype = pipes[kind], KIND[kind]
    sfd = SFD(pipe, resolve("a red car", "tiny"), SFDConfig(batch_size=2, prompt_pool=4, concept_override="a car"), _ctx())
    assert sfd.prediction_type == ptype
    abar, x0 = sfd.abar, randn(1, 4, 8, 8, seed=7)
    t, eps = torch.tensor([30, 900]), randn(2, 4, 8, 8, seed=8)
    x_t, a = sfd._noised(x0.expand(2, -1, -1, -1), t, eps)
    cond, null = sfd.remain[:1].expand(2, -1, -1), sfd.null.expand(2, -1, -1)
    teacher, fake, G = sfd.teacher, sfd.fake, sfd.G
    try:
        sfd.G = Oracle(x0, abar, ptype)
        for oracle_kind, exact in ((ptype, True), (OTHER[ptype], False)):
            y_real = sfd._x0(Oracle(x0, abar, oracle_kind), x_t, t, cond, null, 4.5, a)
            assert torch.allclose(y_real, x0.expand_as(y_real), atol=1e-4) == exact
            sfd.fake = Oracle(x0, abar, oracle_kind)
            opt = torch.optim.SGD(sfd.fake.parameters(), lr=0.0)
            fake_loss = sfd._fake_step(torch.Generator().manual_seed(0), opt)
            assert (fake_loss < 1e-6) == exact, (oracle_kind, fake_loss)
        student = sfd.student()
        assert student.prediction_type == ptype
        z = randn(2, 4, 8, 8, seed=9)
        assert torch.allclose(student.generate_latents(z, cond), x0.expand_as(z), atol=1e-4)
    finally:
        sfd.teacher, sfd.fake, sfd.G = teacher, fake, G
    student = sfd.student()  # the real generator: its prediction type survives a save / load round trip
    student.save_pretrained(tmp_path / "student")
    assert json.loads((tmp_path / "student" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == ptype
    assert OneStepPipeline.from_pretrained(tmp_path / "student").prediction_type == ptype


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd2")
    save_tiny(tiny_sd_pipeline("sd2"), folder)
    return str(folder)


@pytest.mark.parametrize("method,options", [
    ("salun", {"batch_size": 2, "forget_images": 2, "retain_images": 2, "sample_steps": 1, "substitute": "a blue car"}),
    ("sfd", {"batch_size": 2, "prompt_pool": 4, "concept_override": "a car", "lr": 1e-4, "lr_fake": 1e-4}),
])
def test_erase_trains_on_a_v_prediction_model(sd2_folder, tmp_path, method, options):
    out = tmp_path / ("out" if method == "sfd" else "out.safetensors")
    result = erasure.erase("a red car", method=method, model=sd2_folder, output=str(out), steps=1, quiet=True, **options)
    losses = result.record["loss"]  # floats (SalUn) or {"fake", "generator"} (SFD), one per step
    values = [v for x in losses for v in (x.values() if isinstance(x, dict) else [x])]
    assert len(losses) == 1 and values and all(math.isfinite(v) and v != 0 for v in values), losses  # SiD's may be < 0
