"""``hetconv`` command line: argument parsing only, the work lives in the package.

Each subcommand is one ``_add_<name>`` function that declares its arguments
and sets ``func`` to a handler taking the parsed namespace.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from typing import Callable, List, Optional


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="short end-to-end showcase of the HetConv layer",
        description="Build HetConv layers, check every backend against the dense reference "
                    "and print what they cost.")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    import torch

    from . import functional as HF
    from . import pattern
    from .layers import HetConv2d

    torch.manual_seed(args.seed)
    x = torch.randn(8, 64, 32, 32)
    print(f"{'part':>5} {'params':>8} {'MACs':>12} {'theory x':>9}  max |backend - dense|")
    for part in (1, 2, 4, 8, 16, 32, "C"):
        layer = HetConv2d(64, 64, 3, part=part)
        ref = torch.nn.functional.conv2d(x, layer.dense_weight(), None, 1, 1)
        errs = []
        for backend in HF.BACKENDS:
            layer.backend = backend
            errs.append(f"{backend}={(layer(x) - ref).abs().max().item():.1e}")
        params = sum(p.numel() for p in layer.parameters())
        macs = pattern.hetconv_macs(64, 64, 3, 32, part)
        print(f"{str(part):>5} {params:>8,} {macs:>12,} {pattern.speedup(layer.part):>9.2f}  "
              + " ".join(errs))
    return 0


def _number_arg(cast: Callable, low: float, inclusive: bool = True) -> Callable:
    """An argparse ``type``: ``cast(text)`` at least ``low`` (above it unless ``inclusive``),
    else an error naming what is allowed (argparse adds the option's name)."""
    kind = "an int" if cast is int else "a number"
    allowed = f"{kind} {'>=' if inclusive else '>'} {low:g}"

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (
                value < low if inclusive else value <= low):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    parse.__name__ = allowed  # what argparse calls the type in its own messages
    return parse


_positive_int = _number_arg(int, 1)


def _part_arg(text: str):
    """``--part``: an int >= 1, or C."""
    if text.upper() == "C":
        return "C"
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"must be an int >= 1 or C, got {text!r}") from e


_part_arg.__name__ = "an int >= 1 or C"


def _size_arg(text: str):
    """``--input``: CxHxW, e.g. 3x32x32."""
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"input must be CxHxW with positive ints, e.g. 3x32x32, got {text!r}")
    return size


def _add_profile(sub) -> None:
    p = sub.add_parser(
        "profile", help="count a model's MACs and parameters, layer by layer",
        description="Build a registered model and count the multiply-accumulates of its conv "
                    "and linear layers (the paper's FLOPs) and its parameters, per module. "
                    "Weights are never allocated (the model is built on the meta device).")
    p.add_argument("model", help="model name: an architecture (vgg16_cifar, resnet56_cifar, "
                                 "mobilenet_cifar, vgg16, resnet34, resnet50) optionally with the "
                                 "paper's suffixes (_p4, _pc, _se, _gwc4_pwc, _dwc_pwc); "
                                 "`hetconv models` lists them")
    p.add_argument("--part", type=_part_arg, default=None,
                   help="P of the HetConv layers: a positive int or C (P = in_channels); "
                        "default: as the name says (standard convolutions without a _pN suffix)")
    p.add_argument("--input", type=_size_arg, default=None, metavar="CxHxW",
                   help="input size without batch, e.g. 1x28x28 (sets in_chans); default: the "
                        "model's own (3x32x32 for CIFAR models, 3x224x224 for ImageNet ones)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier outputs (default: the architecture's, 10 or 1000)")
    p.add_argument("--all", action="store_true",
                   help="also list modules without MACs or parameters (BN, ReLU, pooling)")
    p.add_argument("--total", action="store_true", help="print only the totals")
    p.set_defaults(func=_run_profile)


def _run_profile(args) -> int:
    from .models import AllDenseWarning, profile_model

    kwargs = {} if args.part is None else {"part": args.part}
    try:
        with warnings.catch_warnings():  # (said below as the command's own warning)
            warnings.simplefilter("ignore", AllDenseWarning)
            result = profile_model(args.model, input_size=args.input,
                                   num_classes=args.num_classes, **kwargs)
    except (ValueError, TypeError) as err:
        print(f"hetconv profile: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # e.g. pooling shrinks a too small input to nothing
        size = "the model's input size" if args.input is None else \
            f"--input {'x'.join(map(str, args.input))}"
        print(f"hetconv profile: error: {args.model} cannot run on {size} "
              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})",
              file=sys.stderr)
        return 2
    from .models.registry import all_dense_warning

    warning = all_dense_warning(args.model, kwargs,
                                sum(row.type == "HetConv2d" for row in result.rows))
    if warning:
        print(f"hetconv profile: warning: {warning}", file=sys.stderr)
    if args.total:
        print(f"{args.model}: {result.macs:,} MACs, {result.params:,} params")
    else:
        print(result.table(all_rows=args.all))
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the registered models",
                       description="List registered model names (with the paper's variants).")
    p.add_argument("filter", nargs="?", default="*",
                   help="glob on the names, e.g. 'vgg16_cifar*' (default: all)")
    p.set_defaults(func=_run_models)


