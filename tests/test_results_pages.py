"""Results pages are generated, never typed: ``eval.report --markdown PAGE [--readme README.md]`` writes the page,
the results it shows (``PAGE.json``), its picture, and the README's headline table; the committed ones must be what
the committed results regenerate."""

import json
import re
from pathlib import Path

import pytest

from adapters.errors import UserError
from eval import markdown, report
from test_eval_report import fake_results

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["docs/results.md", "docs/results/many-concepts.md", "docs/results/robustness.md",
         "docs/results/robustness-frontier.md"]


def _erased(results: dict) -> dict:
    """fake_results with its second model trained (an ESD artifact of 1 MiB, 12.5 s) and alias / other rows."""
    results["models"][1]["artifacts"] = [{"method": "esd", "concept": "circle", "concepts": ["circle"],
                                          "train_seconds": 12.5, "bytes": 2**20}]
    extra = []
    for r in results["rows"]:
        if r["metric"] == "rates":
            extra += [{**r, "prompt_set": "alias", "value": r["value"] / 2}, {**r, "prompt_set": "other"}]
        if r["metric"] == "fid":
            extra.append({**r, "prompt_set": "other"})
    results["rows"] += extra
    return results


def _readme(path: Path) -> Path:
    path.write_text(f"# Title\n\nbefore\n\n{markdown.README_BEGIN}\nstale\n{markdown.README_END}\n\nafter\n")
    return path


def test_the_page_its_data_its_picture_and_the_readme_table(tmp_path):
    folder = tmp_path / "sweep"
    results = _erased(fake_results(folder))
    (folder / "results.json").write_text(json.dumps(results))
    page, readme = tmp_path / "docs" / "results.md", _readme(tmp_path / "README.md")
    page.parent.mkdir()
    assert report.main([str(folder), "--markdown", str(page), "--readme", str(readme)]) == 0

    data = json.loads(page.with_suffix(".json").read_text())
    assert data == markdown.page_data(results) and data["rows"][0].keys() == set(markdown.PAGE_COLUMNS)
    text = page.read_text()
    assert "![" in text and "(results.png)" in text
    from PIL import Image

    with Image.open(page.with_suffix(".png")) as im:  # 2 models × 2 images of 32 px, ×2, a label column
        assert im.size == (64 + 2 * (64 + 2), 2 * (64 + 2))
    # the erasure row: method, the rate left on the target prompts, on aliases, the rest kept (0.875, 1.75× base 0.5)
    assert re.search(r"\| erased \| esd \| 1 \| 12\.5 \| 1 \| 0\.25 \| 0\.125 \| 0\.875 \| 1\.75 \| 3 \|", text), text

    new = readme.read_text()
    assert "stale" not in new and new.startswith("# Title\n\nbefore\n") and new.endswith("after\n")
    assert "| esd | 0.25 | 0.125 | 1.75 | 3 | 12.5 | 1 |" in new
    assert "[docs/results.md](docs/results.md)" in new


def test_the_erasure_table_says_what_two_object_prompts_keep_when_the_sweep_has_a_pair_set(tmp_path):
    results = _erased(fake_results(tmp_path / "sweep"))
    assert "two-object" not in "\n".join(markdown.erasure_table(results))  # no pair set, no column
    for model, kept in (("base", 0.8), ("erased", 0.6)):
        results["rows"].append({"model": model, "metric": "rates", "quantity": "circle.kept", "prompt_set": "pair",
                                "value": kept, "n": 8})
    table = markdown.erasure_table(results)
    assert table[0].endswith("| two-object prompts: other shape kept | × base |")
    assert table[2].endswith("| 0.6 | 0.75 |") and table[2].startswith("| erased |")
    assert "other shape is drawn" in markdown.page(results, "cmd")


def test_the_attack_table_gives_each_budgets_worst_attack():
    rows = [("m", "circle.pre_attack", 0.0), ("m", "circle.alias_search", 0.1), ("m", "circle.ring_a_bell", 0.3),
            ("m", "circle.alias_search.large", 0.5), ("n", "circle.pre_attack", 0.2), ("n", "circle.alias_search", 0.05)]
    results = {"rows": [{"model": m, "metric": "attack", "quantity": q, "prompt_set": "attack", "value": v, "n": 8}
                        for m, q, v in rows]}
    header, _, m, n = markdown.attack_table(results)
    assert header == ("| model | circle.pre_attack | circle.alias_search | circle.ring_a_bell | circle.alias_search.large "
                      "| circle.worst | circle.worst.large |")
    assert m == "| m | 0 | 0.1 | 0.3 | 0.5 | 0.3 | 0.5 |"  # the pre-attack rate is no attack
    assert n == "| n | 0.2 | 0.05 | – | – | 0.05 | – |"


def test_a_readme_without_markers_is_refused_before_anything_is_written(tmp_path, capsys):
    folder = tmp_path / "sweep"
    (folder).mkdir()
    (folder / "results.json").write_text(json.dumps(_erased(fake_results(folder))))
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    page = tmp_path / "page.md"
    assert report.main([str(folder), "--markdown", str(page), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "headline markers" in err
    assert not page.exists() and not page.with_suffix(".json").exists() and readme.read_text() == "# no markers\n"
    with pytest.raises(UserError):
        markdown.replace_block("nothing", ["x"])


def _block(text: str) -> str:
    start = text.index(markdown.README_BEGIN) + len(markdown.README_BEGIN)
    return text[start : text.index(markdown.README_END)].strip("\n")


def test_the_readme_headline_table_is_the_committed_results():
    """Every number of the README's headline table is the committed results' (docs/results.json)."""
    results = json.loads((ROOT / "docs/results.json").read_text())
    expected = "\n".join(markdown.headline(results, "[docs/results.md](docs/results.md)"))
    assert _block((ROOT / "README.md").read_text()) == expected


@pytest.mark.parametrize("page", PAGES)
def test_committed_results_pages_are_what_their_results_regenerate(page):
    path = ROOT / page
    text = path.read_text()
    results = json.loads(path.with_suffix(".json").read_text())
    command = re.search(r"```\n(python -m eval\.report [^\n]+)\n```", text).group(1)
    assert f"--markdown {page}" in command
    image = path.with_suffix(".png").name if path.with_suffix(".png").exists() else None
    assert text == markdown.page(results, command, image=image, image_set="target" if image else None)
