"""Write docs/API.md, the API reference, from the public names and their docstrings.

    python3 docs/generate_api.py            # rewrite docs/API.md
    python3 docs/generate_api.py --check    # exit 1 if docs/API.md is out of date

Public: every name in ``fused_losses.__all__``, grouped by the shallowest module under
fused_losses that holds it (a module there, such as ``reference``, gets its own section with its
public functions and classes), and the public classes and functions of each
``fused_losses.integrations`` module. tests/test_api_doc.py runs the check.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "API.md"
REGENERATE = "python3 docs/generate_api.py"
LINE_WIDTH = 100
# Where torch defines these is not where users import them from.
PUBLIC_PATHS = {"torch.distributed.distributed_c10d.ProcessGroup": "torch.distributed.ProcessGroup",
                "torch.nn.modules.module.Module": "torch.nn.Module",
                "sentence_transformers.sentence_transformer.model.SentenceTransformer":
                    "sentence_transformers.SentenceTransformer",
                "sentence_transformers.util.similarity.": "sentence_transformers.util."}

sys.path.insert(0, str(ROOT))  # this checkout's fused_losses, also when run as a script
import fused_losses  # noqa: E402
import fused_losses.integrations  # noqa: E402

Members = List[Tuple[str, Any]]


class _FunctionDefault:
    """A default that is a function, shown by its import path (its repr holds a memory address)."""

    def __init__(self, function: Callable[..., Any]):
        self.path = f"{function.__module__}.{function.__qualname__}"

    def __repr__(self) -> str:
        return self.path


def _signature(name: str, function: Callable[..., Any], drop_self: bool = False) -> str:
    """``name(parameters) -> return`` as Python writes it, one parameter a line when longer than
    LINE_WIDTH."""
    try:
        signature = inspect.signature(function, eval_str=True)
    except NameError:  # an annotation only importable while type checking
        signature = inspect.signature(function)
    parameters = [p.replace(default=_FunctionDefault(p.default)) if inspect.isfunction(p.default)
                  else p for p in signature.parameters.values()]
    signature = signature.replace(parameters=parameters[1:] if drop_self else parameters)
    text = str(signature)  # with the "/" and "*" markers
    returns = text[text.rindex(")") + 1:]
    one_line = f"{name}{text}"
    if len(one_line) <= LINE_WIDTH:
        return one_line
    # Re-render the parameters one a line; the markers come from a signature without annotations.
    bare = signature.replace(parameters=[p.replace(annotation=p.empty, default=p.empty)
                                         for p in signature.parameters.values()],
                             return_annotation=inspect.Signature.empty)
    by_name = {p.name: str(p) for p in signature.parameters.values()}
    parts = [by_name.get(part.lstrip("*"), part) for part in str(bare)[1:-1].split(", ")]
    return f"{name}(\n" + "".join(f"    {part},\n" for part in parts) + f"){returns}"


def _public_paths(text: str) -> str:
    for defined, public in PUBLIC_PATHS.items():
        text = text.replace(defined, public)
    return text


def _entry(name: str, obj: Any) -> List[str]:
    lines = [f"### `{name}`", "", "```python"]
    if inspect.isclass(obj):
        lines.append(f"class {name}({', '.join(inspect.formatannotation(b) for b in obj.__bases__)})")
        if inspect.isfunction(obj.__init__):  # not a builtin base's (an exception's)
            lines.append(_signature(name, obj))
    else:
        lines.append(_signature(name, obj))
    lines = [_public_paths(line) for line in lines]
    lines += ["```", "", inspect.getdoc(obj) or "(no docstring)", ""]
    if inspect.isclass(obj):
        for method_name, method in vars(obj).items():
            if not method_name.startswith("_") and inspect.isfunction(method):
                signature = _public_paths(_signature(f"{name}.{method_name}", method, drop_self=True))
                lines += ["```python", signature, "```", ""]
                if method.__doc__:
                    lines += [inspect.getdoc(method) or "", ""]
    return lines


def _public_members(module: ModuleType) -> Members:
    """The module's ``__all__``, else the classes and functions it defines without a leading _."""
    if hasattr(module, "__all__"):
        return [(name, getattr(module, name)) for name in module.__all__]
    return [(name, obj) for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
            and obj.__module__ == module.__name__]


def _home(name: str, obj: Any) -> str:
    """The shallowest module below fused_losses that holds ``obj`` as ``name``."""
    parts = obj.__module__.split(".")
    for depth in range(2, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:depth]))
        if module is not None and getattr(module, name, None) is obj:
            return module.__name__
    return obj.__module__


def sections() -> List[Tuple[str, str, Members]]:
    """(title, introduction, members) of each section of API.md, in order."""
    top: Dict[str, Members] = {}
    submodules = []
    for name in fused_losses.__all__:
        obj = getattr(fused_losses, name)
        if inspect.ismodule(obj):
            submodules.append(obj)
        else:
            top.setdefault(_home(name, obj), []).append((name, obj))
    result = []
    for home, members in sorted(top.items()):
        first_paragraph = (inspect.getdoc(sys.modules[home]) or "").split("\n\n")[0]
        result.append((f"fl.*: {home}", first_paragraph, members))
    for module in submodules + [importlib.import_module(f"fused_losses.integrations.{info.name}")
                                for info in pkgutil.iter_modules(fused_losses.integrations.__path__)]:
        result.append((module.__name__, inspect.getdoc(module) or "", _public_members(module)))
    return result


def render() -> str:
    """The text of docs/API.md."""
    lines = [
        f"# fused_losses {fused_losses.__version__}: API reference",
        "",
        f"Generated from the docstrings by `{REGENERATE}`; do not edit by hand",
        "(`tests/test_api_doc.py` fails when this file is out of date). In the `fl.*` sections,",
        "each name is `fused_losses.<name>` (`import fused_losses as fl`), defined in the module",
        "named in the title.",
        "",
        inspect.getdoc(fused_losses) or "",
        "",
    ]
    for title, introduction, members in sections():
        lines += [f"## {title}", "", introduction, ""]
        for name, obj in members:
            lines += _entry(name, obj)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/API.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = API_DOC.read_text(encoding="utf-8") if API_DOC.is_file() else ""
        if current != text:
            print(f"{API_DOC} is out of date: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    API_DOC.write_text(text, encoding="utf-8")
    print(f"wrote {API_DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
