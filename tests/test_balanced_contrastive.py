"""Tests of BaMCo Eq. 1, the logit-adjusted CE and the knowledge-space model (independent slow versions)."""
import math

import pytest
import torch
import torch.nn.functional as F

from medvqa.bamco.balanced_contrastive import KnowledgeSpace, alignment_loss, balanced_contrastive_loss, bamco_loss, logit_adjusted_cross_entropy, top1_matching


def reference_loop(views, labels, prototypes, temperature, class_average=True, per_anchor=False):
    """Eq. 1 written as plain loops over anchors and keys (the form of the BCL reference, one view index at a time);
    class_average=False: every key weighs 1 (plain supervised contrast with prototypes)."""
    B, V, _ = views.shape
    C = prototypes.shape[0]
    feats = [views[b, v] for v in range(V) for b in range(B)] + [prototypes[c] for c in range(C)]
    labs = [int(labels[b]) for v in range(V) for b in range(B)] + list(range(C))
    n = {c: sum(1 for y in labs if y == c) for c in range(C)}
    losses = []
    for i in range(B * V):
        den = 0.0
        for j in range(len(feats)):
            if j == i:
                continue
            w = n[labs[j]] - (1 if labs[j] == labs[i] else 0) if class_average else 1
            den += math.exp(float(feats[i] @ feats[j]) / temperature) / w
        positives = [j for j in range(len(feats)) if j != i and labs[j] == labs[i]]
        losses.append(-sum(float(feats[i] @ feats[p]) / temperature - math.log(den) for p in positives) / len(positives))
    return losses if per_anchor else sum(losses) / len(losses)


