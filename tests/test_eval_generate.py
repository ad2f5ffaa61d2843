"""Generation to a folder: seeded PNGs + manifest, resume after a kill, shards that merge to one process's output."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

import pipelines
from adapters.errors import UserError
from eval.generate import MANIFEST, RUN_FILE, generate, generate_to_folder, main, read_manifest
from eval.prompts import PromptRecord

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
# own seeds and guidance on some rows (as I2P rows have): batches by guidance → [0, 1], [3, 5], [2, 4]
RECORDS = [PromptRecord("a red circle"), PromptRecord("a blue square", seed=1234),
           PromptRecord("a striped green star", guidance=3.0), PromptRecord("a yellow triangle"),
           PromptRecord("a sun", seed=7, guidance=3.0), PromptRecord("a pink heart")]


@pytest.fixture(scope="module")
def pipe():
    return pipelines.load("toy")


def _run(pipe, out, records=RECORDS, **kw):
    kw = {"seed": 100, "steps": STEPS, "guidance": 5.0, "batch_size": 2, **kw}
    return generate_to_folder(pipe, records, out, **kw)


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.fixture(scope="module")
def reference(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return out, _run(pipe, out)


def test_manifest_lists_every_image_with_its_seed_guidance_and_hash(reference):
    out, result = reference
    assert result == {"total": 6, "shard": [0, 1], "generated": 6, "skipped": 0, "complete": True, "output": str(out)}
    assert sorted(_files(out)) == [f"{i:05d}.png" for i in range(6)] + [MANIFEST, RUN_FILE]
    lines = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert [e["index"] for e in lines] == list(range(6))
    assert [e["seed"] for e in lines] == [100, 1234, 102, 103, 7, 105]
    assert [e["guidance"] for e in lines] == [5.0, 5.0, 3.0, 5.0, 3.0, 5.0]
    assert [e["prompt"] for e in lines] == [r.text for r in RECORDS]
    for e in lines:
        assert list(e) == ["index", "prompt", "seed", "guidance", "file", "sha256"]
        assert e["sha256"] == hashlib.sha256((out / e["file"]).read_bytes()).hexdigest()
        assert np.asarray(Image.open(out / e["file"])).shape == (32, 32, 3)
    assert read_manifest(out) == lines
    settings = json.loads((out / RUN_FILE).read_text())["settings"]
    assert (settings["steps"], settings["seed"], settings["prompts"]) == (STEPS, 100, 6)


def test_folder_images_are_the_images_generate_returns(pipe, tmp_path):
    texts = ["a red circle", "a blue square", "a dotted cyan cross", "a moon"]
    _run(pipe, tmp_path, texts, seed=3)
    saved = np.stack([np.asarray(Image.open(tmp_path / f"{i:05d}.png")) for i in range(4)])
    np.testing.assert_array_equal(saved, generate(pipe, texts, seed=3, steps=STEPS, guidance=5.0, batch_size=2))


class _Crash(Exception):
    pass


def test_resume_after_a_crash_gives_identical_files(pipe, reference, tmp_path):
    written = []

    def crash_after_three(entry):
        written.append(entry["index"])
        if len(written) == 3:  # mid-batch: image 3 of batch [3, 5] is in place, 5 is not
            raise _Crash

    with pytest.raises(_Crash):
        _run(pipe, tmp_path, on_image=crash_after_three)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00000.png", "00001.png", "00003.png", "manifest-shard0of1.jsonl", RUN_FILE]  # no temp files
    resumed = []
    result = _run(pipe, tmp_path, on_image=lambda e: resumed.append(e["index"]))
    assert (result["generated"], result["skipped"], result["complete"]) == (3, 3, True)
    assert resumed == [5, 2, 4]  # finished images are not written again
    assert _files(tmp_path) == _files(reference[0])


def test_two_shards_merge_to_the_one_process_result(pipe, reference, tmp_path):
    first = _run(pipe, tmp_path, shard_index=1, num_shards=2)
    assert (first["generated"], first["complete"]) == (2, False)  # batch [3, 5]
    assert not (tmp_path / MANIFEST).exists() and (tmp_path / "manifest-shard1of2.jsonl").exists()
    second = _run(pipe, tmp_path, shard_index=0, num_shards=2)
    assert (second["generated"], second["complete"]) == (4, True)  # batches [0, 1] and [2, 4]
    assert _files(tmp_path) == _files(reference[0])


def test_resuming_with_other_settings_is_refused(pipe, reference):
    with pytest.raises(UserError, match=r"other settings \(steps: 4 there, 5 now\)"):
        _run(pipe, reference[0], steps=5)
    with pytest.raises(UserError, match="prompts_sha256"):
        _run(pipe, reference[0], records=RECORDS[:5] + [PromptRecord("a pink heart", seed=1)])


# ---------------------------------------------------------------------------------------------------------------
# the command line, in other processes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CLI subprocesses run with one torch thread; so does this process here, so that images made in and out of
    process match bit for bit (the thread count changes floating-point summation order)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}


def _cli_args(prompts, out, batch_size=1):
    return ["--model", "toy", "--prompts", str(prompts), "--output", str(out), "--steps", str(STEPS),
            "--batch-size", str(batch_size), "--quiet"]


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    """24 prompts through the CLI, uninterrupted, in this process."""
    folder = tmp_path_factory.mktemp("cli")
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"a {c} {s}\n" for c in ("red", "blue", "orange")
                               for s in ("circle", "square", "star", "heart", "diamond", "cross", "triangle", "crescent")))
    assert main(_cli_args(prompts, folder / "ref")) == 0
    return prompts, folder / "ref"


def test_sigkill_mid_run_then_resume_gives_identical_files(cli_reference, tmp_path):
    prompts, ref = cli_reference
    proc = subprocess.Popen([sys.executable, "-m", "eval.generate", *_cli_args(prompts, tmp_path)], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = tmp_path / "manifest-shard0of1.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = len(read_manifest(tmp_path))
    assert 3 <= done < 24 and not (tmp_path / MANIFEST).exists()
    assert all(p.suffix in (".png", ".jsonl", ".json") for p in tmp_path.iterdir())  # no half-written files
    assert main(_cli_args(prompts, tmp_path)) == 0
    assert _files(tmp_path) == _files(ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_processes_merge_to_the_one_process_result(cli_reference, tmp_path):
    prompts, ref = cli_reference
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "eval.generate", *_cli_args(prompts, tmp_path), "--device", "cpu"]
    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["shard"] == [0, 2] and summary["complete"] is True
    assert _files(tmp_path) == _files(ref)


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["--prompts", str(tmp_path / "none.txt"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "none.txt: no such prompt file" in err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["--prompts", str(prompts), "--output", str(tmp_path / "o"), "--artifact", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "cannot read artifact" in err and "x.safetensors" in err
    assert main(["--prompts", str(prompts), "--output", str(tmp_path / "o"), "--shard-index", "0"]) == 2
    assert "--shard-index and --num-shards go together" in capsys.readouterr().err
