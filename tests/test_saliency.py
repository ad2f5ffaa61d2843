"""Saliency masks: the threshold is exact, gradients are gated, masked-out weights never move, files validate."""

import pytest
import torch
from torch import nn

from adapters.errors import UserError
from adapters.saliency import SaliencyMask, accumulate_gradients, compute_mask, kth_largest, load_mask, threshold


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _loss_fn(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(8, 6, generator=g) for _ in range(4)]
    return lambda i: model(xs[i % 4]).pow(2).mean()


@pytest.mark.parametrize("k", [1, 7, 500, 999, 1000])
def test_kth_largest_is_exact(k):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(600, generator=g), torch.randn(20, 20, generator=g)
    a[:50] = 0.0  # zeros and ties
    b[0, :10] = 0.25
    want = torch.cat([a.abs(), b.abs().flatten()]).sort(descending=True).values[k - 1]
    assert kth_largest([a, b], k) == want


def test_global_threshold_keeps_the_fraction_of_largest_scores():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(100, 10, generator=g) * 10, "b": torch.randn(1000, generator=g) * 3}
    m = threshold(scores, 0.3)
    assert sum(int(v.sum()) for v in m.values()) == 600  # 30 % of 2000, continuous scores: no ties
    # one global cut: the large-scale tensor keeps far more than the small one
    assert m["a"].float().mean() > 0.5 > m["b"].float().mean()
    smallest_kept = min(scores[n][m[n]].abs().min() for n in m)
    largest_dropped = max(scores[n][~m[n]].abs().max() for n in m)
    assert smallest_kept > largest_dropped
    per = threshold(scores, 0.3, per_layer=True)
    assert int(per["a"].sum()) == 300 and int(per["b"].sum()) == 300
    assert all(v.all() for v in threshold(scores, 1.0).values())
    with pytest.raises(UserError, match="fraction"):
        threshold(scores, 0.0)


def test_gradients_are_summed_signed_as_the_salun_code():
    model = _mlp()
    fn = _loss_fn(model)
    total = accumulate_gradients(model, fn, 3, quiet=True)
    assert all(p.grad is None and p.requires_grad for p in model.parameters()), "no gradients left behind"
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(3):
        model.zero_grad()
        fn(i).backward()
        for n, p in model.named_parameters():
            want[n] += p.grad
    assert all(torch.allclose(total[n], want[n], atol=1e-6) for n in want)


def test_masked_training_moves_only_the_salient_weights():
    model = _mlp()
    mask = compute_mask(model, _loss_fn(model), 4, fraction=0.5, quiet=True)
    assert abs(mask.fraction - 0.5) < 0.01
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    fn = _loss_fn(model, seed=2)
    with mask.applied(model):
        for i in range(20):
            opt.zero_grad()
            fn(i).backward()
            opt.step()
    for n, p in model.named_parameters():
        m = mask.masks[n]
        assert torch.equal(p.detach()[~m], before[n][~m]), f"{n}: a masked-out weight moved"
        assert (p.detach()[m] != before[n][m]).float().mean() > 0.9, f"{n}: salient weights should train"
    # the hooks are gone after the context: everything trains again
    opt.zero_grad()
    fn(0).backward()
    assert all((p.grad != 0).float().mean() > 0.9 for n, p in model.named_parameters() if p.ndim > 1)


def test_mask_file_round_trip_and_validation(tmp_path):
    model = _mlp()
    mask = compute_mask(model, _loss_fn(model), 2, fraction=0.25, quiet=True, metadata={"concept": "circle"})
    path = mask.save(tmp_path / "m.safetensors", prompts=["a circle"])
    loaded = load_mask(path, model)
    assert set(loaded.masks) == set(mask.masks)
    assert all(loaded.masks[n].dtype == torch.bool and torch.equal(loaded.masks[n], mask.masks[n]) for n in mask.masks)
    assert loaded.metadata["concept"] == "circle" and loaded.metadata["fraction"] == 0.25
    assert loaded.metadata["base_model"]["fingerprint"].startswith("Sequential:")
    summary = loaded.summary(path)
    assert summary["bytes_on_disk"] < 2000 and abs(summary["kept_fraction"] - 0.25) < 0.01
    assert set(summary["kept_per_block"]) == {"0", "2"}
    with pytest.raises(UserError, match="another base model"):
        load_mask(path, nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 3)))
    from adapters.artifact import save_artifact

    floats = save_artifact(tmp_path / "f.safetensors", {"0.weight": torch.ones(16, 6)}, {"kind": "saliency_mask"})
    with pytest.raises(UserError, match="expected bool"):
        load_mask(floats)
    delta = save_artifact(tmp_path / "d.safetensors", {"0.weight": torch.ones(16, 6)}, {"kind": "weight_delta"})
    with pytest.raises(UserError, match="expected saliency_mask"):
        load_mask(delta)


def test_restricting_a_mask_freezes_what_it_does_not_cover():
    model = _mlp()
    mask = SaliencyMask({"0.weight": torch.ones(16, 6, dtype=torch.bool)})
    r = mask.restricted(["0.weight", "2.weight"])
    assert r.metadata["uncovered"] == ["2.weight"]
    g = torch.ones(3, 16)
    assert torch.equal(r.gate("2.weight", g), torch.zeros_like(g))
    assert torch.equal(r.gate("0.weight", torch.ones(16, 6)), torch.ones(16, 6))
    assert model is not None
