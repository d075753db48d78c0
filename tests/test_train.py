"""Training engine: run directory, exact resume (also after kill -9), divergence, safety of
files and checkpoints, evaluate/compare, presets and the CLI."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import hetconv
from hetconv.cli import main
from hetconv.train import (PRESETS, CheckpointError, NonFiniteLossError, RunDirExistsError,
                           TrainConfig, compare, evaluate, fit, load_checkpoint,
                           load_model_state, resolve_config)
from hetconv.train.checkpoint import atomic_write
from hetconv.train.metrics import TIMING_KEYS, topk_correct
from synthetic_data import write_fashion_mnist

TINY_VGG = dict(model_kwargs={"width": 0.0625})  # 4..32 channels: fast on CPU


class Tiny(nn.Module):
    """A few thousand parameters, with BN and dropout (buffers and RNG in play)."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_chans, 6, 3, 2, 1), nn.BatchNorm2d(6),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                      nn.Dropout(0.3))
        self.head = nn.Linear(96, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def fresh(cls=None, *args):
    """A model initialised the same way every time (its init draws from torch's RNG)."""
    torch.manual_seed(0)
    return (cls or Tiny)(*args)


class NaNAfter(Tiny):
    """Returns NaN logits from the ``n``-th training forward pass on."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.n:
                out = out * float("nan")
        return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=64, n_test=32))


def tiny_config(data_dir, out, **kw):
    values = dict(model="tiny", data="fashion-mnist", data_dir=data_dir, out=str(out),
                  epochs=2, batch_size=16, lr=0.05, schedule="step", lr_step=1, lr_gamma=0.5,
                  workers=0, seed=1)
    values.update(kw)
    return resolve_config(**values)


def model_tensors(path):
    return load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def metrics(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


# --------------------------------------------------------------------------- run directory

def test_run_directory_contents(tmp_path, data_dir):
    summary = fit(tiny_config(data_dir, tmp_path, name="r"), model=fresh())
    run = tmp_path / "r"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "config.json", "metrics.csv", "metrics.jsonl", "summary.json", "train.log"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["lr"] == 0.05 and saved["dataset"]["train_images"] == 64
    records = metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["lr"] for r in records] == [0.05, 0.025]  # step schedule, halved each epoch
    assert all(r["val_images"] == 32 for r in records)
    csv_lines = (run / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,lr,train_loss") and len(csv_lines) == 3
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    tiny = Tiny()
    assert summary["params"] == sum(p.numel() for p in tiny.parameters())
    assert summary["macs"] == hetconv.profile(tiny, (1, 32, 32)).macs
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["epoch"] == summary["best"]["epoch"]
    assert best["metrics"]["val_top1"] == max(r["val_top1"] for r in records)
    assert "epoch 2/2" in (run / "train.log").read_text()


def test_never_overwrites_without_force(tmp_path, data_dir):
    config = tiny_config(data_dir, tmp_path, name="r", epochs=1)
    fit(config, model=fresh())
    before = (tmp_path / "r" / "metrics.jsonl").read_bytes()
    with pytest.raises(RunDirExistsError, match="--force"):
        fit(config, model=fresh())
    assert (tmp_path / "r" / "metrics.jsonl").read_bytes() == before
    fit(tiny_config(data_dir, tmp_path, name="r", epochs=1, lr=0.01), model=fresh(), force=True)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["lr"] == 0.01


# --------------------------------------------------------------------------- exact resume

@pytest.mark.parametrize("workers", [0, 1])
def test_resume_is_exact(tmp_path, data_dir, workers):
    """2 epochs straight == 1 epoch + resume to 2 (augmentation and dropout included)."""
    kw = dict(augment=True, workers=workers)
    fit(tiny_config(data_dir, tmp_path, name="straight", **kw), model=fresh())
    fit(tiny_config(data_dir, tmp_path, name="split", epochs=1, **kw), model=fresh())
    assert len(metrics(tmp_path / "split")) == 1
    fit(tiny_config(data_dir, tmp_path, name="split", **kw), model=fresh(),
        resume=tmp_path / "split")
    assert_same_weights(model_tensors(tmp_path / "straight"), model_tensors(tmp_path / "split"))
    assert metrics(tmp_path / "straight") == metrics(tmp_path / "split")
    a = load_checkpoint(tmp_path / "straight")
    b = load_checkpoint(tmp_path / "split")
    for key in ("momentum_buffer",):
        for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
            assert torch.equal(pa[key], pb[key])
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def _cli_train(data_dir, out, name, *extra):
    return [sys.executable, "-m", "hetconv", "train", "--model", "vgg16_cifar_p4", "--width",
            "0.0625", "--data-dir", data_dir, "--out", str(out), "--name", name, "--epochs", "6",
            "--batch-size", "16", "--lr", "0.05", "--workers", "0", "--seed", "3", *extra]


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path, data_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.Popen(_cli_train(data_dir, tmp_path, "ref"), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    victim = subprocess.Popen(_cli_train(data_dir, tmp_path, "victim"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "victim" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert last.exists(), "no checkpoint within 5 minutes"
    assert victim.poll() is None, "the run finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "victim" / "summary.json").exists()
    assert load_checkpoint(last)["epoch"] < 6
    resumed = subprocess.run([sys.executable, "-m", "hetconv", "train", "--resume",
                              str(tmp_path / "victim")], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    assert_same_weights(model_tensors(tmp_path / "ref"), model_tensors(tmp_path / "victim"))
    assert metrics(tmp_path / "ref") == metrics(tmp_path / "victim")
    assert [r["epoch"] for r in metrics(tmp_path / "victim")] == list(range(1, 7))
    assert not list((tmp_path / "victim").glob("**/.*.tmp"))


def test_channels_last_and_bf16_autocast_train(tmp_path, data_dir):
    summary = fit(tiny_config(data_dir, tmp_path, name="fast", epochs=1, channels_last=True,
                              amp="bf16", limit_train_batches=2), model=fresh())
    records = metrics(tmp_path / "fast")
    assert records[0]["val_images"] == 32 and 0 <= summary["val_top1"] <= 100
    assert all(torch.isfinite(t).all() for t in model_tensors(tmp_path / "fast").values()
               if t.is_floating_point())


# --------------------------------------------------------------------------- failures

def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
    steps_per_epoch = 64 // 16
    with pytest.raises(NonFiniteLossError, match="epoch 2, batch 3"):
        fit(tiny_config(data_dir, tmp_path, name="nan", epochs=3),
            model=fresh(NaNAfter, steps_per_epoch + 3))
    run = tmp_path / "nan"
    ckpt = load_checkpoint(run)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and "non-finite" in summary["error"]
    assert len(metrics(run)) == 1
    # The same one epoch without the fault gives the same checkpoint: it is the good one.
    one = tiny_config(data_dir, tmp_path, name="one", epochs=1)
    fit(one, model=fresh())
    assert_same_weights(ckpt["model"], model_tensors(tmp_path / "one"))


def test_absurd_learning_rate_diverges_with_message(tmp_path, data_dir, capsys):
    code = main(["train", "--model", "vgg16_cifar_p4", "--width", "0.0625", "--data-dir",
                 data_dir, "--out", str(tmp_path), "--name", "boom", "--epochs", "3",
                 "--batch-size", "16", "--lr", "1e30", "--workers", "0"])
    assert code == 1
    assert "non-finite loss" in capsys.readouterr().err
    assert json.loads((tmp_path / "boom" / "summary.json").read_text())["status"] == "diverged"


def test_corrupt_and_unsafe_checkpoints(tmp_path, data_dir):
    fit(tiny_config(data_dir, tmp_path, name="r", epochs=1), model=fresh())
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    good = last.read_bytes()
    last.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        fit(tiny_config(data_dir, tmp_path, name="r"), model=fresh(), resume=tmp_path / "r")
    last.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(last)
    torch.save({"format": "hetconv-checkpoint", "version": 1, "model": {}, "config": {},
                "epoch": 1, "payload": Tiny()}, last)  # a pickled module: code, refused
    with pytest.raises(CheckpointError, match="unsafe|corrupt"):
        load_checkpoint(last)
    torch.save({"model": {}}, last)
    with pytest.raises(CheckpointError, match="not a hetconv checkpoint"):
        load_checkpoint(last)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    last.unlink()  # killed during the first epoch: nothing to resume from
    with pytest.raises(CheckpointError, match="no complete checkpoint.*--force"):
        fit(tiny_config(data_dir, tmp_path, name="r"), model=fresh(), resume=tmp_path / "r")


def test_mismatched_checkpoint(tmp_path, data_dir):
    base = dict(data_dir=data_dir, out=str(tmp_path), epochs=1, batch_size=16, workers=0,
                **TINY_VGG)
    fit(resolve_config(model="vgg16_cifar_p4", name="p4", **base))
    ckpt = load_checkpoint(tmp_path / "p4")
    other = hetconv.create_model("vgg16_cifar_p2", num_classes=10, in_chans=1, width=0.0625)
    with pytest.raises(CheckpointError, match="vgg16_cifar_p4.*does not match.*shape"):
        load_model_state(other, ckpt, "vgg16_cifar_p2")
    with pytest.raises(CheckpointError, match="model: checkpoint 'vgg16_cifar_p4' vs now "
                                              "'vgg16_cifar_p2'"):
        fit(resolve_config(model="vgg16_cifar_p2", name="p4", **{**base, "epochs": 2}),
            resume=tmp_path / "p4")
    with pytest.raises(CheckpointError, match="lr"):
        fit(resolve_config(model="vgg16_cifar_p4", name="p4", lr=0.5, **{**base, "epochs": 2}),
            resume=tmp_path / "p4")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write(target, b"old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


# --------------------------------------------------------------------------- evaluate, compare

def test_evaluate_and_compare(tmp_path, data_dir):
    base = dict(data_dir=data_dir, out=str(tmp_path), epochs=1, batch_size=16, workers=0,
                **TINY_VGG)
    s4 = fit(resolve_config(model="vgg16_cifar_p4", name="p4", **base))
    s1 = fit(resolve_config(model="vgg16_cifar", name="dense", **base))
    result = evaluate(tmp_path / "p4", batch_size=8)
    # Independent recomputation of the accuracy on the 32 validation images.
    from hetconv.data import build_datasets

    _, val, _ = build_datasets("fashion-mnist", data_dir, augment=False)
    model = hetconv.create_model("vgg16_cifar_p4", num_classes=10, in_chans=1, width=0.0625)
    model.load_state_dict(load_checkpoint(tmp_path / "p4")["model"])
    model.eval()
    with torch.no_grad():
        x = torch.stack([val[i][0] for i in range(len(val))])
        y = torch.tensor([val[i][1] for i in range(len(val))])
        logits = model(x)
    assert result["images"] == 32
    assert result["top1"] == pytest.approx(100.0 * (logits.argmax(1) == y).float().mean().item())
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    assert result["top5"] == pytest.approx(100.0 * top5)
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(),
                                           rel=1e-5)
    assert result["top1"] == pytest.approx(s4["val_top1"])
    macs4 = hetconv.profile(model, (1, 32, 32)).macs
    dense = hetconv.create_model("vgg16_cifar", num_classes=10, in_chans=1, width=0.0625)
    macs1 = hetconv.profile(dense, (1, 32, 32)).macs
    assert result["macs"] == macs4 and s1["macs"] == macs1 and macs4 < macs1
    assert result["images_per_s"] > 0
    rows = compare([tmp_path / "dense", tmp_path / "p4"])
    by_run = {r["run"]: r for r in rows}
    assert by_run["dense"]["macs_reduction"] == 0.0
    assert by_run["p4"]["part"] == 4 and by_run["dense"]["part"] == 1
    assert by_run["p4"]["macs_reduction"] == pytest.approx(100 * (1 - macs4 / macs1))
    params1 = sum(p.numel() for p in dense.parameters())
    params4 = sum(p.numel() for p in model.parameters())
    assert by_run["p4"]["params_reduction"] == pytest.approx(100 * (1 - params4 / params1))
    with pytest.raises(FileNotFoundError, match="summary.json"):
        compare([tmp_path])


def test_cli_train_evaluate_compare_resume(tmp_path, data_dir, capsys):
    args = ["train", "--model", "vgg16_cifar_p4", "--width", "0.0625", "--data-dir", data_dir,
            "--out", str(tmp_path), "--name", "cli", "--epochs", "1", "--batch-size", "16",
            "--workers", "0", "--limit-train-batches", "2"]
    assert main(args) == 0
    assert "val top-1" in capsys.readouterr().out
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err
    run = str(tmp_path / "cli")
    assert main(["train", "--resume", run, "--lr", "0.3"]) == 1
    assert "cannot change: --lr" in capsys.readouterr().err
    assert main(["train", "--resume", run, "--epochs", "2"]) == 0
    assert len(metrics(run)) == 2
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["config"]["epochs"] == 2
    assert main(["train", "--resume", run]) == 0  # already complete: nothing more to do
    assert len(metrics(run)) == 2
    assert main(["evaluate", run, "--checkpoint", "best"]) == 0
    out = capsys.readouterr().out
    for word in ("top-1", "top-5", "loss", "MACs", "params", "images/s"):
        assert word in out
    png = tmp_path / "cmp.png"
    assert main(["compare", run, "--plot", str(png), "--json", str(tmp_path / "c.json")]) == 0
    assert "MACs red." in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "c.json").read_text())[0]["run"] == "cli"
    assert main(["evaluate", str(tmp_path / "nothing")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------- config, metrics

def test_presets_follow_the_paper():
    cifar = resolve_config("paper-cifar")
    assert (cifar.data, cifar.momentum, cifar.weight_decay, cifar.batch_size, cifar.lr,
            cifar.schedule, cifar.lr_step, cifar.lr_gamma) == ("cifar10", 0.9, 5e-4, 128, 0.1,
                                                               "step", 50, 0.1)
    imnet = resolve_config("paper-imagenet")
    assert (imnet.weight_decay, imnet.batch_size, imnet.lr, imnet.lr_step, imnet.epochs) == \
        (1e-4, 256, 0.1, 30, 90)
    quick = resolve_config("quick", lr=0.2, model_kwargs={"se": True})
    assert quick.lr == 0.2 and quick.model_kwargs == {"width": 0.25, "se": True}
    assert PRESETS["quick"]["model_kwargs"] == {"width": 0.25}  # presets are not mutated
    assert quick.preset == "quick"


@pytest.mark.parametrize("field, value, message", [
    ("lr", 0.0, "lr must be"), ("lr", float("nan"), "lr must be"), ("epochs", 0, "epochs"),
    ("batch_size", 2.5, "batch_size"), ("schedule", "poly", "schedule must be one of"),
    ("amp", "fp16", "amp must be one of"), ("name", "a/b", "name must be"),
    ("momentum", 1.5, "momentum"), ("preset", "nope", "preset must be one of"),
])
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown config field"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 2, 0])
    # row 0: top-1 hit; row 1: target ranked 3rd; row 2: target ranked 3rd
    assert topk_correct(logits, targets, (1, 2, 5)) == [1, 1, 3]


class TinyHet(nn.Module):
    """A HetConv net without dropout, so eager and compiled training draw the same numbers."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_chans, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                 hetconv.HetConv2d(8, 8, 3, part=4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.net(x)


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path, data_dir):
    """--compile changes how the step runs, not what it computes (close, not bit-equal)."""
    common = dict(epochs=1, limit_train_batches=3, augment=False)
    eager = fit(tiny_config(data_dir, tmp_path, name="eager", **common), model=fresh(TinyHet))
    compiled = fit(tiny_config(data_dir, tmp_path, name="compiled", compile=True, **common),
                   model=fresh(TinyHet))
    a, b = model_tensors(tmp_path / "eager"), model_tensors(tmp_path / "compiled")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4), k
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-3)


