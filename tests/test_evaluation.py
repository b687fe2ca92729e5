"""Tests of the scoring modes (strict, BaMCo's rule, LLaVA-Med's rule), text metrics, intervals and prediction files."""
import math

import numpy as np
import pandas as pd
import pytest

from medvqa.data.readers import VQARecord
from medvqa.evaluation import SCORING_MODES, accuracy_table, bert_scores, bleu1, bootstrap_interval, detectable_sentence, effect_verdict, effects_table, question_kind, read_predictions, rouge1, score_answer, score_predictions, score_records, text_metrics, write_predictions

CASES = [  # prediction, reference, answer type, expected strict / bamco / llava-med
    ("Yes", "yes", "closed", (1, 1, 1)),
    ("yes.", "yes", "closed", (1, 0, 1)),  # bamco does not strip punctuation
    ("no", "yes", "closed", (0, 0, 0)),
    ("", "left lung", "open", (0, 1, 0)),  # bamco: the empty string is contained in every reference
    ("normal", "no", "closed", (0, 0, 1)),  # llava-med: "normal" contains "no"
    ("no", "normal", "open", (0, 1, 0)),  # bamco: "no" is contained in "normal"
    ("the left lung", "left lung", "open", (1, 1, 1)),  # strict drops articles
    ("lung", "left lung", "open", (0, 1, 0.5)),  # llava-med: recall of the reference's words
    ("liver, spleen", "spleen", "open", (0, 1, 1)),
    ("Left Lung", "left lung", "open", (1, 1, 1)),
    ("2", "two", "open", (1, 0, 0)),  # strict maps number words to digits
]


@pytest.mark.parametrize("prediction, reference, answer_type, expected", CASES)
def test_scoring_modes_on_hand_made_cases(prediction, reference, answer_type, expected):
    for mode, value in zip(SCORING_MODES, expected):
        assert score_answer(prediction, reference, answer_type, mode) == value, mode


def released_bamco_open(prediction: str, reference: str) -> bool:
    """BaMCo's released open-answer rule as a plain loop: trim and lower-case both, split the prediction at commas,
    drop at most one leading space of each piece (a piece's other spaces stay), then containment either way."""
    pred, ref = prediction.strip().lower(), reference.strip().lower()
    for piece in pred.split(","):
        if len(piece) > 0 and piece[0] == " ":
            piece = piece[1:]
        if piece in ref or ref in piece:
            return True
    return False


@pytest.mark.parametrize("prediction, reference", [
    ("effusion , left", "pleural effusion"), ("effusion, left", "pleural effusion"), ("  effusion", "pleural effusion"),
    ("kidney,", "liver"), (",", "liver"), ("liver ,spleen", "spleen"), ("liver,  spleen", "spleen"),
    ("left lung, right", "left lung"), ("Pleural Effusion ", "pleural effusion"), ("lung", "left lung"), ("x", "y"),
])
def test_bamco_open_rule_is_the_released_loop(prediction, reference):
    assert score_answer(prediction, reference, "open", "bamco") == float(released_bamco_open(prediction, reference))


def test_bamco_open_rule_quirks():
    assert score_answer("effusion , left", "pleural effusion", "open", "bamco") == 0.0  # "effusion " keeps its space
    assert score_answer("effusion, left", "pleural effusion", "open", "bamco") == 1.0
    assert score_answer("liver,  spleen", "spleen tip", "open", "bamco") == 0.0  # only one leading space goes
    assert score_answer("kidney,", "liver", "open", "bamco") == 1.0  # trailing comma: the empty piece matches


def test_bamco_decides_open_or_closed_by_the_reference():
    assert question_kind("yes", "open", "bamco") == "closed"  # a yes/no reference is closed whatever the dataset says
    assert question_kind("left", "closed", "bamco") == "open"
    assert question_kind("left", "closed", "strict") == "closed"
    # so "Is the lesion on the left or right? - left" is open under bamco and scored by containment
    assert score_answer("left side", "left", "closed", "bamco") == 1.0
    assert score_answer("left side", "left", "closed", "strict") == 0.0


