"""Command-line error handling that no other test file owns."""

import warnings

import pytest

from hetconv.cli import main
from hetconv.models import AllDenseWarning


def test_profile_input_too_small_is_a_clear_error(capsys):
    """Pooling shrinks a too small --input to nothing: an error naming --input, no traceback."""
    assert main(["profile", "vgg16", "--input", "3x16x16", "--total"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("hetconv profile: error: vgg16 cannot run on --input 3x16x16 (")
    assert "too small" in err and "Traceback" not in err and out == ""
    assert main(["profile", "vgg16", "--input", "3x64x64", "--total"]) == 0
    assert "MACs" in capsys.readouterr().out


def test_a_part_that_divides_no_layer_is_warned_about(capsys, caplog):
    """P = 3 divides no layer's input channels of a CIFAR VGG-16 (64, 128, ...): the model
    stays dense (indivisible="skip"), which profile and train say instead of showing a
    "P3" model with no reduction; P = 4 and a dense model: no warning."""
    import logging

    from hetconv.data.base import DatasetInfo
    from hetconv.train.config import TrainConfig
    from hetconv.train.engine import build_model

    for argv in (["profile", "vgg16_cifar", "--part", "3", "--total"],
                 ["profile", "vgg16_cifar_p3", "--total"]):
        with warnings.catch_warnings(record=True) as caught:  # said once, not twice
            warnings.simplefilter("always")
            assert main(argv) == 0
        assert not [w for w in caught if issubclass(w.category, AllDenseWarning)]
        err = capsys.readouterr().err
        assert "warning: part 3 divides the input channels of no layer" in err
    for argv in (["profile", "vgg16_cifar", "--part", "4", "--total"],
                 ["profile", "vgg16_cifar", "--total"]):
        assert main(argv) == 0
        assert "warning" not in capsys.readouterr().err
    info = DatasetInfo(name="x", num_classes=10, in_chans=3, image_size=32, root="")
    with caplog.at_level(logging.WARNING, logger="hetconv.train"), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_model(TrainConfig(model="vgg16_cifar", model_kwargs={"part": 3, "width": 0.125}),
                    info)
    assert not [w for w in caught if issubclass(w.category, AllDenseWarning)]
    assert "divides the input channels of no layer" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hetconv.train"):
        build_model(TrainConfig(model="vgg16_cifar_p4", model_kwargs={"width": 0.125}), info)
    assert "divides" not in caplog.text


def test_create_model_warns_when_a_part_divides_no_layer():
    """create_model("vgg16_cifar_p3") returned a dense VGG-16 without a word (only the CLI
    and the trainer said so): a library user now gets an AllDenseWarning."""
    from hetconv import create_model
    from hetconv.layers import HetConv2d

    for name, kwargs in (("vgg16_cifar_p3", {}), ("vgg16_cifar", {"part": 3})):
        with pytest.warns(AllDenseWarning, match="part 3 divides the input channels of no"):
            model = create_model(name, width=0.125, **kwargs)
        assert not any(isinstance(m, HetConv2d) for m in model.modules())
    for name in ("vgg16_cifar_p4", "vgg16_cifar", "resnet56_cifar_pc"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", AllDenseWarning)
            create_model(name, width=0.25)


def test_train_refuses_an_option_and_a_model_arg_that_disagree(tmp_path, capsys):
    """--width and --model-arg width=... (likewise --part, --se) both set one model keyword:
    when they disagree, an error instead of one silently winning; when they agree, fine."""
    base = ["train", "--model", "vgg16_cifar", "--out", str(tmp_path), "--name", "r",
            "--epochs", "1", "--train-subset", "64", "--val-subset", "32",
            "--limit-train-batches", "1", "--limit-val-batches", "1", "--batch-size", "32"]
    assert main(base + ["--model-arg", "width=0.5", "--width", "0.125"]) != 0
    err = capsys.readouterr().err
    assert "--width 0.125 and --model-arg width=0.5 disagree" in err
    assert not (tmp_path / "r").exists()
    assert main(base + ["--model-arg", "part=4", "--part", "8"]) != 0
    assert "--part 8 and --model-arg part=4 disagree" in capsys.readouterr().err


def test_model_arg_reads_json_and_python_literals():
    """``--model-arg se=False`` must give False (the string "False" is truthy: SE blocks
    would be added); JSON values parse, anything else stays a string."""
    from hetconv.train.commands import parse_model_arg

    assert parse_model_arg("se=False") == ("se", False)
    assert parse_model_arg("se=True") == ("se", True)
    assert parse_model_arg("se=false") == ("se", False)
    assert parse_model_arg("groups=None") == ("groups", None)
    assert parse_model_arg("width=0.5") == ("width", 0.5)
    assert parse_model_arg("conv=gwc_pwc") == ("conv", "gwc_pwc")
    assert parse_model_arg("conv=false_name") == ("conv", "false_name")