class TinyShifted(nn.Module):
    """Stem conv + BN feeding two shifted HetConv layers: every permutation can be absorbed."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_chans, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                 hetconv.HetConv2d(8, 8, 3, part=4), nn.BatchNorm2d(8), nn.ReLU(),
                                 hetconv.HetConv2d(8, 8, 3, part=4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.net(x)


def test_absorb_permutations_trains_the_same_model(tmp_path, data_dir, caplog):
    """--absorb-permutations changes how the forward runs, not the parameters or checkpoints;
    a run may switch it on when resumed."""
    common = dict(epochs=2, limit_train_batches=3, augment=False)
    plain = fit(tiny_config(data_dir, tmp_path, name="plain", **common), model=fresh(TinyShifted))
    with caplog.at_level("INFO", logger="hetconv.train"):
        absorbed = fit(tiny_config(data_dir, tmp_path, name="absorbed", absorb_permutations=True,
                                   **common), model=fresh(TinyShifted))
    assert "absorbed the channel permutations of 2 shifted HetConv layer(s); 1 gather(s)" \
        in caplog.text  # the one before Flatten
    fit(tiny_config(data_dir, tmp_path, name="switched", **dict(common, epochs=1)),
        model=fresh(TinyShifted))
    switched = fit(tiny_config(data_dir, tmp_path, name="switched", absorb_permutations=True,
                               **common), model=fresh(TinyShifted), resume=tmp_path / "switched")
    a = model_tensors(tmp_path / "plain")
    for run, result in (("absorbed", absorbed), ("switched", switched)):
        b = model_tensors(tmp_path / run)
        assert a.keys() == b.keys()
        for k in a:
            if a[k].is_floating_point():
                assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4), (run, k)
            else:
                assert torch.equal(a[k], b[k]), (run, k)
        assert result["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-3)


def test_absorb_permutations_config_is_validated(tmp_path, data_dir):
    with pytest.raises(TypeError, match="absorb_permutations"):
        tiny_config(data_dir, tmp_path, absorb_permutations="yes")


class TinyBlocked(TinyHet):
    """TinyHet with the blocked pattern: nothing for absorb_permutations to do."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10):
        super().__init__(in_chans, num_classes)
        self.net[3] = hetconv.HetConv2d(8, 8, 3, part=4, pattern="blocked")


