"""SPM (its losses: tests/test_losses.py): anchor sampling, the membrane file readable everywhere (ours, plain diffusers, the original
release's format), validation against the base model, and facilitated transport per prompt."""

import json

import pytest
import torch

import pipelines
from adapters import membrane
from adapters.artifact import load_artifact, save_artifact
from adapters.errors import UserError
from erasure.methods.base import Context
from erasure.methods.spm import SPM, SPMConfig, random_anchors
from erasure.train import main
from pipelines.text import encode
from pipelines.testing import save_tiny, tiny_sd_pipeline, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd1")
    save_tiny(tiny_sd_pipeline("sd1"), folder)
    return str(folder)


@pytest.fixture(scope="module")
def membrane_file(sd_folder, tmp_path_factory):
    """A membrane trained for 3 steps by the CLI, with lora_up randomised so that its effect is visible."""
    out = tmp_path_factory.mktemp("spm") / "dog.safetensors"
    assert main(["--concept", "a dog", "--model", sd_folder, "--method", "spm", "--steps", "3", "--ddim-steps", "3",
                 "--output", str(out), "--quiet"]) == 0
    art = load_artifact(out)
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.1 if "lora_up" in k else v for k, v in art.tensors.items()}
    extra = {k: art.raw_metadata[k] for k in ("prompts", "rank", "alpha")}
    visible = out.with_name("dog-visible.safetensors")
    save_artifact(visible, tensors, art.metadata, extra_strings=extra)
    return out, visible


def _image(pipe, prompt="a dog", seed=0):
    return pipe([prompt], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(seed)).images


def test_random_anchors_have_the_targets_norm_within_20_percent():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(77, 32, generator=g)
    a = random_anchors(target, 64, g)
    ratio = a.flatten(1).norm(dim=1) / target.norm()
    assert a.shape == (64, 77, 32) and ratio.min() >= 0.8 - 1e-5 and ratio.max() <= 1.2 + 1e-5


def test_artifact_is_kohya_keyed_with_our_metadata_and_the_originals_strings(membrane_file):
    art = load_artifact(membrane_file[0])
    assert art.kind == "membrane" and art.metadata["layers"] == 192 and len(art.tensors) == 3 * 192
    assert all(k.startswith("lora_unet_") for k in art.tensors)
    assert art.raw_metadata["prompts"] == "a dog" and art.raw_metadata["rank"] == "1"
    assert art.metadata["targets"] == ["a dog"]
    cfg = art.metadata["config"]
    assert (cfg["rank"], cfg["eta"], cfg["anchor_weight"]) == (1, 1.0, 1000.0)
    record = json.loads(membrane_file[0].with_suffix(".json").read_text())
    assert len(record["loss"]) == 3


def test_plain_diffusers_loads_our_file_completely_and_agrees(sd_folder, membrane_file):
    ours = pipelines.load(sd_folder)
    pipelines.attach_membranes(ours, [membrane_file[1]], transport=False)
    theirs = pipelines.load(sd_folder)
    theirs.load_lora_weights(str(membrane_file[1]))
    loaded = sum(1 for m in theirs.unet.modules() if getattr(m, "lora_A", None))
    assert loaded == 192, "every membrane layer (proj, attention, feed-forward) is loaded"
    g = torch.Generator().manual_seed(0)
    z, ehs, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([500, 900])
    with torch.no_grad():
        base = pipelines.load(sd_folder).unet(z, t, ehs).sample
        a, b = ours.unet(z, t, ehs).sample, theirs.unet(z, t, ehs).sample
    assert (a - base).abs().max() > 1e-2
    # the same noise predictions (a random tiny VAE amplifies 1e-6 differences in images, so compare ε here)
    assert (a - b).abs().max() <= 1e-5


def test_original_release_files_load_with_a_warning(sd_folder, membrane_file, tmp_path):
    from safetensors.torch import save_file

    art = load_artifact(membrane_file[1])
    original = tmp_path / "original.safetensors"
    save_file(art.tensors, str(original), metadata={"prompts": "a dog", "rank": "1", "alpha": "1.0"})
    pipe = pipelines.load(sd_folder)
    with pytest.warns(UserWarning, match="no concept-erasure metadata"):
        handle = pipelines.attach_membranes(pipe, [original], transport=False)
    assert handle.prompts[handle.names[0]] == ["a dog"]
    ref = pipelines.load(sd_folder)
    pipelines.attach_membranes(ref, [membrane_file[1]], transport=False)
    assert abs(_image(pipe) - _image(ref)).max() < 1e-6


