"""The reader's path in a real browser: chapters run from JupyterLab's page (the `Python (medvqa)` kernel, Run All),
and the rendered book opened link by link. Headless Chromium from Debian (`make browser`), driven by Playwright.

Screenshots and timings go to results/browser/ for a person to look at."""
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nbformat
import pytest

import medvqa.runner.book as runner_book

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "results" / "browser"
BIN = Path(sys.executable).parent
# flags for a closed network: no background fetches, no first-run pages (root needs --no-sandbox)
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
PROGRESS_LINE = re.compile(r"\d+%\|.*\|\s*\d+/\d+")  # how tqdm draws a bar as text
MAX_PROGRESS_LINES = 3  # per cell of a book page
# the chapters run from the page: the diagrams, and a method chapter that loads the runs the smoke run left
LAB_CHAPTERS = {"00b_diagrams": {}, "04_bamco.balanced_contrastive": {"seeds": 1}}  # seeds: the one the smoke run trained
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook on show

pytestmark = pytest.mark.browser


def chromium_path() -> str:
    """Debian's chromium (or MEDVQA_CHROMIUM); skipped without it, an error in CI."""
    found = os.environ.get("MEDVQA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found and Path(found).exists():
        return found
    message = "Chromium not found: run `make browser` (Debian's chromium), or set MEDVQA_CHROMIUM to a Chromium binary"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (read from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def stop_process_tree(process: subprocess.Popen, children: set[int]) -> list[int]:
    """SIGTERM the process, then SIGKILL whatever of it and `children` is still alive; returns the pids that had to
    be killed."""
    killed = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            killed.append(process.pid)
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in children):
        time.sleep(0.2)
    for pid in children:
        if Path(f"/proc/{pid}").exists():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


def stop_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM when the test process dies, even by SIGKILL."""
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Playwright; closed even when a check fails."""
    executable = chromium_path()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The pinned JupyterLab on a free 127.0.0.1 port with a token, serving a folder of chapter copies (so nothing it
    saves touches nbs/); stopped with its kernels at the end, and no process of it is left behind."""
    home = tmp_path_factory.mktemp("lab")
    # a project of the chapter copies: settings.ini, so a chapter's last cell (nbdev_export) works and writes only here;
    # profiles and papers read from the real project; runs, cache and data are the real ones (the runs to load)
    project, settings = home / "project", home / "settings" / "@jupyterlab" / "apputils-extension"
    root = project / "nbs"
    root.mkdir(parents=True)
    shutil.copy(ROOT / "settings.ini", project / "settings.ini")
    for folder in ("profiles", "papers"):
        (project / folder).symlink_to(ROOT / folder, target_is_directory=True)
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # every cell in the page's DOM (JupyterLab otherwise renders only the cells near the viewport of a long notebook)
    tracker = home / "settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "ws"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
    env.pop("MEDVQA_PROGRESS", None)  # a reader's JupyterLab: widget progress bars
    for variable, default in (("MEDVQA_RUNS", "runs"), ("MEDVQA_CACHE", ".cache"), ("MEDVQA_DATA", "data")):
        env[variable] = os.environ.get(variable) or str(ROOT / default)
    log = (home / "lab.log").open("w")
    server = subprocess.Popen([str(BIN / "jupyter"), "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
                               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                               f"--ServerApp.root_dir={root}"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=stop_with_parent)
    base = f"http://127.0.0.1:{port}"
    children: set[int] = set()
    try:
        started = time.perf_counter()
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.perf_counter() - started > 90:
                raise RuntimeError(f"JupyterLab did not start; its log: {(home / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"base": base, "token": token, "root": root, "start_seconds": time.perf_counter() - started}
        children = descendants(server.pid)
    finally:
        children |= descendants(server.pid)
        killed = stop_process_tree(server, children)
        log.close()
    assert not killed, f"processes that did not stop with JupyterLab and had to be killed: {killed}"


def chapter_copy(name: str, root: Path, parameters: dict) -> tuple[Path, nbformat.NotebookNode]:
    """nbs/<name>.ipynb copied into the lab folder, its `parameters` cell defaults changed as given (the reader's
    notebook otherwise)."""
    notebook = nbformat.read(ROOT / "nbs" / f"{name}.ipynb", as_version=4)
    for cell in notebook.cells:
        if "parameters" in cell.metadata.get("tags", []):
            for key, value in parameters.items():
                cell.source, count = re.subn(rf"^{key}(: \w+)? = .*?(  #|$)", rf"{key}\1 = {value!r}\2", cell.source,
                                             count=1, flags=re.M)
                assert count == 1, f"{name}: no parameter {key} to set"
    path = root / f"{name}.ipynb"
    nbformat.write(notebook, path)
    return path, notebook


def full_page_shot(page, path: Path, scroller: str | None = None) -> None:
    """A screenshot of everything: JupyterLab scrolls inside its notebook panel, so the window grows to its height."""
    if scroller:
        height = page.eval_on_selector(scroller, "e => e.scrollHeight")
        width = page.viewport_size["width"]
        page.set_viewport_size({"width": width, "height": min(int(height) + 200, 30000)})
        page.eval_on_selector(scroller, "e => { e.scrollTop = 0; }")
        page.wait_for_timeout(1500)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


PAGE_STATE = """panel => {
    const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
    const status = panel.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset.status
        || document.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset.status;
    return {prompts, status};
}"""


@pytest.mark.parametrize("chapter", list(LAB_CHAPTERS))
def test_a_chapter_runs_from_jupyterlab_in_the_medvqa_kernel(chapter, smoke_run, lab, browser):
    """Open the chapter, pick `Python (medvqa)`, Run All, wait for the kernel; then read the page: no error output,
    every code cell ran, every figure is a loaded image, a progress bar is a widget."""
    _, notebook = chapter_copy(chapter, lab["root"], LAB_CHAPTERS[chapter])
    code_cells = sum(c.cell_type == "code" for c in notebook.cells)
    smoke_results, _ = smoke_run
    executed = nbformat.read(smoke_results / f"{chapter}.ipynb", as_version=4)
    figures = sum("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))
    timings = {"server start (s)": round(lab["start_seconds"], 1)}
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        t0 = time.perf_counter()
        page.goto(f"{lab['base']}/lab/tree/{chapter}.ipynb?reset&token={lab['token']}")  # reset: this notebook only
        page.wait_for_selector(f"{PANEL} .jp-Notebook .jp-Cell", timeout=90_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
        timings["page open (s)"] = round(time.perf_counter() - t0, 1)
        page.click(f"{PANEL} jp-button.jp-Toolbar-kernelName")  # "Switch kernel"
        page.wait_for_selector(".jp-Dialog select")
        page.select_option(".jp-Dialog select", label="Python (medvqa)")
        page.click(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
        page.wait_for_selector(f"{PANEL} jp-button.jp-Toolbar-kernelName[aria-label='Python (medvqa)']", timeout=30_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
        t1 = time.perf_counter()
        page.click(".lm-MenuBar-itemLabel:text-is('Run')")
        page.click("li.lm-Menu-item[data-command='runmenu:run-all']")
        settled = []

        def finished():  # idle, nothing queued, something ran: twice in a row (Run All also stops at an error)
            state = page.eval_on_selector(PANEL, PAGE_STATE)
            done = (state["status"] == "idle" and not any(p == "[*]:" for p in state["prompts"])
                    and any(re.fullmatch(r"\[\d+\]:", p) for p in state["prompts"]))
            settled.append(done)
            return state if settled[-2:] == [True, True] else None
        try:
            state = wait_until(finished, 600, f"{chapter}: every cell to run")
        except AssertionError:
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / f"lab-{chapter}-timed-out.png"))
            raise
        timings["run all (s)"] = round(time.perf_counter() - t1, 1)
        SHOTS.mkdir(parents=True, exist_ok=True)
        full_page_shot(page, SHOTS / f"lab-{chapter}.png", scroller=f"{PANEL} .jp-WindowedPanel-outer")
        outputs = page.eval_on_selector_all(f"{PANEL} .jp-OutputArea-output",
                                            "els => els.map(e => [e.dataset.mimeType || '', e.innerText])")
        errors = [text[-1500:] for mime, text in outputs if "Traceback" in text or mime == "application/vnd.jupyter.error"]
        assert not errors, f"{chapter}: error output on the page:\n" + "\n".join(errors)
        assert len(state["prompts"]) == code_cells, \
            f"{chapter}: {len(state['prompts'])} code cells on the page, {code_cells} in the file"
        # a fresh kernel numbers each executed cell once, in order: the last count is the number of cells that ran
        # (a cell whose input is collapsed shows no prompt text; its number is the gap in the sequence)
        counts = [int(p[1:-2]) for p in state["prompts"] if re.fullmatch(r"\[\d+\]:", p)]
        assert counts == sorted(set(counts)) and counts[-1] == code_cells, \
            f"{chapter}: {code_cells} code cells, the page shows execution counts {state['prompts']}"
        collapsed = page.eval_on_selector_all(f"{PANEL} .jp-CodeCell .jp-InputPlaceholder", "els => els.length")
        assert code_cells - len(counts) <= collapsed, f"{chapter}: cells without a count that are not collapsed"
        images = page.eval_on_selector_all(f"{PANEL} .jp-OutputArea-output img",
                                           "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
        assert len(images) >= max(figures, 1), f"{chapter}: {len(images)} images on the page, the smoke run drew {figures}"
        assert all(done and w > 0 and h > 0 for done, w, h in images), f"{chapter}: figures that did not load: {images}"
        widgets = page.eval_on_selector_all(f"{PANEL} .jp-OutputArea-output .jupyter-widgets.widget-hprogress",
                                            "els => els.length")  # tqdm's notebook bar: an ipywidgets progress bar
        text_bars = sum(bool(PROGRESS_LINE.search(line)) for _, text in outputs for line in text.splitlines())
        assert not any("IProgress not found" in text for _, text in outputs), f"{chapter}: tqdm found no ipywidgets"
        assert text_bars == 0, f"{chapter}: {text_bars} progress bars drawn as text in JupyterLab"
        if chapter != "00b_diagrams":  # 00b has no loop
            assert widgets >= 1, f"{chapter}: no progress widget on the page"
        timings.update(images=len(images), progress_widgets=widgets, code_cells=code_cells)
    finally:
        page.close()
    (SHOTS / f"lab-{chapter}.json").write_text(json.dumps(timings, indent=1))
    print(chapter, timings)


def serve(folder: Path):
    """A static server for `folder` on a free 127.0.0.1 port, in a thread: (server, base url)."""
    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args):  # no line per request in the test output
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def book(smoke_run, tmp_path_factory):
    """`medvqa book` (what `make book` runs) over the smoke run, served on 127.0.0.1; the server stops at the end."""
    results, _ = smoke_run
    out = tmp_path_factory.mktemp("book") / "smoke"
    done = subprocess.run([str(BIN / "medvqa"), "book", "--results", str(results), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    server, base = serve(out)
    try:
        yield {"base": base, "folder": out, "results": results}
    finally:
        server.shutdown()
        server.server_close()


def test_the_book_opens_page_by_page_with_every_figure(book, browser):
    """From the index, every chapter link opens a page whose figures all load and whose equations are typeset (offline),
    with no traceback and a few progress lines per cell at most."""
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    timings, progress_lines, typeset = {}, {}, {}
    try:
        t0 = time.perf_counter()
        page.goto(f"{book['base']}/index.html")
        timings["index (s)"] = round(time.perf_counter() - t0, 2)
        SHOTS.mkdir(parents=True, exist_ok=True)
        full_page_shot(page, SHOTS / "book-index.png")
        links = page.eval_on_selector_all("ol.chapters li a, ul.infrastructure li a", "els => els.map(e => e.getAttribute('href'))")
        chapters = sorted(p.stem for p in book["results"].glob("*.ipynb"))
        infrastructure = [c for c in chapters if c.split("_", 1)[-1].split(".")[0] in runner_book.INFRASTRUCTURE]
        assert infrastructure == ["00_core", "00a_training", "00b_diagrams"]  # listed apart, after the teaching chapters
        assert links == [f"{c}.html" for c in chapters if c not in infrastructure] + [f"{c}.html" for c in infrastructure]
        assert page.eval_on_selector_all("ul.infrastructure li a", "els => els.length") == len(infrastructure)
        for href in links:
            chapter = href[:-len(".html")]
            executed = nbformat.read(book["results"] / f"{chapter}.ipynb", as_version=4)
            figures = sum("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))
            t1 = time.perf_counter()
            page.click(f"ol.chapters li a[href='{href}'], ul.infrastructure li a[href='{href}']")
            page.wait_for_load_state("load")
            timings[chapter] = round(time.perf_counter() - t1, 2)
            assert page.url.endswith(href)
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
            assert len(images) >= figures, f"{chapter}: {len(images)} images on the page, {figures} in the notebook"
            assert all(done and width > 0 for done, width in images), f"{chapter}: figures that did not load"
            # equations typeset offline: MathJax (the book's copy) has started and finished its queue
            page.wait_for_function("() => window.MathJax && MathJax.isReady && MathJax.Hub.queue.pending === 0 "
                                   "&& !MathJax.Hub.queue.running", timeout=30_000)
            formulas = page.eval_on_selector_all("script[type^='math/tex']", "els => els.length")
            shown = page.eval_on_selector_all("span.MathJax, div.MathJax_Display", "els => els.length")
            assert shown >= formulas, f"{chapter}: {formulas} formulas, {shown} typeset"
            if formulas:
                typeset[chapter] = formulas
            text = page.inner_text("body")
            assert "Traceback" not in text, f"{chapter}: a traceback on the page"
            per_cell = page.eval_on_selector_all(".jp-Cell", "els => els.map(e => e.querySelector('.jp-OutputArea')?.innerText || '')")
            bars = [sum(bool(PROGRESS_LINE.search(line)) for line in text.splitlines()) for text in per_cell]
            walls = {cell: n for cell, n in enumerate(bars) if n > MAX_PROGRESS_LINES}
            assert not walls, f"{chapter}: cells with more than {MAX_PROGRESS_LINES} progress lines {{cell: lines}}: {walls}"
            progress_lines[chapter] = max(bars, default=0)
            if chapter == "04_bamco.balanced_contrastive":
                full_page_shot(page, SHOTS / f"book-{chapter}.png")
            page.go_back()
            page.wait_for_selector("ol li a")
    finally:
        page.close()
    assert "04_bamco.balanced_contrastive" in typeset  # the chapter of the screenshot has equations
    (SHOTS / "book.json").write_text(json.dumps({"open (s)": timings, "most progress lines in a cell": progress_lines,
                                                 "typeset equations": typeset}, indent=1))
    print(timings, progress_lines, typeset)
