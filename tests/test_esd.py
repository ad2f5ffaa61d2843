"""ESD: the loss is the paper's equation, the variants select the paper's parameters, and the artifact round-trips."""

import pytest
import torch

import pipelines
from adapters.artifact import load_artifact
from erasure import concepts
from accelerate import Accelerator

from erasure.engine import fit
from erasure.methods.base import Context
from erasure.methods.esd import ESD, ESDConfig, esd_loss, select_parameters
from pipelines.testing import tiny_sd_pipeline, tiny_sdxl_pipeline


def test_loss_is_equation_5():
    g = torch.Generator().manual_seed(0)
    e_theta, e_c, e_null = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    want = ((e_theta - (e_null - 2.0 * (e_c - e_null))) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(esd_loss(e_theta, e_c, e_null, eta=2.0), want)
    # at the target the loss is zero
    assert esd_loss(e_null - (e_c - e_null), e_c, e_null, 1.0).abs().max() < 1e-6


def test_variants_select_the_papers_parameters():
    unet = tiny_sd_pipeline("sd1").unet
    x = select_parameters(unet, "esd-x")
    u = select_parameters(unet, "esd-u")
    assert x and all(".attn2." in n for n in x)
    assert {n.split(".attn2.")[1] for n in x} >= {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"}
    assert u and not any(".attn2." in n or n.startswith(("time_embedding", "conv_out", "conv_norm_out")) for n in u)
    assert any("resnets" in n for n in u) and any(".attn1." in n for n in u)
    assert set(x).isdisjoint(u)
    assert all(".attn1." in n for n in select_parameters(unet, "selfattn"))
    assert len(select_parameters(unet, "full")) == len(list(unet.parameters()))


@pytest.mark.parametrize("variant", ["esd-x", "esd-u"])
def test_training_changes_only_the_selected_weights_and_the_delta_reproduces_them(tmp_path, variant):
    pipe = tiny_sd_pipeline("sd1")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    concept = concepts.resolve("a cartoon dog", "tiny")
    cfg = ESDConfig(variant=variant, steps=3, lr=1e-3, batch_size=2, ddim_steps=4)
    method = ESD(pipe, concept, cfg, Context())
    history = fit(method, steps=3, output=tmp_path / "a.safetensors", seed=0, accelerator=Accelerator(cpu=True),
                  quiet=True)
    assert len(history) == 3 and all(h > 0 for h in history)
    selected = set(select_parameters(pipe.unet, variant))
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= selected
    from adapters.artifact import save_artifact

    path = save_artifact(tmp_path / "a.safetensors", *method.artifact("tiny")[:2])
    art = load_artifact(path)
    assert art.kind == "weight_delta" and art.metadata["method"] == "esd"
    assert art.metadata["config"]["variant"] == variant and art.metadata["prompts"] == ["a cartoon dog"]
    fresh = tiny_sd_pipeline("sd1")
    pipelines.apply(fresh, path)
    for n, p in fresh.unet.named_parameters():
        assert torch.allclose(p, dict(pipe.unet.named_parameters())[n], atol=1e-6), n
    pipelines.apply(fresh, path, scale=-1.0)  # and it comes off again
    for n, p in fresh.unet.named_parameters():
        assert torch.allclose(p, before[n], atol=1e-6), n


def test_artifact_for_another_base_model_is_refused(tmp_path):
    from adapters.artifact import save_artifact
    from adapters.errors import UserError

    pipe = tiny_sd_pipeline("sd1")
    method = ESD(pipe, concepts.resolve("a cartoon dog", "tiny"), ESDConfig(steps=1), Context())
    path = save_artifact(tmp_path / "a.safetensors", *method.artifact("tiny")[:2])
    other = tiny_sdxl_pipeline()  # other cross-attention widths
    before = {n: p.clone() for n, p in other.unet.named_parameters()}
    with pytest.raises(UserError, match="another base model"):
        pipelines.apply(other, path)
    assert all(torch.equal(p, before[n]) for n, p in other.unet.named_parameters()), "left untouched"
