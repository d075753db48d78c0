"""Two CPU processes under torchrun (gloo, DDP): identical weights, one coherent run directory."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hetconv.train import load_checkpoint
from synthetic_data import write_fashion_mnist

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import hetconv
    from hetconv.train import resolve_config, fit

    data_dir, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(int(os.environ["RANK"]))  # different init per rank: DDP must sync it
    model = hetconv.create_model("vgg16_cifar_p4", num_classes=10, in_chans=1, width=0.0625)
    config = resolve_config(model="vgg16_cifar_p4", model_kwargs={"width": 0.0625},
                            data_dir=data_dir, out=out, name="ddp", epochs=2, batch_size=16,
                            lr=0.05, workers=0, device="cpu", augment=True)
    summary = fit(config, model=model)
    torch.save(model.state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
    torch.save(summary["val_top1"], os.path.join(out, f"top1-rank{os.environ['RANK']}.pt"))
""")


def test_torchrun_two_cpu_processes(tmp_path):
    data_dir = write_fashion_mnist(tmp_path / "fm", n_train=64, n_test=30)
    out = tmp_path / "runs"
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(script), str(data_dir), str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    saved = load_checkpoint(out / "ddp")["model"]
    assert rank0.keys() == rank1.keys() == saved.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(rank0[key], saved[key]), key
    # Reduced metrics: the same on both ranks; the 30 validation images counted once each.
    assert torch.load(out / "top1-rank0.pt") == torch.load(out / "top1-rank1.pt")
    run = out / "ddp"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "config.json", "metrics.csv", "metrics.jsonl", "summary.json", "train.log"]
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["val_images"] == 30 for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert len(load_checkpoint(run)["rng"]) == 2  # every rank's RNG state, for exact resume
    assert not list(run.glob("**/.*.tmp"))


def test_torchrun_with_fewer_validation_images_than_processes(tmp_path):
    """One validation image for two processes: rank 1 has none to validate.  DDP's buffer
    sync at the first forward after training is a collective only the rank with images
    entered: every rank hung (forever) at the end of the first epoch."""
    from hetconv.train import evaluate

    data_dir = write_fashion_mnist(tmp_path / "fm", n_train=32, n_test=1)
    out = tmp_path / "runs"
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT.replace("epochs=2", "epochs=1"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "torchrun.log"
    with open(log, "w") as f:  # a file, not a pipe: nothing waits on the workers' output
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--standalone", str(script), str(data_dir), str(out)],
            env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its workers on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise AssertionError("torchrun hung with an empty validation shard") from None
    assert proc.returncode == 0, log.read_text()[-4000:]
    records = [json.loads(line) for line in (out / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_images"] for r in records] == [1]
    # validated with the checkpoint's (rank 0's) BatchNorm statistics
    result = evaluate(out / "ddp", batch_size=1)
    assert result["images"] == 1
    assert result["loss"] == pytest.approx(records[0]["val_loss"], rel=1e-5)
