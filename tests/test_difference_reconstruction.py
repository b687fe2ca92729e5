"""Tests of CMDPI fine-tuning: Eq. 8 endpoints, head mixup (Eq. 11-12), pair finding, partners, Eq. 13 switches."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from medvqa.cmdpi.coregularized import WordVocabulary, CoRegConfig, CoRegularizedModel, answer_loss, unpatchify, patchify
from medvqa.core import save_checkpoint
from medvqa.data.readers import VQARecord
from medvqa.cmdpi.difference_reconstruction import FineTuneData, FineTuneWeights, LambdaSampler, PartnerSampler, deviate, finetune_loss, load_pretrained, mix_heads, mixed_targets, mixup_candidates, similar_candidates


def brute_force_candidates(features, threshold):
    """Pair finding with plain loops over every ordered pair."""
    out = []
    for i in range(len(features)):
        row = []
        for j in range(len(features)):
            cos = float(features[i] @ features[j]) / (float(features[i].norm()) * float(features[j].norm()))
            if j != i and cos > threshold:
                row.append(j)
        out.append(row)
    return out


@pytest.mark.parametrize("n, d, threshold", [(12, 3, 0.75), (30, 5, 0.2), (8, 2, -0.5), (20, 16, 0.0)])
def test_similar_candidates_match_brute_force(n, d, threshold):
    features = torch.randn(n, d, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert similar_candidates(features, threshold) == brute_force_candidates(features, threshold)


def test_similar_candidates_bad_input_and_no_pairs():
    with pytest.raises(ValueError, match="threshold"):
        similar_candidates(torch.randn(4, 2), -1.5)
    with pytest.raises(ValueError, match="N >= 2"):
        similar_candidates(torch.randn(1, 2), 0.5)
    orthogonal = torch.eye(4)
    with pytest.warns(UserWarning, match="lower the threshold"):
        sampler = PartnerSampler(similar_candidates(orthogonal, 0.75), "similar images")
    assert sampler.alone == [0, 1, 2, 3] and [sampler.sample(i) for i in range(4)] == [0, 1, 2, 3]


def test_partner_sampler_draws_only_candidates_and_repeats_with_seed():
    sampler = PartnerSampler([[1, 2], [0], []])
    torch.manual_seed(0)
    first = [sampler.sample(0) for _ in range(50)]
    torch.manual_seed(0)
    assert [sampler.sample(0) for _ in range(50)] == first
    assert set(first) == {1, 2} and sampler.sample(1) == 0 and sampler.sample(2) == 2


def test_deviate_endpoints_and_per_sample_eps():
    H, H_hat = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    assert torch.equal(deviate(H, H_hat, 1.0), H)
    assert torch.equal(deviate(H, H_hat, 0.0), H_hat)
    eps = torch.tensor([0.0, 0.25, 1.0])
    out = deviate(H, H_hat, eps)
    for b in range(3):
        assert torch.allclose(out[b], eps[b] * H[b] + (1 - eps[b]) * H_hat[b])


def test_mixed_targets_and_heads():
    lam = torch.rand(64, generator=torch.Generator().manual_seed(1))
    a, b = torch.randint(7, (64,)), torch.randint(7, (64,))
    targets = mixed_targets(a, b, lam, 7)
    assert torch.allclose(targets.sum(1), torch.ones(64))
    for i in range(64):  # the label of each sample, built by hand
        expected = [0.0] * 7
        expected[a[i]] += float(lam[i])
        expected[b[i]] += 1 - float(lam[i])
        assert torch.allclose(targets[i], torch.tensor(expected))
    h, h_hat = torch.randn(64, 3), torch.randn(64, 3)
    assert torch.allclose(mix_heads(h, h_hat, lam)[5], lam[5] * h[5] + (1 - lam[5]) * h_hat[5])
    with pytest.raises(ValueError, match=">= 0"):
        mixed_targets(torch.tensor([-1]), torch.tensor([0]), torch.tensor([0.5]), 3)


def test_lambda_sampler_strategies():
    torch.manual_seed(0)
    assert torch.equal(LambdaSampler.parse("fixed:0.3").sample(5), torch.full((5,), 0.3))
    u = LambdaSampler.parse("uniform").sample(20000)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    beta = LambdaSampler.parse("beta:0.2:1.0").sample(20000)
    assert abs(beta.mean().item() - 0.2 / 1.2) < 0.01  # the Beta(a, b) mean a / (a + b)
    for bad in ("gauss", "beta:0:1", "fixed:2", "uniform:3", "beta:x:1"):
        with pytest.raises(ValueError, match="unknown lambda strategy"):
            LambdaSampler.parse(bad)


def record(i, organ, qtype, answer="yes", answer_type="closed", image="0"):
    return VQARecord("synthetic", "train", str(i), image, None, f"question {i}", answer, answer_type, qtype, organ)


def test_mixup_partners_share_organ_and_question_type():
    rng = torch.Generator().manual_seed(3)
    organs, types = ["Head", "Chest", None], ["Size", "Organ", "Modality", None]
    records = [record(i, organs[int(torch.randint(3, (), generator=rng))], types[int(torch.randint(4, (), generator=rng))])
               for i in range(80)]
    candidates = mixup_candidates(records)
    for i, c in enumerate(candidates):
        same = [j for j, r in enumerate(records) if j != i and (r.organ, r.question_type) == (records[i].organ, records[i].question_type)]
        assert c == same
    singles = mixup_candidates([record(0, "Head", "Size"), record(1, "Head", "Color")])
    assert singles == [[], []]


class TinyTokenizer:
    """Whitespace tokenizer with a fixed word list (stands in for MiniLM's WordPiece)."""
    words = ["question"] + [str(i) for i in range(100)]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.words.index(w) for w in text.split()]}


