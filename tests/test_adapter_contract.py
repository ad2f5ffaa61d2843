"""One contract for every artifact kind the toolkit ships, checked through ``pipelines.apply`` on tiny real diffusers
pipelines (peft's ``testing_common`` recipe): a zero artifact changes nothing; apply → remove restores the pipeline
bit for bit (weights, module tree, hooks, images); merge/unmerge where the kind supports it; a file made for another
base model is refused in one line with the pipeline untouched; dtype and device moves keep all of that.

Kinds: ``weight_delta`` (ESD, SalUn), ``membrane`` (SPM; gated per prompt by facilitated transport, or at a fixed γ),
``saliency_mask`` (SalUn's mask: it confines training and changes no model, so ``apply`` refuses it — checked here).
An SFD student is a pipeline folder of its own, not an adapter: skipped with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pipelines
from adapters import membrane
from adapters.artifact import module_fingerprint, save_artifact
from adapters.errors import UserError
from adapters.saliency import SaliencyMask
from pipelines.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a dog", "a red car"]  # the membrane's concept, and a prompt that names none of it


class Kind:
    """How to make one kind of artifact for a pipeline's UNet, and how ``apply`` treats it."""

    name: str
    applies = True  # pipelines.apply puts it on a pipeline (else it refuses it)
    apply_kwargs: dict = {}

    def tensors(self, unet, zero: bool, seed: int) -> tuple[dict, dict]:
        raise NotImplementedError

    def make(self, path, unet, *, zero: bool = False, seed: int = 0, fingerprint: str | None = None):
        tensors, meta = self.tensors(unet, zero, seed)
        if fingerprint is not None:
            meta["base_model"]["fingerprint"] = fingerprint
        return save_artifact(path, tensors, meta)

    def __repr__(self) -> str:
        return self.name


class WeightDelta(Kind):
    """Δθ on some of the UNet's weights: cross-attention keys inside the transformer blocks, the input conv."""

    name = "weight_delta"

    def tensors(self, unet, zero, seed):
        g = torch.Generator().manual_seed(seed)
        names = [n for n, _ in unet.named_parameters() if n.endswith("attn2.to_k.weight")] + ["conv_in.weight"]
        params = dict(unet.named_parameters())
        tensors = {n: torch.zeros(params[n].shape) if zero else torch.randn(params[n].shape, generator=g) * 0.05
                   for n in names}
        meta = {"kind": "weight_delta", "method": "esd", "target": "unet",
                "base_model": {"id": "tiny", "fingerprint": module_fingerprint(unet, names)}}
        return tensors, meta


class Membrane(Kind):
    """An SPM membrane on every transformer-block layer; ``zero``: as freshly attached (lora_up = 0)."""

    name = "membrane"

    def __init__(self, transport: bool = True):
        self.apply_kwargs = {"transport": transport}
        self.name = "membrane" if transport else "membrane_fixed_gamma"

    def tensors(self, unet, zero, seed):
        g = torch.Generator().manual_seed(seed)
        branches = membrane.attach(unet, "contract", generator=g)
        try:
            if not zero:
                with torch.no_grad():
                    for b in branches.values():
                        b.lora_up.weight.copy_(torch.randn(b.lora_up.weight.shape, generator=g) * 0.5)
            tensors = {k: v.clone() for k, v in membrane.state_dict(unet, "contract").items()}
        finally:
            membrane.detach(unet, "contract")
        meta = {"kind": "membrane", "method": "spm", "targets": [PROMPTS[0]], "prompts": [PROMPTS[0]],
                "base_model": {"id": "tiny", "fingerprint": membrane.layers_fingerprint(unet)}}
        return tensors, meta


class Mask(Kind):
    """A SalUn saliency mask (bool per weight)."""

    name = "saliency_mask"
    applies = False

    def tensors(self, unet, zero, seed):
        g = torch.Generator().manual_seed(seed)
        names = [n for n, _ in unet.named_parameters() if n.endswith("attn2.to_k.weight")]
        params = dict(unet.named_parameters())
        masks = {n: torch.rand(params[n].shape, generator=g) < (0.0 if zero else 0.5) for n in names}
        meta = {"kind": "saliency_mask", "fraction": 0.5,
                "base_model": {"id": "tiny", "fingerprint": module_fingerprint(unet, names)}}
        return SaliencyMask(masks).masks, meta


