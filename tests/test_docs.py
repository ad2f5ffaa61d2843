"""The documentation site: ``mkdocs build --strict`` passes, every page in the navigation exists, and every link from
the README into ``docs/`` points at a file that exists."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


class _AnyTagLoader(yaml.SafeLoader):
    """mkdocs.yml uses MkDocs' own YAML tags (``!relative``); their values are not needed here."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _config() -> dict:
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_AnyTagLoader)


def _nav_files(entries) -> list[str]:
    """Every file named in a nav tree (lists of strings, or one-key mappings to a file or a sub-list)."""
    out = []
    for entry in entries:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                out.extend([value] if isinstance(value, str) else _nav_files(value))
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_strict_build_writes_the_pages(site):
    for page in ("index.html", "getting-started/index.html", "methods/spm/index.html", "methods/uce-rece/index.html",
                 "toy-world/index.html", "artifacts/index.html", "development/index.html", "results/index.html",
                 "changelog/index.html"):
        assert (site / page).is_file(), page


def test_api_pages_are_built_from_the_docstrings(site):
    expected = {
        "erasure": ["erasure.api.erase", "erasure.api.resolve", "erasure.engine.Plan"],
        "adapters": ["adapters.artifact.load_artifact", "adapters.saliency.load_mask"],
        "pipelines": ["pipelines.apply.apply", "pipelines.apply.Applied", "pipelines.load.load"],
        "eval": ["eval.prompts.load_prompts", "eval.metrics.FID"],
    }
    for page, names in expected.items():
        html = (site / "api" / page / "index.html").read_text()
        for name in names:
            assert f'id="{name}"' in html, f"api/{page}: no entry for {name}"


def test_changelog_page_includes_the_root_changelog(site):
    first = next(line[3:].strip() for line in (ROOT / "CHANGELOG.md").read_text().splitlines()
                 if line.startswith("## "))
    assert first in (site / "changelog" / "index.html").read_text()


def test_every_nav_entry_exists():
    files = _nav_files(_config()["nav"])
    assert files
    missing = [f for f in files if not (DOCS / f).is_file()]
    assert not missing, f"mkdocs.yml names pages that do not exist: {missing}"


def test_readme_links_into_docs_exist():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    paths = {t.split("#")[0].removeprefix("./") for t in targets}
    local = {p for p in paths if p.startswith("docs/")}
    missing = sorted(t for t in local if not (ROOT / t).exists())
    assert not missing, f"README.md links to files under docs/ that do not exist: {missing}"
