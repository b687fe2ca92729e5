"""The claims ledger: verdicts on hand-made effects, subsets and per-type counts against the official files, the ledger file."""
import csv
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medvqa.claims import (CLAIM_CHAPTERS, claim_rows, claim_verdict, contrast_effect, find_effect, per_type_table,
                           question_subsets, read_claims, seed_projection, seeds_needed, shuffled_images, subset_effects)
from medvqa.data.readers import VQARecord, load_split
from medvqa.evaluation import ablation_effects, seeded_effect

ROOT = Path(__file__).resolve().parents[1]


def effect(low, high, per_seed=(0.01, 0.02, 0.03), detectable=None):
    return {"difference": (low + high) / 2, "ci_low": low, "ci_high": high, "per_seed": list(per_seed), "seeds": len(per_seed),
            "detectable": 2.8 * (high - low) / 2 / 1.96 if detectable is None else detectable, "questions": 100}


@pytest.mark.parametrize("interval, paper, direction, expected", [
    ((0.005, 0.035), 0.02, 1, "reproduced"),
    ((-0.04, -0.01), 0.02, 1, "opposite"),
    ((-0.04, -0.01), None, -1, "reproduced"),  # the paper says the variant beats the full model
    ((0.005, 0.035), None, -1, "opposite"),
    ((-0.01, 0.01), 0.03, 1, "not seen, with power"),
    ((-0.03, 0.03), 0.0154, 1, "not seen, underpowered"),
    ((-0.02, 0.02), None, 1, "direction only, not seen"),
    ((0.0, 0.0), 0.02, 1, "no change at all"),
    ((0.0, 0.0), None, 1, "no change at all"),
])
def test_verdicts_on_hand_made_effects(interval, paper, direction, expected):
    assert claim_verdict(effect(*interval), paper, direction)["verdict"] == expected


def test_zero_width_interval_bounds_nothing():
    verdict = claim_verdict(effect(0.0, 0.0, (0.0, 0.0, 0.0), detectable=0.0), 0.02)
    assert verdict["verdict"] == "no change at all" and verdict["detectable"] is None  # not "with power"


def test_no_measurement_is_not_measured():
    assert claim_verdict(None, 0.02)["verdict"] == "not measured"


def test_interval_touching_zero_is_not_a_verdict_for_either_side():
    assert claim_verdict(effect(0.0, 0.03), 0.05)["verdict"] == "not seen, with power"


def test_seeds_needed_recovers_a_known_projection():
    """Differences with a known structure: a fixed effect per question (sd 0.2 over 500 questions: a part no seed count
    shrinks) plus a shift per seed (sd 0.03). With 8 observed seeds, the seeds that bring the standard error to the target
    are known (40); the projection from the bootstrap must land near it, and say 'more test questions' below the floor."""
    rng = np.random.default_rng(0)
    questions, tau, sigma, observed = 500, 0.2, 0.03, 8
    target = 2.8 * math.sqrt(tau ** 2 / questions + sigma ** 2 / 40)  # detectable with 40 seeds
    found = []
    for rep in range(5):
        u = rng.normal(0, tau, questions)
        d = 0.01 + u[None, :] + rng.normal(0, sigma, (observed, 1))  # [seeds, questions]
        e = seeded_effect(d, np.zeros_like(d), seed=rep)
        found.append(seeds_needed(e, target))
    assert all(n is not None for n in found) and 20 <= float(np.median(found)) <= 80, found
    floor = 2.8 * tau / math.sqrt(questions)  # the questions' part alone: no number of seeds gets below it
    assert seed_projection(e, 0.8 * floor) == (None, "more test questions, not seeds")
    assert seed_projection({**e, "per_seed": [0.01]}, target)[1] == "one seed: no spread to read"


def test_underpowered_verdict_carries_the_seeds():
    e = effect(-0.03, 0.03, per_seed=(-0.02, 0.01, 0.04))
    verdict = claim_verdict(e, 0.02)
    assert verdict["verdict"] == "not seen, underpowered" and verdict["seeds_needed"] == seeds_needed(e, 0.02)


def test_contrast_of_two_subsets():
    a, b = {**effect(0.02, 0.06), "subset": "open"}, {**effect(-0.02, 0.02), "subset": "closed"}
    c = contrast_effect(a, b)
    assert c["difference"] == pytest.approx(0.04)
    se = math.hypot(a["detectable"] / 2.8, b["detectable"] / 2.8)
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((0.04 - 1.96 * se, 0.04 + 1.96 * se))


