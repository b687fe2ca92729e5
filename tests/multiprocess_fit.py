"""Run by tests/test_training.py under `accelerate launch --num_processes 2`: fit a toy model, write its history."""
import json
import sys

import torch
from torch.utils.data import TensorDataset

from medvqa.core import seed_everything
from medvqa.training import TrainConfig, fit


def toy_data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g))


def toy_model() -> torch.nn.Module:
    seed_everything(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def run(batch_size: int, accumulate: int = 1, run_dir: str | None = None) -> tuple[list[dict], torch.nn.Module]:
    model = toy_model()
    cfg = TrainConfig(epochs=3, batch_size=batch_size, accumulate=accumulate, lr=0.02, device="cpu", progress=False,
                      checkpoint_every=3)
    result = fit(model, mse, toy_data(), cfg, run_dir=run_dir)
    return result.history, model


if __name__ == "__main__":
    out, run_dir = sys.argv[1], sys.argv[2]
    history, model = run(batch_size=8, accumulate=1, run_dir=run_dir)
    from accelerate import PartialState
    state = PartialState()
    if state.is_main_process:
        weights = [p.detach().reshape(-1).tolist() for p in model.parameters()]
        json.dump({"processes": state.num_processes, "history": history, "weights": weights}, open(out, "w"))
