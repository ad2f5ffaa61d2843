"""Optimisers of the memory levers (``--optimizer``): the method's own Adam / AdamW (the paper's), a factored Adam
with a compact state, and bitsandbytes' 8-bit Adam on CUDA.

``FactoredAdam`` is Adam whose second moment of every matrix-shaped parameter is kept factored, as Adafactor keeps it
(Shazeer & Stern, 2018, Alg. 4): for a gradient G (R × C; a convolution's weight is viewed as out × rest) it keeps
the running means of G² over rows and over columns and estimates V ≈ r cᵀ / mean(r). Its state is R + C numbers
instead of R·C, so with β₁ = 0 (SiD / SFD's Adam) a parameter costs no optimiser memory of its size at all. Unlike
Adafactor the step size is Adam's (absolute, bias-corrected), so a paper's learning rate keeps its meaning; vectors
(biases, norms) keep Adam's exact second moment.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from adapters.errors import UserError

OPTIMIZERS = ("adam", "factored", "adam8bit")


class FactoredAdam(torch.optim.Optimizer):
    """Adam with a factored second moment for ≥ 2-D parameters (see the module docstring). ``decoupled`` weight
    decay as AdamW. With β₁ = 0 no first moment is stored."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled))

    @staticmethod
    def _init_state(p: torch.Tensor, beta1: float) -> dict:
        state = {"step": torch.zeros((), dtype=torch.float32)}
        if p.ndim >= 2:
            rows, cols = p.shape[0], p[0].numel()
            state["row"] = torch.zeros(rows, dtype=torch.float32, device=p.device)
            state["col"] = torch.zeros(cols, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        if beta1 > 0:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                # a sharded (FSDP) parameter is factored over this process's rows: the state is of the local shard
                p, g = local(param), local(param.grad).float()
                state = self.state[param]
                if not state:
                    state.update(self._init_state(p, beta1))
                state["step"] += 1
                t = state["step"].item()
                if p.numel() == 0:  # a shard with no rows
                    continue
                if "row" in state:  # V ≈ r cᵀ / mean(r) of the bias-corrected running means of G²
                    g2 = g.reshape(len(state["row"]), -1).square()
                    state["row"].lerp_(g2.mean(1), 1 - beta2)
                    state["col"].lerp_(g2.mean(0), 1 - beta2)
                    r = state["row"] / max(state["row"].mean().item(), 1e-30)
                    v = torch.outer(r, state["col"]).reshape(p.shape)
                else:
                    state["exp_avg_sq"].lerp_(g.square(), 1 - beta2)
                    v = state["exp_avg_sq"]
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                if beta1 > 0:
                    state["exp_avg"].lerp_(g, 1 - beta1)
                    update = state["exp_avg"] / (1 - beta1**t) / denom
                else:
                    update = g / denom
                if group["weight_decay"]:
                    if group["decoupled"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    else:
                        update = update + group["weight_decay"] * p.float() / denom
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard (sharing its storage), any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def make_optimizer(kind: str, params, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0, decoupled: bool = False) -> torch.optim.Optimizer:
    """The optimiser ``kind`` ("adam": torch's Adam, or AdamW when ``decoupled``; "factored": :class:`FactoredAdam`;
    "adam8bit": bitsandbytes' Adam8bit / AdamW8bit, CUDA only) with a method's hyper-parameters."""
    params = list(params)
    if kind == "adam":
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if kind == "factored":
        return FactoredAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled)
    if kind == "adam8bit":
        bnb = import_bitsandbytes()
        cls = bnb.optim.AdamW8bit if decoupled else bnb.optim.Adam8bit
        return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer '{kind}': choose from {', '.join(OPTIMIZERS)}")


def import_bitsandbytes():
    """bitsandbytes, or a one-line UserError saying how to get it (it is in the ``cuda`` extra)."""
    try:
        import bitsandbytes  # an optional dependency of the cuda extra; 8-bit Adam only
    except ImportError:
        raise UserError("--use-8bit-adam needs bitsandbytes: pip install -e '.[cuda]' (CUDA machines only)") from None
    return bitsandbytes