def tiny_setup(n=12):
    torch.manual_seed(0)
    vocab = WordVocabulary([f"question {i}" for i in range(n)], tokenizer=TinyTokenizer(), max_length=6)
    cfg = CoRegConfig(vocab_size=len(vocab), n_answers=3, image_size=16, patch=8, dim=16, encoder_layers=1,
                      recnet_layers=1, heads=2, text_length=6)
    answers = ["yes", "no", "2"]
    records = [record(i, "Head" if i % 2 else "Chest", "Size" if i % 3 else "Organ", answers[i % 3],
                      "open" if i % 3 == 2 else "closed", image=str(i % 6)) for i in range(n)]
    images = {str(k): torch.randn(3, 16, 16) for k in range(6)}
    return CoRegularizedModel(cfg), vocab, answers, records, images


def test_finetune_data_partners_and_fields():
    _, vocab, answers, records, images = tiny_setup()
    data = FineTuneData(records, images, vocab, answers, 8, {"0": ["1"], "1": ["0"]})
    torch.manual_seed(0)
    for i in range(len(data)):
        item = data[i]
        assert torch.equal(item["patches"], patchify(images[records[i].image_id][None], 8)[0])
        image = records[i].image_id
        partner = {"0": "1", "1": "0"}.get(image, image)  # images 2-5 have no partner: themselves
        assert torch.equal(item["partner_patches"], patchify(images[partner][None], 8)[0])
        mate = [j for j in range(len(records)) if torch.equal(data.tokens[j], item["mix_tokens"])][0]
        assert (records[mate].organ, records[mate].question_type) == (records[i].organ, records[i].question_type)
        assert mate != i and item["mix_answer"] == answers.index(records[mate].answer)
    bad = records + [record(99, "Head", "Size", answer="maybe")]
    with pytest.raises(ValueError, match="record 99.*'answer'"):
        FineTuneData(bad, images, vocab, answers, 8)


def test_partners_come_from_all_training_images_not_only_the_subset():
    _, vocab, answers, records, images = tiny_setup()
    subset = [r for r in records if r.image_id in ("0", "2")]  # image 0's only candidate (1) is outside the subset
    data = FineTuneData(subset, images, vocab, answers, 8, {"0": ["1"], "1": ["0"], "2": []})
    assert data.images_without_partner == ["2"]  # the true count: 0 keeps its partner, 2 has none
    torch.manual_seed(0)
    for i, r in enumerate(subset):
        expected = images["1"] if r.image_id == "0" else images["2"]
        assert torch.equal(data[i]["partner_patches"], patchify(expected[None], 8)[0])
    with pytest.raises(ValueError, match="not in `images`"):
        FineTuneData(subset, images, vocab, answers, 8, {"0": ["missing"]})
    with pytest.warns(UserWarning, match="no similar image"):
        FineTuneData(subset, images, vocab, answers, 8, {"0": [], "2": []})


