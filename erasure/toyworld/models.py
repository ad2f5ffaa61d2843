"""The toy world's networks: a Stable-Diffusion-architecture pipeline at toy size, the judge, and a tiny CLIP.

The pipeline is made only of diffusers / transformers classes (AutoencoderKL, CLIPTextModel + CLIPTokenizer,
UNet2DConditionModel with cross-attention transformer blocks, DDIM scheduler), so every code path that runs on the
toy model is the one that runs on Stable Diffusion.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

IMAGE_SIZE = 32  # pixels
LATENT_SIZE = 8  # the VAE downsamples 4×: 32×32×3 → 8×8×4
TEXT_WIDTH = 64  # CLIP text width = UNet cross_attention_dim

# The toy world's evaluation CFG scale. Measured on the committed world (README, "Base world"; 2 images per prompt):
# at 4.0 every base bar holds with margin; 5.0 draws the same fills but loses shapes to blur, and SD's customary 7.5
# over-saturates this small model's images (docs/toy-world.md).
GUIDANCE = 4.0

# SD v1's noise schedule (scaled_linear 0.00085 → 0.012, 1000 steps).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def make_vae():
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def make_unet():
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(48, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def make_text_encoder():
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(cfg)


def conv_tower(width: int, norm) -> list[nn.Module]:
    """The toy world's small CNN on 32×32 images: conv-norm-SiLU blocks at 32, 16 and 8 px, average-pooled to
    ``4 * width`` features. ``norm(channels)`` makes each block's normalisation layer."""
    w = width

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), norm(cout), nn.SiLU())

    return [
        block(3, w), nn.MaxPool2d(2),  # 16×16
        block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8×8
        block(2 * w, 4 * w), block(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ]


class CaptionImageTower(nn.Module):
    """A small CNN image tower that pretrains the pipeline's text encoder contrastively (build option
    ``--text-pretrain-steps``), as SD's text encoder is CLIP's: (N, 3, 32, 32) in [-1, 1] → (N, TEXT_WIDTH). It is
    used by the build only and does not ship."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(*conv_tower(width, lambda c: nn.GroupNorm(8, c)), nn.Linear(4 * width, TEXT_WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_scheduler(kind: str = "ddim"):
    if kind == "ddpm":
        return DDPMScheduler(**SCHEDULE, clip_sample=False)
    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


# ---------------------------------------------------------------------------------------------------------------
# judge


class Judge(nn.Module):
    """Multi-label presence classifier: which shapes, colours and fills are in an image.

    Sigmoid outputs trained with negatives (blank, noise, blobs, partial and distorted shapes), so it can say
    "nothing". ``features`` (the 96-d penultimate layer) serve as the toy world's FID feature extractor.
    """

    def __init__(self, n_shapes: int = 8, n_colours: int = 8, n_fills: int = 3, width: int = 24):
        super().__init__()
        self.body = nn.Sequential(*conv_tower(width, nn.BatchNorm2d))
        self.num_features = 4 * width
        self.head = nn.Linear(4 * width, n_shapes + n_colours + n_fills)
        self.splits = (n_shapes, n_colours, n_fills)

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float NCHW → [-1, 1] float."""
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return x * 2 - 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalise(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 or [0, 1] float → (N, 19) logits: shapes, then colours, then fills."""
        return self.head(self.features(x))


class JudgeFeatures(nn.Module):
    """The judge's penultimate features as a torchmetrics FID ``feature=`` module: uint8 NCHW → (N, 96)."""

    def __init__(self, judge: Judge):
        super().__init__()
        self.judge = judge
        self.num_features = judge.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge.features(x)


# ---------------------------------------------------------------------------------------------------------------
# tiny CLIP (open_clip)

CLIP_NAME = "toy-clip"
CLIP_CONTEXT = 32  # token positions of the toy CLIP text tower (toy captions are short)
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": CLIP_CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_clip():
    """A tiny open_clip CLIP (random init); register its config with open_clip on first use."""
    import open_clip  # heavy: ~3 s to import, and only the toy CLIP needs it

    if CLIP_NAME not in open_clip.list_models():  # the model name is the config file's stem
        path = os.path.join(tempfile.mkdtemp(prefix="toy-clip-"), f"{CLIP_NAME}.json")
        with open(path, "w") as f:
            json.dump(CLIP_CONFIG, f)
        open_clip.add_model_config(path)
    model = open_clip.create_model(CLIP_NAME, pretrained=None)
    return model

# image normalisation of the toy CLIP (inputs in [0, 1])
CLIP_MEAN = (0.5, 0.5, 0.5)
CLIP_STD = (0.5, 0.5, 0.5)
