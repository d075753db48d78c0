"""The ``"native"`` backend: HetConv as one direct convolution in C (AVX-512, OpenMP).

PyTorch has no operator whose cost is the paper's FL_HC: a grouped KxK
convolution plus a pointwise one costs ``FL_K + Do*Do*N*M`` and, for groups
of 4-16 channels (ResNet-56's layers), oneDNN's grouped convolution runs no
faster than the dense one.  ``csrc/hetconv_cpu.c`` computes the layer
directly: the centre taps of all kernels form one dense (N x M) pointwise
matrix, the other taps touch only each filter's M/P class channels, and the
arithmetic is vectorised over output pixels, so narrow groups waste no SIMD
lanes and the multiply-adds are exactly FL_HC.  "shifted" costs no
permutation: input planes are read, output planes written, through index
lists.

Scope: CPU, float32, stride 1 or 2, dilation 1, padding ``kernel // 2`` with an
odd kernel.  Two kernels, picked by the input's memory format:

* NCHW input: ``csrc/hetconv_cpu.c``, vectorised over output pixels (any P,
  narrow layers included).  Backward in C too: the input gradient through the
  same kernel on the transposed weights (stride 1, P | N; else the dense
  reference's ``aten.convolution_backward``), the weight gradient in its own
  kernel.
* channels_last input, on the layers :func:`nhwc_supported` accepts ("shifted"
  with P in {2, 4, 8, 16}, "blocked" with 16 | N/P): ``csrc/hetconv_nhwc.c``,
  vectorised over output channels (wide layers).  Input gradient through the
  same kernel (stride 2 as a transposed strided convolution), weight gradient
  (centre and other taps) in one C pass over the activations; the result is
  channels_last.

The C file is compiled on first use with the system C compiler (``cc``,
``-O3 -march=native -fopenmp``; ``$HETCONV_NATIVE_MARCH`` replaces ``native``)
into a cache directory
(``$HETCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/hetconv``, else
``~/.cache/hetconv``; a private directory under the system temp dir when that is not
writable), keyed by the source, the flags and the CPU's feature
flags; the build is atomic (a temporary file renamed into place), so
concurrent processes are safe.  :func:`available` says whether the kernel
loaded; :func:`vectorized` whether it was built with AVX-512 (without it the
kernel runs scalar loops, correct but slow, and ``"auto"`` never picks it).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional, Tuple

import torch
import torch.autograd.forward_ad as _fwad
from torch.utils.weak import WeakIdKeyDictionary

from . import pattern as _pattern
from ._files import atomic_write_text

__all__ = ["available", "vectorized", "unsupported_reason", "native_conv2d", "build_error",
           "nhwc_supported"]

log = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "hetconv_cpu.c")
_SOURCES = (_SOURCE, os.path.join(os.path.dirname(__file__), "csrc", "hetconv_nhwc.c"))
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


#: The tuning given to an AVX-512 Intel CPU that the compiler does not know (see _flags).
UNKNOWN_INTEL_TUNE = "icelake-server"


def _flags(cc: Optional[str] = None) -> list:
    """Compiler flags; ``$HETCONV_NATIVE_MARCH`` overrides ``-march=native``.

    Where the compiler ``cc`` does not know this CPU, ``-march=native`` enables its
    instruction sets but tunes for "generic" (GCC 12 on the Xeon of family 6 model 207): an
    AVX-512 Intel CPU then gets ``-mtune=`` :data:`UNKNOWN_INTEL_TUNE` (the channels-last
    forward 0.91-0.97x the time single-threaded, 0.93-0.99x on two threads, paired on that
    host against generic tuning; docs/performance.md, twenty-third session)."""
    march = os.environ.get("HETCONV_NATIVE_MARCH")
    flags = _FLAGS + [f"-march={march or 'native'}"]
    if (not march and cc and _cpu_info("vendor_id") == "GenuineIntel"
            and "avx512f" in _cpu_flags().split() and _native_tune(cc) == "generic"):
        flags.append(f"-mtune={UNKNOWN_INTEL_TUNE}")
    return flags


def _native_tune(cc: str) -> Optional[str]:
    """The tuning ``cc -march=native`` picks (GCC's report), or None where it does not say.

    Asking the compiler takes ~11 ms (a process) and the build's cache key needs the answer,
    so every process paid it at its first native call; the answer is kept in the cache
    directory under the compiler file's identity (resolved path, size, modification time)
    and this CPU's model and flags, so a process whose compiler and CPU are unchanged reads
    it (a file of one word) instead."""
    try:
        real = os.path.realpath(shutil.which(cc) or cc)
        st = os.stat(real)
    except OSError:
        return None
    ident = "\n".join([real, str(st.st_size), str(st.st_mtime_ns),
                       _cpu_info("model name") or "", _cpu_flags()])
    name = f"tune_{hashlib.sha256(ident.encode()).hexdigest()[:16]}.txt"
    out_dir = _writable_cache_dir()
    path = None if out_dir is None else os.path.join(out_dir, name)
    if path is not None:
        try:
            with open(path) as f:
                kept = f.read().strip()
            if kept:
                return kept
        except OSError:
            pass
    try:
        out = subprocess.run([cc, "-march=native", "-Q", "--help=target"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "-mtune=":
            if path is not None:
                try:
                    atomic_write_text(path, parts[1] + "\n")
                except OSError:
                    pass  # a cache that refuses: the compiler is asked again next time
            return parts[1]
    return None


_LOCK = threading.Lock()
_LIB: Optional[ctypes.CDLL] = None
_ERROR: Optional[str] = None
_TRIED = False


def _cache_dir() -> str:
    root = os.environ.get("HETCONV_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "hetconv")
    return root


def _cpuinfo_line(field: str) -> Optional[str]:
    """The first line of /proc/cpuinfo naming ``field``, as it stands, or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.partition(":")[0].strip() == field:
                    return line
    except OSError:
        pass
    return None


def _cpu_flags() -> str:
    return _cpuinfo_line("flags") or ""


def _cpu_info(field: str) -> Optional[str]:
    """A field of the first CPU in /proc/cpuinfo (e.g. ``vendor_id``), or None."""
    line = _cpuinfo_line(field)
    return None if line is None else line.partition(":")[2].strip()


def _writable_cache_dir() -> Optional[str]:
    """:func:`_cache_dir`, made if missing; where it cannot be written (a read-only home), a
    private directory under the system temp dir; None where neither can be made."""
    out_dir = _cache_dir()
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(out_dir)
    except OSError:  # read-only home: a private directory under the system temp dir
        out_dir = os.path.join(tempfile.gettempdir(), f"hetconv-{os.getuid()}")
        try:
            os.makedirs(out_dir, mode=0o700, exist_ok=True)
        except OSError:
            return None
    return out_dir


def _build(cc: str) -> str:
    src = b""
    for source in _SOURCES:
        with open(source, "rb") as f:
            src += f.read()
    flags = _flags(cc)
    key = hashlib.sha256(src + " ".join([cc] + flags).encode() + _cpu_flags().encode())
    out_dir = _writable_cache_dir()
    if out_dir is None:
        raise RuntimeError(f"no writable directory for the compiled kernel ({_cache_dir()} "
                           f"nor {tempfile.gettempdir()})")
    path = os.path.join(out_dir, f"hetconv_cpu_{key.hexdigest()[:16]}.so")
    if os.path.exists(path):
        return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, *_SOURCES, "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load() -> Optional[ctypes.CDLL]:
    """The compiled kernel (built on first call), or None with :func:`build_error` set."""
    global _LIB, _ERROR, _TRIED
    if _TRIED:
        return _LIB
    with _LOCK:
        if _TRIED:
            return _LIB
        try:
            if os.environ.get("HETCONV_DISABLE_NATIVE", "") not in ("", "0"):
                raise RuntimeError("disabled by HETCONV_DISABLE_NATIVE")
            if not sys.platform.startswith("linux"):
                raise RuntimeError(f"built only on Linux (this is {sys.platform})")
            cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            if not cc:
                raise RuntimeError("no C compiler found (set CC, or install gcc)")
            # torch is imported first, so its OpenMP runtime is the one the kernel binds to.
            lib = ctypes.CDLL(_build(cc))
            i, p = ctypes.c_int, ctypes.c_void_p
            packed = [p, p, p, p, i]  # the args struct, x, y, residual, threads
            lib.hetconv_native_forward_packed.restype = i
            lib.hetconv_native_forward_packed.argtypes = packed
            lib.hetconv_native_wgrad.restype = i
            lib.hetconv_native_wgrad.argtypes = ([p] * 4 + [i] * 6 + [p, p, i, i, p, i, p, p]
                                                 + [i] * 4)
            lib.hetconv_native_isa.restype = i
            lib.hetconv_native_chain.restype = i
            lib.hetconv_native_chain.argtypes = [p, i, i, p, p, p, i, i]
            lib.hetconv_native_release.restype = ctypes.c_long
            lib.hetconv_native_release.argtypes = [i]
            lib.hetconv_native_scratch.restype = None
            lib.hetconv_native_scratch.argtypes = [p]
            lib.hetconv_native_reads_in_place.restype = i
            lib.hetconv_native_reads_in_place.argtypes = [i] * 4
            lib.hetconv_nhwc_forward_packed.restype = i
            lib.hetconv_nhwc_forward_packed.argtypes = packed
            lib.hetconv_nhwc_sequence.restype = i
            lib.hetconv_nhwc_sequence.argtypes = [p, i, p, p, p, p, i]
            lib.hetconv_nhwc_wgrad.restype = i
            lib.hetconv_nhwc_wgrad.argtypes = [p] * 6 + [i] * 15 + [p] * 4 + [i]
            lib.hetconv_fma_loop.restype = ctypes.c_double
            lib.hetconv_fma_loop.argtypes = [ctypes.c_long, i, ctypes.c_float, ctypes.c_float]
            lib.hetconv_gather.restype = None
            lib.hetconv_gather.argtypes = [p] * 3 + [ctypes.c_long, i]
            lib.hetconv_gather2.restype = None
            lib.hetconv_gather2.argtypes = [p] * 4 + [ctypes.c_long, i]
            _LIB = lib
        except Exception as exc:  # no compiler, failed build, odd platform: fall back
            _ERROR = f"{type(exc).__name__}: {exc}"
            log.info("hetconv native kernel unavailable: %s", _ERROR)
        _TRIED = True
    return _LIB


@torch.compiler.assume_constant_result
def available() -> bool:
    """True when the C kernel is compiled and loaded (compiles it on first call)."""
    return _load() is not None


@torch.compiler.assume_constant_result
def vectorized() -> bool:
    """True when the loaded kernel was built with AVX-512 (else it runs scalar loops)."""
    lib = _load()
    return lib is not None and lib.hetconv_native_isa() == 512


@torch.compiler.assume_constant_result
def reads_in_place(h: int, w: int, kernel: Tuple[int, int] = (3, 3)) -> bool:
    """Whether the NCHW kernel's stride-1 forward pass on ``h x w`` planes reads its input
    in place (masked loads at the borders) rather than from zero-padded copies: where
    that computes at least 10% fewer positions (4x4 and 8x8 planes, for example). False
    when the kernel is unavailable or not vectorized."""
    lib = _load()
    return lib is not None and lib.hetconv_native_reads_in_place(h, w, *kernel) == 1


def _team_size(threads: Optional[int]) -> int:
    """The OpenMP team size a ``threads`` argument asks for: ``torch.get_num_threads()`` for
    None (the team the kernels run in), else a positive int; ValueError otherwise."""
    if threads is None:
        return torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    return threads


def release_buffers(threads: Optional[int] = None) -> int:
    """Free the NCHW kernel's per-thread scratch memory now; returns the bytes freed.

    Each thread that runs the kernel keeps a padded copy of the largest image it has
    computed (a few MB at most) and the geometries of the last 8 shapes, so later calls
    allocate nothing. This frees them in the calling thread and in the OpenMP team of
    ``threads`` threads (default ``torch.get_num_threads()``, the team the kernels run in);
    the next call allocates again. Other threads keep theirs until they exit, when they are
    freed anyway. Returns the bytes of padded-image buffers freed (0 when the kernel is
    unavailable).
    """
    threads = _team_size(threads)
    lib = _load()
    return 0 if lib is None else int(lib.hetconv_native_release(threads))


def scratch_held() -> dict:
    """The NCHW kernel's per-thread scratch, summed over all live threads:
    ``{"pad_bytes": bytes of padded-image buffers, "geometries": cached geometries}``
    (zeros when the kernel is unavailable). See :func:`release_buffers`."""
    lib = _load()
    if lib is None:
        return {"pad_bytes": 0, "geometries": 0}
    out = (ctypes.c_long * 2)()
    lib.hetconv_native_scratch(out)
    return {"pad_bytes": int(out[0]), "geometries": int(out[1])}


#: flops of one step of hetconv_fma_loop on one thread (24 chains of 16 multiply-adds)
FMA_LOOP_FLOPS = 2 * 16 * 24


def fma_rate(threads: Optional[int] = None, seconds: float = 0.05, repeats: int = 7,
             timer: Callable[[], float] = time.perf_counter) -> Optional[float]:
    """The machine's multiply-add rate now, in GFLOP/s: the median of ``repeats`` timed
    calls of a loop of independent fp32 FMA chains (AVX-512 when the kernel is
    vectorized) on ``threads`` threads (default ``torch.get_num_threads()``), each call
    about ``seconds`` long. About the peak the kernels can reach; on a shared host it
    drops when other guests load the cores, so benchmark reports record it. None when
    the kernel is unavailable. ``timer`` is the clock (seconds)."""
    threads = _team_size(threads)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"seconds must be a positive finite number, got {seconds!r}")
    lib = _load()
    if lib is None:
        return None

    def timed(iters: int) -> float:
        t0 = timer()
        lib.hetconv_fma_loop(iters, threads, 1.0, 1.0)
        return max(timer() - t0, 1e-9)

    iters = 1000
    while True:  # calibrate: grow the loop until one call takes about `seconds`
        dt = timed(iters)
        if dt >= seconds / 4 or iters >= 1 << 40:
            break
        iters *= 8
    iters = max(1, int(iters * seconds / dt))
    times = sorted(timed(iters) for _ in range(repeats))
    return FMA_LOOP_FLOPS * iters * threads / times[len(times) // 2] / 1e9


def build_error() -> Optional[str]:
    """Why the kernel is unavailable (None when it loaded or was not tried yet)."""
    return _ERROR


def unsupported_reason(x: torch.Tensor, weight_k: torch.Tensor, stride: Tuple[int, int],
                       padding: Tuple[int, int], dilation: Tuple[int, int]) -> Optional[str]:
    """Why the native kernel cannot run this call, or None if it can."""
    kh, kw = weight_k.shape[2:]
    if x.device.type != "cpu":
        return f"input on {x.device.type}: the native kernel is CPU-only"
    if x.dtype != torch.float32 or weight_k.dtype != torch.float32:
        return f"dtype {x.dtype}: the native kernel computes float32 only"
    if torch.is_autocast_enabled("cpu"):
        return "autocast is on: the native kernel computes float32 only"
    if _transformed(x, weight_k):
        return "a torch.func transform or forward-mode AD: the native kernel has no rule for it"
    if tuple(stride) not in ((1, 1), (2, 2)) or tuple(dilation) != (1, 1):
        return "the native kernel supports stride 1 or 2 (the same in both dims) and dilation 1"
    if kh % 2 == 0 or kw % 2 == 0 or tuple(padding) != (kh // 2, kw // 2):
        return "the native kernel supports odd kernels with padding kernel // 2 only"
    if x.numel() >= 2 ** 31 or x.shape[0] * weight_k.shape[0] * x.shape[2] * x.shape[3] >= 2 ** 31 \
            or weight_k.shape[0] * x.shape[1] * max(1, weight_k.shape[2] * weight_k.shape[3]) >= 2 ** 31:
        return "tensor too large for the native kernel's 32-bit plane indexing"
    if not available():
        return f"native kernel unavailable ({build_error()})"
    return None


def _classes(n: int, m: int, p: int, pattern: str, transposed: bool):
    """``(out_cls, in_cls, chan)`` of a kernel's outputs and inputs: the N filters reading
    the M channels, swapped when ``transposed`` (the input gradient); ``chan`` (P, Mk)
    lists each class's inputs in order."""
    out_cls = _pattern.class_of_filter(n, p, pattern)
    in_cls = _pattern.class_of_channel(m, p, pattern)
    if transposed:
        out_cls, in_cls = in_cls, out_cls
    chan = torch.stack([torch.nonzero(in_cls == j).flatten() for j in range(p)])
    return out_cls, in_cls, chan


def _taps(kh: int, kw: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column (long tensors) of every non-centre tap, in row-major order."""
    taps = [(a, b) for a in range(kh) for b in range(kw) if (a, b) != (kh // 2, kw // 2)]
    return (torch.tensor([a for a, _ in taps], dtype=torch.long),
            torch.tensor([b for _, b in taps], dtype=torch.long))


def _split_weight_grad(gc: torch.Tensor, gt: torch.Tensor, n: int, m: int, p: int,
                       pattern: str, kh: int, kw: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``weight_k`` and ``weight_1`` from the centre taps' (N, M) gradient
    ``gc`` and the other taps' (N, Mk, T) gradient ``gt``."""
    from .functional import _indices

    idx = _indices(m, n, p, pattern, gc.device)
    mk = gt.shape[1]
    centre = (kh // 2) * kw + kw // 2
    gwk = gt.new_empty(n, mk, kh * kw)
    gwk[:, :, centre] = gc.gather(1, idx["kxk"])
    gwk[:, :, [t for t in range(kh * kw) if t != centre]] = gt
    return gwk.view(n, mk, kh, kw), gc.gather(1, idx["pw"])


def _layout(n: int, m: int, p: int, pattern: str, kh: int, kw: int,
            transposed: bool = False, per_class: bool = False) -> dict:
    """Index tensors of the block layout for a layer shape (cached like the other indices).

    The kernel's outputs are the layer's N filters and its inputs the M
    channels; ``transposed=True`` swaps them (the input gradient is a HetConv
    of the output gradient with the kernel transposed and flipped: output
    channel c of class j reads the class-j filters at its non-centre taps),
    which needs classes of equal size (P | N).  ``per_class=True`` never mixes
    classes in a block (the weight-gradient kernel needs that).
    """
    def build():
        out_cls, in_cls, chan = _classes(n, m, p, pattern, transposed)
        n_out, n_in = len(out_cls), len(in_cls)
        # Blocks of 4 outputs.  With >= 4 outputs per class a block holds one class (its
        # taps share input loads); with fewer, blocks run through the outputs in class
        # order and mix classes (each output its own taps): no slot is left empty.
        order = torch.argsort(out_cls, stable=True).tolist()
        if n_out >= 4 * p or per_class:
            groups = [[f for f in order if out_cls[f] == j] for j in range(p)]
        else:
            groups = [order]
        blocks = []
        for members in groups:
            for s in range(0, len(members), 4):
                blk = members[s:s + 4]
                blocks.append(blk + [-1] * (4 - len(blk)))
        out = torch.tensor(blocks, dtype=torch.long)  # (nblk, 4)
        slot_cls = torch.where(out >= 0, out_cls[out.clamp(min=0)], -1)
        ta, tb = _taps(kh, kw)
        i32 = torch.int32
        return {
            "rows": out.clamp(min=0), "valid": (out >= 0).float(),
            "chan_of_slot": chan[slot_cls.clamp(min=0)],  # (nblk, 4, Mk)
            "ta": ta, "tb": tb, "nblk": len(blocks), "p": p, "mk": n_in // p, "T": len(ta),
            "kernel": (kh, kw), "n_out": n_out, "n_in": n_in,
            "blk_class": slot_cls.to(i32).contiguous(), "blk_out": out.to(i32).contiguous(),
            "chan": chan.to(i32).contiguous(),
            "tap_dh": (ta - kh // 2).to(i32), "tap_dw": (tb - kw // 2).to(i32),
        }
    from .functional import _memo_index
    return _memo_index(("native", n, m, p, pattern, kh, kw, transposed, per_class), build)


def _pack(weight_k: torch.Tensor, weight_1: torch.Tensor, bias: Optional[torch.Tensor],
          pattern: str, n: int, m: int, p: int, transposed: bool = False) -> dict:
    """Weights in the C kernel's block layout (see csrc/hetconv_cpu.c); no autograd."""
    from .functional import dense_weight

    kh, kw = weight_k.shape[2:]
    lay = _layout(n, m, p, pattern, kh, kw, transposed)
    rows, valid = lay["rows"], lay["valid"]
    dense = dense_weight(weight_k, weight_1, pattern).float()  # (N, M, Kh, Kw)
    if transposed:
        dense = dense.transpose(0, 1).flip(2, 3)
    # centre taps: (nblk, 4, n_in) -> (nblk, n_in, 4)
    w1p = dense[rows][:, :, :, kh // 2, kw // 2] * valid[:, :, None]
    # other taps on each output's class inputs: (nblk, 4, Mk, T) -> (nblk, Mk, T, 4)
    ch = lay["chan_of_slot"]
    wk = dense[rows[:, :, None, None], ch[:, :, :, None], lay["ta"][None, None, None, :],
               lay["tb"][None, None, None, :]] * valid[:, :, None, None]
    bp = None if bias is None else (bias.float()[rows] * valid).contiguous()
    pk = dict(lay, w1p=w1p.permute(0, 2, 1).contiguous(),
              wkp=wk.permute(0, 2, 3, 1).contiguous(), bp=bp)
    # The kernel's weight arguments as ctypes values, built once (the dict keeps the tensors).
    pk["args"] = (pk["nblk"], _ptr(pk["blk_class"]), _ptr(pk["blk_out"]), _ptr(pk["w1p"]),
                  _ptr(pk["wkp"]), _ptr(bp), pk["p"], pk["mk"], _ptr(pk["chan"]), pk["T"],
                  _ptr(pk["tap_dh"]), _ptr(pk["tap_dw"]))
    return pk


def _ptr(t: Optional[torch.Tensor]) -> Optional[ctypes.c_void_p]:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


WEIGHT_CACHES: list = []  # every cache of prepared weight layouts, for clear_caches


def weight_cache() -> WeakIdKeyDictionary:
    """A new cache of prepared weight layouts (weight tensor -> (key, layout)), registered
    so that :func:`hetconv.clear_caches` empties it with the others."""
    cache = WeakIdKeyDictionary()
    WEIGHT_CACHES.append(cache)
    return cache


_TRANSPOSED_CACHE = weight_cache()  # weight_k -> (key, transposed block layout)


def _packed(weight_k, weight_1, bias, pattern, n, m, p, transposed: bool = False) -> dict:
    from .functional import _cached, _NATIVE_CACHE

    cache = _TRANSPOSED_CACHE if transposed else _NATIVE_CACHE
    return _cached(cache, (weight_k, weight_1, bias), (pattern, "native"),
                   lambda wk, w1, b: _pack(wk.detach(), w1.detach(),
                                           None if b is None else b.detach(), pattern, n, m, p,
                                           transposed))


def _wgrad(x: torch.Tensor, gy: torch.Tensor, weight_k: torch.Tensor, pattern: str,
           n: int, m: int, p: int, stride: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``weight_k`` and ``weight_1`` by the C weight-gradient kernel."""
    kh, kw = weight_k.shape[2:]
    lay = _layout(n, m, p, pattern, kh, kw, per_class=True)
    x, gy = x.contiguous(), gy.contiguous()
    b, _, h, w = x.shape
    gc = torch.empty(n, m)
    gt = torch.empty(n, lay["mk"], lay["T"])
    ptr = _ptr
    rc = _load().hetconv_native_wgrad(
        ptr(x), ptr(gy), ptr(gc), ptr(gt), b, m, n, h, w, lay["nblk"], ptr(lay["blk_class"]),
        ptr(lay["blk_out"]), p, lay["mk"], ptr(lay["chan"]), lay["T"], ptr(lay["tap_dh"]),
        ptr(lay["tap_dw"]), stride, kh, kw, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"hetconv native weight-gradient kernel failed (code {rc})")
    return _split_weight_grad(gc, gt, n, m, p, pattern, kh, kw)


# ---------------------------------------------------------------------------------------
# The channels-last kernel (csrc/hetconv_nhwc.c): vectorised over output channels, for
# channels_last input.

_NHWC_CACHE = weight_cache()  # weight_k -> (key, channels-last packing)
_NHWC_T_CACHE = weight_cache()  # weight_k -> (key, transposed channels-last packing)


def _nhwc_step(n_out: int, n_in: int, p: int, pattern: str) -> Optional[Tuple[int, int]]:
    """``(ts, lw)`` of the channels-last kernel for ``n_out`` outputs reading ``n_in``
    inputs, or None when the layer is not one of its two cases (see csrc/hetconv_nhwc.c):
    "shifted" with P in {2, 4, 8, 16} or a multiple of 16 (then one 16-float load of
    consecutive classes per step), or "blocked" with 16 | N / P; 16 | N_out, P | N_in."""
    if n_out % 16 or n_in % p or p < 1:
        return None
    if p == 1:  # one class, every channel: the "blocked" case (either pattern is that layer)
        return 1, 1
    if pattern == "shifted":
        if p in (2, 4, 8, 16):
            return p, p
        return (p, 16) if p % 16 == 0 else None  # a vector's 16 lanes: 16 consecutive classes
    return (1, 1) if n_out % p == 0 and (n_out // p) % 16 == 0 else None


def nhwc_supported(n: int, m: int, p: int, pattern: str) -> bool:
    """True when the channels-last kernel can compute a layer with N filters, M input
    channels and part P (its input gradient needs the same of the transposed layer)."""
    return _nhwc_step(n, m, p, pattern) is not None


def _is_channels_last(t: torch.Tensor) -> bool:
    """Channels-last memory (planes of one pixel count: both layouts are the same memory;
    an empty batch, and one channel, are contiguous in both layouts: their strides tell
    which they were made in, ``stride(1) == 1`` channels-last, as
    ``torch.empty(..., memory_format=torch.channels_last)`` makes them).
    False inside vmap (which cannot query the layout; the kernels never run there, see
    :func:`_transformed`)."""
    return (t.dim() == 4 and not torch._C._functorch.is_batchedtensor(t)
            and t.is_contiguous(memory_format=torch.channels_last)
            and (not t.is_contiguous() or t.shape[2] * t.shape[3] == 1
                 or (t.stride(1) == 1 and (t.shape[1] == 1
                                           or (t.numel() == 0 and t.shape[1] > 1)))))


def _nhwc_layout(n: int, m: int, p: int, pattern: str, kh: int, kw: int,
                 transposed: bool = False) -> dict:
    """Filter blocks and index tensors of the channels-last packing (cached per shape)."""
    def build():
        out_cls, in_cls, chan = _classes(n, m, p, pattern, transposed)
        n_out, n_in = len(out_cls), len(in_cls)
        ts, lw = _nhwc_step(n_out, n_in, p, pattern)
        mk = chan.shape[1]
        cof = chan[out_cls]  # (n_out, Mk): the input read by output n at step j
        # Vector v of a block holds outputs n0 + v * vs .. + 15 (csrc/hetconv_nhwc.c): vs = P
        # for "shifted" with 16 | P (outputs P apart share their class, so their 16 lanes read
        # the same channels), else 16 (consecutive outputs).
        vs = p if lw == 16 and p > 16 else 16
        nvec, step = n_out // 16, vs // 16
        blocks, taken = [], torch.zeros(nvec, dtype=torch.bool)
        for v in range(nvec):  # (n0, vectors, toff); a block's vectors share one offset
            if taken[v]:
                continue
            # the offset: what the vector's first lane reads at step 0 (0 for "shifted" with
            # P | 16, its class for "shifted" with 16 | P, class * Mk for "blocked")
            toff, nv = int(cof[16 * v, 0]), 1
            while (nv < 4 and v + nv * step < nvec and not taken[v + nv * step]
                   and int(cof[16 * (v + nv * step), 0]) == toff):
                nv += 1
            taken[v:v + nv * step:step] = True
            blocks.append((16 * v, nv, toff))
        lanes = [n0 + torch.arange(16 * nv) // 16 * vs + torch.arange(16 * nv) % 16
                 for n0, nv, _ in blocks]  # each block's outputs, lane by lane
        # The kernel reads, for output n at step j, channel toff + j * ts + (lane % lw):
        # check that it is n's own class channel, and that the blocks cover every output once.
        read = torch.full_like(cof, -1)
        for (n0, nv, toff), out in zip(blocks, lanes):
            lane = torch.arange(16 * nv) % lw
            read[out] = toff + torch.arange(mk)[None, :] * ts + lane[:, None]
        if (not torch.equal(read, cof)
                or not torch.equal(torch.cat(lanes).sort().values, torch.arange(n_out))):
            raise AssertionError("channels-last kernel layout does not match the pattern")
        ta, tb = _taps(kh, kw)
        # Where each packed tap weight sits in weight_k (N, Mk, Kh, Kw): weight_k[f, j] is
        # filter f's kernel on the j-th channel of its class.  Transposed, output m's step j
        # is filter cof[m, j], at the position of m among that filter's class channels.
        if transposed:
            pos = torch.empty(n_out, dtype=torch.long)  # m's index within its class
            for j in range(p):
                members = torch.nonzero(out_cls == j).flatten()
                pos[members] = torch.arange(len(members))
            src_row, src_col = cof, pos[:, None].expand_as(cof)
            ta, tb = kh - 1 - ta, kw - 1 - tb  # the transposed kernel is flipped
        else:
            src_row = torch.arange(n_out)[:, None].expand_as(cof)
            src_col = torch.arange(mk)[None, :].expand_as(cof)
        # Packed order: block b (after p0 lanes of blocks before it) holds its centre
        # weights at p0 * n_in as (n_in, 16 v) and its tap weights at p0 * T * Mk as
        # (T, Mk, 16 v); lane l is output lanes[b][l].
        t = len(ta)
        centre_ij, tap_ij = [], []  # per block: (input, lane) and (tap, step, lane) grids
        for lanes_b in lanes:
            centre_ij.append(torch.meshgrid(torch.arange(n_in), lanes_b, indexing="ij"))
            tap_ij.append(torch.meshgrid(torch.arange(t), torch.arange(mk), lanes_b,
                                         indexing="ij"))
        c1, r1 = (torch.cat([g[d].reshape(-1) for g in centre_ij]) for d in range(2))
        ek, jk, rk = (torch.cat([g[d].reshape(-1) for g in tap_ij]) for d in range(3))
        i32 = torch.int32
        return {
            "blk_n0": torch.tensor([b[0] for b in blocks], dtype=i32),
            # where each block's packed weights start (the lanes of the blocks before it)
            "blk_p0": torch.tensor([0] + [16 * b[1] for b in blocks[:-1]], dtype=i32).cumsum(
                0, dtype=i32),
            "blk_v": torch.tensor([b[1] for b in blocks], dtype=i32),
            "blk_toff": torch.tensor([b[2] for b in blocks], dtype=i32),
            "nfb": len(blocks), "mk": mk, "ts": ts, "vs": vs,
            "lw": lw, "T": t, "kernel": (kh, kw), "n_out": n_out,
            # each packed centre weight's flat index in the (N, M) centre matrix (its row
            # n0 + l of the kernel's (n_out, n_in) matrix, which is that matrix transposed
            # for the input gradient)
            "w1_index": ((c1 * n_out + r1) if transposed else (r1 * n_in + c1)).to(torch.int32),
            # each packed tap weight's flat index in a contiguous weight_k (N, Mk, Kh, Kw)
            "tap_index": {(m // p * kh * kw, kh * kw, kw, 1): (
                ((src_row[rk, jk] * (m // p) + src_col[rk, jk]) * kh + ta[ek]) * kw + tb[ek]
            ).to(torch.int32)},  # weight_k strides -> storage index of each packed tap weight
            "centre_src": {},  # weight_k strides -> each packed centre weight's source
        }
    from .functional import _memo_index
    return _memo_index(("nhwc", n, m, p, pattern, kh, kw, transposed), build)


def _storage_view(t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(t, flat)``: ``t`` (made contiguous unless it is contiguous in NCHW or channels_last
    order) and a 1-D view of its storage, in which element ``idx`` sits at
    ``sum(idx[d] * t.stride(d))``."""
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        t = t.contiguous()
    return t, t.as_strided((t.numel(),), (1,))


def _empty_grad(param: torch.Tensor) -> torch.Tensor:
    """An empty float32 gradient for ``param`` with the strides the weight gradients get:
    ``param``'s own when it is contiguous in NCHW or channels_last order, else contiguous."""
    return _storage_view(torch.empty_like(param, dtype=torch.float32))[0]


def _gather2(src_k: torch.Tensor, src_1: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``src_k[i] if i >= 0 else src_1[-1 - i]`` for each ``i`` of int32 ``idx`` (1-D float32
    sources; the C loop): the centre weights, from ``weight_k`` and ``weight_1`` at once."""
    out = torch.empty(idx.numel(), dtype=torch.float32)
    _load().hetconv_gather2(_ptr(src_k), _ptr(src_1), _ptr(idx), _ptr(out), idx.numel(),
                            torch.get_num_threads())
    return out


def _gather(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``src.take(idx)`` for a 1-D float32 ``src`` and int32 ``idx`` (the C loop)."""
    out = torch.empty(idx.numel(), dtype=torch.float32)
    _load().hetconv_gather(_ptr(src), _ptr(idx), _ptr(out), idx.numel(), torch.get_num_threads())
    return out


def _tap_index(lay: dict, weight_k: torch.Tensor) -> torch.Tensor:
    """Storage index (in ``weight_k``'s own strides) of each packed tap weight, in packed order:
    the packing is one gather, and the weight-gradient kernel writes through it, in NCHW or channels_last
    parameters alike (``model.to(memory_format=torch.channels_last)`` converts them)."""
    strides = weight_k.stride()
    hit = lay["tap_index"].get(strides)
    if hit is None:  # from the contiguous index: its coordinates times these strides
        n, mk, kh, kw = weight_k.shape
        flat = lay["tap_index"][(mk * kh * kw, kh * kw, kw, 1)].long()
        hit = sum(((flat // div) % size) * st for div, size, st in
                  zip((mk * kh * kw, kh * kw, kw, 1), (n, mk, kh, kw), strides))
        hit = lay["tap_index"][strides] = hit.to(torch.int32)
    return hit


def _centre_src(lay: dict, weight_k: torch.Tensor, n: int, m: int, p: int,
                pattern: str) -> torch.Tensor:
    """Where each packed centre weight comes from (:func:`_centre_map`'s encoding, for
    ``weight_k``'s strides), in packed order; cached in the layout per strides, like
    :func:`_tap_index`."""
    strides = weight_k.stride()
    hit = lay["centre_src"].get(strides)
    if hit is None:
        hit = lay["centre_src"][strides] = _centre_map(
            n, m, p, pattern, lay["kernel"], strides)[lay["w1_index"].long()]
    return hit


def _nhwc_pack(weight_k: torch.Tensor, weight_1: torch.Tensor, bias: Optional[torch.Tensor],
               pattern: str, n: int, m: int, p: int, transposed: bool = False) -> dict:
    """Weights in the channels-last kernel's layout (see csrc/hetconv_nhwc.c); no autograd.
    Two gathers: the centre matrix's entries and weight_k's taps, straight into packed order."""
    kh, kw = weight_k.shape[2:]
    lay = _nhwc_layout(n, m, p, pattern, kh, kw, transposed)
    weight_k, flat = _storage_view(weight_k.float())
    # centre taps: each packed entry of the (N, M) pointwise matrix straight from weight_1 or
    # a KxK kernel's centre (one pass; no (N, M) matrix built)
    w1p = _gather2(flat, weight_1.float().contiguous(),
                   _centre_src(lay, weight_k, n, m, p, pattern))
    wkp = _gather(flat, _tap_index(lay, weight_k))
    bp = None if bias is None else bias.detach().float().contiguous()
    pk = dict(lay, w1p=w1p, wkp=wkp, bp=bp)
    pk["args"] = _nhwc_block_args(lay) + (_ptr(pk["w1p"]), _ptr(pk["wkp"]), _ptr(bp))
    return pk


def _nhwc_block_args(lay: dict) -> tuple:
    """The layout's arguments of both channels-last kernels, in their order: Mk, ts, lw, vs,
    nfb and the filter blocks' tables."""
    return (lay["mk"], lay["ts"], lay["lw"], lay["vs"], lay["nfb"], _ptr(lay["blk_n0"]),
            _ptr(lay["blk_p0"]), _ptr(lay["blk_v"]), _ptr(lay["blk_toff"]))


def _nhwc_packed(weight_k, weight_1, bias, pattern, n, m, p, transposed: bool = False) -> dict:
    from .functional import _cached

    cache = _NHWC_T_CACHE if transposed else _NHWC_CACHE
    return _cached(cache, (weight_k, weight_1, bias), (pattern, "nhwc"),
                   lambda wk, w1, b: _nhwc_pack(wk.detach(), w1.detach(),
                                                None if b is None else b.detach(), pattern,
                                                n, m, p, transposed))


#: Planes of at most this many output pixels are computed position-major (a tile holds one
#: position of several images, so taps in the padding are skipped for the whole tile).
NHWC_POSITION_MAJOR_MAX_AREA: int = 64


def _nhwc_call(x_shape: tuple, pk: dict, n: int, relu: bool, stride: int, up: int = 1,
               out_size: Optional[Tuple[int, int]] = None,
               pool: int = 0) -> Tuple[tuple, Callable]:
    """The output shape of the channels-last kernel on an input of ``x_shape`` and a function
    ``call(x, y, residual) -> rc`` that runs it (see :func:`_run_nhwc`)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"hetconv native kernel unavailable ({build_error()})")
    b, m, h, w = x_shape
    kh, kw = pk["kernel"]
    ho, wo = out_size if up > 1 else (_out_size(h, kh, stride), _out_size(w, kw, stride))
    # pixel order (csrc/hetconv_nhwc.c): position-major for small planes of several images
    # (a tile's pixels share which taps fall in the padding); residue-major for the
    # transposed strided case (a tile's pixels, in one image row, share their column's
    # residue modulo the stride, so the taps they skip)
    if up > 1:
        order = 2
    else:
        order = int(ho * wo <= NHWC_POSITION_MAJOR_MAX_AREA and b > 1)
    if pool not in (0, 2) or (pool and (up > 1 or ho % 2 or wo % 2)):
        raise ValueError(f"pool must be 0 or 2 (a 2x2 max-pool of stride 2 on an output of "
                         f"even height and width), got pool={pool!r} for a {ho}x{wo} output")
    args = _NhwcArgs(b, m, n, h, w, kh, kw, stride, kh // 2, kw // 2, *pk["args"], int(relu),
                     order, up, ho, wo, pool)
    call = _packed_call(lib.hetconv_nhwc_forward_packed, args)
    call.res_shape = (b, n, ho, wo)  # pooled: the residual is added before the pool
    return (b, n, ho // 2, wo // 2) if pool else (b, n, ho, wo), call


def _run_nhwc(x: torch.Tensor, pk: dict, n: int, relu: bool = False,
              residual: Optional[torch.Tensor] = None, stride: int = 1, up: int = 1,
              out_size: Optional[Tuple[int, int]] = None, pool: int = 0) -> torch.Tensor:
    """The channels-last kernel on ``x``; ``up`` > 1 with ``out_size``: the transpose of a
    stride-``up`` convolution (``pk`` packed transposed), whose output size is ``out_size``;
    ``pool`` = 2: ``F.max_pool2d(y, 2)`` of the result ``y`` (even height and width), in the
    kernel's epilogue (``residual`` and ReLU apply before it)."""
    shape, call = _nhwc_call(tuple(x.shape), pk, n, relu, stride, up, out_size, pool)
    return _launch(x, shape, torch.channels_last, call, residual, "channels-last kernel")


def _launch(x: torch.Tensor, shape: tuple, fmt: torch.memory_format, call: Callable,
            residual: Optional[torch.Tensor], what: str) -> torch.Tensor:
    """``call(x, y, residual)`` on ``x`` and ``residual`` in memory format ``fmt`` into a new
    ``y`` of ``shape`` (float32, ``fmt``), after checking ``residual`` against it."""
    x = x.contiguous(memory_format=fmt)
    y = torch.empty(shape, dtype=x.dtype, memory_format=fmt)
    if residual is not None:
        want = getattr(call, "res_shape", shape)  # a pooled call's: its unpooled output's
        if tuple(residual.shape) != want or residual.dtype != torch.float32:
            raise ValueError(f"residual must be a float32 tensor of shape {want}, got "
                             f"{residual.dtype} {tuple(residual.shape)}")
        residual = residual.contiguous(memory_format=fmt)
    if shape[0] == 0:
        return y
    rc = call(x, y, residual)
    if rc != 0:
        raise RuntimeError(f"hetconv {what} failed (code {rc})")
    return y


def _centre_map(n: int, m: int, p: int, pattern: str, kernel: Tuple[int, int],
                strides: tuple) -> torch.Tensor:
    """Where each centre weight of the (N, M) pointwise matrix lives (flat n * M + c, int32):
    the storage index in ``weight_k`` (of these strides) of filter n's KxK centre on
    channel c when c is a channel of n's class, else ``-1 - i`` for index i of the
    contiguous (N, M - M/P) ``weight_1``.  The channels-last packing reads the centre weights
    through it and the weight-gradient kernel writes their gradients through it."""
    def build():
        from .functional import _indices

        idx = _indices(m, n, p, pattern, torch.device("cpu"))
        mk, (kh, kw) = m // p, kernel
        rows = torch.arange(n)[:, None]
        out = torch.empty(n, m, dtype=torch.long)
        out.scatter_(1, idx["kxk"], rows * strides[0] + torch.arange(mk)[None, :] * strides[1]
                     + (kh // 2) * strides[2] + (kw // 2) * strides[3])
        out.scatter_(1, idx["pw"], -1 - (rows * (m - mk) + torch.arange(m - mk)[None, :]))
        return out.flatten().to(torch.int32)
    from .functional import _memo_index
    return _memo_index(("centre", n, m, p, pattern, tuple(kernel), tuple(strides)), build)


def _wgrad_nhwc(x: torch.Tensor, gy: torch.Tensor, weight_k: torch.Tensor, pattern: str,
                n: int, m: int, p: int, stride: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``weight_k`` and ``weight_1`` by the channels-last weight-gradient kernel
    (centre taps and the others in one pass over the activations), written by the kernel
    straight into both gradients (``weight_k``'s in its own strides, so autograd keeps it as
    it is) through the packing's tap index and the centre map."""
    cl = torch.channels_last
    kh, kw = weight_k.shape[2:]
    lay = _nhwc_layout(n, m, p, pattern, kh, kw)
    x, gy = x.contiguous(memory_format=cl), gy.contiguous(memory_format=cl)
    b, _, h, w = x.shape
    gwk, flat = _storage_view(_empty_grad(weight_k))
    gw1 = torch.empty(n, m - lay["mk"])
    rc = _load().hetconv_nhwc_wgrad(
        _ptr(x), _ptr(gy), _ptr(flat), _ptr(gw1), _ptr(_tap_index(lay, gwk)),
        _ptr(_centre_map(n, m, p, pattern, (kh, kw), gwk.stride())), b, m, n, h, w, kh, kw,
        stride, kh // 2, kw // 2, *_nhwc_block_args(lay), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"hetconv channels-last weight-gradient kernel failed (code {rc})")
    return gwk, gw1


def _use_nhwc(x: torch.Tensor, n: int, m: int, p: int, pattern: str) -> bool:
    """Whether a native call on ``x`` runs the channels-last kernel (else the NCHW one)."""
    return _is_channels_last(x) and _nhwc_step(n, m, p, pattern) is not None


def _prepare(x, weight_k, weight_1, bias, pattern, relu, stride, pool: int = 0) -> tuple:
    """What a forward call on ``x`` runs: ``(packed weights, output shape, memory format,
    call(x, y, residual), kernel name)`` of the channels-last or the NCHW kernel (``pool``:
    the channels-last kernel's fused max-pool, see :func:`_run_nhwc`)."""
    n, m, p = _shapes(weight_k, weight_1)
    if _use_nhwc(x, n, m, p, pattern):
        pk = _nhwc_packed(weight_k, weight_1, bias, pattern, n, m, p)
        return (pk, *_nhwc_call(tuple(x.shape), pk, n, relu, stride, pool=pool),
                torch.channels_last, "channels-last kernel")
    if pool:
        raise ValueError("pool: only the channels-last kernel fuses a max-pool")
    pk = _packed(weight_k, weight_1, bias, pattern, n, m, p)
    return (pk, *_nchw_call(tuple(x.shape), pk, n, relu, stride), torch.contiguous_format,
            "native kernel")


def _forward(x, weight_k, weight_1, bias, pattern, relu, residual, stride) -> torch.Tensor:
    _, shape, call, fmt, what = _prepare(x, weight_k, weight_1, bias, pattern, relu, stride)
    return _launch(x, shape, fmt, call, residual, what)


class ForwardPlan:
    """One inference-time call of :func:`native_conv2d`, prepared once: the packed weights,
    the output shape and the bound C call, for inputs of one shape and memory layout.

    :meth:`run` repeats the call on new inputs of that shape at a fraction of the Python
    cost of the full path (about 30 us less per call on the project's machine, where a
    batch-1 ResNet-56 calls 54 small layers). It returns None, running nothing, whenever the
    plan no longer holds: other weight tensors, or the same ones replaced (``.data``) or
    updated in place; autograd recording; compilation; another input shape, dtype or
    device. The caller then takes the full path (and may build a new plan).
    """

    __slots__ = ("tensors", "key", "in_shape", "shape", "fmt", "call", "pk", "what")

    @staticmethod
    def _state(tensors: tuple) -> tuple:
        return tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)

    @classmethod
    def build(cls, x: torch.Tensor, weight_k: torch.Tensor, weight_1: torch.Tensor,
              bias: Optional[torch.Tensor], pattern: str, relu: bool,
              residual: Optional[torch.Tensor], stride: int,
              pool: int = 0) -> Optional["ForwardPlan"]:
        """The plan of ``native_conv2d(x, ...)`` (same arguments), or None where none can be
        kept: autograd recording, compiling, inference-mode weights (never cached), input
        that is not 4-d float32 on the CPU, or a stride the kernel does not take.  ``pool``
        = 2: the plan of ``F.max_pool2d(native_conv2d(x, ...), 2)`` on the channels-last
        kernel (None where that kernel does not run or the output is of odd size)."""
        tensors = (weight_k, weight_1, bias)
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or stride not in (1, 2)
                or x.dim() != 4
                or x.dtype != torch.float32 or x.device.type != "cpu"
                or _recording(x, tensors, residual)
                or any(t is not None and t.is_inference() for t in tensors)):
            return None
        if pool:
            n, m, p = _shapes(weight_k, weight_1)
            kh, kw = weight_k.shape[2:]
            if pool != 2 or not _use_nhwc(x, n, m, p, pattern) or any(
                    _out_size(size, k, stride) % 2 for size, k in zip(x.shape[2:], (kh, kw))):
                return None
        plan = cls()
        plan.tensors, plan.key, plan.in_shape = tensors, cls._state(tensors), tuple(x.shape)
        plan.pk, plan.shape, plan.call, plan.fmt, plan.what = _prepare(
            x, weight_k, weight_1, bias, pattern, relu, stride, pool)
        return plan

    def run(self, x: torch.Tensor, residual: Optional[torch.Tensor], weight_k: torch.Tensor,
            weight_1: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``native_conv2d(x, weight_k, weight_1, bias, ..., residual)`` with the plan's other
        arguments, or None (nothing run) where the plan does not hold."""
        if (tuple(x.shape) != self.in_shape or x.dtype != torch.float32
                or x.device.type != "cpu" or torch.compiler.is_compiling()
                or torch.jit.is_tracing() or _recording(x, self.tensors, residual)
                or not self.holds(weight_k, weight_1, bias)):
            return None
        return self.launch(x, residual)

    def launch(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The prepared call on ``x`` (and ``residual``), unchecked: the caller has checked
        that the plan holds (:meth:`run` does)."""
        return _launch(x, self.shape, self.fmt, self.call, residual, self.what)

    def holds(self, weight_k: torch.Tensor, weight_1: torch.Tensor,
              bias: Optional[torch.Tensor]) -> bool:
        """Whether the plan still stands for these weights: the same tensors, not replaced
        or updated in place since it was made."""
        wk, w1, b = self.tensors
        return weight_k is wk and weight_1 is w1 and bias is b and self.unchanged(self.tensors)

    def unchanged(self, tensors: tuple) -> bool:
        """Whether ``tensors`` (the plan's weights) are as they were when it was made: same
        storage, not updated in place."""
        return self._state(tensors) == self.key


class Scratch:
    """Memory that calls of :class:`SequencePlan` s reuse, one call at a time: a flat float32
    buffer, grown to the largest request, and a lock.  A call that finds it taken (another
    thread's call) allocates its own.

    Allocated per call, a VGG-16's two 16.7 MB buffers at batch 64 were page-faulted back in
    on every call in two of three fresh processes (5090 faults per call; glibc returned them
    to the system each time): 49-60 ms per call against 42-47 ms with this buffer kept."""

    __slots__ = ("_lock", "_buf")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf: Optional[torch.Tensor] = None

    def take(self, numel: int) -> Optional[torch.Tensor]:
        """At least ``numel`` floats (flat, contiguous) until :meth:`give_back`, or None where
        another call holds them."""
        if not self._lock.acquire(blocking=False):
            return None
        if self._buf is None or self._buf.numel() < numel:
            self._buf = None  # the old one freed before the larger one is made
            try:
                self._buf = torch.empty(numel, dtype=torch.float32)
            except BaseException:  # out of memory: not left taken
                self._lock.release()
                raise
        return self._buf

    def give_back(self) -> None:
        self._lock.release()

    @property
    def nbytes(self) -> int:
        """Bytes held (0 before the first call)."""
        buf = self._buf
        return 0 if buf is None else buf.numel() * buf.element_size()


class SequencePlan:
    """Channels-last :class:`ForwardPlan` s, each reading the one before (no residual), run
    by one C call: the layers between write two scratch buffers in turn, so one call costs
    a single trip through Python whatever the number of layers (a VGG's 13 layers at batch
    1: ~17 us of Python each as separate calls).  The caller checks that the plans still
    hold for the layers' weights before :meth:`run`; it may keep the scratch buffers
    between calls in a :class:`Scratch`."""

    __slots__ = ("plans", "in_shape", "shape", "scratch", "ptrs")

    @classmethod
    def build(cls, plans: "list[ForwardPlan]") -> Optional["SequencePlan"]:
        """The sequence of ``plans``, or None where they are not all channels-last kernel
        calls, each on the previous one's output."""
        if not plans or any(p.fmt is not torch.channels_last
                            or not isinstance(getattr(p.call, "args", None), _NhwcArgs)
                            for p in plans):
            return None
        if any(b.in_shape != a.shape for a, b in zip(plans, plans[1:])):
            return None
        seq = cls()
        seq.plans, seq.in_shape, seq.shape = list(plans), plans[0].in_shape, plans[-1].shape
        seq.scratch = max((math.prod(p.shape) for p in plans[:-1]), default=0)
        seq.ptrs = (ctypes.c_void_p * len(plans))(
            *(ctypes.addressof(p.call.args) for p in plans))
        return seq

    def run(self, x: torch.Tensor, scratch: Optional[Scratch] = None) -> torch.Tensor:
        """The layers on ``x`` (of ``in_shape``, float32 on the CPU), a new channels-last
        output; the layers between write into ``scratch`` where it is free, else into
        buffers of this call."""
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.empty(self.shape, dtype=torch.float32, memory_format=torch.channels_last)
        if self.shape[0] == 0:
            return y
        count = len(self.plans)
        size = self.scratch if count > 1 else 0
        need = size * (2 if count > 2 else 1)
        flat = scratch.take(need) if scratch is not None and need else None
        try:
            if flat is None:
                mine = torch.empty(need, dtype=torch.float32)
                buf0, buf1 = mine[:size], mine[size:need]
            else:
                buf0, buf1 = flat[:size], flat[size:need]
            # an empty buffer is never read (one or two layers); size * 4 bytes keeps the
            # second 64-byte aligned (channels-last layers have 16 | N filters)
            rc = _load().hetconv_nhwc_sequence(self.ptrs, count, x.data_ptr(),
                                               buf0.data_ptr(), buf1.data_ptr(), y.data_ptr(),
                                               torch.get_num_threads())
        finally:
            if flat is not None:
                scratch.give_back()
        if rc != 0:
            raise RuntimeError(f"hetconv channels-last kernel sequence failed (code {rc})")
        return y


def _recording(x: torch.Tensor, tensors: tuple, residual: Optional[torch.Tensor]) -> bool:
    """Whether autograd records a call on these tensors, or a torch.func transform or
    forward-mode AD sees them (:func:`_transformed`): no prepared call holds for those."""
    return (torch.is_grad_enabled() and (x.requires_grad or any(
        t is not None and t.requires_grad for t in tensors) or (
            residual is not None and residual.requires_grad))) or _transformed(
                x, *tensors, residual)


def _transformed(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) or forward-mode AD (a dual
    tensor) sees any of ``tensors``: the C kernels read raw memory and have no batching or
    forward-mode rule (vmap would crash, a tangent would be dropped), so such calls run the
    PyTorch backends.  False while torch.compile traces (the op has its rules there)."""
    if torch._C._functorch.maybe_current_level() is None and _fwad._current_level < 0:
        return False  # no transform and no dual level active (the common case: ~0.1 us)
    if torch.compiler.is_compiling():
        return False
    if any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t)
           for t in tensors):
        return True
    return _fwad._current_level >= 0 and any(
        t is not None and _fwad.unpack_dual(t).tangent is not None for t in tensors)


class PlanHolder:
    """Mixin of the modules that keep :class:`ForwardPlan` s per call signature: the dict
    is made on first use (modules pickled before it existed load as they are) and left out
    of copies and pickles (plans hold raw pointers; they are rebuilt on the next call)."""

    #: Signatures kept; one more starts the dict over rather than let it grow.
    MAX_PLANS = 64

    def _plan_for(self, key) -> object:
        """The entry stored for ``key`` (a plan, or what the holder stored), or False."""
        return self.__dict__.get("_plans", {}).get(key, False)

    def _keep_plan(self, key, plan) -> None:
        plans = self.__dict__.setdefault("_plans", {})
        if len(plans) >= self.MAX_PLANS:
            plans.clear()
        plans[key] = plan

    #: Attributes left out of copies and pickles (made again on first use).
    TRANSIENT: tuple = ("_plans",)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for name in self.TRANSIENT:
            state.pop(name, None)
        return state


def _out_size(size: int, k: int, stride: int) -> int:
    return (size + 2 * (k // 2) - k) // stride + 1


class _ForwardArgs(ctypes.Structure):
    """``hetconv_forward_args`` (csrc/hetconv_cpu.c): every argument of the NCHW forward
    pass but the tensors and the thread count."""
    _fields_ = ([(f, ctypes.c_int) for f in ("B", "M", "N", "H", "W", "nblk")]
                + [(f, ctypes.c_void_p) for f in ("blk_cls", "blk_out", "w1p", "wkp", "bp")]
                + [("P", ctypes.c_int), ("Mk", ctypes.c_int), ("chan", ctypes.c_void_p),
                   ("T", ctypes.c_int), ("tap_dh", ctypes.c_void_p), ("tap_dw", ctypes.c_void_p)]
                + [(f, ctypes.c_int) for f in ("stride", "kh", "kw", "relu")])


class _NhwcArgs(ctypes.Structure):
    """``hetconv_nhwc_args`` (csrc/hetconv_nhwc.c), likewise for the channels-last one."""
    _fields_ = ([(f, ctypes.c_int) for f in ("B", "M", "N", "H", "W", "kh", "kw", "s", "ph",
                                             "pw", "Mk", "ts", "lw", "vs", "nfb")]
                + [(f, ctypes.c_void_p) for f in ("blk_n0", "blk_p0", "blk_v", "blk_toff",
                                                  "w1p", "wkp", "bias")]
                + [(f, ctypes.c_int) for f in ("relu", "posmajor", "up", "Ho", "Wo", "pool")])


def _packed_call(fn: Callable, args: ctypes.Structure) -> Callable:
    """``call(x, y, residual) -> rc``: ``fn`` (a ``*_forward_packed`` entry) on ``args``
    (kept alive by the closure) with the calling thread's torch thread count."""
    ref = ctypes.byref(args)

    def call(x, y, residual):
        return fn(ref, x.data_ptr(), y.data_ptr(),
                  None if residual is None else residual.data_ptr(), torch.get_num_threads())
    call.args = args  # the struct, for callers that hand it on (run_chain)
    return call


class _ChainOp(ctypes.Structure):
    """``hetconv_chain_op`` (csrc/hetconv_cpu.c): a layer's struct, where its input,
    residual and output are (:data:`CHAIN_X`, ..., or a buffer index) and its kind
    (0: a HetConv layer, 1: a shortcut)."""
    _fields_ = [("layer", ctypes.c_void_p), ("input", ctypes.c_int), ("res", ctypes.c_int),
                ("out", ctypes.c_int), ("kind", ctypes.c_int)]


class _ShortcutArgs(ctypes.Structure):
    """``hetconv_shortcut_args`` (csrc/hetconv_cpu.c)."""
    _fields_ = [(f, ctypes.c_int) for f in ("M", "H", "W", "N", "stride")] + [
        ("src", ctypes.c_void_p)]


class ShortcutPlan:
    """The option-A shortcut of the CIFAR ResNets as a chain op, for inputs of ``in_shape``
    (batch 1): ``F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, front, back))``, then the
    channels in ``order`` (when given), as a map from output to input channels."""

    __slots__ = ("args", "src", "in_shape", "shape")

    def __init__(self, in_shape: tuple, stride: int, front: int, back: int,
                 order: Optional[torch.Tensor] = None) -> None:
        _, m, h, w = in_shape
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 \
                or min(front, back) < 0:
            raise ValueError(f"stride must be a positive int and the pads >= 0, got stride "
                             f"{stride!r}, front {front!r}, back {back!r}")
        n = m + front + back
        src = torch.full((n,), -1, dtype=torch.int64)
        src[front:front + m] = torch.arange(m)
        if order is not None:
            if order.dim() != 1 or len(order) != n:
                raise ValueError(f"order must list the {n} channels, got {tuple(order.shape)}")
            src = src[order.long()]
        self.src = src.to(torch.int32).contiguous()
        self.args = _ShortcutArgs(m, h, w, n, stride, self.src.data_ptr())
        self.in_shape = tuple(in_shape)
        self.shape = (1, n, (h - 1) // stride + 1, (w - 1) // stride + 1)


#: Places in a chain program (csrc/hetconv_cpu.c, hetconv_native_chain): the chain's first
#: and second input, its output, no residual; buffers are 0, 1, ...
CHAIN_X, CHAIN_Y, CHAIN_NONE, CHAIN_X2 = -1, -2, -3, -4


class Chain:
    """A chain of NCHW-kernel layers (:class:`ForwardPlan` s) and shortcuts
    (:class:`ShortcutPlan` s) prepared for :func:`run_chain`: the C op array, the plans it
    points into (kept alive here), the buffers it needs and the shapes (batch left out) of
    its inputs and output."""

    __slots__ = ("ops", "plans", "nbuf", "in_shapes", "out_shape")

    def __init__(self, plans: list, program: list) -> None:
        if len(plans) != len(program) or not plans:
            raise ValueError(f"a chain needs one (input, residual, output) entry per plan, got "
                             f"{len(program)} entries for {len(plans)} plans")
        self.plans = list(plans)
        self.ops = (_ChainOp * len(plans))()
        shapes = {}
        for op, plan, (i, r, o) in zip(self.ops, self.plans, program):
            if isinstance(plan, ShortcutPlan):
                args, op.kind = plan.args, 1
            else:
                args = getattr(plan.call, "args", None)
                if plan.fmt != torch.contiguous_format or args is None:
                    raise ValueError("chain layers must run the NCHW kernel")
                op.kind = 0
            op.layer, op.input, op.res, op.out = ctypes.addressof(args), i, r, o
            shapes.setdefault(i, tuple(plan.in_shape[1:]))
            if r != CHAIN_NONE:
                shapes.setdefault(r, tuple(plan.shape[1:]))
            shapes[o] = tuple(plan.shape[1:])
        self.nbuf = 1 + max([v for entry in program for v in entry if v >= 0], default=-1)
        self.in_shapes = (shapes.get(CHAIN_X), shapes.get(CHAIN_X2))
        self.out_shape = shapes.get(CHAIN_Y)


def run_chain(chain: Chain, x: torch.Tensor, x2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run a :class:`Chain` image by image in one C call (the activations between its
    layers stay in per-thread buffers) on contiguous float32 CPU inputs ``x`` (and ``x2``)
    of the chain's shapes; returns a new output."""
    for name, t, want in (("x", x, chain.in_shapes[0]), ("x2", x2, chain.in_shapes[1])):
        if want is None:
            if t is not None and name == "x2":
                raise ValueError("x2 given, but no layer of the chain reads it")
            continue
        if (t is None or t.dim() != 4 or tuple(t.shape[1:]) != want or t.shape[0] != x.shape[0]
                or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()):
            got = None if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise ValueError(f"{name} must be a contiguous float32 CPU tensor of shape "
                             f"(B, {', '.join(map(str, want))}), got {got}")
    if chain.out_shape is None:
        raise ValueError("the chain's program never writes its output (CHAIN_Y)")
    y = torch.empty((x.shape[0],) + chain.out_shape)
    if x.shape[0] == 0:
        return y
    rc = _load().hetconv_native_chain(chain.ops, len(chain.ops), chain.nbuf, x.data_ptr(),
                                      None if x2 is None else x2.data_ptr(), y.data_ptr(),
                                      x.shape[0], torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"hetconv native chain failed (code {rc})")
    return y


def _nchw_call(x_shape: tuple, pk: dict, n: int, relu: bool, stride: int) -> Tuple[tuple, Callable]:
    """The output shape of the NCHW kernel on an input of ``x_shape`` and a function
    ``call(x, y, residual) -> rc`` that runs it (see :func:`_run`)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"hetconv native kernel unavailable ({build_error()})")
    b, m, h, w = x_shape
    kh, kw = pk["kernel"]
    args = _ForwardArgs(b, m, n, h, w, *pk["args"], stride, kh, kw, int(relu))
    return ((b, n, _out_size(h, kh, stride), _out_size(w, kw, stride)),
            _packed_call(lib.hetconv_native_forward_packed, args))


def _run(x: torch.Tensor, pk: dict, n: int, relu: bool = False,
         residual: Optional[torch.Tensor] = None, stride: int = 1) -> torch.Tensor:
    shape, call = _nchw_call(tuple(x.shape), pk, n, relu, stride)
    return _launch(x, shape, torch.contiguous_format, call, residual, "native kernel")


def _shapes(weight_k: torch.Tensor, weight_1: torch.Tensor) -> Tuple[int, int, int]:
    n, m_k = weight_k.shape[:2]
    m = m_k + weight_1.shape[1]
    return n, m, m // m_k


# One custom operator (torch.library), so torch.compile and torch.export see the layer as a
# single node instead of breaking the graph at a ctypes call.
@torch.library.custom_op("hetconv::native_conv2d", mutates_args=())
def _native_op(x: torch.Tensor, weight_k: torch.Tensor, weight_1: torch.Tensor,
               bias: Optional[torch.Tensor], pattern: str, relu: bool,
               residual: Optional[torch.Tensor], stride: int) -> torch.Tensor:
    return _forward(x, weight_k, weight_1, bias, pattern, relu, residual, stride)


def _empty_like_run(x: torch.Tensor, shape: tuple, nhwc: bool) -> torch.Tensor:
    y = x.new_empty(shape)
    return y.contiguous(memory_format=torch.channels_last) if nhwc else y


@_native_op.register_fake
def _native_op_fake(x, weight_k, weight_1, bias, pattern, relu, residual, stride):
    n, m, p = _shapes(weight_k, weight_1)
    kh, kw = weight_k.shape[2:]
    return _empty_like_run(x, (x.shape[0], n, _out_size(x.shape[2], kh, stride),
                               _out_size(x.shape[3], kw, stride)),
                           _use_nhwc(x, n, m, p, pattern))


def _setup_context(ctx, inputs, output):
    x, weight_k, weight_1, bias, pattern, relu, residual, stride = inputs
    ctx.save_for_backward(x, weight_k, weight_1, output if relu else None)
    ctx.pattern, ctx.has_bias, ctx.stride = pattern, bias is not None, stride


def _input_grad(gy: torch.Tensor, weight_k: torch.Tensor, weight_1: torch.Tensor,
                pattern: str, stride: int, h: int, w: int) -> torch.Tensor:
    """The input gradient (size ``h`` x ``w``) by the C kernel on the transposed, flipped
    weights: the NCHW kernel at stride 1, the channels-last one at stride 1 or 2
    (:func:`_input_grad_runs` says which calls it takes)."""
    n, m, p = _shapes(weight_k, weight_1)
    if _is_channels_last(gy) and _nhwc_step(m, n, p, pattern) is not None:
        return _run_nhwc(gy, _nhwc_packed(weight_k, weight_1, None, pattern, n, m, p, True), m,
                         up=stride, out_size=(h, w))
    return _run(gy, _packed(weight_k, weight_1, None, pattern, n, m, p, True), m)


def _input_grad_runs(gy: torch.Tensor, n: int, m: int, p: int, pattern: str,
                     stride: int) -> bool:
    """Whether :func:`_input_grad` computes this call (else the dense reference does)."""
    if n % p:
        return False
    return stride == 1 or (_is_channels_last(gy) and _nhwc_step(m, n, p, pattern) is not None)


_input_grad_op = torch.library.custom_op("hetconv::native_conv2d_input_grad",
                                         mutates_args=())(_input_grad)


@_input_grad_op.register_fake
def _input_grad_fake(gy, weight_k, weight_1, pattern, stride, h, w):
    n, m, p = _shapes(weight_k, weight_1)
    return _empty_like_run(gy, (gy.shape[0], m, h, w),
                           _is_channels_last(gy) and _nhwc_step(m, n, p, pattern) is not None)


def _weight_grad(x: torch.Tensor, gy: torch.Tensor, weight_k: torch.Tensor,
                 weight_1: torch.Tensor, pattern: str,
                 stride: int) -> Tuple[torch.Tensor, torch.Tensor]:
    n, m, p = _shapes(weight_k, weight_1)
    if _use_nhwc(x, n, m, p, pattern):
        return _wgrad_nhwc(x, gy, weight_k, pattern, n, m, p, stride)
    gwk, gw1 = _wgrad(x, gy, weight_k, pattern, n, m, p, stride)
    return _in_layout_of(gwk, weight_k), gw1


def _in_layout_of(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``g`` (float32) with the strides the weight gradients get (see :func:`_empty_grad`)."""
    out = _empty_grad(like)
    return g if out.stride() == g.stride() else out.copy_(g)


_weight_grad_op = torch.library.custom_op("hetconv::native_conv2d_weight_grad",
                                          mutates_args=())(_weight_grad)


@_weight_grad_op.register_fake
def _weight_grad_fake(x, gy, weight_k, weight_1, pattern, stride):
    return _empty_grad(weight_k), weight_1.new_empty(weight_1.shape, dtype=torch.float32)


def _backward(ctx, gy):
    """Input gradient: the C kernel on ``gy`` with the kernel transposed (needs stride 1 and
    P | N, else the dense reference's); weight gradients: the C weight-gradient kernel."""
    from .functional import _assemble_dense

    x, weight_k, weight_1, out = ctx.saved_tensors
    n, m, p = _shapes(weight_k, weight_1)
    kh, kw = weight_k.shape[2:]
    if out is not None:  # fused ReLU
        gy = gy * (out > 0)
    need_x, need_wk, need_w1, need_b = ctx.needs_input_grad[:4]
    gx = gwk = gw1 = gb = None
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True (double backward, e.g. a gradient penalty): the C kernels'
        # gradients would have no graph, so the differentiable dense reference's
        return _backward_differentiable(ctx, gy, x, weight_k, weight_1)
    nhwc = _use_nhwc(x, n, m, p, ctx.pattern)  # the layout the forward pass ran in
    gy = gy.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    # torch.library ops while torch.compile traces; plain calls in eager mode (an op call
    # costs ~0.1 ms of Python dispatch, as much as a small layer's whole kernel)
    compiling = torch.compiler.is_compiling()
    s = ctx.stride
    if need_x and _input_grad_runs(gy, n, m, p, ctx.pattern, s):
        gx = (_input_grad_op if compiling else _input_grad)(gy, weight_k, weight_1, ctx.pattern,
                                                            s, x.shape[2], x.shape[3])
    elif need_x:
        dense = _assemble_dense(weight_k.detach(), weight_1.detach(), ctx.pattern, n, m, p)
        gx = torch.ops.aten.convolution_backward(
            gy, x, dense, None, [s, s], [kh // 2, kw // 2], [1, 1], False, [0, 0], 1,
            [True, False, False])[0]
    if need_wk or need_w1:
        gwk, gw1 = (_weight_grad_op if compiling else _weight_grad)(x, gy, weight_k, weight_1,
                                                                    ctx.pattern, s)
    if need_b and ctx.has_bias:
        gb = gy.sum((0, 2, 3))
    gr = gy if ctx.needs_input_grad[6] else None
    return gx, (gwk if need_wk else None), (gw1 if need_w1 else None), gb, None, None, gr, None


def _backward_differentiable(ctx, gy, x, weight_k, weight_1):
    """:func:`_backward`'s gradients (``gy`` after the fused ReLU's mask) by autograd through
    the dense reference, with their own graph (what ``create_graph=True`` asks for)."""
    from .functional import dense_weight

    kh, kw = weight_k.shape[2:]
    need = ctx.needs_input_grad
    wanted = [t for t, needed in zip((x, weight_k, weight_1), need[:3]) if needed]
    grads = iter(())
    if wanted:
        with torch.enable_grad():
            y = torch.nn.functional.conv2d(x, dense_weight(weight_k, weight_1, ctx.pattern),
                                           None, ctx.stride, (kh // 2, kw // 2))
        grads = iter(torch.autograd.grad(y, wanted, gy, create_graph=True))
    gx, gwk, gw1 = (next(grads) if needed else None for needed in need[:3])
    gb = gy.sum((0, 2, 3)) if need[3] and ctx.has_bias else None
    return gx, gwk, gw1, gb, None, None, (gy if need[6] else None), None


_native_op.register_autograd(_backward, setup_context=_setup_context)


def native_conv2d(x: torch.Tensor, weight_k: torch.Tensor, weight_1: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, pattern: str = "shifted",
                  relu: bool = False, residual: Optional[torch.Tensor] = None,
                  stride: int = 1) -> torch.Tensor:
    """HetConv of ``x`` (B, M, H, W) by the C kernel, optionally fused with what follows it.

    Computes ``relu(conv(x) + residual)`` with the sum and the ReLU applied
    as each output value is stored (no extra pass over the activations);
    ``residual`` (B, N, Ho, Wo) and ``relu`` are optional; ``stride`` 1 or 2,
    padding ``kernel // 2``.  Callers check :func:`unsupported_reason` first
    (``het_conv2d`` does).  channels_last input on a layer :func:`nhwc_supported`
    accepts runs the channels-last kernel and gives a channels_last result;
    otherwise the result is NCHW float32.
    """
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2 for the native kernel, got {stride!r}")
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # the op: compilation and torch.jit.trace record it (a ctypes call would not be:
        # a trace replayed the uninitialised output)
        return _native_op(x, weight_k, weight_1, bias, pattern, relu, residual, stride)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight_k, weight_1, bias, residual)):
        return _NativeFunction.apply(x, weight_k, weight_1, bias, pattern, relu, residual, stride)
    return _forward(x, weight_k, weight_1, bias, pattern, relu, residual, stride)


class _NativeFunction(torch.autograd.Function):
    """Eager autograd for the kernel (the same forward and backward as the op, without the
    op's dispatch cost)."""

    @staticmethod
    def forward(ctx, x, weight_k, weight_1, bias, pattern, relu, residual, stride):
        out = _forward(x, weight_k, weight_1, bias, pattern, relu, residual, stride)
        _setup_context(ctx, (x, weight_k, weight_1, bias, pattern, relu, residual, stride), out)
        return out

    backward = staticmethod(_backward)
