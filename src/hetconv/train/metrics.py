"""Accuracy counting and the per-epoch metrics files (JSONL and CSV)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from .._files import json_text
from .checkpoint import atomic_write

__all__ = ["TIMING_KEYS", "topk_correct", "write_metrics"]

# Fields that measure the machine, not the model: they differ between identical runs.
TIMING_KEYS = ("time_s", "train_images_per_s", "val_images_per_s")


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> List[int]:
    """How many rows of ``logits`` have their target among the top ``k`` scores, per ``k``
    (``k`` larger than the number of classes counts every row)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(targets.view(-1, 1))
    return [int(hit[:, :min(k, maxk)].any(dim=1).sum()) for k in ks]


def write_metrics(run_dir: Path, history: Sequence[Mapping[str, float]]) -> Tuple[Path, Path]:
    """(Re)write ``metrics.jsonl`` and ``metrics.csv`` from the whole ``history``, atomically.

    Rewriting from the history kept in the checkpoint (rather than appending) keeps the
    files consistent with the last checkpoint even after a kill at any moment.
    """
    jsonl = "".join(json_text(dict(r)) + "\n" for r in history)
    keys: Dict[str, None] = {}
    for record in history:
        keys.update(dict.fromkeys(record))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(keys), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    paths = (run_dir / "metrics.jsonl", run_dir / "metrics.csv")
    atomic_write(paths[0], jsonl.encode())
    atomic_write(paths[1], text.getvalue().encode())
    return paths