def test_membrane_for_another_base_model_is_refused(membrane_file):
    pipe = tiny_sdxl_pipeline()
    with pytest.raises(UserError, match="another base model"):
        pipelines.attach_membranes(pipe, [membrane_file[0]])
    assert not membrane.membrane_layers(pipe.unet), "nothing attached"


def test_apply_attaches_and_detach_restores(sd_folder, membrane_file):
    base = _image(pipelines.load(sd_folder))
    pipe = pipelines.load(sd_folder)
    handle = pipelines.attach_membranes(pipe, [membrane_file[1]], transport=False)
    assert abs(_image(pipe) - base).max() > 1e-2
    handle.detach()
    assert abs(_image(pipe) - base).max() < 1e-6
    applied = pipelines.apply(pipelines.load(sd_folder), membrane_file[1])
    assert membrane.membrane_names(applied.pipe.unet) == ["dog-visible"]


def test_transport_gives_each_row_its_own_gate(sd_folder, membrane_file):
    pipe = pipelines.load(sd_folder)
    handle = pipelines.attach_membranes(pipe, [membrane_file[1], membrane_file[1]], scales=[1.0, 0.5])
    emb = encode(pipe, ["a dog", "a completely different prompt", ""])
    gates = handle.transport.gates_for(emb)
    a, b = gates[handle.names[0]], gates[handle.names[1]]
    assert a.shape == (3,) and a[0] == pytest.approx(1.0) and (a <= 1).all() and (a >= 0).all()
    assert torch.allclose(b, 0.5 * a)
    # under CFG the UNet sees [negative; positive] rows: each row gets its own γ, computed once per call
    seen = []
    hook = pipe.unet.register_forward_hook(lambda m, a, k: seen.append(
        {n: layer.gates[n].clone() for layer in list(membrane.membrane_layers(m).values())[:1] for n in layer.gates}))
    pipe(["a dog", "a cat"], num_inference_steps=2, output_type="np")
    hook.remove()
    assert len(seen) == 2 and all(g[handle.names[0]].shape == (4,) for g in seen)
    assert torch.equal(seen[0][handle.names[0]], seen[1][handle.names[0]])
    # the negative rows take their prompt's γ (one γ per prompt in both CFG branches, as the SPM code)
    g = seen[0][handle.names[0]]
    assert torch.equal(g[:2], g[2:]) and g[2] == pytest.approx(1.0) and g[3] < 1, g
    # pair_negatives=False: each negative row is scored by its own text: both empty negatives alike
    handle.transport.pair_negatives = False
    seen.clear()
    hook = pipe.unet.register_forward_hook(lambda m, a, k: seen.append(
        {n: layer.gates[n].clone() for layer in list(membrane.membrane_layers(m).values())[:1] for n in layer.gates}))
    pipe(["a dog", "a cat"], num_inference_steps=1, output_type="np")
    hook.remove()
    g = seen[0][handle.names[0]]
    assert g[0] == g[1] and g[0] < 1 and g[2] == pytest.approx(1.0), g
    handle.detach()


def test_transport_scores_every_row_of_a_large_batch(sd_folder, membrane_file):
    """Token overlap needs the rows' token ids: every row of a batch larger than any fixed memory must be found (a
    64-row memory once lost all but the negative prompts of a 128-prompt batch and fell back to s_f)."""
    pipe = pipelines.load(sd_folder)
    handle = pipelines.attach_membranes(pipe, [membrane_file[1]], pair_negatives=False)
    seen = []
    hook = pipe.unet.register_forward_hook(lambda m, a, k: seen.append(
        next(iter(membrane.membrane_layers(m).values())).gates[handle.names[0]].clone()))
    prompts = ["a photo of a dog"] * 40 + ["a cat"] * 40  # "a photo of a dog" holds every token of "a dog": s_t = 1
    pipe(prompts, num_inference_steps=1, output_type="np")
    hook.remove()
    g = seen[0]
    assert g.shape == (160,) and torch.all(g[80:120] == 1.0) and torch.all(g[120:] < 1), g
    assert torch.all(g[:80] == g[0]) and g[0] < 1, "the 80 empty negative prompts: s_f alone"
    from adapters.transport import permeability

    assert permeability(encode(pipe, ["a photo of a dog"])[0], None, handle.transport.concepts[0]) < 1, "s_f alone"
    handle.detach()


