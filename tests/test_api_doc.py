"""docs/API.md documents every public name and is what docs/generate_api.py writes today."""

import difflib
import importlib.util
import re
from pathlib import Path

GENERATOR = Path(__file__).resolve().parents[1] / "docs" / "generate_api.py"
_spec = importlib.util.spec_from_file_location("generate_api", GENERATOR)
generate_api = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate_api)


def _documented() -> dict:
    """{section title: names with an entry} as docs/API.md has them."""
    text = generate_api.API_DOC.read_text(encoding="utf-8")
    return {title: re.findall(r"^### `(\w+)`$", body, re.M)
            for title, body in re.findall(r"^## ([^\n]+)\n(.*?)(?=^## |\Z)", text, re.M | re.S)}


def test_every_public_name_has_an_entry():
    documented = _documented()
    missing = [f"{name} (section '{title}')" for title, _, members in generate_api.sections()
               for name, _ in members if name not in documented.get(title, [])]
    assert not missing, (f"docs/API.md has no entry for: {', '.join(missing)}; "
                         f"run {generate_api.REGENERATE} and commit docs/API.md")


def test_entries_are_public_names():
    public = {title: [name for name, _ in members] for title, _, members in generate_api.sections()}
    stale = [f"{name} (section '{title}')" for title, names in _documented().items()
             for name in names if name not in public.get(title, [])]
    assert not stale, (f"docs/API.md documents names that are not public (any more): "
                       f"{', '.join(stale)}; run {generate_api.REGENERATE}")


def test_api_doc_is_up_to_date():
    current = generate_api.API_DOC.read_text(encoding="utf-8")
    expected = generate_api.render()
    diff = "".join(list(difflib.unified_diff(current.splitlines(True), expected.splitlines(True),
                                             "docs/API.md", "generated"))[:60])
    assert current == expected, (f"docs/API.md is out of date (a docstring or signature changed): "
                                 f"run {generate_api.REGENERATE}\n{diff}")
