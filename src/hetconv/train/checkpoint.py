"""Atomic files and checkpoints that hold only tensors and plain containers.

Every file the engine writes goes through :func:`atomic_write`: the bytes go to a
temporary file in the same directory, are flushed and fsync'ed, then ``os.replace``
puts them in place (and the directory is fsync'ed), so a reader - or a run resumed
after ``kill -9`` - sees either the old complete file or the new complete file.

Checkpoints are read with ``torch.load(weights_only=True)``: no code runs from a
checkpoint file, which is why they hold nothing but tensors, numbers, strings, lists,
tuples and dicts (RNG states included, converted to tensors where needed).
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn

from .._files import chmod_like_open, json_text

__all__ = ["CheckpointError", "atomic_write", "atomic_write_json", "capture_rng_state",
           "load_checkpoint", "load_model_state", "restore_rng_state", "save_checkpoint"]

FORMAT = "hetconv-checkpoint"
VERSION = 1
PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not belong to the model/run at hand."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, ``os.replace``), with the
    permissions a plain ``open(path, "wb")`` would give it (not ``mkstemp``'s ``0o600``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            chmod_like_open(tmp, str(path))  # before the fsync, which then covers it too
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """``obj`` as strict JSON (non-finite floats as ``null``), written atomically."""
    atomic_write(path, (json_text(obj, indent=2) + "\n").encode())


# --------------------------------------------------------------------------- RNG state

def capture_rng_state() -> Dict[str, Any]:
    """Torch (CPU and CUDA), Python ``random`` and numpy generator states, as tensors/tuples."""
    version, internal, gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # numpy is optional
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss),
                      float(cached)]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            return
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: PathLike, payload: Mapping[str, Any]) -> None:
    """Serialise ``payload`` (plus a format tag) and write it atomically to ``path``."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: PathLike, map_location: Optional[Union[str, torch.device]] = "cpu"
                    ) -> Dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) or raise :class:`CheckpointError`.

    ``path`` may be a checkpoint file or a run directory (its ``checkpoints/last.pt``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # arbitrary bytes fail in any way (IndexError, struct.error, ...)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{path}: corrupt or unsafe checkpoint (or not a checkpoint), "
                              f"cannot be loaded ({type(exc).__name__}: {first})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a hetconv checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt.get('version')} is not "
                              f"supported (this hetconv reads version {VERSION})")
    for key in ("model", "config", "epoch"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    ckpt["path"] = str(path)
    return ckpt


def load_model_state(model: nn.Module, ckpt: Mapping[str, Any], describe: str = "") -> None:
    """Load ``ckpt["model"]`` strictly into ``model``; a mismatch is a :class:`CheckpointError`
    that says which model the checkpoint holds."""
    state = ckpt["model"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        cfg = ckpt.get("config", {})
        held = f"{cfg.get('model')} {cfg.get('model_kwargs', {})}" if cfg else "unknown model"
        details = []
        if shapes:
            k = shapes[0]
            details.append(f"{len(shapes)} shape mismatch(es), e.g. {k}: checkpoint "
                           f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        if missing:
            details.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise CheckpointError(
            f"{ckpt.get('path', 'checkpoint')}: holds {held}, which does not match "
            f"{describe or 'the model'}: " + "; ".join(details))
    model.load_state_dict(state)
