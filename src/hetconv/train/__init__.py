"""Training and evaluation: configs and presets, the engine, checkpoints, distributed runs.

Python API (what ``hetconv train|evaluate|compare`` call)::

    from hetconv.train import fit, resolve_config, evaluate, compare
    summary = fit(resolve_config("quick", out="runs", name="demo"))
    print(evaluate("runs/demo")["top1"])
"""

from .checkpoint import CheckpointError, load_checkpoint, load_model_state
from .config import PRESETS, TrainConfig, load_config, resolve_config
from .engine import (NonFiniteLossError, RunDirExistsError, build_model, evaluate_model, fit,
                     model_identity)
from .evaluate import compare, evaluate, format_compare, load_summary, plot_compare

__all__ = ["CheckpointError", "NonFiniteLossError", "PRESETS", "RunDirExistsError",
           "TrainConfig", "build_model", "compare", "evaluate", "evaluate_model", "fit",
           "format_compare", "load_checkpoint", "load_config", "load_model_state",
           "load_summary", "model_identity", "plot_compare", "resolve_config", "resume"]


def resume(run_dir, **overrides):
    """Continue the run in ``run_dir`` from its last complete checkpoint.

    ``overrides`` may change only fields that do not alter the computation (``epochs``
    to extend the run, ``workers``, ``data_dir``, ``device``, ...).
    """
    config = load_config(run_dir)
    values = config.to_dict()
    values.update({k: v for k, v in overrides.items() if v is not None})
    return fit(TrainConfig.from_dict(values), resume=run_dir)
