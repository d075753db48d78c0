"""Speed benchmarks: per-layer and per-model, HetConv against the best dense baseline.

``run(...)`` measures and returns result rows; :mod:`.report` turns them into
markdown tables and the speedup-vs-P plot (the paper's Figure 5, measured).
Timing is interleaved across candidates with medians after warm-up
(:mod:`hetconv._timing`), so ratios within one run are fair on a shared machine.
"""

from .layers import LAYER_SUITES, LayerShape, layer_candidates, layer_shapes, run_layers
from .models import MODEL_SUITES, run_models
from .report import environment, plot_speedup, write_report
from .run import run

__all__ = ["LAYER_SUITES", "LayerShape", "layer_candidates", "layer_shapes", "run_layers",
           "MODEL_SUITES", "run_models", "environment", "plot_speedup", "write_report", "run"]
