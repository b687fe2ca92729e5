"""Tests of the reproduction runner: parameter checks, failing chapters, summary with paper numbers."""
import json
import re
from pathlib import Path

import nbformat
import pytest

from medvqa import evaluation
import medvqa.runner.book as runner_book
import medvqa.runner.cli as runner_cli
import medvqa.runner.index as runner_index
import medvqa.runner.plan as runner_plan
import medvqa.runner.reproduce as rep
import medvqa.runner.results as runner_results
from medvqa.core import PROFILES, load_profile, project_root
from notebook_helpers import tiny_chapter


_chapter = tiny_chapter


WRITE = "import json\njson.dump({'metrics': {'steps': steps}, 'results': [{'paper': 'CMDPI', 'dataset': 'slake', " \
        "'metric': 'overall_accuracy', 'value': 41.5, 'paper_model': 'CMDPI'}]}, open(metrics_path, 'w'))"


@pytest.fixture
def project(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _chapter(nbs / "01_good.ipynb", WRITE)
    _chapter(nbs / "02_crash.ipynb", "raise ValueError('boom')")
    _chapter(nbs / "03_silent.ipynb", "pass")
    _chapter(nbs / "90_runner.reproduce.ipynb", "raise RuntimeError('the runner must not run itself')")
    return tmp_path


def test_runner_goes_on_past_failures_and_reports_them(project):
    runs = rep.reproduce("smoke", overrides={"steps": 7}, nbs_dir=project / "nbs", results_dir=project / "out",
                         profile_values={"profile": "smoke", "unrelated": 1})
    assert [(r.chapter, r.status) for r in runs] == [("01_good", "passed"), ("02_crash", "failed"), ("03_silent", "failed")]
    assert runs[0].metrics["metrics"] == {"steps": 7}
    assert "ValueError: boom" in runs[1].error
    assert "did not write its metrics file" in runs[2].error
    summary = (project / "out" / "summary.md").read_text()
    assert "1 of 3 chapters passed" in summary and "| 02_crash | failed: ValueError: boom" in summary
    assert "| 01_good | CMDPI | slake | overall_accuracy | 41.5 | 83.5 (CMDPI, Table 2) |" in summary
    saved = json.loads((project / "out" / "summary.json").read_text())
    assert [c["status"] for c in saved["chapters"]] == ["passed", "failed", "failed"]
    injected = nbformat.read(str(project / "out" / "01_good.ipynb"), as_version=4)
    assert set(rep.injected_names(injected)) == {"profile", "steps", "metrics_path"}  # 'unrelated' was filtered out


def test_a_relative_results_folder_is_where_the_metrics_land(project, monkeypatch):
    """Chapters run with their notebook folder as working directory: a relative --results must still collect them."""
    monkeypatch.chdir(project)
    runs = rep.reproduce("smoke", chapters=["01"], nbs_dir=project / "nbs", results_dir="relative/out",
                         profile_values={"profile": "smoke"})
    assert runs[0].status == "passed", runs[0].error
    assert (project / "relative" / "out" / "01_good.metrics.json").is_file()
    assert not (project / "nbs" / "relative").exists()


def test_misspelled_override_is_an_error(project):
    with pytest.raises(ValueError, match="unknown parameter\\(s\\) stepz.*valid names: metrics_path, profile, steps"):
        rep.reproduce("smoke", chapters=["01"], overrides={"stepz": 3}, nbs_dir=project / "nbs",
                      results_dir=project / "out", profile_values={"profile": "smoke"})


def test_bad_values_fail_before_any_chapter_runs(tmp_path, capsys):
    # a negative epoch count and text for an int: both named with their value and what is expected, in seconds
    with pytest.raises(ValueError, match=r"04_bamco.balanced_contrastive: knowledge_epochs=-3: expected a value in \[1, 10000\]"):
        rep.reproduce("smoke", chapters=["01", "04"], overrides={"knowledge_epochs": -3}, results_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # chapter 01 did not run either
    code = runner_cli.main(["reproduce", "--chapters", "04", "-p", "knowledge_epochs", "abc", "--results", str(tmp_path / "o")])
    assert code == 2 and "knowledge_epochs='abc' (str): expected int" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"dataset='mimic': expected one of 'synthetic', 'slake'"):
        rep.reproduce("smoke", chapters=["04"], overrides={"dataset": "mimic"}, results_dir=tmp_path / "out")


def test_check_values_types_ranges_and_choices():
    types = {"n": "int", "lr": "float", "flag": "bool", "name": "str", "any": "None"}
    checks = {"n": {"low": 1, "high": 10, "high_inclusive": True}, "lr": {"low": 0.0, "high": 1.0, "high_inclusive": False},
              "name": {"choices": ("a", "b", "3")}}
    assert rep.validate_chapter_values("c", {"n": 10, "lr": 0, "flag": False, "name": 3, "any": [1]}, types, checks) == \
        {"n": 10, "lr": 0, "flag": False, "name": "3", "any": [1]}  # a number given for a str parameter becomes text
    for bad, message in [({"n": 11}, "n=11: expected a value in [1, 10]"), ({"n": 2.5}, "n=2.5 (float): expected int"),
                         ({"n": True}, "n=True (bool): expected int"), ({"lr": 1.0}, "lr=1.0: expected a value in [0.0, 1.0)"),
                         ({"lr": "2e-05"}, "lr='2e-05' (str): expected a number"), ({"flag": "yes"}, "expected bool"),
                         ({"name": "c"}, "name='c': expected one of 'a', 'b', '3'")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            rep.validate_chapter_values("c", bad, types, checks)


def test_declared_checks_read_literal_calls_only(tmp_path):
    path = tmp_path / "01_x.ipynb"
    _chapter(path, 'check_range("steps", steps, 1, 50)\ncheck_choice("profile", profile, ("smoke", "cpu"))\n'
                   'check_range("other", steps, 0, 9)\ncheck_range("steps2", steps2, 0, limit)\n'
                   'check_range("rate", rate, 0.0, 1.0, high_inclusive=False)\n%matplotlib inline')
    assert rep.declared_checks(path) == {"steps": {"low": 1, "high": 50, "high_inclusive": True},
                                         "profile": {"choices": ("smoke", "cpu")},
                                         "rate": {"low": 0.0, "high": 1.0, "high_inclusive": False}}


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_passes_every_chapters_checks_and_every_number_has_a_range(profile):
    values_of_profile = load_profile(profile)
    for name in rep.list_chapters():
        path = project_root() / "nbs" / f"{name}.ipynb"
        declared, types, checks = rep.notebook_parameters(path), rep.parameter_types(path), rep.declared_checks(path)
        rep.validate_chapter_values(name, rep.chapter_parameters(declared, values_of_profile, {}, Path("m.json")), types, checks)
        unranged = [k for k, t in types.items() if t in ("int", "float") and k != "seed" and k not in checks]
        assert not unranged, f"{name}: numeric parameters without a declared check_range: {unranged}"


def test_check_executed_flags_unknown_injected_names(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("steps = 3\nstepz = 4")
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells = [cell]
    problems = rep.check_executed(nb, {"steps": 2}, tmp_path / "none.json")
    assert any("unknown parameter(s) stepz" in p for p in problems) and any("metrics file" in p for p in problems)
    assert rep.check_executed(nbformat.v4.new_notebook(), {}, tmp_path / "x")[0].startswith("no injected-parameters")


def test_chapter_resolution_and_cli_errors(capsys):
    assert rep.resolve_chapters(["data"], ["00_core", "01_data"]) == ["01_data"]
    assert runner_cli.main(["reproduce", "--chapters", "77"]) == 2
    assert "valid chapters" in capsys.readouterr().err
    assert runner_cli.main(["reproduce", "--profile", "laptop"]) == 2


def test_every_profile_key_is_a_parameter_of_some_chapter():
    declared = {n for c in rep.list_chapters() for n in rep.notebook_parameters(project_root() / "nbs" / f"{c}.ipynb")}
    for profile in PROFILES:
        unused = set(load_profile(profile)) - declared
        assert not unused, f"profiles/{profile}.yaml sets {unused}, which no chapter declares"


def test_every_parameter_line_is_understood_by_papermill():
    """papermill skips a line it cannot parse (for example a comment with '=' or parentheses) with only a warning."""
    import re
    for chapter in rep.list_chapters() + [rep.RUNNER_CHAPTER]:
        nb = nbformat.read(str(project_root() / "nbs" / f"{chapter}.ipynb"), as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        assigned = [m.group(1) for m in (re.match(r"^(\w+)\s*(?::[^=]+)?=", line) for line in cell.source.splitlines()) if m]
        assert list(rep.notebook_parameters(project_root() / "nbs" / f"{chapter}.ipynb")) == assigned, chapter


def test_every_chapter_validates_its_profile_parameter():
    for chapter in rep.list_chapters() + [rep.RUNNER_CHAPTER]:
        params = rep.notebook_parameters(project_root() / "nbs" / f"{chapter}.ipynb")
        assert params.get("profile") == "'smoke'" or params.get("profile") == '"smoke"', chapter
        assert "metrics_path" in params, chapter


def test_reported_results_table_is_well_formed():
    rows = evaluation.reported_results()
    assert {r["paper"] for r in rows} == {"BaMCo", "CMDPI", "BioD2C"}
    assert all(float(r["value"]) >= 0 for r in rows)
    assert evaluation.paper_value({"paper": "BaMCo", "dataset": "slake", "metric": "mean_open_closed_accuracy",
                            "paper_model": "BaMCo (Llama 3.2 3B)"}, rows) == "85.8 (BaMCo (Llama 3.2 3B), Table 2)"


def test_summary_names_the_scoring_rule_of_a_result(tmp_path):
    result = {"paper": "BioD2C", "dataset": "slake", "metric": "open_accuracy", "value": 55.9, "paper_model": "BioD2C"}
    metrics = {"chapter": "09_evaluation", "results": [{**result, "mode": "llava-med"}, {**result, "value": 53.1}]}
    run = rep.ChapterRun("09_evaluation", "passed", 1.0, "x.ipynb", metrics=metrics)
    summary = rep.write_summary([run], tmp_path, "cpu").read_text()
    assert "| 09_evaluation | BioD2C | slake | open_accuracy (llava-med rule) | 55.9 | 74.2 (BioD2C, Table 1) |" in summary
    assert "| 09_evaluation | BioD2C | slake | open_accuracy | 53.1 | 74.2 (BioD2C, Table 1) |" in summary


def test_summary_names_the_variant_of_a_result(tmp_path):
    metrics = {"chapter": "08_bamco.knowledge_vqa", "results": [
        {"paper": "baseline", "dataset": "slake", "metric": "open_accuracy", "value": 47.9, "mode": "strict", "variant": "question-only"}]}
    run = rep.ChapterRun("08_bamco.knowledge_vqa", "passed", 1.0, "x.ipynb", metrics=metrics)
    summary = rep.write_summary([run], tmp_path, "cpu").read_text()
    assert "| 08_bamco.knowledge_vqa | baseline | slake | open_accuracy (strict rule; question-only) | 47.9 | — |" in summary


def _fake_run(folder, dataset, chapters):
    import json
    folder.mkdir(parents=True)
    runs = [{"chapter": c, "status": "passed", "seconds": 10.0 + i,
             "metrics": {"metrics": {"dataset": dataset, "overall": o, "question_only_overall": q, "blank_image_overall": b,
                                     "paired": {"model - question-only": {"difference": o - q, "ci_low": o - q - 0.02, "ci_high": o - q + 0.02},
                                                "model - blank image": {"difference": o - b, "ci_low": o - b - 0.03, "ci_high": o - b + 0.03}}}}}
            for i, (c, o, q, b) in enumerate(chapters)]
    runs.append({"chapter": "01_data", "status": "passed", "seconds": 1.0, "metrics": {"metrics": {"probe_accuracy": 0.8}}})
    (folder / "summary.json").write_text(json.dumps({"profile": "cpu", "chapters": runs}))
    return folder


def test_results_table_and_readme_are_generated_from_runs(tmp_path, capsys):
    slake = _fake_run(tmp_path / "slake", "slake", [("06_cmdpi.difference_reconstruction", 0.75, 0.55, 0.5),
                                                    ("08_bamco.knowledge_vqa", 0.7, 0.55, 0.6)])
    rad = _fake_run(tmp_path / "rad", "vqa-rad", [("07_biod2c.gated_fusion", 0.6, 0.45, 0.4)])
    table = runner_results.results_table({"cpu, SLAKE": slake, "cpu, VQA-RAD": rad})
    rows = [line for line in table.splitlines()[2:]]
    assert len(rows) == 3  # VQA chapters only
    assert rows[0] == "| cpu, SLAKE | 06 CMDPI | slake | 75.0 | 55.0 | 50.0 | +20.0 [+18.0, +22.0] | +25.0 [+22.0, +28.0] | 83.5 | 78.3 | 10 |"
    assert "| 08 BaMCo | slake | 70.0 |" in rows[1] and rows[1].endswith("| 84.5 | 78.3 | 11 |")  # Llama 3.2 1B, mean of open and closed
    assert "| 07 BioD2C | vqa-rad |" in rows[2] and "| 73.4 / 31.0 | 63.2 |" in rows[2]  # closed / open
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{runner_results.README_MARKERS[0]}\nstale numbers\n{runner_results.README_MARKERS[1]}\nrest\n")
    assert runner_cli.main(["results", f"cpu, SLAKE={slake}", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale numbers" not in text and "| cpu, SLAKE | 06 CMDPI |" in text and text.startswith("intro\n")
    assert text.endswith(f"{runner_results.README_MARKERS[1]}\nrest\n") and "generated by `medvqa results" in text
    assert "- **cpu, SLAKE**: 2 of 2 VQA chapters above question-only and 2 of 2 above their blank-image score" in text
    assert "best 06 CMDPI 75.0 (MEVF on a GPU: 78.3)" in text
    assert runner_cli.main(["results", f"x={tmp_path / 'missing'}"]) == 2
    assert "no summary of a run" in capsys.readouterr().err
    (tmp_path / "bad.md").write_text("no markers")
    assert runner_cli.main(["results", f"x={slake}", "--readme", str(tmp_path / "bad.md")]) == 2


def test_effects_table_lists_each_runs_ablation_effects(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    effects = [{"comparison": "full - w/o A", "difference": 0.05, "ci_low": 0.01, "ci_high": 0.09, "seeds": 3,
                "questions": 100, "detectable": 0.06},
               {"comparison": "full - w/o B", "difference": -0.01, "ci_low": -0.04, "ci_high": 0.02, "seeds": 3,
                "questions": 100, "detectable": 0.042}]
    chapters = [{"chapter": "06_cmdpi.difference_reconstruction", "status": "passed", "seconds": 1, "metrics": {"metrics": {"effects": effects}}},
                {"chapter": "01_data", "status": "passed", "seconds": 1, "metrics": {"metrics": {}}}]
    (folder / "summary.json").write_text(json.dumps({"profile": "smoke", "chapters": chapters}))
    rows = runner_results.effects_markdown({"smoke": folder}).splitlines()[2:]
    assert rows == ["| smoke | 06 | full - w/o A | +5.0 [+1.0, +9.0] | 3 × 100 | above 0 |",
                    "| smoke | 06 | full - w/o B | -1.0 [-4.0, +2.0] | 3 × 100 | includes 0 (detectable ≈ 4.2) |"]
    (folder / "summary.json").write_text(json.dumps({"profile": "smoke", "chapters": chapters[1:]}))
    assert runner_results.effects_markdown({"smoke": folder}) == ""


def test_readme_results_come_from_the_generator():
    """The README's results block is the output of `medvqa results` (its marker line says so), not typed."""
    text = (project_root() / "README.md").read_text()
    start, end = runner_results.README_MARKERS
    block = text.split(start)[1].split(end)[0]
    assert "generated by `medvqa results" in block and "| run | chapter | data | overall |" in block


def test_a_full_run_without_its_hub_models_stops_before_any_chapter(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as here: no hub; and an empty folder of downloaded models
    monkeypatch.setenv("MEDVQA_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    out = tmp_path / "results"
    code = runner_cli.main(["reproduce", "--profile", "full", "--results", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    for name, hub_id in (("biomedclip", "microsoft/BiomedCLIP"), ("pmc-llama-13b", "axiong/PMC_LLaMA_13B"),
                         ("llama-3.2-1b", "meta-llama/Llama-3.2-1B")):
        assert f"'{name}' ({hub_id}" in err and f"--local-dir $MEDVQA_MODELS/{name}" in err
    assert "chapter 07_biod2c.gated_fusion: fusion_lm='pmc-llama-13b'" in err and "HF_HUB_OFFLINE" in err


def test_downloaded_copies_in_medvqa_models_satisfy_the_check(tmp_path, monkeypatch):
    from medvqa.models.registry import MODELS
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MEDVQA_MODELS", str(tmp_path))
    values = {"04_bamco.balanced_contrastive": {"text_encoder": "biomedclip-text", "image_encoder": "biomedclip"},
              "08_bamco.knowledge_vqa": {"vqa_lm": "llama-3.2-1b", "knowledge_variants": "baseline,BaMCo", "seed": 0}}
    assert len(rep.unavailable_models(values)) == 3
    for name in ("biomedclip-text", "biomedclip"):
        (tmp_path / name).mkdir()
    assert [line.split(":")[1].strip() for line in rep.unavailable_models(values)] == ["vqa_lm='llama-3.2-1b' (meta-llama/Llama-3.2-1B)"]
    (tmp_path / "llama-3.2-1b").mkdir()
    assert rep.unavailable_models(values) == [] and MODELS["minilm"].source == "package"


def test_plan_for_full_prints_every_training_chapter_and_runs_nothing(tmp_path, capsys):
    code = runner_cli.main(["reproduce", "--profile", "full", "--plan", "--results", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "out").exists()
    rows = [line for line in out.splitlines() if line.startswith("| 0")]
    assert [r.split("|")[1].strip() for r in rows] == ["04_bamco.balanced_contrastive", "05_cmdpi.coregularized",
                                                       "06_cmdpi.difference_reconstruction", "07_biod2c.gated_fusion", "08_bamco.knowledge_vqa"]
    assert "GPU-hours on one 80 GB" in out and "assumptions:" in out and "Does not fit" not in out


def test_plan_names_the_sharding_config_when_a_chapter_does_not_fit():
    values = rep.profile_values_of("full", ["07"], {"fusion_accumulate": 1, "gradient_checkpointing": False})
    (row,) = runner_plan.gpu_plan(values)
    # 40 layers x 34 x 48 questions x 256 tokens x 5120 wide x 2 bytes... = 85.6 GB of activations alone
    assert row["activations GB"] == pytest.approx(40 * 34 * 48 * 256 * 5120 / 1e9) and not row["fits one GPU"]
    table = runner_plan.plan_table([row])
    assert "Does not fit one GPU: 07_biod2c.gated_fusion" in table and "configs/accelerate/fsdp.yaml" in table
    for name in ("fsdp.yaml", "deepspeed_zero3.yaml"):
        assert (project_root() / "configs" / "accelerate" / name).is_file()
    checkpointed = runner_plan.gpu_plan(rep.profile_values_of("full", ["07"]))[0]
    assert checkpointed["activations GB"] < 0.05 * row["activations GB"] and checkpointed["fits one GPU"]
    assert checkpointed["TFLOP per step"] > row["TFLOP per step"]  # recomputation costs FLOPs


def test_readme_plan_is_the_generators_output():
    table = runner_plan.plan_table(runner_plan.gpu_plan(rep.profile_values_of("full", ["04", "05", "06", "07", "08"])))
    assert table in (project_root() / "README.md").read_text(), "regenerate: medvqa reproduce --profile full --plan"


def test_rehearsal_is_full_with_every_reduction_marked():
    """profiles/rehearsal.yaml keeps full's values except where a comment names the full value it reduces."""
    full = load_profile("full")
    lines = (project_root() / "profiles" / "rehearsal.yaml").read_text().splitlines()
    rehearsal = load_profile("rehearsal")
    assert set(rehearsal) == set(full)
    for line in lines:
        if ":" not in line or line.startswith("#"):
            continue
        key = line.split(":", 1)[0]
        if key == "profile":
            continue
        if rehearsal[key] != full[key]:
            assert f"# full: " in line, f"{key} differs from full without saying so"
            stated = line.split("# full: ", 1)[1].strip()
            assert runner_cli._parse_value(stated) == full[key] or stated == str(full[key]), key
    for key in ("image_size", "image_encoder", "text_encoder", "fusion_lm", "vqa_lm", "mixed_precision",
                "gradient_checkpointing", "fusion_accumulate"):  # the code paths that make it a rehearsal of full
        assert rehearsal[key] == full[key], key


# ---------------------------------------------------------------- the equation index
def test_equation_index_reads_names_cells_and_tests_of_a_small_project(tmp_path):
    """A two-function module and one test file: the rows are exactly what the files say."""
    (tmp_path / "medvqa").mkdir(); (tmp_path / "tests").mkdir()
    (tmp_path / "medvqa" / "toy.py").write_text(
        '"""BioD2C Eq. 9 is only mentioned here, in the module docstring."""\n'
        "# %% ../nbs/07_toy.ipynb #c001\n"
        "def gate(x):\n"
        "    return x  # BioD2C Eq. 2-3\n"
        "\n"
        "# %% ../nbs/07_toy.ipynb #c004\n"
        "class Block:\n"
        "    def forward(self, x):\n"
        '        """CMDPI Eq. 7."""\n'
        "        return x\n")
    (tmp_path / "tests" / "test_toy.py").write_text(
        "from medvqa.toy import gate, Block\n"
        "def test_gate():\n    assert gate(1) == 1\n"
        "def test_block():\n    assert Block().forward(2) == 2\n"
        "def helper():\n    gate(3)\n")
    rows = [(r["paper"], r["item"], r["function"], r["module"], r["notebook"], r["cell"], r["tests"]) for r in runner_index.equation_index(tmp_path)]
    assert rows == [
        ("BioD2C", "Eq. 2", "gate", "medvqa.toy", "07_toy", "c001", ["tests/test_toy.py::test_gate"]),
        ("BioD2C", "Eq. 3", "gate", "medvqa.toy", "07_toy", "c001", ["tests/test_toy.py::test_gate"]),
        ("CMDPI", "Eq. 7", "Block.forward", "medvqa.toy", "07_toy", "c004", ["tests/test_toy.py::test_block"])]


def test_every_equation_of_the_three_papers_is_indexed_with_a_test():
    index = runner_index.equation_index()
    numbers = {paper: {int(r["item"].split()[1]) for r in index if r["paper"] == paper} for paper in ("BaMCo", "CMDPI", "BioD2C")}
    assert numbers == {"BaMCo": {1}, "CMDPI": set(range(1, 14)), "BioD2C": set(range(1, 6))}
    for paper, equations in numbers.items():
        for number in equations:
            rows = [r for r in index if r["paper"] == paper and r["item"] == f"Eq. {number}"]
            assert any(r["tests"] for r in rows), f"{paper} Eq. {number}: no test calls {[r['function'] for r in rows]}"
    assert any(r["function"] == "queue_distribution" and r["item"] == "Eq. 3" for r in index)


def test_papers_hold_the_generated_equation_index():
    for paper in runner_index.PAPER_CHAPTERS:
        text = (project_root() / "papers" / f"{paper.lower()}.md").read_text()
        start, end = runner_index.INDEX_MARKERS
        body = text.split(start)[1].split(end)[0]
        assert runner_index.equation_index_markdown(paper) in body, f"papers/{paper.lower()}.md is stale: run medvqa index --write"


# ---------------------------------------------------------------- the book
def test_book_has_an_index_and_a_page_per_executed_notebook_with_its_figures(tmp_path):
    import nbformat
    from nbclient import NotebookClient
    results = tmp_path / "results"; results.mkdir()
    for name, code in (("01_first", "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
                                    "%matplotlib inline\nplt.plot([1, 2]); plt.show()"), ("02_second", "print(6 * 7)")):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# Chapter {name}"), nbformat.v4.new_code_cell(code),
                                             nbformat.v4.new_code_cell("#| hide\nprint('hidden' + '-777')")])
        NotebookClient(nb, kernel_name="medvqa", timeout=120).execute()
        nbformat.write(nb, results / f"{name}.ipynb")
    (results / "summary.json").write_text(json.dumps({"chapters": [{"chapter": "01_first", "status": "passed"}]}))
    pages = runner_book.build_book(results, tmp_path / "book", readme=project_root() / "README.md")
    assert [p.name for p in pages] == ["index.html", "01_first.html", "02_second.html"]
    index = pages[0].read_text()
    assert 'href="01_first.html">01_first</a>: Chapter 01_first (1 figure, passed)' in index
    assert 'href="02_second.html">02_second</a>: Chapter 02_second (0 figures)' in index
    assert "<h2" in index and "The two commands" in index  # the README, rendered
    assert pages[1].read_text().count('src="data:image/png;base64') == 1 and "42" in pages[2].read_text()
    assert "hidden-777" in str(nbformat.read(results / "02_second.ipynb", as_version=4).cells[2].outputs)
    assert "hidden-777" not in pages[2].read_text() and "#| hide" not in pages[2].read_text()  # nbdev's hide: not in the book
    assert (tmp_path / "book" / "mathjax" / "MathJax.js").is_file()  # equations typeset offline, from the book's copy
    assert 'src="mathjax/MathJax.js?config=' in pages[1].read_text() and "libs/mathjax" not in pages[1].read_text()
    with pytest.raises(FileNotFoundError, match="no executed notebooks"):
        runner_book.build_book(tmp_path / "empty", tmp_path / "book2")


def test_headless_progress_bars_fold_to_one_line_per_loop(tmp_path, monkeypatch):
    """Under the runner's MEDVQA_PROGRESS=text, a loop's redraws fold into its final line; nested loops stay silent."""
    import nbformat
    from nbclient import NotebookClient
    from medvqa.core import PROGRESS_ENV
    monkeypatch.setenv(PROGRESS_ENV, "text")  # what reproduce() sets for the kernels it starts
    code = ("from medvqa.core import progress_bar\n"
            "for _ in progress_bar(range(3), desc='outer', mininterval=0):\n"
            "    for _ in progress_bar(range(50), desc='inner', mininterval=0): pass\n"
            "for _ in progress_bar(range(200), desc='steps', mininterval=0): pass\n"
            "print('done')")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    NotebookClient(nb, kernel_name="medvqa", timeout=120).execute()
    path = tmp_path / "run.ipynb"
    nbformat.write(nb, path)
    redraws = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.get("name") == "stderr").count("\r")
    assert redraws > 200  # every step redrew (mininterval=0): a wall before folding
    assert rep.fold_streams(path) >= 0
    outputs = nbformat.read(path, as_version=4).cells[0].outputs
    lines = [line for o in outputs if o.get("name") == "stderr" for line in o["text"].split("\n") if line.strip()]
    assert len(lines) == 2, lines  # one final line per outer loop, none for the nested one
    assert lines[0].startswith("outer: 100%") and "3/3" in lines[0] and lines[1].startswith("steps: 100%")
    assert any("done" in o.get("text", "") for o in outputs if o.get("name") == "stdout")


def test_chapter_needs_follow_the_map_and_default_to_every_earlier_chapter(monkeypatch):
    monkeypatch.setattr(rep, "CHAPTER_NEEDS", {"01_a": (), "02_b": (), "03_c": ("01_a",), "04_d": ("03_c",)})
    chosen = ["01_a", "02_b", "03_c", "04_d", "05_e"]
    assert rep.chapter_needs("02_b", chosen) == []
    assert rep.chapter_needs("04_d", chosen) == ["01_a", "03_c"]  # what it needs, and what that needs in turn
    assert rep.chapter_needs("04_d", ["03_c", "04_d"]) == ["03_c"]  # only chapters that were chosen
    assert rep.chapter_needs("05_e", chosen) == ["01_a", "02_b", "03_c", "04_d"]  # not in the map: all before it


def _waits_for(mine: str, other: str) -> str:
    """A chapter body that marks its start, then waits (at most 60 s) for `other` to have started too."""
    return (f"import pathlib, time, json\nroot = pathlib.Path(metrics_path).parent\n(root / '{mine}.started').touch()\n"
            f"deadline = time.time() + 60\nwhile not (root / '{other}.started').exists() and time.time() < deadline:\n"
            f"    time.sleep(0.2)\nassert (root / '{other}.started').exists(), 'ran alone'\n"
            "json.dump({'metrics': {'steps': steps}}, open(metrics_path, 'w'))")


def test_jobs_run_independent_chapters_at_once_and_dependents_after(tmp_path, monkeypatch):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _chapter(nbs / "01_a.ipynb", _waits_for("a", "b"))  # a and b can only pass if they run at the same time
    _chapter(nbs / "02_b.ipynb", _waits_for("b", "a"))
    _chapter(nbs / "03_c.ipynb", "import pathlib, json\nroot = pathlib.Path(metrics_path).parent\n"
                                 "assert (root / '01_a.metrics.json').is_file(), 'started before the chapter it needs'\n"
                                 "json.dump({'metrics': {}}, open(metrics_path, 'w'))")
    monkeypatch.setattr(rep, "CHAPTER_NEEDS", {"01_a": (), "02_b": (), "03_c": ("01_a",)})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = rep.reproduce("smoke", nbs_dir=nbs, results_dir=tmp_path / "out", profile_values={"profile": "smoke"}, jobs=2)
    assert [(r.chapter, r.status, r.error) for r in runs] == [("01_a", "passed", ""), ("02_b", "passed", ""),
                                                               ("03_c", "passed", "")]
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [c["chapter"] for c in saved["chapters"]] == ["01_a", "02_b", "03_c"]  # the summary keeps the chapter order
    assert saved["jobs"] == 2 and 0 < saved["wall_seconds"] < sum(c["seconds"] for c in saved["chapters"])  # a, b overlapped
    assert "with up to 2 at once" in (tmp_path / "out" / "summary.md").read_text()
    with pytest.raises(ValueError, match="jobs"):
        rep.reproduce("smoke", nbs_dir=nbs, results_dir=tmp_path / "out", profile_values={"profile": "smoke"}, jobs=0)