def records(types, organs=None, kinds=None):
    n = len(types)
    return [VQARecord("x", "test", f"q{i}", f"i{i}", None, "q", "a", "open" if i % 2 else "closed", t,
                      (organs or ["Lung"] * n)[i], (kinds or [None] * n)[i]) for i, t in enumerate(types)]


def test_question_subsets_split_several_types_and_share_names():
    subsets = question_subsets(records(["POS, PRES", "Position", "KG", "ABN"]))
    assert subsets["type: Position"] == [0, 1] and subsets["type: Presence"] == [0]
    assert subsets["type: Abnormality"] == [3] and subsets["type: KG"] == [2]
    assert subsets["open"] == [1, 3] and subsets["closed"] == [0, 2] and subsets["all"] == [0, 1, 2, 3]


def test_subset_effects_equal_the_effect_on_the_sliced_questions():
    rng = np.random.default_rng(0)
    recs = records(["Position", "KG"] * 30)
    full, variant = (rng.random((3, 60)) < 0.7).astype(float), (rng.random((3, 60)) < 0.5).astype(float)
    clusters = [f"img{k // 3}" for k in range(60)]
    found = {e["subset"]: e for e in subset_effects({"full": full, "variant": variant}, recs, clusters, min_questions=20)}
    rows = [k for k in range(60) if k % 2 == 1]  # the KG questions
    alone = seeded_effect(full[:, rows], variant[:, rows], [clusters[k] for k in rows])
    assert found["type: KG"]["difference"] == pytest.approx(alone["difference"])
    assert (found["type: KG"]["ci_low"], found["type: KG"]["ci_high"]) == pytest.approx((alone["ci_low"], alone["ci_high"]))
    loop = np.mean([full[s, k] - variant[s, k] for s in range(3) for k in rows])  # a plain loop over seeds and questions
    assert found["type: KG"]["difference"] == pytest.approx(loop)
    assert found["all"]["difference"] == pytest.approx(ablation_effects({"full": full, "variant": variant}, clusters)[0]["difference"])


def test_shuffled_images_never_keep_the_image_and_keep_its_kind():
    recs = records(["x"] * 12, kinds=["CT"] * 6 + ["MRI"] * 5 + ["X-Ray"])
    swap = shuffled_images(recs, seed=1)
    kind = {r.image_id: r.modality for r in recs}
    assert set(swap) == set(kind) and all(a != b for a, b in swap.items())
    assert all(kind[a] == kind[b] for a, b in swap.items() if kind[a] != "X-Ray")  # the lone X-ray borrows another image
    assert sorted(swap[a] for a in swap if kind[a] == "CT") == sorted(a for a in swap if kind[a] == "CT")  # a permutation


def test_per_type_table_counts_and_scores():
    recs = records(["Position", "KG", "Position", "Organ"])
    table = per_type_table(recs, {"model": ["a", "b", "a", "a"], "other": ["b"] * 4})
    assert table.loc["type: Position", "questions"] == 2 and table.loc["type: Position", "model"] == 100.0
    assert table.loc["all", "model"] == 75.0 and table.loc["all", "other"] == 0.0
    flagged = per_type_table(recs, {"model": ["b", "b", "a", "a"], "other": ["a", "b", "a", "b"]}, flag=("model", "other"))
    assert flagged.loc["type: Position", "below"] == "other" and flagged.loc["type: Organ", "below"] == "—"


def test_per_type_counts_match_the_official_slake_file(shared_data):
    raw = json.loads((shared_data / "slake" / "Slake1.0" / "test.json").read_text(encoding="utf-8"))
    english = Counter(q["content_type"] for q in raw if q["q_lang"] == "en")
    subsets = question_subsets(load_split("slake", "test", root=shared_data / "slake"))
    assert {k.removeprefix("type: "): len(v) for k, v in subsets.items() if k.startswith("type: ")} == dict(english)
    assert english["KG"] == 148 and len(subsets["all"]) == 1061