def test_mixup_with_lambda_one_equals_plain_loss_and_switches():
    model, vocab, answers, records, images = tiny_setup()
    data = FineTuneData(records, images, vocab, answers, 8, {"0": ["1"], "1": ["0"]})
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in data[0]}
    model.eval()
    with torch.no_grad():
        plain = answer_loss(model, batch)
        one, parts = finetune_loss(model, batch, FineTuneWeights(difference=False), LambdaSampler.parse("fixed:1"))
        assert torch.allclose(one, plain, atol=1e-6) and set(parts) == {"answer"}
        # lambda = 0 scores the partner's head against the partner's answer
        zero, _ = finetune_loss(model, batch, FineTuneWeights(difference=False), LambdaSampler.parse("fixed:0"))
        partner = answer_loss(model, {"patches": batch["mix_patches"], "tokens": batch["mix_tokens"], "answer": batch["mix_answer"]})
        assert torch.allclose(zero, partner, atol=1e-6)
        # weights scale the two terms of Eq. 13
        torch.manual_seed(5)
        full, p = finetune_loss(model, batch, FineTuneWeights(mix=1.0, diff=1.0))
        torch.manual_seed(5)
        weighted, q = finetune_loss(model, batch, FineTuneWeights(mix=0.5, diff=2.0))
        assert set(p) == {"diff", "answer"} and math.isclose(p["diff"], q["diff"], rel_tol=1e-6)
        assert torch.allclose(weighted, 0.5 * torch.tensor(q["answer"]) + 2.0 * torch.tensor(q["diff"]), atol=1e-5)
        assert torch.allclose(full, torch.tensor(p["answer"] + p["diff"]), atol=1e-5)


def test_difference_loss_reconstructs_the_current_image():
    """With the partner equal to the sample itself, L_diff is the plain reconstruction of the current input."""
    model, vocab, answers, records, images = tiny_setup()
    data = FineTuneData(records, images, vocab, answers, 8)  # no candidates: every image is its own partner
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in data[0]}
    model.eval()
    with torch.no_grad():
        _, parts = finetune_loss(model, batch, FineTuneWeights(mixup=False))
        h_i, H_i, h_t, H_t = model.encode(batch["patches"], batch["tokens"])
        text = batch["tokens"][:, 1:]
        pad = text == WordVocabulary.PAD
        out_i, out_t, _, _ = model.reconstruct(model.global_vector(h_i, h_t), H_i, H_t, pad)
        real = ~pad & (text != WordVocabulary.ANS)
        expected = F.mse_loss(out_i, batch["patches"]) + F.cross_entropy(out_t[real], text[real])
    assert math.isclose(parts["diff"], expected.item(), rel_tol=1e-5)


def test_finetune_step_lowers_the_loss():
    model, vocab, answers, records, images = tiny_setup()
    data = FineTuneData(records, images, vocab, answers, 8, {"0": ["1"], "1": ["0"]})
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in data[0]}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(60):
        torch.manual_seed(0)  # the same eps and lambda each step, so the losses are comparable
        loss, _ = finetune_loss(model, batch, FineTuneWeights(), LambdaSampler.parse("fixed:0.7"))
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_load_pretrained_round_trip_and_errors(tmp_path):
    model, vocab, answers, _, _ = tiny_setup()
    path = save_checkpoint(tmp_path / "pretrained.pt", step=1, model=model.state_dict(),
                           config={"model": vars(model.config), "answers": answers, "dataset": "synthetic",
                                   "vocab": {str(k): v for k, v in vocab.to_compact.items()}})
    loaded, vocab2, answers2, cfg = load_pretrained(path)
    assert answers2 == answers and vocab2.to_compact == vocab.to_compact and cfg["dataset"] == "synthetic"
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p)
    with pytest.raises(FileNotFoundError, match="run chapter 05 first"):
        load_pretrained(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "other.pt", step=1, config={"train": {}}, model={})
    with pytest.raises(ValueError, match="not a chapter 05 checkpoint"):
        load_pretrained(tmp_path / "other.pt")


def test_unpatchify_inverts_patchify():
    x = torch.randn(2, 3, 24, 24)
    assert torch.equal(unpatchify(patchify(x, 8), 8), x)


def test_blank_image_data_gives_every_question_the_same_image():
    """Chapter 06's blank-image baseline: every record sees the mean image, so answers depend on the question alone."""
    from medvqa.data.batches import mean_image
    from medvqa.cmdpi.difference_reconstruction import predict_answers
    from dataclasses import replace
    model, vocab, answers, records, images = tiny_setup()
    records = [replace(r, question="question 0") if i < 6 else r for i, r in enumerate(records)]  # one question, six images
    blank = mean_image(images.values())
    data = FineTuneData(records, {i: blank for i in images}, vocab, answers, 8, training=False)
    assert all(torch.equal(data.patches[k], patchify(blank[None], 8)[0]) for k in range(len(data.patches)))
    same_question = list(range(6))
    predictions = predict_answers(model, data, answers)
    normal = predict_answers(model, FineTuneData(records, images, vocab, answers, 8, training=False), answers)
    assert len(predictions) == len(records) == len(normal)
    assert len({predictions[i] for i in same_question}) == 1
    with torch.no_grad():  # while with their own images the six answer logits differ
        from medvqa.cmdpi.coregularized import answer_head
        own = FineTuneData(records, images, vocab, answers, 8, training=False)
        logits = answer_head(model, own.patches[[own.image_of[i] for i in same_question]], own.tokens[same_question])[0]
    assert not torch.allclose(logits[0], logits[1])
    with torch.no_grad():  # the model reads the image: another image gives other logits for the same question
        from medvqa.cmdpi.coregularized import answer_head
        a = answer_head(model, data.patches[:1], data.tokens[:1])[0]
        b = answer_head(model, patchify(images["0"][None], 8), data.tokens[:1])[0]
    assert not torch.allclose(a, b)


