"""``python -m eval.device_check --device cpu --quick``: every check runs at toy size and the report is written."""

import json

import pytest

from eval import device_check


@pytest.mark.slow
def test_quick_device_check_on_cpu_writes_one_json_and_table(tmp_path):
    rc = device_check.main(["--device", "cpu", "--quick", "--output", str(tmp_path)])
    report = json.loads((tmp_path / "device_check.json").read_text())
    checks = report["checks"]
    assert set(checks) == set(device_check.CHECKS)
    assert rc == 0, {k: v["status"] for k, v in checks.items()}
    assert checks["gpu_tests"]["tests"] > 0 and checks["gpu_tests"]["skipped"] == checks["gpu_tests"]["tests"]
    assert checks["membrane_overhead"]["ratio"]["forward_1"] > 0.5
    assert checks["one_step_speed"]["ratio"]["one_step_vs_teacher_latents"] > 5  # 1 UNet call against 25 × 2
    assert checks["precisions"]["cases"]["bf16/sdpa/spm"] == "ok"
    assert checks["precisions"]["cases"]["no/xformers"] == "skipped: xformers needs CUDA"
    (row,) = checks["training_memory"]["rows"]
    assert row["status"] == "ok" and 0.2 < row["peak_rss_gb"] < 8
    table = (tmp_path / "device_check.md").read_text()
    assert "| one_step_speed | ok |" in table and "## Training memory" in table


def test_device_check_refuses_bad_input(tmp_path, capsys):
    assert device_check.main(["--device", "cpu", "--output", str(tmp_path)]) == 2
    assert "--quick" in capsys.readouterr().err
    assert device_check.main(["--device", "cpu", "--quick", "--only", "nope", "--output", str(tmp_path)]) == 2
    assert "unknown check" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert device_check.main(["--device", "cpu", "--quick", "--output", str(blocker / "sub")]) == 2
    assert "cannot create" in capsys.readouterr().err
