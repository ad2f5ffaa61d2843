"""Tiny, randomly initialised, SD-shaped pipelines for tests.

Every factory builds real diffusers/transformers classes with the same module names and block types as the real
models (so adapter paths such as ``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`` exist), at widths
small enough to build and run a 2-step 64×64 generation in well under a second on a CPU. Weights are seeded: the same
call gives the same weights.
"""

from __future__ import annotations

import os

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from erasure.toyworld.tokenizer import clip_tokenizer

SD_KINDS = ("sd1", "sd2")
TEXT_WIDTH = 32  # hidden size of every tiny CLIP text encoder


def _unet_sd(kind: str):
    """SD 1.x / 2.x UNet layout (4 down blocks, 3 with cross-attention, layers_per_block=2) at tiny widths."""
    sd2 = kind == "sd2"
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        norm_num_groups=32,
        cross_attention_dim=TEXT_WIDTH,
        # SD 1.x: one head count for all blocks (8); SD 2.x: a per-block tuple (5, 10, 20, 20) and linear proj_in/out.
        attention_head_dim=(2, 2, 4, 4) if sd2 else 2,
        use_linear_projection=sd2,
    )
    return unet.eval()


def _unet_sdxl():
    """SDXL UNet layout (DownBlock2D + 2 cross-attention blocks, text_time added embeddings) at tiny widths."""
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        norm_num_groups=32,
        transformer_layers_per_block=(1, 2, 2),  # SDXL: (1, 2, 10)
        attention_head_dim=(2, 4, 4),  # SDXL: (5, 10, 20)
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_WIDTH,  # text_encoder + text_encoder_2 hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=8,  # SDXL: 256
        # 6 time ids (original size, crop top-left, target size) × addition_time_embed_dim + text_encoder_2 projection
        projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,
    )
    return unet.eval()


def _vae(scaling_factor: float):
    """4-block AutoencoderKL: 8× spatial down-sampling like SD's (64×64 images ↔ 8×8×4 latents)."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=scaling_factor,
    )
    return vae.eval()  # eval mode, like from_pretrained


def _text_encoder(with_projection: bool = False, hidden_act: str = "quick_gelu"):
    """A 2-layer CLIP text encoder with SD's vocabulary (49408), 77 positions and eos = pad = 49407."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        projection_dim=TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _scheduler(prediction_type: str = "epsilon"):
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_sd_pipeline(kind: str = "sd1", seed: int = 0):
    """A tiny random ``StableDiffusionPipeline`` shaped like SD 1.x (``kind="sd1"``) or SD 2.x (``kind="sd2"``).

    ``kind="sd2"`` adds SD 2.x's traits: linear ``proj_in``/``proj_out``, per-block head counts, a GELU text
    encoder and a v-prediction scheduler. ``seed`` seeds the random weights.
    """
    if kind not in SD_KINDS:
        raise ValueError(f"kind must be one of {SD_KINDS}, not {kind!r}")
    sd2 = kind == "sd2"
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=_vae(scaling_factor=0.18215),
        text_encoder=_text_encoder(hidden_act="gelu" if sd2 else "quick_gelu"),
        tokenizer=clip_tokenizer(),
        unet=_unet_sd(kind),
        scheduler=_scheduler("v_prediction" if sd2 else "epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny random ``StableDiffusionXLPipeline``: two text encoders (the second with a projection), two tokenizers
    and an SDXL-layout UNet with ``text_time`` added embeddings. ``seed`` seeds the random weights."""
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025),
        text_encoder=_text_encoder(),
        text_encoder_2=_text_encoder(with_projection=True, hidden_act="gelu"),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=_unet_sdxl(),
        scheduler=_scheduler(),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny(pipe, folder: str | os.PathLike) -> None:
    """Save ``pipe`` as a diffusers folder (safetensors weights) at ``folder``."""
    pipe.save_pretrained(folder, safe_serialization=True)


def sd1_shaped_pipeline(seed: int = 0):
    """A full-size, randomly initialised ``StableDiffusionPipeline`` with SD 1.x's architecture (860 M UNet, 83 M
    VAE, 123 M CLIP ViT-L/14 text encoder; 512×512 images, 64×64×4 latents): for speed and memory measurements only."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=512, scaling_factor=0.18215)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                                        pad_token_id=49407))
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=clip_tokenizer(), unet=unet.eval(),
                                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_shaped_pipeline(seed: int = 0):
    """A full-size, randomly initialised ``StableDiffusionXLPipeline`` with SDXL's architecture (2.6 B UNet with
    transformer depths 1/2/10, CLIP ViT-L and OpenCLIP ViT-bigG text encoders, 1024×1024 images, 128×128×4 latents):
    for memory and speed measurements only."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=1024, scaling_factor=0.13025)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=49407)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, hidden_act="quick_gelu", **common))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                        num_attention_heads=20, projection_dim=1280, hidden_act="gelu",
                                                        **common))
    unet = UNet2DConditionModel(
        sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
        layers_per_block=2, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    pipe = StableDiffusionXLPipeline(vae=vae.eval(), text_encoder=text.eval(), text_encoder_2=text_2.eval(),
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet.eval(),
                                     scheduler=_scheduler(), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