def test_feature_cells_follow_the_same_partners_and_are_what_the_encoder_reads():
    """With a frozen tower's cells, each sample's cells, partner cells and mixup cells belong to the same images as its
    patches; without L_diff the pixels are never read, and predictions use the cells."""
    from medvqa.cmdpi.difference_reconstruction import predict_answers
    _, vocab, answers, records, images = tiny_setup()
    cells = {i: torch.randn(4, 5, generator=torch.Generator().manual_seed(int(i))) for i in images}
    torch.manual_seed(0)
    cfg = CoRegConfig(vocab_size=len(vocab), n_answers=3, image_size=16, patch=8, dim=16, encoder_layers=1,
                      recnet_layers=1, heads=2, text_length=6, cell_dim=5)
    model = CoRegularizedModel(cfg).eval()
    data = FineTuneData(records, images, vocab, answers, 8, {"0": ["1"], "1": ["0"]}, cells=cells)
    patch_of = {i: patchify(images[i][None], 8)[0] for i in images}
    torch.manual_seed(1)
    for i in range(len(data)):
        item = data[i]
        for prefix in ("", "partner_", "mix_"):
            owner = next(j for j in images if torch.equal(patch_of[j], item[f"{prefix}patches"]))
            assert torch.equal(item[f"{prefix}cells"], cells[owner]), (i, prefix)
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in data[0]}
    with torch.no_grad():
        torch.manual_seed(2)
        loss, _ = finetune_loss(model, batch, FineTuneWeights(difference=False))
        torch.manual_seed(2)
        same, _ = finetune_loss(model, {**batch, "patches": -batch["patches"]}, FineTuneWeights(difference=False))
        assert torch.equal(loss, same)  # no L_diff: the pixels are never read
        torch.manual_seed(2)
        moved, _ = finetune_loss(model, {**batch, "cells": batch["cells"] + torch.randn(batch["cells"].shape)}, FineTuneWeights(difference=False))
        assert not torch.allclose(loss, moved)
        from medvqa.cmdpi.coregularized import answer_head
        logits, _ = answer_head(model, torch.stack([cells[r.image_id] for r in records]), data.tokens)
    assert predict_answers(model, data, answers) == [answers[k] for k in logits.argmax(1).tolist()]
    with pytest.raises(ValueError, match="no feature cells for images"):
        FineTuneData(records, images, vocab, answers, 8, cells={"0": cells["0"]})


def test_the_blend_control_reconstructs_from_own_features_whatever_the_partner():
    """`blend=False` keeps L_diff but rebuilds from the sample's own features (eps = 1): the partner changes nothing,
    and L_diff equals the plain reconstruction; with the blend on, a different partner changes L_diff."""
    model, vocab, answers, records, images = tiny_setup()
    data = FineTuneData(records, images, vocab, answers, 8, {"0": ["1"], "1": ["0"]})
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in data[0]}
    other = {**batch, "partner_patches": torch.rand_like(batch["partner_patches"])}
    model.eval()
    with torch.no_grad():
        own = [finetune_loss(model, b, FineTuneWeights(mixup=False, blend=False))[1]["diff"] for b in (batch, other)]
        torch.manual_seed(0)
        blended = finetune_loss(model, batch, FineTuneWeights(mixup=False))[1]["diff"]
        torch.manual_seed(0)
        blended_other = finetune_loss(model, other, FineTuneWeights(mixup=False))[1]["diff"]
        h_i, H_i, h_t, H_t = model.encode(batch["patches"], batch["tokens"])
        text = batch["tokens"][:, 1:]
        pad = text == WordVocabulary.PAD
        out_i, out_t, _, _ = model.reconstruct(model.global_vector(h_i, h_t), H_i, H_t, pad)
        real = ~pad & (text != WordVocabulary.ANS)
        plain = (F.mse_loss(out_i, batch["patches"]) + F.cross_entropy(out_t[real], text[real])).item()
    assert own[0] == own[1] and math.isclose(own[0], plain, rel_tol=1e-5)
    assert not math.isclose(blended, blended_other, rel_tol=1e-6)