def test_score_predictions_counts_and_errors():
    out = score_predictions(["yes", "", "left lung", "no"], ["yes", "liver", "right lung", "yes"],
                            ["closed", "open", "open", "closed"])
    assert (out["closed"], out["open"], out["overall"], out["n_open"], out["n_closed"]) == (0.5, 0.0, 0.25, 2, 2)
    assert score_predictions(["", ""], ["a", "b"], ["open", "open"], "bamco")["open"] == 1.0
    with pytest.raises(ValueError, match="same length"):
        score_predictions(["yes"], ["yes", "no"], ["closed"] * 2)
    with pytest.raises(ValueError, match="unknown answer type"):
        score_predictions(["yes"], ["yes"], ["boolean"])
    with pytest.raises(ValueError, match="unknown scoring mode"):
        score_predictions(["yes"], ["yes"], ["closed"], "exact")
    recs = [VQARecord("synthetic", "test", "1", "0", None, "q", "Yes", "closed")]
    assert score_records(recs, ["yes"])["closed"] == 1.0
    with pytest.raises(ValueError, match="2 predictions for 1 records"):
        score_records(recs, ["yes", "no"])


def test_bleu1_and_rouge1_on_known_pairs():
    # BLEU-1: clipped unigram precision times the brevity penalty exp(1 - r / c) when the candidate is shorter
    assert bleu1(["the left lung"], ["left lung"])[0] == pytest.approx(2 / 3)
    assert bleu1(["lung"], ["left lung"])[0] == pytest.approx(1.0 * math.exp(1 - 2 / 1))
    assert bleu1(["Left Lung"], ["left lung"])[0] == pytest.approx(1.0)
    assert bleu1([""], ["left lung"])[0] == 0.0
    # ROUGE-1 F: 2 P R / (P + R) over unigrams
    assert rouge1(["the left lung"], ["left lung"])[0] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert rouge1(["right kidney"], ["left lung"])[0] == 0.0


def test_bertscore_offline_and_text_metrics():
    same, other = bert_scores(["left lung", "left lung"], ["left lung", "liver"], "minilm")
    assert same == pytest.approx(1.0, abs=1e-4) and other < same
    # an empty generation (possible for any LM; every answer of a random-weight one) scores 0, the rest as before
    assert bert_scores(["", "left lung", "  "], ["liver", "left lung", "spleen"], "minilm") == [0.0, pytest.approx(same), 0.0]
    metrics = text_metrics(["left lung"], ["left lung"], None)
    assert metrics == {"bleu1": pytest.approx(1.0), "rouge1": pytest.approx(1.0)}
    assert text_metrics(["left lung"], ["left lung"], "") == metrics  # bertscore_model="" leaves BERTScore out
    with pytest.raises(ValueError, match="bert_scores needs a model"):
        bert_scores(["yes"], ["no"], "")
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        text_metrics(["a", "b"], ["a"], None)


def test_bootstrap_interval():
    rng = np.random.default_rng(0)
    small = (rng.random(50) < 0.7).astype(float)
    large = (rng.random(5000) < 0.7).astype(float)
    lo_s, hi_s = bootstrap_interval(small, 1000)
    lo_l, hi_l = bootstrap_interval(large, 1000)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4  # about 1 / sqrt(100) as wide
    assert bootstrap_interval([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert bootstrap_interval([0.0, 1.0] * 50, seed=3) == bootstrap_interval([0.0, 1.0] * 50, seed=3)


def test_accuracy_table_matches_score_predictions():
    frame = pd.DataFrame({"prediction": [p for p, *_ in CASES], "reference": [r for _, r, *_ in CASES],
                          "answer_type": [t for _, _, t, _ in CASES], "group": ["a", "b"] * 5 + ["a"]})
    table = accuracy_table(frame, by=("group",), samples=200)
    for mode in SCORING_MODES:
        for group, part in frame.groupby("group"):
            expected = score_predictions(part.prediction.tolist(), part.reference.tolist(), part.answer_type.tolist(), mode)
            for kind in ("open", "closed", "overall"):
                row = table[(table.group == group) & (table["mode"] == mode) & (table.questions == kind)]
                if kind == "overall" or expected[f"n_{kind}"]:
                    assert row.accuracy.iloc[0] == pytest.approx(expected[kind])
                    assert row.ci_low.iloc[0] <= row.accuracy.iloc[0] <= row.ci_high.iloc[0]
    with pytest.raises(ValueError, match="missing column"):
        accuracy_table(frame.drop(columns="reference"))


def test_prediction_files_round_trip_and_errors(tmp_path):
    recs = [VQARecord("slake", "test", str(i), "0", None, f"q{i}", a, t, "Organ")
            for i, (a, t) in enumerate([("Yes", "closed"), ("left lung", "open")])]
    path = write_predictions(tmp_path / "p.csv", recs, ["yes", ""], "07_biod2c.gated_fusion", "BioD2C")
    write_predictions(path, recs, ["no", "lung"], "07_biod2c.gated_fusion", "w/o fusion", append=True)
    frame = read_predictions(path)
    assert len(frame) == 4 and frame.prediction.tolist() == ["yes", "", "no", "lung"]  # empty stays empty, not NaN
    assert frame.variant.tolist() == ["BioD2C", "BioD2C", "w/o fusion", "w/o fusion"]
    frame.loc[1, "answer_type"] = "free"
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="bad.csv, row 3, field 'answer_type'"):
        read_predictions(tmp_path / "bad.csv")
    frame.drop(columns="question").to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ValueError, match="missing column"):
        read_predictions(tmp_path / "short.csv")
    with pytest.raises(ValueError, match="1 predictions for 2 records"):
        write_predictions(tmp_path / "x.csv", recs, ["yes"], "c", "v")


