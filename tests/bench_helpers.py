"""Test helpers for the benchmark: its scripts as modules, and its runner with the
measuring parts faked."""

import importlib
import importlib.util
import pathlib
from types import ModuleType

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` (the scripts are no package) loaded as a module of its own."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(monkeypatch, model_rows=(), layer_rows=()) -> dict:
    """``hetconv.bench.run`` measuring nothing: ``run_models`` / ``run_layers`` return the
    rows given, the FMA rate is unknown and no report is written.  The dict returned fills
    in as ``run`` goes: ``models`` / ``layers`` (the keyword arguments they got), and
    ``env``, ``name``, ``notes`` (what the report would have been given)."""
    run_mod = importlib.import_module("hetconv.bench.run")  # the module, not bench.run()
    seen: dict = {}
    monkeypatch.setattr(run_mod, "run_models",
                        lambda *a, **k: seen.update(models=k) or list(model_rows))
    monkeypatch.setattr(run_mod, "run_layers",
                        lambda *a, **k: seen.update(layers=k) or list(layer_rows))
    monkeypatch.setattr(run_mod.native, "fma_rate", lambda *a, **k: None)
    monkeypatch.setattr(run_mod, "write_report",
                        lambda layers, models, out, env, seconds, name, notes:
                        seen.update(env=env, name=name, notes=notes) or {"env": env})
    return seen
