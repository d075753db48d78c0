"""time_interleaved: every candidate timed, rounds interleaved in seeded random orders."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from hetconv._timing import Timing, time_interleaved


def _recorder():
    calls = []
    return calls, {name: (lambda name=name: calls.append(name)) for name in "abcdef"}


def test_rounds_are_interleaved_and_shuffled_reproducibly():
    calls, cands = _recorder()
    out = time_interleaved(cands, repeats=6, warmup=1)
    assert set(out) == set(cands) and all(isinstance(t, Timing) for t in out.values())
    assert all(len(t.samples) == 6 for t in out.values())
    timed = calls[len(cands):]  # after one warm-up call each
    rounds = [timed[i:i + len(cands)] for i in range(0, len(timed), len(cands))]
    assert len(rounds) == 6 and all(sorted(r) == sorted(cands) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # the order changes between rounds
    # Each candidate follows different predecessors across rounds.
    first = {r[0] for r in rounds}
    assert len(first) > 1
    again, cands2 = _recorder()
    time_interleaved(cands2, repeats=6, warmup=1)
    assert again == calls  # same seed, same orders
    other, cands3 = _recorder()
    time_interleaved(cands3, repeats=6, warmup=1, seed=1)
    assert other != calls


def test_fixed_order_and_bad_arguments():
    calls, cands = _recorder()
    time_interleaved(cands, repeats=2, warmup=0, shuffle=False)
    assert calls == list("abcdef") * 2
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved(cands, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        time_interleaved(cands, warmup=-1)
    with pytest.raises(ValueError, match="settle"):
        time_interleaved(cands, settle=-1)
    with pytest.raises(ValueError, match="candidates"):
        time_interleaved({})


def test_settle_calls_precede_each_timed_call():
    calls, cands = _recorder()
    out = time_interleaved(cands, repeats=3, warmup=0, shuffle=False, settle=2)
    assert calls == [c for c in "abcdef" for _ in range(3)] * 3
    assert all(len(t.samples) == 3 for t in out.values())  # only the third call is timed


def _five_ms_on_a_fake_clock(monkeypatch):
    """A candidate that takes 5 ms on a fake clock (exact however loaded the machine is;
    every reading takes a microsecond), and the list of its calls."""
    import types

    import hetconv._timing as timing
    clock = {"now": 0.0}

    def perf_counter():
        clock["now"] += 1e-6
        return clock["now"]

    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=perf_counter))
    calls = []

    def five_ms():
        calls.append("x")
        clock["now"] += 0.005
    return five_ms, calls


def test_settle_seconds_adds_untimed_calls_until_that_long(monkeypatch):
    five_ms, calls = _five_ms_on_a_fake_clock(monkeypatch)

    out = time_interleaved({"x": five_ms, "y": lambda: None}, repeats=3, warmup=0,
                           shuffle=False, settle=1, settle_seconds=0.02)
    # per round: untimed calls until 20 ms had passed (4 of 5 ms), then the timed one; the
    # settle count alone would have given 2
    assert len(calls) == 5 * 3
    assert len(out["x"].samples) == 3 and min(out["x"].samples) >= 0.005
    for bad in (-0.1, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="settle_seconds"):
            time_interleaved({"x": five_ms}, settle_seconds=bad)


def test_prune_stops_timing_candidates_far_behind_the_best(monkeypatch):
    """With ``prune``, a candidate whose fastest call took more than ``prune`` times the
    best median is timed no more after the third round; the contenders get every round."""
    import types

    import hetconv._timing as timing
    clock = {"now": 0.0}
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(
        perf_counter=lambda: clock["now"], sleep=lambda s: None))
    calls = []

    def taking(name, seconds):
        def call():
            calls.append(name)
            clock["now"] += seconds
        return call

    cands = {"fast": taking("fast", 0.010), "close": taking("close", 0.012),
             "slow": taking("slow", 0.0145), "far": taking("far", 0.030)}
    out = time_interleaved(cands, repeats=6, warmup=0, prune=1.5)
    assert [len(out[k].samples) for k in cands] == [6, 6, 6, 3]
    assert calls.count("far") == 3 and out["far"].median == pytest.approx(0.030)
    # a tighter threshold drops "slow" (1.45x) too; none: every candidate every round
    out = time_interleaved(cands, repeats=6, warmup=0, prune=1.4)
    assert [len(out[k].samples) for k in cands] == [6, 6, 3, 3]
    out = time_interleaved(cands, repeats=6, warmup=0)
    assert all(len(t.samples) == 6 for t in out.values())
    # min_seconds counts for the candidates still timed: "far" would have needed 9 rounds
    out = time_interleaved(cands, repeats=2, warmup=0, prune=1.5, min_seconds=0.08)
    assert len(out["fast"].samples) == 8 and len(out["far"].samples) == 3
    for bad in (1, 0.5, -2, float("inf"), float("nan"), True, "2"):
        with pytest.raises(ValueError, match="prune must be 0"):
            time_interleaved(cands, prune=bad)


def test_settle_zero_means_no_untimed_calls_whatever_settle_seconds(monkeypatch):
    """``hetconv bench --settle 0`` (help: "0 halves the run time") passes the default
    --settle-ms 10 along: the candidates were still settled for 10 ms before each timed call."""
    five_ms, calls = _five_ms_on_a_fake_clock(monkeypatch)

    time_interleaved({"x": five_ms}, repeats=3, warmup=0, settle=0, settle_seconds=0.01)
    assert calls == ["x"] * 3  # the timed calls only


def test_bench_settle_zero_is_recorded_as_no_settling(monkeypatch):
    import importlib

    from bench_helpers import fake_run

    seen = fake_run(monkeypatch)
    importlib.import_module("hetconv.bench.run").run("quick", what=("models",),
                                                     progress=False, threads=None, settle=0)
    assert seen["models"]["settle"] == 0
    assert seen["env"]["settle"].startswith("no untimed calls")


def test_idle_seconds_sleeps_before_each_candidates_calls(monkeypatch):
    import types

    import hetconv._timing as timing
    events = []
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(
        perf_counter=lambda: 0.0, sleep=lambda s: events.append(("sleep", s))))
    cands = {k: (lambda k=k: events.append(k)) for k in "ab"}
    out = time_interleaved(cands, repeats=2, warmup=1, shuffle=False, settle=1,
                           idle_seconds=0.004)
    # warm-up calls without a pause; then per candidate: sleep, settle call, timed call
    assert events == ["a", "b"] + [("sleep", 0.004), "a", "a", ("sleep", 0.004), "b", "b"] * 2
    assert all(len(t.samples) == 2 for t in out.values())
    events.clear()
    time_interleaved(cands, repeats=1, warmup=0, shuffle=False)
    assert events == ["a", "b"]  # no pause by default
    for bad in (-0.001, float("nan"), "5"):
        with pytest.raises(ValueError, match="idle_seconds"):
            time_interleaved(cands, idle_seconds=bad)


def test_settle_times_the_call_after_the_untimed_ones():
    import time
    state = {"cold": True}

    def cold_then_fast():  # slow on its first call after another candidate ran
        if state["cold"]:
            time.sleep(0.02)
        state["cold"] = False

    def other():
        state["cold"] = True

    cands = {"x": cold_then_fast, "y": other}
    plain = time_interleaved(cands, repeats=3, warmup=0, shuffle=False)
    settled = time_interleaved(cands, repeats=3, warmup=0, shuffle=False, settle=1)
    assert plain["x"].median >= 0.02 > settled["x"].median


_RSS_SCRIPT = r"""
import ctypes, os, sys
retain = sys.argv[1] == "1"
if retain:
    from hetconv._timing import retain_freed_memory
    assert retain_freed_memory() is not None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
