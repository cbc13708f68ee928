"""The package passes mypy (configured in pyproject.toml), and mypy catches a wrong argument type
in a user's call: tests/typing_snippets/user_calls_ok.py must check clean, every line of
user_calls_wrong.py marked ``# E: <code>`` must be reported, and nothing else. One mypy run,
in a process of its own (in pytest's, next to torch, it takes twice as long): about 30 s of CPU
without its cache in .mypy_cache, a few seconds with it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is a test requirement: pip install -e .[test]")

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = ROOT / "tests" / "typing_snippets"
WRONG = SNIPPETS / "user_calls_wrong.py"


def _in_wrong_calls(path: str) -> bool:
    """Whether mypy's ``path`` (relative to where it was run, or absolute) is user_calls_wrong.py."""
    return Path(path).parts[-2:] == WRONG.parts[-2:]


def _expected_errors():
    """{(line, error code)} marked in user_calls_wrong.py."""
    return {(number, match.group(1)) for number, line in enumerate(WRONG.read_text().splitlines(), 1)
            for match in [re.search(r"# E: ([\w-]+)$", line)] if match}


@pytest.mark.slow
def test_mypy_passes_and_catches_wrong_user_calls():
    run = subprocess.run([
        sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
        "--cache-dir", str(ROOT / ".mypy_cache"), "--no-error-summary", "--show-error-codes",
        str(ROOT / "fused_losses"), str(SNIPPETS / "user_calls_ok.py"), str(WRONG)],
        capture_output=True, text=True, cwd=ROOT)
    stdout, stderr, status = run.stdout, run.stderr, run.returncode
    assert status in (0, 1), f"mypy failed to run:\n{stderr}{stdout}"
    errors = [match.groups() for match in re.finditer(r"^(.+?):(\d+): error: .*\[([\w-]+)\]$", stdout, re.M)]
    unexpected = [f"{path}:{line} [{code}]" for path, line, code in errors if not _in_wrong_calls(path)]
    assert not unexpected, ("mypy errors in the package or in the correct user calls:\n"
                            + "\n".join(unexpected) + f"\n{stdout}")
    found = {(int(line), code) for path, line, code in errors if _in_wrong_calls(path)}
    missed = sorted(_expected_errors() - found)
    assert not missed, f"mypy did not flag these wrong calls (line, code) of {WRONG.name}: {missed}\n{stdout}"
    extra = sorted(found - _expected_errors())
    assert not extra, f"mypy flagged unmarked lines (line, code) of {WRONG.name}: {extra}\n{stdout}"