APPLIED = [WeightDelta(), Membrane(transport=True), Membrane(transport=False)]
KINDS = [*APPLIED, Mask(), pytest.param(None, id="sfd_student", marks=pytest.mark.skip(
    reason="an SFD one-step student is a pipeline folder of its own (pipelines.load), not an adapter put on one"))]
APPLIED_IDS = [k.name for k in APPLIED]


# ---------------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def sd1():
    return tiny_sd_pipeline("sd1")


@pytest.fixture(scope="module")
def toy():
    return pipelines.load("toy")


@pytest.fixture(scope="module")
def base(sd1, toy):
    """The untouched pipelines' weights, images and latents, computed once: every test must leave them so."""
    return {name: {"snapshot": _snapshot(pipe), "images": _images(pipe), "latents": _latents(pipe)}
            for name, pipe in (("tiny_sd1", sd1), ("toy", toy))}


def _images(pipe) -> np.ndarray:
    """Two images (2 DDIM steps, CFG), as float arrays in [0, 1]."""
    return _generate(pipe, "np")


def _latents(pipe) -> np.ndarray:
    """The same generation's final latents: what the images decode from (no artifact touches the VAE), cheaper."""
    return _generate(pipe, "latent").float().cpu().numpy()


def _generate(pipe, output_type: str):
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe(PROMPTS, num_inference_steps=2, guidance_scale=5.0, height=size, width=size, output_type=output_type,
                generator=[torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]).images


def _snapshot(pipe) -> dict:
    """Everything apply may change: every component's weights (values, dtypes), module tree and hooks."""
    out = {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        out[name] = {
            "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "tree": [(n, type(m).__name__) for n, m in module.named_modules()],
            "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()),
        }
    return out


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        b, a = before[name], after[name]
        assert a["tree"] == b["tree"], f"{name}: module tree changed"
        assert a["hooks"] == b["hooks"], f"{name}: hooks left behind"
        assert a["state"].keys() == b["state"].keys(), f"{name}: weights added or lost"
        for k, v in b["state"].items():
            assert a["state"][k].dtype == v.dtype and torch.equal(a["state"][k], v), f"{name}.{k} changed"


# ---------------------------------------------------------------------------------------------------------------
# the contract


@pytest.mark.parametrize("kind", APPLIED, ids=APPLIED_IDS)
def test_a_zero_artifact_is_an_exact_no_op(kind, sd1, base, tmp_path):
    """A freshly made artifact (zero delta; a membrane with its up-projection at zero) changes no output at all."""
    with pipelines.apply(sd1, kind.make(tmp_path / "zero.safetensors", sd1.unet, zero=True), **kind.apply_kwargs):
        assert np.array_equal(_images(sd1), base["tiny_sd1"]["images"])


@pytest.mark.parametrize("where", ["tiny_sd1", "toy"])
@pytest.mark.parametrize("kind", APPLIED, ids=APPLIED_IDS)
def test_apply_then_remove_is_exact(kind, where, request, base, tmp_path):
    pipe = request.getfixturevalue("sd1" if where == "tiny_sd1" else "toy")
    before, base = base[where]["snapshot"], base[where]["images"]
    handle = pipelines.apply(pipe, kind.make(tmp_path / "a.safetensors", pipe.unet), **kind.apply_kwargs)
    assert handle.pipe is pipe and handle.active
    assert np.abs(_images(pipe).astype(float) - base).max() > 1e-3, "the artifact changes the images"
    handle.remove()
    assert not handle.active
    _assert_same(before, _snapshot(pipe))
    assert np.array_equal(_images(pipe), base), "bit-identical images after remove()"
    handle.remove()  # documented: a second remove() does nothing
    _assert_same(before, _snapshot(pipe))


@pytest.mark.parametrize("kind", APPLIED, ids=APPLIED_IDS)
def test_merge_and_unmerge_where_supported(kind, sd1, base, tmp_path):
    """Fixed-γ membranes merge into the weights (outputs within float rounding) and unmerge exactly; a weight delta
    is in the weights already (merge does nothing); transport-gated membranes cannot be merged (one γ per prompt)."""
    handle = pipelines.apply(sd1, kind.make(tmp_path / "a.safetensors", sd1.unet), **kind.apply_kwargs)
    state = _snapshot(sd1)
    if isinstance(kind, WeightDelta):
        handle.merge()
        _assert_same(state, _snapshot(sd1))
    elif kind.apply_kwargs["transport"]:
        with pytest.raises(ValueError, match="transport=False"):
            handle.merge()
        _assert_same(state, _snapshot(sd1))
    else:
        unmerged = _latents(sd1)
        handle.merge()
        assert all(layer.merged for layer in membrane.membrane_layers(sd1.unet).values())
        np.testing.assert_allclose(_latents(sd1), unmerged, atol=2e-3)  # the same sums in another order
        handle.unmerge()
        _assert_same(state, _snapshot(sd1))
        assert np.array_equal(_latents(sd1), unmerged)
        handle.merge()
    handle.remove()  # straight from merged
    _assert_same(base["tiny_sd1"]["snapshot"], _snapshot(sd1))
    assert np.array_equal(_latents(sd1), base["tiny_sd1"]["latents"])


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name if isinstance(k, Kind) else None)
@pytest.mark.parametrize("other", ["sdxl_shapes", "fingerprint"])
def test_a_file_for_another_base_model_is_refused_in_one_line_and_changes_nothing(kind, other, sd1, base, tmp_path):
    """``sdxl_shapes``: made on an SDXL-shaped UNet (other layers and widths); ``fingerprint``: the same shapes but
    the metadata names another model. Refused even behind a good artifact in the same call: all are checked first."""
    if other == "sdxl_shapes":
        bad = kind.make(tmp_path / "other.safetensors", tiny_sdxl_pipeline().unet)
    else:
        bad = kind.make(tmp_path / "other.safetensors", sd1.unet, fingerprint="UNet2DConditionModel:0123456789abcdef")
    good = WeightDelta().make(tmp_path / "good.safetensors", sd1.unet, seed=3)
    with pytest.raises(UserError) as e:
        pipelines.apply(sd1, good, bad)
    msg = str(e.value)
    assert "\n" not in msg and "other.safetensors" in msg
    assert ("another base model" in msg) if kind.applies else ("--mask" in msg)
    _assert_same(base["tiny_sd1"]["snapshot"], _snapshot(sd1))


