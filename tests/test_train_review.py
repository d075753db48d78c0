"""Review of the training pipeline: silent wrong results found and fixed (one test each)."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import hetconv
from hetconv.data import DatasetFormatError, build_datasets, load_fashion_mnist
from hetconv.train import CheckpointError, compare, evaluate, fit, load_checkpoint, resolve_config
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
