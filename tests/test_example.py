"""examples/train_digits.py in reduced form: a few steps on small batches, end to end."""

import importlib.util
import pathlib
import re

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_example_runs_and_reports(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the example's data ships with scikit-learn")
    plot = tmp_path / "curves.png"
    exit_code = _load_example().main(["--steps", "3", "--batch-size", "32", "--device", "cpu",
                                      "--memory-probe-views", "256", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert exit_code == 0
    same_input_gap = re.search(r"largest \|fused - reference\|: (\S+) on the same embeddings", out)
    assert same_input_gap and float(same_input_gap.group(1)) < 1e-4, out
    for expected in ("largest |fused - reference|", "kNN accuracy", "time per training step",
                     "64 views: fused", "256 views: fused"):
        assert expected in out
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in out
    else:
        assert plot.read_bytes().startswith(b"\x89PNG")
