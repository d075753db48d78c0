"""Files written whole or not at all (no torch, no package imports: any module may use it)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from typing import Any, Iterator

__all__ = ["atomic_write_text", "json_text", "open_mode", "chmod_like_open", "replacing"]


def _umask() -> int:
    """The process's umask, read without changing it where the system tells it
    (``/proc/self/status``, Linux 4.7+): setting it to read it back would, for that
    moment, give other threads' new files the wrong permissions."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_mode(path: str) -> int:
    """The permission bits ``open(path, "w")`` leaves ``path`` with: those it has when it
    exists, else ``0o666`` less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def chmod_like_open(tmp: str, path: str) -> None:
    """Give ``tmp``, a temporary file about to replace ``path``, the permissions a plain
    ``open(path, "w")`` would give ``path`` (:func:`open_mode`): ``tempfile.mkstemp``
    makes its files ``0o600`` whatever the umask."""
    os.chmod(tmp, open_mode(path))


@contextlib.contextmanager
def replacing(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary file beside ``path`` for a writer that takes a file name (matplotlib,
    the ONNX exporter, ...): when the block ends, it gets the permissions a plain ``open``
    would give ``path`` (:func:`open_mode`) and replaces ``path`` (a reader sees the old
    file or the whole new one); when the block raises, it is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        chmod_like_open(tmp, path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename (never half-written): a
    reader sees the old file or the whole new one, with the permissions a plain ``open``
    would give it (:func:`open_mode`).  (Checkpoints, which must also survive a
    power cut, use :func:`hetconv.train.checkpoint.atomic_write`, which syncs to disk.)"""
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, in nested
    dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_text(obj: Any, **kwargs: Any) -> str:
    """``json.dumps(obj, **kwargs)`` as strict JSON: a non-finite float (a NaN validation
    loss, an infinite ratio) is written as ``null``, not as the ``NaN`` / ``Infinity``
    tokens Python writes by default, which strict readers (``jq``, JavaScript, most JSON
    libraries) reject."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)
