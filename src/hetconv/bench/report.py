"""Benchmark rows -> markdown tables, target checks, the speedup-vs-P plot, JSON."""

from __future__ import annotations

import contextlib
import math
import os
import platform
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch

from .. import pattern as _pattern
from .._files import atomic_write_text, json_text, replacing

__all__ = ["environment", "layer_table", "model_table", "target_checks", "plot_speedup",
           "write_report", "atomic_write"]

#: columns of the per-layer table, in order (speedup vs the best dense baseline)
LAYER_COLUMNS = ("het_auto", "het_auto_cl", "het_native", "het_native_blocked", "het_native_cl",
                 "het_native_cl_blocked", "het_fused",
                 "het_fused_blocked", "het_grouped", "het_dense", "masked_dense", "grouped_plus_pw", "branches", "gwc_pwc", "dwc_pwc")


def environment() -> Dict[str, str]:
    """Machine, thread count and versions, for the report header."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from .. import __version__

    env = {"cpu": cpu, "logical_cpus": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
           "python": platform.python_version(), "torch": torch.__version__,
           "hetconv": __version__,  # the version measured, next to those it ran on
           "mkldnn": str(torch.backends.mkldnn.is_available()),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "platform": platform.platform()}
    try:
        import onnxruntime
        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return env


#: Write ``text`` to ``path`` via a temporary file and a rename (never half-written).
atomic_write = atomic_write_text


#: the backends timed in both patterns per layer (``het_<b>`` and ``het_<b>_<other>``)
TWIN_BACKENDS = ("fused", "native", "native_cl")


def by_pattern(rows: Sequence[dict]) -> List[dict]:
    """Layer rows with the pattern twins named by pattern: ``het_<b>`` the "shifted" one,
    ``het_<b>_blocked`` the "blocked" one (``b`` in :data:`TWIN_BACKENDS`).  The benchmark
    names them after its ``pattern``: with ``--pattern blocked`` its ``het_fused`` is the
    blocked layer and ``het_fused_shifted`` the shifted one, which the tables and the
    shifted-vs-blocked check would otherwise take for each other or miss.  The other
    ``het_*`` candidates keep their names (they run the rows' ``pattern``)."""
    out = []
    for r in rows:
        name = r.get("candidate", "")
        if r.get("pattern") == "blocked" and name.startswith("het_"):
            for b in TWIN_BACKENDS:
                if name == f"het_{b}":
                    r = dict(r, candidate=f"het_{b}_blocked")
                elif name == f"het_{b}_shifted":
                    r = dict(r, candidate=f"het_{b}")
        out.append(r)
    return out


def _patterns_note(rows: Sequence[dict]) -> Optional[str]:
    """What pattern the per-layer HetConv columns ran when not the default, else None."""
    pats = sorted({r.get("pattern", "shifted") for r in rows})
    if pats == ["shifted"]:
        return None
    return (f"HetConv layers of pattern {' and '.join(repr(p) for p in pats)} (`--pattern`): "
            "the auto, grouped and dense columns ran it; the fused and native columns are "
            "named by pattern (`_blocked`: 'blocked', none: 'shifted').")


def _group(rows: Sequence[dict], keys: Sequence[str]) -> Dict[tuple, List[dict]]:
    out: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def layer_table(rows: Sequence[dict]) -> str:
    """Markdown: one line per (layer, batch, mode, P); speedups vs the best dense baseline."""
    head = ["suite", "layer", "batch", "mode", "P", "best dense ms", "theory"] + list(LAYER_COLUMNS)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, grp in _group(by_pattern(rows), ("suite", "layer", "batch", "mode", "part")).items():
        by = {r["candidate"]: r for r in grp}
        dense = min(r["ms"] for r in grp if r["candidate"].startswith("dense_"))
        cells = list(map(str, key[:4])) + [str(key[4]), f"{dense:.2f}", f"{grp[0]['theory']:.2f}"]
        cells += [f"{by[c]['speedup']:.2f}" if c in by else "" for c in LAYER_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metric_label(metric: str, batch: Optional[int]) -> str:
    """``metric``, with the batch it was measured at when that is not the one its name
    says (``throughput_b64`` at batch 16 in the quick preset: "throughput_b64 (batch 16)")."""
    named = metric.rsplit("_b", 1)[-1]
    if batch is None or not named.isdigit() or int(named) == batch:
        return metric
    return f"{metric} (batch {batch})"


def model_table(rows: Sequence[dict]) -> str:
    """Markdown: one line per (family, model, metric): best variant, time, ratio to the reference."""
    head = ["family", "model", "metric", "best variant", "ms", "images/s", "ratio vs ref",
            "all variants (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (fam, model, metric), grp in _group(rows, ("family", "model", "metric")).items():
        best = min(grp, key=lambda r: r["ms"])
        allv = ", ".join(f"{r['variant']} {r['ms']:.1f}" for r in grp)
        metric = metric_label(metric, best.get("batch"))
        lines.append(f"| {fam} | {model} | {metric} | {best['variant']} | {best['ms']:.1f} | "
                     f"{best['images_per_s']:.1f} | {best['ratio']:.2f} | {allv} |")
    return "\n".join(lines)


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def target_checks(layer_rows: Sequence[dict], model_rows: Sequence[dict]) -> List[str]:
    """The issue's targets, each as one markdown bullet with the measured value and MET/NOT MET."""
    out = []

    def mark(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    def model_row(family, model, metric):
        for r in model_rows:
            if (r["family"], r["model"], r["metric"]) == (family, model, metric) and r["best"]:
                return r
        return None

    for family, metric, goal in (("vgg16_cifar", "throughput_b64", 2.5),
                                 ("vgg16_cifar", "train_step_b64", 2.0),
                                 ("resnet56_cifar", "throughput_b64", 2.2)):
        r = model_row(family, "P4", metric)
        if r is not None:
            v, label = r["ratio"], metric_label(metric, r.get("batch"))
            out.append(f"{family} P4 {label} vs P1: {v:.2f}x (target >= {goal}x): {mark(v >= goal)}")
    by = {(r["suite"], r["layer"], r["batch"], r["mode"], r["part"], r["candidate"]): r
          for r in by_pattern(layer_rows)}
    # "auto" on the input layout that suits it: the dense baseline is the faster of NCHW and
    # channels_last too, so this is the like-for-like comparison.
    for k in [k for k in by if k[5] == "het_auto" and k[:5] + ("het_auto_cl",) in by]:
        a, c = by[k], by[k[:5] + ("het_auto_cl",)]
        by[k[:5] + ("het_auto_best",)] = a if a["speedup"] >= c["speedup"] else c
    autos_named = (("het_auto", "NCHW input"), ("het_auto_best", "the faster input layout"))
    for part in (4, 8):
        for mode in ("infer", "train"):
            for cand, label in autos_named:
                fr = [(k, r["speedup"] / r["theory"]) for k, r in by.items()
                      if k[4] == part and k[3] == mode and k[5] == cand and r["in_ch"] >= 128]
                if fr:
                    worst = min(fr, key=lambda t: t[1])
                    n_ok = sum(f >= 0.8 for _, f in fr)
                    out.append(f"layers with >= 128 channels, P={part}, {mode}, auto ({label}): "
                               f"{n_ok}/{len(fr)} reach 80% of theory; geomean "
                               f"{_geomean([f for _, f in fr]):.0%}, best {max(f for _, f in fr):.0%}, "
                               f"worst {worst[1]:.0%} ({worst[0][0]} {worst[0][1]} b{worst[0][2]}): "
                               f"{mark(n_ok == len(fr))}")
    for cand, label in (("het_auto", "NCHW input"), ("het_auto_cl", "channels_last input"),
                        ("het_auto_best", "the faster input layout")):
        autos = [(k, r["speedup"]) for k, r in by.items() if k[5] == cand]
        if autos:
            slow = [(k, s) for k, s in autos if s < 1.0]
            noise = sum(s >= 0.9 for _, s in slow)
            worst = min(autos, key=lambda t: t[1])
            out.append(f"backend='auto' ({label}) never slower than the best dense baseline: "
                       f"{len(slow)}/{len(autos)} cases slower ({noise} of them within 10%), "
                       f"worst {worst[1]:.2f}x ({' '.join(map(str, worst[0][:5]))}): "
                       f"{mark(not slow)}")
    for backend in ("fused", "native", "native_cl"):
        pairs = [(by[k], by[k[:5] + (f"het_{backend}_blocked",)]) for k in by
                 if k[5] == f"het_{backend}" and k[:5] + (f"het_{backend}_blocked",) in by]
        if pairs:
            ratios = [b["ms"] / s["ms"] for s, b in pairs]  # < 1: shifted slower
            worst = min(ratios)
            within = sum(r >= 1 / 1.1 for r in ratios)
            out.append(f"'shifted' within 10% of 'blocked', single layers ({backend} backend): "
                       f"{within}/{len(ratios)} cases, geomean shifted/blocked time "
                       f"{1 / _geomean(ratios):.3f}, worst {1 / worst:.2f}x: "
                       f"{mark(within == len(ratios))}")
    best_ms = {(r["family"], r["model"], r["metric"]): r["ms"] for r in model_rows if r["best"]}
    for (family, model, metric), ms in sorted(best_ms.items()):
        twin = best_ms.get((family, model + "b", metric))
        if twin is not None:
            out.append(f"'shifted' within 10% of 'blocked', {family} {model} {metric} (best "
                       f"variants): shifted/blocked time {ms / twin:.3f}: {mark(ms <= 1.1 * twin)}")
    return out


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None without matplotlib (an optional extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_speedup(layer_rows: Sequence[dict], model_rows: Sequence[dict], path: str) -> Optional[str]:
    """Figure 5, measured: speedup vs P (theory, layers >= 128 channels, VGG-16 model). PNG path
    (None without matplotlib).  Written whole or not at all."""
    plt = _pyplot()
    if plt is None:
        return None
    with replacing(path, suffix=".png") as tmp:
        _draw_speedup(plt, layer_rows, model_rows, tmp)
    return path


def _draw_speedup(plt, layer_rows: Sequence[dict], model_rows: Sequence[dict], path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        ps = sorted({r["part"] for r in layer_rows if r["part"] > 1} | {2, 4, 8, 16, 32, 64})
        ax.plot(ps, [_pattern.speedup(p) for p in ps], "k-o", label="theory (Eq. 5)")
        for mode, style in (("infer", "s-"), ("train", "^-")):
            xs, ys = [], []
            for p in ps:
                v = [r["speedup"] for r in layer_rows if r["part"] == p and r["mode"] == mode
                     and r["candidate"] == "het_auto" and r["in_ch"] >= 128]
                if v:
                    xs.append(p)
                    ys.append(_geomean(v))
            if xs:
                ax.plot(xs, ys, style, label=f"layers >= 128 ch, {mode} (geomean, auto)")
        for metric, style in (("throughput_b64", "D--"), ("train_step_b64", "v--")):
            pts = sorted((int(r["model"][1:]), r["ratio"]) for r in model_rows
                         if r["family"] == "vgg16_cifar" and r["metric"] == metric and r["best"]
                         and r["model"][1:].isdigit() and int(r["model"][1:]) > 1)
            if pts:
                ax.plot(*zip(*pts), style, label=f"VGG-16 CIFAR model, {metric}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ps)
        ax.set_xticklabels([str(p) for p in ps])
        ax.set_xlabel("part P")
        ax.set_ylabel("speedup over the best dense conv")
        ax.set_title(f"HetConv speedup vs P ({torch.get_num_threads()} CPU threads, fp32)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)


#: how a note (``write_report``'s ``notes``) starts its line in the markdown report
NOTE_PREFIX = "**Note.** "


def write_report(layer_rows: Sequence[dict], model_rows: Sequence[dict], out_dir: str,
                 env: Optional[dict] = None, seconds: Optional[float] = None,
                 name: str = "bench", notes: Sequence[str] = ()) -> Dict[str, str]:
    """Write ``<name>_results.md``, ``<name>_results.json`` and ``<name>_speedup.png`` to ``out_dir``
    (``notes``: paragraphs for the report's head, e.g. that the machine changed speed).

    The files are made as temporary files and replace the old ones at the end: an error
    (a table that cannot be made, an interrupt) leaves the previous report as it was, not
    a new JSON beside an old markdown.  A plot that cannot be drawn does not cost the
    results: the JSON and markdown are written, the markdown says why there is no plot,
    and the previous plot (of other numbers) is removed."""
    env = env or environment()
    paths = {"markdown": os.path.join(out_dir, f"{name}_results.md"),
             "json": os.path.join(out_dir, f"{name}_results.json"),
             "plot": os.path.join(out_dir, f"{name}_speedup.png")}
    data = json_text({"environment": env, "seconds": seconds, "notes": list(notes),
                      "layers": list(layer_rows), "models": list(model_rows)}, indent=1)
    plt = _pyplot() if layer_rows or model_rows else None
    plot_error = None
    with contextlib.ExitStack() as files:
        tmp = {kind: files.enter_context(replacing(paths[kind], suffix=f".{kind}.tmp"))
               for kind in (("json", "markdown", "plot") if plt else ("json", "markdown"))}
        with open(tmp["json"], "w") as f:
            f.write(data)
        if plt:
            try:
                _draw_speedup(plt, layer_rows, model_rows, tmp["plot"])
            except Exception as err:  # (the file left is removed below)
                plot_error = f"{type(err).__name__}: {err}"
        md = _report_markdown(layer_rows, model_rows, env, seconds, name, notes,
                              None if plt is None or plot_error else paths["plot"],
                              plot_error)
        with open(tmp["markdown"], "w") as f:
            f.write(md)
    if plt is None or plot_error:
        if plot_error:
            with contextlib.suppress(FileNotFoundError):
                os.remove(paths["plot"])
        paths.pop("plot")
    return paths


def _report_markdown(layer_rows: Sequence[dict], model_rows: Sequence[dict], env: dict,
                     seconds: Optional[float], name: str, notes: Sequence[str],
                     plot: Optional[str], plot_error: Optional[str]) -> str:
    md = [f"# Benchmark results ({name})", "",
          "Generated by `hetconv bench`; medians of interleaved repeats after warm-up "
          "(with `--settle N` and `--settle-ms T`, defaults 1 and 10, each timed call right "
          "after N untimed calls of the same candidate, more up to T ms in all). "
          "Speedups are against the fastest dense `nn.Conv2d` variant of the same shape "
          "timed in the same batch.", "",
          "| " + " | ".join(env) + " |", "|" + "---|" * len(env),
          "| " + " | ".join(env.values()) + " |", ""]
    if seconds is not None:
        md += [f"Run time: {seconds / 60:.1f} min.", ""]
    for note in notes:
        md += [NOTE_PREFIX + note, ""]
    if plot_error:
        md += [NOTE_PREFIX + f"The speedup plot could not be drawn ({plot_error}).", ""]
    checks = target_checks(layer_rows, model_rows)
    if checks:
        md += ["## Targets", ""] + [f"- {c}" for c in checks] + [""]
    if plot:
        md += [f"![speedup vs P]({os.path.basename(plot)})", ""]
    if model_rows:
        md += ["## Models", "", model_table(model_rows), ""]
    if layer_rows:
        note = _patterns_note(layer_rows)
        md += ["## Layers", ""] + ([note, ""] if note else []) + [layer_table(layer_rows), ""]
    return "\n".join(md)
