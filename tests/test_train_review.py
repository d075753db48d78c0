"""Review of the training pipeline: silent wrong results found and fixed (one test each)."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import hetconv
from hetconv.data import DatasetFormatError, build_datasets, load_fashion_mnist
from hetconv.train import (CheckpointError, TrainConfig, compare, evaluate, fit, load_checkpoint,
                           resolve_config)
from synthetic_data import idx_bytes, write_fashion_mnist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=32, n_test=16))


def quick(data_dir, out, name, model="vgg16_cifar", **kw):
    values = dict(model=model, data_dir=data_dir, out=str(out), name=name, epochs=1,
                  batch_size=16, workers=0, limit_train_batches=1, device="cpu")
    values.update(kw)
    return fit(resolve_config(**values))


def test_compare_reduction_is_against_the_dense_run_of_the_same_width(tmp_path, data_dir):
    """A sweep over widths: each HetConv run's MAC/param reduction is against the dense run
    of its own width (it was against the first dense run given, whatever its width:
    -35% instead of 66% here)."""
    quick(data_dir, tmp_path, "dense-narrow", model_kwargs={"width": 0.0625})
    quick(data_dir, tmp_path, "dense-wide", model_kwargs={"width": 0.125})
    quick(data_dir, tmp_path, "p4-wide", model="vgg16_cifar_p4", model_kwargs={"width": 0.125})
    quick(data_dir, tmp_path, "p4-se", model="vgg16_cifar_p4_se",
          model_kwargs={"width": 0.125})
    rows = {r["run"]: r for r in compare([tmp_path / n for n in (
        "dense-narrow", "dense-wide", "p4-wide", "p4-se")])}

    def cost(name, **kw):
        m = hetconv.create_model(name, num_classes=10, in_chans=1, **kw)
        return hetconv.profile(m, (1, 32, 32)).macs, sum(p.numel() for p in m.parameters())

    macs_d, params_d = cost("vgg16_cifar", width=0.125)
    macs_4, params_4 = cost("vgg16_cifar_p4", width=0.125)
    assert rows["p4-wide"]["macs_reduction"] == pytest.approx(100 * (1 - macs_4 / macs_d))
    assert rows["p4-wide"]["params_reduction"] == pytest.approx(100 * (1 - params_4 / params_d))
    assert rows["dense-wide"]["macs_reduction"] == 0.0
    assert rows["p4-wide"]["reference"] == "dense-wide"
    assert rows["dense-narrow"]["macs_reduction"] == 0.0
    # No dense run with squeeze-excitation among them: no reduction rather than a wrong one.
    assert rows["p4-se"]["reference"] is None and rows["p4-se"]["macs_reduction"] is None


def test_fashion_mnist_images_of_another_size_are_refused(tmp_path):
    """IDX images that are not 28x28 were padded to (H+4)x(W+4) while the data set info
    (and the MACs in every summary) said 32x32; the model trained on them silently."""
    root = write_fashion_mnist(tmp_path / "fm", n_train=8, n_test=4)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros((4, 32, 32), dtype=np.uint8))))
    with pytest.raises(DatasetFormatError, match=r"t10k-images-idx3-ubyte.gz.*28x28.*\(32, 32\)"):
        build_datasets("fashion-mnist", str(root))
    assert load_fashion_mnist(root, "train")[0].shape == (8, 1, 28, 28)


def test_resume_on_other_data_is_refused(tmp_path, data_dir):
    """--data-dir may change on resume (the data moved), but a copy holding other images
    silently changed the data order and the validation set mid-run."""
    import shutil

    quick(data_dir, tmp_path, "r", model_kwargs={"width": 0.0625}, epochs=2)
    run = tmp_path / "r"
    config = json.loads((run / "config.json").read_text())["config"]
    moved = shutil.copytree(data_dir, tmp_path / "moved")  # the same files elsewhere: fine
    fit(resolve_config(**{**config, "data_dir": str(moved), "epochs": 3}), resume=run)
    assert load_checkpoint(run)["epoch"] == 3
    # more training images, or the same count with other labels: refused, nothing written
    for other, kw in (("more", dict(n_train=48, n_test=16)), ("relabelled", dict(n_train=32, n_test=16))):
        odir = write_fashion_mnist(tmp_path / other, **kw)
        if other == "relabelled":  # same images and counts, labels shifted by one class
            labels = np.roll(np.arange(32) % 10, 1).astype(np.uint8)
            (odir / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
        before = (run / "metrics.jsonl").read_bytes()
        with pytest.raises(CheckpointError, match=r"not the one this run was trained on.*train"):
            fit(resolve_config(**{**config, "data_dir": str(odir), "epochs": 4}), resume=run)
        assert (run / "metrics.jsonl").read_bytes() == before


def test_evaluate_on_data_with_other_channels_names_the_data(tmp_path, data_dir):
    """A Fashion-MNIST model evaluated on CIFAR-10: the error said the checkpoint holds a
    model that does not match the model (a state-dict shape), not that the data differ."""
    from synthetic_data import write_cifar10

    quick(data_dir, tmp_path, "r", model_kwargs={"width": 0.0625})
    write_cifar10(tmp_path / "c10", per_batch=4)
    with pytest.raises(ValueError, match=r"trained on fashion-mnist \(10 classes, 1 channel"
                                         r"\(s\)\); cifar10 at .* 3 channel"):
        evaluate(tmp_path / "r", data="cifar10", data_dir=str(tmp_path / "c10"))


def test_image_size_for_a_32x32_data_set_is_refused(tmp_path, data_dir):
    """--image-size 64 with Fashion-MNIST/CIFAR-10 was ignored: the run trained at 32x32
    while its config.json said 64."""
    with pytest.raises(ValueError, match="image_size applies to data 'imagefolder' only"):
        build_datasets("fashion-mnist", data_dir, image_size=64)
    with pytest.raises(ValueError, match="image_size applies to data 'imagefolder' only"):
        quick(data_dir, tmp_path, "r", model_kwargs={"width": 0.0625}, image_size=64)
    assert not (tmp_path / "r").exists()
    assert build_datasets("fashion-mnist", data_dir, image_size=32)[2].image_size == 32


def test_incomplete_data_directory_names_the_missing_files(tmp_path):
    """An explicit --data-dir with one file missing (or misnamed) said only "not found"
    about a directory that exists and holds the other files."""
    import os

    from synthetic_data import write_cifar10

    root = write_fashion_mnist(tmp_path / "fm", n_train=8, n_test=4)
    os.unlink(root / "t10k-labels-idx1-ubyte.gz")
    (root / "t10k-labels-idx1-ubyte (1).gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info:
        build_datasets("fashion-mnist", str(root))
    assert f"  {root} (exists, but lacks t10k-labels-idx1-ubyte[.gz])" in str(info.value)
    batches = write_cifar10(tmp_path / "c10", per_batch=2)
    os.unlink(batches / "data_batch_2")
    with pytest.raises(FileNotFoundError) as info:
        build_datasets("cifar10", str(tmp_path / "c10"))
    lines = str(info.value).splitlines()
    assert f"  {batches} (exists, but lacks data_batch_2)" in lines
    assert f"  {tmp_path / 'c10'}" in lines  # holds no files: just "not here"


def test_augmented_run_does_not_depend_on_the_number_of_workers(tmp_path, data_dir):
    """--workers may change on resume (RESUME_MUTABLE: "does not change what is computed"),
    but each worker drew the random crops/flips from its own stream (and with 0 workers
    from the stream dropout uses): a resumed run with another --workers silently trained
    on other augmentations than the uninterrupted one."""
    common = dict(model="vgg16_cifar_p4", model_kwargs={"width": 0.0625}, augment=True,
                  limit_train_batches=None, epochs=2)
    quick(data_dir, tmp_path, "straight", **common)
    quick(data_dir, tmp_path, "split", **dict(common, epochs=1))
    config = json.loads((tmp_path / "split" / "config.json").read_text())["config"]
    fit(resolve_config(**{**config, "epochs": 2, "workers": 2}), resume=tmp_path / "split")
    quick(data_dir, tmp_path, "workers", **dict(common, workers=2))
    a = load_checkpoint(tmp_path / "straight")
    for other in ("split", "workers"):
        b = load_checkpoint(tmp_path / other)
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (other, k)
        assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]


def test_seeded_items_draw_per_image_and_keep_the_callers_stream(tmp_path):
    from hetconv.train.distributed import SeededItems, TrainSampler
    from synthetic_data import write_cifar10

    write_cifar10(tmp_path, per_batch=4)
    train, _, _ = build_datasets("cifar10", str(tmp_path))
    items = SeededItems(train)
    sampler = TrainSampler(len(train), seed=0, item_seeds=True)
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        epochs.append(dict(iter(sampler)))  # index -> seed
    assert sorted(epochs[0]) == list(range(len(train)))
    assert len(set(epochs[0].values()) | set(epochs[1].values())) == 2 * len(train)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    x = items[(3, epochs[0][3])][0]
    assert torch.equal(torch.get_rng_state(), before)  # dropout's stream is untouched
    assert torch.equal(items[(3, epochs[0][3])][0], x)  # a function of (index, seed) only
    crops = {items[(3, s)][0].sum().item() for s in range(20)}
    assert len(crops) > 5  # still random over seeds


def test_data_dir_that_is_the_downloaded_archive_says_so(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(FileNotFoundError) as info:
        build_datasets("cifar10", str(archive))
    assert f"  {archive} (a file, not a directory: unpack it)" in str(info.value)


def test_limited_epochs_load_no_batch_beyond_the_limit():
    """--limit-train-batches / --limit-val-batches N loaded batch N + 1 before stopping
    (a wasted batch per epoch: images decoded and augmented for nothing)."""
    from torch.utils.data import DataLoader, Dataset

    from hetconv.train.distributed import DistContext
    from hetconv.train.engine import _train_epoch, evaluate_model

    class Counting(Dataset):
        def __init__(self):
            self.loaded = 0

        def __len__(self):
            return 40

        def __getitem__(self, i):
            self.loaded += 1
            return torch.randn(1, 4, 4), i % 3

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    data = Counting()
    result = evaluate_model(model, DataLoader(data, batch_size=4), device=torch.device("cpu"),
                            num_classes=3, limit_batches=2)
    assert result["images"] == 8 and data.loaded == 8
    data = Counting()
    cfg = TrainConfig(model="vgg16_cifar", epochs=1, limit_train_batches=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_epoch(model, DataLoader(data, batch_size=4), opt, cfg, DistContext(), 0)
    assert data.loaded == 12


def test_a_seed_sweep_trains_and_validates_on_the_same_subsets(tmp_path, data_dir):
    """--train-subset / --val-subset were drawn with --seed: the runs of a seed sweep
    trained and validated on different images, so their accuracies differed by the images
    as well as by the seed.  They are drawn with subset_seed (default 0) now; a config saved
    before that field existed keeps its seed-drawn subsets (evaluate and resume agree)."""
    from hetconv.cli import build_parser
    from hetconv.train.config import load_config

    records = {}
    for name, kw in (("s0", {"seed": 0}), ("s5", {"seed": 5}),
                     ("s5_other", {"seed": 5, "subset_seed": 2})):
        quick(data_dir, tmp_path, name, train_subset=20, val_subset=8, augment=False,
              model_kwargs={"width": 0.0625}, **kw)
        records[name] = json.loads((tmp_path / name / "config.json").read_text())["dataset"]
    keys = ("train_labels_sha256", "val_labels_sha256")
    assert [records["s0"][k] for k in keys] == [records["s5"][k] for k in keys]
    assert all(records["s0"][k] != records["s5_other"][k] for k in keys)
    # a config saved before subset_seed: drawn with its seed, as that run did
    legacy = {k: v for k, v in TrainConfig(seed=5).to_dict().items() if k != "subset_seed"}
    assert TrainConfig.from_saved(legacy).subset_seed == 5
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps({"config": legacy}))
    assert load_config(tmp_path / "old").subset_seed == 5
    assert resolve_config(seed=5).subset_seed == 0  # a new run: 0 whatever its seed
    args = build_parser().parse_args(["train", "--subset-seed", "3"])
    assert args.subset_seed == 3


def test_a_run_from_before_subset_seed_resumes_and_evaluates_on_its_own_subsets(tmp_path,
                                                                              data_dir):
    """A run saved before subset_seed existed drew its subsets with its seed: evaluate
    takes that validation subset (its recorded accuracy again) and resume continues it
    (same data record, no config mismatch), though the default is now 0."""
    from hetconv.train import resume
    from hetconv.train.checkpoint import save_checkpoint

    summary = quick(data_dir, tmp_path, "old", seed=5, subset_seed=5, train_subset=20,
                    val_subset=8, augment=False, model_kwargs={"width": 0.0625})
    run = tmp_path / "old"
    saved = json.loads((run / "config.json").read_text())
    del saved["config"]["subset_seed"]
    (run / "config.json").write_text(json.dumps(saved))
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(run / "checkpoints" / name)
        del ckpt["config"]["subset_seed"]
        save_checkpoint(run / "checkpoints" / name, ckpt)
    for which in ("last", "best"):
        result = evaluate(run, checkpoint=which)
        assert result["images"] == 8 and result["top1"] == pytest.approx(summary["val_top1"])
    assert resume(run, epochs=2)["epochs"] == 2


def test_evaluate_of_best_pt_knows_the_process_count_of_a_limited_run(tmp_path, data_dir):
    """best.pt did not record the number of processes (only last.pt did): a run validated
    by W processes with --limit-val-batches L and --eval-batch-size E was evaluated from
    best.pt on E * L images instead of W * E * L.  best.pt records it now; an older best.pt
    takes it from the run's config.json."""
    from hetconv.train.checkpoint import save_checkpoint

    quick(data_dir, tmp_path, "lim", eval_batch_size=2, limit_val_batches=2,
          model_kwargs={"width": 0.0625})
    run = tmp_path / "lim"
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["world_size"] == 1
    # as if two processes had validated: 2 x 2 x 2 images
    best["world_size"] = 2
    save_checkpoint(run / "checkpoints" / "best.pt", best)
    assert evaluate(run, checkpoint="best")["val_limit"] == 8
    del best["world_size"]  # an older best.pt: config.json says how many processes
    save_checkpoint(run / "checkpoints" / "best.pt", best)
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "world_size": 2}))
    assert evaluate(run, checkpoint="best")["val_limit"] == 8
    assert evaluate(run, checkpoint="last")["val_limit"] == 4
