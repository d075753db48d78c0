"""Data sets for training and evaluating HetConv models.

``build_datasets(name, data_dir)`` returns ``(train, val, info)``:

- ``fashion-mnist``: the official IDX files, images zero-padded from 28x28 to 32x32 so the
  CIFAR architectures apply unchanged (1 channel).
- ``cifar10``: the ``cifar-10-batches-py`` pickles with the standard augmentation
  (4-pixel padded random crop, horizontal flip) and per-channel normalisation.
- ``imagefolder``: ImageNet-style ``train/`` and ``val/`` class folders with the standard
  ImageNet transforms (random-resized crop + flip; resize 256/224 + centre crop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .base import DatasetFormatError, DatasetInfo, DatasetNotFoundError, TensorImageDataset
from .cifar import CIFAR10_CLASSES, find_cifar10, load_cifar10
from .fashion_mnist import (FASHION_MNIST_CLASSES, find_fashion_mnist, load_fashion_mnist,
                            read_idx, write_idx)

__all__ = ["DATASETS", "DatasetFormatError", "DatasetInfo", "DatasetNotFoundError",
           "TensorImageDataset", "TensorTransform", "build_datasets", "find_cifar10", "find_fashion_mnist",
           "load_cifar10", "load_fashion_mnist", "read_idx", "write_idx"]

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TensorTransform:
    """uint8 ``(C, H, W)`` -> normalised float, optionally zero-padded to ``pad_to`` and, for
    training, randomly cropped from a ``crop_padding``-padded copy and flipped left-right.

    Plain torch ops (no torchvision import, a few microseconds per image); randomness
    comes from torch's generator.
    """

    def __init__(self, mean, std, pad: int = 0, augment: bool = False, crop_padding: int = 4):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.pad, self.augment, self.crop_padding = pad, augment, crop_padding

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float().div_(255)
        if self.pad:
            x = F.pad(x, (self.pad,) * 4)
        if self.augment:
            p = self.crop_padding
            h, w = x.shape[-2:]
            dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = F.pad(x, (p,) * 4)[:, dy:dy + h, dx:dx + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return (f"TensorTransform(pad={self.pad}, augment={self.augment}, "
                f"crop_padding={self.crop_padding})")


def _transforms(mean, std, pad: int, augment: bool, crop_padding: int):
    return (TensorTransform(mean, std, pad, augment, crop_padding),
            TensorTransform(mean, std, pad))


def _fashion_mnist(data_dir, augment, image_size):
    root = find_fashion_mnist(data_dir)
    train_t, val_t = _transforms(FASHION_MNIST_MEAN, FASHION_MNIST_STD, 2, augment,
                                 crop_padding=2)
    train = TensorImageDataset(*load_fashion_mnist(root, "train"), train_t, FASHION_MNIST_CLASSES)
    val = TensorImageDataset(*load_fashion_mnist(root, "test"), val_t, FASHION_MNIST_CLASSES)
    return train, val, DatasetInfo("fashion-mnist", 10, 1, 32, str(root), FASHION_MNIST_CLASSES)


def _cifar10(data_dir, augment, image_size):
    root = find_cifar10(data_dir)
    train_t, val_t = _transforms(CIFAR10_MEAN, CIFAR10_STD, 0, augment, crop_padding=4)
    train = TensorImageDataset(*load_cifar10(root, "train"), train_t, CIFAR10_CLASSES)
    val = TensorImageDataset(*load_cifar10(root, "test"), val_t, CIFAR10_CLASSES)
    return train, val, DatasetInfo("cifar10", 10, 3, 32, str(root), CIFAR10_CLASSES)


def _imagefolder(data_dir, augment, image_size):
    from torchvision import datasets
    from torchvision import transforms as T

    if data_dir is None:
        raise ValueError("data 'imagefolder' needs data_dir (--data-dir) holding train/ and val/")
    root = Path(data_dir).expanduser()
    missing = [str(root / s) for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise DatasetNotFoundError(f"imagefolder: missing {', '.join(missing)} (expected "
                                   f"ImageNet-style class folders under train/ and val/)")
    size = image_size or 224
    resize = int(round(size * 256 / 224))
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_t = T.Compose(([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if augment
                         else [T.Resize(resize), T.CenterCrop(size)]) + [T.ToTensor(), normalize])
    val_t = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), normalize])
    try:
        train = datasets.ImageFolder(str(root / "train"), transform=train_t)
        val = datasets.ImageFolder(str(root / "val"), transform=val_t)
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"imagefolder {root}: {exc}") from exc
    if train.classes != val.classes:
        raise DatasetFormatError(f"imagefolder {root}: train/ and val/ have different classes "
                                 f"({len(train.classes)} vs {len(val.classes)}; first "
                                 f"difference: {sorted(set(train.classes) ^ set(val.classes))[:3]})")
    return train, val, DatasetInfo("imagefolder", len(train.classes), 3, size, str(root),
                                   tuple(train.classes))


DATASETS: Dict[str, Callable] = {"fashion-mnist": _fashion_mnist, "cifar10": _cifar10,
                                 "imagefolder": _imagefolder}


def build_datasets(name: str, data_dir: Optional[str] = None, *, augment: bool = True,
                   image_size: Optional[int] = None) -> Tuple[Dataset, Dataset, DatasetInfo]:
    """``(train, val, info)`` for data set ``name`` (one of :data:`DATASETS`).

    ``augment`` switches the training augmentation on or off; ``image_size`` applies to
    ``imagefolder`` only (default 224).
    """
    if name not in DATASETS:
        raise ValueError(f"data must be one of {sorted(DATASETS)}, got {name!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if image_size is not None and name != "imagefolder" and image_size != 32:
        raise ValueError(f"image_size applies to data 'imagefolder' only; {name} images are "
                         f"32x32 (got image_size {image_size})")
    return DATASETS[name](data_dir, augment, image_size)
