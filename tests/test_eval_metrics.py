"""Evaluation metrics: FID / KID with local extractors, CLIP score, NudeNet counts, toy concept rates."""

import sys

import numpy as np
import pytest
import torch

from adapters.errors import UserError
from erasure.toyworld import Seen, data
from eval.metrics import (EXPOSED_CLASSES, FID, KID, SLD_CLASSES, CLIPScore, NudeNetCounts, ToyConceptRates,
                          clip_preprocess, count_exposed, hwc_uint8_images)
from eval.prompts import PromptRecord


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test."""
    def refuse(*a, **k):
        raise AssertionError("a metric tried to download weights")

    import socket

    import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(fidelity_inception, "load_state_dict_from_url", refuse)  # torchmetrics' default FID path
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def toy_data():
    """Two independent draws of the toy world's data, and uniform noise images."""
    real, scenes = data.make_dataset(128, seed=11)
    other, _ = data.make_dataset(128, seed=12)
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    return real, other, noise, scenes


# ---------------------------------------------------------------------------------------------------------------
# FID / KID


def _fid(real, fake, **kw):
    m = FID(**kw)
    m.update(real, real=True)
    m.update(fake, real=False)
    return float(m.compute())


def test_toy_fid_separates_data_from_noise_and_merges_across_processes(toy_data):
    real, other, noise, _ = toy_data
    same, fresh, bad = _fid(real, real, feature="toy"), _fid(real, other, feature="toy"), _fid(real, noise, feature="toy")
    assert abs(same) < 1e-3 and 5 * fresh < bad, (same, fresh, bad)
    halves = [FID(feature="toy"), FID(feature="toy")]  # two "processes", then merged as a distributed sync would
    for m, sl in zip(halves, (slice(0, 50), slice(50, 128))):
        m.update(real[sl], real=True)
        m.update(torch.from_numpy(noise[sl]).permute(0, 3, 1, 2), real=False)  # NCHW tensors work too
    halves[0].merge_state(halves[1])
    assert float(halves[0].compute()) == pytest.approx(bad, rel=1e-6)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_toy_kid_separates_data_from_noise(toy_data):
    real, other, noise, _ = toy_data

    def kid(fake):
        m = KID(feature="toy", subsets=10, subset_size=16)
        m.update(real, real=True)
        m.update(fake, real=False)
        return float(m.compute()[0])

    assert kid(other) < 0.1 * kid(noise)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A randomly initialised torch-fidelity Inception-v3, saved as a state dict (the real file cannot be fetched)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "load", lambda *a, **k: None)  # no weights to read: keep the random initialisation
    mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    torch.manual_seed(0)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    mp.undo()
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_fid_from_a_local_file(toy_data, inception_file):
    real, _, noise, _ = toy_data
    m = FID(inception_weights=inception_file)
    assert "TF1-compatible bilinear to 299" in m.protocol
    m.update(real[:3], real=True)
    m.update(noise[:3], real=False)
    assert np.isfinite(float(m.compute())) and float(m.compute()) > 0


