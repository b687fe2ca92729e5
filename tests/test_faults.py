"""Faults a new user meets: each gives a one-line error naming the file, record, field, argument or folder (or the right
behaviour), nothing already written is lost, and Ctrl-C / SIGTERM stop a run within seconds."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

import medvqa.runner.reproduce as rep
from medvqa.core import UMASK, project_root
from medvqa.data.readers import DatasetError, load_slake
from medvqa.models.registry import UnreadableWeightsError, read_weights
from medvqa.runner.cli import main
from medvqa.training import TrainConfig
from notebook_helpers import tiny_chapter as write_chapter

CLI = [sys.executable, "-c", "import sys; from medvqa.runner.cli import main; sys.exit(main(sys.argv[1:]))"]


def tiny_chapter(folder: Path, name: str, body: str, parameters: str = 'profile = "smoke"\nmetrics_path = ""') -> Path:
    """A chapter notebook `folder/name.ipynb` with a parameters cell and one cell of `body`; returns the folder."""
    write_chapter(folder / f"{name}.ipynb", body, parameters)
    return folder


WRITES_METRICS = "import json\njson.dump({'metrics': {'ok': 1}}, open(metrics_path, 'w'))"


def run_cli(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=project_root(), timeout=300, **kwargs)


# --- switches that mean what they say ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["reproduce", "--chapters"], "--chapters needs at least one chapter"),
    (["reproduce", "--chapters", "00", "--timeout", "0"], "--timeout 0: the per-cell timeout must be a positive"),
    (["reproduce", "--chapters", "00", "--timeout", "-5"], "--timeout -5"),
    (["results", "justalabel"], "'justalabel': each run is LABEL=FOLDER"),
    (["results", "smoke="], "'smoke=': each run is LABEL=FOLDER"),
])
def test_switches_are_checked(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_truncated_summary_is_named(tmp_path, capsys):
    (tmp_path / "summary.json").write_text('{"profile": "smoke", "chapters": [\n')
    assert main(["results", f"smoke={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "summary.json") in err and "not a complete summary" in err


def test_results_that_is_a_file_is_refused_before_any_chapter(tmp_path):
    target = tmp_path / "taken"
    target.write_text("a file")
    result = run_cli(["reproduce", "--chapters", "00", "--results", str(target)])
    assert result.returncode == 2 and f"--results {target}: a file, not a folder" in result.stderr
    assert "Traceback" not in result.stderr and target.read_text() == "a file"


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_read_only_results_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    result = run_cli(["reproduce", "--chapters", "00", "--results", str(folder)])
    assert result.returncode == 2 and "not writable" in result.stderr and "Traceback" not in result.stderr


def test_train_config_checks_its_fields():
    with pytest.raises(ValueError, match="epochs=0 is outside"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="epochs=-3 is outside"):
        TrainConfig(epochs=-3)
    with pytest.raises(TypeError, match=r"TrainConfig.epochs='2' \(str\): expected int"):
        TrainConfig(epochs="2")
    with pytest.raises(TypeError, match="TrainConfig.drop_last=1"):
        TrainConfig(drop_last=1)
    assert TrainConfig(epochs=3, lr=1, max_grad_norm=None).lr == 1


# --- one run owns its results folder; the summary keeps every chapter --------------------------------------------------

def test_a_second_run_on_the_same_folder_stops_at_once(tmp_path):
    nbs = tiny_chapter(tmp_path / "nbs", "01_a", WRITES_METRICS)
    results = tmp_path / "results"
    results.mkdir()
    with rep.results_lock(results):  # the first run holds the folder
        start = time.perf_counter()
        result = run_cli(["reproduce", "--nbs", str(nbs), "--results", str(results)])
    assert result.returncode == 2 and time.perf_counter() - start < 60
    assert f"--results {results}: in use by another `medvqa reproduce` (pid {os.getpid()}" in result.stderr
    assert not (results / "summary.json").exists()


def test_a_later_run_keeps_the_chapters_of_an_earlier_one(tmp_path):
    atomic = "from medvqa.core import write_json\nwrite_json(metrics_path, {'metrics': {'ok': 1}})"  # as chapters write it
    nbs = tiny_chapter(tiny_chapter(tmp_path / "nbs", "01_a", atomic), "02_b", WRITES_METRICS)
    results = tmp_path / "results"
    kw = dict(profile_values={"profile": "smoke"}, nbs_dir=nbs, results_dir=results)
    rep.reproduce("smoke", ["01"], **kw)
    first = json.loads((results / "summary.json").read_text())["chapters"][0]
    rep.reproduce("smoke", ["02"], **kw)
    summary = json.loads((results / "summary.json").read_text())
    assert [(r["chapter"], r["status"]) for r in summary["chapters"]] == [("01_a", "passed"), ("02_b", "passed")]
    assert summary["chapters"][0]["date"] == first["date"] != ""  # 01's row is the earlier run's, with its date
    assert "2 of 2 chapters passed" in (results / "summary.md").read_text()
    for path in (results / "summary.md", results / "summary.json", results / "01_a.metrics.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~UMASK, path  # the user's umask, not a temporary file's 0600
    (results / "summary.json").write_text('{"profile": "cpu", "chapters": []}')
    with pytest.raises(ValueError, match="holds a run of profile 'cpu'"):
        rep.reproduce("smoke", ["02"], **kw)


# --- Ctrl-C and SIGTERM stop a run within seconds ---------------------------------------------------------------------

@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_and_writes_the_summary(tmp_path, signum, code):
    started = tmp_path / "02-started"
    nbs = tiny_chapter(tmp_path / "nbs", "01_quick", WRITES_METRICS)
    tiny_chapter(nbs, "02_slow", f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\ntime.sleep(600)")
    results = tmp_path / "results"
    # as from a terminal: a background job (make, CI) may have inherited SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored; the runner here gets the default disposition, as when a user starts it
    process = subprocess.Popen(CLI + ["reproduce", "--nbs", str(nbs), "--results", str(results)], cwd=project_root(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not started.exists():  # 01 finished, 02's kernel runs its slow cell
            time.sleep(0.2)
        assert started.exists() and process.poll() is None, process.communicate()
        sent = time.perf_counter()
        process.send_signal(signum)
        out, err = process.communicate(timeout=120)
        stopped = time.perf_counter() - sent
    finally:
        process.kill()
    assert process.returncode == code, err
    assert stopped < 30, f"stopped {stopped:.1f} s after the signal"  # about 4 s on an idle 2-core machine
    assert "Traceback" not in err and f"stopped by {signal.Signals(signum).name}" in err
    rows = {r["chapter"]: r for r in json.loads((results / "summary.json").read_text())["chapters"]}
    assert rows["01_quick"]["status"] == "passed" and rows["02_slow"]["status"] == "interrupted"
    assert (results / "02_slow.interrupted.ipynb").is_file() and not (results / "02_slow.ipynb").exists()


def test_a_signal_before_a_kernel_starts_keeps_it_from_starting(tmp_path, monkeypatch):
    """Ctrl-C in the moment between two chapters: the next chapter's kernel refuses to start, nothing waits for it."""
    monkeypatch.setattr(rep.STOPPING, "is_set", lambda: True)
    nbs = tiny_chapter(tmp_path / "nbs", "01_a", WRITES_METRICS)
    runs = rep.reproduce("smoke", profile_values={"profile": "smoke"}, nbs_dir=nbs, results_dir=tmp_path / "results")
    assert runs[0].status == "failed" and "stopped before this chapter's kernel started" in runs[0].error


