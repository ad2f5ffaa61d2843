"""``python -m eval.bench``: ratios measured side by side, on the toy UNet (the SD-1.x-shaped one is too big for the
suite; the README reports its numbers)."""

import json

import pytest

from eval import bench


@pytest.fixture(scope="module")
def report():
    return bench.run(["toy"], rounds=1, iters=1, memory=True)


def test_bench_reports_every_ratio_as_the_quotient_of_its_timings(report):
    """Each ratio is its configuration's measured time over the bare UNet's (or the peft step's), as reported side
    by side (no timing thresholds in unit tests: house rule); every target names a ratio the bench measures."""
    toy = report["models"]["toy"]
    fwd, train = toy["forward"], toy["train_step"]
    assert set(fwd["ratio"]) == {"forward_1", "forward_8_transport", "forward_merged", "forward_merged_kept"}
    assert set(fwd["seconds"]) == {"none", "1", "8_transport", "merged", "merged_kept"}
    for name, ratio in fwd["ratio"].items():
        want = fwd["seconds"][name.removeprefix("forward_")] / fwd["seconds"]["none"]
        assert ratio == pytest.approx(want, rel=0.02, abs=1e-3), name  # seconds are rounded to 10 µs
    want = train["seconds"]["membrane"] / train["seconds"]["peft_lora"]
    assert train["ratio"]["train_step_vs_peft"] == pytest.approx(want, rel=0.02, abs=1e-3)
    measured = {*fwd["ratio"], *train["ratio"], "one_step_vs_teacher_images"}  # the last: --one-step (test below)
    assert set(report["targets"]) <= measured, set(report["targets"]) - measured


def test_peft_baseline_trains_the_same_layers_at_the_same_rank(report):
    n = report["models"]["toy"]["train_step"]["trainable_parameters"]
    assert n["membrane"] == n["peft_lora"] > 0


def test_training_needs_more_memory_than_inference(report):
    mem = report["models"]["toy"]["memory"]
    assert mem["rss_step_increase_mib"]["train"] > mem["rss_step_increase_mib"]["inference"] >= 0
    peak = mem["rss_peak_mib"]
    assert mem["ratio"]["train_vs_inference_peak"] == pytest.approx(peak["train"] / peak["inference"], rel=0.01)


def test_cli_rejects_unknown_models(capsys):
    assert bench.main(["--models", "sd9"]) == 2
    assert "unknown bench model" in capsys.readouterr().err


def test_cli_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda *a, **k: {"models": {}})
    out = tmp_path / "bench.json"
    assert bench.main(["--models", "toy", "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == {"models": {}}


def test_cli_unwritable_output_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run", lambda *a, **k: {"models": {}})
    out = tmp_path / "missing-folder" / "bench.json"
    assert bench.main(["--models", "toy", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write") and "\n" not in err and not out.parent.exists()


def test_one_step_generator_speed_is_reported_side_by_side():
    r = bench.bench_one_step("toy", "cpu", batch=2, rounds=1, iters=1)
    assert set(r["images_per_second"]) == {"teacher_images", "one_step_images", "teacher_latents", "one_step_latents"}
    assert r["teacher"].startswith("25-step")
    assert set(r["ratio"]) == {"one_step_vs_teacher_images", "one_step_vs_teacher_latents"}
    ips = r["images_per_second"]  # the speed-up is the quotient of the two measured throughputs
    for kind in ("images", "latents"):
        want = ips[f"one_step_{kind}"] / ips[f"teacher_{kind}"]
        assert r["ratio"][f"one_step_vs_teacher_{kind}"] == pytest.approx(want, rel=0.02, abs=0.01), kind


def test_only_one_step_skips_the_membrane_timings(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(bench, "bench_one_step", lambda model, *a, **k: seen.setdefault(model, k) or {"ratio": {}})
    for fn in ("bench_forward", "bench_train_step", "bench_memory"):
        monkeypatch.setattr(bench, fn, lambda *a, **k: pytest.fail("only the one-step timing was asked for"))
    assert bench.main(["--models", "toy,sd1", "--only-one-step", "--size", "256"]) == 0
    assert set(json.loads(capsys.readouterr().out)["models"]["sd1"]) == {"one_step"}
    assert seen["sd1"]["size"] == 256 and seen["toy"]["size"] is None, "the toy model keeps its own 32 px"


def test_bad_size_is_one_line(capsys):
    assert bench.main(["--models", "sd1", "--only-one-step", "--size", "100"]) == 2
    assert capsys.readouterr().err.strip() == "error: --size 100: use a multiple of 8, at least 64"


def test_memory_bench_measures_one_tiny_step_in_a_child_process(tmp_path, capsys):
    out = tmp_path / "mem.json"
    assert bench.main(["--memory", "--models", "tiny", "--methods", "spm", "--levers", "levers", "--cache",
                 str(tmp_path / "models"), "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert (row["model"], row["method"], row["levers"], row["status"]) == ("tiny", "spm", "levers", "ok")
    assert 0.2 < row["peak_rss_gb"] < report["limit_gb"]  # the child's own peak, not this process's
    table = out.with_suffix(".md").read_text()
    assert f"| tiny | spm | levers | {row['peak_rss_gb']} |" in table


def test_memory_bench_reports_a_case_over_the_limit(tmp_path):
    from eval import bench_memory

    report = bench_memory.bench(["tiny"], ["esd"], tmp_path, limit_gb=0.2, lever_sets=("fp32",))
    (row,) = report["rows"]
    assert row["status"] == "stopped above 0.2 GB"  # importing torch alone passes 0.2 GB
    assert "| > " in bench_memory.table(report)


def test_memory_bench_runs_an_adversarial_step_when_asked(tmp_path):
    """--adversarial: the case trains with an inner attack at its first step (the run record says so)."""
    from eval import bench_memory

    opts = bench_memory.case_options(tmp_path, "sfd", "levers", tmp_path / "s", adversarial=True)
    assert opts["adversarial"] and opts["attack_warmup"] == 0 and opts["optimizer"] == "factored"
    report = bench_memory.bench(["tiny"], ["esd"], tmp_path, lever_sets=("fp32",), adversarial=True)
    (row,) = report["rows"]
    assert row["status"] == "ok" and row["adversarial"] is True
    assert "| tiny | esd | fp32 + adversarial |" in bench_memory.table(report)


@pytest.mark.parametrize("argv, word", [(["--methods", "dance"], "method"), (["--models", "sd9"], "model"),
                                         (["--levers", "turbo"], "lever set"),
                                         (["--adversarial", "--methods", "uce"], "method")])
def test_memory_bench_rejects_unknown_names(argv, word, capsys):
    assert bench.main(["--memory", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"unknown --memory {word}" in err
