"""benchmarks/kernels.py (the GPU session's "kernels" part) as a dry run: every piece of every
backend that runs here, once, at a tiny size (the triton pieces in the interpreter on the CPU)."""

import json

import pytest

from benchmarks import kernels

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::DeprecationWarning")


def test_every_piece_runs_and_is_recorded(tmp_path, capsys):
    out = tmp_path / "kernels.jsonl"
    assert kernels.main(["--sizes", "24x16", "--repeats", "1", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    timed = {(r["backend"], r["piece"]) for r in records if r.get("piece")}
    assert ("torch", "matmul") in timed
    assert {("triton", name) for name in kernels.pieces_of("triton")} <= timed
    for record in records:
        assert record["n"] == record["m"] == 24 and record["d"] == 16 and record["matmul_ms"] > 0
        if record.get("piece"):
            assert record["median_ms"] > 0 and record["ratio"] == pytest.approx(record["median_ms"] / record["matmul_ms"])
        else:
            assert record["note"].startswith("skipped: ")  # a backend that cannot run here
    table = capsys.readouterr().out.split("| backend |")[1]
    assert "fused_backward" in table and "gemm_v" in table


def test_pieces_are_data():
    generic = set(kernels.GENERIC_PIECES)
    assert generic <= set(kernels.pieces_of("cuda")) and generic <= set(kernels.pieces_of("triton"))
    kernels.register_pieces("torch", lambda: {"extra": (1, lambda problem, backend: lambda: None)})
    try:
        assert "extra" in kernels.pieces_of("torch")
    finally:
        del kernels.PIECES["torch"]
