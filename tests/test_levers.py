"""Memory levers of the one fit loop: mixed precision (frozen networks in bf16, fp32 master weights), gradient
checkpointing, the factored optimiser, 8-bit Adam's errors, TF32 — on a tiny SD-1.x pipeline."""

import math
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

import erasure
from adapters.artifact import SpilledTensors, load_artifact
from erasure import concepts
from erasure.engine import apply_levers, optimizer_tensors, restore_optimizer, tf32
from erasure.methods.base import Context
from erasure.methods.esd import ESD, ESDConfig
from erasure.methods.spm import SPM, SPMConfig
from erasure.optim import FactoredAdam, make_optimizer
from erasure.train import main
from pipelines.testing import save_tiny, tiny_sd_pipeline

SMALL = {"spm": dict(ddim_steps=2), "esd": dict(ddim_steps=2, variant="esd-u"),
         "salun": dict(forget_images=2, retain_images=2, sample_steps=2, mask_batches=1, batch_size=1,
                       substitute="a photo of a cat"),
         "sfd": dict(batch_size=1, concept_override="a photo of a cat")}
LEVERS = dict(mixed_precision="bf16", gradient_checkpointing=True)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd1")
    save_tiny(tiny_sd_pipeline("sd1"), folder)
    return str(folder)


def _erase(folder, method, out: Path, **levers):
    AcceleratorState._reset_state(True)
    suffix = "" if method == "sfd" else ".safetensors"
    return erasure.erase("a photo of a dog", method=method, model=folder, steps=2, checkpoint_every=0, quiet=True,
                         output=str(out) + suffix, **SMALL[method], **levers)


# -- the factored optimiser ------------------------------------------------------------------------------------------


def test_factored_adam_is_adam_on_vectors():
    torch.manual_seed(0)
    a = torch.randn(50, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ours, ref = FactoredAdam([a], lr=1e-2, betas=(0.9, 0.99)), torch.optim.Adam([b], lr=1e-2, betas=(0.9, 0.99))
    target = torch.randn(50)
    for _ in range(20):
        for p, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            ((p - target) ** 2 * torch.arange(50)).sum().backward()
            opt.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_factored_adam_keeps_rows_plus_columns_and_converges():
    torch.manual_seed(0)
    w = torch.zeros(64, 32, 3, 3, requires_grad=True)
    target = torch.randn(64, 32, 3, 3)
    opt = FactoredAdam([w], lr=3e-2, betas=(0.0, 0.999))
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = ((w - target) ** 2).mean()
        loss.backward()
        opt.step()
        first = first or loss.item()
    state = opt.state[w]
    assert {k: v.numel() for k, v in state.items()} == {"step": 1, "row": 64, "col": 32 * 9}  # no exp_avg at β₁ = 0
    assert loss.item() < first / 100


def test_factored_state_survives_a_checkpoint_round_trip():
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = make_optimizer("factored", [w], lr=1e-3, betas=(0.9, 0.999))
    w.grad = torch.randn(8, 4)
    opt.step()
    tensors = optimizer_tensors(opt, "opt")
    fresh = make_optimizer("factored", [w], lr=1e-3, betas=(0.9, 0.999))
    restore_optimizer(fresh, tensors, "opt")
    for k, v in opt.state[w].items():
        assert torch.equal(fresh.state[w][k], v), k


def test_adam_kind_keeps_the_methods_own_optimiser():
    w = torch.nn.Parameter(torch.zeros(3))
    assert type(make_optimizer("adam", [w], lr=1e-3)) is torch.optim.Adam
    adamw = make_optimizer("adam", [w], lr=1e-3, weight_decay=1e-2, decoupled=True)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 1e-2


# -- mixed precision: what is cast, what stays fp32 ------------------------------------------------------------------


def _run(mixed_precision="bf16", gradient_checkpointing=False, **kw):
    from erasure.config import TrainConfig

    return TrainConfig(mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, **kw)


def test_bf16_holds_frozen_networks_in_half_and_trains_fp32_membranes():
    pipe = tiny_sd_pipeline("sd1")
    method = SPM(pipe, concepts.resolve("a dog", "tiny"), SPMConfig(ddim_steps=2), Context())
    apply_levers(method, _run())
    assert all(p.dtype == torch.float32 for p in method.params.values())
    frozen = [p for n, p in pipe.unet.named_parameters() if "lora_" not in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.bfloat16 for m in (pipe.text_encoder, pipe.vae) for p in m.parameters())


def test_bf16_fine_tune_keeps_a_half_reference_and_an_exact_spilled_original(tmp_path):
    pipe = tiny_sd_pipeline("sd1")
    method = ESD(pipe, concepts.resolve("a dog", "tiny"), ESDConfig(variant="esd-x", ddim_steps=2),
                 Context(scratch=str(tmp_path)))
    before = {n: p.detach().clone() for n, p in method.params.items()}
    apply_levers(method, _run())
    assert isinstance(method.original, SpilledTensors) and method.original.path.parent.parent == tmp_path
    assert all(v.dtype == torch.bfloat16 for v in method.reference.values())
    assert all(p.dtype == torch.float32 for p in method.params.values())
    with torch.no_grad():
        for n, p in method.params.items():
            p.add_(0.125)
    delta = method.delta()
    for n in before:  # θ − θ₀ against the exact fp32 originals, not their bf16 copies
        torch.testing.assert_close(delta[n], method.params[n].detach() - before[n], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["spm", *(pytest.param(m, marks=pytest.mark.slow) for m in ("esd", "salun", "sfd"))])
def test_each_method_trains_with_the_levers_close_to_fp32(sd_folder, tmp_path, method):
    plain = _erase(sd_folder, method, tmp_path / "fp32")
    levers = _erase(sd_folder, method, tmp_path / "levers", **LEVERS,
                    **({"optimizer": "factored"} if method == "sfd" else {}))
    assert levers.record["config"]["mixed_precision"] == "bf16" and levers.record["config"]["gradient_checkpointing"]
    first = lambda r: r.record["loss"][0]["fake"] if method == "sfd" else r.record["loss"][0]  # noqa: E731
    assert math.isfinite(first(levers))
    # the same first step computed in bf16; ESD's loss is a small difference of two nearly equal predictions of a
    # random UNet, so bf16's rounding moves it most
    assert first(levers) == pytest.approx(first(plain), rel=0.5 if method == "esd" else 0.15)
    assert not list(tmp_path.glob(".spill-*"))  # the spilled originals are gone
    if method != "sfd":
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all()
                   for t in load_artifact(levers.artifact).tensors.values())


