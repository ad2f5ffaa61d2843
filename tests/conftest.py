"""Shared fixtures: offline hub, accelerate reset, and the toy world erased once per test run."""

import os

# Set before anything imports huggingface_hub / transformers: a missing model must fail at once, not after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps a per-process singleton; every test starts without one."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


@pytest.fixture(scope="session")
def judge():
    from erasure.toyworld import load_judge

    return load_judge()


@pytest.fixture(scope="session")
def esd_circle(tmp_path_factory):
    """ESD erasing 'circle' from the toy world, trained once per test run with the CLI defaults."""
    from erasure.train import main

    out = tmp_path_factory.mktemp("esd") / "circle-esd.safetensors"
    assert main(["--concept", "circle", "--method", "esd", "--output", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def base_circle_report(judge):
    """The base toy model's circle rates (2 images per prompt, the README's measurement budget)."""
    import pipelines
    from eval.toy import concept_report

    return concept_report(pipelines.load("toy"), judge, "circle", images_per_prompt=2)


@pytest.fixture(scope="session")
def circle_reports(judge, esd_circle, base_circle_report):
    """Judge-measured circle rates of the base toy model and of the ESD-erased one (same prompts and seeds)."""
    import pipelines
    from eval.toy import concept_report

    pipe = pipelines.load("toy")
    pipelines.apply(pipe, esd_circle)
    erased = concept_report(pipe, judge, "circle", images_per_prompt=2)
    return base_circle_report, erased


def _erase_and_report(tmp_path_factory, judge, name, argv):
    import pipelines
    from erasure.train import main
    from eval.toy import concept_report

    out = tmp_path_factory.mktemp(name) / f"circle-{name}.safetensors"
    assert main(["--concept", "circle", "--output", str(out), "--quiet", *argv]) == 0
    pipe = pipelines.load("toy")
    pipelines.apply(pipe, out)
    report = concept_report(pipe, judge, "circle", images_per_prompt=2)
    return out, report


@pytest.fixture(scope="session")
def salun_circle(tmp_path_factory, judge):
    """SalUn erasing 'circle' with the CLI's toy defaults (mask computed): (artifact, judge report)."""
    return _erase_and_report(tmp_path_factory, judge, "salun", ["--method", "salun"])


@pytest.fixture(scope="session")
def unmasked_circle(tmp_path_factory, judge):
    """The same loss and budget without a saliency mask (--mask-fraction 1.0)."""
    return _erase_and_report(tmp_path_factory, judge, "unmasked", ["--method", "salun", "--mask-fraction", "1.0"])


def pytest_report_header(config):
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run wherever CUDA is present and are skipped, with the reason, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
