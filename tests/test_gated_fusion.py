"""Tests of BioD2C's pieces: MFE (counts, pooled values, coverage), the gate, the text-queue KL, the LM wiring."""
import math

import pytest
import torch
import torch.nn.functional as F

from lm_helpers import CharTokenizer, char_ids, tiny_lm
from medvqa.biod2c.gated_fusion import FusionData, FusionVQA, GatedFusion, block_bounds, cross_attention, fusion_loss, mfe_token_count, multi_scale_features, queue_distribution, queue_texts, semantic_queue, sequence_similarity, text_queue_kl


@pytest.mark.parametrize("scales, m", [(1, 1), (2, 5), (3, 21), (6, 1365)])
def test_mfe_token_count(scales, m):
    assert mfe_token_count(scales) == m
    assert multi_scale_features(torch.randn(2, 2 ** (scales - 1), 2 ** (scales - 1), 3), scales).shape == (2, m, 3)


@pytest.mark.parametrize("n, scales", [(8, 4), (14, 4), (7, 3), (32, 6)])
def test_mfe_blocks_match_direct_pooling(n, scales):
    x = torch.randn(2, n, n, 5, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    out = multi_scale_features(x, scales)
    token = 0
    for s in range(1, scales + 1):
        bounds = block_bounds(n, 2 ** (s - 1))
        for r0, r1 in bounds:
            for c0, c1 in bounds:
                block = x[:, r0:r1, c0:c1].reshape(2, -1, 5)
                assert torch.allclose(out[:, token], block.amax(1) + block.mean(1)), (s, r0, c0)
                token += 1
    assert token == mfe_token_count(scales)


@pytest.mark.parametrize("n, grid", [(14, 8), (7, 4), (10, 3), (8, 8), (5, 1)])
def test_block_bounds_cover_every_cell(n, grid):
    bounds = block_bounds(n, grid)
    covered = set()
    for start, end in bounds:
        assert 0 <= start < end <= n
        covered |= set(range(start, end))
    assert covered == set(range(n)) and len(bounds) == grid


def test_mfe_bad_input():
    with pytest.raises(ValueError, match="smaller than the finest grid"):
        multi_scale_features(torch.randn(1, 7, 7, 2), 4)
    with pytest.raises(ValueError, match="square feature map"):
        multi_scale_features(torch.randn(1, 4, 5, 2), 2)


def similarity_loop(x, queue, b, k, positions=None):
    """Mean cosine over the positions that count (all of them when `positions` is None), one pair at a time."""
    ls = [l for l in range(x.shape[1]) if positions is None or positions[b, k, l]]
    return sum(float(F.cosine_similarity(x[b, l], queue[b, k, l], dim=0)) for l in ls) / len(ls) if ls else 0.0


def kl_loop(image, text, queue, tau, mask=None, positions=None):
    """Eq. 3-4 with plain loops."""
    B, K = queue.shape[:2]
    total = 0.0
    for b in range(B):
        real = [k for k in range(K) if mask is None or mask[b, k]]
        def sims(x):
            return [similarity_loop(x, queue, b, k, positions) / tau for k in real]
        sv, st = sims(image), sims(text)
        zv, zt = math.log(sum(math.exp(v) for v in sv)), math.log(sum(math.exp(v) for v in st))
        total += sum(math.exp(v - zv) * ((v - zv) - (t - zt)) for v, t in zip(sv, st))
    return total / B


@pytest.mark.parametrize("use_mask", [False, True])
def test_text_queue_kl_matches_loop(use_mask):
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(3, 4, 6, generator=g, dtype=torch.float64), torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    queue = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool) if use_mask else None
    for tau in (0.1, 1.0):
        assert abs(text_queue_kl(image, text, queue, tau, mask).item() - kl_loop(image, text, queue, tau, mask)) < 1e-8
        per_sample = text_queue_kl(image, text, queue, tau, mask, reduction="none")
        for b in range(3):  # each sample's KL is the loop's on that sample alone
            one = None if mask is None else mask[b:b + 1]
            assert abs(per_sample[b].item() - kl_loop(image[b:b + 1], text[b:b + 1], queue[b:b + 1], tau, one)) < 1e-8
    with pytest.raises(ValueError, match="reduction"):
        text_queue_kl(image, text, queue, reduction="sum")