def test_absorb_permutations_without_shifted_layers_keeps_the_model(tmp_path, data_dir, caplog):
    common = dict(epochs=1, limit_train_batches=2, augment=False)
    with caplog.at_level("INFO", logger="hetconv.train"):
        result = fit(tiny_config(data_dir, tmp_path, name="noshift", absorb_permutations=True,
                                 **common), model=fresh(TinyBlocked))
    assert "no shifted HetConv layer, model kept as it is" in caplog.text
    plain = fit(tiny_config(data_dir, tmp_path, name="plain", **common), model=fresh(TinyBlocked))
    assert result["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_compile_with_absorbed_permutations_trains_like_eager(tmp_path, data_dir):
    common = dict(epochs=1, limit_train_batches=3, augment=False)
    eager = fit(tiny_config(data_dir, tmp_path, name="eager", **common), model=fresh(TinyShifted))
    both = fit(tiny_config(data_dir, tmp_path, name="both", compile=True, absorb_permutations=True,
                           **common), model=fresh(TinyShifted))
    a, b = model_tensors(tmp_path / "eager"), model_tensors(tmp_path / "both")
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4), k
    assert both["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-3)


# --------------------------------------------------------------------------- schedule on resume

@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_extended_run_follows_the_schedule_of_its_new_epochs(tmp_path, data_dir, schedule):
    """Resumed with more epochs, the rate is that of the new total's schedule at each epoch
    (a cosine run used to restart its recursion at 0 and stay there)."""
    kw = dict(schedule=schedule, lr_step=2)
    fit(tiny_config(data_dir, tmp_path, name="ext", **kw), model=fresh())
    fit(tiny_config(data_dir, tmp_path, name="ext", epochs=4, **kw), model=fresh(),
        resume=tmp_path / "ext")
    lrs = [r["lr"] for r in metrics(tmp_path / "ext")]
    if schedule == "cosine":  # epochs 1-2 over 2 epochs, 3-4 over 4
        want = [0.05, 0.025] + [0.05 * (1 + math.cos(math.pi * e / 4)) / 2 for e in (2, 3)]
    else:  # halved every 2 epochs, whatever the total
        want = [0.05, 0.05, 0.025, 0.025]
    assert lrs == pytest.approx(want, rel=1e-12) and min(lrs) > 0
    assert load_checkpoint(tmp_path / "ext")["epoch"] == 4


class StopAt(Tiny):
    """Tiny that stops (as if killed) at its ``n``-th training forward pass."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls >= self.n:
                raise KeyboardInterrupt
        return super().forward(x)


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_interrupted_run_resumes_exactly_for_every_schedule(tmp_path, data_dir, schedule):
    """Not extended, a resumed run continues its schedule exactly (weights and metrics)."""
    kw = dict(schedule=schedule, epochs=3, lr_step=2)
    fit(tiny_config(data_dir, tmp_path, name="straight", **kw), model=fresh())
    with pytest.raises(KeyboardInterrupt):  # 4 batches per epoch: stops in epoch 2
        fit(tiny_config(data_dir, tmp_path, name="split", **kw), model=fresh(StopAt, 6))
    assert load_checkpoint(tmp_path / "split")["epoch"] == 1
    fit(tiny_config(data_dir, tmp_path, name="split", **kw), model=fresh(),
        resume=tmp_path / "split")
    assert metrics(tmp_path / "straight") == metrics(tmp_path / "split")
    assert_same_weights(model_tensors(tmp_path / "straight"), model_tensors(tmp_path / "split"))
    lrs = [r["lr"] for r in metrics(tmp_path / "split")]
    assert lrs == pytest.approx([0.05, 0.0375, 0.0125] if schedule == "cosine" else
                                [0.05, 0.05, 0.025], rel=1e-12)


# --------------------------------------------------------------------------- --force, --out

def test_force_replaces_only_run_directories(tmp_path, data_dir, capsys):
    mine = tmp_path / "notrun"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(RunDirExistsError, match=f"{mine} is not a hetconv run directory "
                                                f"\\(has no config.json\\)"):
        fit(tiny_config(data_dir, tmp_path, name="notrun", epochs=1), model=fresh(), force=True)
    assert (mine / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # A run directory holding a file hetconv did not write is not replaced either.
    fit(tiny_config(data_dir, tmp_path, name="r", epochs=1), model=fresh())
    (tmp_path / "r" / "analysis.ipynb").write_text("{}")
    with pytest.raises(RunDirExistsError, match="did not write: analysis.ipynb"):
        fit(tiny_config(data_dir, tmp_path, name="r", epochs=1), model=fresh(), force=True)
    assert (tmp_path / "r" / "analysis.ipynb").read_text() == "{}"
    (tmp_path / "r" / "analysis.ipynb").unlink()
    # ... nor one with a file of the user's among its checkpoints
    (tmp_path / "r" / "checkpoints" / "epoch7_keep.pt").write_bytes(b"mine")
    with pytest.raises(RunDirExistsError, match="did not write: checkpoints/epoch7_keep.pt"):
        fit(tiny_config(data_dir, tmp_path, name="r", epochs=1), model=fresh(), force=True)
    assert (tmp_path / "r" / "checkpoints" / "epoch7_keep.pt").read_bytes() == b"mine"
    (tmp_path / "r" / "checkpoints" / "epoch7_keep.pt").unlink()
    # a run directory that is a symbolic link: refused, the link and its target kept
    (tmp_path / "link").symlink_to(tmp_path / "r")
    with pytest.raises(RunDirExistsError, match="is a symbolic link"):
        fit(tiny_config(data_dir, tmp_path, name="link", epochs=1), model=fresh(), force=True)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "r" / "config.json").is_file()
    fit(tiny_config(data_dir, tmp_path, name="r", epochs=1, lr=0.01), model=fresh(), force=True)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"]["lr"] == 0.01
    (tmp_path / "empty").mkdir()
    fit(tiny_config(data_dir, tmp_path, name="empty", epochs=1), model=fresh(), force=True)
    assert (tmp_path / "empty" / "summary.json").is_file()
    args = ["train", "--model", "vgg16_cifar_p4", "--width", "0.0625", "--data-dir", data_dir,
            "--out", str(tmp_path), "--name", "notrun", "--epochs", "1", "--force"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"error: {mine} is not a hetconv run directory" in err and "Traceback" not in err
    assert (mine / "notes.txt").read_text() == "precious"


def test_out_that_is_a_file_is_a_clear_error(tmp_path, data_dir, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        with pytest.raises(RunDirExistsError, match=f"{afile} exists and is not a directory"):
            fit(tiny_config(data_dir, out, name="r", epochs=1), model=fresh())
        assert main(["train", "--model", "vgg16_cifar_p4", "--width", "0.0625", "--data-dir",
                     data_dir, "--out", str(out), "--name", "r", "--epochs", "1"]) == 1
        err = capsys.readouterr().err
        assert f"{afile} exists and is not a directory (check --out)" in err
        assert "Traceback" not in err
    assert afile.read_text() == "x"


# --------------------------------------------------------------------------- CLI resume options

def test_resume_refuses_out_and_name_and_names_the_real_options(tmp_path, data_dir, capsys):
    fit(tiny_config(data_dir, tmp_path, name="a", epochs=1), model=fresh())
    run = str(tmp_path / "a")
    before = (tmp_path / "a" / "config.json").read_bytes()
    other = tmp_path / "elsewhere"
    assert main(["train", "--resume", run, "--name", "zzz", "--out", str(other)]) == 1
    err = capsys.readouterr().err
    assert f"--resume continues {run} in place; --out and --name cannot be given" in err
    assert main(["train", "--resume", run, "--name", "a"]) == 1
    assert "--name cannot be given" in capsys.readouterr().err
    assert not other.exists() and (tmp_path / "a" / "config.json").read_bytes() == before
    assert main(["train", "--resume", run, "--width", "0.5", "--model-arg", "se=true",
                 "--no-augment"]) == 1
    err = capsys.readouterr().err
    assert "cannot change: --no-augment, --width, --model-arg (allowed: --epochs, --workers, " \
           "--data-dir, --device, --eval-batch-size, --compile, --absorb-permutations)" in err
    assert "--model-kwargs" not in err and "--augment," not in err
    # The Python API refuses a config naming another directory, too.
    with pytest.raises(CheckpointError, match="name: checkpoint 'a' vs now 'zzz'"):
        fit(tiny_config(data_dir, tmp_path, name="zzz"), model=fresh(), resume=run)
    assert (tmp_path / "a" / "config.json").read_bytes() == before


# --------------------------------------------------------------------------- evaluate, compare errors

@pytest.fixture(scope="module")
def vgg_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs")
    fit(resolve_config(model="vgg16_cifar_p4", name="p4", data_dir=data_dir, out=str(out),
                       epochs=1, batch_size=16, workers=0, limit_train_batches=1, **TINY_VGG))
    return out / "p4"


def test_evaluate_rejects_a_bad_device_like_train(vgg_run, capsys):
    run = str(vgg_run)
    for device in ("banana", "meta", "cuda:x"):
        assert main(["evaluate", run, "--device", device]) == 1
        err = capsys.readouterr().err
        assert f"error: device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}" in err
        assert "Traceback" not in err
    if not torch.cuda.is_available():
        assert main(["evaluate", run, "--device", "cuda"]) == 1
        err = capsys.readouterr().err
        assert "error: device 'cuda' requested but CUDA is not available" in err
        assert "Traceback" not in err
    assert main(["evaluate", run, "--device", "auto", "--limit-batches", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] > 0 and result["device"] in ("cpu", "cuda")


def test_evaluate_optimized_scores_as_the_model_and_says_how_it_ran(vgg_run, capsys,
                                                                    monkeypatch):
    module = sys.modules["hetconv.train.evaluate"]
    real, calls = module.optimize_for_inference, []

    def spy(model, example):  # counts the optimized model's forward calls
        fast = real(model, example)
        fast.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
        return fast

    monkeypatch.setattr(module, "optimize_for_inference", spy)
    plain = evaluate(vgg_run, batch_size=8, limit_batches=2)
    assert calls == []
    fast = evaluate(vgg_run, batch_size=8, limit_batches=2, optimize=True)
    assert calls == [8, 8]  # the optimized model computed the metrics
    monkeypatch.undo()
    assert plain["optimized"] is None
    assert fast["images"] == plain["images"] == 16
    # the same model to float rounding (checked on the first batch): a near-tied image may
    # flip, no more than one of the 16
    assert abs(fast["top1"] - plain["top1"]) <= 100 / 16
    assert abs(fast["top5"] - plain["top5"]) <= 100 / 16
    assert fast["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-5)
    assert (fast["macs"], fast["params"]) == (plain["macs"], plain["params"])  # the model's
    plan = fast["optimized"]
    assert plan["memory_format"] in ("contiguous", "channels_last")
    # each of the 12 HetConv layers got a backend (the dense first convolution may too)
    assert sum(plan["backends"].values()) >= 12, plan
    assert main(["evaluate", str(vgg_run), "--optimize", "--limit-batches", "1",
                 "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "cpu, optimized)" in out and f"optimized {plan['memory_format']}; layers: " in out
    with pytest.raises(TypeError, match="optimize must be a bool"):
        evaluate(vgg_run, optimize="yes")
    # CPU only (no CUDA here: the device check is made to pass)
    monkeypatch.setattr(module, "_device", lambda d: torch.device("cuda", 0))
    with pytest.raises(ValueError, match="optimize runs on the CPU.*device='cuda'"):
        evaluate(vgg_run, optimize=True, device="cuda")


def test_evaluate_rejects_a_limit_below_one(vgg_run, capsys):
    for limit in ("0", "-1"):
        with pytest.raises(SystemExit) as exc:
            main(["evaluate", str(vgg_run), "--limit-batches", limit])
        assert exc.value.code == 2
        assert f"argument --limit-batches: must be an int >= 1, got '{limit}'" in \
            capsys.readouterr().err
    with pytest.raises(ValueError, match="limit_batches must be an int >= 1"):
        evaluate(vgg_run, limit_batches=0)


def test_evaluate_of_a_file_that_is_no_checkpoint_is_a_clear_error(tmp_path, capsys):
    passwd = tmp_path / "passwd"  # its first bytes make the unpickler raise IndexError
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/bin/sh\n")
    with pytest.raises(CheckpointError, match="corrupt or unsafe checkpoint"):
        load_checkpoint(passwd)
    assert main(["evaluate", str(passwd)]) == 1
    err = capsys.readouterr().err
    assert f"error: {passwd}: corrupt or unsafe checkpoint" in err and "Traceback" not in err


def test_compare_checks_its_output_paths_first(tmp_path, vgg_run, capsys):
    run = str(vgg_run)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for option, name in (("--json", "x.json"), ("--plot", "x.png")):
        target = str(afile / name)
        args = ["compare", run, option, target] + (["--plot", ""] if option == "--json" else [])
        assert main(args) == 1
        out, err = capsys.readouterr()
        assert f"error: {option} {target}: {afile} exists and is not a directory" in err
        assert "Traceback" not in err and "MACs red." not in out  # refused before the work
    assert main(["compare", run, "--plot", "", "--json", str(tmp_path)]) == 1
    assert f"--json {tmp_path}: is a directory" in capsys.readouterr().err


def test_compare_plot_has_the_format_of_its_extension(tmp_path, vgg_run, capsys):
    run = str(vgg_run)
    for name, magic in (("p.pdf", b"%PDF"), ("p.svg", b"<?xml"), ("p.png", b"\x89PNG"),
                        ("p", b"\x89PNG")):  # PNG without an extension
        assert main(["compare", run, "--plot", str(tmp_path / name)]) == 0
        assert f"plot: {tmp_path / name}" in capsys.readouterr().out
        assert (tmp_path / name).read_bytes().startswith(magic)
    assert main(["compare", run, "--plot", str(tmp_path / "p.txt")]) == 1
    out, err = capsys.readouterr()
    assert f"error: --plot {tmp_path / 'p.txt'}: cannot write a plot in format '.txt'" in err
    assert ".png" in err and ".pdf" in err and "MACs red." not in out
    assert not (tmp_path / "p.txt").exists()


def test_compare_default_plot_never_replaces_a_file(tmp_path, vgg_run, capsys, monkeypatch):
    """Without --plot, compare writes accuracy_vs_macs.png in the working directory, or the
    first free accuracy_vs_macs_<n>.png: an earlier plot (or any file of that name) stays."""
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "accuracy_vs_macs.png"
    mine.write_bytes(b"the user's own file")
    (tmp_path / "accuracy_vs_macs_2.png").mkdir()  # a directory of that name: skipped too
    assert main(["compare", str(vgg_run)]) == 0
    assert "plot: accuracy_vs_macs_3.png" in capsys.readouterr().out
    assert mine.read_bytes() == b"the user's own file"
    assert (tmp_path / "accuracy_vs_macs_3.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["compare", str(vgg_run), "--plot", str(mine)]) == 0  # named: replaced
    assert mine.read_bytes()[:4] == b"\x89PNG"


def test_interrupted_force_leaves_a_run_directory_the_next_force_replaces(tmp_path, monkeypatch):
    """--force deletes the old run's files; killed half way, what is left must still be a
    run directory (config.json deleted last), or the next --force refuses it."""
    import os

    from hetconv.train import engine

    def make(run_dir):
        (run_dir / "checkpoints").mkdir(parents=True)
        for name in ("config.json", "metrics.jsonl", "metrics.csv", "train.log",
                     "summary.json", "checkpoints/last.pt", "checkpoints/best.pt"):
            (run_dir / name).write_text("{}")

    n_deletions = 8  # 7 files and the checkpoints directory
    for stop in range(1, n_deletions):
        run_dir = tmp_path / f"r{stop}"
        make(run_dir)
        done = []
        real_unlink, real_rmdir = os.unlink, os.rmdir

        def counted(real):
            def delete(*args, **kwargs):
                if len(done) == stop:
                    raise KeyboardInterrupt  # killed here
                done.append(args[0])
                return real(*args, **kwargs)
            return delete
        monkeypatch.setattr(os, "unlink", counted(real_unlink))
        monkeypatch.setattr(os, "rmdir", counted(real_rmdir))
        with pytest.raises(KeyboardInterrupt):
            engine._prepare_run_dir(run_dir, force=True)
        monkeypatch.undo()
        assert (run_dir / "config.json").exists(), f"config.json gone after {stop} deletions"
        assert engine._prepare_run_dir(run_dir, force=True) is None
        assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]


def test_evaluate_reproduces_a_val_subset_runs_recorded_accuracy(tmp_path, data_dir, capsys):
    """A run trained with --val-subset records its accuracy on that fixed subset; evaluate
    takes the same subset (the recorded loss and top-1 again), --full-split the whole one."""
    from hetconv.cli import main

    cfg = resolve_config(model="vgg16_cifar_p4", name="sub", data_dir=data_dir,
                         out=str(tmp_path), epochs=1, batch_size=16, workers=0,
                         val_subset=8, **TINY_VGG)
    summary = fit(cfg)
    recorded = json.loads((tmp_path / "sub" / "metrics.jsonl").read_text().splitlines()[-1])
    result = evaluate(tmp_path / "sub", batch_size=3)
    assert result["images"] == 8 and result["val_subset"] == 8
    assert result["top1"] == pytest.approx(summary["val_top1"])
    assert result["loss"] == pytest.approx(recorded["val_loss"], rel=1e-5)
    full = evaluate(tmp_path / "sub", full_split=True)
    assert full["images"] == 32 and full["val_subset"] is None
    assert main(["evaluate", str(tmp_path / "sub")]) == 0
    assert "8 images, the run's fixed validation subset" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "sub"), "--full-split"]) == 0
    assert "(32 images, epoch" in capsys.readouterr().out


def test_evaluate_reproduces_a_limit_val_batches_runs_recorded_accuracy(tmp_path, data_dir,
                                                                       capsys):
    """A run trained with --limit-val-batches records its accuracy on the images of those
    batches; evaluate took the whole split (another number).  It takes the same images
    now, with any batch size; --full-split and an explicit --limit-batches do not."""
    from hetconv.cli import main

    cfg = resolve_config(model="vgg16_cifar_p4", name="lim", data_dir=data_dir,
                         out=str(tmp_path), epochs=1, batch_size=16, workers=0,
                         eval_batch_size=3, limit_val_batches=2, **TINY_VGG)
    summary = fit(cfg)
    recorded = json.loads((tmp_path / "lim" / "metrics.jsonl").read_text().splitlines()[-1])
    result = evaluate(tmp_path / "lim", batch_size=4)
    assert result["images"] == 6 and result["val_limit"] == 6
    assert result["top1"] == pytest.approx(summary["val_top1"])
    assert result["loss"] == pytest.approx(recorded["val_loss"], rel=1e-5)
    assert evaluate(tmp_path / "lim", full_split=True)["images"] == 32
    assert evaluate(tmp_path / "lim", batch_size=5, limit_batches=1)["images"] == 5
    assert main(["evaluate", str(tmp_path / "lim")]) == 0
    assert "(6 images, those its --limit-val-batches validated on" in capsys.readouterr().out


def test_val_images_limit_is_the_union_of_every_process_s_limited_batches():
    """The images W processes validate on with L batches of B each (each process its
    EvalShardSampler shard) are the first val_images_limit of the split."""
    from hetconv.train.distributed import EvalShardSampler
    from hetconv.train.engine import val_images_limit

    for world in (1, 2, 3):
        for size in (5, 37, 100):
            for batch, limit in ((2, 1), (3, 2), (4, 5)):
                cfg = TrainConfig(model="vgg16_cifar", batch_size=8 * world,
                                  eval_batch_size=batch, limit_val_batches=limit)
                seen = set()
                for rank in range(world):
                    shard = list(EvalShardSampler(size, rank, world))
                    seen.update(shard[:batch * limit])
                assert seen == set(range(min(size, val_images_limit(cfg, world))))
    cfg = TrainConfig(model="vgg16_cifar", batch_size=12, limit_val_batches=2)
    assert val_images_limit(cfg, 3) == 3 * (12 // 3 * 2) * 2  # (per-process batch x 2)


def test_checkpoints_keep_the_layers_pattern_record(vgg_run):
    """A checkpoint's model state keeps the state dict's metadata, whose pattern record
    makes loading it into a model of the other pattern an error (same shapes, another
    function) instead of a silent success."""
    state = load_checkpoint(vgg_run)["model"]
    assert any(meta.get("hetconv_pattern") == "shifted"
               for meta in getattr(state, "_metadata", {}).values())
    blocked = hetconv.create_model("vgg16_cifar_p4", num_classes=10, in_chans=1,
                                   width=0.0625, pattern="blocked")
    with pytest.raises(RuntimeError, match="pattern='shifted', this one has pattern='blocked'"):
        blocked.load_state_dict(state)
    hetconv.create_model("vgg16_cifar_p4", num_classes=10, in_chans=1,
                         width=0.0625).load_state_dict(state)
