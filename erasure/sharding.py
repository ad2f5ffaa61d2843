"""Sharded training (``--fsdp``): the networks a method trains (and SFD's frozen teacher) split across the processes
of an ``accelerate launch`` run with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), so each process holds
1/N of their weights, gradients and optimiser states.

The UNet is wrapped block by block (every ``ResnetBlock2D`` and ``Transformer2DModel``, then the root), the
transformer-based auto-wrap policy accelerate's FSDP plugin applies; a block's weights are gathered for its forward
and backward and freed after. Accelerate starts the processes and their process group (NCCL on GPUs, gloo on CPUs);
the sharding is applied here because accelerate's FSDP plugin only engages on GPUs, and one code path on both lets
the 2-process CPU test check what runs on 8 GPUs. When accelerate is configured with its FSDP plugin
(``accelerate launch --use_fsdp``), the run is sharded as with ``--fsdp`` and the plugin's
``fsdp_reshard_after_forward`` and ``fsdp_offload_params`` apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from adapters.errors import UserError

BLOCKS = ("ResnetBlock2D", "Transformer2DModel")  # the units gathered one at a time


@dataclass(frozen=True)
class Sharding:
    """How to shard: the processes' mesh, the all-gather precision, resharding after forward, offloading."""

    mesh: DeviceMesh
    param_dtype: torch.dtype | None = None  # mixed precision: weights gathered in this dtype, gradients reduced in fp32
    reshard_after_forward: bool = True
    offload: bool = False

    def kwargs(self) -> dict:
        mp = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32 if self.param_dtype else None)
        return {"mesh": self.mesh, "mp_policy": mp, "reshard_after_forward": self.reshard_after_forward,
                "offload_policy": CPUOffloadPolicy() if self.offload else OffloadPolicy()}


def sharding_for(accelerator, *, requested: bool, param_dtype: torch.dtype | None) -> Sharding | None:
    """The run's sharding: with ``--fsdp`` or accelerate's FSDP plugin configured, else None. Needs ≥ 2 processes."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if not requested and plugin is None:
        return None
    if accelerator.num_processes < 2:
        raise UserError("--fsdp shards training across processes: start the run with `accelerate launch "
                        "--num_processes N -m erasure.train ...` (N ≥ 2)")
    reshard, offload = True, False
    if plugin is not None:
        reshard = bool(getattr(plugin, "reshard_after_forward", True))
        offload = isinstance(getattr(plugin, "cpu_offload", None), CPUOffloadPolicy)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    return Sharding(mesh, param_dtype, reshard, offload)


def shard(module: torch.nn.Module, sharding: Sharding) -> torch.nn.Module:
    """Shard ``module`` in place (its blocks, then itself) → the module (now an ``FSDPModule``)."""
    kwargs = sharding.kwargs()
    for m in reversed(list(module.modules())):  # innermost first
        if type(m).__name__ in BLOCKS and m is not module:
            fully_shard(m, **kwargs)
    fully_shard(module, **kwargs)
    return module


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective: every process must call it, in the same order); any other
    tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every sharded tensor gathered, on the CPU (a collective)."""
    return {k: full(v.detach()).cpu() for k, v in module.state_dict().items()}


def like(ref: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, its dtype kept) laid out as ``ref``: on its device, sharded the same way when
    ``ref`` is sharded (e.g. a saliency mask over a sharded weight)."""
    if isinstance(ref, DTensor):
        return distribute_tensor(value.to(ref.device), ref.device_mesh, ref.placements)
    return value.to(ref.device)
