"""The toy-world build's recipe: :class:`BuildConfig`, whose defaults are the committed build's (README, "Base world").
Every field is a flag of ``python -m erasure.toyworld.build``."""

from __future__ import annotations

from dataclasses import dataclass

from erasure.toyworld.paths import WEIGHTS_DIR


@dataclass
class BuildConfig:
    output: str = str(WEIGHTS_DIR)
    seed: int = 0
    n_images: int = 60000  # diffusion training set (seeded procedural images)
    n_judge: int = 24000  # judge positives; negatives are 40 % more
    vae_steps: int = 2500
    vae_batch: int = 32
    unet_steps: int = 1600
    unet_batch: int = 128
    unet_lr: float = 1e-3
    text_lr: float = 2e-4  # the text encoder's lr in the joint stage (gentle: keeps what pretraining learned)
    text_pretrain_steps: int = 1500  # > 0: pretrain the text encoder contrastively first (README, "Base world")
    refine_steps: int = 800  # UNet-only steps with the text encoder frozen (stage 2b)
    refine_lr: float = 5e-4
    polish_rounds: int = 2  # UNet-only rounds (stage 2c), each a fresh warm-up + cosine; the fill bar (README)
    polish_steps: int = 1200
    polish_lr: float = 3e-4
    polish_t_max: int = 500  # polish rounds train on timesteps [0, polish_t_max), where the fill detail is drawn
    judge_steps: int = 1200
    judge_batch: int = 128
    clip_steps: int = 1000
    scale: float = 1.0  # multiplies every size and step count (smoke builds)
    threads: int = 2  # torch threads of the main process's full-speed stages (the weights depend on it: CPU kernels
    #                   round differently with another thread count)
    jobs: int = 2  # 2: train the judge and CLIP in a helper process beside the VAE / UNet stages (same weights as 1)
    clip_wait_step: int = 900  # VAE steps run on one thread beside the helper's CLIP before the main process waits
    #                            for CLIP and takes every thread until the VAE is written (the helper then waits)
    helper_steps: int = 2  # joint UNet steps run on one thread (after the text-encoder pretraining, which also runs
    #                        on one thread, beside the helper's judge) before the main process waits for the helper
    #                        and takes every thread (fixed steps: the weights do not depend on timing)
    quiet: bool = False

    def scaled(self, name: str) -> int:
        return max(2, int(getattr(self, name) * self.scale))

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)
