"""Tests of BaMCo's knowledge-driven VQA model: prefix order and layout, pooling, entity choice, draws, a training step."""
import pytest
import torch
import torch.nn.functional as F

from lm_helpers import CharTokenizer, char_ids, tiny_lm
from medvqa.bamco.balanced_contrastive import KnowledgeSpace
from medvqa.bamco.knowledge_vqa import KnowledgeVQA, KnowledgeVQAData, closest_entity, draw_intra_class, knowledge_vqa_loss, parse_prefix_order, pool_patches


def toy_data(fixed=True, seed=0):
    g = torch.Generator().manual_seed(1)
    patches = {i: torch.randn(4, 4, 6, generator=g) for i in "abc"}
    small = {i: torch.randn(3, 8, 8, generator=g) for i in "abc"}
    items = [("a", "which?", "liver"), ("b", "big?", "no"), ("c", "where?", "left")]
    return KnowledgeVQAData(items, patches, torch.randn(3, 5, generator=g), {"a": 0, "b": 2, "c": 2}, [["a"], [], ["b", "c"]],
                            small, 3, CharTokenizer(), fixed_draws=fixed, seed=seed, prompt="Q{question}A")


def space():
    torch.manual_seed(3)
    return KnowledgeSpace(image_dim=6, text_dim=5, num_classes=3, embed_dim=4).eval()


@pytest.mark.parametrize("order, expected", [("paper", ("image", "knowledge", "intra")),
                                             ("released", ("knowledge", "intra", "image")),
                                             ("V,X", ("intra", "image")), (" k ", ("knowledge",))])
def test_parse_prefix_order(order, expected):
    assert parse_prefix_order(order) == expected


@pytest.mark.parametrize("order", ["", "X,Y", "X,K,X", "image"])
def test_parse_prefix_order_rejects(order):
    with pytest.raises(ValueError, match="prefix_order"):
        parse_prefix_order(order)


