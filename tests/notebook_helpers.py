"""A tiny chapter notebook for the runner's tests (a parameters cell and one cell of code)."""
from pathlib import Path

import nbformat


def tiny_chapter(path: Path, body: str, params: str = 'profile = "smoke"\nmetrics_path = ""\nsteps = 2') -> Path:
    """Write a chapter notebook at `path`: a cell tagged `parameters` holding `params`, then `body`."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(body)]
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path
