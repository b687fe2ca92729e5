"""The package as a map of the papers: imports between medvqa modules point down the layers, sit at the top of their
file, form no circle, and no paper's package imports another paper's (read with `ast`, nothing imported)."""
import ast
from pathlib import Path

import pytest

from medvqa.core import project_root

PACKAGE = project_root() / "medvqa"
# the layers, bottom to top; a module may import from a lower layer, or from its own package in the same layer
LAYERS = {"core": 0, "training": 1, "diagrams": 1, "data": 2, "models": 3, "evaluation": 4, "claims": 4.5,
          "bamco": 5, "cmdpi": 5, "biod2c": 5, "runner": 6}
PAPERS = ("bamco", "cmdpi", "biod2c")
MAX_LINES = 550


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """{dotted name: file} of every module but the generated `_modidx.py` (a package's `__init__.py` as the package)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        if path.name == "_modidx.py" or "__pycache__" in path.parts:
            continue
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def medvqa_imports(path: Path, name: str) -> list[tuple[int, str, bool]]:
    """(line, imported medvqa module, at the top of the file) for every import of a medvqa module in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = (package[: len(package) - node.level + 1] if node.level else []) + (node.module or "").split(".")
            base = [p for p in base if p]
            targets = [".".join(base + [a.name]) for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target == "medvqa" or not target.startswith("medvqa."):
                continue  # the package root itself (core finds its folder through it), or another library
            out.append((node.lineno, target, id(node) in top))
    return out


def dynamic_imports(path: Path) -> list[int]:
    """Lines that import a medvqa module by a string at run time (importlib.import_module, __import__): a way round
    the layers that the import statements would not show."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and node.args[0].value.startswith(("medvqa", ".")):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__"):
                lines.append(node.lineno)
    return lines


def resolve(target: str, known: dict[str, Path]) -> str:
    """The medvqa module an imported name belongs to ('medvqa.data.readers.load_split' -> 'medvqa.data.readers')."""
    while target not in known and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def layer_of(module: str) -> str:
    return module.split(".")[1]


def layout_problems(root: Path = PACKAGE) -> list[str]:
    """Every import that runs up the layers, across papers, sideways between packages, or inside a function; every
    circle; every module over MAX_LINES lines. Each names the file, the line and the two layers."""
    known, problems, graph = modules(root), [], {}
    for name, path in known.items():
        if len(path.read_text(encoding="utf-8").splitlines()) > MAX_LINES:
            problems.append(f"{path}: over {MAX_LINES} lines")
        here = layer_of(name) if "." in name else None
        graph[name] = set()
        for line in dynamic_imports(path):
            problems.append(f"{path.relative_to(root.parent)}:{line}: {name} imports a medvqa module at run time; "
                            f"write the import at the top of the file")
        for line, target, at_top in medvqa_imports(path, name):
            other = resolve(target, known)
            if other == name:
                continue
            graph[name].add(other)
            there = layer_of(other)
            where = f"{path.relative_to(root.parent)}:{line}: {name} ({here}) imports {other} ({there})"
            if not at_top:
                problems.append(f"{where}: not at the top of the file")
            if here is None:  # the package root: importing `medvqa.core` runs it, so it imports nothing of its own
                problems.append(f"{where}: the package root imports a module")
                continue
            if here in PAPERS and there in PAPERS and here != there:
                problems.append(f"{where}: one paper's package imports another's")
            elif LAYERS[there] > LAYERS[here]:
                problems.append(f"{where}: runs up the layers ({LAYERS[here]} -> {LAYERS[there]})")
            elif LAYERS[there] == LAYERS[here] and there != here:
                problems.append(f"{where}: imports sideways, between two packages of one layer")
    for start in graph:  # a circle: a module reachable from itself
        stack, seen = list(graph[start]), set()
        while stack:
            node = stack.pop()
            if node == start:
                problems.append(f"import circle through {start}")
                break
            if node not in seen:
                seen.add(node)
                stack += graph.get(node, ())
    return problems


def test_the_package_follows_its_layers():
    problems = layout_problems()
    assert not problems, "\n".join(problems)


def test_every_paper_has_its_package_and_every_layer_is_known():
    known = modules()
    assert {layer_of(m) for m in known if "." in m} <= set(LAYERS)
    for paper in PAPERS:
        assert f"medvqa.{paper}" in known and any(m.startswith(f"medvqa.{paper}.") for m in known), paper


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "medvqa" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "medvqa"


@pytest.mark.parametrize("files, expected", [
    ({"core.py": "from .models.registry import MODELS\n", "models/registry.py": "MODELS = {}\n"},
     "medvqa/core.py:1: medvqa.core (core) imports medvqa.models.registry (models): runs up the layers (0 -> 3)"),
    ({"cmdpi/a.py": "from ..bamco.b import x\n", "bamco/b.py": "x = 1\n"},
     "medvqa/cmdpi/a.py:1: medvqa.cmdpi.a (cmdpi) imports medvqa.bamco.b (bamco): one paper's package imports another's"),
    ({"models/a.py": "def f():\n    from medvqa.data.b import y\n    return y\n", "data/b.py": "y = 2\n"},
     "medvqa/models/a.py:2: medvqa.models.a (models) imports medvqa.data.b (data): not at the top of the file"),
    ({"data/a.py": "from .b import y\n", "data/b.py": "from .a import z\ny = 1\n"}, "import circle through medvqa.data.a"),
    ({"core.py": "x = 1\n" * (MAX_LINES + 1)}, f"over {MAX_LINES} lines"),
    ({"__init__.py": "from .runner.cli import main\n", "runner/cli.py": "main = 1\n"},
     "medvqa/__init__.py:1: medvqa (None) imports medvqa.runner.cli (runner): the package root imports a module"),
    ({"data/a.py": "import importlib\nm = importlib.import_module('medvqa.runner.cli')\n", "runner/cli.py": "x = 1\n"},
     "medvqa/data/a.py:2: medvqa.data.a imports a medvqa module at run time"),
])
def test_layout_problems_are_named(tmp_path, files, expected):
    """The check fails on each kind of problem, naming the file, the line and the two layers (made-up packages)."""
    problems = layout_problems(_write(tmp_path, files))
    assert any(expected in p for p in problems), problems


def test_a_clean_made_up_package_has_no_problems(tmp_path):
    files = {"core.py": "x = 1\n", "data/readers.py": "from ..core import x\n", "data/batches.py": "from .readers import x\n",
             "runner/cli.py": "from ..data.batches import x\nfrom medvqa.core import x as y\n"}
    assert layout_problems(_write(tmp_path, files)) == []
