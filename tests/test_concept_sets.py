"""Concept sets: several concepts erased in one run (a '+'-joined name, a list, a repeated --concept, a list
preset), each member keeping its own substitute outside the set, the training data drawn from every member."""

import json
import re

import pytest

from adapters.errors import UserError
from erasure import concepts, data, resolve
from erasure.toyworld import data as toy
from erasure.train import main

SET = ["circle", "square", "triangle"]


def _words(text):
    return set(re.findall(r"[a-z]+", text))


def test_every_spelling_of_a_set_resolves_to_the_same_members():
    by_list = concepts.resolve(SET, "toy")
    assert by_list.names == tuple(SET) and by_list.name == "circle+square+triangle"
    assert concepts.resolve("circle + Square+triangle", "toy").names == by_list.names
    preset = concepts.resolve("toy-shapes:3", "toy")
    assert preset.names == by_list.names and preset.name == "toy-shapes:3"
    assert concepts.resolve("toy-colours:7", "toy").names == tuple(toy.COLOURS)[:7]
    with pytest.raises(UserError, match="every shape of the toy world"):
        concepts.resolve("toy-shapes", "toy")
    assert concepts.resolve("circle+circle", "toy").members == (), "a set of one is that concept"
    assert by_list.prompts == tuple(p for n in SET for p in concepts.resolve(n).prompts)


def test_members_are_steered_to_words_outside_the_set():
    s = concepts.resolve(SET, "toy")
    words = s.words()
    assert set(words) == set(SET) and not set(words.values()) & set(SET)
    assert len(set(words.values())) == 3, "each member its own substitute"
    assert concepts.resolve("circle").words() == {"circle": "square"}, "a single concept keeps its preset's"
    assert s.swap(["a red circle and a blue triangle"]) == [f"a red {words['circle']} and a blue {words['triangle']}"]
    assert not any(_words(a) & set(SET) for a in s.anchors)
    assert {"sun", "box", "pyramid"} <= set(s.aliases)


def test_set_training_data_cover_every_member_and_keep_the_others_clean():
    s = concepts.resolve(SET, "toy")
    pairs = s.scene_pairs(30, seed=0)
    named = [next(n for n in SET if n in _words(p)) for p, _ in pairs]
    assert set(named) == set(SET), "pairs name every member"
    assert not any(_words(other) & set(SET) for _, other in pairs), "the other object is never erased too"
    remain, forget, over = s.distillation_prompts(64, seed=0)
    assert all(_words(f) & set(SET) for f in forget) and {n for f in forget for n in SET if n in _words(f)} == set(SET)
    assert not any(_words(o) & set(SET) for o in over), "override prompts name no member"
    assert not any(_words(r) & set(SET) for r in remain)
    assert not any(_words(c) & set(SET) for c in s.anchor_captions(0, 200))


def test_a_single_concept_draws_the_same_data_as_before_sets_existed():
    """One concept through the set-aware code: the toy data of the original single-concept functions."""
    c = concepts.resolve("circle")
    rng = toy.np.random.default_rng(1)
    assert c.scene_pairs(5, seed=0) == [toy.concept_pair("circle", rng) for _ in range(5)]
    assert c.anchor_captions(3, 50) == toy.captions_without("circle", 50, toy.np.random.default_rng(3))


def test_real_list_presets_carry_the_papers_lists_and_recipes():
    artists = concepts.resolve("artists-10")
    assert len(artists.names) == 10 and "johannes vermeer" in artists.names and artists.kind == "artist"
    assert artists.method_overrides["uce"] == {"guide": "art"}
    celebs = concepts.resolve("celebrities-10")
    assert len(celebs.names) == 10 and {m.override for m in celebs.members} == {"a person"}
    explicit = concepts.resolve("explicit-content")
    assert explicit.prompts == ("nudity", "naked", "erotic", "sexual")
    assert explicit.method_overrides["spm"]["eta"] == 3.0 and "salun" not in explicit.method_overrides
    mixed = concepts.resolve(["brad pitt", "angelina jolie"])
    remain, forget, over = mixed.distillation_prompts(8, 0)
    assert dict(zip(forget, over))["a photo of brad pitt"] == "a photo of a middle aged man"
    assert dict(zip(forget, over))["a photo of angelina jolie"] == "a photo of a middle aged woman"


