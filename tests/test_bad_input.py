"""Bad input and faults through every command line (erasure.train, eval.generate, eval.toy, eval.sweep, eval.prompts).

The library-level checks live in test_artifact.py, test_eval_prompts.py, test_train_cli.py and test_faults.py; here
each refusal goes through a CLI's ``main(argv)``: exit status 2, exactly one line on stderr (``error: …`` naming the
problem, no traceback), nothing on stdout, no file or folder left in the output location (temp siblings included),
and no code run from a file. A few cases also run as real processes.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# bad files


class _Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _valid(path: Path, kind: str) -> Path:
    from adapters.artifact import save_artifact

    tensors = ({"conv_in.weight": torch.ones(8, 4, 3, 3, dtype=torch.bool)} if kind == "saliency_mask"
               else {"conv_in.weight": torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))})
    return save_artifact(path, tensors, {"kind": kind, "method": "test", "concept": {"name": "circle"}})


def _corrupt(path, kind, marker):
    data = random.Random(0).randbytes(4096)
    path.write_bytes(b"\x7f" + data[1:])  # random bytes (not a pickle opcode first)


def _truncated(path, kind, marker):
    data = _valid(path, kind).read_bytes()
    path.write_bytes(data[: len(data) - 100])  # the header intact, the tensor data cut short


def _pickled(path, kind, marker):
    path.write_bytes(pickle.dumps({"conv_in.weight": _Payload(marker)}, protocol=4))


def _other_base(fingerprint: bool):
    """Made for another base model: its fingerprint says so, or (without one) only its shapes do."""
    def build(path, kind, marker):
        from adapters.artifact import save_artifact

        if kind == "saliency_mask":  # a mask over a weight the toy UNet lacks, or of another shape
            name = "down_blocks.9.resnets.0.conv1.weight" if fingerprint else "conv_in.weight"
            tensors, meta = {name: torch.ones(2, 2, dtype=torch.bool)}, {"kind": kind, "method": "salun"}
        else:  # an SPM membrane (kohya keys) for a UNet whose proj_in takes 999 channels
            layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
            tensors = {f"{layer}.lora_down.weight": torch.zeros(1, 999), f"{layer}.lora_up.weight": torch.zeros(999, 1),
                       f"{layer}.alpha": torch.tensor(1.0)}
            meta = {"kind": "membrane", "method": "spm", "prompts": ["a circle"]}
            if fingerprint:
                meta["base_model"] = {"name": "another-model", "fingerprint": "UNet2DConditionModel:0123456789abcdef"}
        save_artifact(path, tensors, meta)
    return build


def _non_finite(value):
    def build(path, kind, marker):
        from safetensors.torch import save_file

        t = torch.ones(8)
        t[3] = value
        meta = {"kind": kind, "format_version": 1}
        save_file({"conv_in.weight": t}, str(path), metadata={"erasure": json.dumps(meta)})
    return build


def _header_length(path, kind, marker):
    path.write_bytes(struct.pack("<Q", 2**40) + b'{"__metadata__":{}}' + bytes(64))


def _metadata(blob_fn):
    def build(path, kind, marker):
        from safetensors.torch import save_file

        save_file({"w": torch.ones(2)}, str(path), metadata={"erasure": blob_fn(kind)})
    return build


# case → (builder(path, kind, marker), what the error line must contain)
ARTIFACTS = {
    "corrupt": (_corrupt, "corrupt or truncated"),
    "truncated": (_truncated, "corrupt or truncated"),
    "pickle": (_pickled, "pickle"),
    "other-base": (_other_base(fingerprint=True), "made for another base model"),
    "other-shapes": (_other_base(fingerprint=False), "made for another base model"),
    "nan": (_non_finite(float("nan")), "NaN or infinite"),
    "inf": (_non_finite(float("-inf")), "NaN or infinite"),
    "header-2**40": (_header_length, "corrupt or truncated"),
    "metadata-5MB": (_metadata(lambda k: json.dumps({"kind": k, "format_version": 1, "x": "y" * (5 << 20)})),
                     "over the"),
    "metadata-not-json": (_metadata(lambda k: "{'kind': " + k), "not valid JSON"),
}
PROMPT_FILES = {"empty": "", "blank-lines": "\n   \n\t\n\n"}


# ---------------------------------------------------------------------------------------------------------------
# the CLIs, each as (main, argv) for one bad input


SWEEP = """
[sweep]
steps = 1
batch_size = 1
device = "cpu"

[[models]]
name = "m"
base = "toy"
{artifacts}

[[prompt_sets]]
name = "p"
source = {source}
limit = 1

