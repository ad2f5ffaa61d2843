"""``python -m erasure.train``: resolved configs, user errors (exit 2, one line), mixed precision, exact resume."""

import json
import subprocess
import sys

import pytest
import torch

from adapters.artifact import load_artifact
from erasure.train import main
from pipelines.testing import save_tiny, tiny_sd_pipeline

FAST = ["--method", "esd", "--steps", "4", "--ddim-steps", "3", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd1")
    save_tiny(tiny_sd_pipeline("sd1"), folder)
    return str(folder)


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"one line expected: {err!r}"
    return err


def test_dry_run_resolves_toy_defaults_and_preset(capsys):
    assert main(["--concept", "circle", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    # the default method is SPM, with its toy-world defaults
    assert cfg["run"]["model"] == "toy" and cfg["run"]["method"] == "spm"
    assert cfg["spm"]["anchor_source"] == "captions" and cfg["spm"]["pair_fraction"] == 0.5
    assert (cfg["spm"]["steer"], cfg["spm"]["pair_target"], cfg["spm"]["steps"]) == ("swap", "swap", 300)
    assert main(["--concept", "red", "--dry-run"]) == 0  # colours and fills keep SPM's empty surrogate
    red = json.loads(capsys.readouterr().out)["spm"]
    assert (red["steer"], red["pair_target"], red["steps"]) == ("surrogate", "other", 200)
    assert cfg["run"]["output"].endswith("circle-spm.safetensors")
    assert main(["--concept", "circle", "--method", "salun", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["salun"]["alpha"] == 0.4 and cfg["salun"]["mask_fraction"] == 0.5
    assert main(["--concept", "circle", "--method", "esd", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["esd"]["steps"] == 200 and cfg["esd"]["eta"] == 1.0
    assert main(["--concept", "circle", "--method", "esd", "--dry-run", "--eta", "2", "--steps", "7"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["esd"]["eta"] == 2.0 and cfg["esd"]["steps"] == 7 and cfg["run"]["steps"] == 7


def test_nudity_preset_defaults_to_sd14_with_the_papers_variant(capsys):
    assert main(["--concept", "nudity", "--method", "esd", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["run"]["model"] == "CompVis/stable-diffusion-v1-4"
    assert cfg["esd"]["variant"] == "esd-u" and cfg["esd"]["lr"] == 1e-5 and cfg["esd"]["steps"] == 1000


@pytest.mark.parametrize("argv, match", [
    (["--concept", "dog", "--model", "toy"], "not a toy-world concept"),
    (["--concept", "nudity"], "not available locally"),
    (["--concept", "circle", "--output", "x.pt"], "must end in .safetensors"),
    (["--concept", "circle", "--model", "/no/such/folder"], "toy-world concept"),
    (["--concept", "a dog", "--model", "/no/such/folder"], "/no/such/folder"),
    (["--concept", "circle", "--pair-fraction", "1.5"], "--pair-fraction must be between 0 and 1"),
    (["--concept", "circle", "--method", "sfd", "--output", "o", "--regression-weight", "1", "--regression-pairs", "1"],
     "--regression-pairs ≥ 2"),
    (["--concept", "circle", "--method", "sfd", "--output", "o", "--fake-steps", "0"], "--fake-steps must be at least 1"),
    # refused before the (missing) model is looked at
    (["--concept", "a dog", "--model", "/no/such/folder", "--pair-fraction", "0.5"], "needs a toy concept"),
    (["--concept", "a dog", "--model", "/no/such/folder", "--pair-fraction", "0", "--steer", "swap"],
     "--steer swap needs a toy concept"),
])
def test_user_errors_exit_2_with_one_line(argv, match, capsys, tmp_path):
    assert main(argv + ["--output", str(tmp_path / "o.safetensors")] if "--output" not in argv else argv) == 2
    assert match in _err(capsys)


def test_unwritable_output_exits_2_and_writes_nothing(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--concept", "circle", "--output", str(blocker / "sub" / "a.safetensors")]) == 2
    assert "output folder" in _err(capsys)


def test_unknown_method_and_bad_flags_exit_2():
    for argv in (["--method", "nope"], ["--mixed-precision", "fp8"], ["--steps", "many"]):
        r = subprocess.run([sys.executable, "-m", "erasure.train", *argv], capture_output=True, text=True)
        assert r.returncode == 2 and "invalid" in r.stderr


def test_fp16_on_cpu_is_a_clear_error(sd_folder, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is valid here")
    argv = ["--concept", "a dog", "--method", "esd", "--model", sd_folder, "--mixed-precision", "fp16",
            "--output", str(tmp_path / "a.safetensors")]
    assert main(argv) == 2
    assert "needs a CUDA device" in _err(capsys)


def test_bf16_mixed_precision_trains_on_cpu(sd_folder, tmp_path):
    out = tmp_path / "bf16.safetensors"
    assert main(["--concept", "a dog", "--model", sd_folder, "--mixed-precision", "bf16", "--output", str(out), *FAST]) == 0
    art = load_artifact(out)
    assert art.metadata["run"]["mixed_precision"] == "bf16"
    assert all(torch.isfinite(t).all() for t in art.tensors.values())
    assert any(t.abs().max() > 0 for t in art.tensors.values()), "training moved the weights"
    record = json.loads(out.with_suffix(".json").read_text())
    assert len(record["loss"]) == 4 and record["method_config"]["variant"] == "esd-x"
    assert not out.with_name(out.name + ".ckpt.safetensors").exists(), "checkpoint removed after success"


@pytest.mark.parametrize("method", ["esd", "spm"])
def test_resume_after_interruption_is_bit_identical(sd_folder, tmp_path, monkeypatch, method):
    from erasure.methods import esd, spm

    cls = {"esd": esd.ESD, "spm": spm.SPM}[method]
    argv = ["--concept", "a dog", "--model", sd_folder, "--checkpoint-every", "2", *FAST, "--method", method]
    full = tmp_path / "full.safetensors"
    assert main(argv + ["--output", str(full)]) == 0

    calls = {"n": 0}
    original = cls.loss

    def dying_loss(self, gen):
        calls["n"] += 1
        if calls["n"] == 4:  # killed during step 4, after the step-2 checkpoint
            raise KeyboardInterrupt
        return original(self, gen)

    part = tmp_path / "part.safetensors"
    monkeypatch.setattr(cls, "loss", dying_loss)
    assert main(argv + ["--output", str(part)]) == 130
    assert not part.exists() and part.with_name(part.name + ".ckpt.safetensors").exists()
    monkeypatch.setattr(cls, "loss", original)
    assert main(argv + ["--output", str(part), "--resume"]) == 0
    a, b = load_artifact(full), load_artifact(part)
    assert a.tensors.keys() == b.tensors.keys()
    if method == "spm":  # the membrane's zero-initialised up-projections have moved
        assert any(t.abs().max() > 0 for k, t in a.tensors.items() if "lora_up" in k)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert json.loads(full.with_suffix(".json").read_text())["loss"] == json.loads(part.with_suffix(".json").read_text())["loss"]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_mixed_precision(sd_folder, tmp_path, precision):
    out = tmp_path / f"{precision}.safetensors"
    assert main(["--concept", "a dog", "--model", sd_folder, "--mixed-precision", precision, "--device", "cuda",
                 "--output", str(out), *FAST]) == 0
    assert all(torch.isfinite(t).all() for t in load_artifact(out).tensors.values())
