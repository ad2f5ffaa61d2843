"""The membrane adapter's contract (peft-style): wraps its base layer, no-op at init, merge ≡ unmerged, unmerge and
detach restore the original exactly, works in fp32 and bf16, per-sample gates."""

import pytest
import torch
from torch import nn

from adapters import membrane
from pipelines.testing import tiny_sd_pipeline


@pytest.fixture(scope="module")
def unet():
    return tiny_sd_pipeline("sd1").unet


def _inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 4, 8, 8, generator=g).to(unet.dtype)
    ehs = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(unet.dtype)
    return z, torch.tensor([500] * batch), ehs


def _out(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def _randomise(unet, name, seed=1):
    g = torch.Generator().manual_seed(seed)
    for layer in membrane.membrane_layers(unet).values():
        up = layer.membranes[name].lora_up.weight
        with torch.no_grad():
            up.copy_(torch.randn(up.shape, generator=g).to(up.dtype) * 0.05)


def test_sd1_layout_has_192_target_layers_and_424k_parameters():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the real SD 1.x UNet shape, without allocating its 860 M weights
        sd14 = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    branches = membrane.attach(sd14, "m")
    assert len(branches) == 192
    assert sum(p.numel() for b in branches.values() for p in b.parameters()) == 423_936


def test_fresh_membrane_is_an_exact_no_op_and_wraps_its_base(unet):
    x = _inputs(unet)
    base = _out(unet, x)
    original = dict(unet.named_modules())
    branches = membrane.attach(unet, "m")
    try:
        assert all(isinstance(original[p], (nn.Linear, nn.Conv2d)) for p in branches)
        for path in branches:
            layer = unet.get_submodule(path)
            assert isinstance(layer, membrane.MembraneLayer) and layer.base_layer is original[path]
        assert torch.equal(_out(unet, x), base)
    finally:
        membrane.detach(unet)


def test_merge_equals_unmerged_and_unmerge_restores(unet):
    x = _inputs(unet)
    base = _out(unet, x)
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    membrane.attach(unet, "m")
    try:
        _randomise(unet, "m")
        membrane.set_gates(unet, {"m": 0.7})
        unmerged = _out(unet, x)
        assert (unmerged - base).abs().max() > 1e-2, "the membrane changes the output"
        membrane.merge(unet)
        assert torch.allclose(_out(unet, x), unmerged, atol=1e-4)  # fp32 summation order differs with threads
        membrane.unmerge(unet)
        assert torch.allclose(_out(unet, x), unmerged, atol=1e-4)
    finally:
        membrane.detach(unet)
    assert unet.state_dict().keys() == weights.keys(), "detach restores the original module tree"
    for k, v in unet.state_dict().items():
        assert torch.allclose(v, weights[k], atol=1e-6), k
    assert torch.allclose(_out(unet, x), base, atol=1e-4)  # weights within 1e-6; rounding compounds over layers


def test_per_sample_gates_and_linearity(unet):
    x = _inputs(unet, batch=3)
    base = _out(unet, x)
    membrane.attach(unet, "m")
    try:
        _randomise(unet, "m")
        full = _out(unet, x)
        membrane.set_gates(unet, {"m": torch.tensor([0.0, 1.0, 0.0])})
        gated = _out(unet, x)
        assert torch.equal(gated[0], base[0]) and torch.equal(gated[2], base[2])
        assert torch.allclose(gated[1], full[1], atol=1e-6)
        # linear in γ at the layer level (paper Eq. 9)
        layer = next(iter(membrane.membrane_layers(unet).values()))
        inp = torch.randn(2, 5, layer.base_layer.in_features) if isinstance(layer.base_layer, nn.Linear) else \
            torch.randn(2, layer.base_layer.in_channels, 4, 4)
        outs = {}
        for g in (0.0, 0.5, 1.0):
            layer.gates["m"] = g
            outs[g] = layer(inp).detach()
        assert torch.allclose(outs[0.5], (outs[0.0] + outs[1.0]) / 2, atol=1e-5)
    finally:
        membrane.detach(unet)


def test_two_membranes_stack_and_detach_one(unet):
    x = _inputs(unet)
    membrane.attach(unet, "a")
    membrane.attach(unet, "b")
    try:
        _randomise(unet, "a", 1)
        _randomise(unet, "b", 2)
        both = _out(unet, x)
        membrane.detach(unet, "b")
        only_a = _out(unet, x)
        assert membrane.membrane_names(unet) == ["a"] and not torch.allclose(both, only_a)
    finally:
        membrane.detach(unet)
    assert not membrane.membrane_layers(unet)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_stacked_membranes_compute_the_sum_of_their_branches(kind):
    """Several active membranes run fused (two matmuls); the result is Σ_c γ_c s_c U_c D_c x, per-sample γ too."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(12, 10, 1)
    layer = membrane.MembraneLayer(base)
    x = torch.randn(3, 5, 12) if kind == "linear" else torch.randn(3, 12, 4, 4)
    gates = {"a": 1.0, "b": torch.tensor([0.0, 0.5, 1.0]), "c": 0.3}
    for i, name in enumerate(gates):
        branch = layer.add(name, rank=1 + i, alpha=2.0)
        nn.init.normal_(branch.lora_up.weight)
        layer.gates[name] = gates[name]
    expected = base(x)
    for name, branch in layer.membranes.items():
        d = branch(x)
        expected = expected + membrane._broadcast_gate(gates[name], d) * d
    out = layer(x)
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()
    assert all(b.lora_up.weight.grad is not None and b.lora_down.weight.grad is not None for b in layer.membranes.values())


def test_detaching_a_merged_membrane_takes_it_out_of_the_weights(unet):
    x = _inputs(unet)
    base = _out(unet, x)
    membrane.attach(unet, "merged_one")
    _randomise(unet, "merged_one")
    membrane.merge(unet)
    assert not torch.allclose(_out(unet, x), base)
    membrane.detach(unet)
    assert not membrane.membrane_layers(unet)
    assert torch.allclose(_out(unet, x), base, atol=5e-4)  # fp32 summation order differs with threads


def test_merge_and_unload_leaves_an_ordinary_unet_with_the_membrane_in_its_weights(unet):
    x = _inputs(unet)
    original = {n: p.detach().clone() for n, p in unet.named_parameters()}
    membrane.attach(unet, "baked")
    _randomise(unet, "baked")
    with_membrane = _out(unet, x)
    membrane.merge_and_unload(unet)
    try:
        assert not membrane.membrane_layers(unet)
        assert {n for n, _ in unet.named_parameters()} == set(original)
        assert torch.allclose(_out(unet, x), with_membrane, atol=5e-4)  # fp32 summation order differs with threads
    finally:
        with torch.no_grad():
            for n, p in unet.named_parameters():
                p.copy_(original[n])


def test_bf16(unet):
    u = tiny_sd_pipeline("sd1").unet.to(torch.bfloat16)
    x = _inputs(u)
    base = _out(u, x)
    membrane.attach(u, "m")
    assert torch.equal(_out(u, x), base)
    _randomise(u, "m")
    unmerged = _out(u, x)
    membrane.merge(u)
    assert (_out(u, x).float() - unmerged.float()).abs().max() < 0.1  # bf16 rounding
    membrane.unmerge(u)
    membrane.detach(u)
    assert all(p.dtype == torch.bfloat16 for p in u.parameters())


def test_kohya_keys(unet):
    membrane.attach(unet, "m")
    try:
        sd = membrane.state_dict(unet, "m")
        key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        assert sd[f"{key}.lora_down.weight"].shape == (1, unet.config.cross_attention_dim)
        assert sd[f"{key}.alpha"].item() == 1.0 and len(sd) == 3 * 192
    finally:
        membrane.detach(unet)
