"""The benchmark runner end to end on the CPU at tiny sizes: records, out-of-memory and failing
providers, the slow-point limit, the max-batch search, and the figures and tables made from a
results file."""

import functools
import json

import pytest
import torch

from benchmarks import plot, readme_table, run
from fused_losses import reference
from fused_losses.benchmarking import (
    MODES, Case, Provider, Sweep, largest_batch, max_batch, read_records, register_provider,
    run_sweep, runs_anywhere,
)

TIMING_FIELDS = ("median_ms", "p20_ms", "p80_ms")
RECORD_FIELDS = ("provider", "loss", "n", "m", "d", "dtype", "mode", *TIMING_FIELDS, "peak_mem_bytes",
                 "matmul_ms", "device", "torch", "triton", "cuda", "date", "oom", "note", "error")


def clip_up_to(limit: int, case: Case):
    """The reference CLIP loss, which runs out of memory, like a CUDA allocation, above ``limit`` rows."""
    def loss(image, text):
        if len(image) > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(image) ** 2 * 4} bytes")
        return reference.clip_loss(image, text, 100.0)
    return loss


def failing_loss(case: Case):
    def loss(image, text):
        raise ValueError("this provider is broken")
    return loss


def fake_provider(name: str, loss_function) -> str:
    register_provider(Provider(name, ("clip",), loss_function, runs_anywhere))
    return name


def tiny_sweep(providers, **options) -> Sweep:
    return Sweep(("clip",), (16, 32, 64), (8,), ("float32",), providers, "cpu", repeats=2, **options)


def test_runner_writes_well_formed_records(tmp_path, capsys):
    status = run.main(["--losses", "clip", "siglip", "--batch-sizes", "16", "32", "--dims", "8",
                       "--providers", "torch", "reference", "--repeats", "2", "--device", "cpu",
                       "--out-dir", str(tmp_path)])
    assert status == 0
    (results,) = tmp_path.glob("sweep_*.jsonl")
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 2 * 2 * 2 * len(MODES)  # losses x n x providers x modes
    for record in records:
        assert set(RECORD_FIELDS) <= record.keys()
        assert record["oom"] is False and record["error"] is None and record["note"] is None
        assert 0 < record["p20_ms"] <= record["median_ms"] <= record["p80_ms"]
        assert record["matmul_ms"] > 0 and record["peak_mem_bytes"] >= 0
        assert record["parity_error"] < 1e-4
    assert "| N | matmul | torch | reference |" in capsys.readouterr().out


def test_out_of_memory_is_a_result_and_ends_the_series():
    provider = fake_provider("oom_above_16", functools.partial(clip_up_to, 16))
    by_n = {r["n"]: r for r in run_sweep(tiny_sweep([provider], memory=False, modes=("forward_backward",)))}
    assert not by_n[16]["oom"] and by_n[16]["median_ms"] > 0
    assert by_n[32]["oom"] and by_n[32]["median_ms"] is None and by_n[32]["note"] is None
    assert by_n[64]["oom"] and by_n[64]["note"] == "not run: out of memory at n=32"


def test_a_failing_provider_is_recorded_and_skipped():
    provider = fake_provider("broken", failing_loss)
    records = list(run_sweep(tiny_sweep([provider, "torch"], memory=False, modes=("forward",))))
    broken = [r for r in records if r["provider"] == provider]
    assert broken[0]["error"] == "ValueError: this provider is broken"
    assert [r["note"] for r in broken[1:]] == ["not run: failed at n=16"] * 2
    assert all(r["median_ms"] > 0 for r in records if r["provider"] == "torch")


def test_points_projected_too_slow_are_skipped():
    records = list(run_sweep(tiny_sweep(["torch"], memory=False, modes=("forward_backward",),
                                        slow_limit_s=1e-9)))
    assert records[0]["median_ms"] > 0
    assert all(r["median_ms"] is None and r["note"].startswith("not run: projected") for r in records[1:])