def test_cfg_layout_needs_negatives_encoded_after_their_prompts():
    from adapters.transport import cfg_layout

    assert cfg_layout([2, 2, 1, 1]) and cfg_layout([4, 3, 2, 1])  # SDXL: te1, te2 for prompts, then negatives
    assert not cfg_layout([1, 1, 2, 2]) and not cfg_layout([1, 1]) and not cfg_layout([2, 0, 1, 1])
    assert not cfg_layout([2, 1, 1]) and not cfg_layout([])


def test_plain_diffusers_gives_the_toy_images_our_loader_gives(tmp_path):
    """Issue bar: images from ``load_lora_weights`` and from ``attach_membranes`` agree to 1e-4 on the toy world."""
    from diffusers import StableDiffusionPipeline

    from erasure.toyworld.paths import WEIGHTS_DIR

    out = tmp_path / "circle.safetensors"
    assert main(["--concept", "circle", "--model", "toy", "--method", "spm", "--steps", "1", "--ddim-steps", "2",
                 "--output", str(out), "--quiet", "--checkpoint-every", "0"]) == 0
    art = load_artifact(out)
    g = torch.Generator().manual_seed(1)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.05 if "lora_up" in k else v for k, v in art.tensors.items()}
    visible = tmp_path / "circle-visible.safetensors"
    save_artifact(visible, tensors, art.metadata, extra_strings={k: art.raw_metadata[k] for k in ("prompts", "rank", "alpha")})

    ours = pipelines.load("toy")
    pipelines.attach_membranes(ours, [visible], transport=False)
    theirs = StableDiffusionPipeline.from_pretrained(WEIGHTS_DIR / "pipeline", dtype=torch.float32, safety_checker=None)
    theirs.load_lora_weights(str(visible))
    assert sum(1 for m in theirs.unet.modules() if getattr(m, "lora_A", None)) == art.metadata["layers"]
    prompts = ["a red circle", "a sun", "a green square and a blue star"]

    def images(pipe):
        latents = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
        return pipe(prompts, num_inference_steps=10, latents=latents, output_type="np").images

    a, b, base = images(ours), images(theirs), images(pipelines.load("toy"))
    assert abs(a - base).max() > 0.05, "the membrane changes the images"
    assert abs(a - b).max() <= 1e-4


