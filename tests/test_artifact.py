"""Artifacts: safetensors only, self-describing, validated on load, written atomically."""

import json
import os
import pickle
import struct

import pytest
import torch

from adapters.artifact import FORMAT_VERSION, check_fits, load_artifact, module_fingerprint, save_artifact
from adapters.errors import UserError


def _meta(**kw):
    return {"kind": "weight_delta", "method": "esd", "concept": "circle", "prompts": ["a circle"], **kw}


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    t = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5, dtype=torch.float32)}
    path = save_artifact(tmp_path / "x.safetensors", t, _meta(config={"eta": 1.0}))
    art = load_artifact(path)
    assert art.kind == "weight_delta" and art.metadata["format_version"] == FORMAT_VERSION
    assert art.metadata["config"] == {"eta": 1.0} and art.metadata["prompts"] == ["a circle"]
    assert art.raw_metadata["format"] == "pt" and "version" in art.metadata
    for k in t:
        assert torch.equal(art.tensors[k], t[k])
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"], "no temp files left behind"


def test_pickle_files_are_refused_without_unpickling(tmp_path):
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(UserError, match="pickle"):
        load_artifact(evil)
    pt = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, pt)
    with pytest.raises(UserError, match="pickle"):
        load_artifact(pt)
    # a pickle that would run code when unpickled (here: create a marker file) is refused before any unpickling
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    hostile = tmp_path / "hostile.safetensors"
    hostile.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match="pickle"):
        load_artifact(hostile)
    assert not marker.exists()


def test_a_header_length_starting_with_the_pickle_byte_still_loads(tmp_path):
    """A safetensors header of 128 + 256·k bytes begins with byte 0x80, pickle's first byte: such files (one in 32 of
    our membranes) were refused as pickles; the JSON brace after the length tells them apart."""
    path = tmp_path / "x.safetensors"
    for pad in range(300):
        save_artifact(path, {"w": torch.ones(2)}, _meta(note="x" * pad))
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length whose first byte is 0x80")
    assert torch.equal(load_artifact(path).tensors["w"], torch.ones(2))


@pytest.mark.parametrize("cut", [0, 4, 20, -3])
def test_truncated_files_are_refused(tmp_path, cut):
    path = save_artifact(tmp_path / "x.safetensors", {"w": torch.randn(16, 16)}, _meta())
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(UserError, match="truncated|corrupt"):
        load_artifact(path)


def test_hostile_header_length_is_refused_unread(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_artifact(path)


def test_nan_and_inf_are_refused(tmp_path):
    bad = torch.ones(4)
    bad[2] = float("nan")
    path = save_artifact(tmp_path / "x.safetensors", {"w": bad}, _meta())
    with pytest.raises(UserError, match="NaN or infinite"):
        load_artifact(path)


def test_metadata_is_validated(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"erasure": "{not json"})
    with pytest.raises(UserError, match="not valid JSON"):
        load_artifact(path)
    save_file({"w": torch.ones(2)}, str(path), metadata={"erasure": json.dumps({"kind": "weight_delta", "format_version": 99})})
    with pytest.raises(UserError, match="newer than this toolkit"):
        load_artifact(path)
    save_file({"w": torch.ones(2)}, str(path), metadata={"erasure": json.dumps({"kind": "rootkit", "format_version": 1})})
    with pytest.raises(UserError, match="unknown artifact kind"):
        load_artifact(path)
    save_file({"w": torch.ones(2)}, str(path), metadata={"erasure": json.dumps({"kind": "weight_delta", "format_version": 1, "x": "y" * (2 << 20)})})
    with pytest.raises(UserError, match="over the"):
        load_artifact(path)
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(UserError, match="no 'erasure' metadata"):
        load_artifact(path)
    assert load_artifact(path, allow_missing_metadata=True).metadata == {}


def test_kind_is_checked(tmp_path):
    path = save_artifact(tmp_path / "x.safetensors", {"w": torch.ones(2)}, _meta())
    with pytest.raises(UserError, match="expected membrane"):
        load_artifact(path, kind="membrane")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_artifact(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="is a folder"):
        load_artifact(tmp_path)


def test_unwritable_output_is_a_user_error_and_leaves_nothing(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: simulate with a path under a file instead
            target = tmp_path / "file"
            target.write_text("x")
            out = target / "x.safetensors"
        else:
            out = ro / "x.safetensors"
        with pytest.raises(UserError, match="cannot write"):
            save_artifact(out, {"w": torch.ones(2)}, _meta())
    finally:
        os.chmod(ro, 0o700)
    with pytest.raises(UserError, match=".safetensors files only"):
        save_artifact(tmp_path / "x.pt", {"w": torch.ones(2)}, _meta())


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(UserError, match="No space left"):
        save_artifact(tmp_path / "x.safetensors", {"w": torch.ones(2)}, _meta())
    assert list(tmp_path.iterdir()) == []


def test_check_fits_names_the_mismatch(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    meta = _meta(base_model={"id": "x", "fingerprint": module_fingerprint(net, ["0.weight"])})
    ok = load_artifact(save_artifact(tmp_path / "ok.safetensors", {"0.weight": torch.zeros(3, 4)}, meta))
    check_fits(ok, net)
    other = torch.nn.Sequential(torch.nn.Linear(5, 3))
    with pytest.raises(UserError, match=r"another base model: '0.weight' is \(3, 4\) in the file, \(3, 5\) here"):
        check_fits(ok, other)
    missing = load_artifact(save_artifact(tmp_path / "m.safetensors", {"9.weight": torch.zeros(1)}, _meta()))
    with pytest.raises(UserError, match="has no weight '9.weight'"):
        check_fits(missing, net)


def test_written_artifacts_are_ordinary_files(tmp_path):
    """Atomic writes go through a private temp file; the artifact itself gets the usual permissions (umask)."""
    import os

    from adapters.artifact import save_artifact

    old = os.umask(0o022)
    try:
        path = save_artifact(tmp_path / "a.safetensors", {"w": torch.zeros(2)}, {"kind": "weight_delta"})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"], "no temp file left"
