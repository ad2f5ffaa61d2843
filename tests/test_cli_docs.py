"""Every command line tool explains itself, and every command line in the docs is one it accepts.

- ``--help`` of each CLI exits 0 and shows a description paragraph and examples (``python -m MODULE ...`` lines),
  and those example lines parse.
- Every ``python -m erasure.train`` / ``python -m eval.*`` line in a fenced code block of ``README.md`` or
  ``docs/**/*.md`` (found at run time; backslash continuations joined; ``accelerate launch`` / ``torchrun`` launchers
  stripped) is checked against its CLI's own argument parser without running the job: an unknown flag always fails,
  with the doc line in the message. Lines with placeholders (``/path/to/``, ``FOLDER``, ``DIR``, ``...``) must still
  use known flags, but may fail the full parse. ``erasure.train`` lines are then resolved for real with
  ``--dry-run``, and ``eval.sweep`` lines whose config exists are planned with ``--dry-run`` (both in-process, fast).
- Complete sweep configs shown in the docs (TOML blocks with models, prompt sets and metrics) load.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIS = ("erasure.train", "eval.toy", "eval.prompts", "eval.generate", "eval.attack", "eval.relearn", "eval.bench",
        "eval.sweep", "eval.report", "eval.device_check")
PLACEHOLDER = re.compile(r"/path/to/|\bFOLDER\b|\bDIR\b|\.\.\.|…|\[--")
LAUNCHERS = ("accelerate", "torchrun")
SEPARATORS = {"&&", "||", ";", "|", "&"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


class ParseError(Exception):
    pass


@dataclass(frozen=True)
class Command:
    where: str  # FILE:LINE
    text: str  # the logical line as written (continuations joined)
    module: str
    args: tuple[str, ...]

    @property
    def placeholder(self) -> bool:
        return bool(PLACEHOLDER.search(self.text))

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


# ---------------------------------------------------------------------------------------------------------------
# finding command lines


def fenced_lines(text: str):
    """(line number, line) of every line inside a fenced code block (``` or ~~~)."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(`{3,}|~{3,})", line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip()[len(m.group(1)):]:
                fence = None
            continue
        if fence is not None:
            yield number, line


def logical_lines(text: str):
    """Fenced lines with backslash continuations joined: (first line number, joined line)."""
    start, parts = None, []
    for number, line in fenced_lines(text):
        if start is None:
            start = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(line.strip())
        yield start, " ".join(p for p in parts if p)
        start, parts = None, []
    if parts:
        yield start, " ".join(p for p in parts if p)