@pytest.mark.parametrize("B, V, D, C, tau", [(5, 2, 8, 4, 0.07), (7, 3, 4, 6, 0.5), (1, 2, 3, 3, 0.1), (4, 1, 5, 2, 1.0)])
def test_matches_plain_loop(B, V, D, C, tau):
    g = torch.Generator().manual_seed(B * 100 + C)
    views = F.normalize(torch.randn(B, V, D, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randint(C, (B,), generator=g)
    protos = F.normalize(torch.randn(C, D, generator=g, dtype=torch.float64), dim=-1)
    fast = balanced_contrastive_loss(views, labels, protos, tau)
    assert abs(fast.item() - reference_loop(views, labels, protos, tau)) < 1e-6
    plain = balanced_contrastive_loss(views, labels, protos, tau, class_average=False)
    assert abs(plain.item() - reference_loop(views, labels, protos, tau, class_average=False)) < 1e-6
    anchors = balanced_contrastive_loss(views, labels, protos, tau, reduction="none")
    assert anchors.shape == (B * V,)
    assert max(abs(a - b) for a, b in zip(anchors.tolist(), reference_loop(views, labels, protos, tau, per_anchor=True))) < 1e-6


def test_class_averaging_gives_a_rare_anchor_more_of_its_positive():
    """One frequent class crowds the batch: class averaging shrinks its weight in a rare anchor's denominator."""
    protos = torch.eye(3, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1])
    views = F.normalize(torch.tensor([[1.0, 0.3, 0.0]] * 6 + [[0.5, 1.0, 0.0]], dtype=torch.float64), dim=-1)[:, None]
    balanced = balanced_contrastive_loss(views, labels, protos, 0.5, reduction="none")
    plain = balanced_contrastive_loss(views, labels, protos, 0.5, class_average=False, reduction="none")
    assert balanced[-1] < plain[-1]  # the class-1 anchor: six class-0 keys count as one class, not six rows
    with pytest.raises(ValueError, match="reduction"):
        balanced_contrastive_loss(views, labels, protos, reduction="sum")


def test_invariant_to_sample_order_and_gradients_flow():
    g = torch.Generator().manual_seed(1)
    views = F.normalize(torch.randn(6, 2, 4, generator=g), dim=-1).requires_grad_()
    labels = torch.tensor([0, 1, 1, 2, 0, 1])
    protos = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a = balanced_contrastive_loss(views, labels, protos)
    b = balanced_contrastive_loss(views[perm], labels[perm], protos)
    torch.testing.assert_close(a, b)
    a.backward()
    assert views.grad is not None and torch.isfinite(views.grad).all() and views.grad.abs().sum() > 0


def test_tight_clusters_give_lower_loss_than_mixed():
    protos = torch.eye(3)
    labels = torch.tensor([0, 1, 2])
    aligned = protos[labels].unsqueeze(1).repeat(1, 2, 1)
    mixed = protos[torch.tensor([1, 2, 0])].unsqueeze(1).repeat(1, 2, 1)
    assert balanced_contrastive_loss(aligned, labels, protos, 0.1) < balanced_contrastive_loss(mixed, labels, protos, 0.1)


def test_bad_inputs():
    v = F.normalize(torch.randn(3, 2, 4), dim=-1)
    p = F.normalize(torch.randn(2, 4), dim=-1)
    with pytest.raises(ValueError, match="L2-normalised"):
        balanced_contrastive_loss(v * 3, torch.tensor([0, 1, 0]), p)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        balanced_contrastive_loss(v, torch.tensor([0, 2, 0]), p)
    with pytest.raises(ValueError, match="do not match"):
        balanced_contrastive_loss(v, torch.tensor([0, 1]), p)
    with pytest.raises(ValueError, match="expected views"):
        balanced_contrastive_loss(v[0], torch.tensor([0, 1]), p)


def test_logit_adjusted_ce_against_manual_formula():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    labels = torch.tensor([2, 0])
    counts = torch.tensor([10.0, 30.0, 60.0])
    prior_weight = 0.7
    manual = 0.0
    for row, y in zip(logits, labels):
        adjusted = [float(row[c]) + prior_weight * math.log(counts[c] / counts.sum()) for c in range(3)]
        manual += -(adjusted[y] - math.log(sum(math.exp(a) for a in adjusted)))
    assert abs(logit_adjusted_cross_entropy(logits, labels, counts, prior_weight).item() - manual / 2) < 1e-6
    assert abs(logit_adjusted_cross_entropy(logits, labels, counts, prior_weight=0.0).item()
               - F.cross_entropy(logits, labels).item()) < 1e-6  # no adjustment: plain cross-entropy
    with pytest.raises(ValueError, match="positive"):
        logit_adjusted_cross_entropy(logits, labels, torch.tensor([1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        logit_adjusted_cross_entropy(logits, labels, torch.tensor([1.0, 2.0]))


def test_bamco_loss_combines_terms_with_weights():
    torch.manual_seed(0)
    space = KnowledgeSpace(image_dim=6, text_dim=5, num_classes=3, embed_dim=8)
    out = space(torch.randn(4, 6), torch.randn(4, 5), torch.randn(4, 3, 2, 8, 8))
    labels, counts = torch.tensor([0, 1, 2, 1]), torch.tensor([4.0, 2.0, 1.0])
    total, parts = bamco_loss(out, labels, counts, temperature=0.2, ce_weight=0.3, contrastive_weight=0.7)
    pairs = [("image", "text"), ("image", "intra"), ("intra", "text")]
    contrastive = sum(balanced_contrastive_loss(torch.stack([out[a], out[b]], 1), labels, out["prototypes"], 0.2)
                      for a, b in pairs) / 3
    ce = logit_adjusted_cross_entropy(out["logits"], labels, counts)
    torch.testing.assert_close(total, 0.3 * ce + 0.7 * contrastive)
    assert parts["ce"] == pytest.approx(ce.item()) and parts["contrastive"] == pytest.approx(contrastive.item())
    torch.testing.assert_close(out["prototypes"].norm(dim=-1), torch.ones(3))
    assert out["logits"].abs().max() <= 30 + 1e-4  # cosine classifier with scale 30
    unbalanced, _ = bamco_loss(out, labels, counts, temperature=0.2, ce_weight=0.3, contrastive_weight=0.7, balanced=False)
    plain = sum(balanced_contrastive_loss(torch.stack([out[a], out[b]], 1), labels, out["prototypes"], 0.2,
                                          class_average=False) for a, b in pairs) / 3
    torch.testing.assert_close(unbalanced, 0.3 * F.cross_entropy(out["logits"], labels) + 0.7 * plain)


def test_alignment_loss_and_matching():
    x = torch.eye(3)
    assert alignment_loss(x, x, 0.1) < alignment_loss(x, x[[1, 2, 0]], 0.1)
    assert top1_matching(torch.tensor([[0.0, 2.0], [1.0, 0.1]]), torch.eye(2)).tolist() == [1, 0]


def _config(classes=("liver", "lung")):
    return {"dataset": "synthetic", "classes": list(classes), "class_images": {c: [f"{c}1"] for c in classes}, "image_dim": 6,
            "text_dim": 5, "embed_dim": 4, "image_encoder": "small-vit", "text_encoder": "minilm", "image_size": 64,
            "intra_size": 8, "intra_images": 2}


def test_knowledge_spaces_round_trip(tmp_path):
    from medvqa.bamco.balanced_contrastive import load_knowledge_spaces, save_knowledge_spaces
    torch.manual_seed(0)
    spaces = {"BaMCo": KnowledgeSpace(6, 5, 2, 4).eval(), "alignment": KnowledgeSpace(6, 5, 2, 4).eval()}
    path = save_knowledge_spaces(tmp_path / "k.pt", spaces, _config(), {"w": torch.ones(2)})
    loaded, vision, config = load_knowledge_spaces(path)
    assert sorted(loaded) == ["BaMCo", "alignment"] and torch.equal(vision["w"], torch.ones(2))
    assert config["classes"] == ["liver", "lung"]
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.allclose(loaded["BaMCo"].encode_image(x), spaces["BaMCo"].encode_image(x))
        assert not torch.allclose(loaded["alignment"].encode_image(x), spaces["BaMCo"].encode_image(x))
    assert not loaded["BaMCo"].training


def test_shared_space_is_the_encoders_own_and_survives_a_round_trip(tmp_path):
    from medvqa.bamco.balanced_contrastive import encoders_share_space, load_knowledge_spaces, save_knowledge_spaces
    assert encoders_share_space("biomedclip", "biomedclip-text")  # BiomedCLIP's two towers
    assert not encoders_share_space("small-cnn-ssl", "minilm") and not encoders_share_space("biomedclip", "minilm")
    torch.manual_seed(0)
    shared = KnowledgeSpace(4, 4, 2, 4, shared=True).eval()
    image, text = torch.randn(3, 4), torch.randn(5, 4)
    with torch.no_grad():  # no head: cosine geometry of the frozen features themselves
        assert torch.allclose(shared.encode_image(image), F.normalize(image, dim=-1))
        assert torch.allclose(shared.encode_text(text), F.normalize(text, dim=-1))
    config = {**_config(), "image_dim": 4, "text_dim": 4, "embed_dim": 4}
    path = save_knowledge_spaces(tmp_path / "k.pt", {"baseline": shared, "BaMCo": KnowledgeSpace(4, 4, 2, 4)}, config)
    loaded, _, saved = load_knowledge_spaces(path)
    assert saved["shared_spaces"] == ["baseline"] and loaded["baseline"].shared and not loaded["BaMCo"].shared
    with pytest.raises(ValueError, match="towers of one CLIP"):
        KnowledgeSpace(6, 5, 2, 4, shared=True)


def test_knowledge_space_errors_name_file_and_fix(tmp_path):
    from medvqa.bamco.balanced_contrastive import load_knowledge_spaces, save_knowledge_spaces
    from medvqa.core import save_checkpoint
    with pytest.raises(FileNotFoundError, match="run chapter 04 first"):
        load_knowledge_spaces(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="config lacks classes"):
        save_knowledge_spaces(tmp_path / "x.pt", {}, {k: v for k, v in _config().items() if k != "classes"})
    save_checkpoint(tmp_path / "other.pt", step=0, config={"model": {}})
    with pytest.raises(ValueError, match="other.pt: not a chapter 04 knowledge-space checkpoint"):
        load_knowledge_spaces(tmp_path / "other.pt")


def test_fig4_hit_rule_counts_only_the_rows_own_class():
    from medvqa.bamco.balanced_contrastive import own_class_hits
    # query 0: an image of classes {1 (lung), 4 (pneumonia)} matched to 1; query 1: an image of {2} matched to 3
    rows = own_class_hits([1, 3], [{4, 1}, {2}])
    assert rows == [(0, 1, True), (0, 4, False), (1, 2, False)]
    # the old "any entity of the image" rule would have counted the pneumonia row as a hit
    assert sum(hit for _, _, hit in rows) == 1
    assert own_class_hits([], []) == []
    with pytest.raises(ValueError, match="2 predictions for 1 queries"):
        own_class_hits([0, 1], [{0}])


def test_released_text_mix_has_the_released_shares():
    from medvqa.bamco.balanced_contrastive import draw_text
    torch.manual_seed(0)
    n, draws = 8, 20_000  # name, six relations, definition
    picks = torch.tensor([draw_text(n, "released") for _ in range(draws)])
    name, definition = (picks == 0).float().mean().item(), (picks == n - 1).float().mean().item()
    relation = ((picks > 0) & (picks < n - 1)).float().mean().item()
    # two separate draws: 0.33, then 0.67 x 0.66 and 0.67 x 0.34 (4 standard errors at 20,000 draws is about 0.013)
    assert abs(name - 0.33) < 0.013 and abs(relation - 0.67 * 0.66) < 0.013 and abs(definition - 0.67 * 0.34) < 0.013
    uniform = torch.tensor([draw_text(n, "uniform") for _ in range(draws)])
    assert torch.bincount(uniform, minlength=n).min() > draws / n * 0.9
    assert {draw_text(2, "released") for _ in range(50)} == {0, 1}  # no relation: name or definition
    with pytest.raises(ValueError, match="text mix"):
        draw_text(3, "paper")


def test_repeat_reference_fills_the_volume_with_the_reference_image():
    from medvqa.bamco.balanced_contrastive import KnowledgePairs
    small = {i: torch.full((3, 4, 4), float(k)) for k, i in enumerate("abc")}
    args = ([("a", 0)], {"a": torch.zeros(6)}, {0: torch.zeros(3, 5)}, {0: ["b", "c"]}, small, 5)
    torch.manual_seed(0)
    always = KnowledgePairs(*args, repeat_reference=1.0)[0]["intra"]  # [3, K, S, S]
    assert always.shape == (3, 5, 4, 4) and (always == 0.0).all()  # five copies of "a"
    never = KnowledgePairs(*args, repeat_reference=0.0)[0]["intra"]
    assert set(never[0, :, 0, 0].tolist()) <= {1.0, 2.0}  # drawn from the class pool ("b", "c")
    with pytest.raises(ValueError, match="repeat_reference"):
        KnowledgePairs(*args, repeat_reference=1.5)


def test_cosine_classifier_starts_with_unit_columns():
    from medvqa.bamco.balanced_contrastive import CosineClassifier
    torch.manual_seed(0)
    w = CosineClassifier(12, 5).weight
    assert torch.allclose(w.norm(dim=0), torch.ones(5), atol=1e-6)