def test_a_mask_for_the_right_model_is_refused_too_saying_how_masks_are_used(sd1, tmp_path):
    path = Mask().make(tmp_path / "m.safetensors", sd1.unet)
    before = _snapshot(sd1)
    with pytest.raises(UserError, match=r"saliency mask.*erasure\.train .*--mask") as e:
        pipelines.apply(sd1, path)
    assert "\n" not in str(e.value)
    _assert_same(before, _snapshot(sd1))


@pytest.mark.parametrize("dtype", [torch.bfloat16])  # fp16: the CUDA test (fp16 convolutions are slow on a CPU)
@pytest.mark.parametrize("kind", APPLIED, ids=APPLIED_IDS)
def test_dtype_moves(kind, dtype, tmp_path):
    """Applied in fp32, the pipeline moved to ``dtype``, then removed: bit-identical to the base moved to ``dtype``.
    Applied to a pipeline already in ``dtype``: the artifact is cast to it, and remove() is exact there too."""
    pipe = tiny_sd_pipeline("sd1")
    path = kind.make(tmp_path / "a.safetensors", pipe.unet)
    handle = pipelines.apply(pipe, path, **kind.apply_kwargs)
    pipe.to(dtype)
    changed = _latents(pipe)
    assert all(p.dtype == dtype for p in pipe.unet.parameters())  # membrane branches moved with their layers
    handle.remove()
    reference = tiny_sd_pipeline("sd1").to(dtype)
    _assert_same(_snapshot(reference), _snapshot(pipe))
    base = _latents(pipe)
    assert np.array_equal(base, _latents(reference))
    assert np.abs(changed.astype(float) - base).max() > 1e-3

    before = _snapshot(pipe)
    with pipelines.apply(pipe, path, **kind.apply_kwargs):
        assert all(p.dtype == dtype for p in pipe.unet.parameters())
        again = _latents(pipe)  # cast at another step than above: the same change up to bf16 rounding
        assert np.corrcoef((again - base).ravel(), (changed - base).ravel())[0, 1] > 0.9
    _assert_same(before, _snapshot(pipe))  # the same weights and modules: the same outputs