# --- data: wrong types, bad bytes, broken copies -----------------------------------------------------------------------

def _slake(folder: Path, records: list) -> Path:
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(records))
    return folder


RECORD = {"qid": 1, "img_name": "x/source.jpg", "question": "Is this normal?", "answer": "Yes", "answer_type": "CLOSED",
          "q_lang": "en", "content_type": "Abnormality", "modality": "CT", "location": "Abdomen"}


@pytest.mark.parametrize("field, value, found", [("question", ["is", "this", "normal"], "a JSON list"),
                                                 ("answer", {"text": "yes"}, "a JSON dict"), ("img_name", True, "a JSON bool")])
def test_a_record_of_the_wrong_type_is_refused(tmp_path, field, value, found):
    folder = _slake(tmp_path / "slake", [RECORD, {**RECORD, "qid": 2, field: value}])
    with pytest.raises(DatasetError) as error:
        load_slake(folder, "train", missing_images="keep", name="synthetic")
    assert f"train.json, record 2, field '{field}': expected text, found {found}" in str(error.value)


def test_invalid_utf8_names_the_file(tmp_path):
    folder = _slake(tmp_path / "slake", [RECORD])
    (folder / "train.json").write_bytes(json.dumps([RECORD]).encode().replace(b"normal", b"n\xffrmal"))
    with pytest.raises(DatasetError, match=r"train.json: not UTF-8 text: byte 0xff"):
        load_slake(folder, "train", missing_images="keep", name="synthetic")


