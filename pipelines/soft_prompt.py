"""Soft prompts: prompts whose first tokens are free embedding vectors, encoded by the pipeline's own text encoder.

The attacks (UnlearnDiffAtk's token search) and adversarial erasure (AdvUnlearn's inner attack) both prepend k
vectors after the start token and optimise them through the text encoder; these are the two pieces they share.
"""

from __future__ import annotations

import torch


def with_prefix(tok, prefix: torch.Tensor | list[int], body: list[int]) -> torch.Tensor:
    """[BOS] prefix body [EOS] padded to the model length → token ids (1, L). ``prefix`` holds k ids (placeholders
    when the prefix's embeddings are replaced, see :func:`encode_with_soft`)."""
    n = tok.model_max_length
    prefix = prefix.tolist() if torch.is_tensor(prefix) else list(prefix)
    ids = [tok.bos_token_id, *prefix, *body][: n - 1] + [tok.eos_token_id]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return torch.tensor([ids + [pad] * (n - len(ids))])


def prefixed_ids(tok, texts: list[str], k: int) -> torch.Tensor:
    """Each text with k placeholder prefix tokens → (N, L) ids for :func:`encode_with_soft`."""
    filler = [tok.bos_token_id] * k  # replaced by the soft vectors; any id will do
    return torch.cat([with_prefix(tok, filler, tok(t, add_special_tokens=False).input_ids) for t in texts])


def encode_with_soft(te, ids: torch.Tensor, soft: torch.Tensor, hard: torch.Tensor | None = None) -> torch.Tensor:
    """The text encoder's last hidden state for ``ids`` (N, L) with the token embeddings of positions 1…k replaced:
    by ``soft`` (k, D), gradients flowing to it; or, given ``hard`` (projected vocabulary embeddings), by ``hard`` in
    value with gradients still flowing to ``soft`` (straight-through, as PEZ)."""
    k = len(soft)

    def hook(module, args, output):
        out = output.clone()
        rows = soft if hard is None else hard + (soft - soft.detach())
        out[:, 1 : 1 + k] = rows.to(out.dtype)
        return out

    h = te.get_input_embeddings().register_forward_hook(hook)
    try:
        return te(ids.to(te.device))[0]
    finally:
        h.remove()


def nearest(soft: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Nearest vocabulary token (cosine) of each soft embedding, disallowed tokens excluded → ids (k,)."""
    sim = torch.nn.functional.normalize(soft, dim=-1) @ torch.nn.functional.normalize(table.float(), dim=-1).T
    sim[:, ~allowed] = -2
    return sim.argmax(-1)