@pytest.mark.gpu
@pytest.mark.parametrize("kind", APPLIED, ids=APPLIED_IDS)
def test_device_moves_on_cuda(kind, tmp_path):
    """Applied on the CPU, moved to CUDA in fp16, removed there: bit-identical to the base moved the same way; and
    applied and removed on CUDA directly."""
    pipe = tiny_sd_pipeline("sd1")
    path = kind.make(tmp_path / "a.safetensors", pipe.unet)
    handle = pipelines.apply(pipe, path, **kind.apply_kwargs)
    pipe.to("cuda", torch.float16)
    changed = _latents(pipe)
    handle.remove()
    reference = tiny_sd_pipeline("sd1").to("cuda", torch.float16)
    _assert_same(_snapshot(reference), _snapshot(pipe))
    base = _latents(pipe)
    assert np.array_equal(base, _latents(reference)) and np.abs(changed.astype(float) - base).max() > 1e-3
    with pipelines.apply(pipe, path, **kind.apply_kwargs):
        assert all(p.device.type == "cuda" for p in pipe.unet.parameters())
        assert not np.array_equal(_latents(pipe), base)
    _assert_same(_snapshot(reference), _snapshot(pipe))
    assert np.array_equal(_latents(pipe), base)


# ---------------------------------------------------------------------------------------------------------------
# several artifacts, several handles


def test_one_call_applies_a_mix_and_removes_it_exactly(sd1, base, tmp_path):
    """A weight delta on the cross-attention keys plus two membranes on the same layers, in one call."""
    files = [WeightDelta().make(tmp_path / "d.safetensors", sd1.unet),
             Membrane().make(tmp_path / "m1.safetensors", sd1.unet, seed=1),
             Membrane().make(tmp_path / "m2.safetensors", sd1.unet, seed=2)]
    before, base = base["tiny_sd1"]["snapshot"], base["tiny_sd1"]["latents"]
    handle = pipelines.apply(sd1, *files, scales=[1.0, 1.0, 0.5])
    assert membrane.membrane_names(sd1.unet) == ["m1", "m2"] and handle.membranes.transport is not None
    assert not np.array_equal(_latents(sd1), base)
    handle.remove()
    _assert_same(before, _snapshot(sd1))
    assert np.array_equal(_latents(sd1), base)


def test_handles_come_off_last_on_first_off_where_they_share_weights(sd1, tmp_path):
    delta = WeightDelta().make(tmp_path / "d.safetensors", sd1.unet)
    other = WeightDelta().make(tmp_path / "e.safetensors", sd1.unet, seed=5)
    mem = Membrane().make(tmp_path / "m.safetensors", sd1.unet)
    before = _snapshot(sd1)
    first = pipelines.apply(sd1, mem)
    second = pipelines.apply(sd1, delta)  # finds the keys inside the membrane wrappers
    third = pipelines.apply(sd1, other)
    with pytest.raises(RuntimeError, match="last on, first off"):
        second.remove()  # third changed the same weights since
    first.remove()  # membranes change no weights: they come off in any order
    third.remove()
    second.remove()
    _assert_same(before, _snapshot(sd1))


def test_apply_validates_its_arguments_before_changing_anything(sd1, tmp_path):
    path = WeightDelta().make(tmp_path / "d.safetensors", sd1.unet)
    before = _snapshot(sd1)
    with pytest.raises(UserError, match="one per artifact"):
        pipelines.apply(sd1, path, scales=[1.0, 2.0])
    with pytest.raises(UserError, match="not both"):
        pipelines.apply(sd1, path, scale=2.0, scales=[1.0])
    with pytest.raises(UserError, match="similarity"):
        pipelines.apply(sd1, path, Membrane().make(tmp_path / "m.safetensors", sd1.unet), similarity="cosine")
    _assert_same(before, _snapshot(sd1))
