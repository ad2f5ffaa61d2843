"""pipelines.load: local folders, cached hub ids and "toy" → diffusers pipelines, offline, with one-line user errors.

Every pipeline here is a tiny, random, SD-shaped one from ``pipelines.testing``, saved to a temporary folder.
"""

import importlib.util
import shutil
import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from adapters.errors import UserError
from pipelines.load import load
from pipelines.testing import save_tiny, tiny_sd_pipeline, tiny_sdxl_pipeline

FACTORIES = {"sd1": lambda: tiny_sd_pipeline("sd1"), "sd2": lambda: tiny_sd_pipeline("sd2"), "sdxl": tiny_sdxl_pipeline}
CLASSES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Toy-size models: one thread is fastest, and avoids OpenMP spin-wait stalls when other processes use the CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind → (in-memory tiny pipeline, the folder it was saved to)."""
    out = {}
    for kind, make in FACTORIES.items():
        pipe = make()
        folder = tmp_path_factory.mktemp(kind)
        save_tiny(pipe, folder)
        out[kind] = (pipe, folder)
    return out


def _generate(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np", generator=g).images


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, f"a UserError is one line: {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------------------------
# the tiny pipelines are SD-shaped


def test_tiny_sd1_unet_has_sd14_attention_layout():
    unet = tiny_sd_pipeline("sd1").unet
    names = dict(unet.named_modules())
    for path in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                 "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
                 "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
                 "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"):
        assert path in names, path
    blocks = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    # SD 1.x: 3 down blocks × 2 + mid 1 + 3 up blocks × 3 = 16 transformers, each with proj_in, proj_out,
    # attn1 (q, k, v, out), attn2 (q, k, v, out), ff.net.0.proj and ff.net.2 = 12 layers.
    assert len(blocks) == 16
    layers = [m for b in blocks for m in b.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(layers) == 192
    assert isinstance(blocks[0].proj_in, torch.nn.Conv2d), "SD 1.x projects with 1×1 convolutions"


def test_tiny_sd2_and_sdxl_traits():
    sd2 = tiny_sd_pipeline("sd2")
    assert isinstance(sd2.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    xl = tiny_sdxl_pipeline()
    assert xl.unet.config.addition_embed_type == "text_time"
    assert xl.unet.config.cross_attention_dim == xl.text_encoder.config.hidden_size + xl.text_encoder_2.config.hidden_size
    assert not hasattr(xl.unet.down_blocks[0], "attentions"), "SDXL's first block has no attention"
    assert len(xl.unet.down_blocks[1].attentions[0].transformer_blocks) == 2  # SDXL: 2
    assert len(xl.unet.down_blocks[2].attentions[0].transformer_blocks) == 2  # SDXL: 10


def test_tiny_pipelines_are_seeded_and_in_eval_mode():
    a, b = tiny_sd_pipeline("sd1"), tiny_sd_pipeline("sd1")
    assert not any(m.training for m in (a.unet, a.vae, a.text_encoder))
    wa, wb = a.unet.conv_in.weight, b.unet.conv_in.weight
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, tiny_sd_pipeline("sd1", seed=1).unet.conv_in.weight)


# ---------------------------------------------------------------------------------------------------------------
# local folders


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_local_folder_loads_right_class_and_reproduces_images(saved, kind):
    original, folder = saved[kind]
    pipe = load(str(folder))
    assert type(pipe) is CLASSES[kind]
    assert all(p.dtype == torch.float32 for p in pipe.components["unet"].parameters())
    assert all(p.dtype == torch.float32 for p in pipe.text_encoder.parameters())
    assert len(pipe.tokenizer) == 49408
    assert pipe.scheduler.config.prediction_type == original.scheduler.config.prediction_type
    assert pipe._progress_bar_config == {"disable": True}
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())

    first, again, other = _generate(pipe, 0), _generate(pipe, 0), _generate(pipe, 1)
    assert first.shape == (1, 64, 64, 3) and first.dtype == np.float32
    assert np.array_equal(first, again), "same seed, same image"
    assert not np.array_equal(first, other), "another seed, another image"
    # the loaded weights are the saved ones; outputs agree to float rounding only, because oneDNN convolutions
    # round differently depending on the tensors' memory alignment
    np.testing.assert_allclose(first, _generate(original, 0), atol=1e-5)


def test_dtype_strings(saved):
    folder = saved["sd1"][1]
    pipe = load(folder, dtype="bf16")
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.bfloat16}
    assert load(folder, dtype=torch.float16).unet.dtype == torch.float16
    with pytest.raises(UserError) as err:
        load(folder, dtype="int7")
    assert "fp16" in _one_line(err)


def test_fp16_folder_loads_as_float32(tmp_path):
    pipe = tiny_sd_pipeline("sd1").to(torch.float16)
    save_tiny(pipe, tmp_path)
    loaded = load(tmp_path)  # transformers 5 alone would keep the text encoder in fp16 ("auto")
    assert loaded.text_encoder.dtype == torch.float32 and loaded.unet.dtype == torch.float32


@pytest.mark.parametrize("name,cls", [("ddim", "DDIMScheduler"), ("ddpm", "DDPMScheduler"),
                                      ("euler", "EulerDiscreteScheduler"), ("lms", "LMSDiscreteScheduler"),
                                      ("dpm", "DPMSolverMultistepScheduler")])
def test_scheduler_swap_keeps_the_noise_schedule(saved, name, cls):
    pipe = load(saved["sd2"][1], scheduler=name)
    assert type(pipe.scheduler).__name__ == cls
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_scheduler_swap_generates(saved):
    pipe = load(saved["sd1"][1], scheduler="ddpm")
    assert _generate(pipe).shape == (1, 64, 64, 3)


def test_missing_path_and_non_diffusers_folder(tmp_path):
    with pytest.raises(UserError) as err:
        load(str(tmp_path / "nowhere" / "model"))
    assert "not found" in _one_line(err)
    with pytest.raises(UserError) as err:
        load(tmp_path)
    assert "model_index.json" in _one_line(err)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError) as err:
        load(tmp_path / "weights.bin")
    assert "not a diffusers folder" in _one_line(err)


@pytest.mark.parametrize("remove", ["files", "folder"])
def test_broken_tokenizer_is_refused(saved, tmp_path, remove):
    folder = tmp_path / "sd1"
    shutil.copytree(saved["sd1"][1], folder)
    if remove == "folder":
        shutil.rmtree(folder / "tokenizer")
    else:
        for f in (folder / "tokenizer").iterdir():
            f.unlink()
    with pytest.raises(UserError) as err:
        load(folder)
    msg = _one_line(err)
    assert "tokenizer" in msg and "49408" in msg and str(folder) in msg


def test_broken_second_tokenizer_is_refused(saved, tmp_path):
    folder = tmp_path / "sdxl"
    shutil.copytree(saved["sdxl"][1], folder)
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(UserError) as err:
        load(folder)
    assert "tokenizer_2" in _one_line(err)


# ---------------------------------------------------------------------------------------------------------------
# hub ids: the local cache only


@pytest.fixture
def empty_hf_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads HF_HOME once, at import: point its cache at the empty folder too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf" / "hub"


@pytest.mark.parametrize("offline_env", [True, False])
def test_uncached_hub_id_fails_fast(empty_hf_cache, monkeypatch, offline_env):
    if not offline_env:
        monkeypatch.delenv("HF_HUB_OFFLINE")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        load("CompVis/stable-diffusion-v1-4")
    assert time.monotonic() - start < 5
    msg = _one_line(err)
    assert "not available locally" in msg and "CompVis/stable-diffusion-v1-4" in msg and "--model" in msg


def test_cached_hub_id_loads_from_the_snapshot(saved, empty_hf_cache):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hf_cache / "models--tiny--sd1"
    shutil.copytree(saved["sd1"][1], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    pipe = load("tiny/sd1")
    assert type(pipe) is StableDiffusionPipeline
    np.testing.assert_allclose(_generate(pipe), _generate(saved["sd1"][0]), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the toy world, options


def test_missing_toy_weights_say_how_to_rebuild(monkeypatch, tmp_path):
    import erasure.toyworld.paths

    monkeypatch.setattr(erasure.toyworld.paths, "PIPELINE_DIR", tmp_path / "no-toy-here")
    with pytest.raises(UserError) as err:
        load("toy")
    msg = _one_line(err)
    assert "toy" in msg and "python -m erasure.toyworld.build" in msg


def test_unknown_options_are_refused_before_loading(tmp_path):
    missing = str(tmp_path / "missing")  # the option is checked first, so the missing folder is never reached
    for kwargs, word in [({"attention": "bogus"}, "sdpa"), ({"scheduler": "bogus"}, "euler"),
                         ({"device": "nonsense:0"}, "device")]:
        with pytest.raises(UserError) as err:
            load(missing, **kwargs)
        assert word in _one_line(err)


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("xformers") is not None,
                    reason="xformers and CUDA are both available here, so xformers attention is allowed")
def test_xformers_without_cuda_is_a_user_error(saved):
    with pytest.raises(UserError) as err:
        load(saved["sd1"][1], attention="xformers")
    msg = _one_line(err)
    assert "xformers" in msg and "CUDA" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_is_a_user_error(saved):
    with pytest.raises(UserError) as err:
        load(saved["sd1"][1], device="cuda")
    assert "CUDA" in _one_line(err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_half_precision_and_xformers(saved, dtype):
    pipe = load(saved["sd1"][1], dtype=dtype, device="cuda")
    assert pipe.unet.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert np.isfinite(_generate(pipe)).all()
    if importlib.util.find_spec("xformers") is not None:
        pipe = load(saved["sd1"][1], dtype=dtype, device="cuda", attention="xformers")
        assert np.isfinite(_generate(pipe)).all()