blocks = [libc.malloc(1 << 20) for _ in range(64)]  # 64 MiB in 1 MiB blocks
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
before = rss()
for b in blocks:
    libc.free(b)
print((before - rss()) >> 20)  # MiB given back to the system by the frees
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_retain_freed_memory_keeps_freed_blocks_in_the_process():
    """Freed 1 MiB blocks go back to the system by default (mmapped blocks); after
    retain_freed_memory() they stay in the process, so the next allocation finds them
    without page faults. Fresh processes: the allocator's state depends on its history."""
    def given_back(retain: bool) -> int:
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, "1" if retain else "0"],
                             capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert given_back(False) >= 48
    assert given_back(True) <= 4


def test_bench_records_the_allocator_setting(monkeypatch):
    import importlib

    bench_run = importlib.import_module("hetconv.bench.run")  # the module, not bench.run()

    seen = {}
    monkeypatch.setattr(bench_run, "run_models", lambda *a, **k: [])
    monkeypatch.setattr(bench_run, "write_report",
                        lambda layers, models, out, env, seconds, name, notes:
                        seen.update(env, notes=notes) or {})
    monkeypatch.setattr(bench_run, "retain_freed_memory", lambda: "kept (test)")
    rates = iter([500.0, 200.0])  # the FMA rate at the start and at the end: it dropped
    monkeypatch.setattr(bench_run.native, "fma_rate", lambda: next(rates))
    bench_run.run("quick", what=("models",), progress=False, threads=None)
    assert seen["malloc"] == "kept (test)"
    assert seen["fma_rate"].startswith("500 at the start, 200 at the end")
    assert len(seen["notes"]) == 1 and "2.50x" in seen["notes"][0]
    monkeypatch.setattr(bench_run.native, "fma_rate", lambda: None)  # no kernel: no entry
    seen.clear()
    bench_run.run("quick", what=("models",), progress=False, threads=None,
                  retain_memory=False)
    assert seen["malloc"].startswith("default")
    assert "fma_rate" not in seen and seen["notes"] == []
