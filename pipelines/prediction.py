"""What a diffusion model's output means: diffusers schedulers carry ``config.prediction_type``, and every method that
turns an output into x̂₀ or ε, or regresses an output onto a target, goes through these three functions.

With x_t = √ᾱ x₀ + √(1−ᾱ) ε the network predicts ε ("epsilon", SD 1.x, SD 2.x 512), v = √ᾱ ε − √(1−ᾱ) x₀
("v_prediction", SD 2.x 768; diffusers' ``DDPMScheduler.get_velocity``) or x₀ ("sample"). The conversions are those of
diffusers' ``DDIMScheduler.step``. All tensors (B, C, h, w); ᾱ a scalar or (B, 1, 1, 1); computed in the inputs' dtype.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type_of(scheduler) -> str:
    """A scheduler's (or a pipeline's scheduler's) prediction type; "epsilon" when its config does not say."""
    scheduler = getattr(scheduler, "scheduler", scheduler)
    return getattr(scheduler.config, "prediction_type", None) or "epsilon"


def to_x0(output: torch.Tensor, x_t: torch.Tensor, alpha_bar, prediction_type: str) -> torch.Tensor:
    """x̂₀ = (x_t − √(1−ᾱ) ε̂) / √ᾱ  |  √ᾱ x_t − √(1−ᾱ) v̂  |  x̂₀. output, x_t (B, C, h, w) → (B, C, h, w)."""
    a = torch.as_tensor(alpha_bar)
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * output) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * output
    _check(prediction_type)
    return output


def to_eps(output: torch.Tensor, x_t: torch.Tensor, alpha_bar, prediction_type: str) -> torch.Tensor:
    """ε̂  |  √(1−ᾱ) x_t + √ᾱ v̂  |  (x_t − √ᾱ x̂₀) / √(1−ᾱ). output, x_t (B, C, h, w) → (B, C, h, w)."""
    a = torch.as_tensor(alpha_bar)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return (1 - a).sqrt() * x_t + a.sqrt() * output
    _check(prediction_type)
    return (x_t - a.sqrt() * output) / (1 - a).sqrt()


def target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar, prediction_type: str) -> torch.Tensor:
    """What the network should output for x_t = √ᾱ x₀ + √(1−ᾱ) ε: ε  |  v = √ᾱ ε − √(1−ᾱ) x₀  |  x₀.
    x0, noise (B, C, h, w) → (B, C, h, w)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = torch.as_tensor(alpha_bar)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    _check(prediction_type)
    return x0


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
