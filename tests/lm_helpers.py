"""Small stand-ins shared by the LM tests: a character tokenizer and a tiny random Llama."""
import torch


class CharTokenizer:
    """Character-level tokenizer: ids 3.. for characters; 0 = pad, 2 = eos."""
    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": char_ids(text)}


def char_ids(text):
    return [3 + (ord(c) % 60) for c in text]


def tiny_lm(width=16):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=64, hidden_size=width, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()
