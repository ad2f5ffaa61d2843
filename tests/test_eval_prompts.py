"""Prompt sets: I2P / COCO CSVs, plain lists, toy sets; malformed files are one-line user errors."""

import json

import pytest

from adapters.errors import UserError
from eval.prompts import PromptRecord, detect_format, load_prompts, main, read_coco, read_i2p, read_lines, summary

I2P = (
    "prompt,categories,hard,nudity_percentage,evaluation_seed,evaluation_guidance\n"
    '"a nude figure, oil painting","sexual, hate",1,62.5,2734971755,7\n'
    "a dark alley at night,violence,0,0.0,12,7.5\n"
    "a beach portrait,sexual,0,12.0,4040,7\n"
    "a riot,\"violence,harassment\",1,,99,8\n"
)


def _write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    path.write_bytes(text) if mode == "wb" else path.write_text(text)
    return path


def test_i2p_rows_keep_their_own_seed_guidance_and_categories(tmp_path):
    recs = read_i2p(_write(tmp_path, "i2p.csv", I2P))
    assert [r.text for r in recs] == ["a nude figure, oil painting", "a dark alley at night", "a beach portrait", "a riot"]
    assert [r.seed for r in recs] == [2734971755, 12, 4040, 99]
    assert [r.guidance for r in recs] == [7.0, 7.5, 7.0, 8.0]
    assert recs[0].categories == ("sexual", "hate") and recs[3].categories == ("violence", "harassment")
    assert [r.nudity_percentage for r in recs] == [62.5, 0.0, 12.0, None]


def test_i2p_sexual_subset_and_nudity_filter(tmp_path):
    path = _write(tmp_path, "i2p.csv", I2P)
    assert [r.seed for r in read_i2p(path, category="sexual")] == [2734971755, 4040]
    assert [r.seed for r in read_i2p(path, min_nudity=0)] == [2734971755, 4040]  # > 0, empty cells dropped
    assert [r.seed for r in read_i2p(path, min_nudity=50)] == [2734971755]
    assert [r.seed for r in load_prompts(path, category="violence", limit=1)] == [12]


def test_hugging_face_i2p_column_names_are_read(tmp_path):
    path = _write(tmp_path, "hf.csv", "prompt,categories,sd_seed,sd_guidance_scale\nx,sexual,5,9\n")
    assert read_i2p(path) == [PromptRecord("x", 5, 9.0, ("sexual",))]
    assert detect_format(path) == "i2p"


def test_coco_captions_and_esd_style_caption_files(tmp_path):
    coco = _write(tmp_path, "coco.csv", "image_id,caption,seed\n1,A cat on a mat.,41337\n2,Two dogs.,7\n")
    assert detect_format(coco) == "coco"
    assert read_coco(coco) == [PromptRecord("A cat on a mat.", 41337), PromptRecord("Two dogs.", 7)]
    esd = _write(tmp_path, "coco_30k.csv", ",case_number,prompt,evaluation_seed,coco_id\n0,0,A bus.,41337,203564\n")
    assert detect_format(esd) == "coco"
    assert load_prompts(esd) == [PromptRecord("A bus.", 41337)]


def test_plain_list_skips_blank_lines_and_has_no_seeds(tmp_path):
    path = _write(tmp_path, "p.txt", "a red circle\n\n  a blue square  \n")
    assert read_lines(path) == [PromptRecord("a red circle"), PromptRecord("a blue square")]
    assert detect_format(path) == "lines"


def test_toy_sets_carry_what_a_correct_image_shows():
    from erasure.toyworld import base_prompts, prompts

    target = load_prompts("toy:circle/target")
    assert len(target) == len(prompts("circle")["target"])
    assert all("circle" in r.shapes and r.group == "target" and r.seed is None for r in target)
    every = load_prompts("toy:circle")
    assert {r.group for r in every} == {"target", "alias", "other", "pair", "paraphrase"}
    assert all("circle" not in r.shapes for r in every if r.group == "other")
    single = load_prompts("toy:base/single")
    assert [r.text for r in single] == [p.text for p in base_prompts()["single"]]
    assert all(r.colour and r.fill and len(r.shapes) == 1 for r in single)
    assert summary(single)["groups"] == {"single": len(single)}


BAD = [
    ("missing.csv", None, "no such prompt file"),
    ("empty.csv", "", "empty file"),
    ("header.csv", "prompt,evaluation_seed,evaluation_guidance\n", "header but no rows"),
    ("noseed.csv", "prompt,categories,evaluation_guidance\nx,sexual,7\n", "missing column 'evaluation_seed'"),
    ("badseed.csv", "prompt,evaluation_seed,evaluation_guidance\nx,12,7\ny,abc,7\n", "line 3: seed 'abc'"),
    ("negseed.csv", "prompt,evaluation_seed,evaluation_guidance\nx,-4,7\n", "must be a whole number"),
    ("fracseed.csv", "prompt,evaluation_seed,evaluation_guidance\nx,1.5,7\n", "must be a whole number"),
    ("emptyseed.csv", "caption,seed\nx,\n", "seed '' in column 'seed' is not an integer"),
    ("badguid.csv", "prompt,evaluation_seed,evaluation_guidance\nx,1,lots\n", "evaluation_guidance 'lots' is not a number"),
    ("short.csv", "prompt,evaluation_seed,evaluation_guidance\nx,1\n", "too few fields"),
    ("latin1.txt", b"caf\xe9 au lait\n", "not UTF-8"),
    ("nocaption.csv", "image_id,seed,guidance\n1,2,3\n", "missing column 'prompt'"),
]


@pytest.mark.parametrize("name, text, message", BAD, ids=[b[0] for b in BAD])
def test_malformed_files_are_one_line_errors_naming_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        _write(tmp_path, name, text, "wb" if isinstance(text, bytes) else "w")
    with pytest.raises(UserError) as e:
        load_prompts(path)
    msg = str(e.value)
    assert message in msg and str(path) in msg and "\n" not in msg


def test_folder_unknown_toy_set_and_misplaced_filters(tmp_path):
    folder = tmp_path / "x.csv"
    folder.mkdir()
    with pytest.raises(UserError, match="is a folder"):
        load_prompts(folder)
    with pytest.raises(UserError, match="'hexagon' is not a toy concept"):
        load_prompts("toy:hexagon")
    with pytest.raises(UserError, match="no group 'aliens'"):
        load_prompts("toy:circle/aliens")
    with pytest.raises(UserError, match="select I2P rows, but this is a lines file"):
        load_prompts(_write(tmp_path, "p.txt", "a\n"), category="sexual")
    with pytest.raises(UserError, match="no rows left after selecting category='self-harm'"):
        load_prompts(_write(tmp_path, "i2p.csv", I2P), category="self-harm")


def test_cli_prints_a_summary(tmp_path, capsys):
    assert main([str(_write(tmp_path, "i2p.csv", I2P)), "--category", "sexual"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "i2p" and out["prompts"] == 2 and out["unique_seeds"] == 2
    assert out["guidance"] == {"7.0": 2} and out["categories"] == {"sexual": 2, "hate": 1}


def test_cli_bad_file_exits_2_with_one_line(tmp_path, capsys):
    path = _write(tmp_path, "bad.csv", "prompt,evaluation_seed,evaluation_guidance\nx,seven,7\n")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err and "Traceback" not in err
