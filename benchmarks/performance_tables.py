#!/usr/bin/env python
"""Markdown tables for docs/performance.md from a results JSON written by ``hetconv bench``.

Prints the target checks, the table of layers with >= 128 channels at P = 4 and 8 (every
backend and public design side by side) and the per-model table, so the numbers quoted
in the docs come from one file::

    python benchmarks/performance_tables.py docs/full_results.json > /tmp/tables.md
"""

from __future__ import annotations

import argparse
import json
import sys

from hetconv.bench.report import by_pattern, model_table, target_checks

COLUMNS = (("het_auto", "auto (NCHW)"), ("het_auto_cl", "auto (channels_last)"),
           ("het_native", "native (NCHW)"), ("het_native_cl", "native (channels_last)"),
           ("het_fused", "fused shifted"),
           ("het_fused_blocked", "fused blocked"), ("grouped_plus_pw", "grouped+full PWC (public)"),
           ("masked_dense", "masked dense (public)"), ("gwc_pwc", "GWC+PWC"),
           ("dwc_pwc", "DWC+PWC"))


def wide_layer_table(rows, min_channels: int = 128, parts=(4, 8)) -> str:
    head = ["suite", "layer", "mode", "P", "theory"] + [label for _, label in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = {}
    for r in by_pattern(rows):  # "fused shifted" is the shifted one whatever --pattern was
        if r["in_ch"] >= min_channels and r["part"] in parts:
            groups.setdefault((r["suite"], r["layer"], r["batch"], r["mode"], r["part"]), {})[
                r["candidate"]] = r
    for (suite, layer, batch, mode, part), by in groups.items():
        theory = next(iter(by.values()))["theory"]
        cells = [suite, f"{layer} b{batch}", mode, str(part), f"{theory:.2f}"]
        cells += [f"{by[c]['speedup']:.2f}" if c in by else "" for c, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="a <name>_results.json written by hetconv bench")
    args = p.parse_args(argv)
    with open(args.results) as f:
        data = json.load(f)
    layers, models = data["layers"], data["models"]
    print("### Targets (measured)\n")
    print("\n".join(f"- {c}" for c in target_checks(layers, models)))
    print("\n### Layers with >= 128 channels at P = 4 and 8 (speedup vs best dense)\n")
    print(wide_layer_table(layers))
    print("\n### Models\n")
    print(model_table(models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