def _records(rows, split="train"):
    return [VQARecord("toy", split, f"{split}{i}", "0", None, q, a, t, "") for i, (q, a, t) in enumerate(rows)]


def test_majority_answers_per_answer_type():
    from medvqa.evaluation import majority_answers
    train = _records([("Is it?", "Yes", "closed"), ("Is it?", "yes", "closed"), ("Is it?", "no", "closed"),
                      ("What?", "liver", "open"), ("What?", "lung", "open"), ("What?", "Lung.", "open")])
    test = _records([("Is x?", "no", "closed"), ("What x?", "lung", "open")], "test")
    assert majority_answers(train, test) == ["yes", "lung"]
    only_closed = _records([("Is it?", "no", "closed")])
    assert majority_answers(only_closed, test) == ["no", "no"]  # no open training answer: the overall majority
    with pytest.raises(ValueError, match="no training records"):
        majority_answers([], test)


def test_question_only_answers_learn_words_not_images():
    from medvqa.evaluation import question_only_answers
    train = _records([(f"Which organ is {w}?", a, "open") for w, a in
                      [("bright", "liver"), ("shining", "liver"), ("dark", "lung"), ("black", "lung")] * 3])
    test = _records([("Which organ is bright?", "liver", "open"), ("Which organ is dark?", "lung", "open")], "test")
    assert question_only_answers(train, test) == ["liver", "lung"]
    assert question_only_answers(_records([("a?", "Yes", "closed")] * 2), test) == ["yes", "yes"]


def cluster_members(clusters):
    """{cluster label: its question indices} and the sorted labels (np.unique's order)."""
    members = {}
    for q, c in enumerate(clusters):
        members.setdefault(str(c), []).append(q)
    return members, sorted(members)


def paired_loop(a, b, clusters, samples, level, seed):
    """The cluster bootstrap of a - b written out one resample at a time."""
    members, names = cluster_members(clusters)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(samples):
        picked = [q for k in rng.integers(0, len(names), size=len(names)) for q in members[names[k]]]
        stats.append(sum(a[q] - b[q] for q in picked) / len(picked))
    return np.quantile(stats, (1 - level) / 2), np.quantile(stats, 1 - (1 - level) / 2), float(np.mean(np.array(a) - np.array(b)))