def _run_models(args) -> int:
    from .models import list_models

    for name in list_models(args.filter):
        print(name)
    return 0


def _add_paper_tables(sub) -> None:
    p = sub.add_parser(
        "paper-tables", help="recompute the paper's FLOPs / params / reduction columns",
        description="Build every model of Tables 1, 3, 4, 5, 6 and 7 of the HetConv paper, "
                    "count it, and print the paper's figure beside the computed one and the "
                    "difference (percent for FLOPs and params, points for reductions).")
    p.add_argument("--table", type=int, action="append", choices=(1, 3, 4, 5, 6, 7),
                   help="only this table (repeatable; default: all)")
    p.set_defaults(func=_run_paper_tables)


def _run_paper_tables(args) -> int:
    from . import paper

    rows = [r for r in paper.PAPER_ROWS if not args.table or r.table in args.table]
    print(paper.format_reproduction(paper.reproduce(rows, progress=True)))
    return 0


def _add_train(sub) -> None:
    from .train.commands import parse_model_arg
    from .data import DATASETS
    from .train.config import DEVICES, PRESETS, SCHEDULES

    p = sub.add_parser(
        "train", help="train a model (from scratch) into a run directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model from scratch. Values come from the defaults, then --preset, "
                    "then the options given. The run directory OUT/NAME receives config.json, "
                    "metrics.jsonl/.csv, checkpoints/last.pt and best.pt, train.log and "
                    "summary.json.",
        epilog="presets:\n" + "\n".join(
            f"  {k}: " + " ".join(f"{a}={b}" for a, b in v.items()) for k, v in PRESETS.items()) +
               "\n\nmulti-process: torchrun --nproc_per_node N -m hetconv train ... "
               "(DDP; --batch-size is the global batch)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="registry name, e.g. vgg16_cifar_p4, resnet56_cifar_p2_se "
                                   "(default: vgg16_cifar_p4)")
    g.add_argument("--part", type=_part_arg, help="HetConv part P (int or C) for a model name without a _p<P> suffix")
    g.add_argument("--width", type=float, help="channel width multiplier (e.g. 0.25)")
    g.add_argument("--se", action="store_true", default=None, help="add squeeze-excitation blocks")
    g.add_argument("--model-arg", type=parse_model_arg, action="append", metavar="KEY=VALUE",
                   help="any other create_model keyword (repeatable; VALUE parsed as JSON)")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=sorted(DATASETS),
                   help="data set (default: fashion-mnist)")
    g.add_argument("--data-dir", help="where the data set is (default lookup: $HETCONV_DATA/"
                                      "<name>, then /usr/share/datasets/fashion-mnist)")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="switch off the training augmentation")
    g.add_argument("--image-size", type=int, help="imagefolder crop size (default: 224)")
    g.add_argument("--train-subset", type=int, metavar="N",
                   help="train on a fixed random subset of N images")
    g.add_argument("--val-subset", type=int, metavar="N",
                   help="validate on a fixed random subset of N images")
    g.add_argument("--subset-seed", type=int, metavar="S",
                   help="seed of the --train-subset / --val-subset draws (default: 0, "
                        "whatever --seed: a seed sweep uses the same images)")
    g.add_argument("--workers", type=int, help="data-loader processes per rank (default: 0 for "
                                              "in-memory data sets, 8 for imagefolder)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--preset", choices=sorted(PRESETS), help="named set of defaults (see below)")
    g.add_argument("--epochs", type=int, help="number of epochs (default: 10)")
    g.add_argument("--batch-size", type=int, help="global batch size (default: 128)")
    g.add_argument("--eval-batch-size", type=int, help="validation batch per rank "
                                                       "(default: twice the training batch)")
    g.add_argument("--lr", type=float, help="initial learning rate (default: 0.1)")
    g.add_argument("--momentum", type=float, help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=float, help="L2 weight decay (default: 5e-4)")
    g.add_argument("--schedule", choices=SCHEDULES,
                   help="learning-rate schedule, stepped per epoch (default: step)")
    g.add_argument("--lr-step", type=int, help="epochs between lr drops, step schedule (50)")
    g.add_argument("--lr-gamma", type=float, help="lr factor at each drop (default: 0.1)")
    g.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing (0)")
    g.add_argument("--seed", type=int, help="random seed: init, data order, augmentation (0)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="directory of run directories (default: runs)")
    g.add_argument("--name", help="run directory name (default: <model>-<data>-s<seed>)")
    g.add_argument("--resume", metavar="RUN_DIR",
                   help="continue RUN_DIR from its last complete checkpoint (its saved config; "
                        "only --epochs, --workers, --data-dir, --device, --eval-batch-size, "
                        "--compile and --absorb-permutations may change)")
    g.add_argument("--force", action="store_true",
                   help="overwrite an existing run directory (only a run directory: a "
                        "directory that is not one is never deleted)")
    g.add_argument("--limit-train-batches", type=int, metavar="N",
                   help="stop each epoch after N batches (smoke tests)")
    g.add_argument("--limit-val-batches", type=int, metavar="N",
                   help="validate on N batches only (smoke tests)")
    g = p.add_argument_group("performance")
    g.add_argument("--device", choices=DEVICES, help="default: auto (CUDA if any)")
    g.add_argument("--channels-last", action="store_true", default=None,
                   help="channels-last memory format for model and inputs")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--absorb-permutations", action="store_true", default=None,
                   help="run shifted HetConv layers as blocked ones on class-sorted activations "
                        "(no per-layer channel gathers; same parameters and checkpoints)")
    g.add_argument("--amp", choices=("bf16",), help="bfloat16 autocast")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .train.commands import run_train

    return run_train(args)


