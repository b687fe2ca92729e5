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

    def crash(obj, f, *a, **k):  # Ctrl-C half-way through writing the checkpoint's payload
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(core.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), _mse, _data(), replace(CFG, stop_after_steps=8), run_dir=tmp_path)
    monkeypatch.undo()
    assert core.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-1] + bytes([raw[-1] ^ 0xFF]), "SHA-256 mismatch"),  # a flipped byte (the zip still intact)
    (lambda raw: raw[: len(raw) // 2], "truncated"),
    (lambda raw: b"PK\x03\x04 a foreign zip", "not a medvqa checkpoint"),
])
def test_a_damaged_checkpoint_is_never_resumed(tmp_path, damage, message):
    """Flipped bytes, a truncated file or a foreign file: `fit` stops with the file, what failed and the fix."""
    fit(_model(), _mse, _data(), replace(CFG, stop_after_steps=4), run_dir=tmp_path)
    path = tmp_path / "checkpoint.pt"
    raw = path.read_bytes()
    flipped = bytearray(raw)
    for k in range(len(raw) - 4000, len(raw) - 3000, 250):  # 4 bytes inside the tensor data, the zip's index untouched
        flipped[k] ^= 0xFF
    path.write_bytes(bytes(flipped) if message == "SHA-256 mismatch" else damage(raw))
    with pytest.raises(RuntimeError, match=message) as error:
        fit(_model(), _mse, _data(), CFG, run_dir=tmp_path)
    assert str(path) in str(error.value) and "resume=False" in str(error.value)
    assert "weights_only=False" not in str(error.value)


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


# --- GPU-ready training: trained-only checkpoints, accumulation, mixed precision, checkpointing, several processes ---

class _FrozenBase(torch.nn.Module):
    """A large frozen body with a BatchNorm (buffers that change in training) and a small trained head."""

    def __init__(self, seed=0, width=256):
        super().__init__()
        seed_everything(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU())
        self.body[0].requires_grad_(False)
        self.body[1].weight.requires_grad_(False)
        self.body[1].bias.requires_grad_(False)
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.body(x))


def test_checkpoint_keeps_trained_parameters_and_buffers_only(tmp_path):
    from medvqa.core import load_checkpoint
    model = _FrozenBase()
    fit(model, _mse, _data(), CFG, run_dir=tmp_path)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(saved["model"]) == {"head.weight", "head.bias", "body.1.running_mean", "body.1.running_var",
                                   "body.1.num_batches_tracked"}
    assert saved["config"]["frozen"]["parameters"] == 4  # body.0.weight/bias, body.1.weight/bias: named, not copied
    assert torch.equal(saved["model"]["head.weight"], model.head.weight.detach())


def test_trained_only_checkpoint_resumes_exactly_and_refuses_another_base(tmp_path):
    whole = _FrozenBase()
    fit(whole, _mse, _data(), CFG, run_dir=tmp_path / "whole")
    fit(_FrozenBase(), _mse, _data(), replace(CFG, stop_after_steps=6), run_dir=tmp_path / "cut")
    resumed = _FrozenBase()
    resumed.head.reset_parameters()  # another head: it must come from the checkpoint; the base is the same
    rest = fit(resumed, _mse, _data(), CFG, run_dir=tmp_path / "cut")
    assert rest.resumed_from == 6
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="other frozen weights"):
        fit(_FrozenBase(seed=5), _mse, _data(), CFG, run_dir=tmp_path / "cut")


