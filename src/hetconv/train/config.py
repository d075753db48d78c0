"""Training configuration: one dataclass, the paper's presets, validation where values enter."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

__all__ = ["PRESETS", "TrainConfig", "load_config", "resolve_config"]

SCHEDULES = ("step", "cosine", "constant")
AMP_MODES = (None, "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json`` in the run directory).

    Model: ``model`` is a registry name (``"vgg16_cifar_p4"``); ``model_kwargs`` go to
    :func:`hetconv.create_model` (``part``, ``width``, ``se``, ...).
    Optimisation: SGD with ``momentum``/``nesterov``/``weight_decay``; the learning rate
    follows ``schedule``: ``"step"`` (times ``lr_gamma`` every ``lr_step`` epochs),
    ``"cosine"`` (to 0 over ``epochs``) or ``"constant"``; stepped once per epoch.
    ``batch_size`` is the global batch, split evenly over distributed processes.
    Data: ``train_subset``/``val_subset`` keep a fixed random subset of that many images,
    drawn with ``subset_seed`` (default 0), not ``seed``: runs of a seed sweep train and
    validate on the same images (configs saved before ``subset_seed`` existed drew them with
    ``seed``, and load so); ``limit_train_batches``/``limit_val_batches`` cut each epoch short
    (smoke tests).  ``workers=None`` picks 0 for in-memory data sets and up to 8 otherwise.
    Run directory: ``out/name`` (``name`` defaults to ``<model>-<data>-s<seed>``).
    """

    model: str = "vgg16_cifar_p4"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    data: str = "fashion-mnist"
    data_dir: Optional[str] = None
    augment: bool = True
    image_size: Optional[int] = None
    preset: Optional[str] = None
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: Optional[int] = None
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "step"
    lr_step: int = 50
    lr_gamma: float = 0.1
    label_smoothing: float = 0.0
    train_subset: Optional[int] = None
    val_subset: Optional[int] = None
    limit_train_batches: Optional[int] = None
    limit_val_batches: Optional[int] = None
    seed: int = 0
    subset_seed: int = 0
    workers: Optional[int] = None
    device: str = "auto"
    channels_last: bool = False
    compile: bool = False
    absorb_permutations: bool = False
    amp: Optional[str] = None
    out: str = "runs"
    name: Optional[str] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "TrainConfig":
        """Raise ``ValueError``/``TypeError`` naming the first bad field and what is allowed."""
        def check_int(name, low, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an int >= {low}"
                                 f"{' or None' if optional else ''}, got {v!r}")

        def check_float(name, low, high=math.inf, low_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < low or v > high or (low_open and v == low):
                raise ValueError(f"{name} must be a finite number in "
                                 f"{'(' if low_open else '['}{low}, {high}], got {v!r}")

        if not isinstance(self.model, str) or not self.model:
            raise TypeError(f"model must be a model name (str), got {self.model!r}")
        if not isinstance(self.model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict, got {type(self.model_kwargs).__name__}")
        if not isinstance(self.data, str):
            raise TypeError(f"data must be a data set name (str), got {self.data!r}")
        for name in ("augment", "nesterov", "channels_last", "compile", "absorb_permutations"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "lr_step"):
            check_int(name, 1)
        check_int("seed", 0)
        check_int("subset_seed", 0)
        for name in ("eval_batch_size", "train_subset", "val_subset", "limit_train_batches",
                     "limit_val_batches", "image_size"):
            check_int(name, 1, optional=True)
        check_int("workers", 0, optional=True)
        check_float("lr", 0.0, low_open=True)
        check_float("momentum", 0.0, 1.0)
        check_float("weight_decay", 0.0)
        check_float("lr_gamma", 0.0, 1.0, low_open=True)
        check_float("label_smoothing", 0.0, 1.0)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name
                                      or "/" in self.name or self.name in (".", "..")):
            raise ValueError(f"name must be a plain directory name, got {self.name!r}")
        try:
            json.dumps(self.model_kwargs, allow_nan=False)  # (as config.json will hold them)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"model_kwargs must be JSON-serialisable: {exc}") from None
        return self

    @property
    def run_name(self) -> str:
        return self.name or f"{self.model}-{self.data}-s{self.seed}"

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    @classmethod
    def from_saved(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """A config saved by a run (``config.json``, a checkpoint's), from any version."""
        return cls.from_dict(saved_config(values))


def saved_config(values: Mapping[str, Any]) -> Dict[str, Any]:
    """A config dict saved by a run, in the current fields: one saved before
    ``subset_seed`` existed drew its subsets with its ``seed``."""
    values = dict(values)
    if "subset_seed" not in values:
        values["subset_seed"] = values.get("seed", 0)
    return values


# The paper's settings (PAPER.md, "Training settings reported") and the demo's.
PRESETS: Dict[str, Dict[str, Any]] = {
    # CIFAR-10, the settings of Li et al.: SGD 0.9, wd 5e-4, batch 128, lr 0.1 /10 every
    # 50 epochs; the paper does not state the epoch count, 150 covers three lr stages.
    "paper-cifar": dict(data="cifar10", epochs=150, batch_size=128, lr=0.1, momentum=0.9,
                        weight_decay=5e-4, schedule="step", lr_step=50, lr_gamma=0.1),
    # ImageNet: wd 1e-4, batch 256, lr 0.1 /10 every 30 epochs, 90 epochs.
    "paper-imagenet": dict(data="imagefolder", epochs=90, batch_size=256, lr=0.1,
                           momentum=0.9, weight_decay=1e-4, schedule="step", lr_step=30,
                           lr_gamma=0.1, image_size=224),
    # `make demo`: a quarter-width HetConv VGG-16 (P=4) on a fixed 20k-image subset of
    # Fashion-MNIST, 2 epochs: about a minute or two per model on 2 CPU cores.
    "quick": dict(model="vgg16_cifar_p4", model_kwargs={"width": 0.25}, data="fashion-mnist",
                  epochs=2, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                  schedule="cosine", augment=False, train_subset=20000),
}


def resolve_config(preset: Optional[str] = None, **overrides: Any) -> TrainConfig:
    """Defaults, then ``preset``'s values, then ``overrides`` (``None`` means "not given")."""
    values: Dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        values.update(PRESETS[preset])
        values["model_kwargs"] = dict(values.get("model_kwargs", {}))
        values["preset"] = preset
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "model_kwargs":
            values["model_kwargs"] = {**values.get("model_kwargs", {}), **value}
        else:
            values[key] = value
    return TrainConfig.from_dict(values)


def load_config(path: Union[str, Path]) -> TrainConfig:
    """The config of a run directory (``RUN_DIR/config.json``) or of a config JSON file."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config (is this a run directory?)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt config JSON ({exc})") from None
    if isinstance(data, dict) and "config" in data:  # written by a run (from any version)
        return TrainConfig.from_saved(data["config"])
    return TrainConfig.from_dict(data)
