"""Small synthetic data sets written in the exact on-disk formats (shared by the data,
training and distributed tests)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding written independently of hetconv's writer (big-endian header + data)."""
    codes = {np.dtype("uint8"): 0x08, np.dtype(">i4"): 0x0C}
    dtype = np.dtype("uint8") if array.dtype == np.uint8 else np.dtype(">i4")
    return (bytes([0, 0, codes[dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            + array.astype(dtype).tobytes())


def class_images(n: int, size: int, channels: int, seed: int):
    """Images whose class (``i % 10``) is visible: a bright horizontal band at row ``2*label``."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, channels, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, :, 2 * label:2 * label + 2, :] = 250
    return images, labels


def write_fashion_mnist(directory: Path, n_train: int = 64, n_test: int = 32, gz: bool = True,
                        seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = class_images(n, 28, 1, seed + (prefix == "t10k"))
        for kind, array in (("images-idx3", images[:, 0]), ("labels-idx1", labels)):
            data = idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (directory / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (directory / name).write_bytes(data)
    return directory


def write_cifar10(directory: Path, per_batch: int = 8, seed: int = 0) -> Path:
    """``cifar-10-batches-py`` with 5 train batches and a test batch of ``per_batch`` images."""
    root = directory / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        images, labels = class_images(per_batch, 32, 3, seed + k)
        batch = {b"batch_label": name.encode(), b"labels": labels.astype(int).tolist(),
                 b"data": images.reshape(per_batch, -1), b"filenames": [b"x.png"] * per_batch}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, f, protocol=2)
    return root


def write_imagefolder(root: Path, classes=("cat", "dog"), per_class: int = 3, size: int = 20,
                      val_classes=None) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c in names:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(size, size + 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
