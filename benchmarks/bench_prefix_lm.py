"""Benchmark (not a test): SmolLM2-135M with the `bamco` LoRA preset reading an 18-token soft prefix.

Run: .venv/bin/python benchmarks/bench_prefix_lm.py [--batch 16] [--repeats 3]
Measures one training step (forward + backward + AdamW) and greedy generation of 8 tokens on the built-in dataset's
training questions, with each batch cut to its own longest text (`PrefixLM.trim_padding`) and padded to the
longest text of a long-question batch (what the model would see without trimming).
"""
import argparse
import time

import torch

from medvqa.data.readers import load_split
from medvqa.models.prefix import PrefixLM, prompt_answer_tensors
from medvqa.models.lm import apply_lora, load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    lm, tokenizer = load_causal_lm("smollm2-135m")
    model = PrefixLM(apply_lora(lm, "bamco"))
    records = load_split("synthetic", "train")[: args.batch]
    long_question = "Describe in detail every organ, every finding and its position in this image, and compare them?" * 2
    rows = prompt_answer_tensors([r.question for r in records] + [long_question], [r.answer for r in records] + ["x"], tokenizer)
    width = prompt_answer_tensors([r.question for r in records], [r.answer for r in records], tokenizer)["text_ids"].shape[1]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    prefix = torch.randn(args.batch, 18, lm.config.hidden_size) * 0.02
    trim = PrefixLM.trim_padding
    for name, pad in (("trimmed", False), ("padded", True)):
        mask, ids, labels = rows["text_mask"][: args.batch], rows["text_ids"][: args.batch], rows["labels"][: args.batch]
        if pad:  # stop trim_padding from cutting: one real token at the first column of a copy
            mask = mask.clone()
            mask[0, 0] = 1
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            loss = model.answer_nll(prefix, ids, mask, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        print(f"{name:>8}: text width {trim(mask, ids)[1].shape[1]:>3} (batch's own longest {width}); "
              f"train step {min(times):.2f} s for {args.batch} questions ({min(times) / args.batch:.3f} s per question)")
    start = time.perf_counter()
    with torch.no_grad():
        model.generate_answer(prefix, rows["prompt_ids"][: args.batch], rows["prompt_mask"][: args.batch], max_new_tokens=8,
                              eos_token_id=tokenizer.eos_token_id)
    print(f"greedy generation of 8 tokens for {args.batch} questions: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