def test_accumulated_steps_equal_one_large_batch():
    """4 micro-batches of 8 per step = one batch of 32: same losses, same weights (no dropout)."""
    data = _data(96)
    big, small = _model(dropout=0.0), _model(dropout=0.0)
    a = fit(big, _mse, data, replace(CFG, batch_size=32))
    b = fit(small, _mse, data, replace(CFG, batch_size=8, accumulate=4))
    assert a.step == b.step == 9
    assert [r["loss"] for r in a.history] == pytest.approx([r["loss"] for r in b.history], rel=1e-5)
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_accumulated_run_resumes_exactly(tmp_path):
    """40 samples, micro-batches of 8, 2 per step: 3 steps an epoch, the last of one micro-batch."""
    cfg = replace(CFG, accumulate=2)
    whole = _model()
    done = fit(whole, _mse, _data(), cfg)
    assert done.step == 9
    fit(_model(), _mse, _data(), replace(cfg, stop_after_steps=4), run_dir=tmp_path)
    resumed = _model(seed=9)
    rest = fit(resumed, _mse, _data(), cfg, run_dir=tmp_path)
    assert [r["loss"] for r in rest.history] == [r["loss"] for r in done.history]
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_bf16_autocast_runs_on_cpu():
    seen = []

    def loss_fn(model, batch):
        x, y = batch
        hidden = model[0](x)  # inside autocast: a bf16 matmul
        seen.append(hidden.dtype)
        return torch.nn.functional.mse_loss(model[3](model[2](model[1](hidden))).float(), y)

    run = fit(_model(), loss_fn, _data(), replace(CFG, epochs=20, mixed_precision="bf16"))
    assert set(seen) == {torch.bfloat16}
    assert run.history[-1]["loss"] < 0.5 * run.history[0]["loss"]
    fit(_model(), _mse, _data(), CFG)  # a later fp32 run in the same process is not stuck in bf16
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")


def test_gradient_checkpointing_gives_the_same_training():
    from lm_helpers import tiny_lm
    ids = torch.randint(3, 64, (24, 12), generator=torch.Generator().manual_seed(0))
    data = TensorDataset(ids)
    lm_loss = lambda m, b: m(input_ids=b[0], labels=b[0]).loss
    runs = []
    for checkpointing in (False, True):
        lm = tiny_lm()
        run = fit(lm, lm_loss, data, replace(CFG, epochs=1, gradient_checkpointing=checkpointing))
        runs.append([r["loss"] for r in run.history])
        assert lm.model.gradient_checkpointing == checkpointing
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    with pytest.raises(ValueError, match="no Hugging Face module"):
        fit(_model(), _mse, _data(), replace(CFG, gradient_checkpointing=True))


def test_two_processes_log_what_one_process_with_the_global_batch_logs(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU (gloo), 8 samples each = one process with batches of 16."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    import multiprocess_fit
    here = Path(__file__).parent
    out = tmp_path / "two.json"
    env = {**os.environ, "PYTHONPATH": f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    # --multi_gpu selects accelerate's torchrun launcher; fit's Accelerator(cpu=True) then joins a gloo process group
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    done = subprocess.run(launcher + [str(here / "multiprocess_fit.py"), str(out), str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["processes"] == 2
    one_history, one_model = multiprocess_fit.run(batch_size=16)
    assert len(two["history"]) == len(one_history) == 12
    assert [r["loss"] for r in two["history"]] == pytest.approx([r["loss"] for r in one_history], rel=1e-5)
    for p, q in zip(one_model.parameters(), two["weights"]):
        assert p.detach().reshape(-1).tolist() == pytest.approx(q, rel=1e-4, abs=1e-6)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_frozen_parameters_that_move_during_training_are_checkpointed(tmp_path):
    """A momentum (EMA) copy has requires_grad=False but changes: a resumed run must restore it."""
    class WithMomentum(torch.nn.Module):
        def __init__(self):
            super().__init__()
            seed_everything(0)
            self.online, self.momentum = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
            self.momentum.requires_grad_(False)

    def loss_fn(model, batch):
        x, y = batch
        with torch.no_grad():
            for m, o in zip(model.momentum.parameters(), model.online.parameters()):
                m.mul_(0.9).add_(0.1 * o)
        return torch.nn.functional.mse_loss(model.online(x) + model.momentum(x), y)

    whole = WithMomentum()
    fit(whole, loss_fn, _data(), CFG)
    fit(WithMomentum(), loss_fn, _data(), replace(CFG, stop_after_steps=7), run_dir=tmp_path)
    resumed = WithMomentum()
    fit(resumed, loss_fn, _data(), CFG, run_dir=tmp_path)
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
