"""The training engine: one Method protocol, one fit loop, the library entry point and the CLI over it."""

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import erasure
import pipelines
from adapters.artifact import load_artifact
from adapters.errors import UserError
from erasure import concepts, engine
from erasure.config import option
from erasure.methods import METHODS
from erasure.methods.base import Context, Method, run_metadata
from erasure.methods.salun import SalUn, SalUnConfig
from pipelines.testing import save_tiny, tiny_sd_pipeline


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd1")
    save_tiny(tiny_sd_pipeline("sd1"), folder)
    return str(folder)


@dataclass
class ShiftConfig:
    steps: int = option(4, "iterations")
    lr: float = option(0.1, "learning rate")
    batch_size: int = option(1, "unused")
    target: float = option(1.0, "where the shift is pulled")


class Shift(Method):
    """A method in one class: a single trained scalar pulled toward ``target`` (tests the protocol alone)."""

    name = "shift"
    title = "test method"
    config_class = ShiftConfig
    toy_defaults = {"target": 2.0}

    def __init__(self, pipe, concept, config, ctx):
        super().__init__(pipe, concept, config, ctx)
        self.params = {"shift": torch.zeros((), requires_grad=True)}

    def loss(self, gen):
        noise = torch.randn((), generator=gen) * 0.01  # randomness from gen: resuming must restore it
        return (self.params["shift"] - self.config.target + noise) ** 2

    def artifact(self, model_id):
        meta = run_metadata(self, "weight_delta", model_id, "none", target="unet")
        return {"shift": self.params["shift"].detach().reshape(1)}, meta, None


@pytest.fixture
def shift_registered(monkeypatch):
    monkeypatch.setitem(METHODS, "shift", Shift)
    return Shift


def test_a_new_method_is_one_class_and_one_registry_entry(shift_registered, sd_folder, tmp_path):
    """Registered, a method gets the CLI, config resolution, the fit loop, the artifact and the run record."""
    out = tmp_path / "s.safetensors"
    result = erasure.erase("a dog", method="shift", model=sd_folder, output=str(out), steps=30, quiet=True)
    assert result.artifact == out and out.exists()
    shift = load_artifact(out).tensors["shift"].item()
    assert abs(shift - 1.0) < 0.1, "the fit loop trained the parameter toward the target"
    record = json.loads(out.with_suffix(".json").read_text())
    assert record == json.loads(json.dumps(result.record)) and len(record["loss"]) == 30
    assert record["loss"][-1] < record["loss"][0] and record["method_config"]["target"] == 1.0
    plan = erasure.resolve("circle", method="shift", output=str(out))
    assert plan.config.target == 2.0, "toy defaults apply on the toy world"
    assert erasure.resolve("circle", method="shift", output=str(out), target=3.0).config.target == 3.0


def test_resume_restores_parameters_optimiser_and_random_state(shift_registered, sd_folder, tmp_path, monkeypatch):
    kw = dict(model=sd_folder, steps=6, checkpoint_every=2, quiet=True)
    full = erasure.erase("a dog", method="shift", output=str(tmp_path / "full.safetensors"), **kw)
    calls = {"n": 0}
    original = Shift.loss

    def dying(self, gen):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5, after the step-4 checkpoint
            raise KeyboardInterrupt
        return original(self, gen)

    monkeypatch.setattr(Shift, "loss", dying)
    part = tmp_path / "part.safetensors"
    with pytest.raises(KeyboardInterrupt):
        erasure.erase("a dog", method="shift", output=str(part), **kw)
    assert not part.exists() and engine.checkpoint_path(part).exists()
    monkeypatch.setattr(Shift, "loss", original)
    resumed = erasure.erase("a dog", method="shift", output=str(part), resume=True, **kw)
    assert resumed.record["loss"] == full.record["loss"]
    assert torch.equal(load_artifact(part).tensors["shift"], load_artifact(full.artifact).tensors["shift"])
    assert not engine.checkpoint_path(part).exists(), "the checkpoint goes once the artifact is written"


def test_library_options_are_checked_like_the_flags(tmp_path):
    with pytest.raises(UserError, match="--alpha is not an option of --method esd"):
        erasure.resolve("circle", method="esd", alpha=0.5)
    with pytest.raises(UserError, match="must be an integer"):
        erasure.resolve("circle", method="esd", steps="many")
    with pytest.raises(UserError, match="unknown method 'nope'"):
        erasure.resolve("circle", method="nope")
    with pytest.raises(UserError, match="not a choice of --method esd"):
        erasure.resolve("circle", method="esd", variant="xattn")
    plan = erasure.resolve("circle", method="esd", prompts=["a circle", "a ball"], lr=1)  # an int where a float goes
    assert plan.concept.prompts == ("a circle", "a ball") and plan.config.lr == 1.0 and isinstance(plan.config.lr, float)
    assert plan.output.name == "circle-esd.safetensors" and not plan.folder
    assert erasure.resolve("circle", method="sfd").folder


def test_help_lists_the_methods_and_each_methods_options_with_one_default():
    run = lambda *a: subprocess.run([sys.executable, "-m", "erasure.train", *a], capture_output=True, text=True)  # noqa: E731
    plain = run("--help")
    assert plain.returncode == 0
    for name, cls in METHODS.items():
        assert f"  {name} " in plain.stdout and cls.title in plain.stdout
    assert "--ddim-steps" not in plain.stdout, "method options only with --method"
    spm = run("--method", "spm", "--help").stdout
    assert "--anchor-weight" in spm and "--variant" not in spm
    for line in spm.replace("\n                        ", " ").splitlines():
        assert line.count("[default:") <= 1, line
    assert "iterations (App. C.1: 3000; nudity 15K) [default: 3000]" in " ".join(spm.split())


def test_constructors_write_no_files(tmp_path, monkeypatch):
    """SalUn computes its mask at θ₀ when asked (the engine writes it beside the artifact), not in its constructor."""
    monkeypatch.chdir(tmp_path)
    cfg = SalUnConfig(forget_images=4, retain_images=4, batch_size=2, mask_batches=1)
    method = SalUn(pipelines.load("toy"), concepts.resolve("circle"), cfg, Context(quiet=True))
    assert method.mask is None and not list(tmp_path.rglob("*"))
    mask = method.compute_mask()
    assert 0.4 < mask.fraction < 0.6 and not list(tmp_path.rglob("*"))


def test_every_method_keeps_its_config_and_toy_defaults_in_its_own_file():
    for name, cls in METHODS.items():
        assert cls.name == name and cls.__module__ == f"erasure.methods.{name}"
        assert cls.config_class.__module__ == cls.__module__
        field_names = {f for f in cls.config_class.__dataclass_fields__}
        assert set(cls.toy_defaults) <= field_names, f"{name}: toy defaults name unknown fields"
        # a trained method has the shared training options; a closed-form one (UCE, RECE) has none of them
        assert {"steps", "lr", "batch_size"} <= field_names or not {"steps", "lr", "batch_size"} & field_names
