"""What a newcomer meets first: the version in every place it is stated, the licence, and the
main job's quick benchmark (its memory ratio and largest-batch estimates)."""

import math
import re
import sys
from pathlib import Path

import pytest
import torch

import fused_losses
from fused_losses.cli import bench, main

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fused_losses {fused_losses.__version__}"


def test_changelog_has_the_version():
    assert re.search(rf"^## {re.escape(fused_losses.__version__)}$", (ROOT / "CHANGELOG.md").read_text(), re.M)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is in the standard library from Python 3.11")
def test_metadata_names_the_licence_and_reads_the_version():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fused_losses.__version__"}


def test_largest_batch_estimate():
    # Linear: memory per row constant; quadratic: the N x N logits.
    assert bench.largest_batch_estimate(100, 1000, 10_000, quadratic=False) == 100_000
    assert bench.largest_batch_estimate(100, 1000, 10_000, quadratic=True) == 10_000
    assert bench.largest_batch_estimate(None, 1000, 10_000, quadratic=True) is None
    assert bench.largest_batch_estimate(100, 1000, None, quadratic=False) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read from /proc/meminfo")
def test_free_memory_is_known_on_linux():
    free = bench.free_memory_bytes(torch.device("cpu"))
    assert free is not None and 0 < free <= 2**60


def test_quick_benchmark_report(monkeypatch):
    mib = 2**20
    measured = {"torch": (1000.0, 100 * mib), "reference": (2500.0, 400 * mib)}

    def fake_sweep(sweep, advance):
        for provider in sweep.providers:
            median, peak = measured[provider]
            advance(provider)
            yield {"provider": provider, "median_ms": median, "peak_mem_bytes": peak,
                   "matmul_ms": 250.0, "oom": False}

    monkeypatch.setattr(bench, "run_sweep", fake_sweep)
    monkeypatch.setattr(bench, "free_memory_bytes", lambda device: 6400 * mib)
    report = bench.quick_benchmark(torch.device("cpu"))  # on the backend auto picks: torch
    n = int(re.search(r"N = M = (\d+)", report).group(1))
    lines = {line.split()[0]: line for line in report.splitlines() if line.startswith("  ")}
    assert "4.0x matmul" in lines["torch"] and f"largest batch ~{64 * n:>11,}" in lines["torch"]
    assert f"largest batch ~{int(n * math.sqrt(16)):>11,}" in lines["reference"]
    assert "speed-up over the reference: 2.5x; memory: 25.0% of the reference's (4.0x less)" in report
    assert "estimated for the 6.2 GiB free now" in report


def test_ci_runs_readme_command_2():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^# 2\..*\n(.+)$", readme, re.M).group(1)
    assert command in (ROOT / ".ci" / "run").read_text().splitlines(), \
        f"README's Quickstart command 2 is not a line of .ci/run:\n{command}"