def commands_in(line: str) -> list[tuple[str, list[str]]]:
    """(module, args) of each toolkit command in one shell line: separators split it, comments and redirections are
    dropped, ``VAR=value`` prefixes and ``accelerate launch`` / ``torchrun`` launchers stripped."""
    line = re.sub(r"^\s*\$\s+", "", line)
    if "-m" not in line:
        return []
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: not a command line
        return []
    segments, current = [], []
    for tok in tokens:
        if tok in SEPARATORS:
            segments.append(current)
            current = []
        else:
            current.append(tok)
    segments.append(current)
    found = []
    for seg in segments:
        for i, tok in enumerate(seg):  # a redirection ends the command's arguments
            if tok and set(tok) <= set("<>&"):
                seg = seg[: i - 1] if i and seg[i - 1].isdigit() else seg[:i]
                break
        while seg and ENV_ASSIGNMENT.match(seg[0]):
            seg = seg[1:]
        if not seg:
            continue
        if seg[0] in LAUNCHERS or (seg[0] in ("python", "python3") and len(seg) > 2 and seg[1] == "-m"):
            if "-m" not in seg or seg.index("-m") + 1 >= len(seg):
                continue
            k = seg.index("-m")
            module, args = seg[k + 1], seg[k + 2 :]
            if module == "erasure.train" or module.startswith("eval."):
                found.append((module, args))
    return found


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def doc_commands() -> list[Command]:
    out = []
    for path in doc_files():
        if not path.is_file():
            continue
        rel = path.relative_to(ROOT).as_posix()
        for number, line in logical_lines(path.read_text(encoding="utf-8")):
            for module, args in commands_in(line):
                out.append(Command(f"{rel}:{number}", line, module, tuple(args)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# checking them against the parsers


def _module(name: str):
    return importlib.import_module(name)


def build_parser(module: str, method: str | None = None):
    """The parser the CLI itself uses (``erasure.train``: with ``method``'s own options)."""
    mod = _module(module)
    if module == "erasure.train":
        return mod.build_parser(method)
    for name in ("build_parser", "_parser"):
        if callable(getattr(mod, name, None)):
            return getattr(mod, name)()
    raise AssertionError(f"{module} has no build_parser()")


def _train_method(args) -> str:
    from erasure.config import TrainConfig

    for i, a in enumerate(args):
        if a == "--method" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    return TrainConfig.method


def unknown_flags(cmd: Command) -> list[str]:
    method = _train_method(cmd.args) if cmd.module == "erasure.train" else None
    try:
        parser = build_parser(cmd.module, method)
    except SystemExit:  # an unknown --method: the full parse says so
        return []
    known = set(parser._option_string_actions)
    flags = [a.split("=", 1)[0] for a in cmd.args if a.startswith("--") and a != "--"] + \
            [a for a in cmd.args if a == "-h"]
    return [f for f in flags if f not in known]


def parse(cmd: Command) -> None:
    """Parse ``cmd.args`` as the CLI does, without running anything; ParseError with argparse's message if not."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if cmd.module == "erasure.train":
                from adapters.errors import UserError

                try:
                    _module("erasure.train").parse(list(cmd.args))
                except UserError as e:
                    raise ParseError(str(e)) from None
            else:
                parser = build_parser(cmd.module)

                def error(message):
                    raise ParseError(message)

                parser.error = error
                parser.parse_args(list(cmd.args))
        except SystemExit as e:  # --help
            if e.code not in (0, None):
                raise ParseError(err.getvalue().strip() or f"exit status {e.code}") from None


def run_main(module: str, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = _module(module).main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc or 0, out.getvalue(), err.getvalue()


def missing_input(cmd: Command, message: str) -> bool:
    """A dry run that fails only because a file named on the line does not exist yet (an earlier command of the docs
    makes it, e.g. a SalUn mask)."""
    return any(w in message for w in ("no such file", "not found", "does not exist")) and any(
        a in message for a in cmd.args if "/" in a or a.endswith((".safetensors", ".toml", ".csv", ".txt")))


def check(cmd: Command) -> None:
    """Fail with the doc line when the command would not be accepted."""
    assert cmd.module in CLIS, f"{cmd}\n  '{cmd.module}' is not a command line tool of the toolkit ({', '.join(CLIS)})"
    bad = unknown_flags(cmd)
    assert not bad, f"{cmd}\n  unknown flag(s) for python -m {cmd.module}: {', '.join(bad)}"
    try:
        parse(cmd)
    except ParseError as e:
        if cmd.placeholder:
            return  # a placeholder ("--model ...") may not parse; its flags were checked above
        raise AssertionError(f"{cmd}\n  python -m {cmd.module} rejects it: {e}") from None
    if "-h" in cmd.args or "--help" in cmd.args:
        return
    if cmd.module == "erasure.train":  # resolve the configuration for real: no training, no model loaded
        argv = list(cmd.args) + ([] if "--dry-run" in cmd.args else ["--dry-run"])
        rc, out, err = run_main("erasure.train", argv)
        if rc != 0 and not missing_input(cmd, err):
            raise AssertionError(f"{cmd}\n  python -m erasure.train {' '.join(argv)} exits {rc}: {err.strip()}")
        if rc == 0:
            json.loads(out)
    elif cmd.module == "eval.sweep":
        config = next((cmd.args[i + 1] for i, a in enumerate(cmd.args[:-1]) if a == "--config"), None)
        if config and (ROOT / config).is_file():
            argv = list(cmd.args) + ([] if "--dry-run" in cmd.args else ["--dry-run"])
            rc, out, err = run_main("eval.sweep", argv)
            assert rc == 0, f"{cmd}\n  python -m eval.sweep {' '.join(argv)} exits {rc}: {err.strip()}"
            assert json.loads(out)["models"]


# ---------------------------------------------------------------------------------------------------------------
# the tests


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # doc commands are written for the repository root


def help_text(module: str) -> str:
    rc, out, err = run_main(module, ["--help"])
    assert rc == 0, f"python -m {module} --help exits {rc}: {err}"
    return out


def example_commands(module: str, text: str) -> list[Command]:
    start = re.search(r"^Examples?:?[ \t]*$", text, re.M | re.I)
    assert start, f"python -m {module} --help shows no 'Examples' section"
    examples = []
    for number, line in logical_lines("```\n" + text[start.end():] + "\n```"):
        for mod, args in commands_in(line):
            examples.append(Command(f"python -m {module} --help, example {number - 1}", line, mod, tuple(args)))
    return examples


@pytest.mark.parametrize("module", CLIS)
def test_help_has_a_description_and_real_examples(module):
    text = help_text(module)
    parser = build_parser(module)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", parser.description or "")]
    assert any(len(p) >= 150 and p.count(". ") >= 1 for p in paragraphs), \
        f"python -m {module}: the description needs a paragraph saying what the tool does"
    flat = " ".join(text.split())
    assert all(p in flat for p in paragraphs), f"python -m {module} --help does not show its description"
    examples = example_commands(module, text)
    assert any(e.module == module for e in examples), f"python -m {module} --help has no 'python -m {module}' example"
    for example in examples:
        check(example)


def test_train_help_with_a_method_keeps_the_examples():
    text = run_main("erasure.train", ["--method", "esd", "--help"])[1]
    assert "--ddim-steps" in text and any(e.module == "erasure.train" for e in example_commands("erasure.train", text))


DOC_COMMANDS = doc_commands()


def test_the_docs_have_command_lines():
    assert len(DOC_COMMANDS) >= 10, [str(c) for c in DOC_COMMANDS]
    assert {"erasure.train", "eval.sweep", "eval.report"} <= {c.module for c in DOC_COMMANDS}


@pytest.mark.parametrize("cmd", DOC_COMMANDS, ids=[c.where for c in DOC_COMMANDS])
def test_doc_command_line_is_accepted(cmd):
    check(cmd)


def test_the_checker_catches_bad_lines():
    """The checks above are not vacuous: a made-up flag, a bad choice and a missing required option fail."""
    cases = ["python -m erasure.train --concept circle --no-such-flag 3",
             "python -m erasure.train --concept circle --method esd --alpha 0.5",  # SalUn's option, not ESD's
             "python -m eval.attack --concept circle --budget huge",
             "python -m eval.generate --model toy --output out/x",  # --prompts is required
             "accelerate launch --num_processes 2 -m eval.generate --prompts toy:circle --output o --frobnicate",
             "python -m eval.toy --base --concept circle"]  # mutually exclusive
    for line in cases:
        (module, args), = commands_in(line)
        with pytest.raises(AssertionError, match=re.escape(line)):
            check(Command("case", line, module, tuple(args)))
    assert commands_in("HF_HUB_OFFLINE=1 python -m eval.toy --base > base.json  # judged") == [("eval.toy", ["--base"])]
    assert [m for m, _ in commands_in("pip install -e . && python -m eval.prompts toy:circle | head")] == ["eval.prompts"]


def _sweep_configs():
    for path in doc_files():
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"^```toml[^\n]*\n(.*?)^```", text, re.M | re.S):
            block = m.group(1)
            if all(f"[[{t}]]" in block for t in ("models", "prompt_sets", "metrics")):
                yield f"{path.relative_to(ROOT).as_posix()}:{text[: m.start()].count(chr(10)) + 1}", block


SWEEP_CONFIGS = list(_sweep_configs())


@pytest.mark.parametrize("where,block", SWEEP_CONFIGS, ids=[w for w, _ in SWEEP_CONFIGS])
def test_doc_sweep_config_loads(where, block, tmp_path):
    from eval.sweep_config import load_config

    config = tmp_path / "sweep.toml"
    config.write_text(block, encoding="utf-8")
    cfg = load_config(config, output=tmp_path / "out", cache=None, overrides={})
    assert cfg.models and cfg.prompt_sets and cfg.metrics, where