@pytest.mark.parametrize("n, pool", [(14, 2), (8, 2), (7, 2), (6, 3)])
def test_pool_patches_against_block_means(n, pool):
    x = torch.randn(2, n, n, 3, dtype=torch.float64)
    out = pool_patches(x, pool)
    side = -(-n // pool)
    assert out.shape == (2, side * side, 3)
    for r in range(side):
        for c in range(side):  # adaptive pooling's blocks: floor(i n / side) .. ceil((i + 1) n / side)
            r0, r1 = r * n // side, -(-(r + 1) * n // side)
            c0, c1 = c * n // side, -(-(c + 1) * n // side)
            assert torch.allclose(out[:, r * side + c], x[:, r0:r1, c0:c1].mean((1, 2)))
    with pytest.raises(ValueError, match="square patch grid"):
        pool_patches(torch.randn(2, 4, 5, 3))


def test_closest_entity_against_a_loop():
    s = space()
    images, names = torch.randn(9, 6), torch.randn(3, 5)
    with torch.no_grad():
        expected = [max(range(3), key=lambda c: F.cosine_similarity(s.image_proj(images[i]), s.text_head(names[c:c + 1])[0], dim=0).item())
                    for i in range(9)]
    assert closest_entity(s, images, names).tolist() == expected


def test_intra_draws_fixed_for_test_and_fresh_for_training():
    fixed = toy_data(fixed=True)
    assert torch.equal(fixed[1]["intra"], fixed[1]["intra"])
    assert fixed[0]["intra"].shape == (3, 3, 8, 8)
    assert all(torch.equal(fixed[0]["intra"][:, k], fixed.small_images["a"]) for k in range(3))  # the pool of entity 0 is ['a']
    fresh = toy_data(fixed=False)
    torch.manual_seed(0)
    draws = {tuple(v.flatten()[0].item() for v in fresh[2]["intra"].unbind(1)) for _ in range(20)}
    assert len(draws) > 1
    assert sorted(set(draw_intra_class(2, 200, torch.Generator().manual_seed(0)).tolist())) == [0, 1]  # with replacement
    with pytest.raises(ValueError, match="no training image"):
        draw_intra_class(0, 3)


def test_data_errors_name_the_problem():
    base = toy_data()
    with pytest.raises(ValueError, match="entities \\[1\\] have no intra-class image"):
        KnowledgeVQAData([("a", "q", "x")], base.patches, torch.zeros(1, 5), {"a": 1}, base.class_pools, base.small_images, 2,
                         CharTokenizer())
    with pytest.raises(ValueError, match="no patches or entity for image\\(s\\) z"):
        KnowledgeVQAData([("z", "q", "x")], base.patches, torch.zeros(1, 5), {"a": 0}, base.class_pools, base.small_images, 2,
                         CharTokenizer())
    with pytest.raises(ValueError, match="2 question features for 1 samples"):
        KnowledgeVQAData([("a", "q", "x")], base.patches, torch.zeros(2, 5), {"a": 0}, base.class_pools, base.small_images, 2,
                         CharTokenizer())


@pytest.mark.parametrize("order", ["paper", "released", "K,X"])
def test_prefix_layout_and_masked_labels(order):
    data = toy_data()
    model = KnowledgeVQA(tiny_lm(), space(), vision_dim=6, order=order).eval()
    batch = torch.utils.data.default_collate([data[i] for i in range(3)])
    bounds = model.layout(4)
    sizes = {"image": 4, "knowledge": 1, "intra": 1}
    start = 0
    for name in parse_prefix_order(order):  # contiguous, in order, with the right sizes
        assert bounds[name] == (start, start + sizes[name])
        start += sizes[name]
    with torch.no_grad():
        prefix = model.prefix(batch)
        parts = model.segments(batch)
        assert prefix.shape == (3, start, 16)
        for name, (s, e) in bounds.items():
            assert torch.allclose(prefix[:, s:e], parts[name])
        # the loss equals cross-entropy over full logits with labels only on answer + eos (prefix, question, padding masked)
        inputs = model.lm_inputs(prefix, batch["text_ids"], batch["text_mask"])
        assert inputs["attention_mask"][:, :start].eq(1).all()
        logits = model.lm(**inputs).logits
        labels = torch.cat([torch.full((3, start), -100), batch["labels"]], 1)
        answer = char_ids(" left") + [2]
        assert labels[2, -len(answer):].tolist() == answer and labels[2, :-len(answer)].eq(-100).all()
        expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        assert torch.allclose(model.loss(batch), expected, atol=1e-5)


def test_knowledge_token_depends_on_the_question_and_space_stays_frozen():
    data = toy_data()
    model = KnowledgeVQA(tiny_lm(), space(), vision_dim=6)
    batch = torch.utils.data.default_collate([data[i] for i in range(3)])
    other = dict(batch, question_features=torch.randn(3, 5))
    with torch.no_grad():
        a, b = model.segments(batch), model.segments(other)
    assert not torch.allclose(a["knowledge"], b["knowledge"]) and torch.allclose(a["image"], b["image"])
    model.train()
    assert model.training and not model.space.training  # batch-norm statistics of the 3-D encoder must not move
    assert not any(p.requires_grad for p in model.space.parameters())


def test_training_step_lowers_the_loss_and_moves_only_adapters_and_projectors():
    from medvqa.models.lm import apply_lora
    data = toy_data()
    model = KnowledgeVQA(apply_lora(tiny_lm(), "bamco"), space(), vision_dim=6)
    batch = torch.utils.data.default_collate([data[i] for i in range(3)])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    running = model.space.intra.net[0][1].running_mean.clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model.loss(batch).item()

    first = eval_loss()
    for _ in range(30):
        model.train()
        loss, parts = knowledge_vqa_loss(model, batch)
        opt.zero_grad(); loss.backward(); opt.step()
    assert eval_loss() < 0.95 * first  # LoRA at alpha / r = 0.25 on a random LM moves slowly, but it must move
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert torch.equal(model.space.intra.net[0][1].running_mean, running)
    assert model.image_projector[0].weight.grad is not None and parts["nll"] == pytest.approx(loss.item())


def test_generate_returns_new_tokens():
    data = toy_data()
    model = KnowledgeVQA(tiny_lm(), space(), vision_dim=6).eval()
    batch = torch.utils.data.default_collate([data[i] for i in range(3)])
    ids = model.generate(batch, max_new_tokens=3, eos_token_id=2)
    assert ids.shape[0] == 3 and 1 <= ids.shape[1] <= 3


def test_image_tokens_do_not_depend_on_the_towers_scale():
    """The image projector layer-normalises each pooled token first: a tower whose features are 50 times larger (or
    shifted by a constant) gives the same image tokens; different features give different tokens."""
    model = KnowledgeVQA(tiny_lm(), space(), vision_dim=6, order="X").eval()
    batch = torch.utils.data.default_collate([toy_data()[i] for i in range(3)])
    with torch.no_grad():
        tokens = model.segments(batch)["image"]
        scaled = model.segments({**batch, "patches": 50 * batch["patches"] + 3})["image"]
        other = model.segments({**batch, "patches": batch["patches"].flip(-1)})["image"]
    assert torch.allclose(tokens, scaled, atol=1e-3) and not torch.allclose(tokens, other, atol=1e-2)  # eps of the norm: 1e-5
    assert isinstance(model.image_projector[0], torch.nn.LayerNorm)
