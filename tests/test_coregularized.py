"""Tests of the CMDPI pre-training pieces: Eq. 7, masking, the momentum encoders, global vs local, loss weights."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from medvqa.coregularized import (CompactVocabulary, CoRegConfig, CoRegularizedModel, PretrainWeights, contrastive,
                                  patchify, pretraining_loss, random_mask)


def contra_loop(a, b, tau):
    """Eq. 7 with plain loops."""
    n = len(a)
    total = 0.0
    for i in range(n):
        sims = [float(F.cosine_similarity(a[i], b[j], dim=0)) / tau for j in range(n)]
        total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    return total / n


@pytest.mark.parametrize("n, d, tau", [(2, 3, 0.07), (5, 8, 0.5), (9, 4, 1.0)])
def test_contrastive_matches_loop(n, d, tau):
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    assert abs(contrastive(a, b, tau).item() - contra_loop(a, b, tau)) < 1e-6


def test_contrastive_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        contrastive(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="same shape"):
        contrastive(torch.randn(3, 4), torch.randn(2, 4))


def test_mask_keeps_ratio_and_never_masks_head_or_padding():
    valid = torch.ones(50, 40, dtype=torch.bool)
    valid[:, 0] = False  # the head position
    valid[10:, 30:] = False  # padding in some rows
    for ratio in (0.0, 0.1, 0.25, 0.6):
        m = random_mask(valid, ratio, torch.Generator().manual_seed(1))
        assert torch.equal(m.sum(1), (valid.sum(1).float() * ratio).round().long())
        assert not m[:, 0].any() and not (m & ~valid).any()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        random_mask(valid, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        random_mask(valid, -0.1)


def test_patchify_order():
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    patches = patchify(img, patch=2)
    assert patches.shape == (1, 4, 4)
    assert patches[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # second patch = top-right block, row-major
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(torch.zeros(1, 3, 10, 10), 4)


def tiny():
    torch.manual_seed(0)
    cfg = CoRegConfig(vocab_size=12, n_answers=3, image_size=16, patch=8, dim=8, encoder_layers=1, recnet_layers=1, heads=2,
                      text_length=6)
    model = CoRegularizedModel(cfg)
    batch = {"patches": torch.randn(4, 4, 192), "tokens": torch.tensor([[3, 6, 7, 4, 0, 0], [3, 8, 4, 0, 0, 0]] * 2),
             "answer": torch.tensor([0, -1, 2, -1]), "is_caption": torch.tensor([0, 1, 0, 1])}
    return model, batch


def test_momentum_encoder_follows_ema_and_gets_no_gradient():
    model, batch = tiny()
    with torch.no_grad():
        for p in model.image_encoder.parameters():
            p.add_(1.0)
    before_online = [p.detach().clone() for p in model.image_encoder.parameters()]
    before_ema = [p.detach().clone() for p in model.momentum_image.parameters()]
    model.momentum_update(0.9)
    for online, ema, new in zip(before_online, before_ema, model.momentum_image.parameters()):
        torch.testing.assert_close(new, 0.9 * ema + 0.1 * online)
    loss, _ = pretraining_loss(model.train(), batch, momentum=None, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.momentum_image.parameters())
    assert all(p.grad is None for p in model.momentum_text.parameters())


def test_global_and_local_reconstruction_differ_only_in_h():
    model, batch = tiny()
    model.eval()
    h_i, H_i, h_t, H_t = model.encode(batch["patches"], batch["tokens"])
    padding = batch["tokens"][:, 1:] == CompactVocabulary.PAD
    h_f = model.global_vector(h_i, h_t)
    glob = model.reconstruct(h_f, H_i, H_t, padding)
    loc = model.reconstruct(model.shared_local.expand_as(h_f), H_i, H_t, padding)
    same_h = model.reconstruct(h_f.clone(), H_i, H_t, padding)
    torch.testing.assert_close(glob[0], same_h[0])
    assert not torch.allclose(glob[0], loc[0])
    with torch.no_grad():  # with h~ set to h_F of every sample the two paths coincide
        model.shared_local.copy_(h_f[0])
        one = h_f[:1].expand_as(h_f)
        torch.testing.assert_close(model.reconstruct(one, H_i, H_t, padding)[0],
                                   model.reconstruct(model.shared_local.expand_as(h_f), H_i, H_t, padding)[0])


def test_loss_weights_follow_parameters():
    model, batch = tiny()
    model.eval()  # no dropout: the same masks (same generator seed) give comparable terms
    run = lambda w: pretraining_loss(model, batch, w, momentum=None, generator=torch.Generator().manual_seed(3))
    full_loss, parts = run(PretrainWeights(1.0, 1.0, 0.5, 1.0))
    expected = parts["rec_global"] + parts["rec_local"] + 0.5 * parts["inter"] + 1.0 * parts["intra"]
    assert full_loss.item() == pytest.approx(expected, rel=1e-5)
    doubled, parts2 = run(PretrainWeights(2.0, 0.0, 0.0, 3.0))
    assert set(parts2) == {"rec_global", "intra"}
    assert doubled.item() == pytest.approx(2 * parts["rec_global"] + 3 * parts["intra"], rel=1e-5)


def test_contrast_uses_captions_only():
    model, batch = tiny()
    model.eval()
    no_captions = dict(batch, is_caption=torch.zeros(4, dtype=torch.long))
    _, parts = pretraining_loss(model, no_captions, momentum=None, generator=torch.Generator().manual_seed(0))
    assert "inter" not in parts and "intra" not in parts
    with pytest.raises(ValueError, match="different lengths"):
        pretraining_loss(model, dict(batch, answer=torch.tensor([0])))


def test_answer_is_read_from_the_ans_slot():
    model, batch = tiny()
    model.eval()
    h_i, H_i, h_t, H_t = model.encode(batch["patches"], batch["tokens"])
    padding = batch["tokens"][:, 1:] == CompactVocabulary.PAD
    _, _, _, state = model.reconstruct(model.global_vector(h_i, h_t), H_i, H_t, padding)
    v = torch.cat([model.global_vector(h_i, h_t)[:, None], H_i, H_t], 1) + model.rec_pos[:, :1 + 4 + 5]
    pad = torch.cat([torch.zeros(4, 5, dtype=torch.bool), padding], 1)
    out = model.recnet(v, src_key_padding_mask=pad)
    ans_positions = [1 + 4 + int((row == CompactVocabulary.ANS).nonzero()) for row in batch["tokens"][:, 1:]]
    torch.testing.assert_close(state, out[torch.arange(4), ans_positions])


def _jpeg(path, value):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (value, value, value)).save(path)


def test_roco_reader_both_layouts_and_errors(tmp_path):
    from medvqa.coregularized import load_roco_captions
    from medvqa.data import DatasetError
    radiology = tmp_path / "roco" / "data" / "train" / "radiology"
    (radiology / "captions.txt").parent.mkdir(parents=True)
    (radiology / "captions.txt").write_text("ROCO_00001\tCT of the chest.\n\nROCO_00002\tMRI of the brain.\n")
    for i in (1, 2):
        _jpeg(radiology / "images" / f"ROCO_0000{i}.jpg", 10 * i)
    test_split = tmp_path / "roco" / "data" / "test" / "radiology"
    test_split.mkdir(parents=True)
    (test_split / "captions.txt").write_text("ROCO_00009\tnot a training caption\n")
    captions, files = load_roco_captions(tmp_path / "roco")
    assert captions == {"ROCO_00001": "CT of the chest.", "ROCO_00002": "MRI of the brain."}
    assert files["ROCO_00002"] == radiology / "images" / "ROCO_00002.jpg"
    assert load_roco_captions(tmp_path / "roco", limit=1)[0] == {"ROCO_00001": "CT of the chest."}
    (radiology / "captions.txt").write_text("ROCO_00001 CT without a tab\n")
    with pytest.raises(DatasetError, match=r"captions.txt, record line 1, field 'caption'"):
        load_roco_captions(tmp_path / "roco")
    # the CSV layout
    csv_root = tmp_path / "roco_csv"
    _jpeg(csv_root / "images" / "a.jpg", 30)
    (csv_root / "radiologytraindata.csv").write_text("id,name,caption\n1,a.jpg,X-ray of the hand\n2,b.jpg,missing image\n")
    with pytest.raises(DatasetError, match="missing image files"):
        load_roco_captions(csv_root)
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        assert load_roco_captions(csv_root, missing_images="skip")[0] == {"a": "X-ray of the hand"}
    with pytest.raises(FileNotFoundError, match="razorx89"):
        load_roco_captions(tmp_path / "nowhere")


def test_pmc_vqa_reader(tmp_path):
    from medvqa.coregularized import load_pmc_vqa
    from medvqa.data import DatasetError
    root = tmp_path / "pmc-vqa"
    _jpeg(root / "images" / "PMC1_F1.jpg", 50)
    (root / "train.csv").write_text("Figure_path,Question,Answer,Answer_label\n"
                                    "PMC1_F1.jpg,What modality is shown?,CT scan,A\nPMC1_F1.jpg,Is it normal?,Yes,B\n")
    records = load_pmc_vqa(root)
    assert [(r.question, r.answer, r.answer_type) for r in records] == [
        ("What modality is shown?", "CT scan", "open"), ("Is it normal?", "Yes", "closed")]
    assert records[0].image_path == root / "images" / "PMC1_F1.jpg" and records[0].dataset == "pmc-vqa"
    (root / "train.csv").write_text("Figure_path,Question,Answer\nPMC1_F1.jpg,,CT\n")
    with pytest.raises(DatasetError, match="row 2, field 'Question'"):
        load_pmc_vqa(root)
    (root / "train.csv").write_text("Figure,Question,Answer\nPMC1_F1.jpg,q,a\n")
    with pytest.raises(DatasetError, match="field 'Figure_path'"):
        load_pmc_vqa(root)


def test_pretraining_data_reads_image_files_like_tensors(tmp_path):
    from medvqa.coregularized import PretrainingData
    from medvqa.data import load_images
    from medvqa.data import VQARecord
    _jpeg(tmp_path / "x.png", 90)
    record = VQARecord("synthetic", "train", "1", "x", tmp_path / "x.png", "q", "a", "open")
    decoded = load_images([record], 16)
    vocab = CompactVocabulary(["a caption"], tokenizer=type("T", (), {"__call__": lambda self, t, add_special_tokens=False: {"input_ids": [1, 2]}})(), max_length=6)
    eager = PretrainingData(decoded, {"x": "a caption"}, [], vocab, patch=8, image_size=16)
    lazy = PretrainingData({"x": tmp_path / "x.png"}, {"x": "a caption"}, [], vocab, patch=8, image_size=16)
    assert torch.equal(eager[0]["patches"], lazy[0]["patches"]) and lazy.patches == {}


def test_trailing_text_padding_changes_nothing():
    """Trimming all-padding columns (trim_text_padding) is a pure speed-up: same answer logits, same pre-training loss."""
    from medvqa.coregularized import answer_head, trim_text_padding
    model, batch = tiny()
    model.eval()
    short = batch["tokens"][:, :4]  # the batch's longest text ends at column 3
    assert torch.equal(trim_text_padding(batch["tokens"]), short)
    with torch.no_grad():
        full_logits, full_state = answer_head(model, batch["patches"], batch["tokens"])
        h_i, H_i, h_t, H_t = model.encode(batch["patches"], short)
        pad = short[:, 1:] == CompactVocabulary.PAD
        _, _, logits, state = model.reconstruct(model.global_vector(h_i, h_t), H_i, H_t, pad)
    assert torch.allclose(full_logits, logits, atol=1e-5) and torch.allclose(full_state, state, atol=1e-5)
    assert torch.equal(trim_text_padding(torch.zeros(2, 5, dtype=torch.long)), torch.zeros(2, 1, dtype=torch.long))