def test_gradient_checkpointing_changes_memory_not_results(sd_folder, tmp_path):
    a = _erase(sd_folder, "spm", tmp_path / "plain")
    b = _erase(sd_folder, "spm", tmp_path / "ckpt", gradient_checkpointing=True)
    ta, tb = load_artifact(a.artifact).tensors, load_artifact(b.artifact).tensors
    assert a.record["loss"] == pytest.approx(b.record["loss"], rel=1e-5)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-6)


# -- errors and flags --------------------------------------------------------------------------------------------------


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"one line expected: {err!r}"
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: 8-bit Adam may be valid here")
def test_8bit_adam_without_cuda_is_one_clear_line(sd_folder, tmp_path, capsys):
    argv = ["--concept", "a dog", "--method", "esd", "--model", sd_folder, "--steps", "1", "--use-8bit-adam",
            "--output", str(tmp_path / "x.safetensors"), "--quiet"]
    assert main(argv) == 2
    assert "--use-8bit-adam needs a CUDA device" in _err(capsys)
    assert not (tmp_path / "x.safetensors").exists()


def test_contradicting_optimiser_flags_are_refused(capsys):
    assert main(["--concept", "circle", "--use-8bit-adam", "--optimizer", "factored", "--dry-run"]) == 2
    assert "contradict" in _err(capsys)


def test_dry_run_shows_the_levers(capsys):
    import json

    assert main(["--concept", "circle", "--mixed-precision", "bf16", "--gradient-checkpointing", "--optimizer",
                 "factored", "--allow-tf32", "--dry-run"]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    assert (run["mixed_precision"], run["gradient_checkpointing"], run["optimizer"], run["allow_tf32"]) == \
        ("bf16", True, "factored", True)


def test_tf32_is_restored_after_the_run():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with tf32(True):
            assert torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["adam8bit", "factored"])
def test_cuda_levers_train(sd_folder, tmp_path, optimizer):
    if optimizer == "adam8bit":
        pytest.importorskip("bitsandbytes")
    r = _erase(sd_folder, "esd", tmp_path / optimizer, device="cuda", mixed_precision="fp16", optimizer=optimizer,
               gradient_checkpointing=True, allow_tf32=True)
    assert all(math.isfinite(v) for v in r.record["loss"])
    assert all(torch.isfinite(t).all() for t in load_artifact(r.artifact).tensors.values())
