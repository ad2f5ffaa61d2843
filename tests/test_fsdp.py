"""Sharded training (--fsdp): two gloo processes of `accelerate launch` on the CPU follow a one-process run, the
sharded UNet computes what the unsharded one does, and the combinations it does not take are refused."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from adapters.artifact import load_artifact, module_fingerprint
from erasure.sharding import Sharding, full, full_state_dict, like, shard
from erasure.train import main
from pipelines.text import denoise, encode

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "esd": ["--method", "esd", "--steps", "3", "--ddim-steps", "4", "--batch-size", "2"],
    "salun": ["--method", "salun", "--steps", "3", "--forget-images", "8", "--retain-images", "8", "--batch-size", "4"],
    "sfd": ["--method", "sfd", "--steps", "3", "--batch-size", "4", "--prompt-pool", "32", "--lr", "1e-4",
            "--lr-fake", "1e-4"],
}
LEVERS = ["--mixed-precision", "bf16", "--gradient-checkpointing", "--optimizer", "factored"]


@pytest.mark.parametrize("args, message", [
    (["--method", "spm"], "--method spm trains too few weights to need it"),
    (["--method", "esd", "--resume"], "write no checkpoints to resume from"),
    (["--method", "sfd", "--mixed-precision", "fp16"], "not fp16"),
    (["--method", "esd", "--device", "cpu"], "start the run with `accelerate launch"),
])
def test_refusals(args, message, tmp_path, capsys):
    out = tmp_path / ("x" if "sfd" in args else "x.safetensors")
    assert main(["--concept", "circle", "--fsdp", "--quiet", "--output", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.fixture
def one_process_group():
    """A gloo process group of one process (a sharding mesh of size 1), removed afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_a_sharded_unet_computes_what_the_unsharded_one_does(one_process_group):
    from copy import deepcopy

    import pipelines

    toy_pipe = pipelines.load("toy", device="cpu")
    unet = toy_pipe.unet
    sharded = shard(deepcopy(unet), Sharding(one_process_group))
    assert type(sharded).__name__ == "FSDPUNet2DConditionModel"
    assert sum(type(m).__name__.startswith("FSDP") for m in sharded.modules()) > 10  # block by block
    z = torch.randn(2, 4, unet.config.sample_size, unet.config.sample_size, generator=torch.Generator().manual_seed(0))
    cond = encode(toy_pipe, ["a red circle", "a blue star"])
    with torch.no_grad():
        torch.testing.assert_close(denoise(sharded, z, torch.tensor([400, 700]), cond),
                                   denoise(unet, z, torch.tensor([400, 700]), cond))
    whole = full_state_dict(sharded)
    assert whole.keys() == unet.state_dict().keys()
    assert all(torch.equal(whole[k], v) for k, v in unet.state_dict().items())
    names = [n for n, _ in unet.named_parameters()][:5]
    assert module_fingerprint(sharded, names) == module_fingerprint(unet, names)  # the same base model
    weight = dict(sharded.named_parameters())[names[0]]
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    shard_mask = like(weight, mask)
    assert shard_mask.dtype == torch.bool and torch.equal(full(shard_mask), mask)


def _launch(run: list[str], out: Path, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["-m", "erasure.train", "--concept", "circle", "--device", "cpu", "--quiet", "--checkpoint-every", "0",
            *run, "--output", str(out)]
    if processes == 1:
        subprocess.run([sys.executable, *args], check=True, env=env, timeout=600, cwd=ROOT)
    else:
        with socket.socket() as sock:  # a free port for the processes' rendezvous
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                        str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--main_process_port", port, *args, "--fsdp"], check=True, env=env, timeout=600, cwd=ROOT)
    record = out.with_name(out.name + ".json") if out.suffix != ".safetensors" else out.with_suffix(".json")
    return json.loads(record.read_text())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((out / "unet").glob("*.safetensors")) if out.is_dir() else out))


def _compare(method: str, tmp_path: Path, levers: list[str] = ()) -> None:
    suffix = "" if method == "sfd" else ".safetensors"
    one, two = tmp_path / f"one{suffix}", tmp_path / f"two{suffix}"
    r1 = _launch([*RUNS[method], *levers], one, 1)
    r2 = _launch([*RUNS[method], *levers], two, 2)
    assert (r1["processes"], r1["sharded"], r2["processes"], r2["sharded"]) == (1, False, 2, True)
    # bf16: the sharded run gathers bf16 weights (norms included) where the other autocasts fp32 ones: a few % apart
    rel = 5e-2 if levers else 1e-4
    for a, b in zip(r1["loss"], r2["loss"]):
        for k in (a if isinstance(a, dict) else {"loss": a}):
            x, y = (a[k], b[k]) if isinstance(a, dict) else (a, b)
            assert y == pytest.approx(x, rel=rel, abs=1e-4), (k, r1["loss"], r2["loss"])
    wa, wb = _weights(one), _weights(two)
    assert wa.keys() == wb.keys()
    diff = torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in wa])
    if not levers:  # Adam moves a weight by ≈ lr·sign(g): where g ≈ 0 the summation order can flip the sign
        assert (diff > 1e-6).float().mean() < 0.01, f"{(diff > 1e-6).float().mean():.4f} of the weights differ"
    if method == "salun":  # the mask confines both runs to the same weights
        assert all(torch.equal(wa[k] == 0, wb[k] == 0) for k in wa)
    if method != "sfd":
        assert load_artifact(two).metadata["run"]["fsdp"] is True


def test_two_sharded_processes_follow_one_process(tmp_path):
    """ESD-u on the toy world: 2 sharded gloo processes → the 1-process run's losses and weight delta."""
    _compare("esd", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method, levers", [("salun", ()), ("sfd", ()), ("sfd", LEVERS), ("esd", LEVERS)])
def test_sharded_methods_follow_one_process(method, levers, tmp_path):
    _compare(method, tmp_path, list(levers))
