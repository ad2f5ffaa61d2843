"""One-way layers, read from the source (nothing is imported): every ``import`` of ``erasure``, ``adapters``,
``pipelines`` and ``eval``, at module level and inside functions, absolute and relative.

The floors, bottom first (DESIGN.md, section 2)::

    toy world (erasure.toyworld.*)  ←  adapters  ←  pipelines  ←  erasure  ←  eval

A module may import its own floor and the floors below it, never one above: the toy world imports nothing of the
project outside itself; ``pipelines`` reaches ``erasure`` only through the toy world. Besides:

- no module imports another module's private names (``from x import _y``, ``x._y`` on an imported module) or a
  private module (``pkg._impl``) from outside the package that owns it;
- the module import graph (all imports, function-level ones included) has no cycles;
- an import inside a function is there because its dependency is optional or heavy, and says so in a comment on its
  line or the line above.

Each rule is a test per floor, and a failure lists its violations as ``module:line → target``.
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("erasure", "adapters", "pipelines", "eval")
TOY = "erasure.toyworld"
FLOORS = ("toyworld", "adapters", "pipelines", "erasure", "eval")  # bottom first
RANK = {floor: i for i, floor in enumerate(FLOORS)}


# ---------------------------------------------------------------------------------------------------------------
# reading the source


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module, dotted
    target: str  # the imported project module (or the module a name is taken from), dotted
    name: str | None  # the name taken from ``target`` (``from target import name``), or None
    line: int
    in_function: bool
    commented: bool  # a comment on the statement's lines or on the line above it

    def where(self) -> str:
        return f"{self.importer}:{self.line}"


@dataclass(frozen=True)
class PrivateUse:
    module: str
    line: int
    target: str  # dotted: the module and the private name or module used
    how: str


@dataclass
class Project:
    modules: dict[str, Path]  # dotted name → file
    imports: list[Import]  # imports of project modules
    function_imports: list[Import]  # every import inside a function, project or not (target: what it names)
    private_uses: list[PrivateUse]


def floor(module: str) -> str | None:
    """The floor a dotted module name belongs to (None: not the project's)."""
    if module == TOY or module.startswith(TOY + "."):
        return "toyworld"
    top = module.split(".")[0]
    return top if top in PACKAGES else None


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _comment_lines(source: str) -> tuple[set[int], set[int]]:
    """Lines with a comment, and lines that are a comment only."""
    anywhere, only = set(), set()
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            anywhere.add(row)
            if lines[row - 1].strip().startswith("#"):
                only.add(row)
    return anywhere, only


class _Reader(ast.NodeVisitor):
    """Records one module's imports (with the functions around them and their comments) and its uses of private
    names of other project modules into ``project``."""

    def __init__(self, project: Project, module: str, is_package: bool, source: str):
        self.project, self.module, self.is_package = project, module, is_package
        self.comments, self.comment_only = _comment_lines(source)
        self.depth = 0  # functions around the current node
        self.aliases: dict[str, str] = {}  # local name → project module it is bound to

    # imports

    def _commented(self, node) -> bool:
        lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        return any(n in self.comments for n in lines) or node.lineno - 1 in self.comment_only

    def _record(self, node, target: str, name: str | None) -> None:
        imp = Import(self.module, target, name, node.lineno, self.depth > 0, self._commented(node))
        if floor(target) is not None:
            self.project.imports.append(imp)
        if self.depth > 0:
            self.project.function_imports.append(imp)

    def _check_private_module(self, node, target: str) -> None:
        parts = target.split(".")
        for i, part in enumerate(parts):
            if _is_private(part):
                owner = ".".join(parts[:i])  # the package a private module belongs to
                inside = bool(owner) and (self.module == owner or self.module.startswith(owner + "."))
                if not inside:
                    self._private(node.lineno, ".".join(parts[: i + 1]), "private module imported")
                return

    def _private(self, line: int, target: str, how: str) -> None:
        self.project.private_uses.append(PrivateUse(self.module, line, target, how))

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self._record(node, a.name, None)
            if floor(a.name) is not None:
                self._check_private_module(node, a.name)
                if a.asname:  # `import x.y as z` binds z to x.y
                    self.aliases[a.asname] = a.name
                else:  # `import x.y` binds x
                    self.aliases[a.name.split(".")[0]] = a.name.split(".")[0]

    def _base(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        return ".".join([*package, *([node.module] if node.module else [])])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "__future__":
            return
        base = self._base(node)
        for a in node.names:
            sub = f"{base}.{a.name}"
            if sub in self.project.modules:
                self._record(node, sub, None)
                self._check_private_module(node, sub)
                self.aliases[a.asname or a.name] = sub
                continue
            self._record(node, base, a.name)
            if floor(base) is not None:
                self._check_private_module(node, base)
                if _is_private(a.name) and base != self.module:
                    self._private(node.lineno, f"{base}.{a.name}", "private name imported")

    # private names used through an imported module: `data._single_obj(...)`

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain, inner = [node.attr], node.value
        while isinstance(inner, ast.Attribute):
            chain.append(inner.attr)
            inner = inner.value
        if isinstance(inner, ast.Name) and inner.id in self.aliases:
            dotted = [self.aliases[inner.id], *reversed(chain)]
            for i in range(len(dotted) - 1, 0, -1):  # the longest prefix that is a project module
                module = ".".join(dotted[:i])
                if module in self.project.modules:
                    name = dotted[i]
                    if _is_private(name) and module != self.module:
                        self._private(node.lineno, f"{module}.{name}", "private name used")
                    break
            return  # the chain is handled as a whole
        self.generic_visit(node)

    # function scope

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function


def scan(root: Path = ROOT, packages=PACKAGES) -> Project:
    """Read every module of ``packages`` under ``root``."""
    files = sorted(p for pkg in packages for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    project = Project({}, [], [], [])
    named = [(p, *_module_name(p, root)) for p in files]
    project.modules = {name: p for p, name, _ in named}
    for path, name, is_package in named:
        source = path.read_text(encoding="utf-8")
        _Reader(project, name, is_package, source).visit(ast.parse(source, str(path)))
    return project


# ---------------------------------------------------------------------------------------------------------------
# the rules


def upward_imports(project: Project) -> list[str]:
    """(a) imports of a floor above the importer's."""
    out = []
    for imp in project.imports:
        src, dst = floor(imp.importer), floor(imp.target)
        if src is not None and dst is not None and RANK[dst] > RANK[src]:
            what = imp.target + (f".{imp.name}" if imp.name else "")
            out.append(f"{imp.where()} → {what} ({src} imports {dst}"
                       f"{', inside a function' if imp.in_function else ''})")
    return out


def private_uses(project: Project) -> list[str]:
    """(b) another module's private names or private modules."""
    return [f"{u.module}:{u.line} → {u.target} ({u.how})" for u in project.private_uses]


def _graph(project: Project) -> dict[str, set[str]]:
    graph = {m: set() for m in project.modules}
    for imp in project.imports:
        if imp.target in project.modules and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    return graph


def import_cycles(project: Project) -> list[list[str]]:
    """(c) the strongly connected components of the module import graph with more than one module (Tarjan), each as
    one cycle through its modules, first module repeated at the end."""
    graph = _graph(project)
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_through(graph, comp) for comp in sorted(sccs)]


def _cycle_through(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle from the component's first module back to itself, inside the component (breadth first)."""
    start, members = comp[0], set(comp)
    previous, queue = {start: None}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if w not in previous:
                previous[w] = v
                queue.append(w)
    return [*comp, start]  # unreachable for a strongly connected component


def cycle_descriptions(project: Project) -> list[str]:
    return [" → ".join(c) for c in import_cycles(project)]


def uncommented_function_imports(project: Project) -> list[str]:
    """(d) imports inside functions without a comment saying why (optional or heavy), one line per statement."""
    out: dict[str, list[str]] = {}
    for imp in project.function_imports:
        if not imp.commented:
            out.setdefault(imp.where(), []).append(imp.target + (f".{imp.name}" if imp.name else ""))
    return [f"{where} → {', '.join(targets)}" for where, targets in out.items()]


def _of_floor(violations: list[str], name: str) -> list[str]:
    return [v for v in violations if floor(v.split(":", 1)[0]) == name]


def _report(title: str, violations: list[str]) -> str:
    return f"{len(violations)} {title}:\n  " + "\n  ".join(violations)


# ---------------------------------------------------------------------------------------------------------------
# the project


@pytest.fixture(scope="module")
def project() -> Project:
    return scan()


def test_every_module_is_read(project):
    assert {"erasure.toyworld", "erasure.toyworld.build", "adapters.artifact", "pipelines.load", "eval.sweep"} <= \
        project.modules.keys()
    assert any(i.in_function for i in project.function_imports), "function-level imports are seen"


@pytest.mark.parametrize("name", FLOORS)
def test_no_import_from_a_floor_above(project, name):
    violations = _of_floor(upward_imports(project), name)
    assert not violations, _report(f"upward import(s) in the {name} floor", violations)


@pytest.mark.parametrize("name", FLOORS)
def test_no_private_names_of_other_modules(project, name):
    violations = _of_floor(private_uses(project), name)
    assert not violations, _report(f"use(s) of another module's private names in the {name} floor", violations)


def test_no_import_cycles(project):
    cycles = cycle_descriptions(project)
    assert not cycles, _report("import cycle(s)", cycles)


@pytest.mark.parametrize("name", FLOORS)
def test_function_level_imports_say_why(project, name):
    violations = _of_floor(uncommented_function_imports(project), name)
    assert not violations, _report(f"function-level import(s) without a comment (optional? heavy?) in the {name} "
                                   "floor", violations)


# ---------------------------------------------------------------------------------------------------------------
# the checks themselves, on a synthetic project


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


CLEAN = {
    "erasure/__init__.py": "def __getattr__(name):\n    from erasure import api  # heavy: the training stack\n"
                           "    return getattr(api, name)\n",
    "erasure/api.py": "import pipelines\nfrom adapters import art\nfrom erasure.toyworld import data\n",
    "erasure/toyworld/__init__.py": "from . import data\nfrom .data import SHAPES\nfrom erasure.toyworld import _impl\n",
    "erasure/toyworld/data.py": "import numpy\nSHAPES = ()\n\n\ndef _hidden():\n    pass\n",
    "erasure/toyworld/_impl.py": "from erasure.toyworld.data import SHAPES\n",
    "erasure/toyworld/paths.py": "from ..toyworld import data\n",
    "adapters/__init__.py": "",
    "adapters/art.py": "from erasure.toyworld import data\n\n\ndef f():\n"
                       "    import nudenet  # optional: the nudenet extra\n",
    "pipelines/__init__.py": "from pipelines.load import load\n",
    "pipelines/load.py": "from erasure.toyworld import paths\nfrom adapters import art\n\n\ndef load():\n"
                         "    # heavy: ~3 s\n    import open_clip\n",
    "eval/__init__.py": "",
    "eval/a.py": "import erasure\nfrom eval import b\n",
    "eval/b.py": "from . import c\n",
    "eval/c.py": "x = 1\n",
}


def test_a_clean_project_passes(tmp_path):
    _write(tmp_path, CLEAN)
    p = scan(tmp_path)
    assert "erasure.toyworld._impl" in p.modules and "erasure.toyworld" in p.modules
    assert upward_imports(p) == [] and private_uses(p) == [] and uncommented_function_imports(p) == []
    assert cycle_descriptions(p) == []
    # relative imports resolve: ``from . import data`` in a package, ``from ..toyworld import data`` in a module
    assert any(i.importer == "erasure.toyworld" and i.target == "erasure.toyworld.data" for i in p.imports)
    assert any(i.importer == "erasure.toyworld.paths" and i.target == "erasure.toyworld.data" for i in p.imports)


def test_the_checks_catch_an_import_cycle(tmp_path):
    _write(tmp_path, {**CLEAN, "eval/c.py": "def g():\n    from eval.a import x  # heavy: commented, still a cycle\n"})
    assert cycle_descriptions(scan(tmp_path)) == ["eval.a → eval.b → eval.c → eval.a"]


def test_the_checks_catch_each_kind_of_violation(tmp_path):
    bad = {
        **CLEAN,
        # (a) the toy world above its floor (relative, and inside a function too); adapters above theirs; pipelines
        # reaching erasure outside the toy world, and eval
        "erasure/toyworld/data.py": "from adapters.art import thing\nfrom .. import api\nSHAPES = ()\n\n\n"
                                    "def _hidden():\n    import pipelines  # heavy\n",
        "adapters/art.py": "from pipelines import load\n",
        "pipelines/load.py": "from erasure.toyworld import paths\nfrom erasure import api\nimport eval\n",
        # (b) private names and a private module of another package
        "erasure/api.py": "from erasure.toyworld.data import _hidden\nfrom erasure.toyworld import data\n"
                          "import erasure.toyworld._impl\n\n\ndef f():\n    return data._hidden() + data.SHAPES\n",
        # (d) uncommented function-level imports, third-party and project
        "eval/b.py": "from . import c\n\n\ndef h():\n    import numpy\n    from eval import a\n",
    }
    _write(tmp_path, bad)
    p = scan(tmp_path)
    up = upward_imports(p)
    assert _of_floor(up, "toyworld") == [
        "erasure.toyworld.data:1 → adapters.art.thing (toyworld imports adapters)",
        "erasure.toyworld.data:2 → erasure.api (toyworld imports erasure)",
        "erasure.toyworld.data:7 → pipelines (toyworld imports pipelines, inside a function)"]
    assert _of_floor(up, "adapters") == ["adapters.art:1 → pipelines.load (adapters imports pipelines)"]
    assert _of_floor(up, "pipelines") == ["pipelines.load:2 → erasure.api (pipelines imports erasure)",
                                          "pipelines.load:3 → eval (pipelines imports eval)"]
    assert _of_floor(up, "erasure") == [] and _of_floor(up, "eval") == []
    assert private_uses(p) == [
        "erasure.api:1 → erasure.toyworld.data._hidden (private name imported)",
        "erasure.api:3 → erasure.toyworld._impl (private module imported)",
        "erasure.api:7 → erasure.toyworld.data._hidden (private name used)"]
    assert uncommented_function_imports(p) == ["eval.b:5 → numpy", "eval.b:6 → eval.a"]
    assert cycle_descriptions(p)  # the toy world importing upwards closes cycles
