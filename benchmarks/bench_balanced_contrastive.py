"""Benchmark (not a test): forward+backward of Eq. 1 at the paper's scale, vectorised vs a straightforward version.

Run: .venv/bin/python benchmarks/bench_balanced_contrastive.py [--repeats 5]
Scale: B = 48, V = 2, D = 512, C = 285 (BaMCo's batch, views, embedding size and VQA-RAD head entities).
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

from medvqa.bamco.balanced_contrastive import balanced_contrastive_loss


def straightforward(views, labels, prototypes, temperature=0.07):
    """The same formula with a Python loop over anchors (vectorised over keys only)."""
    B, V, D = views.shape
    z = torch.cat([views.transpose(0, 1).reshape(B * V, D), prototypes])
    y = torch.cat([labels.repeat(V), torch.arange(len(prototypes))])
    sizes = torch.bincount(y, minlength=len(prototypes)).float()
    losses = []
    for i in range(B * V):
        s = z[i] @ z.T / temperature
        keep = torch.ones(len(z), dtype=torch.bool)
        keep[i] = False
        same = (y == y[i]) & keep
        w = sizes[y] - same.float()
        log_den = torch.logsumexp((s - w.log())[keep], dim=0)
        losses.append(-(s[same] - log_den).mean())
    return torch.stack(losses).mean()


def measure(fn, views, labels, protos, repeats):
    """Best wall time of forward+backward over `repeats` runs."""
    times = []
    for _ in range(repeats):
        v = views.clone().requires_grad_()
        start = time.perf_counter()
        fn(F.normalize(v, dim=-1), labels, protos).backward()
        times.append(time.perf_counter() - start)
    return min(times)


def inputs():
    torch.manual_seed(0)
    B, V, D, C = 48, 2, 512, 285
    return torch.randn(B, V, D), torch.randint(C, (B,)), F.normalize(torch.randn(C, D), dim=-1)


def allocated_kb(fn, views, labels, protos) -> float:
    """Total bytes the CPU allocator handed out during one forward+backward (torch.profiler), in kB."""
    from torch.profiler import ProfilerActivity, profile
    v = views.clone().requires_grad_()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(F.normalize(v, dim=-1), labels, protos).backward()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages()) / 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    views, labels, protos = inputs()
    a = balanced_contrastive_loss(F.normalize(views, dim=-1), labels, protos)
    b = straightforward(F.normalize(views, dim=-1), labels, protos)
    assert math.isclose(a.item(), b.item(), rel_tol=1e-5), (a.item(), b.item())
    fast_t = measure(balanced_contrastive_loss, views, labels, protos, args.repeats)
    slow_t = measure(straightforward, views, labels, protos, args.repeats)
    print(f"B=48 V=2 D=512 C=285, best of {args.repeats}, forward+backward, CPU, {torch.get_num_threads()} threads")
    print(f"vectorised     : {fast_t * 1e3:8.2f} ms")
    print(f"loop over rows : {slow_t * 1e3:8.2f} ms")
    print(f"speed-up       : {slow_t / fast_t:8.1f} x")
    print(f"allocated      : vectorised {allocated_kb(balanced_contrastive_loss, views, labels, protos):.0f} kB, "
          f"loop {allocated_kb(straightforward, views, labels, protos):.0f} kB (forward+backward, torch.profiler)")


if __name__ == "__main__":
    main()
