"""Data sets: exact file formats, the lookup order, transforms, and every corrupt case."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hetconv.data import (DatasetFormatError, DatasetNotFoundError, build_datasets,
                          find_fashion_mnist, load_fashion_mnist, read_idx, write_idx)
from hetconv.data import fashion_mnist as fm
from synthetic_data import (class_images, idx_bytes, write_cifar10, write_fashion_mnist,
                            write_imagefolder)

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_matches_independent_encoding(tmp_path, gz):
    images = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    ints = np.array([[-70000, 1], [2, 2**31 - 1]], dtype=np.int64)
    for name, array in (("u8", images), ("i32", ints)):
        data = idx_bytes(array)
        path = tmp_path / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
        out = read_idx(path)
        assert out.shape == array.shape
        assert out.tolist() == array.tolist()


def test_write_idx_round_trip(tmp_path):
    for t in (torch.randint(0, 255, (4, 3, 2), dtype=torch.uint8), torch.randn(5, 2),
              torch.randint(-1000, 1000, (7,), dtype=torch.int16)):
        for name in ("a", "a.gz"):
            assert torch.equal(read_idx(write_idx(tmp_path / name, t)), t)


def _good_idx(tmp_path) -> bytes:
    return idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"\x01" + b[1:], "not an IDX file"),
    (lambda b: b[:2] + b"\x42" + b[3:], "not an IDX file"),
    (lambda b: b[:-5], "truncated"),
    (lambda b: b + b"\x00\x00", "trailing bytes"),
    (lambda b: b[:10], "truncated"),
    (lambda b: b"", "not an IDX file"),
])
def test_read_idx_rejects_corrupt_files(tmp_path, mutate, message):
    path = tmp_path / "bad"
    path.write_bytes(mutate(_good_idx(tmp_path)))
    with pytest.raises(DatasetFormatError, match=message):
        read_idx(path)


def test_read_idx_rejects_corrupt_gzip_and_wrong_ndim(tmp_path):
    gz = gzip.compress(_good_idx(tmp_path))
    (tmp_path / "cut.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DatasetFormatError, match="gzip"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "ok").write_bytes(_good_idx(tmp_path))
    with pytest.raises(DatasetFormatError, match="1 dimension"):
        read_idx(tmp_path / "ok", ndim=1)


# --------------------------------------------------------------------------- Fashion-MNIST

@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_loads_synthetic_files(tmp_path, gz):
    root = write_fashion_mnist(tmp_path / "fm", n_train=20, n_test=10, gz=gz)
    images, labels = load_fashion_mnist(root, "train")
    expected, expected_labels = class_images(20, 28, 1, 0)
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images, torch.from_numpy(expected))
    assert labels.tolist() == expected_labels.tolist()


def test_fashion_mnist_count_mismatch_and_label_range(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm", n_train=20, n_test=10)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(19, dtype=np.uint8))))
    with pytest.raises(DatasetFormatError, match="count mismatch.*20 images.*19 labels"):
        load_fashion_mnist(root, "train")
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.full(10, 10, dtype=np.uint8))))
    with pytest.raises(DatasetFormatError, match="out of range"):
        load_fashion_mnist(root, "test")


def test_fashion_mnist_lookup_order(tmp_path, monkeypatch):
    env_root = write_fashion_mnist(tmp_path / "env" / "fashion-mnist")
    system = write_fashion_mnist(tmp_path / "system")
    explicit = write_fashion_mnist(tmp_path / "explicit")
    monkeypatch.setattr(fm, "SYSTEM_DIR", str(system))
    monkeypatch.setenv("HETCONV_DATA", str(tmp_path / "env"))
    assert find_fashion_mnist(str(explicit)) == explicit
    assert find_fashion_mnist(str(tmp_path / "env")) == env_root  # DIR/fashion-mnist
    assert find_fashion_mnist() == env_root
    monkeypatch.delenv("HETCONV_DATA")
    assert find_fashion_mnist() == system
    # An explicit directory without the files is an error, not a silent fallback.
    with pytest.raises(DatasetNotFoundError):
        find_fashion_mnist(str(tmp_path / "nowhere"))


def test_fashion_mnist_missing_error_names_paths_and_remedy(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIR", str(tmp_path / "sys"))
    monkeypatch.setenv("HETCONV_DATA", str(tmp_path / "data"))
    half = tmp_path / "data" / "fashion-mnist"
    write_fashion_mnist(half)
    os.unlink(half / "t10k-images-idx3-ubyte.gz")  # incomplete copy: not used
    with pytest.raises(DatasetNotFoundError) as info:
        find_fashion_mnist()
    text = str(info.value)
    assert str(half) in text and str(tmp_path / "sys") in text
    assert "apt-get install dataset-fashion-mnist" in text
    assert "--data-dir" in text


def test_fashion_mnist_dataset_pads_and_normalises(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm", n_train=12, n_test=6)
    train, val, info = build_datasets("fashion-mnist", str(root), augment=False)
    assert (info.num_classes, info.in_chans, info.image_size) == (10, 1, 32)
    assert info.input_size == (1, 32, 32)
    assert len(train) == 12 and len(val) == 6
    x, y = val[3]
    raw = torch.from_numpy(class_images(6, 28, 1, 1)[0][3]).float() / 255
    expected = torch.full((1, 32, 32), (0 - 0.2860) / 0.3530)
    expected[:, 2:30, 2:30] = (raw - 0.2860) / 0.3530
    assert y == 3
    torch.testing.assert_close(x, expected)


def test_cifar_train_augmentation_is_a_padded_crop_or_flip(tmp_path):
    root = write_cifar10(tmp_path, per_batch=4)
    train, val, info = build_datasets("cifar10", str(tmp_path))
    assert info.root == str(root) and len(train) == 20 and len(val) == 4
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
    std = torch.tensor((0.2470, 0.2435, 0.2616)).view(3, 1, 1)
    image = train.images[5].float() / 255
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    windows = [w for dy in range(9) for dx in range(9)
               for w in (padded[:, dy:dy + 32, dx:dx + 32],
                         padded[:, dy:dy + 32, dx:dx + 32].flip(-1))]
    torch.manual_seed(3)
    for _ in range(5):
        x, y = train[5]
        assert y == int(train.targets[5])
        assert any(torch.allclose(x * std + mean, w, atol=1e-5) for w in windows)
    x, _ = val[0]
    torch.testing.assert_close(x, (val.images[0].float() / 255 - mean) / std)


def test_cifar_errors(tmp_path):
    root = write_cifar10(tmp_path, per_batch=4)
    # Code in a pickle is refused, not run.
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DatasetFormatError, match="not allowed"):
        build_datasets("cifar10", str(tmp_path))
    assert not marker.exists()
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [1, 2, 3]}, f)
    with pytest.raises(DatasetFormatError, match="count mismatch"):
        build_datasets("cifar10", str(tmp_path))
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [1, 2, 3, 4]}, f)
    with pytest.raises(DatasetFormatError, match="3072"):
        build_datasets("cifar10", str(tmp_path))
    (root / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DatasetFormatError, match="not a readable CIFAR batch"):
        build_datasets("cifar10", str(tmp_path))
    os.unlink(root / "test_batch")
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        build_datasets("cifar10", str(tmp_path))


def test_imagefolder(tmp_path):
    root = write_imagefolder(tmp_path / "imgs", classes=("cat", "dog", "eel"))
    train, val, info = build_datasets("imagefolder", str(root), image_size=16)
    assert (info.num_classes, info.in_chans, info.image_size) == (3, 3, 16)
    assert info.classes == ("cat", "dog", "eel")
    assert len(train) == 9 and len(val) == 9
    x, y = train[4]
    assert x.shape == (3, 16, 16) and y == 1
    xv, _ = val[0]
    assert xv.shape == (3, 16, 16)
    torch.testing.assert_close(xv, val[0][0])  # evaluation transform is deterministic
    other = write_imagefolder(tmp_path / "other", classes=("cat", "dog"),
                              val_classes=("cat", "cow"))
    with pytest.raises(DatasetFormatError, match="different classes"):
        build_datasets("imagefolder", str(other))
    with pytest.raises(DatasetNotFoundError, match="val"):
        build_datasets("imagefolder", str(tmp_path / "imgs" / "train"))
    with pytest.raises(ValueError, match="data_dir"):
        build_datasets("imagefolder")


def test_unknown_dataset_and_bad_image_size():
    with pytest.raises(ValueError, match="data must be one of"):
        build_datasets("mnist-but-not")
    with pytest.raises(ValueError, match="image_size"):
        build_datasets("imagefolder", "/x", image_size=3)


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="Fashion-MNIST is not installed")
def test_real_fashion_mnist():
    images, labels = load_fashion_mnist(REAL_FMNIST, "test")
    assert images.shape == (10000, 1, 28, 28)
    assert torch.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
