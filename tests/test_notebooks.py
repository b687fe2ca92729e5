"""Every chapter runs headless in the smoke profile, and the notebooks and the package are in sync."""
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import medvqa.runner.book as runner_book
import medvqa.runner.reproduce as rep
from medvqa.core import project_root

ROOT = project_root()


def test_nbdev_export_and_clean_change_nothing(tmp_path):
    """`nbdev_export` would not change medvqa/, `nbdev_clean` would not change nbs/ (and notebooks hold no outputs)."""
    for item in ("nbs", "medvqa", "settings.ini", "setup.py", "pyproject.toml", "profiles"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / item)
    bindir = Path(sys.executable).parent
    for tool in ("nbdev_export", "nbdev_clean"):
        subprocess.run([str(bindir / tool)], cwd=tmp_path, check=True, capture_output=True)
    for folder, pattern in (("medvqa", "**/*.py"), ("nbs", "*.ipynb")):  # medvqa/<package>/<module>.py too
        originals = sorted(p.relative_to(ROOT / folder) for p in (ROOT / folder).glob(pattern) if "__pycache__" not in p.parts)
        for original in originals:
            assert filecmp.cmp(ROOT / folder / original, tmp_path / folder / original, shallow=False), \
                f"{folder}/{original} changes under nbdev_export/nbdev_clean: run `make export` and commit"
        produced = sorted(p.relative_to(tmp_path / folder) for p in (tmp_path / folder).glob(pattern) if "__pycache__" not in p.parts)
        assert produced == originals, f"{folder}: files differ {set(produced) ^ set(originals)}"
    for nb_path in (ROOT / "nbs").glob("*.ipynb"):
        nb = nbformat.read(str(nb_path), as_version=4)
        assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{nb_path.name} has outputs"
        assert nb.metadata.get("kernelspec", {}).get("language") == "python", f"{nb_path.name}: no kernelspec"


def test_every_chapter_runs_in_the_smoke_profile(smoke_run, tmp_path):
    # one seed keeps the suite short: the seeded loops, the effects and the curve still run (make reproduce uses 3);
    # two chapters at a time, as make reproduce runs them (the smoke_run fixture of conftest.py)
    results, runs = smoke_run
    failed = {r.chapter: r.error for r in runs if r.status != "passed"}
    assert not failed, failed
    assert {r.chapter for r in runs} == set(rep.list_chapters())
    assert (results / "summary.md").is_file()
    # the book of this run: a page per chapter, each with every figure its notebook drew
    import nbformat
    pages = runner_book.build_book(results, tmp_path / "book")
    index = pages[0].read_text()
    for chapter in rep.list_chapters():
        page = tmp_path / "book" / f"{chapter}.html"
        figures = sum("image/png" in o.get("data", {}) for c in nbformat.read(results / f"{chapter}.ipynb", as_version=4).cells
                      for o in c.get("outputs", []))
        assert page.is_file() and f'href="{chapter}.html"' in index, chapter
        assert page.read_text().count('src="data:image/png;base64') >= figures, chapter
        assert figures > 0 or chapter in ("00_core", "00a_training"), f"{chapter} drew no figure"
        # headless, progress stays text (no widget, which a static page cannot show), folded to a few lines per cell
        executed = nbformat.read(results / f"{chapter}.ipynb", as_version=4)
        outputs = [o for c in executed.cells for o in c.get("outputs", [])]
        assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), chapter
        assert not any("IProgress not found" in o.get("text", "") for o in outputs), chapter
        for c in executed.cells:
            bars = sum(line.count("%|") for o in c.get("outputs", []) for line in o.get("text", "").splitlines())
            assert bars <= 3, f"{chapter}: a cell with {bars} progress lines"


@pytest.mark.parametrize("notebook", rep.runner_notebooks())
def test_the_runner_notebooks_run(notebook, tmp_path):
    """The runner's own notebooks (90-95) are not chapters of `medvqa reproduce`: their checks run here."""
    import papermill
    params = {"metrics_path": str(tmp_path / "m.json")} if notebook == rep.RUNNER_CHAPTER else {}
    papermill.execute_notebook(str(ROOT / "nbs" / f"{notebook}.ipynb"), str(tmp_path / "out.ipynb"), parameters=params,
                               kernel_name="medvqa", cwd=str(ROOT / "nbs"), progress_bar=False, execution_timeout=600,
                               extra_arguments=rep.KERNEL_ARGUMENTS)
    if notebook == rep.RUNNER_CHAPTER:
        assert (tmp_path / "m.json").is_file()
    assert set(rep.runner_notebooks()) == {"90_runner.reproduce", "90a_runner.folder", "91_runner.results", "92_runner.plan", "93_runner.index",
                                           "94_runner.book", "95_runner.cli"}