def test_a_broken_dataset_is_found_before_any_kernel_starts(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _slake(data / "slake", [RECORD])
    (data / "slake" / "test.json").write_text("[{")  # truncated
    monkeypatch.setenv("MEDVQA_DATA", str(data))
    nbs = tiny_chapter(tmp_path / "nbs", "01_a", WRITES_METRICS, 'profile = "smoke"\nmetrics_path = ""\ndataset = "synthetic"')
    start = time.perf_counter()
    with pytest.raises(ValueError) as error:
        rep.reproduce("smoke", overrides={"dataset": "slake"}, profile_values={"profile": "smoke"}, nbs_dir=nbs,
                      results_dir=tmp_path / "results")
    assert time.perf_counter() - start < 30
    assert "datasets that cannot be read (nothing was run)" in str(error.value)
    assert "test.json: malformed JSON at line 1" in str(error.value) and not (tmp_path / "results").exists()


def test_chapter_01_reports_a_broken_real_dataset_and_goes_on(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _slake(data / "slake", [RECORD])
    (data / "slake" / "train.json").write_bytes(b"\xff\xfe not json")
    monkeypatch.setenv("MEDVQA_DATA", str(data))
    runs = rep.reproduce("smoke", ["01"], results_dir=tmp_path / "results", overrides={"synthetic_images": 40})
    assert runs[0].status == "passed", runs[0].error
    executed = nbformat.read(tmp_path / "results" / "01_data.readers.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "cannot be read:" in text and "train.json: not UTF-8 text" in text


def test_chapter_01b_with_one_epoch_is_a_run_not_an_assertion(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVQA_RUNS", str(tmp_path / "runs"))
    runs = rep.reproduce("smoke", ["01b"], overrides={"epochs": 1}, results_dir=tmp_path / "results")
    assert runs[0].status == "passed", runs[0].error


def test_chapters_leave_no_temporary_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVQA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    runs = rep.reproduce("smoke", ["01a"], overrides={"synthetic_images": 40}, results_dir=tmp_path / "results")
    assert runs[0].status == "passed", runs[0].error
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []  # the chapter's scratch folders went with its kernel
    assert not [p for p in (tmp_path / "tmp").iterdir() if p.is_dir()], list((tmp_path / "tmp").iterdir())


# --- weights: damaged or hostile files are refused, naming them --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm_folder(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("lm")
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    return folder


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ.get('PAYLOAD_MARK', '/nonexistent')).as_posix()}",))


@pytest.mark.parametrize("damage", ["truncated", "pickle", "hostile-bin"])
def test_damaged_or_hostile_weights_are_refused_by_name(tiny_lm_folder, tmp_path, damage, monkeypatch):
    import pickle
    import shutil
    from transformers import AutoModelForCausalLM
    folder = tmp_path / "lm"
    shutil.copytree(tiny_lm_folder, folder)
    weights = folder / "model.safetensors"
    mark = tmp_path / "payload-ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "pickle":
        weights.write_bytes(pickle.dumps({"a": 1}))
    else:
        weights.unlink()
        import torch
        torch.save({"model.embed_tokens.weight": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(UnreadableWeightsError) as error:
        read_weights(folder, lambda: AutoModelForCausalLM.from_pretrained(folder))
    message = str(error.value)
    assert message.startswith(f"{folder}: its weights cannot be read safely") and "weights_only=False" not in message
    assert not mark.exists()  # the pickle's code never ran
