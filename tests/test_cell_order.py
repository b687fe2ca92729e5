"""Every name a notebook cell reads is defined in that cell or above it: a top-to-bottom run under any profile (a
branch taken only by `full`, e.g. ROCO captions in chapter 05) cannot meet a name defined further down."""
import ast
import builtins
import json
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parents[1] / "nbs"
KNOWN = set(dir(builtins)) | {"display", "get_ipython", "__file__"}


def cell_names(source: str) -> tuple[set[str], set[str], set[str]]:
    """(names the cell defines, names it reads when it runs, names read inside function bodies, which resolve when the
    function is called) of one code cell; IPython magics and shell lines are left out."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    tree = ast.parse("\n".join(lines))
    deferred_nodes = {id(inner) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                      for part in ([node.body] if isinstance(node, ast.Lambda) else node.body) for inner in ast.walk(part)}
    annotations = [n.returns for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns]
    annotations += [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign)) and n.annotation]
    deferred_nodes |= {id(inner) for a in annotations for inner in ast.walk(a)}  # lazy: the chapters import annotations
    defined, read, deferred = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, (ast.Store, ast.Del)):
                defined.add(node.id)
            else:
                (deferred if id(node) in deferred_nodes else read).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            defined.add(node.name)
    return defined, read, deferred


def undefined_names(notebook: Path) -> list[str]:
    cells = [c for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    names = [cell_names("".join(cell["source"])) for cell in cells]
    anywhere = set(KNOWN).union(*(defined for defined, _, _ in names))
    seen, problems = set(KNOWN), []
    for k, (cell, (defined, read, deferred)) in enumerate(zip(cells, names)):
        missing = (read - defined - seen) | (deferred - anywhere)
        if missing:
            problems.append(f"{notebook.name}, code cell {k} ({cell.get('id')}): {', '.join(sorted(missing))} not defined above")
        seen |= defined
    return problems


@pytest.mark.parametrize("notebook", sorted(NBS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_every_name_is_defined_above_its_use(notebook):
    assert undefined_names(notebook) == []


def test_a_function_may_read_what_a_later_cell_defines(tmp_path):
    cells = [{"cell_type": "code", "id": "a", "source": ["def f():\n", "    return helper()\n"]},
             {"cell_type": "code", "id": "b", "source": ["def helper():\n", "    return 1\n", "f()\n"]}]
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps({"cells": cells}))
    assert undefined_names(path) == []


def test_the_check_sees_a_name_defined_below(tmp_path):
    cells = [{"cell_type": "code", "id": "a", "source": ["if False:\n", "    rows = load(1)\n"]},
             {"cell_type": "code", "id": "b", "source": ["def load(n):\n", "    return n\n"]}]
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps({"cells": cells}))
    assert undefined_names(path) == ["x.ipynb, code cell 0 (a): load not defined above"]