def _add_evaluate(sub) -> None:
    from .data import DATASETS

    p = sub.add_parser(
        "evaluate", help="accuracy, loss, MACs, params and images/s of a trained model",
        description="Evaluate a run directory (its last or best checkpoint) or a checkpoint "
                    "file on the validation split of its data set.")
    p.add_argument("path", metavar="RUN_DIR_or_CHECKPOINT", help="run directory or .pt file")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last",
                   help="which checkpoint of a run directory (default: last)")
    p.add_argument("--data", choices=sorted(DATASETS),
                   help="evaluate on this data set instead (same classes and channels)")
    p.add_argument("--data-dir", help="where the data set is (default: as trained)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    p.add_argument("--workers", type=int, default=0, help="data-loader processes (default: 0)")
    p.add_argument("--limit-batches", type=_positive_int, metavar="N",
                   help="evaluate N batches only (default: all, or for a run trained with "
                        "--limit-val-batches the images it validated on)")
    p.add_argument("--full-split", action="store_true",
                   help="a run trained with --val-subset N or --limit-val-batches: evaluate "
                        "on the whole validation split (default: on the images its recorded "
                        "accuracy is from)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N or auto (CUDA if any) (default: cpu)")
    p.add_argument("--optimize", action="store_true",
                   help="evaluate the deployable model hetconv.optimize_for_inference makes "
                        "of it (BatchNorm folded, fastest backend per layer measured on the "
                        "first batch, outputs checked): its accuracy and images/s (CPU, "
                        "float32)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from .train.commands import run_evaluate

    return run_evaluate(args)


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare", help="table and accuracy-vs-MACs plot of finished runs",
        description="Compare finished runs: accuracy, MACs, params, their reduction relative "
                    "to the dense (P=1) run of the same data set, and throughput.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("--plot", default=None,
                   help="plot to write (replaced if it exists), in the format of its extension "
                        "(.png, .pdf, .svg, ...; '' for none; default: accuracy_vs_macs.png in "
                        "the current directory, or accuracy_vs_macs_2.png, _3, ... if that "
                        "exists: the default never replaces a file)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    from .train.commands import run_compare

    return run_compare(args)


def _add_bench(sub) -> None:
    from ._timing import IDLE_MS, SETTLE_MS
    from .pattern import PATTERNS

    p = sub.add_parser(
        "bench", help="speed benchmark: HetConv vs the best dense conv, per layer and per model",
        description="Time every way of computing HetConv layers and models (hetconv backends, "
                    "dense nn.Conv2d in NCHW/channels_last, public designs, GWC/DWC+PWC, "
                    "optimize_for_inference, onnxruntime) side by side, interleaved, medians "
                    "after warm-up; write <out>/<name>_results.md/.json and a speedup-vs-P plot.")
    p.add_argument("--quick", action="store_true",
                   help="a small version (3 VGG layers at batch 16, P in {1, 4}; VGG-16 P1 vs "
                        "P4 throughput): about a minute on 2 cores")
    p.add_argument("--what", choices=("all", "layers", "models"), default="all",
                   help="per-layer shapes, per-model timings or both (default: all)")
    p.add_argument("--out", default="docs", help="output directory (default: docs)")
    p.add_argument("--name", default=None,
                   help="file name prefix of the results (default: 'quick' or 'full', and "
                        "'<that>_layers' / '<that>_models' with --what layers / models)")
    p.add_argument("--threads", type=_positive_int, default=2,
                   help="torch intra-op threads (default: 2, the target machine)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed repeats per candidate (default: 3 quick; full: 5 per layer, 9 per "
                        "model - the models' samples are cheap next to their optimization; "
                        "batch-1 latency takes 3 times as many)")
    p.add_argument("--settle", type=_number_arg(int, 0), default=1,
                   help="untimed calls of a candidate right before each of its timed calls "
                        "(default: 1, steady state: no candidate is timed cold after another "
                        "one evicted its caches; 0 halves the run time, noisier)")
    p.add_argument("--settle-ms", type=_number_arg(float, 0), default=SETTLE_MS,
                   help="... and more untimed calls until they took this many milliseconds "
                        "(default: 10; batch-1 calls of 1-3 ms were still slowed after one "
                        "untimed call by what ran before, e.g. onnxruntime's spinning threads)")
    p.add_argument("--idle-ms", type=_number_arg(float, 0), default=IDLE_MS,
                   help="sleep this many milliseconds before each model candidate's calls "
                        f"(default: {IDLE_MS:g}): onnxruntime's threads spin after its call and "
                        "kept slowing the next torch model through 10 ms of its calls (VGG-16 "
                        "P4 at batch 1: 7.1 ms against 2.4 ms); idle cores let them park")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile'd dense baselines (per layer) and compiled "
                        "models (inference), so the best of eager and compiled is the "
                        "reference (default: on in the full run, off with --quick; "
                        "--no-compile saves the compile minutes)")
    p.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime model variant")
    p.add_argument("--pattern", choices=PATTERNS, default="shifted",
                   help="HetConv pattern of the per-layer candidates (default: shifted; the "
                        "other pattern is always timed for the fused and native backends)")
    p.add_argument("--max-minutes", type=_number_arg(float, 0, inclusive=False), default=None,
                   help="start no new item after this many minutes; report what was measured")
    p.add_argument("--no-retain-memory", action="store_true",
                   help="leave glibc free to return freed memory to the system; by default it "
                        "keeps it, so no torch candidate pays for page-faulting in what "
                        "another candidate's calls gave back (a process running one model "
                        "in a loop has no such faults)")
    p.add_argument("--no-isolate", action="store_true",
                   help="time the models in the benchmark's own process; by default each "
                        "family and metric runs in a fresh process, so no model pays for "
                        "what earlier models left behind (heap, caches) - a deployed model "
                        "runs alone")
    p.add_argument("--machine", action="store_true",
                   help="only describe the machine and exit: CPU, threads, versions, the "
                        "native kernel and its FMA rate now (GFLOP/s; on a shared host it "
                        "drops when other guests load the cores: check it before a long run)")
    p.set_defaults(func=_run_bench)


def _machine(threads: int) -> int:
    import torch

    from . import native
    from .bench.report import environment

    torch.set_num_threads(threads)
    for key, value in environment().items():
        print(f"{key}: {value}")
    if not native.available():
        print(f"native kernel: unavailable ({native.build_error()})")
        return 0
    print(f"native kernel: {'AVX-512' if native.vectorized() else 'scalar (no AVX-512)'}")
    print(f"fma_rate: {native.fma_rate(threads):.0f} GFLOP/s on {threads} thread(s)")
    return 0


def _run_bench(args) -> int:
    import sys

    from .bench import run
    from .bench.report import NOTE_PREFIX

    if args.machine:
        return _machine(args.threads)
    what = ("layers", "models") if args.what == "all" else (args.what,)
    paths = run("quick" if args.quick else "full", out_dir=args.out, what=what,
                threads=args.threads, repeats=args.repeats, compile=args.compile,
                onnx=not args.no_onnx, pattern=args.pattern, progress=sys.stderr.isatty(),
                name=args.name, max_minutes=args.max_minutes, settle=args.settle,
                settle_ms=args.settle_ms, idle_ms=args.idle_ms,
                retain_memory=not args.no_retain_memory, isolate=not args.no_isolate)
    with open(paths["markdown"]) as f:
        text = f.read()
    start = text.find("## Targets")
    end = text.find("\n## ", start + 3) if start >= 0 else -1
    print(text if start < 0 else text[start:] if end < 0 else text[start:end])
    for line in text.splitlines():
        if line.startswith(NOTE_PREFIX):  # e.g. the machine changed speed during the run
            print(line)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


_COMMANDS: List[Callable] = [_add_demo]
_COMMANDS += [_add_profile, _add_models, _add_paper_tables]
_COMMANDS += [_add_train, _add_evaluate, _add_compare]
_COMMANDS += [_add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetconv",
        description="HetConv (heterogeneous kernel-based convolution): layers, models, "
                    "training, cost accounting and benchmarks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
