"""Score Forgetting Distillation measured on the toy world (slow: one distillation at the toy defaults, shared by the
tests of this file; its time is in the README's test section): the one-step student forgets "circle" (also in its aliases), keeps the
other shapes, colours and the image distribution, and an SPM membrane trained on the teacher works on it too."""

import json

import pytest

from erasure.train import main
from eval.toy import erasure_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("sfd-toy") / "circle-sfd"
    assert main(["--concept", "circle", "--method", "sfd", "--output", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def student_report(student, judge):
    """Teacher (25 DDIM steps, CFG) vs student (one step), same prompts and seeds, 2 images per prompt."""
    return erasure_report("toy", [], ["circle"], judge, erased_model=str(student), images_per_prompt=2)


def test_student_forgets_the_concept_and_its_aliases(student_report):
    teacher = student_report["concepts"]["circle"]["base"]
    pupil = student_report["concepts"]["circle"]["erased"]
    assert teacher["target"]["rate"] >= 0.9 and teacher["alias"]["rate"] >= 0.9, "the teacher draws circles"
    assert pupil["target"]["rate"] <= 0.05, pupil["target"]
    assert pupil["alias"]["rate"] <= 0.10, pupil["alias"]


def test_student_keeps_the_other_shapes_and_colours(student_report):
    rest = student_report["rest"]
    assert rest["n_prompts"] >= 150, "every single-object prompt without a circle"
    assert rest["erased"]["shape"]["rate"] >= 0.85, rest["erased"]["shape"]
    assert rest["erased"]["colour"]["rate"] >= 0.90, rest["erased"]["colour"]


@pytest.mark.xfail(strict=True, reason="a goal SFD is not re-tuned for on the current toy world yet: see "
                   "docs/methods/sfd.md (issues 3, 6 and 29)")
def test_student_fid_is_within_1_5x_of_the_teacher(student_report):
    """The issue's bar: the student's toy FID (against data images drawn for the same prompts, judge features, same
    sample count) at most 1.5× the 25-step teacher's. The measured ratios, on this world and the previous one, are in
    docs/methods/sfd.md."""
    rest = student_report["rest"]
    assert rest["erased"]["fid"] <= 1.5 * rest["base"]["fid"], (rest["erased"]["fid"], rest["base"]["fid"])


def test_run_record_states_the_toy_defaults(student):
    record = json.loads(student.with_name(student.name + ".json").read_text())
    mc = record["method_config"]
    assert (mc["steps"], mc["batch_size"]) == (400, 8) and len(record["loss"]) == 400
    assert (mc["cfg_train_fake"], mc["cfg_eval_fake"], mc["cfg_eval_real"], mc["ema_halflife_kimg"]) == (2, 2, 2, 0.5)
    assert (mc["t_min"], mc["t_max"], mc["t_init"]) == (20, 700, 625)
    assert all(isinstance(x["generator"], float) and isinstance(x["fake"], float) for x in record["loss"])


def test_a_membrane_trained_on_the_teacher_transfers_to_the_student(student, judge, tmp_path_factory):
    """An SPM membrane erasing "star", trained on the 25-step teacher, attached to the one-step student (the same
    pipelines.attach_membranes, facilitated transport included) lowers the student's star rate."""
    membrane = tmp_path_factory.mktemp("spm-star") / "star-spm.safetensors"
    assert main(["--concept", "star", "--method", "spm", "--output", str(membrane), "--quiet"]) == 0
    report = erasure_report(str(student), [str(membrane)], ["star"], judge, images_per_prompt=2)
    before = report["concepts"]["star"]["base"]["target"]["rate"]
    after = report["concepts"]["star"]["erased"]["target"]["rate"]
    assert before >= 0.8, "the student draws stars"
    assert after <= 0.5 * before, (before, after)