def test_fid_without_a_local_extractor_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="exactly one feature extractor") as e:
        FID()
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="weights-inception-2015-12-05-6726825d.pth"):
        FID(inception_weights=tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_text("not weights")
    with pytest.raises(UserError, match="junk.pth: not a torch state dict"):
        KID(inception_weights=junk)
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not torch-fidelity Inception-v3 weights"):
        FID(inception_weights=tmp_path / "other.pth")


# ---------------------------------------------------------------------------------------------------------------
# CLIP score


def test_toy_clip_scores_matching_captions_above_mismatched(toy_data):
    real, _, _, scenes = toy_data
    captions = [s.caption for s in scenes]
    match, mismatch = CLIPScore("toy"), CLIPScore("toy")
    match.update(real, captions)
    mismatch.update(real, captions[1:] + captions[:1])
    m, mm = float(match.compute()), float(mismatch.compute())
    assert 0 <= mm < m <= 100 and m - mm > 20, (m, mm)
    per_pair = match.scores(real[:4], captions[:4])
    assert per_pair.shape == (4,) and float(per_pair.min()) >= 0


def test_random_vit_b_32_loads_from_a_local_checkpoint(tmp_path):
    import open_clip

    path = tmp_path / "vit-b-32.pt"
    torch.manual_seed(0)
    torch.save({k: v.half() for k, v in open_clip.create_model("ViT-B-32").state_dict().items()}, path)
    m = CLIPScore("ViT-B-32", path)
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    m.update(images, ["a photo of a cat", "a rocket"])
    assert 0 <= float(m.compute()) <= 100 and int(m.n) == 2


def test_clip_checkpoints_are_local_only(tmp_path):
    with pytest.raises(UserError, match="needs a local checkpoint"):
        CLIPScore("ViT-L-14")
    with pytest.raises(UserError, match="not found"):
        CLIPScore("ViT-L-14", tmp_path / "openai")
    with pytest.raises(UserError, match="unknown CLIP architecture 'RN50'"):
        CLIPScore("RN50", tmp_path / "x.pt")
    (tmp_path / "bad.pt").write_text("nope")
    with pytest.raises(UserError, match="not an open_clip ViT-B-32 checkpoint") as e:
        CLIPScore("ViT-B-32", tmp_path / "bad.pt")
    assert "\n" not in str(e.value)


def test_clip_preprocess_resizes_the_short_side_and_centre_crops():
    x = torch.full((1, 3, 300, 451), 255, dtype=torch.uint8)
    y = clip_preprocess(x, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert y.shape == (1, 3, 224, 224) and torch.allclose(y, torch.ones_like(y), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# NudeNet


class StubDetector:
    """Returns the queued detections, one list per image, and records what it was given."""

    def __init__(self, outputs):
        self.outputs, self.seen = list(outputs), []

    def detect(self, image):
        self.seen.append(image)
        return self.outputs.pop(0)


def _det(cls, score):
    return {"class": cls, "score": score, "box": [0, 0, 4, 4]}


def test_nudenet_counts_all_three_protocols_at_the_threshold():
    outputs = [
        [_det("FEMALE_BREAST_EXPOSED", 0.61), _det("FEMALE_BREAST_EXPOSED", 0.9), _det("FACE_FEMALE", 0.99)],
        [_det("FEET_EXPOSED", 0.6), _det("BELLY_EXPOSED", 0.59)],  # 0.6 counts, 0.59 does not
        [_det("BUTTOCKS_COVERED", 0.95)],  # covered: not nudity
        [],
        [_det("ANUS_EXPOSED", 0.7), _det("MALE_BREAST_EXPOSED", 0.8)],
    ]
    m = NudeNetCounts(detector=StubDetector(outputs))
    m.update(np.zeros((5, 8, 8, 3), np.uint8))
    r = m.compute()
    assert r["images"] == 5 and r["threshold"] == 0.6
    assert r["exposed_parts"] == {**dict.fromkeys(EXPOSED_CLASSES, 0), "FEMALE_BREAST_EXPOSED": 2, "FEET_EXPOSED": 1,
                                  "ANUS_EXPOSED": 1, "MALE_BREAST_EXPOSED": 1}
    assert r["exposed_parts_total"] == 5 and r["images_with_class"]["FEMALE_BREAST_EXPOSED"] == 1
    assert (r["nude_images"], r["nudity_rate"]) == (3, 0.6)  # images 0, 1, 4
    assert (r["sld_images"], r["sld_rate"]) == (2, 0.4)  # feet and male breast are not SLD classes
    strict = NudeNetCounts(threshold=0.8, detector=StubDetector(outputs[:1]))
    strict.update(np.zeros((1, 8, 8, 3), np.uint8))
    assert strict.compute()["exposed_parts_total"] == 1


def test_nudenet_counts_merge_across_processes():
    a = NudeNetCounts(detector=StubDetector([[_det("BELLY_EXPOSED", 0.7)], []]))
    b = NudeNetCounts(detector=StubDetector([[_det("BELLY_EXPOSED", 0.9), _det("BELLY_EXPOSED", 0.8)]]))
    a.update(np.zeros((2, 8, 8, 3), np.uint8))
    b.update(np.zeros((1, 8, 8, 3), np.uint8))
    a.merge_state(b)
    r = a.compute()
    assert (r["images"], r["exposed_parts"]["BELLY_EXPOSED"], r["images_with_class"]["BELLY_EXPOSED"]) == (3, 3, 2)
    assert r["nudity_rate"] == pytest.approx(2 / 3)


def test_count_exposed_lists_and_sld_classes():
    assert len(EXPOSED_CLASSES) == 9 and set(SLD_CLASSES) < set(EXPOSED_CLASSES) and len(SLD_CLASSES) == 5
    c = count_exposed([_det("MALE_GENITALIA_EXPOSED", 0.6)])
    assert c["nude"] and c["sld"] and int(c["boxes"].sum()) == 1


def test_image_shapes_reach_the_detector_as_bgr_hwc_uint8():
    from PIL import Image

    red = np.zeros((6, 5, 3), np.uint8)
    red[..., 0] = 255
    forms = [red[None], torch.from_numpy(red).permute(2, 0, 1)[None].float() / 255, red, Image.fromarray(red),
             np.concatenate([red, np.full((6, 5, 1), 255, np.uint8)], -1)]
    for form in forms:
        [got] = hwc_uint8_images(form)
        np.testing.assert_array_equal(got, red)
    [grey] = hwc_uint8_images(np.full((6, 5), 0.5, np.float32))  # one H×W grey image
    assert grey.shape == (6, 5, 3) and (grey == 128).all()
    stub = StubDetector([[]])
    NudeNetCounts(detector=stub).update(red)
    assert stub.seen[0].shape == (6, 5, 3) and stub.seen[0][0, 0].tolist() == [0, 0, 255]  # BGR, as cv2 reads
    stub = StubDetector([[]])
    NudeNetCounts(detector=stub).update(["some/file.png"])
    assert stub.seen == ["some/file.png"]  # paths go to NudeNet as paths


def test_missing_nudenet_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # import nudenet → ImportError
    m = NudeNetCounts()
    with pytest.raises(UserError, match=r"pip install 'concept-erasure-toolkit\[nudenet\]'"):
        m.update(np.zeros((1, 8, 8, 3), np.uint8))


@pytest.fixture(scope="module")
def photos():
    skimage_data = pytest.importorskip("skimage.data")
    return {name: getattr(skimage_data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}


def test_nudenet_sees_no_exposed_parts_in_ordinary_photos(photos, tmp_path):
    pytest.importorskip("nudenet")
    from PIL import Image

    m = NudeNetCounts()
    dets = m.detect(list(photos.values()))
    m.update(list(photos.values()))
    r = m.compute()
    assert r["images"] == 4 and r["exposed_parts_total"] == 0 and r["nudity_rate"] == 0 and r["sld_rate"] == 0
    assert any(d["class"] == "FACE_FEMALE" and d["score"] > 0.5 for d in dets[0])  # the detector really looked
    path = tmp_path / "astronaut.png"
    Image.fromarray(photos["astronaut"]).save(path)
    from_file = m.detect([str(path)])[0]
    assert [d["class"] for d in from_file] == [d["class"] for d in dets[0]]  # arrays reach it in its colour order
    fresh = [NudeNetCounts().detect([im])[0] for im in photos.values()]  # a new detector per image: same result
    assert fresh == dets


# ---------------------------------------------------------------------------------------------------------------
# toy concept rates


class StubJudge:
    def __init__(self, seen):
        self.seen = seen

    def classify(self, images):
        assert len(images) == len(self.seen)
        return self.seen


def _seen(shapes=(), colours=(), fills=()):
    return Seen(frozenset(shapes), frozenset(colours), frozenset(fills))


def test_toy_concept_rates_arithmetic():
    records = [PromptRecord("a red circle", shapes=("circle",), colour="red"),
               PromptRecord("a blue circle", shapes=("circle",), colour="blue"),
               PromptRecord("a red square", shapes=("square",), colour="red", fill="striped"),
               PromptRecord("a blue star", shapes=("star",), colour="blue")]
    seen = [_seen(["circle"], ["red"]), _seen(), _seen(["square", "circle"], ["red"], ["solid"]), _seen(["square"], ["blue"])]
    m = ToyConceptRates(judge=StubJudge(seen))
    m.update(records, np.zeros((4, 32, 32, 3), np.uint8))
    r = m.compute()
    assert r["circle"]["target"] == {"rate": 0.5, "none_rate": 0.5, "n": 2}
    assert r["circle"]["other"] == {"rate": 0.5, "none_rate": 0.0, "n": 2}  # square kept, star became a square
    assert r["circle"]["unprompted"] == {"rate": 0.5, "n": 2}  # a circle appeared in the square's image
    assert r["red"]["target"]["rate"] == 1.0 and r["red"]["other"] == {"rate": 0.5, "none_rate": 0.5, "n": 2}
    assert r["striped"]["target"]["rate"] == 0.0 and r["striped"]["other"]["n"] == 0
    assert set(r) == set(data.SHAPES) | set(data.COLOURS) | set(data.FILLS)
    assert r["circle"]["kept"] == {"rate": 0.0, "n": 0}  # no prompt names a circle beside another shape


def test_toy_concept_rates_count_what_two_object_prompts_keep_of_their_other_shape():
    """``kept``: on prompts naming the concept and another shape, was the other shape drawn? (erased or not)"""
    records = [PromptRecord("a circle and a square", shapes=("circle", "square")),
               PromptRecord("a circle and a star", shapes=("circle", "star")),
               PromptRecord("a circle and a square", shapes=("circle", "square")),
               PromptRecord("a square", shapes=("square",))]
    seen = [_seen(["square"]), _seen(["circle"]), _seen(["square", "circle"]), _seen(["square"])]
    m = ToyConceptRates(judge=StubJudge(seen))
    m.update(records, np.zeros((4, 32, 32, 3), np.uint8))
    r = m.compute()
    assert r["circle"]["kept"] == {"rate": 2 / 3, "n": 3}  # the star was lost with the circle
    assert r["circle"]["target"]["rate"] == 2 / 3
    assert r["square"]["kept"] == {"rate": 0.5, "n": 2}  # pairs naming a square: the circle drawn once of twice
    assert r["star"]["kept"] == {"rate": 1.0, "n": 1}  # its circle was drawn (the star was not)


def test_toy_concept_rates_with_the_real_judge_on_data_images():
    images, scenes = data.make_dataset(64, seed=5)
    singles = [(im, s.objects[0]) for im, s in zip(images, scenes) if s.kind == "single"]
    records = [PromptRecord("", shapes=(o.shape,), colour=o.colour, fill=o.fill) for _, o in singles]
    m = ToyConceptRates()
    m.update(records, np.stack([im for im, _ in singles]))
    r = m.compute()
    hit = sum(v["target"]["rate"] * v["target"]["n"] for v in r.values()) / sum(v["target"]["n"] for v in r.values())
    assert hit > 0.95 and max(v["unprompted"]["rate"] for v in r.values()) < 0.1
    with pytest.raises(UserError, match="need toy prompt records"):
        m.update([PromptRecord("a cat")], images[:1])
