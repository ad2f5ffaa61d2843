"""SDXL: packed text conditioning (pooled embedding and time ids behind the token rows), every method training on a
tiny SDXL pipeline, and SPM membranes under kohya's SDXL (SGM-layout) keys that plain diffusers loads."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import erasure
import pipelines
from adapters import membrane
from adapters.artifact import load_artifact, save_artifact
from erasure.methods.base import ddim_sampler, ddim_steps
from erasure.train import main
from pipelines.one_step import OneStepPipeline
from pipelines.testing import save_tiny, tiny_sdxl_pipeline
from pipelines.text import denoise, encode, pack, token_rows, unpack, with_tokens

CONCEPT = "a red car"
OPTIONS = {  # one step, tiny options: (method, options)
    "esd": {"ddim_steps": 2, "lr": 1e-3},
    "salun": {"batch_size": 2, "forget_images": 2, "retain_images": 2, "sample_steps": 2, "lr": 1e-3,
              "substitute": "a blue bus", "mask_batches": 1, "variant": "xattn"},
    "spm": {"ddim_steps": 2, "lr": 1e-2},
    "sfd": {"batch_size": 2, "prompt_pool": 4, "lr": 1e-4, "lr_fake": 1e-4, "concept_override": "a blue bus",
            "cfg_train_fake": 1.0, "cfg_eval_fake": 1.0, "cfg_eval_real": 1.0},  # one UNet pass per score (ESD / SPM: CFG)
}


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    save_tiny(tiny_sdxl_pipeline(), folder)
    return str(folder)


@pytest.fixture(scope="module")
def xl_membrane(xl_folder, tmp_path_factory):
    """A membrane trained for 2 steps by the CLI on the SDXL folder, and a copy with lora_up randomised (visible)."""
    out = tmp_path_factory.mktemp("spm-xl") / "car.safetensors"
    assert main(["--concept", CONCEPT, "--model", xl_folder, "--method", "spm", "--steps", "2", "--ddim-steps", "2",
                 "--output", str(out), "--quiet"]) == 0
    art = load_artifact(out)
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.1 if "lora_up" in k else v for k, v in art.tensors.items()}
    visible = out.with_name("car-visible.safetensors")
    save_artifact(visible, tensors, art.metadata, extra_strings={k: art.raw_metadata[k] for k in ("prompts", "rank", "alpha")})
    return out, visible


def _image(pipe, prompt=CONCEPT, seed=0):
    return pipe([prompt], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(seed)).images


# -- packed conditioning -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_round_trip_keeps_tokens_pooled_and_exact_time_ids(dtype):
    unet = tiny_sdxl_pipeline().unet  # pooled width 32, token width 64 → one packed row
    g = torch.Generator().manual_seed(0)
    tokens, pooled = torch.randn(2, 77, 64, generator=g), torch.randn(2, 32, generator=g)
    ids = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [832, 1216, 0, 0, 896, 1152]])
    cond = pack(tokens, pooled, ids).to(dtype)  # as a mixed-precision run may store it
    assert cond.shape == (2, 78, 64)
    got, added = unpack(cond, unet)
    assert torch.equal(got, tokens.to(dtype)) and torch.equal(added["text_embeds"], pooled.to(dtype))
    assert added["time_ids"].dtype == torch.float32 and torch.equal(added["time_ids"], ids)
    assert torch.equal(token_rows(cond, unet), got)
    assert torch.equal(with_tokens(got[:1].expand(3, -1, -1), cond[1:], unet), torch.cat([got[:1], cond[1:, 77:]], 1).expand(3, -1, -1))


def test_denoise_is_the_unets_call_with_sdxls_added_conditioning():
    pipe = tiny_sdxl_pipeline()
    cond = encode(pipe, [CONCEPT, ""])
    embeds, _, pooled, _ = pipe.encode_prompt([CONCEPT, ""], device="cpu", do_classifier_free_guidance=False)
    ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, 32).expand(2, -1)  # the pipeline's own
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    with torch.no_grad():
        ours = denoise(pipe.unet, x, t, cond)
        theirs = pipe.unet(x, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    assert cond.shape == (2, 78, 64) and torch.equal(ours, theirs)


def test_training_sampler_follows_the_sdxl_pipeline():
    """Without CFG the methods' DDIM sampling (``ddim_steps`` through ``denoise``) is the SDXL pipeline's own."""
    pipe = tiny_sdxl_pipeline()
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    cond = encode(pipe, [CONCEPT, "a blue bus"])
    sched = ddim_sampler(pipe)
    sched.set_timesteps(3)
    ours = ddim_steps(pipe.unet, sched, z.clone(), cond, cond, sched.timesteps, 1.0)
    theirs = pipe([CONCEPT, "a blue bus"], latents=z.clone(), num_inference_steps=3, guidance_scale=1.0,
                  output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-5)


# -- every method on SDXL ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["esd", "salun", "spm"])
def test_one_step_of_each_method_changes_the_sdxl_pipelines_images(method, xl_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ERASURE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / f"{method}.safetensors"
    result = erasure.erase(CONCEPT, method=method, model=xl_folder, output=str(out), steps=1, quiet=True,
                           **OPTIONS[method])
    assert load_artifact(result.artifact).metadata["method"] == method
    base = _image(pipelines.load(xl_folder))
    pipe = pipelines.load(xl_folder)
    pipelines.apply(pipe, result.artifact, transport=False)
    assert base.shape == (1, 64, 64, 3) and abs(_image(pipe) - base).max() > 1e-4


def test_sfd_student_of_an_sdxl_pipeline_round_trips_as_a_folder(xl_folder, tmp_path):
    out = tmp_path / "car-sfd"
    result = erasure.erase(CONCEPT, method="sfd", model=xl_folder, output=str(out), steps=1, quiet=True,
                           **OPTIONS["sfd"])
    student = pipelines.load(result.artifact)
    assert isinstance(student, OneStepPipeline) and student.text_encoder_2 is not None
    images = _image(student)
    assert images.shape == (1, 64, 64, 3)
    again = tmp_path / "again"
    student.save_pretrained(again, safe_serialization=True)
    assert abs(_image(pipelines.load(again)) - images).max() < 1e-6
    # the student's own prompt encoding is the packed one the training used
    assert torch.equal(encode(student, [CONCEPT]), encode(pipelines.load(xl_folder), [CONCEPT]))


# -- membranes in kohya's SDXL key layout -----------------------------------------------------------------------------


def test_sdxl_membrane_is_saved_under_sgm_layout_keys(xl_membrane):
    art = load_artifact(xl_membrane[0])
    blocks = {k.split("_transformer_blocks")[0].split("_proj_")[0] for k in art.tensors}
    # tiny SDXL (layers_per_block 2; down blocks 1 and 2, up blocks 0 and 1 carry transformers) = real SDXL's blocks
    assert blocks == {f"lora_unet_input_blocks_{i}_1" for i in (4, 5, 7, 8)} | {"lora_unet_middle_block_1"} | {
        f"lora_unet_output_blocks_{i}_1" for i in range(6)}
    assert art.metadata["layers"] == len(membrane.target_layers(tiny_sdxl_pipeline().unet)) == len(art.tensors) // 3


def test_plain_diffusers_loads_an_sdxl_membrane_like_apply(xl_folder, xl_membrane):
    base = _image(pipelines.load(xl_folder))
    ours = pipelines.load(xl_folder)
    pipelines.apply(ours, xl_membrane[1], transport=False)  # γ = 1, as a plain LoRA
    theirs = StableDiffusionXLPipeline.from_pretrained(xl_folder)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(xl_membrane[1]))
    assert sum(1 for m in theirs.unet.modules() if getattr(m, "lora_A", None)) == len(load_artifact(xl_membrane[1]).tensors) // 3
    a, b = _image(ours), _image(theirs)
    assert abs(a - base).max() > 1e-2 and abs(a - b).max() < 1e-4


def test_older_sdxl_membranes_in_the_diffusers_layout_still_load(xl_folder, xl_membrane, tmp_path):
    art = load_artifact(xl_membrane[1])
    to_path = membrane.kohya_to_paths(tiny_sdxl_pipeline().unet)
    old = {}
    for key, t in art.tensors.items():
        prefix, part = key.split(".", 1)
        old[f"{membrane.kohya_prefix(to_path[prefix])}.{part}"] = t  # the diffusers layout: lora_unet_down_blocks_…
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0") for k in old)
    ours, legacy = pipelines.load(xl_folder), pipelines.load(xl_folder)
    pipelines.apply(ours, xl_membrane[1], transport=False)
    extra = {k: art.raw_metadata[k] for k in ("prompts", "rank", "alpha")}
    pipelines.apply(legacy, save_artifact(tmp_path / "old.safetensors", old, art.metadata, extra_strings=extra),
                    transport=False)
    assert abs(_image(ours) - _image(legacy)).max() == 0
