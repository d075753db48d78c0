"""Wall-clock timing of competing callables, fair on a shared machine.

Used by :mod:`hetconv.deploy` (to pick a backend per layer) and by
:mod:`hetconv.bench`.  Candidates are warmed up, then run round-robin
(interleaved), so a burst of load from another process hits all of them
alike; each candidate's median over the repeats is reported.  Each round
visits the candidates in a new (seeded) random order: a call is slowed by
what ran just before it (caches, memory allocator, up to 2x on ~1 ms calls),
so a fixed order would bias some candidates in every round.

``settle`` removes that cost altogether where it is not what is being
measured: each timed call then follows untimed calls of the same candidate,
so it sees what a loop of calls to it sees (its own weights and buffers in
the caches, no other runtime's threads still winding down).  ``hetconv bench``
uses it (``--settle``, default 1, and ``--settle-ms``, default 10): a torch model
timed right after an onnxruntime session ran 25-80% slower than in a loop of its own
calls, on the project's 2-core machine; at batch 1 (1-3 ms calls) one untimed call
was not enough (VGG-16 P4: 2.4 ms after one, 1.6 ms after 5 ms of them, 1.55 ms in a
loop; onnxruntime 2.7 / 1.0 ms).

Busy calls do not always get another runtime's threads out of the way: on the Zen 4 host
(2 vCPUs), onnxruntime's workers kept spinning through 10 ms of the next candidate's calls,
and VGG-16 P4's optimized model took 6.2-7.2 ms at batch 1 interleaved with its onnxruntime
session against 2.1-2.5 ms alone (onnxruntime 1.9-2.1 ms either way).  A few milliseconds
of sleep before a candidate's calls (``idle_seconds``; the benchmark's models: ``--idle-ms``,
default 5) let them park: 2.4-3.5 ms.

:func:`retain_freed_memory` removes one more cost of running many candidates in one
process: glibc hands freed activations back to the operating system, so the next call
of a torch model page-faults them in again (6,000-40,000 faults per ResNet-56 call here
when 16 models were interleaved, none in a loop of one model).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate: median, quartiles and all samples."""

    median: float
    q1: float
    q3: float
    samples: tuple

    @classmethod
    def from_samples(cls, samples: List[float]) -> "Timing":
        s = sorted(samples)
        if len(s) >= 4:
            q1, _, q3 = statistics.quantiles(s, n=4)
        else:
            q1, q3 = s[0], s[-1]
        return cls(statistics.median(s), q1, q3, tuple(samples))


#: ``hetconv bench``'s default for how long untimed calls settle each timed one (``--settle-ms``)
SETTLE_MS: float = 10.0
#: ``hetconv bench``'s default sleep before each model candidate's calls (``--idle-ms``)
IDLE_MS: float = 5.0


def check_settle(settle: int, seconds: float, seconds_name: str = "settle_seconds") -> None:
    """Raise ValueError unless ``settle`` is an int >= 0 and ``seconds`` (the argument called
    ``seconds_name``) a finite number >= 0."""
    if not isinstance(settle, int) or isinstance(settle, bool) or settle < 0:
        raise ValueError(f"settle must be an int >= 0, got {settle!r}")
    if (not isinstance(seconds, (int, float)) or isinstance(seconds, bool)
            or not 0 <= seconds < float("inf")):
        raise ValueError(f"{seconds_name} must be a finite number >= 0, got {seconds!r}")


def time_interleaved(candidates: Mapping[str, Callable[[], object]], repeats: int = 7,
                     warmup: int = 2, min_seconds: float = 0.0,
                     shuffle: bool = True, seed: int = 0, settle: int = 0,
                     settle_seconds: float = 0.0, idle_seconds: float = 0.0,
                     prune: float = 0.0) -> Dict[str, Timing]:
    """Time each zero-argument callable ``repeats`` times, interleaved after ``warmup`` calls.

    ``min_seconds`` extends the repeats (up to 10x) until every candidate has
    been timed for at least that long in total, so tiny calls get more samples.
    ``shuffle`` runs each round in a random order drawn from ``seed`` (the
    same orders every run); ``False`` keeps the mapping's order.  ``settle``
    untimed calls of a candidate precede each of its timed calls (steady state), and
    more of them until they took ``settle_seconds`` together (``settle=0``: none at all,
    whatever ``settle_seconds``, as ``hetconv bench --settle 0`` promises): short calls
    need more than one to get out of the previous candidate's wake (another runtime's
    threads spin for milliseconds after its call returns).  ``idle_seconds``: the process sleeps that long
    before each candidate's settling and timed calls, so another runtime's threads that spin
    after their call find idle cores and park (busy calls do not stop them: see the top).
    ``prune`` (0: off, else > 1): after each round from the third on, a candidate whose
    fastest call so far took more than ``prune`` times the best median is timed no more
    (its :class:`Timing` holds the samples it has; ``repeats`` and ``min_seconds`` then
    count for the others): a choice of the fastest spends its calls on the contenders.
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    check_settle(settle, settle_seconds)
    check_settle(0, idle_seconds, "idle_seconds")
    if not candidates:
        raise ValueError("candidates must not be empty")
    if (isinstance(prune, bool) or not isinstance(prune, (int, float))
            or not (prune == 0 or 1 < prune < float("inf"))):
        raise ValueError(f"prune must be 0 (off) or a finite number > 1, got {prune!r}")
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in candidates}
    order = list(candidates)
    active = set(order)
    rng = random.Random(seed)
    rounds = 0
    while True:
        if shuffle:
            rng.shuffle(order)
        for name in order:
            if name not in active:
                continue
            fn = candidates[name]
            if idle_seconds:
                time.sleep(idle_seconds)
            t0 = time.perf_counter()
            for _ in range(settle):
                fn()
            while settle and time.perf_counter() - t0 < settle_seconds:
                fn()
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
        if prune and rounds >= 3:  # three calls each: one slow call decides nothing
            best = min(statistics.median(samples[k]) for k in active)
            active = {k for k in active if min(samples[k]) <= prune * best}
        if rounds >= repeats and (rounds >= 10 * repeats or min(
                sum(samples[k]) for k in active) >= min_seconds):
            break
    return {k: Timing.from_samples(v) for k, v in samples.items()}


#: glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: What :func:`retain_freed_memory` sets: heap memory is never trimmed below 1 GiB of free
#: space, and blocks up to 32 MiB (glibc's largest dynamic threshold) come from the heap.
RETAIN_TRIM_BYTES, RETAIN_MMAP_BYTES = 1 << 30, 32 << 20


def retain_freed_memory() -> Optional[str]:
    """Keep freed memory in this process (glibc only): freed blocks of up to 32 MiB stay in
    the heap for the next allocation instead of going back to the operating system.

    A process that interleaves several models (a benchmark) otherwise page-faults each
    model's activations back in on every call; a process that runs one model in a loop
    does not, and this makes the former measure what the latter sees.  The cost: the
    process keeps its peak heap.  Returns a description of the setting, or None where
    the C library is not glibc (nothing changed).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_TRIM_THRESHOLD, RETAIN_TRIM_BYTES)
            and mallopt(_M_MMAP_THRESHOLD, RETAIN_MMAP_BYTES)):
        return None
    return (f"glibc retains freed memory (trim threshold {RETAIN_TRIM_BYTES >> 20} MiB, "
            f"mmap threshold {RETAIN_MMAP_BYTES >> 20} MiB)")
