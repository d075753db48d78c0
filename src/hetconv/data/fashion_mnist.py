"""Fashion-MNIST from the official IDX files (gzipped or not), checked before use.

The IDX format (LeCun's MNIST page): two zero bytes, a type code, the number of
dimensions, each dimension as a big-endian uint32, then the values, row-major.
"""

from __future__ import annotations

import gzip
import struct
import sys
import zlib
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from .base import DatasetFormatError, find_data_dir

__all__ = ["FASHION_MNIST_CLASSES", "find_fashion_mnist", "load_fashion_mnist", "read_idx",
           "write_idx"]

SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# IDX type code -> (torch dtype, bytes per value)
_IDX_TYPES: Dict[int, Tuple[torch.dtype, int]] = {
    0x08: (torch.uint8, 1), 0x09: (torch.int8, 1), 0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4), 0x0D: (torch.float32, 4), 0x0E: (torch.float64, 8)}
HOW_TO_GET = ("Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
              "or put the four IDX files (train-images-idx3-ubyte[.gz], "
              "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
              "t10k-labels-idx1-ubyte[.gz]) from https://github.com/zalandoresearch/fashion-mnist "
              "into one of these directories")


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetFormatError(f"{path}: corrupt or truncated gzip file ({exc})") from exc


def read_idx(path: Union[str, Path], ndim: Optional[int] = None) -> torch.Tensor:
    """Read one IDX file (plain or gzip, detected by content) into a tensor.

    Raises :class:`DatasetFormatError` on a wrong magic number, an unexpected number of
    dimensions (``ndim``), or a size that does not match the header (truncated file or
    trailing bytes).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DatasetFormatError(
            f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'}; expected "
            f"00 00 <type code in {sorted(hex(t) for t in _IDX_TYPES)}> <ndim>)")
    dtype, size = _IDX_TYPES[data[2]]
    dims_count = data[3]
    if ndim is not None and dims_count != ndim:
        raise DatasetFormatError(f"{path}: expected an IDX file with {ndim} dimension(s), "
                                 f"the header says {dims_count}")
    header = 4 + 4 * dims_count
    if len(data) < header:
        raise DatasetFormatError(f"{path}: truncated header ({len(data)} bytes)")
    dims = struct.unpack(f">{dims_count}I", data[4:header])
    expected = size
    for d in dims:
        expected *= d
    body = len(data) - header
    if body != expected:
        what = "truncated" if body < expected else "has trailing bytes"
        raise DatasetFormatError(f"{path}: {what}: header {tuple(dims)} needs {expected} bytes "
                                 f"of data, the file has {body}")
    flat = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8)
    if size > 1 and sys.byteorder == "little":  # IDX values are big-endian
        flat = flat.view(-1, size).flip(1).reshape(-1)
    return flat.view(dtype).view(*dims)


def write_idx(path: Union[str, Path], tensor: torch.Tensor) -> Path:
    """Write ``tensor`` as an IDX file (gzipped when ``path`` ends in ``.gz``), atomically
    enough for data preparation (temp file + rename); the inverse of :func:`read_idx`."""
    path = Path(path)
    codes = {dtype: code for code, (dtype, _) in _IDX_TYPES.items()}
    if tensor.dtype not in codes:
        raise ValueError(f"tensor dtype must be one of {sorted(map(str, codes))}, got {tensor.dtype}")
    if not 1 <= tensor.dim() <= 255:
        raise ValueError(f"tensor must have 1..255 dimensions, got {tensor.dim()}")
    flat = tensor.contiguous().view(-1).view(torch.uint8)
    size = tensor.element_size()
    if size > 1 and sys.byteorder == "little":
        flat = flat.view(-1, size).flip(1).reshape(-1)
    data = (bytes([0, 0, codes[tensor.dtype], tensor.dim()])
            + struct.pack(f">{tensor.dim()}I", *tensor.shape) + flat.numpy().tobytes())
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def _file(directory: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _missing(directory: Path) -> list:
    return [stem + "[.gz]" for pair in _FILES.values() for stem in pair
            if _file(directory, stem) is None]


def _complete(directory: Path) -> bool:
    return not _missing(directory)


def find_fashion_mnist(data_dir: Optional[str] = None) -> Path:
    """The directory holding Fashion-MNIST (see :func:`hetconv.data.base.find_data_dir`).

    Order: ``data_dir`` (or ``data_dir/fashion-mnist``) when given, otherwise
    ``$HETCONV_DATA/fashion-mnist``, then ``/usr/share/datasets/fashion-mnist``.
    """
    return find_data_dir("Fashion-MNIST", data_dir, ["fashion-mnist"], [SYSTEM_DIR],
                         _complete, HOW_TO_GET, _missing)


def load_fashion_mnist(directory: Union[str, Path], split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` uint8 and labels ``(N,)`` int64 of ``split`` ("train"/"test")."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    directory = Path(directory)
    image_stem, label_stem = _FILES[split]
    image_path, label_path = _file(directory, image_stem), _file(directory, label_stem)
    if image_path is None or label_path is None:
        raise DatasetFormatError(f"{directory}: missing {image_stem}[.gz] or {label_stem}[.gz]")
    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    if images.dtype != torch.uint8 or labels.dtype != torch.uint8:
        raise DatasetFormatError(f"{directory}: Fashion-MNIST images and labels are unsigned "
                                 f"bytes, got {images.dtype} and {labels.dtype}")
    if tuple(images.shape[1:]) != (28, 28):  # padded to the 32x32 the models are built for
        raise DatasetFormatError(f"{image_path}: Fashion-MNIST images are 28x28, this file holds "
                                 f"{tuple(images.shape[1:])} images")
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(f"{directory}: count mismatch: {image_path.name} holds "
                                 f"{images.shape[0]} images, {label_path.name} "
                                 f"{labels.shape[0]} labels")
    if labels.numel() and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DatasetFormatError(f"{label_path}: label {int(labels.max())} out of range "
                                 f"0..{len(FASHION_MNIST_CLASSES) - 1}")
    return images.unsqueeze(1).contiguous(), labels.to(torch.int64)
