"""Text conditioning shared by every method: what the UNet sees for a list of prompts, as one tensor per prompt.

SD 1.x / 2.x: the text encoder's hidden states (P, 77, D). SDXL's UNet also needs the pooled text embedding and six
size ids, so they are packed into k extra rows behind the 77 token rows — (P, 77 + k, D), see :func:`pack` — and
:func:`denoise` unpacks them into ``added_cond_kwargs``: methods index, concatenate and mask one tensor either way.
"""

from __future__ import annotations

import math

import torch

TIME_ID_UNIT = 64.0  # time ids are stored divided by this: multiples of 64 up to 16384 stay exact in bf16 and fp16


def encode(pipe, prompts: list[str], size: tuple[int, int] | None = None, chunk: int = 256) -> torch.Tensor:
    """The UNet's text conditioning for ``prompts`` (no CFG duplication): (P, 77, D) for SD 1.x / 2.x pipelines,
    (P, 77 + k, D) packed for SDXL ones, whose time ids say ``size`` (height, width; default: the pipeline's).
    Long lists go through the text encoder ``chunk`` prompts at a time."""
    if len(prompts) > chunk:
        return torch.cat([encode(pipe, prompts[i : i + chunk], size, chunk) for i in range(0, len(prompts), chunk)])
    with torch.no_grad():
        out = pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
    if len(out) == 4:  # SDXL: (prompt_embeds, negative, pooled, negative pooled)
        return pack(out[0], out[2], time_ids(pipe, len(prompts), size))
    return out[0]


def time_ids(pipe, n: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """SDXL's added time ids for ``n`` images generated at ``size`` (default: the pipeline's default image size):
    (original h, w, crop top, left, target h, w) → (n, 6), float32."""
    if size is None:
        side = getattr(pipe, "default_sample_size", pipe.unet.config.sample_size) * pipe.vae_scale_factor
        size = (side, side)
    h, w = size
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(n, -1)


def pack(tokens: torch.Tensor, pooled: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens (P, L, D), pooled (P, E), ids (P, 6) → (P, L + k, D): k = ⌈(E + 6) / D⌉ rows holding [pooled,
    ids / 64] flattened and zero-padded to k·D values, in the tokens' dtype."""
    p, _, d = tokens.shape
    extra = torch.cat([pooled.to(tokens), (ids / TIME_ID_UNIT).to(tokens)], dim=1)
    k = math.ceil(extra.shape[1] / d)
    extra = torch.nn.functional.pad(extra, (0, k * d - extra.shape[1]))
    return torch.cat([tokens, extra.view(p, k, d)], dim=1)


def is_packed(unet) -> bool:
    """Whether ``unet`` takes SDXL's added conditioning (and so packed text conditioning)."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def _pooled_width(unet) -> int:
    cfg = unet.config
    return cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim


def extra_rows(unet, width: int) -> int:
    """k, the number of packed rows behind the token rows of ``unet``'s conditioning of width D (0 unless SDXL)."""
    return math.ceil((_pooled_width(unet) + 6) / width) if is_packed(unet) else 0


def token_rows(cond: torch.Tensor, unet) -> torch.Tensor:
    """The token rows of a conditioning (…, L + k, D) → (…, L, D) (all of it unless SDXL)."""
    k = extra_rows(unet, cond.shape[-1])
    return cond[..., : cond.shape[-2] - k, :]


def with_tokens(tokens: torch.Tensor, like: torch.Tensor, unet) -> torch.Tensor:
    """Token rows (n, L, D) with the packed rows of ``like`` (1 or n, L + k, D) → (n, L + k, D)."""
    k = extra_rows(unet, like.shape[-1])
    if not k:
        return tokens
    return torch.cat([tokens, like[:, like.shape[1] - k :].expand(len(tokens), -1, -1).to(tokens)], dim=1)


def unpack(cond: torch.Tensor, unet) -> tuple[torch.Tensor, dict]:
    """Packed conditioning (B, L + k, D) → (token rows (B, L, D), SDXL's ``added_cond_kwargs``): ``text_embeds``
    (B, E) in cond's dtype, ``time_ids`` (B, 6) exact, float32."""
    e, d = _pooled_width(unet), cond.shape[-1]
    k = extra_rows(unet, d)
    extra = cond[:, cond.shape[1] - k :].reshape(len(cond), k * d)
    ids = (extra[:, e : e + 6].float() * TIME_ID_UNIT).round()
    return cond[:, : cond.shape[1] - k], {"text_embeds": extra[:, :e], "time_ids": ids}


def denoise(unet, x: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
    """The UNet's output for latents x (B, C, h, w) at t with text conditioning ``cond`` from :func:`encode`
    (unpacked into ``added_cond_kwargs`` for SDXL) → (B, C, h, w)."""
    if not is_packed(unet):
        return unet(x, t, cond).sample
    tokens, added = unpack(cond, unet)
    return unet(x, t, tokens, added_cond_kwargs=added).sample
