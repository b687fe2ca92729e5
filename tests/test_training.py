"""Tests of the one training loop: exact resume, schedule, refusal of foreign checkpoints, failures."""
import math
from dataclasses import replace

import pytest
import torch
from torch.utils.data import TensorDataset

from medvqa.core import seed_everything
from medvqa.training import EpochShuffle, TrainConfig, fit


def _data(n=40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5]]))


def _model(seed=0, dropout=0.2):
    seed_everything(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(8, 1))


def _mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


CFG = TrainConfig(epochs=3, batch_size=8, lr=0.01, checkpoint_every=4, device="cpu", progress=False)


def test_epoch_shuffle_depends_only_on_seed_and_epoch():
    a, b = EpochShuffle(10, seed=2), EpochShuffle(10, seed=2)
    b.use_epoch(1)
    b.use_epoch(0)
    assert list(a) == list(b) and sorted(a) == list(range(10))
    a.use_epoch(1)
    assert list(a) != list(b)


def test_resumed_run_equals_uninterrupted(tmp_path):
    whole = _model()
    fit(whole, _mse, _data(), CFG, run_dir=tmp_path / "whole")
    first = fit(_model(), _mse, _data(), replace(CFG, stop_after_steps=7), run_dir=tmp_path / "cut")
    assert (first.step, first.finished) == (7, False)
    resumed_model = _model(seed=123)  # different init: the checkpoint must restore everything
    rest = fit(resumed_model, _mse, _data(), CFG, run_dir=tmp_path / "cut")
    assert rest.resumed_from == 7 and rest.finished and rest.step == 15
    for p, q in zip(whole.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_cosine_schedule_matches_a_plain_loop():
    """fit with full-batch steps equals a hand-written AdamW loop with the cosine formula."""
    data = _data(16)
    cfg = TrainConfig(epochs=5, batch_size=16, lr=0.05, warmup_ratio=0.0, max_grad_norm=None, weight_decay=0.0,
                      device="cpu", progress=False)
    trained = _model(dropout=0.0)
    fit(trained, _mse, data, cfg)
    manual = _model(dropout=0.0)
    opt = torch.optim.AdamW(manual.parameters(), lr=cfg.lr, weight_decay=0.0)
    x, y = data.tensors
    for t in range(5):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * t / 5))
        loss = torch.nn.functional.mse_loss(manual(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p, q in zip(trained.parameters(), manual.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_checkpoint_with_other_config_is_refused(tmp_path):
    fit(_model(), _mse, _data(), replace(CFG, stop_after_steps=2), run_dir=tmp_path)
    with pytest.raises(ValueError, match="another config"):
        fit(_model(), _mse, _data(), replace(CFG, lr=0.5), run_dir=tmp_path)
    restarted = fit(_model(), _mse, _data(), replace(CFG, lr=0.5), run_dir=tmp_path, resume=False)
    assert restarted.resumed_from == 0 and restarted.finished


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    fit(_model(), _mse, _data(), replace(CFG, stop_after_steps=4), run_dir=tmp_path)
    import medvqa.core as core

    def crash(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(core.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), _mse, _data(), replace(CFG, stop_after_steps=8), run_dir=tmp_path)
    monkeypatch.undo()
    assert core.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_failures_are_clear():
    with pytest.raises(ValueError, match="empty"):
        fit(_model(), _mse, TensorDataset(torch.zeros(0, 3)), CFG)
    with pytest.raises(FloatingPointError, match="step 1"):
        fit(_model(), lambda m, b: torch.tensor(float("nan"), requires_grad=True), _data(), CFG)
    frozen = _model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        fit(frozen, _mse, _data(), CFG)


def test_loss_fn_may_return_extra_logs_and_eval_runs_each_epoch():
    result = fit(_model(), lambda m, b: (_mse(m, b), {"half": 0.5}), _data(), CFG,
                 eval_fn=lambda m: {"score": 1.0})
    assert all(r["half"] == 0.5 for r in result.history if "loss" in r)
    assert [r["epoch"] for r in result.history if "eval_score" in r] == [0, 1, 2]


def test_run_folder_names_a_run_by_everything_that_decides_it(tmp_path):
    from medvqa.training import run_folder
    folder = run_folder(tmp_path, "w/o mixup", CFG, _model(0), questions=["q1", "q2"], weight=0.5)
    assert folder.parent == tmp_path and folder.name.startswith("w_o_mixup-")
    assert folder == run_folder(tmp_path, "w/o mixup", replace(CFG, progress=True, device="cuda"), _model(0),
                                questions=["q1", "q2"], weight=0.5)  # neither progress bars nor devices change a run
    variants = [run_folder(tmp_path, "w/o mixup", CFG, _model(1), questions=["q1", "q2"], weight=0.5),
                run_folder(tmp_path, "w/o mixup", replace(CFG, epochs=4), _model(0), questions=["q1", "q2"], weight=0.5),
                run_folder(tmp_path, "w/o mixup", CFG, _model(0), questions=["q1"], weight=0.5),
                run_folder(tmp_path, "w/o mixup", CFG, _model(0), questions=["q1", "q2"], weight=0.25),
                run_folder(tmp_path, "full", CFG, _model(0), questions=["q1", "q2"], weight=0.5)]
    assert len({folder, *variants}) == 6


def test_a_rerun_in_its_run_folder_resumes_instead_of_starting_over(tmp_path):
    from medvqa.training import run_folder
    whole = fit(_model(0), _mse, _data(), CFG, run_dir=tmp_path / "whole")
    folder = run_folder(tmp_path, "variant", CFG, _model(0), questions=40)
    part = fit(_model(0), _mse, _data(), replace(CFG, stop_after_steps=7), run_dir=folder)  # the notebook is interrupted
    assert not part.finished
    again = run_folder(tmp_path, "variant", CFG, _model(0), questions=40)  # the re-run builds the same start
    assert again == folder
    rest = fit(_model(0), _mse, _data(), CFG, run_dir=again)
    assert rest.resumed_from == 7 and [r["loss"] for r in rest.history] == [r["loss"] for r in whole.history]
    done = fit(_model(0), _mse, _data(), CFG, run_dir=again)  # a finished run is not trained again
    assert done.resumed_from == done.step == whole.step


def test_weights_fingerprint_sees_names_shapes_and_values():
    from medvqa.training import weights_fingerprint
    a, b = torch.nn.Linear(300, 300), torch.nn.Linear(300, 300)
    assert weights_fingerprint(a) != weights_fingerprint(b)
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.weight[0, 0] += 1.0  # element 0 is always among the subsampled values
    assert weights_fingerprint(a, max_values=1000) != weights_fingerprint(b, max_values=1000)
    assert weights_fingerprint(torch.nn.Linear(2, 3)) != weights_fingerprint(torch.nn.Linear(3, 2))
