"""Benchmark records grouped for figures and tables (records: see benchmarks/README.md)."""

from collections import defaultdict
from typing import Dict, Iterable, List, Tuple

from benchmarks.providers import ALL_PROVIDERS


def ordered_providers(names: Iterable[str]) -> List[str]:
    """``names`` in the order of ALL_PROVIDERS (ours first), unknown ones last: the order of
    figures' legends and tables' columns."""
    rank = {name: index for index, name in enumerate(ALL_PROVIDERS)}
    return sorted(set(names), key=lambda name: (rank.get(name, len(rank)), name))


def timing_series(records: Iterable[dict], mode: str) -> Dict[Tuple[str, str, str, int], Dict[str, List[dict]]]:
    """{(device, loss, dtype, d): {provider: its ``mode`` records by increasing n}}."""
    groups = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record["mode"] == mode:
            groups[record["device"], record["loss"], record["dtype"], record["d"]][record["provider"]].append(record)
    return {key: {provider: sorted(series, key=lambda r: r["n"])
                  for provider, series in by_provider.items()}
            for key, by_provider in sorted(groups.items())}


def max_batch_results(records: Iterable[dict]) -> Dict[Tuple[str, str, str], Dict[str, Dict[int, dict]]]:
    """{(device, loss, dtype): {provider: {d: max_batch record}}}."""
    groups = defaultdict(lambda: defaultdict(dict))
    for record in records:
        if record["mode"] == "max_batch":
            groups[record["device"], record["loss"], record["dtype"]][record["provider"]][record["d"]] = record
    return dict(sorted(groups.items()))


def first_oom_n(series: List[dict]):
    """The smallest n at which a provider ran out of memory in ``series``, or None."""
    return next((r["n"] for r in series if r["oom"]), None)


def format_bytes(nbytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.0f} B"
