"""The gradient-caching and sentence-transformers benchmarks at tiny sizes: a step of each mode
measured in this process, and one measurement through a fresh child process."""

import pytest

from benchmarks import cached_backward_benchmark, fresh_process

TINY = dict(batch=24, chunk=5, dim_in=6, hidden=8, layers=2, dim_out=4, repeats=1, threads=1)
FIELDS = {"peak_extra_bytes", "peak_rss_bytes", "median_ms", "p20_ms", "p80_ms", "repeats"}


@pytest.mark.parametrize("mode", cached_backward_benchmark.MODES)
def test_cached_backward_benchmark_measures_each_mode(mode):
    result = cached_backward_benchmark.measure(dict(TINY, mode=mode))
    assert result.keys() == FIELDS
    assert result["median_ms"] > 0 and result["peak_extra_bytes"] >= 0


def test_a_measurement_in_a_fresh_process():
    result = fresh_process.measure_in_child(cached_backward_benchmark.MODULE,
                                            dict(TINY, mode="cached"))
    assert result.keys() == FIELDS | {"oom"} and result["oom"] is False
    assert result["peak_rss_bytes"] > 0


def test_sentence_transformers_benchmark_measures_both_losses():
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    from benchmarks import sentence_transformers_benchmark

    for provider in sentence_transformers_benchmark.PROVIDERS:
        result = sentence_transformers_benchmark.measure(dict(
            provider=provider, batch=20, mini_batch_size=8, dim=4, repeats=1, device="cpu",
            threads=1))
        assert result.keys() == FIELDS and result["median_ms"] > 0