def test_per_type_counts_match_the_official_vqa_rad_file(shared_data):
    raw = json.loads((shared_data / "vqa_rad" / "mevf_data_RAD" / "testset.json").read_text(encoding="utf-8"))
    counts = Counter()
    for q in raw:
        for part in str(q["question_type"]).split(","):
            counts[part.strip().upper()] += 1
    subsets = question_subsets(load_split("vqa-rad", "test", root=shared_data / "vqa_rad"))
    names = {"POS": "Position", "ABN": "Abnormality", "PRES": "Presence", "SIZE": "Size", "MODALITY": "Modality",
             "PLANE": "Plane", "ORGAN": "Organ", "COUNT": "Quantity", "COLOR": "Color", "ATTRIB": "Attribute", "OTHER": "Other"}
    assert {names[k]: v for k, v in counts.items()} == {k.removeprefix("type: "): len(v) for k, v in subsets.items()
                                                      if k.startswith("type: ")}
    assert len(subsets["all"]) == 451


def test_the_committed_ledger_reads_and_names_testable_chapters():
    claims = read_claims(ROOT / "papers" / "claims.csv")
    assert len(claims) >= 25
    assert {c["paper"] for c in claims} == {"BaMCo", "CMDPI", "BioD2C"}
    for c in claims:
        assert c["chapter"] in ("", *CLAIM_CHAPTERS), c["id"]
        assert c["chapter"] or c["note"], f"{c['id']}: an untestable claim must say why"
    assert next(c for c in claims if c["id"] == "B1")["paper_effect"] == 1.54


def test_bad_ledger_rows_name_file_line_and_field(tmp_path):
    header = "id,paper,source,claim,chapter,comparison,subset,metric,direction,paper_effect,paper_numbers,given,note\n"
    cases = {"X1,BaMCo,T,c,08,a - b,all,accuracy,+,two,,table,\n": "line 2, field 'paper_effect'",
             "X1,BaMCo,T,c,08,a - b,all,accuracy,+,1.0,,guess,\n": "line 2, field 'given'",
             "X1,BaMCo,T,c,08,a - b,all,accuracy,-,1.0,,table,\n": "disagrees with direction",
             "X1,BaMCo,T,c,08,,all,accuracy,+,1.0,,table,\n": "field 'comparison'",
             "X1,BaMCo,T,c,08,a - b,all,accuracy,+,1.0,,direction,\n": "a 'direction' claim carries no size"}
    for row, message in cases.items():
        path = tmp_path / "claims.csv"
        path.write_text(header + row, encoding="utf-8")
        with pytest.raises(ValueError, match=message) as error:
            read_claims(path)
        assert str(path) in str(error.value)


def test_claim_rows_find_subsets_alternatives_and_contrasts(tmp_path):
    path = tmp_path / "claims.csv"
    rows = ["id,paper,source,claim,chapter,comparison,subset,metric,direction,paper_effect,paper_numbers,given,note",
            "A,CMDPI,F,x,06,full - v,organ: Lung|organ: CHEST,accuracy,+,,,figure,",
            "B,CMDPI,F,y,06,full - v,open - closed,accuracy,+,,,direction,",
            "C,CMDPI,F,z,06,full CMDPI - p (10% of * questions),all,accuracy,+,5,,table,",
            "D,CMDPI,F,w,,,all,accuracy,+,,,direction,no chapter"]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    effects = [{**effect(0.01, 0.05), "comparison": "full - v", "subset": "organ: CHEST"},
               {**effect(0.02, 0.06), "comparison": "full - v", "subset": "open"},
               {**effect(-0.02, 0.02), "comparison": "full - v", "subset": "closed"},
               {**effect(-0.02, 0.02), "comparison": "full CMDPI - p (10% of 700 questions)"}]
    found = {r["id"]: r for r in claim_rows(read_claims(path), {"06": effects})}
    assert found["A"]["subset"] == "organ: CHEST" and found["A"]["verdict"] == "reproduced"
    assert found["B"]["difference"] == pytest.approx(4.0)
    assert found["C"]["verdict"] == "not seen, with power"  # detectable ≈ 2.9 points against the paper's 5
    assert found["D"]["verdict"] == "not testable here"
    assert find_effect({"comparison": "nothing", "subset": "all"}, effects) is None


def test_every_testable_claim_finds_its_effect_in_the_smoke_run(smoke_run):
    """The ledger's comparisons and subsets name effects the chapters really produce (a typo would read 'not measured')."""
    from medvqa.runner.results import run_effects
    results, _ = smoke_run
    rows = claim_rows(read_claims(ROOT / "papers" / "claims.csv"), run_effects(results))
    missing = [r["id"] for r in rows if r["verdict"] == "not measured"]
    assert not missing, f"claims without an effect in the smoke run: {missing}"
