"""Tests of medvqa.core: parameter checks, profiles, seeding, devices, atomic files, checkpoints, metrics."""
import json
import multiprocessing
import os
import time
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from medvqa import core


def test_check_choice_and_range():
    assert core.check_choice("profile", "full", core.PROFILES) == "full"
    with pytest.raises(ValueError, match="'smoke', 'cpu', 'full'"):
        core.check_choice("profile", "gpu", core.PROFILES)
    assert core.check_range("x", 0.0, 0, 1, high_inclusive=False) == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        core.check_range("x", 1.0, 0, 1, high_inclusive=False)


def test_profiles_load_and_reject(tmp_path, monkeypatch):
    values = {p: core.load_profile(p) for p in core.PROFILES}
    assert {v["profile"] for v in values.values()} == set(core.PROFILES)
    assert len({tuple(sorted(v)) for v in values.values()}) == 1, "all profiles must set the same keys"
    with pytest.raises(ValueError, match="valid choices"):
        core.load_profile("laptop")
    (tmp_path / "nested.yaml").write_text("profile: nested\nmodel:\n  size: 3\n")
    (tmp_path / "liar.yaml").write_text("profile: smoke\n")
    monkeypatch.setattr(core, "profiles_dir", lambda: tmp_path)
    with pytest.raises(ValueError, match="flat mapping"):
        core.load_profile("nested")
    with pytest.raises(ValueError, match="must be 'liar'"):
        core.load_profile("liar")


def test_seed_everything_repeats_all_generators():
    core.seed_everything(11)
    first = (random.random(), np.random.rand(), torch.rand(3))
    core.seed_everything(11)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_pick_device():
    assert core.pick_device("cpu").type == "cpu"
    assert core.pick_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available"):
            core.pick_device("cuda")
    with pytest.raises(ValueError, match="valid choices"):
        core.pick_device("tpu")


def test_paths_follow_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVQA_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("MEDVQA_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("MEDVQA_RUNS", str(tmp_path / "r"))
    assert core.data_root() == tmp_path / "d"
    assert core.cache_root() == tmp_path / "c" and (tmp_path / "c").is_dir()
    assert core.run_dir("01_data", "cpu") == tmp_path / "r" / "cpu" / "01_data"


def test_atomic_path_keeps_old_content_on_failure(tmp_path):
    target = core.write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(RuntimeError):
        with core.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_to_builtin_converts_numbers_and_nan():
    out = core.to_builtin({"a": np.float32(1.5), "b": torch.tensor([1, 2]), "c": float("nan"), 3: (np.int64(4),)})
    assert out == {"a": 1.5, "b": [1, 2], "c": None, "3": [4]}


def test_checkpoint_roundtrip_and_rng(tmp_path):
    model = torch.nn.Linear(4, 2)
    core.seed_everything(0)
    path = core.save_checkpoint(tmp_path / "c.pt", step=5, config={"lr": 0.1}, model=model.state_dict())
    expected = (random.random(), np.random.rand(), torch.rand(2))
    state = core.load_checkpoint(path)
    assert state["step"] == 5 and state["config"] == {"lr": 0.1}
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    core.set_rng_state(state["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_loading_is_weights_only(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": _Evil()}, path)
    with pytest.raises(RuntimeError, match="evil.pt"):
        core.load_checkpoint(path)
    assert "this must never run" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        core.load_checkpoint(tmp_path / "missing.pt")


def test_metrics_writer(tmp_path):
    writer = core.MetricsWriter(tmp_path / "x" / "m.json", chapter="c", profile="smoke")
    writer.update(acc=np.float64(0.5)).record_model("lm", {"name": "m"}).add_result("CMDPI", "slake", "overall_accuracy", 50.0)
    writer.log(3, loss=torch.tensor(1.25))
    data = json.loads(writer.save().read_text())
    assert data["metrics"] == {"acc": 0.5} and data["history"] == [{"step": 3, "loss": 1.25}]
    assert data["results"][0]["metric"] == "overall_accuracy" and data["models"]["lm"]["name"] == "m"
    assert core.metrics_file("", "c", "smoke").name == "metrics.json"


def test_atomic_folder_replaces_only_on_success(tmp_path):
    target = tmp_path / "ds"
    with core.atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with core.atomic_folder(target) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no .partial left behind


def test_atomic_folder_gives_each_writer_its_own_temporary_folder(tmp_path):
    with core.atomic_folder(tmp_path / "ds") as first, core.atomic_folder(tmp_path / "ds") as second:
        assert first != second and first.parent == second.parent == tmp_path
        (first / "a.txt").write_text("first")
        (second / "b.txt").write_text("second")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["a.txt"]  # the last writer to finish wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def _slow_counted_build(folder: Path) -> None:
    with open(folder.parent / "builds.log", "a") as log:
        log.write(f"{os.getpid()}\n")
    with core.atomic_folder(folder) as tmp:
        time.sleep(0.5)  # the other process arrives while this one builds
        (tmp / "part.txt").write_text("part")
        (tmp / "ready.txt").write_text("ready")


def _ask_for_folder(folder: Path, results) -> None:
    built = core.build_once(folder, "ready.txt", _slow_counted_build)
    results.put(sorted(p.name for p in built.iterdir()))


def test_build_once_builds_once_when_processes_ask_at_once(tmp_path):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_ask_for_folder, args=(tmp_path / "cached", results)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert [results.get(timeout=5) for _ in workers] == [["part.txt", "ready.txt"]] * 3
    assert len((tmp_path / "builds.log").read_text().split()) == 1  # one process built it, the others waited and read it


def test_build_once_removes_what_a_killed_builder_left(tmp_path):
    stale = tmp_path / ".cached.abc123.partial"
    stale.mkdir()
    (stale / "half.txt").write_text("half")
    core.build_once(tmp_path / "cached", "ready.txt", _slow_counted_build)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builds.log", "cached", "cached.lock"]


def test_build_once_fails_when_the_builder_leaves_no_ready_file(tmp_path):
    with pytest.raises(RuntimeError, match="left no ready.txt"):
        core.build_once(tmp_path / "cached", "ready.txt", lambda folder: folder.mkdir())


def test_cpu_attention_kernel_computes_plain_attention():
    q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with core.cpu_attention_kernel("cpu"):
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(plain, reference, atol=1e-5, rtol=1e-5)
    from contextlib import nullcontext
    assert isinstance(core.cpu_attention_kernel("cuda"), nullcontext)  # elsewhere PyTorch chooses