[[metrics]]
name = "rates"
kind = "toy_concept_rates"
concepts = {concepts}
"""


def _sweep_config(tmp: Path, *, artifact: Path | None = None, source: str = "toy:circle/target",
                  concepts=("circle",)) -> str:
    text = SWEEP.format(artifacts=f"artifacts = [{{ path = {json.dumps(str(artifact))} }}]" if artifact else "",
                        source=json.dumps(source), concepts=json.dumps(list(concepts)))
    cfg = tmp / "in" / "sweep.toml"
    cfg.write_text(text)
    return str(cfg)


def _prompt_file(tmp: Path, text: str = "a red circle\n") -> str:
    path = tmp / "in" / "prompts.txt"
    path.write_text(text)
    return str(path)


def _artifact_argv(cli: str, tmp: Path, bad: Path, out: Path) -> list[str]:
    if cli == "train":
        return ["--concept", "circle", "--model", "toy", "--method", "esd", "--mask", str(bad),
                "--output", str(out / "x.safetensors"), "--quiet"]
    if cli == "generate":
        return ["--model", "toy", "--prompts", _prompt_file(tmp), "--output", str(out / "gen"), "--artifact", str(bad),
                "--steps", "1", "--batch-size", "1", "--device", "cpu", "--quiet"]
    if cli == "toy":
        return ["--model", "toy", "--artifact", str(bad), "--concept", "circle", "--steps", "1",
                "--images-per-prompt", "1", "--quiet"]
    return ["--config", _sweep_config(tmp, artifact=bad), "--output", str(out / "sweep"), "--quiet"]


def _main(cli: str):
    if cli == "train":
        from erasure.train import main
    elif cli == "generate":
        from eval.generate import main
    elif cli == "toy":
        from eval.toy import main
    elif cli == "sweep":
        from eval.sweep import main
    else:
        from eval.prompts import main
    return main


def _tree(root: Path) -> list[str]:
    """Every file and folder under ``root`` (hidden ones too), relative."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


