"""CIFAR-10 from the standard python-pickle batches folder (``cifar-10-batches-py``).

The batches are Python pickles; they are read with an unpickler that only admits the
few numpy globals the format needs, so a tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from .base import DatasetFormatError, find_data_dir

__all__ = ["CIFAR10_CLASSES", "find_cifar10", "load_cifar10"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
HOW_TO_GET = ("Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
              "and unpack it (it creates cifar-10-batches-py/) into one of these directories")
_ALLOWED_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                    ("numpy.core.multiarray", "_reconstruct"),
                    ("numpy._core.multiarray", "_reconstruct")}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _read_batch(path: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            batch = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as exc:
        raise DatasetFormatError(f"{path}: not a readable CIFAR batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise DatasetFormatError(f"{path}: a CIFAR batch is a dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DatasetFormatError(f"{path}: missing 'data' or 'labels' entry")
    images = torch.as_tensor(data)
    if images.dtype != torch.uint8 or images.dim() != 2 or images.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(f"{path}: 'data' must be uint8 of shape (N, 3072), got "
                                 f"{images.dtype} {tuple(images.shape)}")
    targets = torch.as_tensor(list(labels), dtype=torch.int64)
    if targets.shape != (images.shape[0],):
        raise DatasetFormatError(f"{path}: count mismatch: {images.shape[0]} images, "
                                 f"{targets.numel()} labels")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= 10):
        raise DatasetFormatError(f"{path}: labels must be in 0..9")
    return images.view(-1, 3, 32, 32), targets


def _missing(directory: Path) -> list:
    return [name for name in TRAIN_BATCHES + TEST_BATCHES if not (directory / name).is_file()]


def _complete(directory: Path) -> bool:
    return not _missing(directory)


def find_cifar10(data_dir: Optional[str] = None) -> Path:
    """The ``cifar-10-batches-py`` directory: ``data_dir`` (or ``data_dir/cifar-10-batches-py``)
    when given, otherwise ``$HETCONV_DATA/cifar-10-batches-py`` or
    ``$HETCONV_DATA/cifar10/cifar-10-batches-py``."""
    return find_data_dir("CIFAR-10", data_dir,
                         ["cifar-10-batches-py", "cifar10/cifar-10-batches-py"], [],
                         _complete, HOW_TO_GET, _missing)


def load_cifar10(directory: Union[str, Path], split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` of ``split`` ("train"/"test")."""
    names = {"train": TRAIN_BATCHES, "test": TEST_BATCHES}.get(split)
    if names is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    parts = [_read_batch(Path(directory) / name) for name in names]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
