"""The command line: arguments checked before anything runs (usage error, exit 2, no traceback),
the bench summary of this run's records, and a self-check output free of interpreter warnings."""

import functools
import json
import warnings

import pytest
import torch

from fused_losses import backends, cli
from fused_losses.benchmarking import Sweep
from fused_losses.cli import main
from fused_losses.cli.bench import quick_sweep
from fused_losses.cli.selfcheck import check_backend_loss

TINY = ["bench", "--device", "cpu", "--batch-sizes", "8", "--dims", "4", "--repeats", "1",
        "--providers", "torch", "--modes", "forward"]


def _usage_error(capsys, argv) -> str:
    """The one-line error of a command that must stop at its arguments."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage:")
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("arguments,message", [
    (["--batch-sizes", "0"], "argument --batch-sizes: expected an integer >= 1, got 0"),
    (["--batch-sizes", "-3"], "argument --batch-sizes: expected an integer >= 1, got -3"),
    (["--dims", "0"], "argument --dims: expected an integer >= 1, got 0"),
    (["--repeats", "0"], "argument --repeats: expected an integer >= 1, got 0"),
    (["--keys", "0"], "argument --keys: expected an integer >= 1, got 0"),
    (["--providers", "jax"], "--providers: unknown provider 'jax'"),
    (["--providers", "cuda"], "--providers cuda cannot run on cpu with float32"),
    (["--device", "gpu"], "--device must be cpu or cuda[:index], got 'gpu'"),
    (["--device", "meta"], "--device must be cpu or cuda[:index], got 'meta'"),
    (["--losses", "clip", "info_nce", "--keys", "32"], "--keys: keys (M, the rows of the keys) is used by info_nce only, not by clip"),
])
def test_bad_bench_arguments_are_usage_errors(capsys, tmp_path, arguments, message):
    out = tmp_path / "records.jsonl"
    error = _usage_error(capsys, TINY + ["--out", str(out)] + arguments)
    assert error.startswith("python -m fused_losses bench: error: ") and message in error
    assert not out.exists()  # nothing was measured


def test_cuda_without_cuda_is_a_usage_error(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    error = _usage_error(capsys, TINY + ["--device", "cuda", "--out", str(tmp_path / "r.jsonl")])
    assert "--device cuda: CUDA is not available to torch here" in error


@pytest.mark.parametrize("kind", ["missing directory", "directory", "other text"])
def test_unusable_out_is_a_usage_error(capsys, tmp_path, kind):
    out = {"missing directory": tmp_path / "missing" / "r.jsonl", "directory": tmp_path,
           "other text": tmp_path / "notes.txt"}[kind]
    if kind == "other text":
        out.write_text("my notes\n")
    error = _usage_error(capsys, TINY + ["--out", str(out)])
    assert f"--out {out} cannot be" in error
    if kind == "other text":
        assert out.read_text() == "my notes\n"


def test_bench_summary_shows_this_runs_records_only(capsys, tmp_path, monkeypatch):
    # Timing only: the peak-memory child process costs seconds and is tested in test_benchmarks.
    monkeypatch.setattr(cli, "Sweep", functools.partial(Sweep, memory=False))
    out = tmp_path / "records.jsonl"
    earlier = dict(device="cpu", provider="reference", loss="siglip", n=4096, m=4096, d=512,
                   dtype="float32", mode="forward", median_ms=1.0, matmul_ms=1.0, oom=False)
    out.write_text(json.dumps(earlier) + "\n")
    assert main(TINY + ["--losses", "info_nce", "--keys", "12", "--out", str(out)]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in summary[1:-1]] == [["info_nce", "torch", "8", "4"]]
    assert summary[-1] == f"1 records appended to {out}"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and (records[1]["n"], records[1]["m"]) == (8, 12)


def test_selfcheck_of_the_triton_interpreter_prints_no_numpy_warning():
    """The interpreter evaluates masked-off lanes too (-inf - -inf, log2(0)); those warnings are
    silenced around its kernels, so the self-check table stays readable."""
    device = torch.device("cpu")
    if backends.unavailable_reason("triton", device) is not None:
        pytest.skip("triton cannot run here")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_error, grad_error = check_backend_loss("triton", "supcon", device)
    assert loss_error < 1e-4 and grad_error < 1e-4
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


def test_quick_benchmark_runs_the_backend_auto_picks(monkeypatch):
    """Not triton's CPU interpreter, which the self-check runs but which would take hours at the
    benchmark's size."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sweep = quick_sweep(torch.device("cpu"))
    assert tuple(sweep.providers) == ("torch", "reference")