def test_largest_batch_doubles_then_bisects():
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 1000

    assert largest_batch(fits, start=64, cap=4096, granularity=16) == (992, 1008)
    assert tried[:6] == [64, 128, 256, 512, 1024, 768]
    assert largest_batch(lambda n: True, start=64, cap=1000, granularity=16) == (1000, None)
    assert largest_batch(lambda n: n <= 10, start=64, cap=1000, granularity=16) == (0, 16)


def test_max_batch_of_a_provider_with_a_known_limit():
    provider = fake_provider("oom_above_200", functools.partial(clip_up_to, 200))
    case = Case("clip", provider, 0, 0, 8, "float32", "cpu")
    record = max_batch(case, start=32, cap=1024, granularity=8)
    assert (record["max_batch"], record["first_failing_n"], record["capped"]) == (200, 208, False)
    assert record["mode"] == "max_batch" and record["n"] == record["m"] == 200
    capped = max_batch(case, start=32, cap=128, granularity=8)
    assert (capped["max_batch"], capped["first_failing_n"], capped["capped"]) == (128, None, True)


def sample_record(provider, n, median_ms, *, oom=False, d=512, mode="forward_backward", **fields):
    """A record of a made-up GPU: matmul n / 4096 ms, memory n * 4 KiB."""
    timed = median_ms is not None
    record = dict(loss="clip", provider=provider, n=n, m=n, d=d, dtype="bfloat16", mode=mode, oom=oom,
                  median_ms=median_ms, p20_ms=median_ms and 0.9 * median_ms, p80_ms=median_ms and 1.1 * median_ms,
                  repeats=3 if timed else 0, peak_mem_bytes=n * 2**12 if timed else None,
                  matmul_ms=n / 4096, device="Test GPU", torch="2.11.0+cu130", triton="3.6.0",
                  cuda="13.0", date="2026-01-01", note=None, error=None)
    record.update(fields)
    return record


@pytest.fixture
def sample_results(tmp_path):
    records = [sample_record("triton", n, 3 * n / 4096) for n in (4096, 8192, 16384)]
    records += [sample_record("reference", 4096, 12.0), sample_record("reference", 8192, None, oom=True),
                sample_record("reference", 16384, None, oom=True, note="not run: out of memory at n=8192")]
    records += [sample_record("triton", 524288, None, mode="max_batch", max_batch=524288, capped=True),
                sample_record("reference", 45056, None, mode="max_batch", max_batch=45056, capped=False)]
    path = tmp_path / "sample.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_readme_table_from_a_results_file(sample_results, tmp_path):
    out = tmp_path / "table.md"
    assert readme_table.main([str(sample_results), "--out", str(out)]) == 0
    table = out.read_text()
    assert "| N | matmul | triton | reference |" in table
    assert "| 4,096 | 1 ms | 3 ms (3×), 16 MiB | 12 ms (12×), 16 MiB |" in table
    assert "| 8,192 | 2 ms | 6 ms (3×), 32 MiB | OOM |" in table
    assert "speed-up of triton over" in table and "| 4,096 | 4× |" in table and "| 8,192 | peer OOM |" in table
    assert "Out of memory: reference at N = 8,192." in table
    assert "| triton | ≥ 524,288 (cap) |" in table and "| reference | 45,056 |" in table


def test_plots_from_a_results_file(sample_results, tmp_path):
    pytest.importorskip("matplotlib")
    assert plot.main([str(sample_results), "--out-dir", str(tmp_path)]) == 0
    pngs = sorted(path.name for path in tmp_path.glob("*.png"))
    assert pngs == ["clip_bfloat16_d512_forward_backward_test-gpu.png", "max_batch_clip_bfloat16_test-gpu.png"]


def test_read_records_keeps_the_last_measurement_of_a_point(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(json.dumps(sample_record("triton", 4096, 5.0)) + "\n")
    second.write_text(json.dumps(sample_record("triton", 4096, 3.0)) + "\n")
    assert [r["median_ms"] for r in read_records([str(first), str(second)])] == [3.0]
