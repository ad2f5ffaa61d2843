"""Concept presets: toy and real, with clear errors when they do not fit the model."""

import pytest

from adapters.errors import UserError
from erasure import concepts
from erasure.toyworld import data


def test_every_toy_concept_has_a_preset_with_aliases_where_they_exist():
    presets = concepts.toy_presets()
    assert set(data.SHAPES) | set(data.COLOURS) | set(data.FILLS) <= set(presets)
    circle = presets["circle"]
    assert circle.default_model == "toy" and circle.is_toy
    assert {"sun", "ball", "coin"} <= set(circle.aliases)
    assert all("circle" in p for p in circle.prompts)
    assert not any(a in " ".join(circle.prompts) for a in circle.aliases), "aliases are held out of training prompts"
    assert "circle" not in circle.substitute and circle.substitute


def test_real_presets_follow_the_papers():
    nudity = concepts.resolve("nudity")
    assert nudity.default_model == "CompVis/stable-diffusion-v1-4"
    assert nudity.prompts == ("nudity",)
    assert nudity.method_overrides["spm"]["eta"] == 3.0
    assert "clothes" in nudity.substitute
    assert concepts.resolve("Van  Gogh").kind == "artist"
    assert concepts.resolve("brad pitt").override == "a middle aged man"


def test_free_text_concepts_work_on_real_models():
    c = concepts.resolve("a cartoon dog", "/some/sd/folder")
    assert c.kind == "free" and c.prompts == ("a cartoon dog",)


@pytest.mark.parametrize("name, model, match", [
    ("circle", "CompVis/stable-diffusion-v1-4", "toy-world concept"),
    ("nudity", "toy", "real-model preset"),
    ("a cartoon dog", "toy", "not a toy-world concept"),
    ("   ", None, "empty"),
])
def test_mismatches_are_clear_errors(name, model, match):
    with pytest.raises(UserError, match=match):
        concepts.resolve(name, model)