def test_padded_positions_do_not_count_in_the_similarity():
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(2, 5, 6, generator=g, dtype=torch.float64), torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    queue = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    question_real = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    text_real = torch.tensor([[[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]],
                              [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]], dtype=torch.bool)
    positions = question_real[:, None, :] & text_real
    sims = sequence_similarity(image, queue, positions)
    for b in range(2):
        for k in range(3):
            assert abs(sims[b, k].item() - similarity_loop(image, queue, b, k, positions)) < 1e-10
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    got = text_queue_kl(image, text, queue, 0.1, mask, positions).item()
    assert abs(got - kl_loop(image, text, queue, 0.1, mask, positions)) < 1e-8
    # what sits at a padded position changes nothing (two pad embeddings would otherwise agree perfectly)
    other = queue.clone()
    other[~positions] = 1.0
    image_other = image.clone()
    image_other[~question_real] = 1.0
    assert torch.allclose(sequence_similarity(image_other, other, positions), sims)
    assert not torch.allclose(sequence_similarity(image_other, other), sequence_similarity(image, queue))
    with pytest.raises(ValueError, match="position_mask must be"):
        sequence_similarity(image, queue, positions[:, :2])


def test_text_queue_kl_properties_and_padding():
    g = torch.Generator().manual_seed(2)
    image, text, queue = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g), torch.randn(4, 6, 3, 8, generator=g)
    assert abs(text_queue_kl(image, image, queue).item()) < 1e-6
    for seed in range(5):
        t = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(seed))
        assert text_queue_kl(image, t, queue).item() >= 0
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 4:] = False
    p = queue_distribution(image, queue, mask)
    assert torch.equal(p[:, 4:], torch.zeros(4, 2)) and torch.allclose(p.sum(1), torch.ones(4))
    # padded rows change nothing: the same as a queue without them
    assert torch.allclose(text_queue_kl(image, text, queue, 0.1, mask), text_queue_kl(image, text, queue[:, :4]))
    # batchmean: the sum over the queue averaged over samples, not the mean over elements
    p_v, p_t = queue_distribution(image, queue[:, :4]), queue_distribution(text, queue[:, :4])
    assert torch.allclose(text_queue_kl(image, text, queue[:, :4]), F.kl_div(p_t.log(), p_v, reduction="batchmean"), atol=1e-6)


def test_text_queue_kl_bad_input():
    image, queue = torch.randn(2, 3, 4), torch.randn(2, 5, 3, 4)
    with pytest.raises(ValueError, match="empty"):
        text_queue_kl(image, image, queue[:, :0])
    with pytest.raises(ValueError, match="all padding"):
        text_queue_kl(image, image, queue, queue_mask=torch.tensor([[True] * 5, [False] * 5]))
    with pytest.raises(ValueError, match="same"):
        text_queue_kl(image, torch.randn(2, 4, 4), queue)
    with pytest.raises(ValueError, match="queue must be"):
        text_queue_kl(image, image, torch.randn(2, 5, 2, 4))


def test_gate_starts_at_tanh_beta_and_plain_variant():
    torch.manual_seed(0)
    fusion = GatedFusion(vision_dim=6, width=12, visual_side=2, scales=3, layers=1, heads=2, beta_init=0.1, dim=8).eval()
    patches, question = torch.randn(3, 4, 4, 6), torch.randn(3, 4, 12)
    with torch.no_grad():
        out, x_t = fusion(patches, question)
        memory = fusion.memory(multi_scale_features(patches, 3)) + fusion.block_pos
        x_vt = fusion.decoder(fusion.query(fusion.text_mlp(question)), memory)
        pooled = F.adaptive_avg_pool2d(patches.permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)  # [3, 4, 6]
        standard = (pooled - pooled.mean(-1, keepdim=True)) / torch.sqrt(pooled.var(-1, unbiased=False, keepdim=True) + 1e-5)
        plain = fusion.proj(standard)  # X_v layer-normalised (unit scale, zero shift at initialisation), then Proj
    assert torch.allclose(fusion.plain_tokens(patches), standard, atol=1e-5)
    assert torch.allclose(out, plain + fusion.proj_g(x_vt) * math.tanh(0.1), atol=1e-5)
    assert abs(fusion.gate - math.tanh(0.1)) < 1e-7 and torch.allclose(x_t, fusion.text_mlp(question))
    with pytest.raises(ValueError, match="pad or cut"):
        fusion(patches, torch.randn(3, 5, 12))
    plain_fusion = GatedFusion(vision_dim=6, width=12, visual_side=2, fuse=False)
    assert plain_fusion.gate == 0.0 and not hasattr(plain_fusion, "decoder")


