"""Atomically written files get the permissions a plain open() would give them."""

import json
import os
import stat

import pytest

from hetconv._files import atomic_write_text, open_mode
from hetconv.train.checkpoint import atomic_write, atomic_write_json


@pytest.fixture
def umask():
    """Run the test under a known umask (restored afterwards)."""
    def set_umask(mask):
        os.umask(mask)
        return mask
    old = os.umask(0o022)
    yield set_umask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


WRITERS = {
    "atomic_write_text": lambda p: atomic_write_text(str(p), "text\n"),
    "atomic_write": lambda p: atomic_write(p, b"bytes"),
    "atomic_write_json": lambda p: atomic_write_json(p, {"a": 1}),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_new_files_get_plain_open_permissions(tmp_path, umask, writer, mask):
    """mkstemp makes its files 0600 whatever the umask; the written file must have what
    open() gives a new file: 0666 less the umask (config.json, metrics, checkpoints...)."""
    umask(mask)
    with open(tmp_path / "plain", "w"):
        pass
    WRITERS[writer](tmp_path / "sub" / "out")
    assert mode(tmp_path / "sub" / "out") == mode(tmp_path / "plain") == 0o666 & ~mask
    assert os.listdir(tmp_path / "sub") == ["out"]  # no temporary file left behind


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_overwriting_keeps_the_file_permissions(tmp_path, umask, writer):
    umask(0o022)
    path = tmp_path / "out"
    path.write_text("old")
    os.chmod(path, 0o640)
    WRITERS[writer](path)
    assert mode(path) == 0o640
    assert path.read_bytes() != b"old"
    assert open_mode(str(path)) == 0o640
    assert open_mode(str(tmp_path / "new")) == 0o644


def test_contents_and_failure_leave_nothing(tmp_path, umask):
    atomic_write_json(tmp_path / "a.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1, 2]}
    with pytest.raises(TypeError):
        atomic_write_text(str(tmp_path / "b.txt"), b"not text")
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_umask_is_read_without_changing_it(umask, mask):
    from hetconv._files import _umask
    umask(mask)
    assert _umask() == mask
    assert os.umask(mask) == mask


def test_benchmark_plot_gets_plain_open_permissions_and_leaves_no_temp_file(tmp_path, umask):
    """The benchmark's speedup plot (written via a temporary file too): the permissions of a
    plain open(), and no temporary file left when the plot cannot be drawn."""
    pytest.importorskip("matplotlib")
    from hetconv.bench.report import plot_speedup

    umask(0o022)
    path = str(tmp_path / "p.png")
    assert plot_speedup([], [], path) == path  # (the theory curve alone)
    assert mode(path) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["p.png"]
    bad = [{"part": 4, "mode": "infer"}]  # a row without its fields: drawing fails
    with pytest.raises(KeyError):
        plot_speedup(bad, [], str(tmp_path / "q.png"))
    assert sorted(os.listdir(tmp_path)) == ["p.png"]


def test_onnx_export_gets_plain_open_permissions(tmp_path, umask):
    """export_onnx writes through a temporary file too: the .onnx file has the permissions
    of a plain open()."""
    pytest.importorskip("onnx")
    import torch

    import hetconv

    umask(0o022)
    path = str(tmp_path / "m.onnx")
    hetconv.export_onnx(hetconv.HetConv2d(16, 16, 3, part=4).eval(), path,
                        torch.randn(1, 16, 6, 6))
    assert mode(path) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_json_files_are_strict_json_with_null_for_non_finite_numbers(tmp_path):
    """NaN and infinities were written as the tokens NaN / Infinity, which strict JSON
    readers (jq, JavaScript, most libraries) reject: they are null now, in every JSON file
    hetconv writes (run summaries, metrics.jsonl, benchmark reports)."""
    from hetconv._files import json_text
    from hetconv.train.metrics import write_metrics

    def strict(text):
        def refuse(token):
            raise ValueError(f"non-standard JSON token {token}")
        return json.loads(text, parse_constant=refuse)

    obj = {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), 2)], "c": {"d": 3}}
    want = {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": 3}}
    assert strict(json_text(obj)) == want
    atomic_write_json(tmp_path / "s.json", obj)
    assert strict((tmp_path / "s.json").read_text()) == want
    jsonl, _ = write_metrics(tmp_path, [{"epoch": 1, "val_loss": float("nan")},
                                        {"epoch": 2, "val_loss": 0.5}])
    assert [strict(line) for line in jsonl.read_text().splitlines()] == [
        {"epoch": 1, "val_loss": None}, {"epoch": 2, "val_loss": 0.5}]


def test_benchmark_report_files_are_replaced_together(tmp_path, monkeypatch):
    """write_report wrote the JSON, then the plot, then the markdown: an error after the
    JSON left the new JSON beside the old markdown and plot.  Now an error replaces
    nothing and leaves no temporary file; a plot that cannot be drawn no longer costs the
    results either (JSON and markdown written, the markdown says why, the old plot of other
    numbers removed); without matplotlib there is no plot and no error."""
    pytest.importorskip("matplotlib")
    from hetconv.bench import report

    row = {"family": "vgg16_cifar", "model": "P1", "metric": "throughput_b64",
           "variant": "eager_nchw", "batch": 64, "ms": 10.0, "images_per_s": 6400.0,
           "best": True, "ratio": 1.0, "reference": "P1", "theory_layer": None}
    paths = report.write_report([], [row], str(tmp_path), env={"cpu": "x"}, name="t")
    names = sorted(os.path.basename(p) for p in paths.values())
    assert set(paths) == {"markdown", "json", "plot"} and sorted(os.listdir(tmp_path)) == names
    before = {k: open(p, "rb").read() for k, p in paths.items()}

    def broken(*args):
        raise RuntimeError("no table")
    monkeypatch.setattr(report, "model_table", broken)
    with pytest.raises(RuntimeError, match="no table"):
        report.write_report([], [dict(row, ms=20.0)], str(tmp_path), env={"cpu": "y"}, name="t")
    assert {k: open(p, "rb").read() for k, p in paths.items()} == before
    assert sorted(os.listdir(tmp_path)) == names
    monkeypatch.undo()

    def no_plot(*args):
        raise ValueError("cannot draw")
    monkeypatch.setattr(report, "_draw_speedup", no_plot)
    got = report.write_report([], [dict(row, ms=20.0)], str(tmp_path), env={"cpu": "y"},
                              name="t")
    assert set(got) == {"markdown", "json"}
    assert sorted(os.listdir(tmp_path)) == ["t_results.json", "t_results.md"]
    assert json.load(open(paths["json"]))["models"][0]["ms"] == 20.0
    text = open(paths["markdown"]).read()
    assert "| y |" in text and "could not be drawn (ValueError: cannot draw)" in text
    assert "t_speedup.png" not in text
    monkeypatch.setattr(report, "_pyplot", lambda: None)  # matplotlib missing
    got = report.write_report([], [dict(row, ms=30.0)], str(tmp_path), env={"cpu": "z"},
                              name="t")
    assert set(got) == {"markdown", "json"} and "could not" not in open(paths["markdown"]).read()
    assert sorted(os.listdir(tmp_path)) == ["t_results.json", "t_results.md"]
    monkeypatch.undo()
    report.write_report([], [dict(row, ms=40.0)], str(tmp_path), env={"cpu": "w"}, name="t")
    assert sorted(os.listdir(tmp_path)) == names
    assert json.load(open(paths["json"]))["models"][0]["ms"] == 40.0
