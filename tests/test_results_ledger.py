"""`medvqa results` writes the claims ledger, the per-type tables and the reference seed bands from run folders."""
import csv
import json
import shutil
from pathlib import Path

from medvqa.runner.folder import ChapterRun, band_lines, reference_rows, write_summary
from medvqa.runner.results import ledger_rows, write_results

ROOT = Path(__file__).resolve().parents[1]


def effect(comparison, low, high, subset=None, per_seed=(0.01, 0.02, 0.03)):
    e = {"comparison": comparison, "difference": (low + high) / 2, "ci_low": low, "ci_high": high, "per_seed": list(per_seed),
         "seeds": len(per_seed), "questions": 1061, "clusters": 96, "detectable": 2.8 * (high - low) / 3.92}
    return {**e, "subset": subset} if subset else e


def fake_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    m06 = {"dataset": "slake", "overall": 0.78, "question_only_overall": 0.56, "blank_image_overall": 0.46,
           "ablation_seeds": {"full": [0.70, 0.71, 0.72]},
           "effects": [effect("full - w/o diff. rec.", 0.006, 0.040), effect("full - w/o head mixup", -0.02, 0.01)],
           "subset_effects": [effect("full - w/o head mixup", -0.05, -0.01, "open"), effect("full - w/o head mixup", -0.01, 0.03, "closed")],
           "per_type": [{"subset": "all", "questions": 1061, "full": 78.0, "question-only": 56.0, "below": "—"},
                        {"subset": "type: KG", "questions": 148, "full": 60.0, "question-only": 70.0, "below": "question-only"}]}
    m08 = {"dataset": "slake", "effects": [effect("BaMCo - baseline", -0.017, 0.019)]}
    chapters = [{"chapter": "06_cmdpi.difference_reconstruction", "status": "passed", "seconds": 700.0, "metrics": {"metrics": m06}},
                {"chapter": "08_bamco.knowledge_vqa", "status": "passed", "seconds": 900.0, "metrics": {"metrics": m08}}]
    (folder / "summary.json").write_text(json.dumps({"profile": "cpu", "chapters": chapters}), encoding="utf-8")
    return folder


def test_ledger_rows_read_verdicts_from_a_run(tmp_path):
    rows = {r["id"]: r for r in ledger_rows({"cpu, SLAKE": fake_run(tmp_path / "run")})}
    assert rows["C3"]["verdict"] == "reproduced" and rows["C3"]["difference"] == 2.3
    assert rows["C5"]["verdict"] == "opposite" and rows["C5"]["subset"] == "open"
    assert rows["C7"]["verdict"] == "opposite"  # open - closed: -3.0 - (+1.0)
    assert rows["B1"]["verdict"] == "not seen, underpowered"  # detectable ≈ 2.6 > 1.54
    assert rows["D1"]["verdict"] == "not measured" and rows["D1"]["seeds_note"] == "chapter 07 did not run"
    assert rows["C22"]["verdict"] == "not testable here"
    assert rows["C14"]["seeds_note"] == "no such questions in this dataset"  # the comparison ran, with no position subset


def test_write_results_fills_readme_papers_and_reference(tmp_path):
    project = tmp_path / "project"
    (project / "papers").mkdir(parents=True)
    for name in ("bamco.md", "cmdpi.md", "biod2c.md"):
        (project / "papers" / name).write_text(f"# {name}\n<!-- ledger:start -->\nstale text\n<!-- ledger:end -->\ntail\n")
    (project / "README.md").write_text("# r\n<!-- results:start -->\n<!-- results:end -->\n<!-- ledger:start -->\n<!-- ledger:end -->\n")
    shutil.copy(ROOT / "papers" / "reported_results.csv", project / "papers" / "reported_results.csv")
    run = fake_run(tmp_path / "run")
    written = write_results({"cpu, SLAKE": run}, project / "README.md", "made by a test")
    readme = (project / "README.md").read_text()
    assert "| C3 difference reconstruction raises overall accuracy |" in readme and "**reproduced**" in readme
    cmdpi = (project / "papers" / "cmdpi.md").read_text()
    assert "stale text" not in cmdpi and cmdpi.endswith("tail\n") and "| type: KG | 148 | 60.0 | 70.0 | question-only |" in cmdpi
    assert "| B1 " not in cmdpi and "| B1 " in (project / "papers" / "bamco.md").read_text()
    assert "full - w/o diff. rec." in cmdpi  # the ablation effects live beside the paper's claims
    ledger = list(csv.DictReader(open(project / "papers" / "claims_ledger.csv", encoding="utf-8")))
    assert {r["id"] for r in ledger} >= {"B1", "C3", "D1"} and all(r["run"] == "cpu, SLAKE" for r in ledger)
    seeds = list(csv.DictReader(open(project / "papers" / "reference_seeds.csv", encoding="utf-8")))
    assert [(r["chapter"], r["number"], r["seed"], float(r["value"])) for r in seeds] == [
        ("06", "overall", "0", 0.78), ("06", "ablation: full", "0", 0.70), ("06", "ablation: full", "1", 0.71), ("06", "ablation: full", "2", 0.72)]
    assert project / "papers" / "reference_seeds.csv" in written


def test_a_run_is_read_against_the_reference_band(tmp_path):
    run = json.loads((fake_run(tmp_path / "run") / "summary.json").read_text())["chapters"]
    reference = [{k: str(v) for k, v in r.items()} for r in reference_rows(run, "cpu")]
    same = band_lines(run, "cpu", reference)
    assert same[0].startswith("2 of 2 headline numbers lie inside")
    moved = [{**run[0], "metrics": {"metrics": {**run[0]["metrics"]["metrics"], "ablation_seeds": {"full": [0.60, 0.61, 0.62]}}}}]
    lines = band_lines(moved, "cpu", reference)
    assert lines[0].startswith("1 of 2") and "| 06 | slake | ablation: full | 61.0 | 69.5 – 72.5 | 3 | **no** |" in lines
    runs = [ChapterRun("06_cmdpi.difference_reconstruction", "passed", 1.0, "x.ipynb", metrics=moved[0]["metrics"])]
    summary = write_summary(runs, tmp_path, "cpu", reference=reference).read_text()
    assert "## Against the reference runs" in summary and "1 of 2 headline numbers" in summary
