"""Every helper that builds tensors for a model puts them on the model's device (chapter 06's GPU crash, issue #17).

No GPU here, so the model goes to PyTorch's `meta` device: nothing is computed there, and an input left on the CPU
fails at the model's first layer with a device mismatch, while inputs that followed the model get through the whole
forward pass and stop only where a result is copied out ("Cannot copy out of meta tensor").
"""
import pytest
import torch

from lm_helpers import CharTokenizer, tiny_lm
from medvqa.bamco.balanced_contrastive import KnowledgeSpace
from medvqa.cmdpi.coregularized import WordVocabulary, CoRegConfig, CoRegularizedModel, answer_hits
from medvqa.data.readers import VQARecord
from medvqa.cmdpi.difference_reconstruction import FineTuneData, image_features, predict_answers
from medvqa.biod2c.gated_fusion import FusionData, FusionVQA, GatedFusion, cross_attention
from medvqa.bamco.knowledge_vqa import closest_entity
from medvqa.models.prefix import greedy_answers


def follows_the_model(call) -> bool:
    """True when `call` (a model already on `meta`) got past every layer; False on a CPU/meta mix."""
    try:
        call()
    except NotImplementedError as error:  # a result copied out of a meta tensor: the inputs were on the model's device
        return "meta" in str(error)
    except RuntimeError as error:
        if "device" in str(error):
            return False
        raise
    return True


def test_the_check_can_fail():
    layer = torch.nn.Linear(3, 2).to("meta")
    assert not follows_the_model(lambda: layer(torch.ones(1, 3)).tolist())
    assert follows_the_model(lambda: layer(torch.ones(1, 3).to("meta")).tolist())


class Words:
    words = ["question"] + [str(i) for i in range(20)]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.words.index(w) for w in text.split()]}


def cmdpi_setup():
    torch.manual_seed(0)
    vocab = WordVocabulary([f"question {i}" for i in range(4)], tokenizer=Words(), max_length=6)
    model = CoRegularizedModel(CoRegConfig(vocab_size=len(vocab), n_answers=2, image_size=16, patch=8, dim=8,
                                           encoder_layers=1, recnet_layers=1, heads=2, text_length=6))
    records = [VQARecord("synthetic", "train", str(i), str(i % 2), None, f"question {i}", "yes" if i % 2 else "no",
                         "closed", organ="Chest", question_type="Presence") for i in range(4)]
    images = {str(k): torch.randn(3, 16, 16) for k in range(2)}
    return model, vocab, records, images


def test_cmdpi_helpers_follow_the_model():
    model, vocab, records, images = cmdpi_setup()
    data = FineTuneData(records, images, vocab, ["no", "yes"], 8)
    model.to("meta")
    assert follows_the_model(lambda: predict_answers(model, data, ["no", "yes"]))
    assert follows_the_model(lambda: image_features(model, data.patches))

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"patches": data.patches[data.image_of[i]], "tokens": data.tokens[i], "answer": data.answer[i]}
    assert follows_the_model(lambda: answer_hits(model, Items()))


def test_knowledge_and_fusion_helpers_follow_the_model():
    space = KnowledgeSpace(6, 5, 3, 4).eval().to("meta")
    assert follows_the_model(lambda: closest_entity(space, torch.randn(2, 6), torch.randn(3, 5)).tolist())
    fusion = GatedFusion(vision_dim=6, width=12, visual_side=2, scales=2, layers=1, heads=2, dim=8).eval().to("meta")
    assert follows_the_model(lambda: cross_attention(fusion, torch.randn(2, 4, 4, 6), torch.randn(2, 4, 12),
                                                     torch.zeros(2, 4, dtype=torch.bool)))


def test_greedy_answers_follow_the_model():
    features = {"a": torch.randn(4, 4, 6)}
    data = FusionData([("a", "q?", "yes"), ("a", "r?", "no")], features, CharTokenizer(), 4)
    model = FusionVQA(tiny_lm(), GatedFusion(vision_dim=6, width=16, visual_side=2, scales=2, layers=1, heads=2, dim=8))
    model.eval().to("meta")
    assert follows_the_model(lambda: greedy_answers(model, data, CharTokenizer(), max_new_tokens=2))