def test_cross_attention_is_a_distribution_over_blocks():
    torch.manual_seed(0)
    fusion = GatedFusion(vision_dim=6, width=12, visual_side=2, scales=3, layers=2, heads=2, dim=8).eval()
    weights = cross_attention(fusion, torch.randn(2, 4, 4, 6), torch.randn(2, 4, 12), torch.zeros(2, 4, dtype=torch.bool))
    assert weights.shape == (2, 4, mfe_token_count(3))
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4), atol=1e-5)


class KB:
    def vocabulary(self):
        return {"liver": "Liver", "nodule": "Nodule", "heart": "Heart"}

    def definition(self, entity):
        return {"Liver": "an organ", "Nodule": "a small growth"}.get(entity)

    def relations(self, entity):
        return {"Liver": [("function", "metabolism")], "Heart": [("function", "pumps blood")]}.get(entity, [])


def test_queue_texts():
    texts = queue_texts("CT of the liver.", "Is there a nodule? yes", KB(), 10)
    assert texts == ["CT of the liver.", "Liver: an organ", "Liver function metabolism", "Nodule: a small growth"]
    assert queue_texts(None, "nothing here", KB(), 10) == []
    assert len(queue_texts("CT of the liver.", "nodule?", KB(), 2)) == 2


def tiny_data(queues=True):
    features = {"a": torch.randn(4, 4, 6), "b": torch.randn(4, 4, 6)}
    items = [("a", "q1?", "yes"), ("b", "where?", "left"), ("a", "q2?", "no")]
    return FusionData(items, features, CharTokenizer(), 4, {"a": ["ct", "liver"], "b": ["x"]} if queues else None,
                      queue_size=3, prompt="Q{question}A")


def test_fusion_data_layout():
    data = tiny_data()
    row = data[1]
    prompt, answer = char_ids("Qwhere?A"), char_ids(" left") + [2]
    width = data.text_ids.shape[1]
    assert row["text_ids"][-len(prompt + answer):].tolist() == prompt + answer  # left padding
    assert row["text_mask"].sum() == len(prompt + answer) and row["text_mask"][: width - len(prompt + answer)].sum() == 0
    assert row["labels"][-len(answer):].tolist() == answer and (row["labels"][:-len(answer)] == -100).all()
    assert row["prompt_ids"][-len(prompt):].tolist() == prompt
    assert row["query_ids"].tolist() == char_ids("wher") and row["query_mask"].all()  # cut to L = 4
    assert row["queue_mask"].tolist() == [True, False, False] and data[0]["queue_mask"].tolist() == [True, True, False]
    # real tokens of each queue text ("ct" has 2 characters, "liver" is cut to L = 4; an empty slot keeps one token)
    assert data[0]["queue_token_mask"].sum(1).tolist() == [2, 4, 1]


def test_nll_only_scores_answer_tokens_and_matches_full_logits():
    lm, data = tiny_lm(), tiny_data()
    fusion = GatedFusion(vision_dim=6, width=16, visual_side=2, scales=2, layers=1, heads=2, dim=8)
    model = FusionVQA(lm, fusion).eval()
    batch = torch.utils.data.default_collate([data[i] for i in range(3)])
    with torch.no_grad():
        visual, _ = model.visual_prefix(batch)
        nll = model.nll(visual, batch)
        inputs = model.lm_inputs(visual, batch["text_ids"], batch["text_mask"])
        logits = lm(**inputs).logits[:, visual.shape[1]:]  # every position, through the model's own head
        labels = batch["labels"]
        expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(nll, expected, atol=1e-5)


def test_fusion_loss_weights_and_training_step():
    lm, data = tiny_lm(), tiny_data()
    model = FusionVQA(lm, GatedFusion(vision_dim=6, width=16, visual_side=2, scales=2, layers=1, heads=2, dim=8))
    batch = torch.utils.data.default_collate([data[i] for i in range(3)])
    model.eval()
    with torch.no_grad():
        only_nll, parts0 = fusion_loss(model, batch, 0.0)
        both, parts = fusion_loss(model, batch, 2.0)
    assert "sem" not in parts0 and math.isclose(parts0["nll"], parts["nll"], rel_tol=1e-6)
    assert torch.allclose(both, torch.tensor(parts["nll"] + 2.0 * parts["sem"]), atol=1e-5)
    from medvqa.models.lm import apply_lora
    model.lm = apply_lora(lm, "biod2c")  # stage 2: LoRA adapters + the fusion module; the base LM stays frozen
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return fusion_loss(model, batch, 1.0)[0].item()

    first = eval_loss()
    for _ in range(40):
        model.train()
        loss, _ = fusion_loss(model, batch, 1.0)
        opt.zero_grad(); loss.backward(); opt.step()
    assert eval_loss() < 0.97 * first  # a frozen random LM leaves little room, but the loss must fall
    base = [p for n, p in model.lm.named_parameters() if "lora" not in n]
    assert all(p.grad is None for p in base) and any(p.grad is not None for p in model.fusion.parameters())


