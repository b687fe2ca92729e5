"""Tests of the CMDPI pre-training pieces: Eq. 7, masking, the momentum encoders, global vs local, loss weights."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from medvqa.cmdpi.coregularized import WordVocabulary, CoRegConfig, CoRegularizedModel, PretrainWeights, contrastive, patchify, pretraining_loss, random_mask


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
    padding = batch["tokens"][:, 1:] == WordVocabulary.PAD
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
    padding = batch["tokens"][:, 1:] == WordVocabulary.PAD
    _, _, _, state = model.reconstruct(model.global_vector(h_i, h_t), H_i, H_t, padding)
    v = torch.cat([model.global_vector(h_i, h_t)[:, None], H_i, H_t], 1) + model.rec_pos[:, :1 + 4 + 5]
    pad = torch.cat([torch.zeros(4, 5, dtype=torch.bool), padding], 1)
    out = model.recnet(v, src_key_padding_mask=pad)
    ans_positions = [1 + 4 + int((row == WordVocabulary.ANS).nonzero()) for row in batch["tokens"][:, 1:]]
    torch.testing.assert_close(state, out[torch.arange(4), ans_positions])


def _jpeg(path, value):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (value, value, value)).save(path)


def test_roco_reader_both_layouts_and_errors(tmp_path):
    from medvqa.cmdpi.coregularized import load_roco_captions
    from medvqa.data.readers import DatasetError
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
    from medvqa.cmdpi.coregularized import load_pmc_vqa
    from medvqa.data.readers import DatasetError
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
    from medvqa.cmdpi.coregularized import PretrainingData
    from medvqa.data.batches import load_images
    from medvqa.data.readers import VQARecord
    _jpeg(tmp_path / "x.png", 90)
    record = VQARecord("synthetic", "train", "1", "x", tmp_path / "x.png", "q", "a", "open")
    decoded = load_images([record], 16)
    vocab = WordVocabulary(["a caption"], tokenizer=type("T", (), {"__call__": lambda self, t, add_special_tokens=False: {"input_ids": [1, 2]}})(), max_length=6)
    eager = PretrainingData(decoded, {"x": "a caption"}, [], vocab, patch=8, image_size=16)
    lazy = PretrainingData({"x": tmp_path / "x.png"}, {"x": "a caption"}, [], vocab, patch=8, image_size=16)
    assert torch.equal(eager[0]["patches"], lazy[0]["patches"]) and lazy.patches == {}


def test_trailing_text_padding_changes_nothing():
    """Trimming all-padding columns (trim_text_padding) is a pure speed-up: same answer logits, same pre-training loss."""
    from medvqa.cmdpi.coregularized import answer_head, trim_text_padding
    model, batch = tiny()
    model.eval()
    short = batch["tokens"][:, :4]  # the batch's longest text ends at column 3
    assert torch.equal(trim_text_padding(batch["tokens"]), short)
    with torch.no_grad():
        full_logits, full_state = answer_head(model, batch["patches"], batch["tokens"])
        h_i, H_i, h_t, H_t = model.encode(batch["patches"], short)
        pad = short[:, 1:] == WordVocabulary.PAD
        _, _, logits, state = model.reconstruct(model.global_vector(h_i, h_t), H_i, H_t, pad)
    assert torch.allclose(full_logits, logits, atol=1e-5) and torch.allclose(full_state, state, atol=1e-5)
    assert torch.equal(trim_text_padding(torch.zeros(2, 5, dtype=torch.long)), torch.zeros(2, 1, dtype=torch.long))


def test_pool_cells_matches_block_means():
    """Each cell is the mean of its block of the tower's grid, in patchify's row-major order."""
    from medvqa.cmdpi.coregularized import pool_cells
    grid = torch.randn(2, 4, 4, 3, generator=torch.Generator().manual_seed(0))
    cells = pool_cells(grid, 2)
    assert cells.shape == (2, 4, 3)
    for b in range(2):
        for k, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
            assert torch.allclose(cells[b, k], grid[b, r:r + 2, c:c + 2].reshape(-1, 3).mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="square feature grid"):
        pool_cells(torch.randn(2, 4, 3, 3), 2)


def test_model_on_feature_cells_reads_cells_and_rebuilds_pixels():
    """With cell_dim set, the image encoder reads batch['cells'] (LayerNorm + linear) and L_img still compares the rebuilt
    patches with the pixels: changing the pixels moves only the reconstruction terms, changing the cells moves h_I."""
    from medvqa.cmdpi.coregularized import answer_head, image_input
    torch.manual_seed(0)
    cfg = CoRegConfig(vocab_size=12, n_answers=3, image_size=16, patch=8, dim=8, encoder_layers=1, recnet_layers=1, heads=2,
                      text_length=6, cell_dim=5)
    model = CoRegularizedModel(cfg).eval()
    _, batch = tiny()
    batch["cells"] = torch.randn(4, 4, 5)
    assert image_input(batch) is batch["cells"] and image_input({"patches": batch["patches"]}) is batch["patches"]
    with torch.no_grad():
        logits, _ = answer_head(model, image_input(batch), batch["tokens"])
        other_pixels = {**batch, "patches": batch["patches"] + 1.0}
        assert torch.equal(answer_head(model, image_input(other_pixels), batch["tokens"])[0], logits)  # pixels are not read
        other_cells = {**batch, "cells": batch["cells"] + torch.randn(4, 4, 5)}
        assert not torch.allclose(answer_head(model, image_input(other_cells), batch["tokens"])[0], logits)
        weights = PretrainWeights(inter=0, intra=0)
        g = lambda: torch.Generator().manual_seed(3)
        _, parts = pretraining_loss(model, batch, weights, momentum=None, generator=g())
        _, moved = pretraining_loss(model, other_pixels, weights, momentum=None, generator=g())
        assert moved["rec_global"] > parts["rec_global"]  # the targets moved, the inputs did not
    model.train()
    loss, _ = pretraining_loss(model, batch, PretrainWeights(), momentum=None, generator=g())
    loss.backward()
    assert model.image_encoder.embed[1].weight.grad is not None and model.image_encoder.embed[0].weight.grad is not None
    with pytest.raises(ValueError, match="feature cells for 4 patches"):
        pretraining_loss(model, {**batch, "cells": torch.randn(4, 2, 5)}, momentum=None)


def test_tower_cells_pool_the_towers_grid_and_name_a_broken_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVQA_CACHE", str(tmp_path / "cache"))  # frozen_features keeps its cache there
    from medvqa.cmdpi.coregularized import PretrainingData, pool_cells, tower_cells
    from medvqa.data.readers import DatasetError
    from medvqa.data.batches import image_transform
    from medvqa.models.towers import SmallCNN
    from PIL import Image
    torch.manual_seed(0)
    tower = SmallCNN(image_size=32).eval()  # a 4x4 grid of 128-d features at 32 px
    for name, value in (("a", 40), ("b", 200)):
        _jpeg(tmp_path / f"{name}.png", value)
    cells = tower_cells(tower, {"a": tmp_path / "a.png", "b": tmp_path / "b.png"}, side=2)
    with torch.no_grad():
        x = image_transform(32, tower.mean, tower.std)(Image.open(tmp_path / "b.png").convert("RGB"))[None]
        expected = pool_cells(tower(x).patches, 2)[0]
    assert cells["b"].shape == (4, 128) and torch.allclose(cells["b"], expected, atol=1e-5)
    assert not torch.allclose(cells["a"], cells["b"])
    (tmp_path / "c.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="c.png.*record c.*'image'"):
        tower_cells(tower, {"c": tmp_path / "c.png"}, side=2)
    vocab = WordVocabulary(["a caption"], tokenizer=type("T", (), {"__call__": lambda self, t, add_special_tokens=False: {"input_ids": [1, 2]}})(), max_length=6)
    images = {"a": torch.zeros(3, 16, 16), "b": torch.ones(3, 16, 16)}
    data = PretrainingData(images, {"a": "a caption", "b": "a caption"}, [], vocab, patch=8, image_size=16, cells=cells)
    assert torch.equal(data[1]["cells"], cells["b"]) and data[1]["patches"].shape == (4, 192)
    with pytest.raises(ValueError, match="no feature cells for 1 images"):
        PretrainingData(images, {"a": "a caption", "b": "a caption"}, [], vocab, patch=8, image_size=16, cells={"a": cells["a"]})
