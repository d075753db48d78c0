"""Command-line error handling that no other test file owns."""

from hetconv.cli import main


def test_profile_input_too_small_is_a_clear_error(capsys):
    """Pooling shrinks a too small --input to nothing: an error naming --input, no traceback."""
    assert main(["profile", "vgg16", "--input", "3x16x16", "--total"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("hetconv profile: error: vgg16 cannot run on --input 3x16x16 (")
    assert "too small" in err and "Traceback" not in err and out == ""
    assert main(["profile", "vgg16", "--input", "3x64x64", "--total"]) == 0
    assert "MACs" in capsys.readouterr().out