def test_training_is_reproducible_from_the_seed(tmp_path):
    """The membrane's lora_down initialisation comes from --seed (it used to come from torch's global RNG, so two
    runs with the same seed trained different membranes)."""
    argv = ["--concept", "circle", "--model", "toy", "--method", "spm", "--steps", "2", "--ddim-steps", "2", "--quiet",
            "--checkpoint-every", "0"]
    outs = [tmp_path / f"{i}.safetensors" for i in range(3)]
    torch.manual_seed(123)
    assert main([*argv, "--output", str(outs[0])]) == 0
    torch.manual_seed(456)  # another global RNG state: no effect
    assert main([*argv, "--output", str(outs[1])]) == 0
    assert main([*argv, "--seed", "1", "--output", str(outs[2])]) == 0
    a, b, c = (load_artifact(o).tensors for o in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_down" in k), "another seed, another membrane"


def test_caption_anchors_and_pairs_never_show_the_concept():
    """The toy anchors are captions of scenes without the concept; each pair names it once and is steered to its
    other object alone."""
    from erasure.concepts import resolve

    circle = resolve("circle")
    anchors = circle.anchor_captions(seed=0, n=200)
    assert len(anchors) == 200 and not any("circle" in a for a in anchors)
    assert any(" and " in a for a in anchors) and any("striped" in a for a in anchors), "pairs and fills are covered"
    for pair, other in circle.scene_pairs(50, seed=0):
        assert " and " in pair and pair.count("circle") == 1 and "circle" not in other
        assert all(word in pair for word in other.split()[1:]), (pair, other)
    swapped = circle.scene_pairs(5, seed=0, swap=True)
    assert all("circle" not in s and "square" in s for _, s in swapped)


def test_steer_swap_pairs_each_prompt_with_its_substitute_word():
    """--steer swap: each of the concept's prompts is steered to itself with the substitute's word, row by row (a red
    circle → a red square; red → orange; striped → solid), and the articles follow the new word."""
    from erasure.concepts import resolve

    circle, red, striped = (resolve(c) for c in ("circle", "red", "striped"))

    def swap_word(concept, prompts):
        return concept.swap(prompts, concept.substitute, "the substitute")

    assert swap_word(circle, ["a circle", "a red circle", "a striped circle"]) == ["a square", "a red square",
                                                                                    "a striped square"]
    assert swap_word(red, ["a red square", "a red circle and a blue star"]) == ["an orange square",
                                                                                "an orange circle and a blue star"]
    assert swap_word(striped, ["a striped heart"]) == ["a solid heart"]
    assert swap_word(resolve("orange"), ["an orange circle"]) == ["a red circle"], "the article follows the new word"
    pipe = pipelines.load("toy")
    swap = SPM(pipe, circle, SPMConfig(steer="swap"), Context())
    plain = SPM(pipelines.load("toy"), circle, SPMConfig(), Context())
    assert swap.surrogate.shape == swap.targets.shape == plain.surrogate.shape
    assert torch.equal(swap.surrogate[1], encode(pipe, ["a red square"])[0])
    assert torch.equal(plain.surrogate[1], encode(pipe, [""])[0]), "the default: SPM's empty surrogate, every row"


def test_cross_kv_membrane_wraps_only_the_text_projections_and_loads(tmp_path):
    """--layers cross-kv: the membrane edits the cross-attention keys / values alone (each text token on its own);
    its file covers just those layers, loads onto a fresh pipeline and changes its images."""
    out = tmp_path / "kv.safetensors"
    assert main(["--concept", "circle", "--model", "toy", "--method", "spm", "--steps", "3", "--ddim-steps", "2",
                 "--layers", "cross-kv", "--lr", "0.05", "--lr-schedule", "cosine", "--quiet", "--output", str(out)]) == 0
    art = load_artifact(out)
    prefixes = {k.rsplit(".lora_", 1)[0] for k in art.tensors if ".lora_" in k}
    assert len(prefixes) == 14 and all(p.endswith(("attn2_to_k", "attn2_to_v")) for p in prefixes), sorted(prefixes)[:3]
    assert art.metadata["config"]["layers"] == "cross-kv" and art.metadata["config"]["lr_schedule"] == "cosine"
    pipe = pipelines.load("toy")
    before = _image(pipe, "a red circle")
    handle = pipelines.attach_membranes(pipe, [out], transport=False)
    wrapped = membrane.membrane_layers(pipe.unet)
    assert len(wrapped) == 14 and all(p.endswith(("attn2.to_k", "attn2.to_v")) for p in wrapped)
    assert abs(_image(pipe, "a red circle") - before).max() > 1e-3, "the trained membrane changes the image"
    handle.detach()
    assert not membrane.membrane_layers(pipe.unet)
    assert abs(_image(pipe, "a red circle") - before).max() == 0, "detached: the base model's image again"


def test_lr_schedules():
    from erasure.engine import lr_factor

    assert [lr_factor("constant", s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    cos = [lr_factor("cosine", s, 100) for s in range(100)]
    assert cos[0] == 1.0 and abs(cos[50] - 0.5) < 1e-9 and 0 < cos[-1] < 1e-3
    assert all(a > b for a, b in zip(cos, cos[1:])), "cosine decays monotonically"



def test_a_toy_membrane_gates_on_its_concept_not_its_training_prompts(tmp_path):
    """The membrane records its training prompts but transport compares prompts with its target, the concept (as
    the SPM release's ``prompts`` string): "a blue square" shares "a" with "a circle", none of "circle"'s tokens."""
    out = tmp_path / "circle.safetensors"
    assert main(["--concept", "circle", "--model", "toy", "--method", "spm", "--steps", "1", "--ddim-steps", "2",
                 "--output", str(out), "--quiet", "--checkpoint-every", "0"]) == 0
    art = load_artifact(out)
    assert art.metadata["targets"] == ["circle"] and art.raw_metadata["prompts"] == "circle"
    assert "a red circle" in art.metadata["prompts"]
    pipe = pipelines.load("toy")
    handle = pipelines.attach_membranes(pipe, [art])
    tok = pipe.tokenizer
    assert handle.transport.concepts[0].token_sets == [set(tok("circle").input_ids) - set(tok.all_special_ids)]
    gates = handle.transport.gates_for(encode(pipe, ["a blue square", "a blue circle"]))[handle.names[0]]
    assert gates[1] == 1.0 and gates[0] < 1.0
    handle.detach()
    # a file from before targets existed: gated by its training prompts
    legacy = tmp_path / "legacy.safetensors"
    meta = {k: v for k, v in art.metadata.items() if k != "targets"}
    save_artifact(legacy, art.tensors, meta, extra_strings={k: art.raw_metadata[k] for k in ("prompts", "rank", "alpha")})
    handle = pipelines.attach_membranes(pipe, [legacy])
    assert len(handle.transport.concepts[0].token_sets) == len(art.metadata["prompts"])
    handle.detach()
