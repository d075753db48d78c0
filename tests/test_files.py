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
