"""Files written whole or not at all (no torch, no package imports: any module may use it)."""

from __future__ import annotations

import os
import tempfile

__all__ = ["atomic_write_text"]


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename (never half-written): a
    reader sees the old file or the whole new one.  (Checkpoints, which must also survive a
    power cut, use :func:`hetconv.train.checkpoint.atomic_write`, which syncs to disk.)"""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
