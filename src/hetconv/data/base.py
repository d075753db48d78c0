"""Shared pieces of the data sets: errors, the data-directory lookup, the in-memory data set."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

__all__ = ["DatasetFormatError", "DatasetInfo", "DatasetNotFoundError", "TensorImageDataset",
           "find_data_dir"]


class DatasetNotFoundError(FileNotFoundError):
    """The data set's files are in none of the places looked at."""


class DatasetFormatError(ValueError):
    """A data set file exists but is truncated, corrupt or not in the expected format."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set: classes, channels and image size."""

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    root: str
    classes: Tuple[str, ...] = field(default=())

    @property
    def input_size(self) -> Tuple[int, int, int]:
        """One image's shape ``(C, H, W)`` (what :func:`hetconv.profile` takes)."""
        return (self.in_chans, self.image_size, self.image_size)


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor ``(N, C, H, W)`` with int64 labels.

    ``transform`` maps one uint8 ``(C, H, W)`` image to the float tensor the model sees;
    it draws any randomness from torch's generator, so seeding torch (and the data-loader
    workers, which PyTorch seeds from the loader's generator) makes an epoch reproducible.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 classes: Sequence[str] = ()) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got "
                             f"{images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        self.images = images
        self.targets = labels.to(torch.int64)
        self.transform = transform
        self.classes = list(classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def find_data_dir(name: str, data_dir: Optional[str], subdirs: Sequence[str],
                  system_dirs: Sequence[str], complete: Callable[[Path], bool],
                  how_to_get: str, missing: Optional[Callable[[Path], List[str]]] = None
                  ) -> Path:
    """Return the first directory holding data set ``name`` (``complete(dir)`` is true).

    Looked at, in order: ``data_dir`` (and ``data_dir/<subdir>``) when given, otherwise
    ``$HETCONV_DATA/<subdir>`` and then the system locations.  An explicit ``data_dir``
    is never silently replaced by another copy.  Nothing found: a
    :class:`DatasetNotFoundError` naming every path tried (with, for a directory that
    exists, the files ``missing(dir)`` says it lacks) and ``how_to_get`` the data.
    """
    candidates: List[Path] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        candidates += [root] + [root / s for s in subdirs]
    else:
        env = os.environ.get("HETCONV_DATA")
        if env:
            candidates += [Path(env).expanduser() / s for s in subdirs]
        candidates += [Path(d) for d in system_dirs]
    for candidate in candidates:
        if candidate.is_dir() and complete(candidate):
            return candidate

    def describe(c: Path) -> str:
        if c.is_file():
            archive = c.name.endswith((".tar.gz", ".tgz", ".tar", ".zip"))
            return f"  {c} (a file, not a directory{': unpack it' if archive else ''})"
        if missing is None or not c.is_dir() or not any(p.is_file() for p in c.iterdir()):
            return f"  {c}"  # no files at all: nothing to say but "not here"
        lacks = missing(c)
        return f"  {c} (exists, but lacks {', '.join(lacks)})" if lacks else f"  {c}"

    tried = "\n".join(describe(c) for c in candidates)
    hint = "" if data_dir is not None else " (or set $HETCONV_DATA, or pass --data-dir)"
    raise DatasetNotFoundError(
        f"{name} not found. Looked in:\n{tried}\n{how_to_get}{hint}")