def test_real_set_salun_pairs_each_forget_prompt_with_its_members_substitute(monkeypatch):
    seen = {}

    def fake(pipe, prompts, subs, anchors, n_forget, n_retain, seed, sampling):
        seen.update(zip(prompts, subs))
        return None, None, []

    monkeypatch.setattr(data, "generated_examples", fake)
    concepts.resolve(["brad pitt", "angelina jolie"]).examples(None, 4, 4, 0)
    assert seen["brad pitt"] == "a photo of a middle aged man"
    assert seen["a portrait of angelina jolie"] == "a photo of a middle aged woman"


@pytest.mark.parametrize("name, model, match", [
    (["circle", "nudity"], None, "mixes toy-world and real-model"),
    ("toy-shapes:0", "toy", "from 1 to 8"),
    ("toy-shapes:x", "toy", "from 1 to 8"),
    ("circle+", "toy", "empty"),
    ("toy-shapes:2", "/some/sd", "toy-world concept"),
    ("artists-10", "toy", "real-model preset"),
])
def test_bad_sets_are_clear_errors(name, model, match):
    with pytest.raises(UserError, match=match):
        concepts.resolve(name, model)


def test_prompts_option_is_refused_for_a_set():
    with pytest.raises(UserError, match="members'"):
        resolve(SET, method="esd", prompts="a circle")


def test_repeated_concept_flag_makes_one_run(capsys):
    assert main(["--concept", "circle", "--concept", "star", "--method", "uce", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["run"]["concept"] == "circle+star"
    assert out["run"]["output"] == "outputs/circle+star-uce.safetensors"
    assert [m["name"] for m in out["concept"]["members"]] == ["circle", "star"]
    assert main(["--concept", "toy-shapes:9", "--dry-run"]) == 2
    assert "toy-shapes takes :N" in capsys.readouterr().err


def test_long_sets_get_a_short_output_name():
    plan = resolve("celebrities-10+artists-10", method="uce")
    assert plan.output.name == "adam_driver+19-more-uce.safetensors"


def test_one_uce_edit_erases_three_toy_shapes_and_keeps_the_rest(tmp_path, judge):
    """toy-shapes:3 in one closed-form edit: each member gone from its prompts and aliases, the other shapes kept."""
    import pipelines
    from eval.toy import concept_report

    out = tmp_path / "three.safetensors"
    assert main(["--concept", "toy-shapes:3", "--method", "uce", "--output", str(out), "--quiet"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["config"]["concept"] == "toy-shapes:3"
    pipe = pipelines.load("toy")
    pipelines.apply(pipe, out)
    for shape in SET:
        r = concept_report(pipe, judge, shape, images_per_prompt=1)
        assert r["target"]["rate"] <= 0.1 and r["alias"]["rate"] <= 0.15, (shape, r["target"], r["alias"])
    star = concept_report(pipe, judge, "star", images_per_prompt=1)
    assert star["target"]["rate"] >= 0.85, star["target"]


def test_a_real_list_preset_is_one_edit_with_every_member(tmp_path):
    from pipelines.testing import save_tiny, tiny_sd_pipeline

    from adapters.artifact import load_artifact

    folder = tmp_path / "sd"
    save_tiny(tiny_sd_pipeline("sd1"), folder)
    out = tmp_path / "artists.safetensors"
    assert main(["--concept", "artists-10", "--method", "uce", "--model", str(folder), "--output", str(out),
                 "--quiet"]) == 0
    meta = load_artifact(out).metadata
    assert meta["concept"] == "artists-10" and len(meta["concepts"]) == 10 and len(meta["prompts"]) == 20
    assert meta["config"]["guide"] == "art"