@pytest.fixture
def place(tmp_path, monkeypatch):
    """tmp/in holds the inputs, tmp/out is the output location; the working folder is tmp (stray files show)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _refused(cli: str, argv: list[str], tmp: Path, capsys, match: str, *, folders_ok: bool = False) -> str:
    """Run ``cli``'s main in-process: exit 2, one ``error:`` line naming the problem, nothing written."""
    before = (_files if folders_ok else _tree)(tmp)
    capsys.readouterr()
    rc = _main(cli)(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and err.endswith("\n") and err.count("\n") == 1, f"one line expected: {err!r}"
    assert lines[0].startswith("error: ") and match in lines[0], lines[0]
    assert out == "", out
    assert (_files if folders_ok else _tree)(tmp) == before, "nothing may be left behind"
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# the matrix


ARTIFACT_CLIS = ("train", "generate", "toy", "sweep")


@pytest.mark.parametrize("case", list(ARTIFACTS))
@pytest.mark.parametrize("cli", ARTIFACT_CLIS)
def test_bad_artifact_file(cli, case, place, capsys):
    build, match = ARTIFACTS[case]
    kind = "saliency_mask" if cli == "train" else "weight_delta"  # train takes a file as --mask
    bad, marker = place / "in" / "bad.safetensors", place / "in" / "code-ran"
    build(bad, kind, marker)
    if cli == "train" and case.startswith("other"):
        match = "made for another base model: " + ("this model has no weight" if case == "other-base" else
                                                   "'conv_in.weight' is (2, 2) in the file")
    elif case == "other-shapes":
        match = "made for another base model: layer 'lora_unet_down_blocks_0_attentions_0_proj_in' is (999,)"
    _refused(cli, _artifact_argv(cli, place, bad, place / "out"), place, capsys, match)
    assert not marker.exists(), "code from the file ran"


@pytest.mark.parametrize("case", list(PROMPT_FILES))
@pytest.mark.parametrize("cli", ("generate", "prompts", "sweep"))
def test_prompt_file_without_prompts(cli, case, place, capsys):
    prompts = _prompt_file(place, PROMPT_FILES[case])
    argv = {"generate": ["--prompts", prompts, "--output", str(place / "out" / "gen"), "--quiet"],
            "prompts": [prompts],
            "sweep": ["--config", _sweep_config(place, source=prompts), "--output", str(place / "out" / "sweep")]}[cli]
    _refused(cli, argv, place, capsys, "prompts.txt: empty file, no prompts")


def test_train_empty_inline_prompts(place, capsys):
    _refused("train", ["--concept", "circle", "--prompts", " | ", "--output", str(place / "out" / "x.safetensors")],
             place, capsys, "--prompts is empty")


UNKNOWN = {  # cli → (argv, message)
    "train": (["--concept", "notaconcept", "--model", "toy", "--output", "out/x.safetensors"], "not a toy-world concept"),
    "train-default-model": (["--concept", "notaconcept", "--output", "out/x.safetensors"], "not available locally"),
    "toy": (["--concept", "notaconcept", "--steps", "1", "--quiet"], "'notaconcept' is not a toy concept"),
    "generate": (["--prompts", "toy:notaconcept", "--output", "out/gen", "--quiet"], "'notaconcept' is not a toy concept"),
    "prompts": (["toy:notaconcept"], "'notaconcept' is not a toy concept"),
    "sweep": (None, "'notaconcept' is not a toy concept"),
}


@pytest.mark.parametrize("cli", list(UNKNOWN))
def test_unknown_concept(cli, place, capsys):
    argv, match = UNKNOWN[cli]
    if cli == "sweep":  # a metric about a concept the toy world does not have
        argv = ["--config", _sweep_config(place, concepts=["notaconcept"]), "--output", "out/sweep"]
    _refused(cli.partition("-")[0], argv, place, capsys, match)


def _output_argv(cli: str, tmp: Path, out: Path) -> list[str]:
    if cli == "train":
        return ["--concept", "circle", "--model", "toy", "--method", "esd", "--output", str(out / "x.safetensors"),
                "--quiet"]
    if cli == "generate":
        return ["--prompts", _prompt_file(tmp), "--output", str(out), "--steps", "1", "--device", "cpu", "--quiet"]
    return ["--config", _sweep_config(tmp), "--output", str(out), "--quiet"]


OUTPUT_CLIS = ("train", "generate", "sweep")


@pytest.mark.parametrize("cli", OUTPUT_CLIS)
def test_output_under_a_regular_file(cli, place, capsys):
    """An output path whose parent is a file fails for root too (root ignores permission bits)."""
    blocker = place / "out" / "file"
    blocker.write_text("x")
    _refused(cli, _output_argv(cli, place, blocker / "sub"), place, capsys, "file")


@pytest.mark.parametrize("cli", OUTPUT_CLIS)
def test_read_only_output_folder(cli, place, capsys):
    ro = place / "out" / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("permission bits are ignored here (root); the under-a-file case covers this")
        _refused(cli, _output_argv(cli, place, ro / "sub"), place, capsys, "ro")
    finally:
        ro.chmod(0o700)


@pytest.fixture
def disk_full(monkeypatch, place):
    """Every write under the test's folder fails with ENOSPC after half its bytes, as on a full disk: the safetensors
    writer (artifacts) and the file object of adapters.artifact.write_bytes_atomic (run records, run.json, PNGs)."""
    import safetensors.torch

    import adapters.artifact as artifact

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # what made it to disk before the space ran out
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_fdopen = os.fdopen

    class _Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        if "w" in mode and os.readlink(f"/proc/self/fd/{fd}").startswith(str(place)):
            return _Full(f)
        return f

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(artifact.os, "fdopen", fdopen)


@pytest.mark.parametrize("cli", OUTPUT_CLIS)
def test_disk_full_on_write(cli, place, disk_full, monkeypatch, capsys):
    """→ one line naming the full disk; no file under its final name, no temp sibling (folders made before the
    first write may stay)."""
    if cli == "train":  # no training: the artifact of 0 steps is written (and fails)
        import erasure.engine

        monkeypatch.setattr(erasure.engine, "fit", lambda method, **kw: [])
    _refused(cli, _output_argv(cli, place, place / "out" / "o"), place, capsys, "No space left on device",
             folders_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# real processes: the interpreter's own exit status and stderr, no traceback


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _one_line_exit_2(r: subprocess.CompletedProcess, match: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: ") and match in r.stderr, r.stderr
    assert r.stdout == "", r.stdout


def test_process_train_unknown_concept(tmp_path):
    r = _run("erasure.train", "--concept", "notaconcept", "--model", "toy", "--output", "out/x.safetensors",
             cwd=tmp_path)
    _one_line_exit_2(r, "not a toy-world concept")
    assert _tree(tmp_path) == []


def test_process_toy_refuses_a_pickle_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    _pickled(tmp_path / "membrane.safetensors", "membrane", marker)
    r = _run("eval.toy", "--concept", "circle", "--artifact", "membrane.safetensors", "--quiet", cwd=tmp_path)
    _one_line_exit_2(r, "pickle")
    assert not marker.exists() and _tree(tmp_path) == ["membrane.safetensors"]


def test_process_generate_empty_prompt_file(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n\n")
    r = _run("eval.generate", "--prompts", "prompts.txt", "--output", "out", cwd=tmp_path)
    _one_line_exit_2(r, "prompts.txt: empty file, no prompts")
    assert _tree(tmp_path) == ["prompts.txt"]