@pytest.mark.parametrize("questions, per_image, seed", [(30, 1, 0), (45, 3, 1), (61, 5, 2)])
def test_paired_bootstrap_matches_a_plain_loop(questions, per_image, seed):
    from medvqa.evaluation import paired_bootstrap
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 2, questions).astype(float), rng.integers(0, 2, questions).astype(float)
    images = [f"image{q // per_image}" for q in range(questions)]
    fast = paired_bootstrap(a, b, images, samples=400, level=0.9, seed=seed)
    low, high, mean = paired_loop(a, b, images, 400, 0.9, seed)
    assert (fast["ci_low"], fast["ci_high"], fast["difference"]) == pytest.approx((low, high, mean), abs=1e-12)
    assert fast["clusters"] == -(-questions // per_image) and fast["questions"] == questions


def test_paired_bootstrap_properties():
    from medvqa.evaluation import paired_bootstrap
    a = np.array([1.0, 0, 1, 1, 0, 1, 0, 1])
    same = paired_bootstrap(a, a, list("aabbccdd"))
    assert (same["difference"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    better = paired_bootstrap(np.ones(40), np.arange(40) % 3 == 0, [q // 4 for q in range(40)])
    assert better["ci_low"] > 0 and better["difference"] == pytest.approx(1 - 14 / 40)
    worse = paired_bootstrap(np.arange(40) % 3 == 0, np.ones(40), [q // 4 for q in range(40)])
    assert worse["difference"] == -better["difference"] and worse["ci_high"] < 0
    # clustering widens the interval when questions of one image move together
    scores_a = np.repeat(np.random.default_rng(0).integers(0, 2, 20), 5).astype(float)
    scores_b = np.zeros(100)
    loose = paired_bootstrap(scores_a, scores_b, None, seed=1)
    tight = paired_bootstrap(scores_a, scores_b, np.repeat(np.arange(20), 5), seed=1)
    assert tight["ci_high"] - tight["ci_low"] > 1.5 * (loose["ci_high"] - loose["ci_low"])
    with pytest.raises(ValueError, match="same questions"):
        paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="cluster labels"):
        paired_bootstrap([1.0, 0.0], [1.0, 1.0], ["a"])


def seeded_loop(a, b, clusters, samples, level, seed):
    """The two-level bootstrap written out: per resample, the clusters and then the seeds, as drawn."""
    members, names = cluster_members(clusters)
    rng = np.random.default_rng(seed)
    cluster_picks = rng.integers(0, len(names), size=(samples, len(names)))
    seed_picks = rng.integers(0, len(a), size=(samples, len(a)))
    stats = []
    for r in range(samples):
        picked = [q for k in cluster_picks[r] for q in members[names[k]]]
        stats.append(np.mean([sum(a[s][q] - b[s][q] for q in picked) / len(picked) for s in seed_picks[r]]))
    return np.quantile(stats, (1 - level) / 2), np.quantile(stats, 1 - (1 - level) / 2)


@pytest.mark.parametrize("seeds, questions, per_image, seed", [(1, 30, 2, 0), (3, 45, 3, 1), (4, 61, 5, 2)])
def test_seeded_effect_matches_a_plain_loop(seeds, questions, per_image, seed):
    from medvqa.evaluation import seeded_effect
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 2, (seeds, questions)).astype(float), rng.integers(0, 2, (seeds, questions)).astype(float)
    images = [f"image{q // per_image}" for q in range(questions)]
    fast = seeded_effect(a, b, images, samples=300, level=0.9, seed=seed)
    assert (fast["ci_low"], fast["ci_high"]) == pytest.approx(seeded_loop(a, b, images, 300, 0.9, seed), abs=1e-12)
    assert fast["difference"] == pytest.approx(sum((a[s] - b[s]).mean() for s in range(seeds)) / seeds)
    assert fast["per_seed"] == pytest.approx([(a[s] - b[s]).mean() for s in range(seeds)])
    assert (fast["seeds"], fast["questions"]) == (seeds, questions)


def test_seeded_effect_properties_and_ablation_effects():
    from medvqa.evaluation import ablation_effects, effects_lines, paired_bootstrap, seed_summary, seeded_effect
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 2, 50).astype(float), rng.integers(0, 2, 50).astype(float)
    images = [q // 5 for q in range(50)]
    one, plain = seeded_effect(a, b, images, seed=3), paired_bootstrap(a, b, images, seed=3)
    assert (one["ci_low"], one["ci_high"]) == (plain["ci_low"], plain["ci_high"])  # one seed: the paired bootstrap
    # a component that helps on some seeds and hurts on others: seed resampling widens the interval
    full = np.ones((3, 50))
    mixed = np.stack([np.zeros(50), np.ones(50), np.zeros(50) + (np.arange(50) % 2)])
    wide, pooled = seeded_effect(full, mixed, images), paired_bootstrap(full.mean(0), mixed.mean(0), images)
    assert wide["ci_high"] - wide["ci_low"] > 2 * (pooled["ci_high"] - pooled["ci_low"])
    assert wide["detectable"] > 0
    effects = ablation_effects({"full": full, "w/o A": np.zeros((3, 50)), "w/o B": full, "w/o C": mixed}, images)
    assert [e["comparison"] for e in effects] == ["full - w/o A", "full - w/o B", "full - w/o C"]
    assert effects[0]["ci_low"] == 1.0 and effects[1]["difference"] == 0.0
    lines = effects_lines(effects)
    assert "helps" in lines[0] and "3 seeds x 50 questions on 10 images" in lines[0]
    # identical scores give a zero-width interval: read as "changed nothing", not as "0.0 points would be detected"
    assert "score every question the same" in lines[1] and "detected" not in lines[1].split(":")[-1].split(",")[0]
    assert "includes 0" in lines[2] and f"about {100 * effects[2]['detectable']:.1f} points" in lines[2]
    reading = detectable_sentence(effects)
    assert reading == (f"Differences of about {100 * min(effects[0]['detectable'], effects[2]['detectable']):.1f} to "
                       f"{100 * max(effects[0]['detectable'], effects[2]['detectable']):.1f} points would have been detected; "
                       "full - w/o B: the same score on every question in every seed, so that component changed nothing here.")
    assert detectable_sentence(effects[1:2]).startswith("full - w/o B: the same score")
    assert [effect_verdict(e, short=True) for e in effects] == [
        "above 0", "same score on every question", f"includes 0 (detectable ≈ {100 * effects[2]['detectable']:.1f})"]
    table = effects_table(effects)  # the same readings as a table, one row per comparison
    assert list(table.index) == ["full - w/o A", "full - w/o B", "full - w/o C"]
    assert table.loc["full - w/o A", "difference (points)"] == 100.0 and table.loc["full - w/o A", "95 % interval"] == "[+100.0, +100.0]"
    assert table.loc["full - w/o C", "seeds × questions (images)"] == "3 × 50 (10)"
    assert list(table["reading"]) == [effect_verdict(e, short=True) for e in effects]
    summary = seed_summary({"full": full, "mixed": mixed}).set_index("variant")
    assert summary.loc["mixed", "mean"] == pytest.approx(0.5) and summary.loc["mixed", "sd"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same seeds and questions"):
        seeded_effect(np.ones((3, 5)), np.ones((2, 5)))
    with pytest.raises(ValueError, match="no 'full'"):
        ablation_effects({"base": full})


def test_image_use_report_on_hand_made_predictions():
    from medvqa.evaluation import image_use_report
    records = [VQARecord("synthetic", "test", str(q), f"img{q // 2}", None, "q", ans, "closed" if ans in ("yes", "no") else "open")
               for q, ans in enumerate(["yes", "liver", "no", "ct", "yes", "mri"])]
    model = ["yes", "liver", "no", "ct", "no", "mri"]  # 5 of 6
    question_only = ["yes", "lung", "yes", "ct", "yes", "ct"]  # 3 of 6
    blank = ["yes", "lung", "no", "x-ray", "yes", "x-ray"]  # 3 of 6
    report = image_use_report(records, model, question_only, blank, seed=0)
    assert (report["overall"], report["question_only_overall"], report["blank_image_overall"]) == pytest.approx((5 / 6, 0.5, 0.5))
    assert report["paired"]["model - question-only"]["difference"] == pytest.approx(1 / 3)
    assert report["paired"]["model - blank image"]["clusters"] == 3  # questions cluster by image
    with pytest.raises(ValueError, match="5 blank image answers for 6 records"):
        image_use_report(records, model, question_only, blank[:5])
    from medvqa.evaluation import image_use_lines
    lines = image_use_lines(report, "toy")
    assert len(lines) == 2 and lines[0].startswith("toy model - question-only: +33.3 points, 95 % interval [")
    assert lines[1].endswith("over 6 questions on 3 images (" + ("above 0: the image helps)" if report["paired"]["model - blank image"]["ci_low"] > 0
                                                                  else "includes 0: no evidence at this size)"))


def test_blank_image_evaluation_separates_a_model_that_looks_from_one_that_does_not():
    """The blank-image baseline: a model reading the image changes its answers, a question-only model does not."""
    import torch
    from medvqa.data.batches import mean_image
    images = {"dark": torch.full((3, 4, 4), -1.0), "bright": torch.full((3, 4, 4), 1.0)}
    blank = mean_image(images.values())
    looks = lambda x: "bright" if float(x.mean()) > 0.5 else "dark"
    ignores = lambda x: "dark"
    records = [VQARecord("t", "test", "0", "dark", None, "which?", "dark", "open"),
               VQARecord("t", "test", "1", "bright", None, "which?", "bright", "open")]
    for model, expected in ((looks, (1.0, 0.5)), (ignores, (0.5, 0.5))):
        normal = score_records(records, [model(images[r.image_id]) for r in records])["overall"]
        blanked = score_records(records, [model(blank) for r in records])["overall"]
        assert (normal, blanked) == expected


def test_ablation_regime_reads_the_variants_against_the_question_only_baseline():
    from medvqa.evaluation import ablation_regime
    runs = {"full": [np.array([1, 0, 0, 1]), np.array([1, 1, 0, 0])], "w/o x": [np.array([0, 0, 0, 1])]}  # means 0.5, 0.25
    below = ablation_regime(runs, 0.6, 0.8, "Full")
    assert below.startswith("The ablation's variants score 25.0 to 50.0 % on average, below the question-only baseline (60.0 %)")
    assert "Full trained on every question scores 80.0 %" in below and "nothing to change" in below
    assert "around the question-only" in ablation_regime(runs, 0.3, 0.8, "Full")  # 0.25 < 0.3 + 0.03
    assert "within 3 points" in ablation_regime(runs, 0.3, 0.8, "Full")
    assert "above the question-only" in ablation_regime(runs, 0.2, 0.8, "Full") and "use the image" in ablation_regime(runs, 0.2, 0.8, "Full")


def test_question_only_chooses_its_ngrams_on_held_out_training_images():
    from medvqa.data.readers import VQARecord
    from medvqa.evaluation import fit_question_only
    # the same words in another order: only 2-grams tell the answers apart
    rows = [("Is the left side bright?", "liver"), ("Is the bright side left?", "lung")] * 20
    train = [VQARecord("toy", "train", str(i), f"img{i // 2}", None, q, a, "open") for i, (q, a) in enumerate(rows)]
    model = fit_question_only(train, seed=0)
    assert model.ngrams == 2 and model.held_out_accuracy == 1.0
    assert model.held_out_questions == 8  # 20 % of the 20 images, both questions of each held-out image
    assert model.predict(["Is the bright side left?", "Is the left side bright?"]) == ["lung", "liver"]
    assert "1-2 grams" in model.describe()
    only = fit_question_only(train[:1])
    assert only.predict(["anything?"]) == ["liver"]


def test_image_use_lines_say_when_a_model_loses_to_the_text_alone():
    from medvqa.evaluation import image_use_lines, image_use_report
    records = [VQARecord("synthetic", "test", str(q), f"img{q}", None, "q", ans, "closed" if ans in ("yes", "no") else "open")
               for q, ans in enumerate(["yes", "no", "yes", "liver", "lung", "ct"] * 5)]
    truth = [r.answer for r in records]
    weak = ["no" if r.answer_type == "closed" else "x" for r in records]  # 5 of 30 right
    report = image_use_report(records, weak, truth, weak, seed=0)
    assert report["by_type"]["open"] == {"questions": 15, "model": 0.0, "question-only": 1.0, "blank image": 0.0}
    lines = image_use_lines(report, "weak")
    assert "(below 0: the model loses to the question-only baseline)" in lines[0]
    assert "(includes 0: no evidence at this size)" in lines[1]  # the same answers on blank images: difference 0
    assert lines[2].startswith("where weak loses: open questions 0.0 % against question-only 100.0 % (blank image "
                               "0.0 %, n = 15); closed questions 33.3 % against question-only 100.0 %")


def test_question_only_weighted_unique_rows_equal_the_repeated_rows():
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.svm import LinearSVC
    from medvqa.evaluation import _fit_question_only
    rng = np.random.default_rng(0)
    words_ = ["left", "right", "lung", "liver", "mass", "is", "there", "which", "organ", "bright"]
    questions = [" ".join(rng.choice(words_, 4)) for _ in range(25)]
    rows = [(questions[i], ["yes", "no", "liver"][i % 3]) for i in rng.integers(0, 25, 300)]  # repeats
    q, a = zip(*rows)
    words, model = _fit_question_only(q, a, C=0.3, ngrams=2, seed=0, max_iter=20000)
    assert model.classes_.tolist() == ["liver", "no", "yes"]
    plain_words = CountVectorizer(ngram_range=(1, 2)).fit(q)
    plain = LinearSVC(C=0.3, max_iter=20000, random_state=0).fit(plain_words.transform(q), a)
    probe = [" ".join(rng.choice(words_, 4)) for _ in range(200)] + questions
    assert (model.predict(words.transform(probe)) == plain.predict(plain_words.transform(probe))).mean() > 0.99  # unweighted: 0.89