def test_semantic_queue_leaves_out_samples_without_texts_and_gives_fusion_loss_its_l_sem():
    lm, data = tiny_lm(), tiny_data()
    model = FusionVQA(lm, GatedFusion(vision_dim=6, width=16, visual_side=2, scales=2, layers=1, heads=2, dim=8)).eval()
    batch = torch.utils.data.default_collate([data[i] for i in range(3)])
    batch["queue_mask"][1] = False  # the second sample's image has no related text
    with torch.no_grad():
        rows, queue, queue_mask, real = semantic_queue(model, batch)
        assert rows.tolist() == [True, False, True] and queue.shape[:2] == (2, 3) and real.shape == (2, 3, 4)
        for j, b in enumerate((0, 2)):  # each row's queue: the question's MLP applied to that sample's queue texts
            for k in range(3):
                expected = model.fusion.text_queries(model.embed(batch["queue_ids"][b, k][None]))[0]
                assert torch.allclose(queue[j, k], expected, atol=1e-6)
                assert real[j, k].tolist() == (batch["query_mask"][b] & batch["queue_token_mask"][b, k]).tolist()
        visual, x_t = model.visual_prefix(batch)
        sem = text_queue_kl(visual[rows], x_t[rows], queue, 0.1, queue_mask, real)
        _, parts = fusion_loss(model, batch, 1.0, 0.1)
    assert math.isclose(parts["sem"], sem.item(), rel_tol=1e-6)


def test_generate_returns_new_tokens_only():
    lm, data = tiny_lm(), tiny_data(queues=False)
    model = FusionVQA(lm, GatedFusion(vision_dim=6, width=16, visual_side=2, scales=2, layers=1, heads=2, dim=8)).eval()
    batch = torch.utils.data.default_collate([data[i] for i in range(3)])
    ids = model.generate(batch, max_new_tokens=3, eos_token_id=2)
    assert ids.shape[0] == 3 and ids.shape[1] <= 3


def test_fusion_decoder_ends_in_a_layer_norm():
    """Pre-norm decoder layers need a final norm (as in the released code): the fused tokens come out normalised."""
    fusion = GatedFusion(vision_dim=12, width=16, visual_side=2, scales=2, layers=2, heads=2, dim=8, dropout=0.0).eval()
    assert isinstance(fusion.decoder.norm, torch.nn.LayerNorm)
    captured = {}
    fusion.decoder.register_forward_hook(lambda m, a, out: captured.setdefault("x_vt", out))
    with torch.no_grad():
        fusion(torch.randn(3, 4, 4, 12) * 50, torch.randn(3, 4, 16) * 50)
    x_vt = captured["x_vt"]
    torch.testing.assert_close(x_vt.mean(-1), torch.zeros(3, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(x_vt.std(-1, unbiased=False), torch.ones(3, 4), atol=1e-2, rtol=0)
    assert all(layer.dropout.p == 0.0 for layer in fusion.decoder.layers)


def test_released_semantic_loss_is_kl_of_text_to_ungated_image_on_raw_embeddings():
    from medvqa.biod2c.gated_fusion import released_semantic_loss
    lm, data = tiny_lm(), tiny_data()
    fusion = GatedFusion(vision_dim=6, width=16, visual_side=2, scales=2, layers=1, heads=2, dim=8)
    model = FusionVQA(lm, fusion).eval()
    batch = torch.utils.data.default_collate([data[i] for i in range(3)])
    emb = lm.get_input_embeddings()
    with torch.no_grad():
        plain = fusion.proj(fusion.plain_tokens(batch["patches"]))  # no gate, no decoder
        queue = emb(batch["queue_ids"])  # [B, K, L, width], raw
        def p(x):  # mean cosine over every position, softmax over every queue slot (padding included)
            cos = F.cosine_similarity(x[:, None], queue, dim=-1).mean(-1)
            return (cos / 0.1).softmax(-1)
        expected = F.kl_div(p(plain).log(), p(emb(batch["query_ids"])), reduction="batchmean")  # KL(p_t || p_v)
        got = released_semantic_loss(model, batch, 0.1)
    assert torch.allclose(got, expected, atol=1e-6)
    loss, parts = fusion_loss(model, batch, 1.0, 0.1, "released")
    assert abs(parts["sem"] - got.item()) < 1e-5
    with pytest.raises(ValueError, match="sem_form"):
        fusion_loss(model, batch, 1.0, 0.1, "other")
